//! A provider's streamed answer relayed through a small buffer,
//! so that each write carries every event that has arrived since the last one.
//!
//! hyper hands a body over one frame at a time: the connection's task decodes a frame and
//! waits until the reader has taken it. Passed straight to another connection, a stream of
//! small events then costs one write (and two task wakes) per event, whatever the reader's
//! pace. Here a task reads the answer ahead into a bounded channel as fast as it arrives (at
//! most 256 KiB: an agent that stops reading holds no more of the answer than that), and the
//! reader takes all that is waiting at once: an event still goes out the moment it arrives
//! when the agent keeps up, and a fast stream goes out in few large writes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::{Semaphore, mpsc};

/// Frames the task may read ahead of the reader.
const FRAMES_AHEAD: usize = 64;
/// Bytes of data the task may read ahead of the reader (a frame larger than this counts as
/// this much).
const BYTES_AHEAD: usize = 256 << 10;
/// The most one relayed frame joins; an answer known to be no larger passes straight through.
const MAX_JOINED: usize = 64 << 10;
/// A data frame smaller than this is taken for one event of a stream (see `settling`).
const EVENT_SIZE: usize = 4 << 10;

/// A wait of the reader's until the runtime has run every task that was ready.
type Settle = Pin<Box<dyn Future<Output = ()> + Send + Sync>>;

/// A frame as the task read it, and the read-ahead room it takes until the reader has it.
type Ahead<E> = (Result<Frame<Bytes>, E>, u32);

/// A body relayed by a task of its own, its data frames joined as they wait.
pub enum Relayed<B: Body> {
    /// A small answer of known size: nothing to gain from a task.
    Direct(B),
    /// A stream, or a large answer.
    Buffered {
        /// Frames as the task read them.
        frames: mpsc::Receiver<Ahead<B::Error>>,
        /// Read-ahead room, in bytes, given back as frames are taken.
        room: Arc<Semaphore>,
        /// A frame that could not join the data before it (trailers, an error).
        held: Option<Result<Frame<Bytes>, B::Error>>,
        /// The body's size as it announced it.
        hint: SizeHint,
        /// Whether the last frame taken was one event, not a block of joined ones.
        events: bool,
        /// The reader's wait before it looks at the frames read ahead.
        settling: Option<Settle>,
    },
}

impl<B> Relayed<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Send,
{
    /// Relays the body of an answer with `headers`, spawning its reader unless
    /// the answer is small and of known size (a JSON answer: most are).
    pub fn answer(headers: &http::HeaderMap, body: B) -> Relayed<B> {
        let length = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let hint = body.size_hint();
        if hint
            .exact()
            .or(length)
            .is_some_and(|n| n <= MAX_JOINED as u64)
        {
            return Relayed::Direct(body);
        }
        let (tx, frames) = mpsc::channel(FRAMES_AHEAD);
        let room = Arc::new(Semaphore::new(BYTES_AHEAD));
        let ahead = room.clone();
        tokio::spawn(async move {
            let mut body = body;
            loop {
                // The reader may go away (the agent hung up) while the answer stalls, or
                // while the room ahead is full: dropping the body ends the request upstream
                // now, not at its next byte.
                let frame = tokio::select! {
                    frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)) => frame,
                    () = tx.closed() => break,
                };
                let Some(frame) = frame else { break };
                let size = frame
                    .as_ref()
                    .ok()
                    .and_then(Frame::data_ref)
                    .map_or(0, |d| d.len().min(BYTES_AHEAD)) as u32;
                let taken = match ahead.try_acquire_many(size) {
                    Ok(permit) => Ok(permit),
                    Err(_) => tokio::select! {
                        permit = ahead.acquire_many(size) => permit,
                        () = tx.closed() => break,
                    },
                };
                let Ok(permit) = taken else { break };
                permit.forget();
                let failed = frame.is_err();
                if tx.send((frame, size)).await.is_err() || failed {
                    break;
                }
            }
        });
        Relayed::Buffered {
            frames,
            room,
            held: None,
            hint,
            events: false,
            settling: None,
        }
    }
}

impl<B> Body for Relayed<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let (frames, room, held, events, settling) = match self.get_mut() {
            Relayed::Direct(body) => return Pin::new(body).poll_frame(cx),
            Relayed::Buffered {
                frames,
                room,
                held,
                events,
                settling,
                ..
            } => (frames, room, held, events, settling),
        };
        // hyper decodes an answer one frame per wake of its connection's task, so a fast
        // stream of small events (as providers send them) reaches the task reading ahead one
        // event at a time, even when many are already in the socket's buffer. While a
        // provider's frames are events, the reader therefore lets the runtime run every task
        // that is ready before it looks at what is waiting (`yield_now` wakes it after them):
        // the events decoded meanwhile go out in the same write. An event of a slow stream
        // still leaves as soon as nothing else is ready to run. Measured with the broker's
        // benchmark in docs/performance.md.
        if *events && held.is_none() {
            let wait = settling.get_or_insert_with(|| Box::pin(tokio::task::yield_now()));
            ready!(wait.as_mut().poll(cx));
            *settling = None;
        }
        let first = match held.take() {
            Some(frame) => frame,
            None => match ready!(frames.poll_recv(cx)) {
                Some((frame, size)) => {
                    room.add_permits(size as usize);
                    frame
                }
                None => return Poll::Ready(None),
            },
        };
        let data = match first.map(Frame::into_data) {
            Ok(Ok(data)) => data,
            Ok(Err(frame)) => return Poll::Ready(Some(Ok(frame))),
            Err(e) => return Poll::Ready(Some(Err(e))),
        };
        *events = data.len() < EVENT_SIZE;
        let mut joined: Option<BytesMut> = None;
        while joined.as_ref().map_or(data.len(), BytesMut::len) < MAX_JOINED {
            let Ok((next, size)) = frames.try_recv() else {
                break;
            };
            room.add_permits(size as usize);
            match next.map(Frame::into_data) {
                Ok(Ok(more)) => joined
                    .get_or_insert_with(|| BytesMut::from(&data[..]))
                    .extend_from_slice(&more),
                Ok(Err(frame)) => {
                    *held = Some(Ok(frame));
                    break;
                }
                Err(e) => {
                    *held = Some(Err(e));
                    break;
                }
            }
        }
        Poll::Ready(Some(Ok(Frame::data(joined.map_or(data, BytesMut::freeze)))))
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Relayed::Direct(body) => body.is_end_stream(),
            Relayed::Buffered { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Relayed::Direct(body) => body.size_hint(),
            Relayed::Buffered { hint, .. } => *hint,
        }
    }
}

impl<B: Body> std::fmt::Debug for Relayed<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Relayed::Direct(_) => "Relayed::Direct",
            Relayed::Buffered { .. } => "Relayed::Buffered",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use http_body_util::{BodyExt, StreamBody};
    use std::convert::Infallible;

    fn stream(
        frames: Vec<Frame<Bytes>>,
    ) -> impl Body<Data = Bytes, Error = Infallible> + Send + Unpin + 'static {
        StreamBody::new(futures_util::stream::iter(frames.into_iter().map(Ok)))
    }

    fn events(n: usize) -> Vec<Frame<Bytes>> {
        (0..n)
            .map(|i| Frame::data(Bytes::from(format!("data: {i}\n\n"))))
            .collect()
    }

    #[tokio::test]
    async fn a_fast_stream_arrives_whole_in_fewer_larger_frames() {
        let expected: String = (0..1000).map(|i| format!("data: {i}\n\n")).collect();
        let mut relayed = Relayed::answer(&http::HeaderMap::new(), stream(events(1000)));
        let mut got = Vec::new();
        let mut frames = 0;
        while let Some(frame) = relayed.frame().await {
            got.extend_from_slice(&frame.unwrap().into_data().unwrap());
            frames += 1;
        }
        assert_eq!(String::from_utf8(got).unwrap(), expected);
        assert!(frames < 1000, "{frames} frames: nothing was joined");
    }

    /// A body decoded like hyper's: each frame needs one more turn of its connection's task
    /// (here: a wake of its own), though all of them are already "in the socket".
    struct FramePerWake {
        left: usize,
        decoded: bool,
    }

    impl Body for FramePerWake {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            if !std::mem::replace(&mut self.decoded, false) {
                self.decoded = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.left -= 1;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"data: x\n\n")))))
        }
    }

    #[tokio::test]
    async fn a_stream_decoded_a_frame_per_wake_goes_out_in_few_writes() {
        let mut relayed = Relayed::answer(
            &http::HeaderMap::new(),
            FramePerWake {
                left: 1000,
                decoded: false,
            },
        );
        // Like hyper's writer, a task of its own: take frames while they are ready, write
        // when none is.
        let (writes, bytes) = tokio::spawn(async move {
            let (mut writes, mut unwritten, mut bytes) = (0, false, 0);
            std::future::poll_fn(|cx| {
                loop {
                    match Pin::new(&mut relayed).poll_frame(cx) {
                        Poll::Ready(Some(frame)) => {
                            bytes += frame.unwrap().into_data().unwrap().len();
                            unwritten = true;
                        }
                        Poll::Ready(None) => return Poll::Ready(()),
                        Poll::Pending => {
                            writes += usize::from(std::mem::take(&mut unwritten));
                            return Poll::Pending;
                        }
                    }
                }
            })
            .await;
            (writes, bytes)
        })
        .await
        .unwrap();
        assert_eq!(bytes, 1000 * 9);
        // At most the frames the channel holds join one write (64).
        assert!(writes <= 1000 / 32, "{writes} writes for 1000 events");
    }

    #[tokio::test(start_paused = true)]
    async fn an_event_of_a_stream_that_pauses_goes_out_alone_and_at_once() {
        let paced = futures_util::stream::unfold(0, |i| async move {
            if i == 3 {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            Some((
                Ok::<_, Infallible>(Frame::data(Bytes::from(format!("data: {i}\n\n")))),
                i + 1,
            ))
        });
        let started = tokio::time::Instant::now();
        let mut relayed =
            Relayed::answer(&http::HeaderMap::new(), StreamBody::new(Box::pin(paced)));
        for i in 0..3 {
            let frame = relayed.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), format!("data: {i}\n\n"));
            // Sent when it arrived, not held for the next one.
            assert_eq!(started.elapsed().as_millis(), 100 * (i as u128 + 1));
        }
        assert!(relayed.frame().await.is_none());
    }

    #[tokio::test]
    async fn trailers_follow_the_data_they_came_after() {
        let mut frames = events(3);
        frames.push(Frame::trailers(http::HeaderMap::new()));
        let mut relayed = Relayed::answer(&http::HeaderMap::new(), stream(frames));
        let data = relayed.frame().await.unwrap().unwrap();
        assert_eq!(
            data.into_data().unwrap(),
            "data: 0\n\ndata: 1\n\ndata: 2\n\n"
        );
        assert!(relayed.frame().await.unwrap().unwrap().is_trailers());
        assert!(relayed.frame().await.is_none());
    }

    /// A body that never answers and says when it is dropped.
    struct Stalled {
        _alive: tokio::sync::oneshot::Sender<()>,
    }

    impl Body for Stalled {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_goes_away_drops_a_stalled_answer_at_once() {
        let (alive, dropped) = tokio::sync::oneshot::channel();
        let relayed = Relayed::answer(&http::HeaderMap::new(), Stalled { _alive: alive });
        tokio::task::yield_now().await;
        drop(relayed);
        // With paused time the timeout fires as soon as nothing else can run.
        let waited = tokio::time::timeout(std::time::Duration::from_secs(3600), dropped).await;
        assert!(waited.is_ok(), "the stalled answer outlived its reader");
    }

    #[tokio::test(start_paused = true)]
    async fn an_agent_that_stops_reading_holds_no_more_than_the_room_ahead() {
        let read = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = read.clone();
        let big = futures_util::stream::iter(0..1000).map(move |_| {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'x'; 16 << 10])))
        });
        let mut relayed = Relayed::answer(&http::HeaderMap::new(), StreamBody::new(big));
        let first = relayed.frame().await.unwrap().unwrap();
        assert!(!first.into_data().unwrap().is_empty());
        // The agent reads nothing more; everything else runs until it waits.
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let frames = read.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            frames * (16 << 10) <= BYTES_AHEAD + MAX_JOINED + 2 * (16 << 10),
            "{frames} frames of 16 KiB read ahead"
        );
    }

    #[tokio::test]
    async fn a_small_answer_of_known_size_passes_straight_through() {
        let relayed = Relayed::answer(
            &http::HeaderMap::new(),
            http_body_util::Full::new(Bytes::from_static(b"{}")),
        );
        assert!(matches!(relayed, Relayed::Direct(_)));
        assert_eq!(relayed.size_hint().exact(), Some(2));
        // A body that does not say its size, of an answer whose header does.
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::CONTENT_LENGTH, "28".parse().unwrap());
        assert!(matches!(
            Relayed::answer(&headers, stream(events(3))),
            Relayed::Direct(_)
        ));
        assert!(matches!(
            Relayed::answer(&http::HeaderMap::new(), stream(events(3))),
            Relayed::Buffered { .. }
        ));
    }
}

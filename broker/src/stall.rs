//! An agent that stops reading its answer. Its connection's writes wait on a full socket
//! buffer, so the answer is not polled any more and neither the upstream's idle time-out nor
//! the answer's end comes: the request would hold its connection, its budget hold and its key
//! version (which a rotation waits for) as long as the agent likes. [`Unread`] fails the
//! connection's writes once one has waited longer than the limit its connection sets.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// A connection whose writes fail once one has waited `limit` milliseconds for the peer to
/// make room (it reads nothing). `limit` may change between requests.
pub struct Unread<IO> {
    io: IO,
    limit: Arc<AtomicU64>,
    waiting: Option<Pin<Box<Sleep>>>,
}

impl<IO> Unread<IO> {
    /// `io`, with writes limited by `limit` (milliseconds).
    pub fn new(io: IO, limit: Arc<AtomicU64>) -> Unread<IO> {
        Unread {
            io,
            limit,
            waiting: None,
        }
    }

    /// `poll` as it is, or an error when it has been pending for longer than the limit.
    fn limited<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.waiting = None;
            return poll;
        }
        let limit = Duration::from_millis(self.limit.load(Ordering::Relaxed));
        let waiting = self
            .waiting
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if waiting.as_mut().poll(cx).is_ready() {
            self.waiting = None;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the agent read nothing of its answer for {limit:?}"),
            )));
        }
        Poll::Pending
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Unread<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Unread<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write(cx, buf);
        this.limited(cx, poll)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_flush(cx);
        this.limited(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_shutdown(cx);
        this.limited(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_makes_no_room_for_fails_after_the_limit() {
        // A pipe of 64 bytes whose other end never reads.
        let (ours, _theirs) = tokio::io::duplex(64);
        let limit = Arc::new(AtomicU64::new(30_000));
        let mut conn = Unread::new(ours, limit);
        conn.write_all(&[0; 64]).await.unwrap();
        let started = tokio::time::Instant::now();
        let e = conn.write_all(&[0; 1]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_makes_room_in_time_is_not_cut() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let limit = Arc::new(AtomicU64::new(30_000));
        let mut conn = Unread::new(ours, limit);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                tokio::io::AsyncReadExt::read_exact(&mut theirs, &mut buf)
                    .await
                    .unwrap();
            }
        });
        conn.write_all(&[0; 256]).await.unwrap();
        reader.await.unwrap();
    }
}

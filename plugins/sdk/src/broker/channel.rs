//! The hand-off channel between the daemon and `keywarden-broker`: a `SOCK_SEQPACKET` socket
//! pair, one record per message (at most [`MAX_RECORD`] bytes), a record from the daemon
//! carrying an agent's connection as `SCM_RIGHTS`.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use tokio::io::Interest;
use tokio::net::UnixStream;

use super::MAX_RECORD;

/// One end of the channel. (Registered with tokio as a `UnixStream` for its readiness only:
/// records are sent and read with `sendmsg` and `recvmsg`, never as a byte stream.)
#[derive(Debug)]
pub struct Channel {
    socket: UnixStream,
}

/// A record received: its bytes and the descriptor it carried, if any.
pub type Record = (Vec<u8>, Option<OwnedFd>);

/// The two ends of a new channel, close-on-exec (the one given to the broker is made its
/// standard output, which `dup2` makes inheritable).
pub fn pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

impl Channel {
    /// Serves `fd`, one end of a [`pair`], on the current tokio runtime.
    pub fn new(fd: OwnedFd) -> std::io::Result<Channel> {
        if rustix::net::sockopt::socket_type(&fd)? != SocketType::SEQPACKET {
            return Err(std::io::Error::other("not a SOCK_SEQPACKET socket"));
        }
        rustix::io::ioctl_fionbio(&fd, true)?;
        Ok(Channel {
            socket: UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))?,
        })
    }

    /// Sends one record, with `fd` passed along when given.
    pub async fn send(&self, record: &[u8], fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
        if record.len() > MAX_RECORD {
            return Err(std::io::Error::other("record too large"));
        }
        loop {
            self.socket.writable().await?;
            let sent = self.socket.try_io(Interest::WRITABLE, || {
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut control = SendAncillaryBuffer::new(&mut space);
                let fds = fd.map(|f| [f]);
                if let Some(fds) = &fds {
                    control.push(SendAncillaryMessage::ScmRights(fds));
                }
                Ok(rustix::net::sendmsg(
                    &self.socket,
                    &[IoSlice::new(record)],
                    &mut control,
                    SendFlags::NOSIGNAL,
                )?)
            });
            match sent {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Receives one record; `None` once the other end is closed.
    pub async fn recv(&self) -> std::io::Result<Option<Record>> {
        let mut buf = vec![0u8; MAX_RECORD];
        loop {
            self.socket.readable().await?;
            let received = self.socket.try_io(Interest::READABLE, || {
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let got = rustix::net::recvmsg(
                    &self.socket,
                    &mut [IoSliceMut::new(&mut buf)],
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC,
                )?;
                let mut passed = None;
                for message in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(fds) = message {
                        for fd in fds {
                            // One descriptor per record; any other is closed here.
                            passed.get_or_insert(fd);
                        }
                    }
                }
                Ok((got, passed))
            });
            match received {
                Ok((got, _)) if got.bytes == 0 && !got.flags.contains(ReturnFlags::TRUNC) => {
                    return Ok(None);
                }
                Ok((got, passed)) => {
                    if got
                        .flags
                        .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC)
                    {
                        return Err(std::io::Error::other("a record was cut short"));
                    }
                    buf.truncate(got.bytes);
                    return Ok(Some((buf, passed)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[tokio::test]
    async fn a_record_carries_its_bytes_and_a_working_descriptor() {
        let (a, b) = pair().unwrap();
        let (a, b) = (Channel::new(a).unwrap(), Channel::new(b).unwrap());
        let (mut mine, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        a.send(b"first", Some(std::os::fd::AsFd::as_fd(&theirs)))
            .await
            .unwrap();
        drop(theirs);
        a.send(b"second", None).await.unwrap();
        let (bytes, fd) = b.recv().await.unwrap().unwrap();
        assert_eq!(bytes, b"first");
        let mut passed = std::os::unix::net::UnixStream::from(fd.unwrap());
        mine.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        passed.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        let (bytes, fd) = b.recv().await.unwrap().unwrap();
        assert_eq!((bytes.as_slice(), fd.is_none()), (&b"second"[..], true));
        drop(a);
        assert!(b.recv().await.unwrap().is_none());
    }
}

//! The crate's only `unsafe` code: two Linux calls that rustix does not wrap. Each block says
//! why it is sound.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

/// `SO_PEERPIDFD` (Linux 6.5): a pidfd for the process that connected a Unix socket.
const SO_PEERPIDFD: libc::c_int = 77;

/// Marks every descriptor above stderr close-on-exec (`close_range` with
/// `CLOSE_RANGE_CLOEXEC`, Linux 5.11).
#[allow(unsafe_code)]
pub fn mark_inherited_fds_cloexec() -> std::io::Result<()> {
    // SAFETY: with CLOSE_RANGE_CLOEXEC nothing is closed now; only a flag is set on
    // descriptors, so no owned descriptor of this process becomes invalid. The call takes
    // plain integers and no pointers.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A pidfd for the process at the other end of a connected Unix socket: the very process that
/// called `connect`, even if it has exited since (its pid then reads as -1) or its pid was
/// reused.
#[allow(unsafe_code)]
pub fn peer_pidfd(socket: impl AsFd) -> std::io::Result<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the socket descriptor is borrowed and valid for the call; `fd` and `len` are
    // live locals of the size the kernel is told.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 || fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just created this descriptor for us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The pid a pidfd refers to now: `None` once that process has exited.
pub fn pidfd_pid(pidfd: &OwnedFd) -> Option<i32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).ok()?;
    let pid: i32 = info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))?
        .trim()
        .parse()
        .ok()?;
    (pid > 0).then_some(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_pidfd_names_the_connecting_process_until_it_exits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut child = std::process::Command::new("python3")
            .args([
                "-c",
                "import socket,sys,time; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); time.sleep(30)",
            ])
            .arg(&path)
            .spawn()
            .unwrap();
        let (stream, _) = listener.accept().unwrap();
        let pidfd = peer_pidfd(&stream).unwrap();
        assert_eq!(pidfd_pid(&pidfd), Some(child.id() as i32));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(pidfd_pid(&pidfd), None, "an exited peer has no pid");
    }
}

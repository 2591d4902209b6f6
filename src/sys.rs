//! The crate's only `unsafe` code: Linux and C-library calls that rustix does not wrap. Each
//! block says why it is sound.

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

/// Bounds the C library's allocator to `arenas` heaps. glibc otherwise grows up to eight per
/// core as threads contend, and memory freed in one is never reused by another: a daemon whose
/// start-up reads ten thousand rows on several threads kept 190 MB resident for a 30 MB heap.
/// Other C libraries ignore this.
#[allow(unsafe_code)]
pub fn limit_malloc_arenas(arenas: i32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt takes two integers and only changes the allocator's parameters; it is
    // thread-safe and an unknown or refused value is reported, not acted on.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = arenas;
}

/// Hands the heap's free pages back to the system (glibc's `malloc_trim`): after start-up,
/// whose transient reads are the daemon's peak.
#[allow(unsafe_code)]
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes an integer, touches only the allocator's own free lists under
    // its locks, and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Starts `cmd` in a process group of its own (so all it starts can be signalled at once);
/// with `take_terminal`, that group becomes the foreground group of the terminal on stdin as
/// soon as it exists, so the command reads the terminal and Ctrl-C reaches it as from a shell.
#[allow(unsafe_code)]
pub fn own_process_group(cmd: &mut tokio::process::Command, take_terminal: bool) {
    cmd.process_group(0);
    if take_terminal {
        // SAFETY: the closure runs in the child between fork and exec. It calls only
        // async-signal-safe functions (getpid, pthread_sigmask, tcsetpgrp) on the child's own
        // state, allocates nothing and takes no lock. The parent makes the same call after the
        // spawn; whichever runs first wins, so the child never reads the terminal from the
        // background.
        unsafe {
            cmd.pre_exec(|| foreground(libc::getpid()));
        }
    }
}

/// Makes process group `pgid` the foreground group of the terminal on stdin.
pub fn give_terminal_to(pgid: i32) -> std::io::Result<()> {
    foreground(pgid)
}

/// `tcsetpgrp` on stdin with SIGTTOU blocked in this thread: a process in a background group
/// may then hand the terminal over (POSIX) instead of being stopped for trying.
#[allow(unsafe_code)]
fn foreground(pgid: libc::pid_t) -> std::io::Result<()> {
    // SAFETY: the signal sets are locals initialised by sigemptyset before use; the mask is
    // only this thread's and is restored before returning; tcsetpgrp takes integers.
    unsafe {
        let mut ttou: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut ttou);
        libc::sigaddset(&mut ttou, libc::SIGTTOU);
        libc::pthread_sigmask(libc::SIG_BLOCK, &ttou, &mut old);
        let rc = libc::tcsetpgrp(libc::STDIN_FILENO, pgid);
        let result = if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        };
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        result
    }
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

/// An SQLite connection borrowed from sqlx for as long as its handle is locked (see
/// `store::sqlite::direct`): statements run on it in the calling thread.
#[derive(Debug)]
pub struct BorrowedSqlite<'h> {
    conn: rusqlite::Connection,
    _locked: std::marker::PhantomData<&'h mut ()>,
}

impl std::ops::Deref for BorrowedSqlite<'_> {
    type Target = rusqlite::Connection;

    fn deref(&self) -> &rusqlite::Connection {
        &self.conn
    }
}

/// Borrows the connection behind `locked`, which sqlx's connection thread does not touch for
/// as long as the borrow lives.
#[allow(unsafe_code)]
pub fn borrow_sqlite<'h>(
    locked: &'h mut sqlx::sqlite::LockedSqliteHandle<'_>,
) -> rusqlite::Result<BorrowedSqlite<'h>> {
    // SAFETY: the handle is a live connection (sqlx closes it only when its connection is
    // dropped, which `locked` borrows), and sqlx guarantees no other thread uses it while
    // `locked` exists; the returned value borrows `locked` mutably, so it cannot outlive it.
    // `from_handle` never closes the handle, and only shared references to the connection
    // are handed out (no `DerefMut`), so it cannot be moved out of the borrow either.
    let conn = unsafe { rusqlite::Connection::from_handle(locked.as_raw_handle().as_ptr())? };
    Ok(BorrowedSqlite {
        conn,
        _locked: std::marker::PhantomData,
    })
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

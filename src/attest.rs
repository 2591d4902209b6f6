//! Peer attestation for the agent socket: who is on the other end.
//!
//! The kernel tells us the peer's uid, gid and pid (`SO_PEERCRED`, fixed at `connect`) and, on
//! Linux 6.5+, a pidfd of that very process (`SO_PEERPIDFD`). The executable comes from
//! `/proc/PID/exe`, and its SHA-256 from the file that link points to, computed only when a
//! policy asks and cached by device, inode, size and change time.
//!
//! A pid can be reused by a new process after the peer exits. With a pidfd, the pid is read
//! from it (none once the peer exited) before and after the executable is looked up, so the
//! executable is the connecting process's. Without one, the process's start time must be no
//! later than the moment the connection was accepted and must not change while we look. Either
//! way, when in doubt the executable is unknown and exe policies deny.
//!
//! A path means something only in a mount namespace: a peer in another one (a container, or a
//! user namespace that bind-mounted its own binary over an allowed path) has no executable path
//! here, so path policies deny it; hash policies still see the file the process runs.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::policy::Identity;

/// Entries kept in the executable hash cache.
const HASH_CACHE_ENTRIES: usize = 4096;

/// Largest executable hashed (real ones are far smaller): a bigger one is treated as unknown,
/// so a peer cannot make the daemon read gigabytes per connection.
pub const MAX_HASHED_EXE_BYTES: u64 = 512 << 20;

/// Identifies one version of a file: device, inode, size, and its change time (seconds,
/// nanoseconds). Not the modification time: any user can set that back after rewriting their
/// own file; the change time moves with every write and cannot be set.
type FileVersion = (u64, u64, u64, i64, i64);

/// SHA-256s of executables by file version.
#[derive(Debug, Default)]
pub struct ExeHashCache {
    entries: Mutex<HashMap<FileVersion, String>>,
}

/// Who is on the other end of a connection, from `SO_PEERCRED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Process id (absent if the kernel did not say).
    pub pid: Option<i32>,
}

/// Seconds since boot (CLOCK_BOOTTIME), the clock `/proc/PID/stat` start times count in.
pub fn boot_seconds() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

/// A process's start time in seconds since boot.
fn start_time(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let ticks: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    Some(ticks as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// Whether process `pid` lives in this process's mount namespace (unknown counts as no).
fn same_mount_namespace(pid: i32) -> bool {
    let ns = |path: String| std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
    match (
        ns(format!("/proc/{pid}/ns/mnt")),
        ns("/proc/self/ns/mnt".into()),
    ) {
        (Some(theirs), Some(ours)) => theirs == ours,
        _ => false,
    }
}

/// Processes remembered by [`RecentOwners`].
const RECENT_OWNERS: usize = 16;

/// The processes that held the last loopback connections' other ends, most recent first.
/// [`tcp_peer`] looks at them before walking every process's descriptors, so an agent that
/// opens a connection per request is found at the cost of one directory listing. Only the
/// order of the search changes: a remembered process must hold the very socket, as any other.
#[derive(Debug, Default)]
pub struct RecentOwners(Mutex<VecDeque<i32>>);

impl RecentOwners {
    fn pids(&self) -> Vec<i32> {
        let recent = self.0.lock().unwrap_or_else(|e| e.into_inner());
        recent.iter().copied().collect()
    }

    fn note(&self, pid: i32) {
        let mut recent = self.0.lock().unwrap_or_else(|e| e.into_inner());
        recent.retain(|p| *p != pid);
        recent.push_front(pid);
        recent.truncate(RECENT_OWNERS);
    }
}

/// The process on this host that holds the other end of a loopback TCP connection from
/// `remote` to `local`: the client socket's uid and inode (asked of the kernel, or from
/// `/proc/net/tcp{,6}`), then the process with that socket among its descriptors (the `recent`
/// owners looked at first), pinned by a pidfd taken before the socket is looked for again. `None` when it cannot be
/// found (a process of another user while the daemon is not root, one in another network
/// namespace, or one that already closed).
pub fn tcp_peer(
    local: SocketAddr,
    remote: SocketAddr,
    recent: &RecentOwners,
) -> Option<(Peer, Option<OwnedFd>)> {
    // The client's socket: its local end is our remote one.
    let (uid, inode) = match socket_by_diag(remote, local) {
        Some(found) => found,
        // No netlink here (a sandbox's address families), no `inet_diag` in this kernel, or the
        // socket gone: the table, which lists every socket.
        None => {
            let table = if remote.is_ipv4() {
                "/proc/net/tcp"
            } else {
                "/proc/net/tcp6"
            };
            socket_in_table(table, &proc_addr(remote), &proc_addr(local))?
        }
    };
    let target = format!("socket:[{inode}]");
    let holds = |pid: i32| -> bool {
        std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.flatten().any(|fd| {
                std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str())
            })
        })
    };
    let recent_pids = recent.pids();
    let pid = match recent_pids.iter().copied().find(|pid| holds(*pid)) {
        Some(pid) => pid,
        None => {
            #[cfg(feature = "failpoints")]
            fail::fail_point!("attest.owner-walk");
            // The socket's owner is almost always its holder: its processes are looked at first.
            let pids: Vec<(i32, bool)> = std::fs::read_dir("/proc")
                .ok()?
                .flatten()
                .filter_map(|e| {
                    let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
                    Some((pid, e.metadata().is_ok_and(|m| m.uid() == uid)))
                })
                .filter(|(pid, _)| !recent_pids.contains(pid))
                .collect();
            pids.iter()
                .filter(|(_, owned)| *owned)
                .chain(pids.iter().filter(|(_, owned)| !*owned))
                .map(|(pid, _)| *pid)
                .find(|pid| holds(*pid))?
        }
    };
    let pidfd = rustix::process::Pid::from_raw(pid)
        .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok());
    // The pid may have been reused between the scan and the pidfd: it must still hold it.
    if !holds(pid) {
        return None;
    }
    recent.note(pid);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let gid = status
        .lines()
        .find_map(|l| l.strip_prefix("Gid:"))
        .and_then(|ids| ids.split_whitespace().nth(1)?.parse().ok())?;
    Some((
        Peer {
            uid,
            gid,
            pid: Some(pid),
        },
        pidfd,
    ))
}

/// The uid and inode of the TCP socket whose local end is `local` and remote end `remote`, asked
/// of the kernel by its exact address (`sock_diag(7)`): one hash lookup, where the
/// `/proc/net/tcp` table walks every bucket of the connection table (about a millisecond on a
/// small host, more on a large one). `None` when the kernel does not answer with it.
fn socket_by_diag(local: SocketAddr, remote: SocketAddr) -> Option<(u32, u64)> {
    use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_sock_diag::SockDiagMessage;
    use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
    use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
    use rustix::net::netlink::{SOCK_DIAG, SocketAddrNetlink};
    use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family: if local.is_ipv4() { AF_INET } else { AF_INET6 },
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: SocketId {
                source_port: local.port(),
                destination_port: remote.port(),
                source_address: local.ip(),
                destination_address: remote.ip(),
                interface_id: 0,
                // INET_DIAG_NOCOOKIE: any socket with these ends.
                cookie: [0xff; 8],
            },
        })
        .into(),
    );
    request.finalize();
    let mut bytes = vec![0; request.buffer_len()];
    request.serialize(&mut bytes);
    let socket = rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        Some(SOCK_DIAG),
    )
    .ok()?;
    rustix::net::sendto(
        &socket,
        &bytes,
        SendFlags::empty(),
        &SocketAddrNetlink::new(0, 0),
    )
    .ok()?;
    let mut answer = [0u8; 8192];
    let (_, len) = rustix::net::recv(&socket, &mut answer[..], RecvFlags::empty()).ok()?;
    match NetlinkMessage::<SockDiagMessage>::deserialize(&answer[..len])
        .ok()?
        .payload
    {
        // A socket being torn down has no inode.
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(found))
            if found.header.inode != 0
                && found.header.socket_id.source_port == local.port()
                && found.header.socket_id.destination_port == remote.port() =>
        {
            Some((found.header.uid, u64::from(found.header.inode)))
        }
        _ => None,
    }
}

/// The uid and inode of the socket with these ends in a `/proc/net/tcp{,6}` table, read a line
/// at a time into one buffer: the table lists every TCP socket of the host, those in TIME_WAIT
/// too, so it runs to thousands of lines under a flood of connections. Sockets being torn down
/// (inode 0) are skipped.
fn socket_in_table(table: &str, local: &str, remote: &str) -> Option<(u32, u64)> {
    use std::io::BufRead;
    let mut reader = std::io::BufReader::new(std::fs::File::open(table).ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?; // the header
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode …
        let mut fields = line.split_whitespace().skip(1);
        if fields.next() != Some(local) || fields.next() != Some(remote) {
            continue;
        }
        let uid = fields.nth(4).and_then(|u| u.parse().ok());
        let inode = fields.nth(1).and_then(|i| i.parse().ok());
        if let (Some(uid), Some(inode)) = (uid, inode)
            && inode != 0
        {
            return Some((uid, inode));
        }
    }
}

/// An address as `/proc/net/tcp{,6}` writes it: the IP as 32-bit words in host (little-endian)
/// order, then the port, in upper-case hex.
fn proc_addr(address: SocketAddr) -> String {
    let octets = match address.ip() {
        std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
        std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    let mut text: String = octets
        .chunks(4)
        .map(|w| format!("{:08X}", u32::from_le_bytes([w[0], w[1], w[2], w[3]])))
        .collect();
    text.push_str(&format!(":{:04X}", address.port()));
    text
}

/// Peer executables hashed at once.
const HASHING_AT_ONCE: usize = 4;
/// How long a request waits for its peer's executable to be hashed.
const HASH_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Hashes peers' executables off the async threads, a few at a time, for policies that pin
/// executables by hash.
#[derive(Debug, Clone)]
pub struct Hasher {
    cache: Arc<ExeHashCache>,
    hashing: Arc<tokio::sync::Semaphore>,
}

impl Default for Hasher {
    fn default() -> Self {
        Hasher {
            cache: Arc::default(),
            hashing: Arc::new(tokio::sync::Semaphore::new(HASHING_AT_ONCE)),
        }
    }
}

impl Hasher {
    /// The cache new identities share.
    pub fn cache(&self) -> Arc<ExeHashCache> {
        self.cache.clone()
    }

    /// A copy of the connection's identity, its executable hashed first when `needs_hash`
    /// and not yet done (given up after [`HASH_DEADLINE`]: hash policies then deny the peer).
    pub async fn identity(
        &self,
        identity: &tokio::sync::Mutex<PeerIdentity>,
        needs_hash: bool,
    ) -> PeerIdentity {
        let mut guard = identity.lock().await;
        if needs_hash && !guard.hash_known() {
            let mut copy = guard.clone();
            let hashing = self.hashing.clone();
            let hashed = tokio::time::timeout(HASH_DEADLINE, async move {
                let permit = hashing.acquire_owned().await.ok()?;
                tokio::task::spawn_blocking(move || {
                    Identity::exe_sha256(&mut copy);
                    drop(permit);
                    copy
                })
                .await
                .ok()
            })
            .await;
            match hashed {
                Ok(Some(done)) => *guard = done,
                _ => {
                    tracing::warn!(actor = %guard.actor(), "gave up hashing the peer's executable");
                    guard.give_up_hash();
                }
            }
        }
        guard.clone()
    }
}

/// What we know of a connected peer.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    /// From SO_PEERCRED.
    pub peer: Peer,
    /// The executable, when it could be resolved, the pid was not reused and the peer shares
    /// this daemon's mount namespace.
    pub exe: Option<PathBuf>,
    start: Option<f64>,
    hash: Option<Option<String>>,
    cache: Arc<ExeHashCache>,
    actor: Arc<str>,
}

fn actor_of(peer: &Peer, exe: Option<&Path>) -> Arc<str> {
    format!(
        "agent uid={} gid={} pid={} exe={}",
        peer.uid,
        peer.gid,
        peer.pid.unwrap_or(0),
        exe.map_or("unknown".into(), |e| e.display().to_string())
    )
    .into()
}

impl PeerIdentity {
    /// Attests a peer whose connection was accepted at `accepted` (seconds since boot), with
    /// the pidfd of the connecting process when the kernel gave one.
    pub fn attest(
        peer: Peer,
        pidfd: Option<OwnedFd>,
        accepted: f64,
        cache: Arc<ExeHashCache>,
    ) -> PeerIdentity {
        let mut identity = PeerIdentity {
            peer,
            exe: None,
            start: None,
            hash: None,
            cache,
            actor: actor_of(&peer, None),
        };
        let Some(pid) = peer.pid.filter(|p| *p > 0) else {
            return identity;
        };
        let alive = || match &pidfd {
            Some(fd) => crate::sys::pidfd_pid(fd) == Some(pid),
            None => true,
        };
        if !alive() {
            tracing::warn!(
                pid,
                "the peer exited before it was attested; its executable is unknown"
            );
            return identity;
        }
        let Some(before) = start_time(pid) else {
            return identity;
        };
        // Without a pidfd: a process that started after we accepted the connection cannot be
        // the peer.
        let tick = 1.0 / rustix::param::clock_ticks_per_second() as f64;
        if pidfd.is_none() && before > accepted + tick + 0.01 {
            tracing::warn!(
                pid,
                "peer pid was reused by a newer process; its executable is unknown"
            );
            return identity;
        }
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        let same_namespace = same_mount_namespace(pid);
        if start_time(pid) != Some(before) || !alive() {
            tracing::warn!(pid, "peer process changed while being attested");
            return identity;
        }
        identity.start = Some(before);
        if !same_namespace {
            tracing::debug!(
                pid,
                "peer is in another mount namespace; its path means nothing here"
            );
            identity.actor = actor_of(&peer, None);
            return identity;
        }
        identity.actor = actor_of(&peer, exe.as_deref());
        identity.exe = exe;
        identity
    }

    /// Records that the executable's hash could not be had (hashing took too long): exe hash
    /// policies deny this peer.
    pub fn give_up_hash(&mut self) {
        self.hash = Some(None);
    }

    /// Whether the executable hash was already looked at (computed or found unavailable).
    pub fn hash_known(&self) -> bool {
        self.hash.is_some()
    }

    /// The audit actor: `agent uid=1001 gid=1001 pid=42 exe=/usr/bin/python3`.
    pub fn actor(&self) -> String {
        self.actor.to_string()
    }

    fn compute_hash(&self) -> Option<String> {
        let pid = self.peer.pid?;
        let start = self.start?;
        let link = format!("/proc/{pid}/exe");
        let meta = std::fs::metadata(&link).ok()?;
        let key = (
            meta.dev(),
            meta.ino(),
            meta.size(),
            meta.ctime(),
            meta.ctime_nsec(),
        );
        if let Some(h) = self.cache.entries.lock().expect("hash cache").get(&key) {
            return Some(h.clone());
        }
        if meta.size() > MAX_HASHED_EXE_BYTES {
            tracing::warn!(
                pid,
                size = meta.size(),
                "peer executable is too large to hash; it is treated as unknown"
            );
            return None;
        }
        let file = std::fs::File::open(&link).ok()?;
        let hash =
            crate::crypto::reader_sha256(std::io::Read::take(file, MAX_HASHED_EXE_BYTES)).ok()?;
        if start_time(pid) != Some(start) {
            return None;
        }
        let mut entries = self.cache.entries.lock().expect("hash cache");
        if entries.len() >= HASH_CACHE_ENTRIES {
            entries.clear();
        }
        entries.insert(key, hash.clone());
        Some(hash)
    }
}

impl Identity for PeerIdentity {
    fn uid(&self) -> u32 {
        self.peer.uid
    }

    fn gid(&self) -> u32 {
        self.peer.gid
    }

    fn exe(&self) -> Option<&Path> {
        self.exe.as_deref()
    }

    fn exe_sha256(&mut self) -> Option<String> {
        if self.hash.is_none() {
            self.hash = Some(self.compute_hash());
        }
        self.hash.clone().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_written_as_proc_net_tcp_writes_them() {
        assert_eq!(
            proc_addr("127.0.0.1:8788".parse().unwrap()),
            "0100007F:2254"
        );
        assert_eq!(
            proc_addr("[::1]:443".parse().unwrap()),
            "00000000000000000000000001000000:01BB"
        );
    }

    #[test]
    fn a_connection_of_this_process_is_found_in_the_table() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, remote) = listener.accept().unwrap();
        let local = listener.local_addr().unwrap();
        assert_eq!(remote, client.local_addr().unwrap());
        // The kernel's answer by address is the table's line.
        let in_table = socket_in_table("/proc/net/tcp", &proc_addr(remote), &proc_addr(local));
        assert!(in_table.is_some());
        assert_eq!(socket_by_diag(remote, local), in_table);
        let recent = RecentOwners::default();
        let (peer, pidfd) = tcp_peer(local, remote, &recent).expect("found");
        assert_eq!(peer.pid, Some(std::process::id() as i32));
        assert_eq!(peer.uid, rustix::process::getuid().as_raw());
        assert!(pidfd.is_some());
        assert_eq!(recent.pids(), [std::process::id() as i32]);
    }

    #[test]
    fn an_ipv6_connection_is_found_by_address_as_in_its_table() {
        let Ok(listener) = std::net::TcpListener::bind("[::1]:0") else {
            return; // no IPv6 loopback on this host
        };
        let local = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(local).unwrap();
        let (_server, remote) = listener.accept().unwrap();
        let in_table = socket_in_table("/proc/net/tcp6", &proc_addr(remote), &proc_addr(local));
        assert!(in_table.is_some());
        assert_eq!(socket_by_diag(remote, local), in_table);
    }

    #[test]
    fn a_remembered_owner_is_not_taken_for_another_process() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let local = listener.local_addr().unwrap();
        let recent = RecentOwners::default();
        let me = std::process::id() as i32;
        let _mine = std::net::TcpStream::connect(local).unwrap();
        let (_server, remote) = listener.accept().unwrap();
        assert_eq!(tcp_peer(local, remote, &recent).unwrap().0.pid, Some(me));
        // Another process connects while this one, remembered, holds a connection too.
        let mut child = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "exec 3<>/dev/tcp/127.0.0.1/{}; read -r _ <&0",
                local.port()
            ))
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (_theirs, remote) = listener.accept().unwrap();
        let found = tcp_peer(local, remote, &recent).unwrap().0.pid;
        drop(child.stdin.take());
        child.wait().unwrap();
        assert_eq!(found, Some(child.id() as i32));
        assert_eq!(recent.pids(), [child.id() as i32, me]);
    }

    #[test]
    fn attests_this_very_process() {
        let me = Peer {
            uid: rustix::process::getuid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
            pid: Some(std::process::id() as i32),
        };
        let mut id = PeerIdentity::attest(me, None, boot_seconds(), Arc::default());
        assert_eq!(
            id.exe.as_deref(),
            Some(std::env::current_exe().unwrap().as_path())
        );
        let expected = crate::crypto::file_sha256(&std::env::current_exe().unwrap()).unwrap();
        assert_eq!(id.exe_sha256(), Some(expected));
        assert!(id.actor().contains("exe=/"));
    }

    #[test]
    fn an_executable_too_large_to_hash_is_unknown() {
        // A real program padded (sparsely) past the limit: the ELF loader ignores the tail.
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big-sleep");
        std::fs::copy("/bin/sleep", &big).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&big).unwrap();
        file.set_len(MAX_HASHED_EXE_BYTES + 1).unwrap();
        drop(file);
        let mut child =
            keywarden_testkit::unless_busy(|| std::process::Command::new(&big).arg("30").spawn())
                .unwrap();
        let peer = Peer {
            uid: 0,
            gid: 0,
            pid: Some(child.id() as i32),
        };
        let mut id = PeerIdentity::attest(peer, None, boot_seconds(), Arc::default());
        let hash = id.exe_sha256();
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(id.exe.as_deref(), Some(big.as_path()));
        assert_eq!(hash, None);
    }

    #[test]
    fn a_process_newer_than_the_connection_is_not_trusted() {
        let me = Peer {
            uid: 0,
            gid: 0,
            pid: Some(std::process::id() as i32),
        };
        // Pretend the connection was accepted long before this process started.
        let id = PeerIdentity::attest(me, None, 0.0, Arc::default());
        assert!(id.exe.is_none());
    }
}

//! Confinement of every program the daemon starts: plugins, consumers' `after` commands and the
//! alert command. Their code (a plugin's dependency tree above all) is treated as hostile.
//!
//! The daemon never configures a child between `fork` and `exec` (that would need `unsafe`).
//! Instead it starts its own executable (`/proc/self/exe`, so an upgraded or deleted binary on
//! disk changes nothing) with [`LAUNCHER_ARG`] and a JSON [`Launch`]; [`run_if_launcher`], called
//! first thing in `main`, sees that argument and, still single-threaded:
//! 1. changes to the child's working directory (before giving up the rights to reach it);
//! 2. sets `PR_SET_NO_NEW_PRIVS`, so nothing it executes can gain privileges;
//! 3. restricts itself with a Landlock ruleset: read and execute only the system paths a program
//!    needs to run plus the paths its config grants, read-write only the granted paths (for a
//!    plugin, its private work directory), no TCP `bind`, no abstract Unix sockets or signals leaving the sandbox;
//! 4. installs a seccomp filter that fails `ptrace`, `process_vm_readv/writev`, `mount`, `bpf`,
//!    `keyctl` and the like with `EPERM`, and `socket(AF_UNIX, …)` unless allowed (the daemon's
//!    sockets are Unix sockets);
//! 5. executes the program under its own user when the daemon is root (groups dropped).
//!
//! Every descriptor above stderr is marked close-on-exec first (the daemon's own are, but not
//! necessarily what it inherited), so the program gets only stdin, stdout and stderr
//! (`close_range`, in `sys`). Any failure is printed on stderr prefixed with
//! [`FAILURE_PREFIX`] and the launcher exits 126: a program that cannot be confined never runs.

use std::convert::Infallible;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, PathBeneath, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, path_beneath_rules,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use serde::{Deserialize, Serialize};

/// The first argument that turns `keywarden` into the launcher.
pub const LAUNCHER_ARG: &str = "__keywarden-confine";

/// How the launcher's own errors start on stderr (the plugin host logs such lines as errors).
pub const FAILURE_PREFIX: &str = "keywarden-sandbox:";

/// The Landlock ABI whose rights are asked for; older kernels enforce what they support.
const LANDLOCK_ABI: ABI = ABI::V7;

/// What every confined program may read and execute: the system's programs and libraries and
/// the few files in `/etc` that name resolution, TLS and the C library read. Nothing else of
/// `/etc` (a daemon's config and passphrase often live there), `/var`, `/home`, `/root`,
/// `/tmp` or `/run`.
const SYSTEM_READ: &[&str] = &[
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/pki",
    "/etc/python3",
    "/etc/python3.11",
    "/etc/python3.12",
    "/etc/python3.13",
    "/etc/alternatives",
    "/run/systemd/resolve",
    "/dev/zero",
    "/dev/urandom",
    "/dev/random",
    "/sys/devices/system/cpu",
    "/proc/self",
];

/// What every confined program may write besides its work directory.
const SYSTEM_WRITE: &[&str] = &["/dev/null"];

/// The user and group a confined program runs as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// What the config said (a name or `UID:GID`), for messages.
    pub name: String,
    /// The user id.
    pub uid: u32,
    /// The primary group id; supplementary groups are dropped.
    pub gid: u32,
}

impl Account {
    /// Resolves a user name from `/etc/passwd` (where `useradd` and systemd-sysusers write),
    /// or takes a numeric `UID:GID`.
    pub fn lookup(spec: &str) -> Result<Account, SandboxError> {
        let not_found = |why: String| SandboxError::UnknownUser {
            user: spec.to_string(),
            why,
        };
        if let Some((uid, gid)) = spec.split_once(':') {
            let parse = |s: &str| {
                s.parse::<u32>()
                    .map_err(|_| not_found(format!("{s:?} is not a number")))
            };
            return Ok(Account {
                name: spec.to_string(),
                uid: parse(uid)?,
                gid: parse(gid)?,
            });
        }
        let entry = database_entry("/etc/passwd", spec)
            .map_err(|e| not_found(format!("cannot read /etc/passwd: {e}")))?;
        if let Some(fields) = entry {
            let id = |i: usize| fields.get(i).and_then(|f| f.parse::<u32>().ok());
            if let (Some(uid), Some(gid)) = (id(2), id(3)) {
                return Ok(Account {
                    name: spec.to_string(),
                    uid,
                    gid,
                });
            }
        }
        Err(not_found(format!(
            "no such user in /etc/passwd; create it (`useradd --system --no-create-home \
             --shell /usr/sbin/nologin {spec}`) or name another as \"USER\" or \"UID:GID\""
        )))
    }
}

/// The fields of `name`'s line in a colon-separated account database (`/etc/passwd`,
/// `/etc/group`), if it has one.
pub fn database_entry(database: &str, name: &str) -> std::io::Result<Option<Vec<String>>> {
    let text = std::fs::read_to_string(database)?;
    Ok(text
        .lines()
        .map(|l| l.split(':').map(str::to_string).collect::<Vec<_>>())
        .find(|fields| fields[0] == name))
}

/// What a confined program may do beyond running: set per plugin, per consumer's `after`
/// command and for the alert command.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confinement {
    /// Run as this user (only when the daemon can switch users; `None` keeps the daemon's).
    pub user: Option<Account>,
    /// Paths it may read and execute, besides the system's.
    pub read: Vec<PathBuf>,
    /// Paths it may read and write (files, or directories and everything beneath).
    pub write: Vec<PathBuf>,
    /// May it create Unix sockets (`systemctl`, `docker` need them; plugins do not)?
    pub unix_sockets: bool,
    /// May it signal processes outside its sandbox (`kill -HUP` of a server)?
    pub signals: bool,
}

/// A `sandbox = { ... }` table of the config (`[plugins.NAME]`, a consumer's `after_sandbox`,
/// `[signals] alert_sandbox`): what a confined program may do beyond the defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    /// The user to run as when the daemon is root (default `[daemon] plugin_user`); a name from
    /// `/etc/passwd` or `UID:GID`.
    pub user: Option<String>,
    /// Files or directories it may read (a CA file, a script's modules).
    #[serde(default)]
    pub read_paths: Vec<PathBuf>,
    /// Files or directories it may read and write.
    #[serde(default)]
    pub write_paths: Vec<PathBuf>,
    /// Allow Unix sockets (off: the daemon's own sockets are Unix sockets).
    #[serde(default)]
    pub unix_sockets: bool,
    /// Allow signals to processes outside the sandbox.
    #[serde(default)]
    pub signals: bool,
}

/// What is being confined: a plugin never runs as root; a command may, when its config says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A plugin (or the broker).
    Plugin,
    /// A consumer's `after` command or the alert command.
    Command,
}

impl SandboxConfig {
    /// The confinement this table asks for. When the daemon can switch users (it is root, or
    /// holds CAP_SETUID and CAP_SETGID, as systemd's `AmbientCapabilities=` gives a dedicated
    /// user) the program gets `user` (or `default_user`), which must exist, and which for a
    /// plugin must not be root.
    pub fn resolve(&self, default_user: &str, role: Role) -> Result<Confinement, SandboxError> {
        let user = if can_switch_users() {
            let account = Account::lookup(self.user.as_deref().unwrap_or(default_user))?;
            if role == Role::Plugin && account.uid == 0 {
                return Err(SandboxError::PluginAsRoot(account.name));
            }
            Some(account)
        } else {
            None
        };
        Ok(Confinement {
            user,
            read: self.read_paths.clone(),
            write: self.write_paths.clone(),
            unix_sockets: self.unix_sockets,
            signals: self.signals,
        })
    }

    /// Makes relative paths absolute against `base` (the config file's directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in self
            .read_paths
            .iter_mut()
            .chain(self.write_paths.iter_mut())
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }
}

/// Everything the launcher needs, passed as one JSON argument.
#[derive(Debug, Serialize, Deserialize)]
pub struct Launch {
    /// The confinement.
    pub confinement: Confinement,
    /// The working directory, entered before the switch of user (and not granted by itself).
    pub cwd: PathBuf,
    /// The program (absolute, or looked up in `PATH`).
    pub program: String,
    /// Its pinned SHA-256 (plugins): the launcher opens the file once, without following a
    /// symlink, hashes what it reads from that descriptor and executes that descriptor, so
    /// what runs is exactly what was hashed.
    pub sha256: Option<String>,
    /// Its arguments.
    pub args: Vec<String>,
}

/// Why a program could not be confined.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A configured user does not exist.
    #[error("user {user:?}: {why}")]
    UnknownUser {
        /// As configured.
        user: String,
        /// Why.
        why: String,
    },
    /// A plugin would run as root.
    #[error(
        "plugins never run as root, and user {0:?} is root; name an unprivileged user \
         (the default is `[daemon] plugin_user`)"
    )]
    PluginAsRoot(String),
    /// The launcher's argument is not a [`Launch`].
    #[error("bad launch request: {0}")]
    BadRequest(String),
    /// The working directory cannot be entered.
    #[error("cannot enter {path}: {source}")]
    WorkingDirectory {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A path granted in the config cannot be opened.
    #[error("cannot grant {path}: {why}")]
    Grant {
        /// The path.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Landlock could not be set up or is not enforced by this kernel.
    #[error("Landlock: {0}")]
    Landlock(String),
    /// The seccomp filter could not be built or installed.
    #[error("seccomp: {0}")]
    Seccomp(String),
    /// The pinned program cannot be opened or does not have its pinned hash.
    #[error("{program}: {why}; refusing to run it")]
    Pin {
        /// The program.
        program: String,
        /// Why.
        why: String,
    },
    /// Inherited descriptors could not be marked close-on-exec.
    #[error("cannot close inherited file descriptors: {0}")]
    InheritedFds(std::io::Error),
    /// `PR_SET_NO_NEW_PRIVS` failed.
    #[error("no_new_privs: {0}")]
    NoNewPrivs(std::io::Error),
    /// Switching to the program's user, or dropping the capabilities left after it, failed.
    #[error("cannot become {user}: {why}")]
    SwitchUser {
        /// The user.
        user: String,
        /// What failed.
        why: String,
    },
    /// The program could not be executed.
    #[error("cannot execute {program}: {source}")]
    Exec {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
}

impl Confinement {
    /// A command that runs `program args` from `cwd` under this confinement, through the
    /// launcher. The caller adds the environment and stdio.
    /// With `sha256`, the program must be an absolute path whose content has that hash.
    pub fn command(
        &self,
        cwd: &Path,
        program: &str,
        sha256: Option<&str>,
        args: &[String],
    ) -> tokio::process::Command {
        let launch = Launch {
            confinement: self.clone(),
            cwd: cwd.to_path_buf(),
            program: program.to_string(),
            sha256: sha256.map(str::to_string),
            args: args.to_vec(),
        };
        let mut cmd = tokio::process::Command::new("/proc/self/exe");
        cmd.arg(LAUNCHER_ARG)
            .arg(serde_json::to_string(&launch).expect("a launch serializes"));
        cmd
    }

    /// A command for `argv` (an `after` or alert command) run from `/`, which may also read
    /// its program when named by path, and `read`.
    pub fn command_for(&self, argv: &[String], read: &[&Path]) -> tokio::process::Command {
        let mut read = read.to_vec();
        if argv[0].contains('/') {
            read.push(Path::new(&argv[0]));
        }
        self.granting(&read, &[])
            .command(Path::new("/"), &argv[0], None, &argv[1..])
    }

    /// The same confinement with `read` and `write` also granted.
    pub fn granting(&self, read: &[&Path], write: &[&Path]) -> Confinement {
        let mut c = self.clone();
        c.read.extend(read.iter().map(|p| p.to_path_buf()));
        c.write.extend(write.iter().map(|p| p.to_path_buf()));
        c
    }
}

/// When this process was started as the launcher, confines itself and executes the program;
/// on any failure prints it and exits 126. Otherwise returns at once. Call it first in `main`,
/// before any thread exists (the seccomp filter and Landlock apply to the calling thread).
pub fn run_if_launcher() {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(std::ffi::OsStr::new(LAUNCHER_ARG)) {
        return;
    }
    let request = args.next().unwrap_or_default();
    let Err(e) = launch(&request.to_string_lossy());
    eprintln!("{FAILURE_PREFIX} {e}");
    std::process::exit(126);
}

fn launch(request: &str) -> Result<Infallible, SandboxError> {
    let launch: Launch =
        serde_json::from_str(request).map_err(|e| SandboxError::BadRequest(e.to_string()))?;
    let c = &launch.confinement;
    std::env::set_current_dir(&launch.cwd).map_err(|source| SandboxError::WorkingDirectory {
        path: launch.cwd.clone(),
        source,
    })?;
    rustix::thread::set_no_new_privs(true).map_err(|e| SandboxError::NoNewPrivs(e.into()))?;
    // Nothing the daemon was itself given (a shell's, a supervisor's) reaches the program.
    crate::sys::mark_inherited_fds_cloexec().map_err(SandboxError::InheritedFds)?;
    let pinned = match &launch.sha256 {
        Some(pin) => Some(open_pinned(&launch.program, pin)?),
        None => None,
    };
    restrict_paths(c, pinned.as_ref())?;
    install_seccomp(c)?;
    let mut cmd = match &pinned {
        // A script's interpreter opens it by this name; the descriptor stays open for it.
        Some(file) => std::process::Command::new(format!("/proc/self/fd/{}", file.as_raw_fd())),
        None => std::process::Command::new(&launch.program),
    };
    cmd.arg0(&launch.program).args(&launch.args);
    if let Some(user) = &c.user {
        become_user(user)?;
    }
    let source = cmd.exec();
    Err(SandboxError::Exec {
        program: launch.program,
        source,
    })
}

/// Whether this process may give the programs it starts another user: it is root, or it holds
/// CAP_SETUID and CAP_SETGID.
fn can_switch_users() -> bool {
    use rustix::thread::{CapabilitySet, capabilities};
    rustix::process::geteuid().is_root()
        || capabilities(None).is_ok_and(|c| {
            c.effective
                .contains(CapabilitySet::SETUID | CapabilitySet::SETGID)
        })
}

/// Switches the launcher (one thread, about to execute the program) to `user`: no
/// supplementary groups, then its group, then its user; then drops every capability left. A
/// switch from root clears them by itself, but one from a dedicated user holding ambient
/// CAP_SETUID/CAP_SETGID would leave them to the program, which could then become root.
fn become_user(user: &Account) -> Result<(), SandboxError> {
    use rustix::process::{Gid, Uid};
    use rustix::thread::{self, CapabilitySet, CapabilitySets};
    let fail = |what: &str, e: rustix::io::Errno| SandboxError::SwitchUser {
        user: user.name.clone(),
        why: format!("{what}: {e}"),
    };
    let (uid, gid) = (Uid::from_raw(user.uid), Gid::from_raw(user.gid));
    thread::set_thread_groups(&[]).map_err(|e| fail("setgroups", e))?;
    thread::set_thread_res_gid(gid, gid, gid).map_err(|e| fail("setresgid", e))?;
    thread::set_thread_res_uid(uid, uid, uid).map_err(|e| fail("setresuid", e))?;
    thread::clear_ambient_capability_set().map_err(|e| fail("clearing ambient capabilities", e))?;
    let none = CapabilitySets {
        effective: CapabilitySet::empty(),
        permitted: CapabilitySet::empty(),
        inheritable: CapabilitySet::empty(),
    };
    thread::set_capabilities(None, none).map_err(|e| fail("dropping capabilities", e))?;
    let left = thread::capabilities(None).map_err(|e| fail("reading capabilities", e))?;
    if !(left.effective | left.permitted | left.inheritable).is_empty() {
        return Err(fail("capabilities left", rustix::io::Errno::PERM));
    }
    Ok(())
}

/// Opens `program` without following a symlink, checks that what the descriptor reads has the
/// SHA-256 `pin`, and leaves the descriptor open across `exec` (at offset 0) for a script's
/// interpreter.
fn open_pinned(program: &str, pin: &str) -> Result<std::fs::File, SandboxError> {
    let pinned = |why: String| SandboxError::Pin {
        program: program.to_string(),
        why,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(program)
        .map_err(|e| pinned(format!("cannot open it: {e}")))?;
    let actual = crate::crypto::reader_sha256(&file).map_err(|e| pinned(e.to_string()))?;
    if !actual.eq_ignore_ascii_case(pin) {
        return Err(pinned(format!(
            "its SHA-256 is {actual}, the config pins {pin}"
        )));
    }
    std::io::Seek::rewind(&mut file).map_err(|e| pinned(e.to_string()))?;
    rustix::io::fcntl_setfd(&file, rustix::io::FdFlags::empty())
        .map_err(|e| pinned(e.to_string()))?;
    Ok(file)
}

/// Applies the Landlock ruleset; refuses to go on when the kernel enforces none of it.
fn restrict_paths(c: &Confinement, pinned: Option<&std::fs::File>) -> Result<(), SandboxError> {
    let landlock = |e: landlock::RulesetError| SandboxError::Landlock(e.to_string());
    let existing = |paths: &[&str]| -> Vec<PathBuf> {
        paths
            .iter()
            .map(PathBuf::from)
            .filter(|p| p.exists())
            .collect()
    };
    for path in c.read.iter().chain(&c.write) {
        if let Err(e) = std::fs::metadata(path) {
            return Err(SandboxError::Grant {
                path: path.clone(),
                why: e.to_string(),
            });
        }
    }
    let mut scopes: landlock::BitFlags<Scope> = Scope::AbstractUnixSocket.into();
    if !c.signals {
        scopes |= Scope::Signal;
    }
    let mut write = existing(SYSTEM_WRITE);
    write.extend(c.write.iter().cloned());
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(LANDLOCK_ABI))
        .map_err(landlock)?
        .handle_access(AccessNet::BindTcp)
        .map_err(landlock)?
        .scope(scopes)
        .map_err(landlock)?
        .create()
        .map_err(landlock)?
        .add_rules(path_beneath_rules(
            existing(SYSTEM_READ).iter().chain(&c.read),
            AccessFs::from_read(LANDLOCK_ABI),
        ))
        .map_err(landlock)?
        .add_rules(path_beneath_rules(write, AccessFs::from_all(LANDLOCK_ABI)))
        .map_err(landlock)?
        .add_rules(pinned.map(|file| {
            Ok::<_, landlock::RulesetError>(PathBeneath::new(
                file,
                AccessFs::from_file(LANDLOCK_ABI) & AccessFs::from_read(LANDLOCK_ABI),
            ))
        }))
        .map_err(landlock)?
        .restrict_self()
        .map_err(landlock)?;
    if status.ruleset == RulesetStatus::NotEnforced {
        return Err(SandboxError::Landlock(
            "this kernel does not enforce Landlock (Linux 5.13 or later with `landlock` in \
             the `lsm=` list is needed); refusing to run the program unconfined"
                .into(),
        ));
    }
    Ok(())
}

/// The system calls a confined program has no use for and an attacker has: reading or steering
/// other processes, the kernel's keyrings, BPF, mounts and namespaces, modules, clocks, file
/// handles that bypass path checks, io_uring (whose operations seccomp cannot see).
fn denied_syscalls() -> Vec<i64> {
    let mut calls = vec![
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_pidfd_getfd,
        libc::SYS_kcmp,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_mount_setattr,
        libc::SYS_setns,
        libc::SYS_unshare,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_reboot,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_acct,
        libc::SYS_quotactl,
        libc::SYS_syslog,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_fanotify_init,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_vhangup,
    ];
    #[cfg(target_arch = "x86_64")]
    {
        calls.extend([libc::SYS_iopl, libc::SYS_ioperm, libc::SYS_uselib]);
        // The same calls through the x32 ABI (numbers with bit 30 set), and the x32 numbers of
        // those that have their own, so a deny list cannot be stepped around.
        const X32: i64 = 0x4000_0000;
        let x32: Vec<i64> = calls.iter().map(|n| n | X32).collect();
        calls.extend(x32);
        calls.extend([X32 | 521, X32 | 539, X32 | 540]);
    }
    calls.sort_unstable();
    calls.dedup();
    calls
}

fn install_seccomp(c: &Confinement) -> Result<(), SandboxError> {
    let seccomp = |e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string());
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> = denied_syscalls()
        .into_iter()
        .map(|n| (n, Vec::new()))
        .collect();
    if !c.unix_sockets {
        let unix = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::AF_UNIX as u64,
        )
        .map_err(seccomp)?;
        rules.insert(
            libc::SYS_socket,
            vec![SeccompRule::new(vec![unix]).map_err(seccomp)?],
        );
    }
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string()))?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(seccomp)?;
    let program: BpfProgram = filter.try_into().map_err(seccomp)?;
    seccompiler::apply_filter(&program).map_err(|e| SandboxError::Seccomp(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_numeric_account_needs_both_ids() {
        let a = Account::lookup("65534:65534").unwrap();
        assert_eq!((a.uid, a.gid), (65534, 65534));
        assert!(Account::lookup("65534:x").is_err());
    }

    #[test]
    fn a_missing_user_says_how_to_create_it() {
        let e = Account::lookup("no-such-user-kw").unwrap_err().to_string();
        assert!(e.contains("useradd --system"), "{e}");
    }

    #[test]
    fn root_resolves_from_passwd() {
        assert_eq!(Account::lookup("root").unwrap().uid, 0);
    }

    #[test]
    fn the_seccomp_filter_compiles_for_this_machine() {
        let calls = denied_syscalls();
        assert!(calls.contains(&libc::SYS_ptrace));
        assert!(calls.contains(&libc::SYS_process_vm_readv));
        // Building (not installing) the filter proves every rule is valid.
        let rules = calls.into_iter().map(|n| (n, Vec::new())).collect();
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(1),
            std::env::consts::ARCH.try_into().unwrap(),
        )
        .unwrap();
        let _: BpfProgram = filter.try_into().unwrap();
    }
}

//! Process hardening applied first thing at start: no core dumps, no ptrace by peers, a strict
//! umask.

use rustix::fs::Mode;
use rustix::process::{self, DumpableBehavior, Resource, Rlimit};

/// The core-dump limit and umask the process started with, for the programs it runs on a
/// user's behalf (`keywarden exec`).
#[derive(Debug, Clone)]
pub struct Inherited {
    core: Rlimit,
    umask: Mode,
}

impl Inherited {
    /// Gives this process back the soft core limit and umask it started with, so the programs
    /// it starts from now on get them. This process stays non-dumpable, so it still writes no
    /// core itself.
    pub fn restore_for_children(&self) {
        let core = Rlimit {
            current: self.core.current,
            maximum: process::getrlimit(Resource::Core).maximum,
        };
        if let Err(e) = process::setrlimit(Resource::Core, core) {
            tracing::warn!(error = %e, "could not restore the core limit for the command");
        }
        process::umask(self.umask);
    }
}

/// Disables core dumps (a dump would hold decrypted keys), marks the process non-dumpable (which
/// also stops other processes of the same user from attaching a debugger or reading its memory),
/// and sets the umask to 077 so nothing is ever created readable by others by accident. With
/// `keep_hard_core_limit` (a process that will run the user's programs) only the soft core limit
/// is lowered, so those programs can be given the user's limits back.
///
/// Failures are logged, not fatal: a hardened kernel may already forbid these calls.
pub fn harden_process(keep_hard_core_limit: bool) -> Inherited {
    let core = process::getrlimit(Resource::Core);
    let no_core = Rlimit {
        current: Some(0),
        maximum: if keep_hard_core_limit {
            core.maximum
        } else {
            Some(0)
        },
    };
    if let Err(e) = process::setrlimit(Resource::Core, no_core) {
        tracing::warn!(error = %e, "could not disable core dumps");
    }
    if let Err(e) = process::set_dumpable_behavior(DumpableBehavior::NotDumpable) {
        tracing::warn!(error = %e, "could not mark the process non-dumpable");
    }
    let umask = process::umask(Mode::from_raw_mode(0o077));
    Inherited { core, umask }
}

/// Whether core dumps are disabled for this process (used by tests and `status`).
pub fn core_dumps_disabled() -> bool {
    process::getrlimit(Resource::Core).maximum == Some(0)
}

//! Process hardening applied first thing at start: no core dumps, no ptrace by peers, a strict
//! umask.

use rustix::fs::Mode;
use rustix::process::{self, DumpableBehavior, Resource, Rlimit};

/// Disables core dumps (a dump would hold decrypted keys), marks the process non-dumpable (which
/// also stops other processes of the same user from attaching a debugger or reading its memory),
/// and sets the umask to 077 so nothing is ever created readable by others by accident.
///
/// Failures are logged, not fatal: a hardened kernel may already forbid these calls.
pub fn harden_process() {
    let no_core = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    if let Err(e) = process::setrlimit(Resource::Core, no_core) {
        tracing::warn!(error = %e, "could not disable core dumps");
    }
    if let Err(e) = process::set_dumpable_behavior(DumpableBehavior::NotDumpable) {
        tracing::warn!(error = %e, "could not mark the process non-dumpable");
    }
    process::umask(Mode::from_raw_mode(0o077));
}

/// Whether core dumps are disabled for this process (used by tests and `status`).
pub fn core_dumps_disabled() -> bool {
    process::getrlimit(Resource::Core).maximum == Some(0)
}

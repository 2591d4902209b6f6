//! Telling the service manager (systemd, `Type=notify`) what the daemon is doing: ready once the
//! store is unlocked and every socket listens, reloading, stopping. Without `NOTIFY_SOCKET`
//! (not started by systemd) each call does nothing.

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "could not notify the service manager");
    }
}

/// The daemon serves: `READY=1`, with `status` shown by `systemctl status`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The daemon reloads its configuration: `RELOADING=1` (`READY=1` follows when it serves again).
pub fn reloading() {
    send(&[
        NotifyState::Reloading,
        NotifyState::Status("reloading the configuration"),
    ]);
}

/// The daemon stops: `STOPPING=1`.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

//! The rotation journal's vocabulary: the states a rotation moves through, why it started, and
//! the table of legal moves that every write to the journal is checked against
//! (docs/design.md describes the state machine).

use std::fmt;

/// The states of a rotation, as stored in the journal and shown by `list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum RotationState {
    /// The rotation id and proposed value are stored; `create` comes next.
    #[serde(rename = "planned")]
    Planned,
    /// The new credential is stored as version N+1, stage `pending`.
    #[serde(rename = "created")]
    Created,
    /// The new credential proved to work upstream.
    #[serde(rename = "verified")]
    Verified,
    /// N+1 is current; N is previous.
    #[serde(rename = "promoted")]
    Promoted,
    /// Every consumer acknowledged N+1.
    #[serde(rename = "pushed")]
    Pushed,
    /// Waiting for leases on N to expire, bounded by the grace period.
    #[serde(rename = "draining")]
    Draining,
    /// N is revoked. Terminal.
    #[serde(rename = "done")]
    Done,
    /// Nothing was created upstream, or a person must look. Terminal.
    #[serde(rename = "failed")]
    Failed,
    /// The new credential failed verification and was revoked; N stays current. Terminal.
    #[serde(rename = "rolled-back")]
    RolledBack,
}

impl RotationState {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RotationState::Planned => "planned",
            RotationState::Created => "created",
            RotationState::Verified => "verified",
            RotationState::Promoted => "promoted",
            RotationState::Pushed => "pushed",
            RotationState::Draining => "draining",
            RotationState::Done => "done",
            RotationState::Failed => "failed",
            RotationState::RolledBack => "rolled-back",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(text: &str) -> Option<RotationState> {
        Some(match text {
            "planned" => RotationState::Planned,
            "created" => RotationState::Created,
            "verified" => RotationState::Verified,
            "promoted" => RotationState::Promoted,
            "pushed" => RotationState::Pushed,
            "draining" => RotationState::Draining,
            "done" => RotationState::Done,
            "failed" => RotationState::Failed,
            "rolled-back" => RotationState::RolledBack,
            _ => return None,
        })
    }

    /// Whether the rotation is over.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RotationState::Done | RotationState::Failed | RotationState::RolledBack
        )
    }
}

impl fmt::Display for RotationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a rotation was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The secret was declared and has no version yet.
    Initial,
    /// Its schedule came due.
    Schedule,
    /// An operator asked (`keywarden rotate`, the admin API).
    Manual,
    /// Compromise is assumed (`rotate-all --assume-compromise`, a signal).
    Compromise,
}

impl Reason {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Initial => "initial",
            Reason::Schedule => "schedule",
            Reason::Manual => "manual",
            Reason::Compromise => "compromise",
        }
    }
}

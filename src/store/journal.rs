//! The rotation journal's vocabulary: the states a rotation moves through, why it started, and
//! the table of legal moves that every write to the journal is checked against
//! (docs/design.md §4 describes the state machine).

stored_enum! {
    /// The states of a rotation, as stored in the journal and shown by `list`.
    #[derive(PartialOrd, Ord)]
    pub enum RotationState ("rotation state") {
        /// The rotation id and proposed value are stored; `create` comes next.
        Planned = "planned",
        /// The new credential is stored as version N+1, stage `pending`.
        Created = "created",
        /// The new credential proved to work upstream.
        Verified = "verified",
        /// N+1 is current; N is previous.
        Promoted = "promoted",
        /// Every consumer acknowledged N+1.
        Pushed = "pushed",
        /// Waiting for leases on N to expire, bounded by the grace period.
        Draining = "draining",
        /// N is revoked. Terminal.
        Done = "done",
        /// Nothing was created upstream, or a person must look. Terminal.
        Failed = "failed",
        /// The new credential failed verification and was revoked; N stays current. Terminal.
        RolledBack = "rolled-back",
    }
}

stored_enum! {
    /// Why a rotation was started.
    pub enum Reason ("rotation reason") {
        /// The secret was declared and has no version yet.
        Initial = "initial",
        /// Its schedule came due.
        Schedule = "schedule",
        /// An operator asked (`keywarden rotate`, the admin API).
        Manual = "manual",
        /// Compromise is assumed (`rotate-all --assume-compromise`, a signal).
        Compromise = "compromise",
    }
}

/// Every legal move of the journal, `(from, to)`, in the order a rotation takes them. A step
/// that changes something without moving (an emergency rotation revoking N while `promoted`)
/// is the move `(s, s)`.
pub const TRANSITIONS: [(RotationState, RotationState); 10] = {
    use RotationState::*;
    [
        (Planned, Created),
        (Planned, Failed),
        (Created, Verified),
        (Created, RolledBack),
        (Verified, Promoted),
        (Promoted, Promoted),
        (Promoted, Pushed),
        (Pushed, Draining),
        (Pushed, Done),
        (Draining, Done),
    ]
};

impl RotationState {
    /// Whether the rotation is over.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RotationState::Done | RotationState::Failed | RotationState::RolledBack
        )
    }

    /// Whether the journal may move from `self` to `to` (see [`TRANSITIONS`]).
    pub fn can_move_to(self, to: RotationState) -> bool {
        TRANSITIONS.contains(&(self, to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_have_no_way_out_and_every_other_state_has_one() {
        let all = [
            RotationState::Planned,
            RotationState::Created,
            RotationState::Verified,
            RotationState::Promoted,
            RotationState::Pushed,
            RotationState::Draining,
            RotationState::Done,
            RotationState::Failed,
            RotationState::RolledBack,
        ];
        for state in all {
            let exits = all.iter().filter(|to| state.can_move_to(**to)).count();
            assert_eq!(state.is_terminal(), exits == 0, "{state}");
            assert_eq!(RotationState::parse(state.as_str()).unwrap(), state);
        }
        assert!(!RotationState::Planned.can_move_to(RotationState::Promoted));
        assert!(!RotationState::Done.can_move_to(RotationState::Planned));
    }

    #[test]
    fn an_unknown_spelling_is_corruption_not_a_default() {
        let err = Reason::parse("whenever").unwrap_err();
        assert!(
            err.to_string()
                .contains("unknown rotation reason \"whenever\""),
            "{err}"
        );
    }
}

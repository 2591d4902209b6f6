//! Rotation: the journaled state machine of DESIGN.md §4 ([`engine`]) and the scheduler that
//! starts rotations on time ([`scheduler`]).
//!
//! ```text
//! planned ─► created ─► verified ─► promoted ─► pushed ─► draining ─► done
//!    │          │           │                      │
//!    └► failed  └► rolled-back (new credential revoked upstream; current stays)
//! ```

pub mod backoff;
pub mod engine;
pub mod scheduler;

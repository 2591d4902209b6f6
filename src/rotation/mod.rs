//! Rotation: the journaled state machine of docs/design.md §4. [`engine`] plans rotations and
//! drives each one step by step (`steps`), delivering new versions to consumers (`delivery`) and
//! waiting for leases on the old one ([`drain`]); [`catalog`] is what it can reach;
//! [`scheduler`] starts rotations on time. The states and their legal moves are
//! [`crate::store::journal`].
//!
//! ```text
//! planned ─► created ─► verified ─► promoted ─► pushed ─► draining ─► done
//!    │          │           │                      │
//!    └► failed  └► rolled-back (new credential revoked upstream; current stays)
//! ```

pub mod backoff;
pub mod catalog;
mod delivery;
pub mod drain;
pub mod engine;
pub mod scheduler;
mod steps;

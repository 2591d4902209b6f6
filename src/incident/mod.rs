//! Compromise: what keywarden does when a key may have leaked (docs/design.md §10–§11).
//!
//! - [`compromise`]: incidents and their runs: plan a scope, revoke its leases, rotate every
//!   secret in it without grace, and report (`rotate-all --assume-compromise`, the admin API).
//! - [`signals`]: what starts one: the signed webhook, leaked values matched by fingerprint,
//!   canary fetches, access anomalies.
//! - [`alerts`]: how people hear of it: an audited row, a command, a consumer push.

pub mod alerts;
pub mod compromise;
pub mod signals;

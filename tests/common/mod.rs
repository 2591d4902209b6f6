//! The integration tests' helpers live in the `keywarden-testkit` crate, shared with the
//! plugins' tests.

#![allow(unused_imports)] // each test binary uses a different subset

pub use keywarden_testkit::*;

//! The audit chain: every fetch, denial, rotation step and admin action is a row whose hash
//! covers the previous row's hash, so an edited, reordered or deleted row breaks the chain.
//!
//! `hash = SHA-256("keywarden-audit-v1" || prev_hash || canonical(row))`, where `canonical` is
//! the JSON array `[seq, at, actor, action, secret, incident_id, detail]` and `detail` is the
//! stored JSON text byte for byte. Rows carry fingerprints and version numbers, never values.
//! Deleting rows from the *end* cannot be seen from inside the store: `status` prints the chain
//! head so it can be copied to an outside witness.

use serde::Serialize;

use crate::crypto::{self, DIGEST_LEN};

/// The `prev_hash` of the first row.
pub const GENESIS_HASH: [u8; DIGEST_LEN] = [0u8; DIGEST_LEN];
const DOMAIN: &[u8] = b"keywarden-audit-v1";

/// An event to append; the store assigns `seq`, `at` and the hashes.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    /// Who did it: `cli uid=1000`, `agent uid=1001 pid=42 exe=/usr/bin/python3`, `scheduler`.
    pub actor: String,
    /// What happened, dotted: `secret.put`, `secret.get`, `vault.rekey`, `rotation.verified`.
    pub action: String,
    /// The secret it concerns, if any.
    pub secret: Option<String>,
    /// The incident (compromise run) it belongs to, if any.
    pub incident_id: Option<String>,
    /// Non-secret details (versions, fingerprints, reasons), as JSON text.
    pub detail: String,
}

impl AuditEvent {
    /// The hash of this event appended as row `seq` at `at` after a row hashed `prev_hash`.
    pub fn hash_after(&self, prev_hash: &[u8], seq: i64, at: i64) -> [u8; DIGEST_LEN] {
        chain_hash(
            prev_hash,
            seq,
            at,
            &self.actor,
            &self.action,
            self.secret.as_deref(),
            self.incident_id.as_deref(),
            &self.detail,
        )
    }

    /// An event with no secret, incident or detail.
    pub fn new(actor: impl Into<String>, action: impl Into<String>) -> Self {
        Self {
            actor: actor.into(),
            action: action.into(),
            secret: None,
            incident_id: None,
            detail: "{}".to_string(),
        }
    }

    /// Sets the secret the event concerns.
    pub fn secret(mut self, name: impl Into<String>) -> Self {
        self.secret = Some(name.into());
        self
    }

    /// Sets the incident id.
    pub fn incident(mut self, incident_id: Option<String>) -> Self {
        self.incident_id = incident_id;
        self
    }

    /// Sets the detail object (anything that serializes to a JSON object).
    pub fn detail(mut self, detail: impl Serialize) -> Self {
        self.detail = serde_json::to_string(&detail).expect("audit details serialize");
        self
    }
}

/// A stored audit row.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// Position in the chain, from 1.
    pub seq: i64,
    /// Unix time in milliseconds.
    pub at: i64,
    /// See [`AuditEvent::actor`].
    pub actor: String,
    /// See [`AuditEvent::action`].
    pub action: String,
    /// See [`AuditEvent::secret`].
    pub secret: Option<String>,
    /// See [`AuditEvent::incident_id`].
    pub incident_id: Option<String>,
    /// The detail object as stored JSON text.
    pub detail: String,
    /// Hash of the row before, or [`GENESIS_HASH`].
    #[serde(skip)]
    pub prev_hash: Vec<u8>,
    /// This row's hash.
    #[serde(skip)]
    pub hash: Vec<u8>,
}

/// Computes a row's hash from its fields and the previous row's hash.
#[allow(clippy::too_many_arguments)] // the row's fields, spelled out so nothing is left out by accident
pub fn chain_hash(
    prev_hash: &[u8],
    seq: i64,
    at: i64,
    actor: &str,
    action: &str,
    secret: Option<&str>,
    incident_id: Option<&str>,
    detail: &str,
) -> [u8; DIGEST_LEN] {
    let canonical = serde_json::to_vec(&(seq, at, actor, action, secret, incident_id, detail))
        .expect("serializing strings and integers cannot fail");
    let mut h = crypto::Sha256::new();
    h.update(DOMAIN);
    h.update(prev_hash);
    h.update(&canonical);
    h.finish()
}

impl AuditRecord {
    /// The hash this row should carry given its `prev_hash` and fields.
    pub fn expected_hash(&self) -> [u8; DIGEST_LEN] {
        chain_hash(
            &self.prev_hash,
            self.seq,
            self.at,
            &self.actor,
            &self.action,
            self.secret.as_deref(),
            self.incident_id.as_deref(),
            &self.detail,
        )
    }
}

/// Where and why a chain stopped holding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    /// The first row that does not fit.
    pub seq: i64,
    /// What is wrong with it.
    pub reason: String,
}

/// Walks a chain row by row, in `seq` order.
#[derive(Debug)]
pub struct ChainVerifier {
    prev_hash: Vec<u8>,
    prev_seq: i64,
    rows: u64,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self::after(0, GENESIS_HASH.to_vec())
    }
}

impl ChainVerifier {
    /// A verifier whose next row must be `seq + 1` and link to `hash`: where a chain goes on
    /// after rows that were archived.
    pub fn after(seq: i64, hash: Vec<u8>) -> Self {
        Self {
            prev_hash: hash,
            prev_seq: seq,
            rows: 0,
        }
    }

    /// The last row checked (or the starting point): (seq, hash).
    pub fn last(&self) -> (i64, &[u8]) {
        (self.prev_seq, &self.prev_hash)
    }

    /// Checks the next row.
    pub fn check(&mut self, row: &AuditRecord) -> Result<(), ChainBreak> {
        let fail = |reason: String| ChainBreak {
            seq: row.seq,
            reason,
        };
        if row.seq != self.prev_seq + 1 {
            return Err(fail(format!(
                "expected row {} next, found row {} (rows deleted or renumbered)",
                self.prev_seq + 1,
                row.seq
            )));
        }
        if !crypto::constant_time_eq(&row.prev_hash, &self.prev_hash) {
            return Err(fail(
                "its link to the previous row does not match (a row before it was deleted, \
                 edited or moved)"
                    .into(),
            ));
        }
        if !crypto::constant_time_eq(&row.hash, &row.expected_hash()) {
            return Err(fail(
                "its contents do not match its hash (the row was edited)".into(),
            ));
        }
        self.prev_hash.clone_from(&row.hash);
        self.prev_seq = row.seq;
        self.rows += 1;
        Ok(())
    }

    /// Rows checked so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The hash of the last row checked (the chain head), as hex.
    pub fn head(&self) -> String {
        crypto::hex(&self.prev_hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: i64) -> Vec<AuditRecord> {
        let mut prev = GENESIS_HASH.to_vec();
        (1..=n)
            .map(|seq| {
                let mut row = AuditRecord {
                    seq,
                    at: 1_700_000_000_000 + seq,
                    actor: "cli uid=0".into(),
                    action: "secret.get".into(),
                    secret: Some(format!("s{seq}")),
                    incident_id: None,
                    detail: r#"{"version":1}"#.into(),
                    prev_hash: prev.clone(),
                    hash: vec![],
                };
                row.hash = row.expected_hash().to_vec();
                prev.clone_from(&row.hash);
                row
            })
            .collect()
    }

    fn verify(rows: &[AuditRecord]) -> Result<u64, ChainBreak> {
        let mut v = ChainVerifier::default();
        for row in rows {
            v.check(row)?;
        }
        Ok(v.rows())
    }

    #[test]
    fn intact_chain_verifies() {
        assert_eq!(verify(&chain(5)), Ok(5));
    }

    #[test]
    fn edited_row_is_named() {
        let mut rows = chain(5);
        rows[2].detail = r#"{"version":2}"#.into();
        assert_eq!(verify(&rows).unwrap_err().seq, 3);
    }

    #[test]
    fn deleted_middle_row_is_found() {
        let mut rows = chain(5);
        rows.remove(1);
        assert_eq!(verify(&rows).unwrap_err().seq, 3);
    }

    #[test]
    fn deleted_and_renumbered_row_is_found() {
        let mut rows = chain(5);
        rows.remove(1);
        for (i, row) in rows.iter_mut().enumerate() {
            row.seq = i as i64 + 1;
        }
        assert_eq!(verify(&rows).unwrap_err().seq, 2);
    }

    #[test]
    fn swapped_rows_are_found() {
        let mut rows = chain(5);
        rows.swap(1, 2);
        rows[1].seq = 2;
        rows[2].seq = 3;
        assert_eq!(verify(&rows).unwrap_err().seq, 2);
    }
}

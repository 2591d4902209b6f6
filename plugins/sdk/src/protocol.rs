//! keywarden plugin protocol v1: the messages, exactly as docs/plugin-protocol.md specifies them.
//!
//! One JSON object per line (at most [`MAX_LINE_BYTES`]) over the plugin's stdin/stdout. The
//! plugin speaks first with a [`Hello`]; then the daemon sends [`Request`]s, each with a unique
//! `id`, and the plugin answers each with a [`Reply`] carrying the same `id`, in any order.
//! Unknown fields are ignored on both sides.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// The argument the daemon passes to every plugin it starts.
pub const PLUGIN_FLAG: &str = "--keywarden-plugin=1";
/// Longest line either side may send, in bytes (excluding the newline).
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// A message as the line that carries it: `json` and its newline in one buffer, zeroed when
/// dropped, to be written at once (a line written in two parts wakes its reader twice).
pub fn line(json: &str) -> Zeroizing<Vec<u8>> {
    let mut line = Zeroizing::new(Vec::with_capacity(json.len() + 1));
    line.extend_from_slice(json.as_bytes());
    line.push(b'\n');
    line
}

/// A JSON object of non-secret facts (key ids, user names).
pub type Meta = serde_json::Map<String, serde_json::Value>;

/// Secret material: zeroized when dropped, `[redacted]` when formatted.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Wraps a string.
    pub fn new(value: impl Into<String>) -> Self {
        Self(Zeroizing::new(value.into()))
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

/// The operations of protocol v1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// Mint a new credential (idempotent per `rotation_id`).
    Create,
    /// Prove a candidate credential works upstream.
    Verify,
    /// Make the provider serve the candidate as current.
    Promote,
    /// Invalidate a credential upstream (idempotent).
    Revoke,
    /// Deliver a version to a consumer.
    Push,
    /// Mint a short-lived credential for one lease.
    Issue,
    /// Exit cleanly.
    Shutdown,
}

impl Op {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Verify => "verify",
            Op::Promote => "promote",
            Op::Revoke => "revoke",
            Op::Push => "push",
            Op::Issue => "issue",
            Op::Shutdown => "shutdown",
        }
    }

    /// Parses the wire spelling.
    pub fn parse(text: &str) -> Option<Op> {
        Some(match text {
            "create" => Op::Create,
            "verify" => Op::Verify,
            "promote" => Op::Promote,
            "revoke" => Op::Revoke,
            "push" => Op::Push,
            "issue" => Op::Issue,
            "shutdown" => Op::Shutdown,
            _ => return None,
        })
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The first line a plugin writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`PROTOCOL_VERSION`].
    pub keywarden_plugin: u32,
    /// The plugin's name.
    pub name: String,
    /// The plugin's version.
    pub version: String,
    /// The credential kinds it serves.
    pub kinds: BTreeMap<String, KindInfo>,
}

/// What a plugin can do for one kind.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KindInfo {
    /// Supported operations, by wire name (unknown names are ignored).
    #[serde(default)]
    pub ops: Vec<String>,
    /// Whether the old and new credential can be valid at once (default true). When false,
    /// `create` retires the old credential and the daemon skips draining.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlap: Option<bool>,
}

impl KindInfo {
    /// Whether the kind supports `op`.
    pub fn supports(&self, op: Op) -> bool {
        self.ops.iter().any(|o| o == op.as_str())
    }

    /// Whether old and new credentials may overlap (default true).
    pub fn overlaps(&self) -> bool {
        self.overlap.unwrap_or(true)
    }
}

/// A credential as it travels: its value, its non-secret facts and, for stored versions, the
/// version number.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Credential {
    /// The version number, when it is a stored version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    /// The secret material.
    pub value: Secret,
    /// Non-secret facts.
    #[serde(default)]
    pub meta: Meta,
}

/// A request from the daemon. Which optional fields are set depends on `op`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Request {
    /// Unique per daemon session; echoed in the reply.
    pub id: u64,
    /// The operation, by wire name (kept as text so an unknown op can be answered).
    pub op: String,
    /// The credential kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The keywarden secret name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// The rotation this request belongs to (create: the idempotency key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_id: Option<String>,
    /// The secret's (or, for push, the consumer's) settings from the config.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub settings: Meta,
    /// Other secrets this request may use (such as an admin credential), by role.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub credentials: BTreeMap<String, Credential>,
    /// create, promote: the current version (absent for a first rotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<Credential>,
    /// create: a value the daemon generated, for providers that take a chosen value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proposed: Option<Secret>,
    /// verify, promote: the new credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<Credential>,
    /// revoke: the credential to invalidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Credential>,
    /// push: the version delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    /// push: the value delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Secret>,
    /// push: the version's non-secret facts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    /// issue: the lease's time to live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    /// issue: the lease the credential is for (its idempotency key: tag what is issued with
    /// it). revoke without a `target`: revoke whatever was issued for this lease (the daemon
    /// journaled the issue but never learnt its result, after a crash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
}

impl Request {
    /// The parsed operation, if it is one this crate knows.
    pub fn op(&self) -> Option<Op> {
        Op::parse(&self.op)
    }
}

/// A successful reply's body. Empty (`{}`) for verify, promote, revoke and push.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OkReply {
    /// create, issue: the new secret material.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Secret>,
    /// create, issue: its non-secret facts.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub meta: Meta,
    /// issue (optionally create): when the credential stops working, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

impl OkReply {
    /// A reply carrying a new credential.
    pub fn credential(value: Secret, meta: Meta) -> Self {
        OkReply {
            value: Some(value),
            meta,
            expires_at: None,
        }
    }
}

/// A failed reply's body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrReply {
    /// Whether trying the same request again later may succeed.
    pub retryable: bool,
    /// What went wrong, for the operator. Must not contain secret values.
    pub message: String,
}

impl ErrReply {
    /// A failure worth retrying (throttling, a timeout upstream).
    pub fn retryable(message: impl Into<String>) -> Self {
        ErrReply {
            retryable: true,
            message: message.into(),
        }
    }

    /// A failure that will not go away by itself.
    pub fn fatal(message: impl Into<String>) -> Self {
        ErrReply {
            retryable: false,
            message: message.into(),
        }
    }

    /// The reply to an op the plugin does not implement.
    pub fn unsupported() -> Self {
        ErrReply::fatal("unsupported op")
    }
}

/// A reply from the plugin: exactly one of `ok` and `err`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    /// The request's id.
    pub id: u64,
    /// Success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<OkReply>,
    /// Failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub err: Option<ErrReply>,
}

impl Reply {
    /// Builds a reply from a handler's result.
    pub fn new(id: u64, result: Result<OkReply, ErrReply>) -> Self {
        match result {
            Ok(ok) => Reply {
                id,
                ok: Some(ok),
                err: None,
            },
            Err(err) => Reply {
                id,
                ok: None,
                err: Some(err),
            },
        }
    }

    /// The outcome, or `None` if the reply carries both or neither.
    pub fn into_result(self) -> Option<Result<OkReply, ErrReply>> {
        match (self.ok, self.err) {
            (Some(ok), None) => Some(Ok(ok)),
            (None, Some(err)) => Some(Err(err)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_from_the_design_parses() {
        let line = r#"{"keywarden_plugin":1,"name":"aws","version":"0.3.0",
 "kinds":{"aws-iam":{"ops":["create","verify","revoke"],"overlap":true},
          "aws-sts":{"ops":["issue","revoke"]}}}"#;
        let hello: Hello = serde_json::from_str(line).unwrap();
        assert_eq!(hello.kinds["aws-iam"].ops.len(), 3);
        assert!(hello.kinds["aws-sts"].supports(Op::Issue));
        assert!(hello.kinds["aws-sts"].overlaps());
    }

    #[test]
    fn request_from_the_design_parses_and_unknown_fields_are_ignored() {
        let line = r#"{"id":7,"op":"create","kind":"aws-iam","secret":"aws/ci-deployer","rotation_id":"8e0c",
 "settings":{"user_name":"ci-deployer"},
 "credentials":{"admin":{"value":"adm","meta":{"access_key_id":"AKIA1"}}},
 "current":{"version":3,"value":"cur","meta":{"access_key_id":"AKIA2"}},
 "proposed":"6QeU","future_field":[1,2]}"#;
        let req: Request = serde_json::from_str(line).unwrap();
        assert_eq!(req.op(), Some(Op::Create));
        assert_eq!(req.current.as_ref().unwrap().version, Some(3));
        assert_eq!(req.credentials["admin"].value.expose(), "adm");
        assert_eq!(req.proposed.as_ref().unwrap().expose(), "6QeU");
        assert_eq!(format!("{req:?}").matches("[redacted]").count(), 3);
    }

    #[test]
    fn replies_round_trip() {
        let ok: Reply = serde_json::from_str(
            r#"{"id":7,"ok":{"value":"v","meta":{"access_key_id":"AKIA"},"expires_at":null}}"#,
        )
        .unwrap();
        assert_eq!(
            ok.into_result().unwrap().unwrap().value.unwrap().expose(),
            "v"
        );
        let err: Reply = serde_json::from_str(
            r#"{"id":7,"err":{"retryable":true,"message":"throttled by provider"}}"#,
        )
        .unwrap();
        assert!(err.into_result().unwrap().unwrap_err().retryable);
        let empty = serde_json::to_string(&Reply::new(3, Ok(OkReply::default()))).unwrap();
        assert_eq!(empty, r#"{"id":3,"ok":{}}"#);
        let both: Reply = serde_json::from_str(r#"{"id":1}"#).unwrap();
        assert!(both.into_result().is_none());
    }
}

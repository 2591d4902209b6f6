//! Agent policies: deny by default; a `[[policy]]` allows a peer (by uid, gid, executable path
//! or executable hash) to fetch secrets whose names match its globs, with leases up to its
//! `max_ttl`, and to call through the brokers it lists, within its `budget`. Policies are tried
//! in order and the first that matches decides.

use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::{GlobBuilder, GlobMatcher};
use serde::Deserialize;

use crate::broker::budget::Budget;
use crate::parse::duration;

/// `[[policy]]`: one rule of who may fetch which secrets, and for how long.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// A name for audit rows and errors.
    pub name: String,
    /// Peer uids allowed (any, if empty).
    #[serde(default)]
    pub uids: Vec<u32>,
    /// Peer gids allowed (any, if empty).
    #[serde(default)]
    pub gids: Vec<u32>,
    /// Allow peers running as the daemon's own user.
    #[serde(default)]
    pub same_user: bool,
    /// Executables allowed, by absolute path (any, if empty).
    #[serde(default)]
    pub exe: Vec<PathBuf>,
    /// Executables allowed, by SHA-256 of the file (any, if empty).
    #[serde(default)]
    pub exe_sha256: Vec<String>,
    /// Secret-name globs (`openai/*`; `*` stays within a segment, `**` crosses them).
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Brokers (`[brokers.NAME]`) the peer may call through, without ever holding their keys.
    #[serde(default)]
    pub brokers: Vec<String>,
    /// What brokered calls may spend.
    #[serde(default)]
    pub budget: Budget,
    /// Longest lease this policy grants.
    #[serde(default = "default_max_ttl", deserialize_with = "duration")]
    pub max_ttl: Duration,
}

fn default_max_ttl() -> Duration {
    Duration::from_secs(900)
}

/// A compiled policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Its name.
    pub name: String,
    uids: Vec<u32>,
    gids: Vec<u32>,
    same_user: bool,
    exe: Vec<PathBuf>,
    exe_sha256: Vec<String>,
    secrets: Vec<GlobMatcher>,
    brokers: Vec<String>,
    /// What brokered calls may spend.
    pub budget: Budget,
    /// Longest lease it grants.
    pub max_ttl: Duration,
}

/// What a policy decision needs to know about the peer. The executable hash is computed only
/// if a policy asks for it.
pub trait Identity {
    /// Peer uid.
    fn uid(&self) -> u32;
    /// Peer gid.
    fn gid(&self) -> u32;
    /// The peer's executable, if it could be resolved.
    fn exe(&self) -> Option<&Path>;
    /// SHA-256 of the peer's executable, hex, if it can be computed.
    fn exe_sha256(&mut self) -> Option<String>;
}

fn glob(pattern: &str) -> Result<GlobMatcher, String> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("invalid glob {pattern:?}: {e}"))
}

/// Checks a policy from the config; on error, the key and the message.
pub fn check(p: &PolicyConfig) -> Result<(), (&'static str, String)> {
    if p.name.trim().is_empty() {
        return Err(("name", "must not be empty".into()));
    }
    if p.uids.is_empty()
        && p.gids.is_empty()
        && !p.same_user
        && p.exe.is_empty()
        && p.exe_sha256.is_empty()
    {
        return Err((
            "uids",
            "a policy must name at least one of uids, gids, same_user, exe or exe_sha256".into(),
        ));
    }
    if p.secrets.is_empty() && p.brokers.is_empty() {
        return Err((
            "secrets",
            "must list at least one secret name or glob, or a broker in `brokers`".into(),
        ));
    }
    if p.budget.requests_per_minute == Some(0) || p.budget.tokens_per_day == Some(0) {
        return Err((
            "budget",
            "a budget of zero allows nothing: remove the broker instead".into(),
        ));
    }
    for pattern in &p.secrets {
        glob(pattern).map_err(|e| ("secrets", e))?;
    }
    if let Some(e) = p.exe.iter().find(|e| !e.is_absolute()) {
        return Err(("exe", format!("{} is not an absolute path", e.display())));
    }
    if let Some(h) = p
        .exe_sha256
        .iter()
        .find(|h| crate::crypto::from_hex(h).is_none_or(|b| b.len() != 32))
    {
        return Err(("exe_sha256", format!("{h:?} is not 64 hex digits")));
    }
    if p.max_ttl.is_zero() {
        return Err(("max_ttl", "must be more than zero".into()));
    }
    Ok(())
}

impl Policy {
    /// Compiles a checked policy.
    pub fn compile(p: &PolicyConfig) -> Policy {
        Policy {
            name: p.name.clone(),
            uids: p.uids.clone(),
            gids: p.gids.clone(),
            same_user: p.same_user,
            exe: p.exe.clone(),
            exe_sha256: p.exe_sha256.iter().map(|h| h.to_lowercase()).collect(),
            secrets: p
                .secrets
                .iter()
                .map(|g| glob(g).expect("checked at load"))
                .collect(),
            brokers: p.brokers.clone(),
            budget: p.budget,
            max_ttl: p.max_ttl,
        }
    }

    /// Whether the policy looks at executable hashes.
    pub fn checks_hash(&self) -> bool {
        !self.exe_sha256.is_empty()
    }

    fn covers(&self, secret: &str) -> bool {
        self.secrets.iter().any(|g| g.is_match(secret))
    }

    fn admits(&self, who: &mut impl Identity, daemon_uid: u32) -> bool {
        let uid_ok = if self.uids.is_empty() && !self.same_user {
            true
        } else {
            self.uids.contains(&who.uid()) || (self.same_user && who.uid() == daemon_uid)
        };
        if !uid_ok {
            return false;
        }
        if !self.gids.is_empty() && !self.gids.contains(&who.gid()) {
            return false;
        }
        if !self.exe.is_empty() && !who.exe().is_some_and(|e| self.exe.iter().any(|p| p == e)) {
            return false;
        }
        if !self.exe_sha256.is_empty()
            && !who
                .exe_sha256()
                .is_some_and(|h| self.exe_sha256.contains(&h))
        {
            return false;
        }
        true
    }
}

/// The first policy that lets `who` fetch `secret`, if any.
pub fn decide<'p>(
    policies: &'p [Policy],
    who: &mut impl Identity,
    secret: &str,
    daemon_uid: u32,
) -> Option<&'p Policy> {
    policies
        .iter()
        .find(|p| p.covers(secret) && p.admits(who, daemon_uid))
}

/// The first policy that lets `who` call through broker `broker`, if any.
pub fn decide_broker<'p>(
    policies: &'p [Policy],
    who: &mut impl Identity,
    broker: &str,
    daemon_uid: u32,
) -> Option<&'p Policy> {
    policies
        .iter()
        .find(|p| p.brokers.iter().any(|b| b == broker) && p.admits(who, daemon_uid))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Who {
        uid: u32,
        gid: u32,
        exe: Option<PathBuf>,
        hash: Option<String>,
        hashed: u32,
    }

    impl Identity for Who {
        fn uid(&self) -> u32 {
            self.uid
        }
        fn gid(&self) -> u32 {
            self.gid
        }
        fn exe(&self) -> Option<&Path> {
            self.exe.as_deref()
        }
        fn exe_sha256(&mut self) -> Option<String> {
            self.hashed += 1;
            self.hash.clone()
        }
    }

    fn policy(toml_text: &str) -> Policy {
        #[derive(serde::Deserialize)]
        struct W {
            policy: Vec<PolicyConfig>,
        }
        let w: W = toml::from_str(toml_text).unwrap();
        check(&w.policy[0]).unwrap();
        Policy::compile(&w.policy[0])
    }

    fn who(uid: u32, exe: &str, hash: &str) -> Who {
        Who {
            uid,
            gid: 100,
            exe: Some(PathBuf::from(exe)),
            hash: Some(hash.into()),
            hashed: 0,
        }
    }

    #[test]
    fn deny_by_default_and_first_match_wins() {
        let research = policy(
            "[[policy]]\nname = \"research\"\nuids = [1001]\nsecrets = [\"openai/*\"]\nmax_ttl = \"15m\"\n",
        );
        let all = [research];
        let allowed =
            |uid, name| decide(&all, &mut who(uid, "/usr/bin/python3", "aa"), name, 0).is_some();
        assert!(allowed(1001, "openai/prod"));
        assert!(!allowed(1002, "openai/prod"));
        assert!(!allowed(1001, "aws/prod"));
        // `*` stays within one segment.
        assert!(!allowed(1001, "openai/a/b"));
        assert!(decide(&[], &mut who(0, "/x", "aa"), "openai/prod", 0).is_none());
    }

    #[test]
    fn exe_paths_and_hashes_are_checked_and_hashes_only_when_needed() {
        let by_path = policy(
            "[[policy]]\nname = \"p\"\nexe = [\"/usr/bin/python3.11\"]\nsecrets = [\"**\"]\n",
        );
        let mut w = who(5, "/usr/bin/python3.11", "aa");
        assert!(decide(std::slice::from_ref(&by_path), &mut w, "x/y", 0).is_some());
        assert_eq!(w.hashed, 0, "no policy asked for a hash");
        assert!(
            decide(
                std::slice::from_ref(&by_path),
                &mut who(5, "/tmp/python3.11", "aa"),
                "x",
                0
            )
            .is_none()
        );

        let hash = "ab".repeat(32);
        let by_hash = policy(&format!(
            "[[policy]]\nname = \"h\"\nexe = [\"/opt/agent\"]\nexe_sha256 = [\"{}\"]\nsecrets = [\"**\"]\n",
            hash.to_uppercase()
        ));
        assert!(
            decide(
                std::slice::from_ref(&by_hash),
                &mut who(5, "/opt/agent", &hash),
                "x",
                0
            )
            .is_some()
        );
        assert!(
            decide(
                std::slice::from_ref(&by_hash),
                &mut who(5, "/opt/agent", &"cd".repeat(32)),
                "x",
                0
            )
            .is_none()
        );
    }

    #[test]
    fn same_user_means_the_daemons_uid() {
        let p = policy("[[policy]]\nname = \"me\"\nsame_user = true\nsecrets = [\"demo/*\"]\n");
        assert!(
            decide(
                std::slice::from_ref(&p),
                &mut who(1000, "/x", "a"),
                "demo/k",
                1000
            )
            .is_some()
        );
        assert!(
            decide(
                std::slice::from_ref(&p),
                &mut who(1001, "/x", "a"),
                "demo/k",
                1000
            )
            .is_none()
        );
    }

    #[test]
    fn policies_that_match_everyone_or_nothing_are_refused() {
        #[derive(serde::Deserialize)]
        struct W {
            policy: Vec<PolicyConfig>,
        }
        let w: W = toml::from_str("[[policy]]\nname = \"open\"\nsecrets = [\"**\"]\n").unwrap();
        assert_eq!(check(&w.policy[0]).unwrap_err().0, "uids");
        let w: W =
            toml::from_str("[[policy]]\nname = \"x\"\nuids = [1]\nsecrets = [\"a[\"]\n").unwrap();
        assert_eq!(check(&w.policy[0]).unwrap_err().0, "secrets");
        let w: W =
            toml::from_str("[[policy]]\nname = \"x\"\nexe = [\"python\"]\nsecrets = [\"a\"]\n")
                .unwrap();
        assert_eq!(check(&w.policy[0]).unwrap_err().0, "exe");
    }
}

//! `keywarden-plugin-db`: PostgreSQL, MariaDB/MySQL and Redis credentials, speaking keywarden
//! plugin protocol v1.
//!
//! Kinds: `postgres-password`, `mysql-password`, `redis-acl` rotate a user's password with
//! `strategy = "single"` (change it; Redis keeps the old one beside the new until revoke) or
//! `"alternating"` (two users, `settings.usernames = [a, b]`, the one not in use changes and
//! `meta.username` says which is current). `postgres-lease`, `mysql-lease`, `redis-lease` issue
//! a user per lease instead (each fetch gets its own, dropped when the lease ends). The admin
//! connection comes from the secret's `credentials.admin`: a URL with its password, or a
//! password whose URL is `settings.url` (the user in the URL or `meta.username`).
//!
//! Identifiers and passwords never reach a statement by concatenation: PostgreSQL's own
//! `format('%I', '%L')` and MariaDB's `QUOTE()` quote them; Redis takes them as separate
//! arguments.

#![forbid(unsafe_code)]

mod common;
mod mysql;
mod postgres;
mod redis_acl;

use keywarden_plugin_sdk::{ErrReply, Hello, KindInfo, OkReply, Plugin, Request};

struct DbPlugin;

impl Plugin for DbPlugin {
    fn hello(&self) -> Hello {
        let kind = |ops: &[&str]| KindInfo {
            ops: ops.iter().map(|o| o.to_string()).collect(),
            // Revoke is called after the drain for every strategy: with `alternating` it
            // disables the old user, with Redis it removes the old password; with `single` on
            // PostgreSQL and MariaDB the old password already stopped working at `create`.
            overlap: Some(true),
        };
        Hello {
            keywarden_plugin: 1,
            name: "db".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kinds: [
                ("postgres-password", kind(&["create", "verify", "revoke"])),
                ("mysql-password", kind(&["create", "verify", "revoke"])),
                ("redis-acl", kind(&["create", "verify", "revoke"])),
                ("postgres-lease", kind(&["issue", "revoke"])),
                ("mysql-lease", kind(&["issue", "revoke"])),
                ("redis-lease", kind(&["issue", "revoke"])),
            ]
            .map(|(name, info)| (name.to_string(), info))
            .into(),
        }
    }

    async fn handle(&self, request: Request) -> Result<OkReply, ErrReply> {
        let op = request.op().ok_or_else(ErrReply::unsupported)?;
        match request.kind.as_deref() {
            Some("postgres-password" | "postgres-lease") => postgres::handle(&request, op).await,
            Some("mysql-password" | "mysql-lease") => mysql::handle(&request, op).await,
            Some("redis-acl" | "redis-lease") => redis_acl::handle(&request, op).await,
            other => Err(ErrReply::fatal(format!("unknown kind {other:?}"))),
        }
    }
}

fn main() -> std::process::ExitCode {
    keywarden_plugin_sdk::serve(DbPlugin)
}

//! A PostgreSQL database of the benchmark's own on the server at `KEYWARDEN_TEST_POSTGRES_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`), created empty and dropped with it.

use std::process::{Command, Stdio};

/// The database; dropped (its connections ended by force) when this is.
pub struct Database {
    base: String,
    name: String,
    /// Its URL.
    pub url: String,
}

impl Database {
    /// Creates it.
    pub fn new() -> Database {
        let base = std::env::var("KEYWARDEN_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let name = format!("kw_bench_{}", std::process::id());
        psql(&base, &format!("CREATE DATABASE {name}"));
        let url = format!("{}/{name}", base.rsplit_once('/').unwrap().0);
        Database { base, name, url }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        psql(
            &self.base,
            &format!("DROP DATABASE {} WITH (FORCE)", self.name),
        );
    }
}

fn psql(url: &str, sql: &str) {
    let ok = Command::new("psql")
        .args([url, "-qAt", "-c", sql])
        .stdout(Stdio::null())
        .status()
        .expect("psql")
        .success();
    assert!(ok, "psql {sql}");
}

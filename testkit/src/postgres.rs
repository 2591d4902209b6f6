//! A PostgreSQL cluster of a test's own that checks passwords (`scram-sha-256`): the stock
//! local server may trust every connection, which would make "the old password is refused"
//! pass vacuously.

use std::path::Path;
use std::process::{Command, Stdio};

/// A PostgreSQL cluster of the test's own, password-checked (`scram-sha-256`), on a free port.
pub struct Postgres {
    dir: tempfile::TempDir,
    /// Its port on 127.0.0.1.
    pub port: u16,
    admin_password: String,
}

impl Postgres {
    /// Starts one, or `None` (with a note) where it cannot run here: no server binaries, or
    /// not root (the cluster runs as the `postgres` user). Under CI its absence fails.
    pub fn start() -> Option<Postgres> {
        Postgres::start_with(&[])
    }

    /// Starts one with extra server settings (`name=value`, as `postgres -c` takes them).
    pub fn start_with(settings: &[&str]) -> Option<Postgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|mut d| d.next())
            .and_then(Result::ok)
            .map(|e| e.path().join("bin"));
        let root = std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
        let Some(bin) = bin.filter(|b| b.join("initdb").exists() && root) else {
            assert!(
                std::env::var_os("CI").is_none(),
                "PostgreSQL's server binaries (and root, to run them as postgres) are needed"
            );
            eprintln!("skipping: no PostgreSQL server binaries, or not root");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let as_postgres = |program: &Path, args: &[&str]| {
            let status = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(program)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap();
            assert!(status.success(), "{} {args:?}", program.display());
        };
        Command::new("chown")
            .args(["postgres:postgres"])
            .arg(dir.path())
            .status()
            .unwrap();
        let admin_password = "admin pw 'with' quotes\\".to_string();
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, &admin_password).unwrap();
        Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&pwfile)
            .status()
            .unwrap();
        let data = dir.path().join("data");
        as_postgres(
            &bin.join("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "-A",
                "scram-sha-256",
                "--pwfile",
                pwfile.to_str().unwrap(),
            ],
        );
        let port = super::free_port();
        let mut options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1",
            dir.path().display()
        );
        for setting in settings {
            options.push_str(&format!(" -c {setting}"));
        }
        as_postgres(
            &bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &options,
                "-w",
                "-l",
                dir.path().join("log").to_str().unwrap(),
                "start",
            ],
        );
        Some(Postgres {
            dir,
            port,
            admin_password,
        })
    }

    /// The superuser's password (`postgres`).
    pub fn admin_password(&self) -> &str {
        &self.admin_password
    }

    /// The superuser's URL, password included.
    pub fn admin_url(&self) -> String {
        let password: String = self
            .admin_password
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        format!(
            "postgres://postgres:{password}@127.0.0.1:{}/postgres",
            self.port
        )
    }

    /// `psql` as `user` with `password` running `sql`; its output, or `Err` with stderr.
    pub fn psql(&self, user: &str, password: &str, sql: &str) -> Result<String, String> {
        let out = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-d",
                "postgres",
            ])
            .args(["-U", user, "-XAtqc", sql])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "5")
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// `psql` as the superuser; panics on failure.
    pub fn admin(&self, sql: &str) -> String {
        self.psql("postgres", &self.admin_password, sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--", "sh", "-c"])
            .arg(format!(
                "$(dirname $(ls -d /usr/lib/postgresql/*/bin/pg_ctl | head -n1))/pg_ctl -D {} -m immediate stop",
                data.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

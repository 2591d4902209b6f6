//! Helpers shared by the integration tests of keywarden and its plugins: a scratch directory
//! with a config that uses small Argon2 parameters, the real `keywarden` binary run in it (as a
//! CLI or as a daemon), SQL access to the files it writes, and polling on conditions.

pub mod daemon;
pub mod postgres;
pub mod proc;
pub mod tls;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The passphrase every test store uses.
pub const PASSPHRASE: &str = "test passphrase, not for production";

/// A scratch directory holding a config, a passphrase file and (after `init`) a store.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub store: PathBuf,
    pub passphrase_file: PathBuf,
}

impl Env {
    /// A fresh directory with a config (`extra` appended) and a passphrase file; no store yet.
    pub fn with_config(extra: &str) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        // Traversable (not listable) by others, so a plugin running as its own user reaches the
        // paths its sandbox grants in here; everything of the store stays 0600/0700.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let store = dir.path().join("data").join("vault.db");
        let config = dir.path().join("keywarden.toml");
        std::fs::write(
            &config,
            format!(
                "[store]\npath = \"data/vault.db\"\nweak_kdf_for_tests = true\n[store.kdf]\nmemory_kib = 64\niterations = 1\nparallelism = 1\n\n{extra}"
            ),
        )
        .unwrap();
        let passphrase_file = dir.path().join("passphrase");
        std::fs::write(&passphrase_file, format!("{PASSPHRASE}\n")).unwrap();
        std::fs::set_permissions(&passphrase_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        Env {
            dir,
            config,
            store,
            passphrase_file,
        }
    }

    /// A fresh directory with the default test config; no store yet.
    #[allow(clippy::new_without_default)] // a scratch directory is created, not defaulted
    pub fn new() -> Env {
        Env::with_config("")
    }

    /// A fresh directory with an initialized store.
    pub fn initialized() -> Env {
        let env = Env::new();
        env.ok(&["init"], None);
        env
    }

    /// `keywarden` with a clean environment pointing at this directory.
    pub fn cmd(&self) -> Command {
        let mut cmd = Command::new(keywarden_bin());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("KEYWARDEN_") || key == "CREDENTIALS_DIRECTORY" {
                cmd.env_remove(key);
            }
        }
        cmd.env("KEYWARDEN_CONFIG", &self.config)
            .env("KEYWARDEN_PASSPHRASE_FILE", &self.passphrase_file)
            .current_dir(self.dir.path());
        cmd
    }

    /// Runs `keywarden ARGS` with `stdin` (or an empty stdin) and returns everything it did.
    pub fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        run_with(self.cmd(), args, stdin)
    }

    /// Like [`Env::run`], asserting success; returns stdout.
    pub fn ok(&self, args: &[&str], stdin: Option<&[u8]>) -> String {
        let out = self.run(args, stdin);
        assert!(
            out.status.success(),
            "keywarden {args:?} failed ({:?}):\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Like [`Env::run`], asserting exit code `code`; returns stderr.
    pub fn fails(&self, code: i32, args: &[&str], stdin: Option<&[u8]>) -> String {
        let out = self.run(args, stdin);
        assert_eq!(
            out.status.code(),
            Some(code),
            "keywarden {args:?}: expected exit {code}:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// `put NAME` with `value` on stdin.
    pub fn put(&self, name: &str, value: &str) {
        self.ok(&["put", name], Some(value.as_bytes()));
    }

    /// `get NAME`, returning the raw value.
    pub fn get(&self, name: &str) -> String {
        self.ok(&["get", name, "--no-newline"], None)
    }

    /// Runs SQL statements against the store file directly (as an attacker or a bad disk would).
    pub fn sql(&self, statements: &[&str]) {
        sql(&self.store, statements)
    }

    /// Reads one integer with SQL.
    pub fn sql_i64(&self, query: &str) -> i64 {
        sql_one(&self.store, query)
    }

    /// Reads one blob (or text, as bytes) with SQL.
    pub fn sql_blob(&self, query: &str) -> Vec<u8> {
        sql_one(&self.store, query)
    }
}

/// The `keywarden` binary under test: beside the running test in the target directory, built
/// first (in the same profile) if this run did not build it (`cargo test -p` or `cargo bench
/// -p` of a plugin or the broker).
pub fn keywarden_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable");
        // target/<profile>/deps/<test> → target/<profile>/keywarden
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target directory");
        let bin = dir.join("keywarden");
        if !bin.exists() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut args = vec!["build", "-p", "keywarden", "--bin", "keywarden"];
            // A benchmark runs from target/release: build the daemon it will look for there.
            if dir.file_name().is_some_and(|d| d == "release") {
                args.push("--release");
            }
            let status = Command::new(cargo)
                .args(&args)
                .current_dir(workspace_root())
                .status()
                .expect("run cargo build");
            assert!(status.success(), "building keywarden failed");
        }
        bin
    })
    .clone()
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// Runs a prepared command with `stdin`.
pub fn run_with(mut cmd: Command, args: &[&str], stdin: Option<&[u8]>) -> Output {
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn keywarden");
    let mut pipe = child.stdin.take().unwrap();
    if let Some(data) = stdin {
        pipe.write_all(data).unwrap();
    }
    drop(pipe);
    child.wait_with_output().unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs SQL statements against an SQLite file.
pub fn sql(db: &Path, statements: &[&str]) {
    runtime().block_on(async {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        for s in statements {
            sqlx::raw_sql(sqlx::AssertSqlSafe(s.to_string()))
                .execute(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{s}: {e}"));
        }
        conn.close().await.unwrap();
    })
}

/// Reads one value from an SQLite file.
pub fn sql_one<T>(db: &Path, query: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite> + Send + Unpin,
{
    runtime().block_on(async {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        let v: T = sqlx::query_scalar(sqlx::AssertSqlSafe(query.to_string()))
            .fetch_one(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        v
    })
}

/// Every byte of the store and its SQLite side files.
pub fn store_bytes(store: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        let path = PathBuf::from(format!("{}{suffix}", store.display()));
        if let Ok(bytes) = std::fs::read(&path) {
            all.extend(bytes);
        }
    }
    all
}

/// An HTTP request by `/usr/bin/curl` over a Unix socket; returns the status (0 if none) and
/// the body. `extra` goes to curl before the URL (headers, `--data`, …).
pub fn curl(socket: &Path, method: &str, path: &str, extra: &[&str]) -> (u16, String) {
    curl_with(Path::new("/usr/bin/curl"), socket, method, path, extra)
}

/// `run`'s result, tried again while it fails because the executable is "busy": a freshly
/// copied executable is, while a process forked by another test thread still holds the copy's
/// write descriptor (that child execs and lets go of it at once).
pub fn unless_busy<T>(mut run: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    let mut out = run();
    for _ in 0..50 {
        match &out {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(std::time::Duration::from_millis(20));
                out = run();
            }
            _ => break,
        }
    }
    out
}

/// Like [`curl`] with a given curl executable (a copy, to be a different peer executable).
pub fn curl_with(
    bin: &Path,
    socket: &Path,
    method: &str,
    path: &str,
    extra: &[&str],
) -> (u16, String) {
    let run = || {
        Command::new(bin)
            .args([
                "-s",
                "--path-as-is",
                "-X",
                method,
                "-w",
                "\n%{http_code}",
                "--unix-socket",
            ])
            .arg(socket)
            .args(extra)
            .arg(format!("http://localhost{path}"))
            .output()
    };
    let out = unless_busy(run).expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Starts a TCP server on 127.0.0.1 (its own thread and runtime) that hands each connection to
/// `on_connection` in a task of its own; returns the port. For fake upstreams in tests.
pub fn spawn_tcp_server<F, Fut>(on_connection: F) -> u16
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(on_connection(stream));
            }
        });
    });
    port
}

/// Connects to 127.0.0.1:`port` every millisecond until `stop` is set, and counts the
/// connections made and refused: a listener closed for a moment (a daemon's reload) refuses.
pub fn connect_every_millisecond(
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(usize, usize)> {
    std::thread::spawn(move || {
        let (mut made, mut refused) = (0, 0);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(_) => made += 1,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
                Err(e) => panic!("connecting: {e}"),
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        (made, refused)
    })
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for listeners a test starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

//! Running the real daemon in tests: a config with the Python example plugin pinned, the
//! daemon started in the background with its log captured, polling helpers that wait on
//! conditions (never on fixed sleeps), and access to the plugin's upstream state.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Env;

/// The Python example plugin in this repository.
pub fn example_plugin() -> PathBuf {
    super::workspace_root().join("plugins/examples/example-plugin.py")
}

/// The SHA-256 of a file, hex (computed independently of keywarden's own code).
pub fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// Test timings: quick retries, short plugin timeouts, sockets in the scratch directory;
/// plugins run as `nobody` (65534) when the tests run as root.
pub fn base_config(plugin_timeout: &str) -> String {
    format!(
        r#"[daemon]
plugin_user = "65534:65534"
retry_base = "50ms"
retry_max = "400ms"
max_attempts = 4
plugin_timeout = "{plugin_timeout}"
shutdown_timeout = "5s"

[agent]
socket = "run/agent.sock"
admin_socket = "run/admin.sock"
default_ttl = "5m"
"#
    )
}

/// The directory the example plugin keeps its upstream state in (the only one outside its work
/// directory its sandbox lets it write), created open to the plugin's user.
pub fn upstream_dir(dir: &Path) -> PathBuf {
    let upstream = dir.join("upstream");
    if !upstream.exists() {
        std::fs::create_dir(&upstream).unwrap();
        std::fs::set_permissions(&upstream, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    upstream
}

/// A `[plugins.example]` section for the Python plugin with its state in
/// `dir/upstream/upstream.db`.
pub fn example_plugin_config(dir: &Path, extra_env: &str) -> String {
    let plugin = example_plugin();
    let upstream = upstream_dir(dir);
    format!(
        "[plugins.example]\ncommand = [{:?}]\nsha256 = \"{}\"\nenv = {{ EXAMPLE_STATE = {:?}{extra_env} }}\n\
         sandbox = {{ write_paths = [{:?}] }}\n",
        plugin.display().to_string(),
        sha256_of(&plugin),
        upstream.join("upstream.db").display().to_string(),
        upstream.display().to_string(),
    )
}

/// An environment whose config has the test timings, the example plugin, and `extra`.
pub fn env_with_plugin(extra: &str) -> Env {
    env_with_plugin_timeout(extra, "3s")
}

/// Like [`env_with_plugin`] with a given plugin timeout.
pub fn env_with_plugin_timeout(extra: &str, timeout: &str) -> Env {
    let env = Env::new();
    let config = format!(
        "{}\n{}\n{}",
        base_config(timeout),
        example_plugin_config(env.dir.path(), ""),
        extra
    );
    let base = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(&env.config, format!("{base}\n{config}")).unwrap();
    env
}

/// Waits until `check` returns `Some`, polling every 20 ms, or panics after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, check: impl FnMut() -> Option<T>) -> T {
    wait_for_explained(what, timeout, check, String::new)
}

/// Like [`wait_for`]; on timeout the panic message also carries what `explain` says (the
/// stragglers, a log).
pub fn wait_for_explained<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
    explain: impl FnOnce() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out waiting for {what}\n{}", explain());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A daemon process under test.
pub struct Daemon {
    child: Option<Child>,
    /// Its log (stderr).
    pub log: PathBuf,
    admin: PathBuf,
}

impl Env {
    /// The admin socket of this environment's config.
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.path().join("run/admin.sock")
    }

    /// The agent socket of this environment's config.
    pub fn agent_socket(&self) -> PathBuf {
        self.dir.path().join("run/agent.sock")
    }

    /// Starts `keywarden serve --init` and waits until its admin socket answers.
    pub fn start_daemon(&self) -> Daemon {
        self.start_daemon_with(&[])
    }

    /// Starts the daemon with extra environment variables.
    pub fn start_daemon_with(&self, vars: &[(&str, &str)]) -> Daemon {
        let n = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("daemon-")
            })
            .count();
        let log = self.dir.path().join(format!("daemon-{n}.log"));
        let mut cmd = self.cmd();
        cmd.args(["serve", "--init"])
            .env("KEYWARDEN_LOG", "keywarden=debug")
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = cmd.spawn().expect("spawn keywarden serve");
        let mut daemon = Daemon {
            child: Some(child),
            log,
            admin: self.admin_socket(),
        };
        daemon.wait_ready();
        daemon
    }

    /// Runs `serve` expecting it to fail at start; returns its exit code and stderr.
    pub fn serve_fails(&self) -> (Option<i32>, String) {
        let mut cmd = self.cmd();
        cmd.args(["serve", "--init"]);
        let out = super::run_with(cmd, &[], None);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The broker process's private socket, `<work_dir>/broker/broker.sock`, in the default
    /// work directory beside the store (`plugin-work/<store>/`), once a daemon started it.
    pub fn broker_process_socket(&self) -> PathBuf {
        std::fs::read_dir(self.store.with_file_name("plugin-work"))
            .unwrap()
            .flatten()
            .map(|e| e.path().join("broker/broker.sock"))
            .find(|p| p.exists())
            .expect("the broker process's socket")
    }

    /// The example plugin's upstream state file.
    pub fn upstream_db(&self) -> PathBuf {
        self.dir.path().join("upstream/upstream.db")
    }

    /// Reads one value from the example plugin's upstream state.
    pub fn upstream_i64(&self, query: &str) -> i64 {
        super::sql_one(&self.upstream_db(), query)
    }

    /// Reads one text value from the upstream state.
    pub fn upstream_text(&self, query: &str) -> String {
        super::sql_one(&self.upstream_db(), query)
    }

    /// `list --json` as JSON.
    pub fn list(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["list", "--json"], None)).unwrap()
    }

    /// One secret's entry from `list --json`.
    pub fn entry(&self, name: &str) -> serde_json::Value {
        self.list()
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    }
}

impl Daemon {
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // Ready means answering: the sockets are bound before start-up finishes.
            if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&self.admin) {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.write_all(b"GET /v1/admin/status HTTP/1.0\r\nHost: x\r\n\r\n");
                let mut head = [0u8; 12];
                if s.read_exact(&mut head).is_ok() && head[8..] == *b" 200" {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "the daemon exited ({status}) before it was ready:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not become ready:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Everything the daemon logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGHUP, then waits until the services serve again on the reloaded config.
    pub fn reload(&self) {
        let served = self.log_text().matches("keywarden is serving").count();
        let sent = Command::new("kill")
            .args(["-HUP", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        wait_for("the services to restart", Duration::from_secs(30), || {
            (self.log_text().matches("keywarden is serving").count() > served).then_some(())
        });
    }

    /// kill -9, as a crash or an OOM killer would.
    pub fn kill9(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Waits for the daemon to end by itself (a crash point aborted it); panics after
    /// `timeout`. Whether it was killed by a signal (abort: SIGABRT).
    pub fn wait_crash(mut self, timeout: Duration) -> bool {
        let mut child = self.child.take().unwrap();
        let status = super::daemon::wait_for_explained(
            "the daemon to stop at its crash point",
            timeout,
            || child.try_wait().unwrap(),
            || self.log_text(),
        );
        status.code().is_none()
    }

    /// SIGTERM; returns the exit code.
    pub fn terminate(mut self) -> Option<i32> {
        let mut child = self.child.take().unwrap();
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the daemon did not stop on SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

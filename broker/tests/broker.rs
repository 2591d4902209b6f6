//! The broker end to end: the real daemon and `keywarden-broker`, a fake provider over TLS
//! with a private CA (`fake_provider.py`), and real clients — curl over the broker socket and
//! the official `openai` and `anthropic` Python SDKs with nothing but a base URL.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keywarden_testkit::daemon::{Daemon, base_config, example_plugin_config, wait_for};
use keywarden_testkit::tls::private_ca;
use keywarden_testkit::{Env, curl};
use serde_json::Value;

const PRIMARY: &str = "sk-primary-7c1d9a0b5e2f4c6d8a1b3c5d";
const BACKUP: &str = "sk-backup-3e5f7a9b1c2d4e6f8a0b2c4d";
const ANTHROPIC: &str = "sk-ant-api03-5d7f9b1d3f5a7c9e1b3d5f7a";

/// The fake provider: its process, its state directory and its port.
struct Provider {
    child: Child,
    state: PathBuf,
    port: u16,
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Provider {
    fn start(dir: &Path) -> (Provider, PathBuf) {
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs).unwrap();
        let (ca, cert, key) = private_ca(&certs);
        let state = dir.join("provider");
        std::fs::create_dir_all(&state).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_provider.py");
        let child = Command::new("python3")
            .arg(script)
            .args([&state, &cert, &key])
            .stdin(Stdio::null())
            .spawn()
            .expect("start the fake provider");
        let port_file = state.join("port");
        let port = wait_for("the fake provider", Duration::from_secs(20), || {
            std::fs::read_to_string(&port_file)
                .ok()?
                .trim()
                .parse()
                .ok()
        });
        (Provider { child, state, port }, ca)
    }

    /// Accepts `keys` (key → "ok", "429", "500", "hold"); `db` adds the active keys of the
    /// example plugin's upstream.
    fn accept(&self, keys: &[(&str, &str)], db: Option<&Path>) {
        let mut map: serde_json::Map<String, Value> = keys
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect();
        if let Some(db) = db {
            map.insert("__db__".into(), Value::from(db.display().to_string()));
        }
        let tmp = self.state.join("keys.tmp");
        std::fs::write(&tmp, Value::Object(map).to_string()).unwrap();
        std::fs::rename(tmp, self.state.join("keys.json")).unwrap();
    }

    /// Every request it received.
    fn seen(&self) -> Vec<Value> {
        std::fs::read_to_string(self.state.join("seen.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A daemon with brokers `openai` (falling back to `openai/backup`) and `anthropic` in front of
/// the fake provider, and `extra` config.
struct Setup {
    env: Env,
    provider: Provider,
    daemon: Option<Daemon>,
    openai_port: u16,
    anthropic_port: u16,
}

impl Setup {
    fn new(policy: &str, extra: &str) -> Setup {
        Setup::with_daemon_env(policy, extra, &[])
    }

    /// Like [`Setup::new`], the daemon started with `vars` in its environment.
    fn with_daemon_env(policy: &str, extra: &str, vars: &[(&str, &str)]) -> Setup {
        let env = Env::new();
        let (provider, ca) = Provider::start(env.dir.path());
        let (openai_port, anthropic_port) = (free_port(), free_port());
        let upstream = format!("https://127.0.0.1:{}", provider.port);
        let config = format!(
            r#"{base}broker_socket = "run/broker.sock"
socket_mode = "0666"

[secrets."openai/prod"]
provider = "manual"
[secrets."openai/backup"]
provider = "manual"
[secrets."anthropic/prod"]
provider = "manual"

[brokers.openai]
preset = "openai"
secret = "openai/prod"
fallback = ["openai/backup"]
upstream = "{upstream}"
ca_file = {ca:?}
listen = "127.0.0.1:{openai_port}"

[brokers.anthropic]
preset = "anthropic"
secret = "anthropic/prod"
upstream = "{upstream}"
ca_file = {ca:?}
listen = "127.0.0.1:{anthropic_port}"

{policy}
{extra}"#,
            base = base_config("3s"),
            ca = ca.display().to_string(),
            extra = extra
                .replace("{upstream}", &upstream)
                .replace("{ca}", &format!("{:?}", ca.display().to_string()))
                .replace(
                    "{example_plugin}",
                    &example_plugin_config(env.dir.path(), "")
                ),
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(&env.config)
            .unwrap()
            .write_all(config.as_bytes())
            .unwrap();
        env.ok(&["init"], None);
        env.put("openai/prod", PRIMARY);
        env.put("openai/backup", BACKUP);
        env.put("anthropic/prod", ANTHROPIC);
        provider.accept(&[(PRIMARY, "ok"), (BACKUP, "ok"), (ANTHROPIC, "ok")], None);
        let daemon = env.start_daemon_with(vars);
        Setup {
            env,
            provider,
            daemon: Some(daemon),
            openai_port,
            anthropic_port,
        }
    }

    /// A setup whose one policy (`agents`, uid 0, with `budget` if not empty) may use one more
    /// broker, `[brokers.{name}]` with `settings`, against the fake provider.
    fn with_broker(name: &str, settings: &str, budget: &str) -> Setup {
        let policy = format!(
            "[[policy]]\nname = \"agents\"\nuids = [0]\nbrokers = [\"{name}\"]\n{budget}\n"
        );
        let extra = format!(
            "[brokers.{name}]\nupstream = \"{{upstream}}\"\nca_file = {{ca}}\n{settings}\n"
        );
        Setup::new(&policy, &extra)
    }

    /// The first `broker.request` audit row, once it is written.
    fn first_request_row(&self) -> Value {
        wait_for("a broker.request row", Duration::from_secs(30), || {
            self.audit("broker.request").into_iter().next()
        })
    }

    fn socket(&self) -> PathBuf {
        self.env.dir.path().join("run/broker.sock")
    }

    /// A chat completion through the broker socket (curl), with a placeholder key.
    fn chat(&self, path: &str, extra: &[&str]) -> (u16, String) {
        self.post(
            path,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
            extra,
        )
    }

    /// A POST of `body` through the broker socket, with a placeholder key.
    fn post(&self, path: &str, body: &str, extra: &[&str]) -> (u16, String) {
        let mut args = vec![
            "-H",
            "content-type: application/json",
            "-H",
            "Authorization: Bearer placeholder-from-the-agent",
            "--data",
            body,
        ];
        args.extend(extra);
        curl(&self.socket(), "POST", path, &args)
    }

    /// Puts `value` as `secret`'s new version, which the provider accepts beside the others.
    fn put_accepted(&self, secret: &str, value: &str) {
        self.provider.accept(
            &[
                (PRIMARY, "ok"),
                (value, "ok"),
                (BACKUP, "ok"),
                (ANTHROPIC, "ok"),
            ],
            None,
        );
        self.env.put(secret, value);
    }

    /// Sends chat completions through `openai` until one reaches the provider with `key` (a
    /// key is pushed to the broker as its write commits, not when the writer returns).
    fn chat_until_key(&self, key: &str) {
        wait_for("a request with that key", Duration::from_secs(10), || {
            let (status, body) = self.chat("/v1/broker/openai/v1/chat/completions", &[]);
            assert_eq!(status, 200, "{body}");
            (self.provider.seen().last().unwrap()["key"] == key).then_some(())
        });
    }

    /// A streamed chat completion through `broker` that the provider holds after its first
    /// event (until `release`), once the provider has it; and the key it was sent with.
    fn held_stream(&self, broker: &str) -> (Child, String) {
        let stream = Command::new("curl")
            .args(["-sN", "--unix-socket"])
            .arg(self.socket())
            .args([
                "-H",
                "content-type: application/json",
                "--data",
                r#"{"model":"m","messages":[],"stream":true,"hold":true}"#,
                &format!("http://localhost/v1/broker/{broker}/v1/chat/completions"),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let key = wait_for("the held stream", Duration::from_secs(10), || {
            self.provider
                .seen()
                .iter()
                .find(|r| r["body"].as_str().unwrap().contains("hold"))
                .map(|r| r["key"].as_str().unwrap().to_string())
        });
        (stream, key)
    }

    fn audit(&self, action: &str) -> Vec<Value> {
        let out = self
            .env
            .ok(&["audit", "tail", "--json", "-n", "1000"], None);
        let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
        rows.into_iter().filter(|r| r["action"] == action).collect()
    }

    fn restart(&mut self) {
        self.daemon.take().unwrap().terminate();
        self.daemon = Some(self.env.start_daemon());
    }
}

/// `curl -s` over TCP with `args`: the status it printed (`000` when no answer came) and its
/// exit code.
fn curl_tcp(args: &[&str]) -> (String, Option<i32>) {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.code(),
    )
}

/// An audit row's detail, as JSON.
fn detail(row: &Value) -> Value {
    match &row["detail"] {
        Value::String(text) => serde_json::from_str(text).unwrap(),
        other => other.clone(),
    }
}

const ADMITTED: &str = r#"[[policy]]
name = "agents"
uids = [0]
brokers = ["openai", "anthropic"]
"#;

/// The Python interpreter with the official SDKs (`KEYWARDEN_TEST_PYTHON`, else the workspace's
/// `.venv`); under CI their absence is a failure.
fn python_with_sdks() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("KEYWARDEN_TEST_PYTHON").map(PathBuf::from),
        Some(keywarden_testkit::workspace_root().join(".venv/bin/python3")),
    ];
    for python in candidates.into_iter().flatten() {
        let ok = Command::new(&python)
            .args(["-c", "import openai, anthropic"])
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(python);
        }
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the openai and anthropic SDKs are missing (.ci/run installs them)"
    );
    eprintln!("skipping the SDK checks: no Python with the openai and anthropic SDKs");
    None
}

const AGENT: &str = r#"
import json, os, sys
import openai, anthropic

out = {}
client = openai.OpenAI()
raw = client.chat.completions.with_raw_response.create(
    model="m", messages=[{"role": "user", "content": "hi"}])
out["openai"] = raw.parse().choices[0].message.content
out["openai_headers"] = dict(raw.headers)
stream = client.chat.completions.create(
    model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
    stream_options={"include_usage": True})
out["openai_stream"] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
# A stream as the SDK sends it by default, read as much code reads it: every chunk's first
# choice (the usage chunk the broker asked for on its behalf must not reach it).
stream = client.chat.completions.create(
    model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
out["openai_plain_stream"] = "".join(c.choices[0].delta.content or "" for c in stream)

claude = anthropic.Anthropic()
message = claude.messages.create(
    model="m", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
out["anthropic"] = message.content[0].text
with claude.messages.stream(
        model="m", max_tokens=16, messages=[{"role": "user", "content": "hi"}]) as s:
    out["anthropic_stream"] = s.get_final_text()

# What a harvester in this process finds: the environment, /proc/self/environ, the clients.
out["environ"] = dict(os.environ)
out["proc_environ"] = open("/proc/self/environ", "rb").read().decode("utf-8", "replace")
out["client_keys"] = [client.api_key, claude.api_key]
print(json.dumps(out))
"#;

#[test]
fn official_sdks_and_curl_get_answers_and_the_key_is_nowhere_the_agent_can_see() {
    let s = Setup::new(ADMITTED, "");

    // curl over the broker socket: the agent's placeholder is dropped, the key injected.
    let (status, body) = s.chat("/v1/broker/openai/v1/chat/completions", &["-i"]);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("hello from fake"), "{body}");
    assert!(
        body.to_lowercase()
            .contains("x-keywarden-route: openai/prod"),
        "{body}"
    );
    let seen = s.provider.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["key"], PRIMARY);
    assert!(!seen[0].to_string().contains("placeholder-from-the-agent"));

    // The official SDKs with only a base URL and a placeholder key, over loopback TCP.
    if let Some(python) = python_with_sdks() {
        let out = Command::new(python)
            .args(["-c", AGENT])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env(
                "OPENAI_BASE_URL",
                format!("http://127.0.0.1:{}/openai/v1", s.openai_port),
            )
            .env("OPENAI_API_KEY", "placeholder")
            .env(
                "ANTHROPIC_BASE_URL",
                format!("http://127.0.0.1:{}/anthropic", s.anthropic_port),
            )
            .env("ANTHROPIC_API_KEY", "placeholder")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&s.daemon.as_ref().unwrap().log).unwrap_or_default()
        );
        let got: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(got["openai"], "hello from fake");
        assert_eq!(got["openai_stream"], "hello streamed");
        assert_eq!(got["openai_plain_stream"], "hello streamed");
        assert_eq!(got["anthropic"], "hello from fake");
        assert_eq!(got["anthropic_stream"], "hello streamed");
        assert_eq!(got["openai_headers"]["x-keywarden-route"], "openai/prod");
        for key in [PRIMARY, BACKUP, ANTHROPIC] {
            assert!(!text.contains(key), "the agent could see a key: {text}");
        }
        let anthropic_keys: Vec<Value> = s
            .provider
            .seen()
            .into_iter()
            .filter(|r| r["path"].as_str().unwrap().starts_with("/v1/messages"))
            .map(|r| r["key"].clone())
            .collect();
        assert_eq!(anthropic_keys, vec![Value::from(ANTHROPIC); 2]);
    }

    // Every brokered request is an audit row with its tokens; none holds a key.
    let rows = wait_for("the audit rows", Duration::from_secs(10), || {
        let rows = s.audit("broker.request");
        (rows.len() >= 6 || python_with_sdks().is_none() && !rows.is_empty()).then_some(rows)
    });
    let first = detail(&rows[0]);
    assert_eq!(first["tokens"], 18);
    assert_eq!(first["route"], "openai/prod");
    assert_eq!(first["status"], 200);
    // Each answer, JSON (its length known) or streamed, reached the agent whole.
    for row in &rows {
        assert_eq!(detail(row)["complete"], true, "{row}");
    }
    if rows.len() >= 6 {
        let tokens: Vec<i64> = rows
            .iter()
            .map(|r| detail(r)["tokens"].as_i64().unwrap())
            .collect();
        // curl, then the SDKs: JSON, stream and a stream that did not ask for usage (OpenAI:
        // 11 + 7), JSON and stream (Anthropic: 13 + 5).
        assert_eq!(tokens[..6], [18; 6]);
    }
    let audit_text = s.env.ok(&["audit", "tail", "--json", "-n", "1000"], None);
    let log = std::fs::read_to_string(&s.daemon.as_ref().unwrap().log).unwrap();
    for key in [PRIMARY, BACKUP, ANTHROPIC] {
        assert!(!audit_text.contains(key) && !log.contains(key));
    }

    // A policy with brokers and no secrets fetches nothing from the agent socket.
    let (status, body) = curl(&s.env.agent_socket(), "GET", "/v1/secrets/openai/prod", &[]);
    assert_eq!(status, 403, "{body}");
    assert!(!body.contains(PRIMARY));

    // status shows the routes and today's spending.
    let status: Value =
        serde_json::from_str(&s.env.ok(&["broker", "status", "--json"], None)).unwrap();
    assert_eq!(
        status["brokers"]["openai"]["routes"][0]["secret"],
        "openai/prod"
    );
    assert_eq!(status["brokers"]["openai"]["routes"][0]["version"], 1);
    assert!(
        status["today"][0]["tokens"].as_u64().unwrap() >= 18,
        "{status}"
    );
}

#[test]
fn calls_outside_the_preset_and_path_tricks_never_reach_the_provider() {
    let s = Setup::new(ADMITTED, "");
    for (path, want) in [
        ("/v1/broker/openai/v1/files", 403),
        // Under an allowed call's name, but billed without usage in the answer (a batch), or
        // only a longer name.
        ("/v1/broker/anthropic/v1/messages/batches", 403),
        ("/v1/broker/openai/v1/chat/completionsX", 403),
        ("/v1/broker/openai/v1/chat/../files", 400),
        ("/v1/broker/openai/v1/chat/%2e%2e/files", 400),
        ("/v1/broker/nosuch/v1/chat/completions", 404),
    ] {
        let (status, body) = s.chat(path, &[]);
        assert_eq!(status, want, "{path}: {body}");
    }
    let (status, _) = curl(&s.socket(), "DELETE", "/v1/broker/openai/v1/models", &[]);
    assert_eq!(status, 403);
    // `..;` (path parameters some servers strip); work billed after an answer that so carries
    // no usage (a background response); a compressed body no estimate or usage request reads.
    let (status, body) = s.chat("/v1/broker/openai/v1/models/..;/files", &[]);
    assert_eq!(status, 400, "{body}");
    let background = r#"{"model":"m","input":"hi","background":true}"#;
    let (status, body) = s.post("/v1/broker/openai/v1/responses", background, &[]);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("background"), "{body}");
    let (status, body) = s.chat(
        "/v1/broker/openai/v1/chat/completions",
        &["-H", "content-encoding: gzip"],
    );
    assert_eq!(status, 403, "{body}");
    // A web page calling the loopback listener through the user's browser (a cross-site
    // request, or DNS rebinding): the browser's marks get it refused.
    for mark in [
        "Origin: https://evil.example",
        "Sec-Fetch-Site: same-origin",
    ] {
        let url = format!(
            "http://127.0.0.1:{}/openai/v1/chat/completions",
            s.openai_port
        );
        let (code, _) = curl_tcp(&["-H", mark, "--data", r#"{"model":"m","messages":[]}"#, &url]);
        assert_eq!(code, "403", "{mark}");
    }
    assert!(s.provider.seen().is_empty(), "{:?}", s.provider.seen());
    // The broker reports the refusal; the daemon writes its row with a later commit.
    wait_for("the refusal's audit row", Duration::from_secs(10), || {
        s.audit("broker.denied")
            .iter()
            .any(|r| detail(r).to_string().contains("/v1/files"))
            .then_some(())
    });
    // An allowed POST that asks the upstream to treat it as another method (headers some REST
    // APIs honour), or to bill another organization or project the key belongs to: the
    // headers never leave.
    let overrides = [
        "X-HTTP-Method-Override: DELETE",
        "X-HTTP-Method: DELETE",
        "X-Method-Override: DELETE",
        "OpenAI-Organization: org-someone-else",
        "OpenAI-Project: proj_someone_else",
    ];
    let args: Vec<&str> = overrides.iter().flat_map(|h| ["-H", *h]).collect();
    let (status, body) = s.chat("/v1/broker/openai/v1/chat/completions", &args);
    assert_eq!(status, 200, "{body}");
    let seen = s.provider.seen();
    assert_eq!(seen.len(), 1);
    let headers = seen[0]["headers"].as_object().unwrap();
    for name in [
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "openai-organization",
        "openai-project",
    ] {
        assert!(!headers.contains_key(name), "{name} reached the provider");
    }
}

/// The attack: refusals whose paths are long runs of quotes (each doubles in JSON), pipelined
/// so that 40 land in one batch of reports. The record was larger than the hand-off channel
/// takes, which ended the broker process: every stream cut, the batch's audit rows lost.
#[test]
fn refusals_an_agent_makes_as_large_as_it_can_are_all_audited_and_the_broker_lives_on() {
    use std::io::{Read, Write};
    let s = Setup::new(ADMITTED, "");
    // Each path its own, as repeats of one refusal share a row.
    let quotes = "\"".repeat(1020);
    let requests: String = (0..40)
        .map(|i| format!("GET /openai/v1/{i:02}{quotes} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
        .collect();
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", s.openai_port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(requests.as_bytes()).unwrap();
    let (mut answers, mut buf) = (String::new(), [0u8; 65536]);
    while answers.matches("HTTP/1.1 403").count() < 40 {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "the connection closed after {answers}");
        answers.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    drop(conn);
    // One peer's first 33 causes in a window get their rows at once (the 33rd standing for all
    // its further ones), the 7 after them one row with their count when the window ends.
    wait_for("40 refusals audited", Duration::from_secs(20), || {
        let rows = s.audit("broker.denied");
        let own = rows
            .iter()
            .filter(|r| detail(r).to_string().contains("\\\"\\\""))
            .count();
        let counted = rows
            .iter()
            .any(|r| detail(r)["reason"] == "many different causes" && detail(r)["repeats"] == 7);
        (own == 33 && counted).then_some(())
    });
    // The same broker process still answers.
    let (status, body) = s.chat("/v1/broker/openai/v1/chat/completions", &[]);
    assert_eq!(status, 200, "{body}");
    let log = s.daemon.as_ref().unwrap().log_text();
    assert!(!log.contains("the broker process exited"), "{log}");
}

/// The attack: a connection whose owner takes long to find (any local user can make one: a
/// socket passed in a message nobody reads is held by no process, and the daemon then walks
/// every process's descriptors). Held here by a failpoint for 5 s on the first such walk, it
/// must not hold up another agent's connection (the listener looked for owners one at a time).
#[test]
fn a_connection_whose_owner_is_slow_to_find_holds_up_no_other() {
    use std::io::{Read, Write};
    let s = Setup::with_daemon_env(
        ADMITTED,
        "",
        &[("FAILPOINTS", "attest.owner-walk=1*sleep(5000)")],
    );
    // The first connection to the listener: its owner (this process) is looked for at length.
    let mut held = std::net::TcpStream::connect(("127.0.0.1", s.openai_port)).unwrap();
    held.write_all(b"GET /openai/v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    // Another agent's request completes meanwhile, through the provider.
    let url = format!(
        "http://127.0.0.1:{}/openai/v1/chat/completions",
        s.openai_port
    );
    let (code, _) = curl_tcp(&[
        "-H",
        "content-type: application/json",
        "--data",
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
        &url,
    ]);
    assert_eq!(code, "200");
    held.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    match held.read(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the held connection was answered first: {other:?}"),
    }
    // Once its owner is found, it is served.
    held.set_nonblocking(false).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let n = held.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 403"));
}

#[test]
fn fallback_takes_the_next_route_on_429_500_and_a_refused_connection() {
    let extra = format!(
        r#"[secrets."openai/dead"]
provider = "manual"

[brokers.flaky]
preset = "openai"
secret = "openai/dead"
upstream = "https://127.0.0.1:{dead}"
ca_file = "certs/ca.pem"
fallback = [{{ secret = "openai/backup", upstream = "{{upstream}}" }}]
"#,
        dead = free_port()
    );
    let policy = ADMITTED.replace(r#""anthropic"]"#, r#""anthropic", "flaky"]"#);
    let s = Setup::new(&policy, &extra);
    for (primary, want_route) in [
        ("429", "openai/backup"),
        ("500", "openai/backup"),
        ("ok", "openai/prod"),
    ] {
        s.provider.accept(
            &[(PRIMARY, primary), (BACKUP, "ok"), (ANTHROPIC, "ok")],
            None,
        );
        let (status, body) = s.chat("/v1/broker/openai/v1/chat/completions", &["-i"]);
        assert_eq!(status, 200, "{body}");
        assert!(
            body.to_lowercase()
                .contains(&format!("x-keywarden-route: {want_route}")),
            "{primary}: {body}"
        );
    }
    // Without a route left, the agent sees the provider's own answer.
    s.provider.accept(
        &[(PRIMARY, "429"), (BACKUP, "429"), (ANTHROPIC, "ok")],
        None,
    );
    let (status, _) = s.chat("/v1/broker/openai/v1/chat/completions", &[]);
    assert_eq!(status, 429);

    // A primary whose upstream refuses connections: the fallback answers.
    s.provider
        .accept(&[(PRIMARY, "ok"), (BACKUP, "ok"), (ANTHROPIC, "ok")], None);
    s.env.put("openai/dead", "sk-dead-0000000000000000000000");
    let (status, body) = s.chat("/v1/broker/flaky/v1/chat/completions", &["-i"]);
    assert_eq!(status, 200, "{body}");
    assert!(
        body.to_lowercase()
            .contains("x-keywarden-route: openai/backup"),
        "{body}"
    );
    // The row is written once the answer has ended, with a later commit.
    let last = wait_for("the fallback's audit row", Duration::from_secs(10), || {
        let rows = s.audit("broker.request");
        rows.last().map(detail).filter(|d| d["broker"] == "flaky")
    });
    assert_eq!(last["route"], "openai/backup");
}

#[test]
fn a_rotation_during_a_stream_lets_it_finish_uses_the_new_key_next_and_revokes_the_old_after() {
    let extra = r#"{example_plugin}
[secrets."openai/rotating"]
provider = "example"
grace = "5m"

[brokers.rotating]
preset = "openai"
secret = "openai/rotating"
upstream = "{upstream}"
ca_file = "certs/ca.pem"
"#;
    let policy = ADMITTED.replace(r#""anthropic"]"#, r#""anthropic", "rotating"]"#);
    let s = Setup::new(&policy, extra);
    wait_for("the first version", Duration::from_secs(20), || {
        (s.env.entry("openai/rotating")["version"] == 1).then_some(())
    });
    let db = s.env.upstream_db();
    s.provider.accept(
        &[(PRIMARY, "ok"), (BACKUP, "ok"), (ANTHROPIC, "ok")],
        Some(&db),
    );

    // A long stream, held by the provider after its first event.
    let (stream, old) = s.held_stream("rotating");

    // Rotate: the new version is used by the very next request...
    s.env.ok(&["rotate", "openai/rotating", "--no-wait"], None);
    wait_for("version 2", Duration::from_secs(20), || {
        (s.env.entry("openai/rotating")["version"] == 2).then_some(())
    });
    let (status, body) = s.chat("/v1/broker/rotating/v1/chat/completions", &[]);
    assert_eq!(status, 200, "{body}");
    let new = s.provider.seen().last().unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new, old);
    // ...while the stream that started on the old key keeps it alive upstream.
    let active = |key: &str| {
        s.env.upstream_i64(&format!(
            "SELECT COUNT(*) FROM creds WHERE value = '{key}' AND status = 'active'"
        ))
    };
    assert_eq!(
        active(&old),
        1,
        "the old key was revoked under a stream in flight"
    );
    // An operator sees why: the broker serves version 2, version 1 drains under the stream.
    let route = || {
        let status: Value =
            serde_json::from_str(&s.env.ok(&["broker", "status", "--json"], None)).unwrap();
        status["brokers"]["rotating"]["routes"][0].clone()
    };
    let held = route();
    assert_eq!(held["serving"], 2, "{held}");
    assert_eq!(held["draining"], serde_json::json!([1]), "{held}");

    // The stream finishes, whole; only then is the old key revoked.
    std::fs::write(s.provider.state.join("release"), "").unwrap();
    let out = stream.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("streamed") && text.contains("[DONE]"),
        "{text}"
    );
    wait_for("the old key's revocation", Duration::from_secs(20), || {
        (active(&old) == 0).then_some(())
    });
    assert_eq!(active(&new), 1);
    assert_eq!(route()["draining"], serde_json::json!([]));
}

#[test]
fn a_value_put_while_the_daemon_serves_is_pushed_to_the_broker_and_audited_by_version() {
    // No request reads the key: the daemon pushes each new current version to the broker as
    // its write commits, here a person's `put`.
    let s = Setup::new(ADMITTED, "");
    let (status, body) = s.chat("/v1/broker/openai/v1/chat/completions", &[]);
    assert_eq!(status, 200, "{body}");
    const NEW: &str = "sk-put-by-a-person-4b6d8f0a2c4e6a8c";
    s.put_accepted("openai/prod", NEW);
    s.chat_until_key(NEW);
    // From then on, every request.
    for _ in 0..3 {
        let (status, body) = s.chat("/v1/broker/openai/v1/chat/completions", &[]);
        assert_eq!(status, 200, "{body}");
        assert_eq!(s.provider.seen().last().unwrap()["key"], NEW);
    }
    // Each request's row says which version answered (rows share a later commit: waited for).
    let rows = wait_for("the rows of version 2", Duration::from_secs(10), || {
        let rows = s.audit("broker.request");
        (rows.iter().filter(|r| detail(r)["version"] == 2).count() >= 3).then_some(rows)
    });
    assert_eq!(detail(&rows[0])["version"], 1);
    for row in &rows {
        assert!(!row.to_string().contains(NEW), "the key in an audit row");
    }

    // A value no header can carry is no key: the route is skipped for the fallback.
    s.env.put("openai/prod", "sk-broken\nin-two");
    s.chat_until_key(BACKUP);
}

#[test]
fn a_key_push_that_was_lost_is_made_again_without_waiting_for_another_change() {
    // The push at start goes through; the next one (the `put` below) is lost on its way.
    let s = Setup::with_daemon_env(
        ADMITTED,
        "",
        &[("FAILPOINTS", "broker.key-push=1*off->1*return->off")],
    );
    const NEW: &str = "sk-after-a-lost-push-0a1b2c3d4e5f";
    s.put_accepted("openai/prod", NEW);
    s.chat_until_key(NEW);
    let log = s.daemon.as_ref().unwrap().log_text();
    assert!(
        log.contains("the push was lost"),
        "the failpoint did not fire (a daemon built without failpoints?):\n{log}"
    );
    assert!(!log.contains(NEW), "the key in the daemon's log");
}

#[test]
fn nothing_but_the_daemon_can_push_a_key_set_the_routes_or_stop_the_broker_process() {
    // A process that reaches the broker's private socket (one of the daemon's own user) tries
    // to make the broker inject a key of its own, pinned with the highest version, so the
    // agents' requests would run on an account it controls.
    let s = Setup::new(ADMITTED, "");
    let private = s.env.broker_process_socket();
    let pinned = r#"{"keys":{"openai/prod":{"id":"x","version":9223372036854775807,"value":"sk-attacker-0000"}}}"#;
    let guessed = format!("x-keywarden-token: {}", "0".repeat(64));
    for extra in [vec![], vec!["-H", guessed.as_str()]] {
        let mut args = extra.clone();
        args.extend(["-H", "content-type: application/json", "--data", pinned]);
        let (code, body) = curl(&private, "PUT", "/v1/keys", &args);
        assert_eq!(code, 403, "{body}");
    }
    // Nor can it set the routes (and a token of its own with them): they are set once.
    let routes = format!(r#"{{"brokers":{{}},"token":"{}"}}"#, "1".repeat(64));
    let (code, body) = curl(&private, "PUT", "/v1/routes", &["--data", &routes]);
    assert_eq!(code, 409, "{body}");
    // Nor lift a block or a spent budget (the state the daemon gives), nor make the broker
    // close every agent's connection (what the daemon asks of it as it stops).
    for extra in [vec![], vec!["-H", guessed.as_str()]] {
        let mut args = extra.clone();
        args.extend(["--data", r#"{"blocked":[],"spent":[],"at":0}"#]);
        let (code, body) = curl(&private, "PUT", "/v1/state", &args);
        assert_eq!(code, 403, "{body}");
        let (code, body) = curl(&private, "POST", "/v1/finish", &extra);
        assert_eq!(code, 403, "{body}");
    }
    // The agents' requests still carry the vault's key.
    let (status, body) = s.chat("/v1/broker/openai/v1/chat/completions", &[]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(s.provider.seen().last().unwrap()["key"], PRIMARY);
}

#[test]
fn budgets_refuse_at_the_limit_with_retry_after_and_survive_a_restart() {
    let policy = r#"[[policy]]
name = "agents"
uids = [0]
brokers = ["openai", "anthropic"]
budget = { tokens_per_day = 40 }

[[policy]]
name = "metered"
uids = [0]
brokers = ["anthropic"]
"#;
    let mut s = Setup::new(policy, "");
    // 18 tokens per answer, JSON or streamed: 0 → 18 → 36 → 54, then spent.
    let (status, _) = s.chat("/v1/broker/openai/v1/chat/completions", &[]);
    assert_eq!(status, 200);
    // Streamed as the SDKs send it, without asking for usage: the broker asks on its behalf
    // (else the stream would count 0 tokens) and the agent gets no usage chunk it did not ask for.
    let streamed = r#"{"model":"m","messages":[],"stream":true}"#;
    let (status, body) = s.post("/v1/broker/openai/v1/chat/completions", streamed, &[]);
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("streamed") && body.contains("[DONE]"),
        "{body}"
    );
    assert!(!body.contains("prompt_tokens"), "{body}");
    let (status, _) = s.chat("/v1/broker/openai/v1/chat/completions", &[]);
    assert_eq!(status, 200);
    let spent = || {
        wait_for("the tokens to be counted", Duration::from_secs(10), || {
            let (status, body) = s.chat("/v1/broker/openai/v1/chat/completions", &["-i"]);
            (status == 429).then_some(body)
        })
    };
    let body = spent();
    assert!(body.to_lowercase().contains("retry-after: "), "{body}");
    assert!(body.contains("tokens_per_day"), "{body}");
    let seen = s.provider.seen().len();
    assert_eq!(seen, 3, "a refused request reached the provider");

    // The count comes back from the audit log after a restart.
    s.restart();
    let (status, body) = s.chat("/v1/broker/openai/v1/chat/completions", &[]);
    assert_eq!(status, 429, "{body}");
    assert_eq!(s.provider.seen().len(), seen);
}

#[test]
fn a_stream_the_agent_cuts_before_its_usage_still_counts_against_the_budget() {
    // OpenAI sends a stream's usage last: an agent that hangs up after the first chunk would
    // otherwise have its prompt (all of it billed) counted as nothing.
    let s = Setup::with_broker(
        "cut",
        "preset = \"openai\"\nsecret = \"openai/prod\"\nidle_timeout = \"2s\"",
        "budget = { tokens_per_day = 50 }",
    );
    let prompt = "x".repeat(300);
    let body = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"{prompt}"}}],"stream":true,"hold":true}}"#
    );
    let mut agent = Command::new("curl")
        .args(["-sN", "--unix-socket"])
        .arg(s.socket())
        .args([
            "--data",
            &body,
            "http://localhost/v1/broker/cut/v1/chat/completions",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The first chunk reached the agent; it hangs up.
    let mut first = [0u8; 5];
    std::io::Read::read_exact(agent.stdout.as_mut().unwrap(), &mut first).unwrap();
    assert_eq!(&first, b"data:");
    agent.kill().unwrap();
    agent.wait().unwrap();
    let row = s.first_request_row();
    let detail = &row["detail"];
    assert_eq!(detail["complete"], false, "{row}");
    assert!(detail["tokens_in"].is_null(), "{row}");
    // A token per 4 bytes of the request, and one per event streamed.
    let estimated = detail["tokens_estimated"].as_u64().unwrap_or(0);
    assert!(estimated > (body.len() / 4) as u64, "{row}");
    assert_eq!(detail["tokens"], estimated, "{row}");
    let (status, answer) = s.chat("/v1/broker/cut/v1/chat/completions", &[]);
    assert_eq!(status, 429, "{answer}");
    assert!(answer.contains("tokens_per_day"), "{answer}");
}

#[test]
fn an_anthropic_stream_cut_after_its_text_counts_an_output_token_per_event() {
    // Anthropic's first event says 1 output token; the real count comes in `message_delta`,
    // last. An agent that reads the text and hangs up before it must not get it for 1 token.
    let s = Setup::new(ADMITTED, "");
    let body =
        r#"{"model":"m","max_tokens":4096,"messages":[],"stream":true,"deltas":50,"hold":52}"#;
    let mut agent = Command::new("curl")
        .args(["-sN", "--unix-socket"])
        .arg(s.socket())
        .args([
            "-H",
            "anthropic-version: 2023-06-01",
            "--data",
            body,
            "http://localhost/v1/broker/anthropic/v1/messages",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(agent.stdout.take().unwrap()));
    let texts = lines
        .by_ref()
        .map(Result::unwrap)
        .take_while(|line| !line.contains("content_block_stop"))
        .filter(|line| line.contains("text_delta"))
        .count();
    assert_eq!(texts, 50);
    agent.kill().unwrap();
    agent.wait().unwrap();
    let row = s.first_request_row();
    let detail = &row["detail"];
    assert_eq!(detail["complete"], false, "{row}");
    assert_eq!(
        (detail["tokens_in"].as_u64(), detail["tokens_out"].as_u64()),
        (Some(13), Some(1))
    );
    assert!(
        detail["tokens_estimated"].as_u64().unwrap_or(0) >= 50,
        "{row}"
    );
}

#[test]
fn a_route_that_never_answered_still_counts_the_work_it_may_have_billed() {
    // The primary takes the request and never answers; after `first_byte_timeout` the backup
    // answers. The provider may bill both: counting only the answer's usage undercounts, and an
    // agent can make it happen at will with requests that take long to answer.
    let s = Setup::with_broker(
        "slow",
        "preset = \"openai\"\nsecret = \"openai/prod\"\nfallback = [\"openai/backup\"]\n\
         first_byte_timeout = \"1s\"",
        "",
    );
    s.provider
        .accept(&[(PRIMARY, "stall"), (BACKUP, "ok")], None);
    let body = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(400)
    );
    let (status, answer) = s.post("/v1/broker/slow/v1/chat/completions", &body, &[]);
    assert_eq!(status, 200, "{answer}");
    let row = s.first_request_row();
    let detail = &row["detail"];
    assert_eq!(detail["route"], "openai/backup", "{row}");
    assert_eq!(detail["tokens_in"], 11, "{row}");
    let held = body.len().div_ceil(4) as u64;
    assert_eq!(detail["tokens_estimated"], held, "{row}");
    assert_eq!(detail["tokens"], 18 + held, "{row}");
    std::fs::write(s.provider.state.join("release"), "").unwrap();
}

#[test]
fn a_request_the_agent_gives_up_on_before_its_answer_counts_its_estimate() {
    // The provider may be working on it: leaving before the answer must not make it free.
    let s = Setup::with_broker(
        "slow",
        "preset = \"openai\"\nsecret = \"openai/prod\"\nfirst_byte_timeout = \"60s\"",
        "",
    );
    s.provider.accept(&[(PRIMARY, "stall")], None);
    let body = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(400)
    );
    let (status, _) = curl(
        &s.socket(),
        "POST",
        "/v1/broker/slow/v1/chat/completions",
        &["--max-time", "1", "--data", &body],
    );
    assert_eq!(status, 0, "the agent gave up before an answer");
    let row = s.first_request_row();
    let detail = &row["detail"];
    assert_eq!(detail["status"], 0, "{row}");
    assert_eq!(detail["tokens_estimated"], body.len().div_ceil(4), "{row}");
    std::fs::write(s.provider.state.join("release"), "").unwrap();
}

#[test]
fn an_agent_that_stops_reading_its_answer_is_cut_after_the_idle_time_out() {
    // Not reading fills the socket: the answer is not polled, so nothing else would end the
    // request, which holds its connection, its budget hold and its key version meanwhile.
    let s = Setup::with_broker(
        "cut",
        "preset = \"anthropic\"\nsecret = \"anthropic/prod\"\nidle_timeout = \"2s\"",
        "",
    );
    let body = r#"{"model":"m","max_tokens":4096,"messages":[],"stream":true,"deltas":100000}"#;
    let mut agent = std::os::unix::net::UnixStream::connect(s.socket()).unwrap();
    write!(
        agent,
        "POST /v1/broker/cut/v1/messages HTTP/1.1\r\nHost: localhost\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // It reads nothing, and keeps the connection open.
    let row = s.first_request_row();
    let detail = &row["detail"];
    assert_eq!(detail["status"], 200, "{row}");
    assert_eq!(detail["complete"], false, "{row}");
    assert!(
        detail["tokens_estimated"].as_u64().unwrap_or(0) > 0,
        "{row}"
    );
    drop(agent);
}

#[test]
fn requests_started_together_cannot_each_spend_the_last_of_a_budget() {
    // Checked only against what ended, a burst sent at 0 of 30 tokens would all be admitted
    // (a harvester in the agent starting a thousand at once); one running holds its estimate.
    let policy = r#"[[policy]]
name = "agents"
uids = [0]
brokers = ["openai"]
budget = { tokens_per_day = 30 }
"#;
    let s = Setup::new(policy, "");
    let prompt = "x".repeat(100);
    let body = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"{prompt}"}}],"stream":true,"hold":true}}"#
    );
    let running = Command::new("curl")
        .args(["-sN", "--unix-socket"])
        .arg(s.socket())
        .args([
            "--data",
            &body,
            "http://localhost/v1/broker/openai/v1/chat/completions",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(
        "the provider to hold the stream",
        Duration::from_secs(10),
        || (!s.provider.seen().is_empty()).then_some(()),
    );
    let (status, answer) = s.chat("/v1/broker/openai/v1/chat/completions", &["-i"]);
    assert_eq!(status, 429, "{answer}");
    assert!(
        answer.to_lowercase().contains("retry-after: 1\r"),
        "{answer}"
    );
    assert!(answer.contains("still running"), "{answer}");
    assert_eq!(
        s.provider.seen().len(),
        1,
        "the second request reached the provider"
    );
    // The stream ends with its usage (18 tokens): what it held is let go.
    std::fs::write(s.provider.state.join("release"), "").unwrap();
    let streamed = running.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&streamed.stdout).contains("[DONE]"));
    let (status, answer) = s.chat("/v1/broker/openai/v1/chat/completions", &[]);
    assert_eq!(status, 200, "{answer}");
}

#[test]
fn requests_per_minute_refuse_exactly_at_the_limit() {
    let policy = r#"[[policy]]
name = "agents"
uids = [0]
brokers = ["openai"]
budget = { requests_per_minute = 3 }
"#;
    let s = Setup::new(policy, "");
    // Three in one minute: start early enough in a minute to finish within it.
    wait_for("the start of a minute", Duration::from_secs(61), || {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        (secs % 60 < 45).then_some(())
    });
    for _ in 0..3 {
        let (status, body) = s.chat("/v1/broker/openai/v1/chat/completions", &[]);
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = s.chat("/v1/broker/openai/v1/chat/completions", &["-i"]);
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("requests_per_minute"), "{body}");
}

#[test]
fn peers_no_policy_admits_are_refused_and_audited_over_the_socket_and_tcp() {
    let s = Setup::new(ADMITTED, "");
    let as_nobody = |args: &[String]| -> (u16, String) {
        let out = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "curl",
                "-s",
            ])
            .args(["-w", "\n%{http_code}"])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    };
    let data = r#"{"model":"m","messages":[]}"#.to_string();
    let (status, body) = as_nobody(&[
        "--unix-socket".into(),
        s.socket().display().to_string(),
        "--data".into(),
        data.clone(),
        "http://localhost/v1/broker/openai/v1/chat/completions".into(),
    ]);
    assert_eq!(status, 403, "{body}");
    let (status, body) = as_nobody(&[
        "--data".into(),
        data,
        format!(
            "http://127.0.0.1:{}/openai/v1/chat/completions",
            s.openai_port
        ),
    ]);
    assert_eq!(status, 403, "{body}");
    assert!(s.provider.seen().is_empty());
    wait_for("the refusals' audit row", Duration::from_secs(10), || {
        s.audit("broker.denied")
            .iter()
            .any(|r| r["actor"].as_str().unwrap().contains("uid=65534"))
            .then_some(())
    });
    // The admitted user over TCP is served.
    let url = format!(
        "http://127.0.0.1:{}/openai/v1/chat/completions",
        s.openai_port
    );
    let (code, _) = curl_tcp(&["--data", r#"{"model":"m","messages":[]}"#, &url]);
    assert_eq!(code, "200");
}

#[test]
fn a_blocked_broker_refuses_at_once_and_stays_blocked_across_a_restart() {
    let mut s = Setup::new(ADMITTED, "");
    s.env.ok(&["broker", "block", "openai"], None);
    let (status, body) = s.chat("/v1/broker/openai/v1/chat/completions", &[]);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("blocked"), "{body}");
    s.restart();
    let (status, _) = s.chat("/v1/broker/openai/v1/chat/completions", &[]);
    assert_eq!(status, 503);
    s.env.ok(&["broker", "unblock", "openai"], None);
    let (status, _) = s.chat("/v1/broker/openai/v1/chat/completions", &[]);
    assert_eq!(status, 200);
    assert_eq!(s.provider.seen().len(), 1);
}

/// SQLite's write lock on a store, held by another process (Python's `sqlite3`, in a
/// transaction begun with `BEGIN IMMEDIATE`) until dropped.
struct WriteLock(Child);

impl WriteLock {
    fn take(store: &Path) -> WriteLock {
        let mut child = Command::new("python3")
            .args([
                "-c",
                "import sqlite3, sys\n\
                 db = sqlite3.connect(sys.argv[1], isolation_level=None)\n\
                 db.execute('BEGIN IMMEDIATE')\n\
                 print('locked', flush=True)\n\
                 sys.stdin.read()",
            ])
            .arg(store)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "locked");
        WriteLock(child)
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        // Its standard input closes: it reads the end, exits, and the transaction is gone.
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

#[test]
fn requests_the_audit_log_cannot_record_are_kept_and_new_ones_refused_until_it_can() {
    let s = Setup::new(ADMITTED, "");
    let chat = || s.chat("/v1/broker/openai/v1/chat/completions", &[]);
    // Another process holds SQLite's write lock: no audit row can be committed.
    let locker = WriteLock::take(&s.env.store);
    // Until the daemon finds its rows refused, requests are served and their rows wait; then
    // the broker forwards nothing more.
    let refused = wait_for("requests refused", Duration::from_secs(60), || {
        let (status, body) = chat();
        (status == 503).then_some(body)
    });
    assert!(refused.contains("cannot write its audit log"), "{refused}");
    let (status, head) = s.chat(
        "/v1/broker/openai/v1/chat/completions",
        &["-D", "-", "-o", "/dev/null"],
    );
    assert_eq!(status, 503);
    assert!(head.to_lowercase().contains("retry-after: 1"), "{head}");
    let forwarded = s.provider.seen().len();
    assert!(forwarded > 0);
    let status: Value = serde_json::from_str(&s.env.ok(&["status", "--json"], None)).unwrap();
    assert!(
        status["store"]["brokered_rows_waiting"].as_u64() > Some(0),
        "{status}"
    );
    let text = s.env.ok(&["status"], None);
    assert!(text.contains("BROKERED REQUESTS REFUSED"), "{text}");
    let (_, metrics) = curl(&s.env.admin_socket(), "GET", "/metrics", &[]);
    assert!(
        metrics.contains("keywarden_store_writes_failing 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("keywarden_audit_rows_waiting 0"),
        "{metrics}"
    );
    assert_eq!(chat().0, 503);
    assert_eq!(s.provider.seen().len(), forwarded);

    // The lock goes: the rows that waited are written, and requests are served again.
    drop(locker);
    wait_for("requests served again", Duration::from_secs(30), || {
        (chat().0 == 200).then_some(())
    });
    let forwarded = s.provider.seen().len();
    wait_for(
        "a row for every forwarded request",
        Duration::from_secs(10),
        || (s.audit("broker.request").len() == forwarded).then_some(()),
    );
    let log = s.daemon.as_ref().unwrap().log_text();
    assert!(log.contains("brokered requests are refused until the audit log takes their rows"));
}

#[test]
fn a_request_the_agent_abandons_or_a_stop_cuts_still_has_its_audit_row() {
    let mut s = Setup::new(ADMITTED, "");
    let rows = |s: &Setup| -> Vec<Value> { s.audit("broker.request").iter().map(detail).collect() };
    // The agent gives up while the provider has not answered: forwarded, so recorded, with no
    // status (no answer reached the agent).
    s.provider.accept(
        &[(PRIMARY, "stall"), (BACKUP, "ok"), (ANTHROPIC, "ok")],
        None,
    );
    let (status, _) = s.chat(
        "/v1/broker/openai/v1/chat/completions",
        &["--max-time", "1"],
    );
    assert_eq!(status, 0);
    let abandoned = wait_for(
        "the abandoned request's row",
        Duration::from_secs(10),
        || rows(&s).into_iter().find(|r| r["status"] == 0),
    );
    assert_eq!(abandoned["complete"], false, "{abandoned}");
    assert_eq!(abandoned["path"], "/v1/chat/completions", "{abandoned}");

    // A stream still running FINISH_AT_MOST into a stop is cut, and recorded as incomplete.
    s.provider
        .accept(&[(PRIMARY, "ok"), (BACKUP, "ok"), (ANTHROPIC, "ok")], None);
    let (stream, _) = s.held_stream("openai");
    assert_eq!(s.daemon.take().unwrap().terminate(), Some(0));
    let out = stream.wait_with_output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("[DONE]"));
    let cut: Vec<Value> = rows(&s)
        .into_iter()
        .filter(|r| r["status"] == 200 && r["complete"] == false)
        .collect();
    assert_eq!(cut.len(), 1, "{cut:?}");
    s.env.ok(&["audit", "verify"], None);
}

#[test]
fn the_broker_runs_confined_as_its_own_user_and_exits_with_the_daemon() {
    let mut s = Setup::new(ADMITTED, "");
    let daemon_pid = s.daemon.as_ref().unwrap().pid();
    let broker_pid = |parent: u32| {
        std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let ppid = status.lines().find_map(|l| l.strip_prefix("PPid:"))?.trim();
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
            (ppid == parent.to_string() && exe.file_name()? == "keywarden-broker")
                .then_some((pid, status))
        })
    };
    let (pid, status) = broker_pid(daemon_pid).expect("a keywarden-broker child of the daemon");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Seccomp:"), "2");
    if rustix_is_root() {
        assert_eq!(field("Uid:"), "65534", "the broker must not run as root");
    }
    // It holds no key in its environment.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(!String::from_utf8_lossy(&environ).contains("sk-"));
    // Killed, it is started again and serves, with the key put while it was down.
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    const NEW: &str = "sk-put-while-the-broker-was-down-9f8e";
    s.put_accepted("openai/prod", NEW);
    let (restarted, _) = wait_for("a new broker process", Duration::from_secs(20), || {
        broker_pid(daemon_pid).filter(|(p, _)| *p != pid)
    });
    let (status, body) = wait_for("the broker to serve again", Duration::from_secs(20), || {
        let answer = s.chat("/v1/broker/openai/v1/chat/completions", &[]);
        (answer.0 == 200).then_some(answer)
    });
    assert_eq!(status, 200, "{body}");
    s.chat_until_key(NEW);
    // When the daemon dies, even by SIGKILL, the broker exits: its attach connection closed.
    s.daemon.take().unwrap().kill9();
    wait_for("the broker to exit", Duration::from_secs(20), || {
        let state = std::fs::read_to_string(format!("/proc/{restarted}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting for its new parent to reap it.
        (state.is_empty() || state.contains(") Z ")).then_some(())
    });
}

fn rustix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

#[test]
fn a_stalled_or_untrusted_upstream_fails_and_an_oversized_body_never_leaves() {
    let extra = r#"[brokers.strict]
preset = "openai"
secret = "openai/prod"
upstream = "{upstream}"
ca_file = "certs/ca.pem"
first_byte_timeout = "1s"
idle_timeout = "2s"
max_body_bytes = 1024

[brokers.untrusted]
preset = "openai"
secret = "openai/prod"
upstream = "{upstream}"
"#;
    let policy = ADMITTED.replace(r#""anthropic"]"#, r#""anthropic", "strict", "untrusted"]"#);
    let s = Setup::new(&policy, extra);
    let big = format!(
        r#"{{"model":"m","messages":[],"pad":"{}"}}"#,
        "x".repeat(2000)
    );
    let (status, body) = s.post("/v1/broker/strict/v1/chat/completions", &big, &[]);
    assert_eq!(status, 413, "{body}");
    assert!(s.provider.seen().is_empty());

    s.provider.accept(
        &[(PRIMARY, "stall"), (BACKUP, "ok"), (ANTHROPIC, "ok")],
        None,
    );
    let (status, body) = s.chat("/v1/broker/strict/v1/chat/completions", &[]);
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("no answer within"), "{body}");

    // A stream that goes silent after its first event is cut after idle_timeout, and its audit
    // row says the answer was not delivered whole.
    s.provider.accept(
        &[(PRIMARY, "hold"), (BACKUP, "ok"), (ANTHROPIC, "ok")],
        None,
    );
    let (_, body) = s.post(
        "/v1/broker/strict/v1/chat/completions",
        r#"{"model":"m","messages":[],"stream":true}"#,
        &[],
    );
    assert!(
        body.contains("hello ") && !body.contains("[DONE]"),
        "{body}"
    );
    let row = wait_for(
        "the cut stream's audit row",
        Duration::from_secs(10),
        || {
            s.audit("broker.request")
                .into_iter()
                .map(|r| detail(&r))
                .find(|d| d["complete"] == false)
        },
    );
    assert_eq!(row["broker"], "strict");

    // A redirect is passed to the agent, never followed with the key.
    s.provider.accept(
        &[(PRIMARY, "redirect"), (BACKUP, "ok"), (ANTHROPIC, "ok")],
        None,
    );
    let before = s.provider.seen().len();
    let (status, _) = s.chat("/v1/broker/strict/v1/chat/completions", &[]);
    assert_eq!(status, 307);
    assert_eq!(s.provider.seen().len(), before + 1);

    // An upstream whose certificate no trusted root signed (the private CA is not configured
    // for this broker) gets no request, so never the key.
    let (status, body) = s.chat("/v1/broker/untrusted/v1/chat/completions", &[]);
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("certificate"), "{body}");
    assert_eq!(s.provider.seen().len(), before + 1);
    std::fs::write(s.provider.state.join("release"), "").unwrap();
}

#[test]
fn gemini_and_azure_openai_get_the_key_in_their_own_header_and_their_usage_is_counted() {
    const GEMINI: &str = "AIzaSy-fake-gemini-key-0a1b2c3d4e5f";
    const AZURE: &str = "azure-fake-key-9f8e7d6c5b4a39281706";
    let s = Setup::new(
        r#"[[policy]]
name = "agents"
uids = [0]
brokers = ["gemini", "azure"]
"#,
        r#"
[secrets."gemini/prod"]
provider = "manual"
[secrets."azure/prod"]
provider = "manual"

[brokers.gemini]
preset = "gemini"
secret = "gemini/prod"
upstream = "{upstream}"
ca_file = {ca}

[brokers.azure]
preset = "azure-openai"
secret = "azure/prod"
upstream = "{upstream}"
ca_file = {ca}
"#,
    );
    s.env.put("gemini/prod", GEMINI);
    s.env.put("azure/prod", AZURE);
    s.provider.accept(&[(GEMINI, "ok"), (AZURE, "ok")], None);
    let gemini_body = r#"{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}"#;
    let placeholder = [
        "-H",
        "x-goog-api-key: placeholder",
        "-H",
        "api-key: placeholder",
    ];
    let (code, body) = s.post(
        "/v1/broker/gemini/v1beta/models/gemini-2.0-flash:generateContent",
        gemini_body,
        &placeholder,
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("hello from fake"), "{body}");
    // Google's system parameters and headers that would cut the usage out of the answer, or
    // bill another project, are dropped.
    let mut cut_usage = placeholder.to_vec();
    cut_usage.extend([
        "-H",
        "X-Goog-FieldMask: candidates",
        "-H",
        "X-Goog-User-Project: someone-else",
    ]);
    let (code, body) = s.post(
        "/v1/broker/gemini/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse&fields=candidates&$fields=candidates&$alt=proto",
        gemini_body,
        &cut_usage,
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("streamed"), "{body}");
    let (code, body) = s.chat(
        "/v1/broker/azure/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
        &placeholder,
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("hello from fake"), "{body}");
    // A path outside the preset never reaches the provider.
    let (code, _) = s.chat("/v1/broker/azure/openai/files", &placeholder);
    assert_eq!(code, 403);

    // Each request carried the stored key in the preset's header, and nothing the agent set.
    let seen = s.provider.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(
        seen[1]["path"],
        "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"
    );
    for dropped in ["x-goog-fieldmask", "x-goog-user-project"] {
        assert!(seen[1]["headers"].get(dropped).is_none(), "{}", seen[1]);
    }
    for (request, header, key) in [
        (&seen[0], "x-goog-api-key", GEMINI),
        (&seen[1], "x-goog-api-key", GEMINI),
        (&seen[2], "api-key", AZURE),
    ] {
        assert_eq!(request["key_header"], header, "{request}");
        assert_eq!(request["key"], key, "{request}");
        let headers = request["headers"].to_string();
        assert!(!headers.contains("placeholder"), "{headers}");
        assert!(
            request["headers"].get("authorization").is_none(),
            "{headers}"
        );
    }
    // Usage: Gemini's usageMetadata (the stream's last, cumulative count), Azure's usage.
    let tokens: Vec<i64> = wait_for("the audit rows", Duration::from_secs(10), || {
        let rows = s.audit("broker.request");
        (rows.len() >= 3).then(|| {
            rows.iter()
                .map(|r| detail(r)["tokens"].as_i64().unwrap_or(-1))
                .collect()
        })
    });
    assert!(tokens.starts_with(&[10, 10, 18]), "{tokens:?}");
    // Gemini's stream without `alt=sse` is one JSON array of chunks: counted too.
    let (code, body) = s.post(
        "/v1/broker/gemini/v1beta/models/gemini-2.0-flash:streamGenerateContent",
        gemini_body,
        &placeholder,
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with('[') && body.contains("streamed"), "{body}");
    wait_for("the array's tokens", Duration::from_secs(10), || {
        let rows = s.audit("broker.request");
        (rows.len() >= 4).then(|| assert_eq!(detail(&rows[3])["tokens"], 10, "{}", rows[3]))
    });
    for key in [GEMINI, AZURE] {
        let log = s.daemon.as_ref().unwrap().log_text();
        assert!(!log.contains(key));
    }
}

#[test]
fn a_reload_neither_refuses_nor_fails_a_brokered_request() {
    // The broker socket and the loopback listeners stay open while SIGHUP restarts the
    // services: agents asking throughout get every answer, and no connection is refused.
    let s = Setup::new(ADMITTED, "");
    let daemon = s.daemon.as_ref().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let running =
        |stop: &std::sync::atomic::AtomicBool| !stop.load(std::sync::atomic::Ordering::Relaxed);
    let requests = {
        let (stop, socket) = (stop.clone(), s.socket());
        std::thread::spawn(move || {
            let (mut answered, mut failed) = (0, Vec::new());
            while running(&stop) {
                let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
                let args = ["-H", "content-type: application/json", "--data", body];
                match curl(
                    &socket,
                    "POST",
                    "/v1/broker/openai/v1/chat/completions",
                    &args,
                ) {
                    (200, _) => answered += 1,
                    (code, body) => failed.push(format!("{code} {body}")),
                }
            }
            (answered, failed)
        })
    };
    let over_tcp = {
        let (stop, port) = (stop.clone(), s.openai_port);
        std::thread::spawn(move || {
            let url = format!("http://127.0.0.1:{port}/v1/broker/openai/v1/chat/completions");
            let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
            let (mut answered, mut failed) = (0, Vec::new());
            while running(&stop) {
                let args = ["--data", body, "-H", "content-type: application/json", &url];
                match curl_tcp(&args) {
                    (code, _) if code == "200" => answered += 1,
                    (code, exit) => failed.push(format!("{code} (curl exit {exit:?})")),
                }
            }
            (answered, failed)
        })
    };
    // Connections alone, every millisecond: a listener closed for a moment refuses them.
    let connects = keywarden_testkit::connect_every_millisecond(s.openai_port, stop.clone());
    daemon.reload();
    let served_before = s.provider.seen().len();
    wait_for("requests after the reload", Duration::from_secs(30), || {
        (s.provider.seen().len() > served_before + 3).then_some(())
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (made, refused) = connects.join().unwrap();
    assert_eq!(
        refused, 0,
        "connections refused across the reload ({made} made)"
    );
    for (path, client) in [("the socket", requests), ("TCP", over_tcp)] {
        let (answered, failed) = client.join().unwrap();
        assert!(answered > 0, "nothing answered over {path}");
        assert!(
            failed.is_empty(),
            "failed over {path} across the reload: {failed:?}"
        );
    }
}

#[test]
fn a_reload_lets_a_stream_finish_and_ends_connections_admitted_under_the_old_policies() {
    let s = Setup::new(ADMITTED, "");
    // A stream the provider holds after its first event, in flight across the reload.
    let (stream, _) = s.held_stream("openai");
    // A keep-alive connection, admitted to `openai` under the policy of the time.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let socket = s.socket();
    let mut sender = runtime.block_on(async {
        let io = tokio::net::UnixStream::connect(&socket).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
                .await
                .unwrap();
        tokio::spawn(conn);
        sender
    });
    let ask = |sender: &mut hyper::client::conn::http1::SendRequest<_>| {
        runtime.block_on(async {
            sender.ready().await.map_err(|e| e.to_string())?;
            let answer = sender
                .send_request(
                    hyper::Request::post("/v1/broker/openai/v1/chat/completions")
                        .header("host", "localhost")
                        .header("content-type", "application/json")
                        .body(http_body_util::Full::new(bytes::Bytes::from_static(
                            br#"{"model":"m","messages":[]}"#,
                        )))
                        .unwrap(),
                )
                .await
                .map_err(|e| e.to_string())?;
            let status = answer.status().as_u16();
            http_body_util::BodyExt::collect(answer.into_body())
                .await
                .map_err(|e| e.to_string())?;
            Ok::<u16, String>(status)
        })
    };
    assert_eq!(ask(&mut sender), Ok(200));

    // The reload takes `openai` out of the policy.
    let text = std::fs::read_to_string(&s.env.config).unwrap();
    std::fs::write(
        &s.env.config,
        text.replace(
            r#"brokers = ["openai", "anthropic"]"#,
            r#"brokers = ["anthropic"]"#,
        ),
    )
    .unwrap();
    let daemon = s.daemon.as_ref().unwrap();
    std::thread::scope(|scope| {
        let reloaded = scope.spawn(|| daemon.reload());
        // The stopping run lets the stream finish: released only once the run is stopping.
        wait_for("the stop of the run", Duration::from_secs(20), || {
            daemon
                .log_text()
                .contains("letting requests in flight finish")
                .then_some(())
        });
        std::fs::write(s.provider.state.join("release"), "").unwrap();
        reloaded.join().unwrap();
    });
    let out = stream.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("streamed") && text.contains("[DONE]"),
        "the stream was cut by the reload: {text}"
    );
    // The connection admitted under the old policy is gone with it...
    let after = ask(&mut sender);
    assert!(after.is_err(), "{after:?}");
    // ...and a new one is decided under the new policy.
    let (status, body) = s.chat("/v1/broker/openai/v1/chat/completions", &[]);
    assert_eq!(status, 403, "{body}");
    let (status, body) = s.chat("/v1/broker/anthropic/v1/messages", &[]);
    assert_eq!(status, 200, "{body}");
}

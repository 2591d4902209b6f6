//! The AWS plugin through the real daemon against a moto server (`KEYWARDEN_TEST_AWS_ENDPOINT`),
//! checked from outside with AWS SDK calls.
//!
//! moto checks credentials here, so "the old key no longer works" means something: the first
//! process to get here resets moto's no-auth allowance to three calls (`/moto-api/reset-auth`),
//! spends them creating an allow-all admin user and its key, and signs everything after that with
//! that key. Names carry a random suffix, so runs against a long-lived moto do not collide.
//!
//! Crashes mid-rotation are staged with [`Gate`], a TCP proxy between the plugin and moto that
//! lets one chosen call reach AWS and swallows its reply: the daemon is killed while it waits,
//! after the upstream change and before it could record it.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::Credentials;
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_smithy_types::date_time::Format;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use keywarden_testkit::daemon::{Daemon, base_config, sha256_of, wait_for};
use keywarden_testkit::{Env, curl, keywarden_bin};
use serde_json::Value;

const REGION: &str = "us-east-1";

// ---- moto and the SDK ------------------------------------------------------------------------

/// The moto endpoint. Without one the tests are ignored at build time (`build.rs`), except
/// under CI, where a missing server is a failure.
fn endpoint() -> String {
    match std::env::var("KEYWARDEN_TEST_AWS_ENDPOINT") {
        Ok(url) if !url.is_empty() => url.trim_end_matches('/').to_string(),
        _ => {
            panic!("KEYWARDEN_TEST_AWS_ENDPOINT must be set under CI (a moto server; see .ci/run)")
        }
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    })
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

/// An access key (with a session token for STS credentials).
#[derive(Clone)]
struct Key {
    id: String,
    secret: String,
    session: Option<String>,
}

fn http_client() -> aws_smithy_runtime_api::client::http::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

/// SDK configuration for moto, with credentials from `credentials`.
fn sdk_config_from(endpoint: &str, credentials: SharedCredentialsProvider) -> SdkConfig {
    SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(endpoint)
        .http_client(http_client())
        .credentials_provider(credentials)
        .build()
}

fn sdk_config(endpoint: &str, key: &Key) -> SdkConfig {
    let credentials = Credentials::new(&key.id, &key.secret, key.session.clone(), None, "test");
    sdk_config_from(endpoint, SharedCredentialsProvider::new(credentials))
}

/// The ARN `key` signs as, or AWS's error code.
fn caller_arn(endpoint: &str, key: &Key) -> Result<String, String> {
    let sts = aws_sdk_sts::Client::new(&sdk_config(endpoint, key));
    block_on(sts.get_caller_identity().send())
        .map(|out| out.arn().unwrap_or_default().to_string())
        .map_err(|e| {
            // moto wraps STS errors in <Errors>, which the SDK's parser does not read.
            let body = e
                .raw_response()
                .and_then(|r| r.body().bytes())
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            let from_body = body
                .split_once("<Code>")
                .and_then(|(_, rest)| rest.split_once("</Code>"))
                .map(|(code, _)| code.to_string());
            e.code()
                .map(str::to_string)
                .or(from_body)
                .unwrap_or_else(|| format!("{e:?}"))
        })
}

/// moto with an admin key that everything after the bootstrap is signed with.
struct Moto {
    endpoint: String,
    admin: Key,
    iam: aws_sdk_iam::Client,
    sm: aws_sdk_secretsmanager::Client,
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid_like()[..12])
}

fn uuid_like() -> String {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut bytes)
        .unwrap();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const ALLOW_ALL: &str =
    r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}"#;

fn moto() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(|| {
        let endpoint = endpoint();
        // Three unauthenticated calls, then moto checks every signature and policy.
        let reset = Command::new("curl")
            .args([
                "-fsS",
                "-X",
                "POST",
                "-H",
                "Content-Type: text/plain",
                "--data",
                "3",
            ])
            .arg(format!("{endpoint}/moto-api/reset-auth"))
            .output()
            .expect("curl");
        assert!(reset.status.success(), "moto reset-auth failed: {reset:?}");
        let anyone = Key {
            id: "AKIDBOOTSTRAP000000".into(),
            secret: "bootstrap".into(),
            session: None,
        };
        let iam = aws_sdk_iam::Client::new(&sdk_config(&endpoint, &anyone));
        let user = unique("kw-test-admin");
        block_on(iam.create_user().user_name(&user).send()).expect("CreateUser");
        block_on(
            iam.put_user_policy()
                .user_name(&user)
                .policy_name("allow-all")
                .policy_document(ALLOW_ALL)
                .send(),
        )
        .expect("PutUserPolicy");
        let created =
            block_on(iam.create_access_key().user_name(&user).send()).expect("CreateAccessKey");
        let key = created.access_key().unwrap();
        let admin = Key {
            id: key.access_key_id().into(),
            secret: key.secret_access_key().into(),
            session: None,
        };
        // From here on, an unknown key is refused.
        assert_eq!(
            caller_arn(&endpoint, &anyone),
            Err("InvalidClientTokenId".to_string()),
            "moto does not check credentials"
        );
        let config = sdk_config(&endpoint, &admin);
        Moto {
            iam: aws_sdk_iam::Client::new(&config),
            sm: aws_sdk_secretsmanager::Client::new(&config),
            endpoint,
            admin,
        }
    })
}

impl Moto {
    /// A new IAM user with an allow-all inline policy.
    fn user(&self, prefix: &str) -> String {
        let user = unique(prefix);
        block_on(self.iam.create_user().user_name(&user).send()).expect("CreateUser");
        block_on(
            self.iam
                .put_user_policy()
                .user_name(&user)
                .policy_name("allow-all")
                .policy_document(ALLOW_ALL)
                .send(),
        )
        .expect("PutUserPolicy");
        user
    }

    fn create_key(&self, user: &str) -> Key {
        let out =
            block_on(self.iam.create_access_key().user_name(user).send()).expect("CreateAccessKey");
        let key = out.access_key().unwrap();
        Key {
            id: key.access_key_id().into(),
            secret: key.secret_access_key().into(),
            session: None,
        }
    }

    /// The user's access key ids.
    fn keys(&self, user: &str) -> Vec<String> {
        let out =
            block_on(self.iam.list_access_keys().user_name(user).send()).expect("ListAccessKeys");
        let mut ids: Vec<String> = out
            .access_key_metadata()
            .iter()
            .filter_map(|k| k.access_key_id().map(str::to_string))
            .collect();
        ids.sort();
        ids
    }

    fn user_arn(&self, user: &str) -> String {
        let out = block_on(self.iam.get_user().user_name(user).send()).expect("GetUser");
        out.user().unwrap().arn().to_string()
    }

    /// Version id → sorted staging labels, for versions that carry any.
    fn stages(&self, secret_id: &str) -> std::collections::BTreeMap<String, Vec<String>> {
        let out = block_on(self.sm.describe_secret().secret_id(secret_id).send())
            .expect("DescribeSecret");
        out.version_ids_to_stages()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, labels)| !labels.is_empty())
            .map(|(v, mut labels)| {
                labels.sort();
                (v, labels)
            })
            .collect()
    }

    /// The value AWS serves under a stage (read with an explicit stage: see the moto note in
    /// the README).
    fn value_at(&self, secret_id: &str, stage: &str) -> String {
        let out = block_on(
            self.sm
                .get_secret_value()
                .secret_id(secret_id)
                .version_stage(stage)
                .send(),
        )
        .expect("GetSecretValue");
        out.secret_string().unwrap().to_string()
    }
}

// ---- keywarden -------------------------------------------------------------------------------

fn plugin_config() -> String {
    let bin = Path::new(env!("CARGO_BIN_EXE_keywarden-plugin-aws"));
    format!(
        "[plugins.aws]\ncommand = [{:?}]\nsha256 = \"{}\"\n",
        bin.display().to_string(),
        sha256_of(bin)
    )
}

/// A store with the plugin pinned, `admin` stored as `aws/admin`, and `secrets` declared; the
/// `keywarden` CLI may fetch every secret over the socket.
fn env_with(admin: &Key, secrets: &str) -> Env {
    let env = Env::new();
    let base = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        format!(
            "{base}\n{}\n{}\n{secrets}\n\n[[policy]]\nname = \"cli\"\nexe = [{:?}]\nsecrets = [\"**\"]\n",
            base_config("20s"),
            plugin_config(),
            keywarden_bin().display().to_string()
        ),
    )
    .unwrap();
    env.ok(&["init"], None);
    put_key(&env, "aws/admin", admin);
    env
}

fn put_key(env: &Env, name: &str, key: &Key) {
    let meta = format!("access_key_id={}", key.id);
    env.ok(&["put", name, "--meta", &meta], Some(key.secret.as_bytes()));
}

/// A secret's grace (none: the tests' own fetches hold leases on the old version) and its
/// settings: region, endpoint and `extra`.
fn settings(endpoint: &str, extra: &str) -> String {
    format!(
        "grace = \"0s\"\nsettings = {{ region = \"{REGION}\", endpoint_url = \"{endpoint}\"{extra} }}"
    )
}

/// `rotate NAME --json`, then waits until the rotation is done.
fn rotate(env: &Env, name: &str) -> Value {
    let out = env.run(&["rotate", name, "--json"], None);
    let result: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert_eq!(
        out.status.code(),
        Some(0),
        "rotate {name}: {result} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `rotate` returns once the old version is draining behind leases (these tests' fetches).
    wait_done(env, name, result["to_version"].as_i64().unwrap());
    result
}

/// `get NAME --json`.
fn get(env: &Env, name: &str) -> Value {
    serde_json::from_str(&env.ok(&["get", name, "--json"], None)).unwrap()
}

/// The key keywarden holds as current for `name`.
fn current_key(env: &Env, name: &str) -> Key {
    let v = get(env, name);
    Key {
        id: v["meta"]["access_key_id"].as_str().unwrap().into(),
        secret: v["value"].as_str().unwrap().into(),
        session: None,
    }
}

/// Waits until the latest rotation of `name` is done at `version`.
fn wait_done(env: &Env, name: &str, version: i64) {
    wait_for(
        &format!("{name} to reach version {version}"),
        Duration::from_secs(30),
        || {
            let e = env.entry(name);
            (e["version"] == version && e["rotation_state"] == "done").then_some(())
        },
    );
}

// ---- a proxy that drops one reply -----------------------------------------------------------

/// A TCP proxy to moto. Armed with a byte pattern, it forwards the first request that contains
/// it, swallows the reply and holds the client's connection until [`Gate::cut`].
struct Gate {
    port: u16,
    shared: Arc<GateShared>,
}

#[derive(Default)]
struct GateShared {
    armed: Mutex<Option<Vec<u8>>>,
    tripped: Mutex<bool>,
    tripped_cv: Condvar,
    held: Mutex<Vec<TcpStream>>,
}

impl Gate {
    fn new(upstream: &str) -> Gate {
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(GateShared::default());
        let accept_shared = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let shared = accept_shared.clone();
                let swallow = Arc::new(AtomicBool::new(false));
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (shared_up, swallow_up) = (shared.clone(), swallow.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = c_in.read(&mut buf) {
                        let mut armed = shared_up.armed.lock().unwrap();
                        if armed
                            .as_ref()
                            .is_some_and(|p| buf[..n].windows(p.len()).any(|w| w == &p[..]))
                        {
                            *armed = None;
                            swallow_up.store(true, Ordering::SeqCst);
                        }
                        drop(armed);
                        if s_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s_out.shutdown(Shutdown::Write);
                });
                let (mut s_in, mut c_out) = (server, client);
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = s_in.read(&mut buf) {
                        if swallow.load(Ordering::SeqCst) {
                            shared.held.lock().unwrap().push(c_out);
                            *shared.tripped.lock().unwrap() = true;
                            shared.tripped_cv.notify_all();
                            return;
                        }
                        if c_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = c_out.shutdown(Shutdown::Write);
                });
            }
        });
        Gate { port, shared }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Swallows the reply to the next request containing `pattern`.
    fn arm(&self, pattern: &str) {
        *self.shared.tripped.lock().unwrap() = false;
        *self.shared.armed.lock().unwrap() = Some(pattern.as_bytes().to_vec());
    }

    /// Waits until an armed request reached moto and its reply was swallowed.
    fn wait_tripped(&self) {
        let tripped = self.shared.tripped.lock().unwrap();
        let (tripped, timeout) = self
            .shared
            .tripped_cv
            .wait_timeout_while(tripped, Duration::from_secs(30), |t| !*t)
            .unwrap();
        assert!(!timeout.timed_out() && *tripped, "the gate never tripped");
    }

    /// Closes the held connections (the orphaned plugin sees an error and exits).
    fn cut(&self) {
        for stream in self.shared.held.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

/// IAM returns policy documents percent-encoded.
fn url_decode(text: &str) -> String {
    let mut out = Vec::new();
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex: String = bytes.by_ref().take(2).map(char::from).collect();
            out.push(u8::from_str_radix(&hex, 16).expect("percent-encoding"));
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).unwrap()
}

/// How many plugin processes of `env` run (their working directory is under its directory).
fn plugins_running(env: &Env) -> usize {
    let dir = env.dir.path().canonicalize().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let p = e.path();
            std::fs::read_link(p.join("exe")).is_ok_and(|exe| exe.ends_with("keywarden-plugin-aws"))
                && std::fs::read_link(p.join("cwd")).is_ok_and(|cwd| cwd.starts_with(&dir))
        })
        .count()
}

/// Kills the daemon while its plugin waits on the gate, and waits until the plugin is gone too:
/// it sees stdin close and must exit at once, abandoning the call in flight (an SDK retry after
/// [`Gate::cut`] would otherwise create a key nobody records).
fn crash(env: &Env, daemon: Daemon, cli: Option<std::process::Child>) {
    assert_eq!(plugins_running(env), 1, "the plugin is waiting on the gate");
    daemon.kill9();
    if let Some(mut cli) = cli {
        let _ = cli.wait();
    }
    wait_for(
        "the orphaned plugin to exit",
        Duration::from_secs(10),
        || (plugins_running(env) == 0).then_some(()),
    );
}

/// Starts `keywarden rotate NAME` in the background (it fails when the daemon is killed).
fn rotate_in_background(env: &Env, name: &str) -> std::process::Child {
    let mut cmd = env.cmd();
    cmd.args(["rotate", name])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd.spawn().unwrap()
}

// ---- aws-iam ---------------------------------------------------------------------------------

#[test]
#[cfg_attr(
    no_moto,
    ignore = "needs a moto server: set KEYWARDEN_TEST_AWS_ENDPOINT (.ci/run does)"
)]
fn iam_rotations_replace_the_key_and_delete_the_old_one() {
    let moto = moto();
    let user = moto.user("kw-ci");
    let first = moto.create_key(&user);
    let env = env_with(
        &moto.admin,
        &format!(
            "[secrets.\"aws/ci\"]\nprovider = \"aws-iam\"\ncredentials = {{ admin = \"aws/admin\" }}\n{}\n",
            settings(&moto.endpoint, &format!(", user_name = \"{user}\""))
        ),
    );
    put_key(&env, "aws/ci", &first);
    let daemon = env.start_daemon();

    // Watch the user's key count from outside while rotating.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, user) = (stop.clone(), user.clone());
        std::thread::spawn(move || {
            let mut most = 0;
            while !stop.load(Ordering::SeqCst) {
                most = most.max(moto.keys(&user).len());
            }
            most
        })
    };
    let user_arn = moto.user_arn(&user);
    let mut secrets = vec![moto.admin.secret.clone(), first.secret.clone()];
    let mut old = first;
    for round in 2..=4 {
        let result = rotate(&env, "aws/ci");
        assert_eq!(result["to_version"], round, "{result}");
        let new = current_key(&env, "aws/ci");
        assert_ne!(new.id, old.id);
        assert_eq!(moto.keys(&user), vec![new.id.clone()], "round {round}");
        assert_eq!(caller_arn(&moto.endpoint, &new), Ok(user_arn.clone()));
        assert_eq!(
            caller_arn(&moto.endpoint, &old),
            Err("InvalidClientTokenId".into()),
            "the old key still works after round {round}"
        );
        assert_eq!(get(&env, "aws/ci")["meta"]["user_name"], user.as_str());
        secrets.push(new.secret.clone());
        old = new;
    }
    stop.store(true, Ordering::SeqCst);
    let most = watcher.join().unwrap();
    assert!(most <= 2, "the user had {most} keys at once");

    // No secret access key in the daemon's log (plugin stderr included) or in `list --json`.
    let log = daemon.log_text();
    let listed = env.list().to_string();
    for secret in &secrets {
        assert!(!log.contains(secret.as_str()) && !listed.contains(secret.as_str()));
    }
    drop(daemon);
}

#[test]
#[cfg_attr(
    no_moto,
    ignore = "needs a moto server: set KEYWARDEN_TEST_AWS_ENDPOINT (.ci/run does)"
)]
fn iam_admin_key_rotates_itself_and_then_signs_the_next_rotation() {
    let moto = moto();
    let rotator = moto.user("kw-rotator");
    let rotator_key = moto.create_key(&rotator);
    let app = moto.user("kw-app");
    let env = env_with(
        &moto.admin,
        &format!(
            "[secrets.\"aws/rotator\"]\nprovider = \"aws-iam\"\ncredentials = {{ admin = \"aws/rotator\" }}\n{}\n\n\
             [secrets.\"aws/app\"]\nprovider = \"aws-iam\"\ncredentials = {{ admin = \"aws/rotator\" }}\n{}\n",
            settings(&moto.endpoint, &format!(", user_name = \"{rotator}\"")),
            settings(&moto.endpoint, &format!(", user_name = \"{app}\""))
        ),
    );
    put_key(&env, "aws/rotator", &rotator_key);
    let daemon = env.start_daemon();
    // aws/app has no version: the daemon creates its first key, signed by the rotator's key.
    wait_done(&env, "aws/app", 1);

    rotate(&env, "aws/rotator");
    let new_rotator = current_key(&env, "aws/rotator");
    assert_eq!(moto.keys(&rotator), vec![new_rotator.id.clone()]);
    assert_eq!(
        caller_arn(&moto.endpoint, &rotator_key),
        Err("InvalidClientTokenId".into())
    );
    // The old rotator key is gone, so this rotation can only have been signed by the new one.
    let before = current_key(&env, "aws/app");
    rotate(&env, "aws/app");
    let after = current_key(&env, "aws/app");
    assert_eq!(moto.keys(&app), vec![after.id.clone()]);
    assert_ne!(before.id, after.id);
    assert_eq!(caller_arn(&moto.endpoint, &after), Ok(moto.user_arn(&app)));
    drop(daemon);
}

#[test]
#[cfg_attr(
    no_moto,
    ignore = "needs a moto server: set KEYWARDEN_TEST_AWS_ENDPOINT (.ci/run does)"
)]
fn iam_kill_after_create_leaves_no_orphan_and_spares_a_foreign_key() {
    let moto = moto();
    let user = moto.user("kw-crash");
    let gate = Gate::new(&moto.endpoint);
    let env = env_with(
        &moto.admin,
        &format!(
            "[secrets.\"aws/crash\"]\nprovider = \"aws-iam\"\ncredentials = {{ admin = \"aws/admin\" }}\n{}\n",
            settings(&gate.endpoint(), &format!(", user_name = \"{user}\""))
        ),
    );
    // Someone else's key on the user, which keywarden does not hold.
    let foreign = moto.create_key(&user);

    // The first key: CreateAccessKey reaches IAM; the daemon never hears back and dies.
    gate.arm("Action=CreateAccessKey");
    let daemon = env.start_daemon();
    gate.wait_tripped();
    crash(&env, daemon, None);
    gate.cut();
    assert_eq!(env.entry("aws/crash")["rotation_state"], "planned");
    assert_eq!(moto.keys(&user).len(), 2, "the created key exists upstream");
    // The restarted daemon deletes what its earlier try created, and only that.
    let daemon = env.start_daemon();
    wait_done(&env, "aws/crash", 1);
    let first = current_key(&env, "aws/crash");
    let mut expected = vec![foreign.id.clone(), first.id.clone()];
    expected.sort();
    assert_eq!(moto.keys(&user), expected);
    assert_eq!(
        caller_arn(&moto.endpoint, &foreign),
        Ok(moto.user_arn(&user))
    );

    // The next key: at IAM's two-key limit the key that is not current goes first.
    gate.arm("Action=CreateAccessKey");
    let cli = rotate_in_background(&env, "aws/crash");
    gate.wait_tripped();
    crash(&env, daemon, Some(cli));
    gate.cut();
    assert_eq!(env.entry("aws/crash")["rotation_state"], "planned");
    let upstream = moto.keys(&user);
    assert_eq!(upstream.len(), 2, "{upstream:?}");
    assert!(
        !upstream.contains(&foreign.id),
        "the foreign key went first"
    );

    // The restarted daemon recognises its own earlier try, deletes that key and creates anew.
    let daemon = env.start_daemon();
    wait_done(&env, "aws/crash", 2);
    let second = current_key(&env, "aws/crash");
    assert_eq!(moto.keys(&user), vec![second.id.clone()]);
    assert!(!upstream.contains(&second.id), "the orphan was adopted");
    assert_eq!(
        caller_arn(&moto.endpoint, &second),
        Ok(moto.user_arn(&user))
    );
    assert_eq!(
        caller_arn(&moto.endpoint, &first),
        Err("InvalidClientTokenId".into())
    );
    drop(daemon);
}

// ---- aws-secretsmanager ----------------------------------------------------------------------

const CURRENT: &str = "AWSCURRENT";
const PENDING: &str = "AWSPENDING";

/// Checks that AWS serves keywarden's current version as `AWSCURRENT`, with no other labels.
fn assert_stages_follow(moto: &Moto, env: &Env, name: &str, secret_id: &str) {
    let held = get(env, name);
    let version = held["meta"]["version_id"].as_str().unwrap();
    let stages = moto.stages(secret_id);
    assert_eq!(
        stages,
        [(version.to_string(), vec![CURRENT.to_string()])].into(),
        "{name} is at {version}"
    );
    assert_eq!(
        moto.value_at(secret_id, CURRENT),
        held["value"].as_str().unwrap()
    );
}

fn secretsmanager_env(moto: &Moto, endpoint: &str, secret_id: &str) -> Env {
    env_with(
        &moto.admin,
        &format!(
            "[secrets.\"app/db\"]\nprovider = \"aws-secretsmanager\"\ncredentials = {{ admin = \"aws/admin\" }}\n{}\n",
            settings(endpoint, &format!(", secret_id = \"{secret_id}\""))
        ),
    )
}

#[test]
#[cfg_attr(
    no_moto,
    ignore = "needs a moto server: set KEYWARDEN_TEST_AWS_ENDPOINT (.ci/run does)"
)]
fn secretsmanager_rotations_move_the_stage_labels() {
    let moto = moto();
    let secret_id = unique("kw/app-db");
    let env = secretsmanager_env(moto, &moto.endpoint, &secret_id);
    let daemon = env.start_daemon();
    // The first version creates the AWS secret.
    wait_done(&env, "app/db", 1);
    assert_stages_follow(moto, &env, "app/db", &secret_id);

    let mut versions = vec![get(&env, "app/db")["meta"]["version_id"].clone()];
    for round in 2..=3 {
        rotate(&env, "app/db");
        assert_stages_follow(moto, &env, "app/db", &secret_id);
        let held = get(&env, "app/db");
        assert_eq!(held["version"], round);
        assert!(!versions.contains(&held["meta"]["version_id"]));
        versions.push(held["meta"]["version_id"].clone());
    }

    // A stray AWSPENDING from someone else's unfinished rotation is cleaned, not a blocker.
    let stray = uuid_like();
    block_on(
        moto.sm
            .put_secret_value()
            .secret_id(&secret_id)
            .client_request_token(&stray)
            .secret_string("half-rotated")
            .version_stages(PENDING)
            .send(),
    )
    .expect("PutSecretValue");
    rotate(&env, "app/db");
    assert_stages_follow(moto, &env, "app/db", &secret_id);
    drop(daemon);
}

#[test]
#[cfg_attr(
    no_moto,
    ignore = "needs a moto server: set KEYWARDEN_TEST_AWS_ENDPOINT (.ci/run does)"
)]
fn secretsmanager_kill9_mid_rotation_resumes_to_consistent_labels() {
    let moto = moto();
    let secret_id = unique("kw/crash-db");
    let gate = Gate::new(&moto.endpoint);
    let env = secretsmanager_env(moto, &gate.endpoint(), &secret_id);
    let mut daemon = env.start_daemon();
    wait_done(&env, "app/db", 1);

    // Killed after PutSecretValue (create), then after moving AWSCURRENT (promote).
    for (round, (call, state)) in [
        ("secretsmanager.PutSecretValue", "planned"),
        ("secretsmanager.UpdateSecretVersionStage", "verified"),
    ]
    .into_iter()
    .enumerate()
    {
        let before = get(&env, "app/db");
        gate.arm(call);
        let cli = rotate_in_background(&env, "app/db");
        gate.wait_tripped();
        crash(&env, daemon, Some(cli));
        gate.cut();
        assert_eq!(env.entry("app/db")["rotation_state"], state, "{call}");
        assert_eq!(env.entry("app/db")["version"], before["version"]);

        daemon = env.start_daemon();
        wait_done(&env, "app/db", round as i64 + 2);
        assert_stages_follow(moto, &env, "app/db", &secret_id);
        assert_ne!(get(&env, "app/db")["value"], before["value"]);
    }
    drop(daemon);
}

#[test]
#[cfg_attr(
    no_moto,
    ignore = "needs a moto server: set KEYWARDEN_TEST_AWS_ENDPOINT (.ci/run does)"
)]
fn secretsmanager_push_writes_each_new_version_into_aws() {
    let moto = moto();
    let target = unique("kw/pushed");
    let env = env_with(
        &moto.admin,
        &format!(
            "[secrets.\"app/token\"]\nprovider = \"random\"\ngrace = \"0s\"\nconsumers = [\"aws-copy\"]\n\n\
             [consumers.aws-copy]\nkind = \"aws-secretsmanager\"\ncredentials = {{ admin = \"aws/admin\" }}\n\
             settings = {{ region = \"{REGION}\", endpoint_url = \"{}\", secret_id = \"{target}\" }}\n",
            moto.endpoint
        ),
    );
    let daemon = env.start_daemon();
    wait_done(&env, "app/token", 1);
    assert_eq!(
        moto.value_at(&target, CURRENT),
        get(&env, "app/token")["value"]
    );
    rotate(&env, "app/token");
    assert_eq!(
        moto.value_at(&target, CURRENT),
        get(&env, "app/token")["value"]
    );
    drop(daemon);
}

// ---- aws-sts ---------------------------------------------------------------------------------

#[test]
#[cfg_attr(
    no_moto,
    ignore = "needs a moto server: set KEYWARDEN_TEST_AWS_ENDPOINT (.ci/run does)"
)]
fn sts_issues_a_fresh_session_per_fetch_usable_as_credential_process() {
    let moto = moto();
    let role = unique("kw-agent-role");
    let trust = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"AWS":"*"},"Action":"sts:AssumeRole"}]}"#;
    let created = block_on(
        moto.iam
            .create_role()
            .role_name(&role)
            .assume_role_policy_document(trust)
            .send(),
    )
    .expect("CreateRole");
    let role_arn = created.role().unwrap().arn().to_string();
    block_on(
        moto.iam
            .put_role_policy()
            .role_name(&role)
            .policy_name("allow-all")
            .policy_document(ALLOW_ALL)
            .send(),
    )
    .expect("PutRolePolicy");
    let bin = keywarden_bin();
    let env = env_with(
        &moto.admin,
        &format!(
            "[secrets.\"aws/session\"]\nprovider = \"aws-sts\"\ncredentials = {{ admin = \"aws/admin\" }}\n{}\n\n\
",
            settings(
                &moto.endpoint,
                &format!(", role_arn = \"{role_arn}\", revoke_sessions = true")
            )
        ),
    );
    let daemon = env.start_daemon();

    let fetch = || -> (Value, Value) {
        let out = env.ok(&["get", "aws/session", "--json"], None);
        let lease: Value = serde_json::from_str(&out).unwrap();
        let document: Value = serde_json::from_str(lease["value"].as_str().unwrap()).unwrap();
        (lease, document)
    };
    let (lease1, doc1) = fetch();
    let (lease2, doc2) = fetch();
    assert_ne!(lease1["lease_id"], lease2["lease_id"]);
    assert_ne!(
        doc1["AccessKeyId"], doc2["AccessKeyId"],
        "one session per fetch"
    );
    for (lease, doc) in [(&lease1, &doc1), (&lease2, &doc2)] {
        assert_eq!(doc["Version"], 1);
        for field in [
            "AccessKeyId",
            "SecretAccessKey",
            "SessionToken",
            "Expiration",
        ] {
            assert!(
                doc[field].as_str().is_some_and(|s| !s.is_empty()),
                "{field}: {doc}"
            );
        }
        // A 5-minute lease (the default TTL) asks for AWS's minimum session, 900 s.
        let expires = aws_smithy_types::DateTime::from_str(
            doc["Expiration"].as_str().unwrap(),
            Format::DateTime,
        )
        .unwrap()
        .secs();
        let now = aws_smithy_types::DateTime::from(std::time::SystemTime::now()).secs();
        assert!((now + 800..=now + 905).contains(&expires), "{doc}");
        let key = Key {
            id: doc["AccessKeyId"].as_str().unwrap().into(),
            secret: doc["SecretAccessKey"].as_str().unwrap().into(),
            session: doc["SessionToken"].as_str().map(str::to_string),
        };
        let arn = caller_arn(&moto.endpoint, &key).expect("the session works");
        let session = lease["meta"]["session_name"].as_str().unwrap();
        assert!(session.starts_with("kw-aws-session."), "{lease}");
        assert!(
            arn.ends_with(&format!(":assumed-role/{role}/{session}")),
            "{arn}"
        );
    }

    // Ending the first lease denies its session, and only its session, on the role.
    let sock = env.agent_socket();
    let lease = format!("/v1/leases/{}", lease1["lease_id"].as_str().unwrap());
    assert_eq!(curl(&sock, "DELETE", &lease, &[]).0, 204);
    let denied = wait_for(
        "the revoked-sessions policy",
        Duration::from_secs(20),
        || {
            block_on(
                moto.iam
                    .get_role_policy()
                    .role_name(&role)
                    .policy_name("keywarden-revoked-sessions")
                    .send(),
            )
            .ok()
            .map(|out| url_decode(out.policy_document()))
        },
    );
    let session = |lease: &Value| format!("*:{}", lease["meta"]["session_name"].as_str().unwrap());
    assert!(denied.contains(&session(&lease1)), "{denied}");
    assert!(!denied.contains(&session(&lease2)), "{denied}");

    // The documented profile: `credential_process = keywarden get aws/session`.
    let script = env.dir.path().join("aws-credentials");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexport KEYWARDEN_CONFIG={:?} KEYWARDEN_PASSPHRASE_FILE={:?}\nexec {:?} get aws/session\n",
            env.config.display().to_string(),
            env.passphrase_file.display().to_string(),
            bin.display().to_string()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)).unwrap();
    let aws_config_file = env.dir.path().join("aws-config");
    std::fs::write(
        &aws_config_file,
        format!(
            "[profile agent]\ncredential_process = {}\nregion = {REGION}\n",
            script.display()
        ),
    )
    .unwrap();
    let profile_files = aws_runtime::env_config::file::EnvConfigFiles::builder()
        .with_file(
            aws_runtime::env_config::file::EnvConfigFileKind::Config,
            &aws_config_file,
        )
        .build();
    let provider = aws_config::profile::ProfileFileCredentialsProvider::builder()
        .configure(
            &aws_config::provider_config::ProviderConfig::empty().with_http_client(http_client()),
        )
        .profile_files(profile_files)
        .profile_name("agent")
        .build();
    let config = sdk_config_from(&moto.endpoint, SharedCredentialsProvider::new(provider));
    let identity = block_on(
        aws_sdk_sts::Client::new(&config)
            .get_caller_identity()
            .send(),
    )
    .expect("GetCallerIdentity through credential_process");
    assert!(
        identity
            .arn()
            .unwrap()
            .contains(&format!(":assumed-role/{role}/")),
        "{identity:?}"
    );
    drop(daemon);
}

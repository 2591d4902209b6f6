//! Each preset against an in-test server that emulates the provider's documented endpoints with
//! state (keys that exist, keys deleted, tokens rolled), through the real daemon and the real
//! plugin binary; plus the signed webhook consumer, retried on 500.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use keywarden_testkit::daemon::{base_config, sha256_of, wait_for};
use keywarden_testkit::{Env, curl, spawn_tcp_server};
use serde_json::{Value, json};

/// A request as the fake server saw it.
struct Seen {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

type Handler = Arc<dyn Fn(&Seen) -> (u16, Value) + Send + Sync>;

/// Starts an HTTP server on 127.0.0.1 answering with `handler`; returns its port.
fn serve(handler: Handler) -> u16 {
    spawn_tcp_server(move |stream| {
        let handler = handler.clone();
        async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let handler = handler.clone();
                async move {
                    let method = req.method().to_string();
                    let path = req.uri().to_string();
                    let headers = req
                        .headers()
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                        .collect();
                    let body = req.into_body().collect().await.unwrap().to_bytes().to_vec();
                    let (status, json) = handler(&Seen {
                        method,
                        path,
                        headers,
                        body,
                    });
                    let mut resp = hyper::Response::new(Full::new(Bytes::from(json.to_string())));
                    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        }
    })
}

fn plugin() -> String {
    let bin = Path::new(env!("CARGO_BIN_EXE_keywarden-plugin-http"));
    format!(
        "[plugins.http]\ncommand = [{:?}]\nsha256 = \"{}\"\n",
        bin.display().to_string(),
        sha256_of(bin)
    )
}

fn env_with(secrets: &str) -> Env {
    let env = Env::new();
    let base = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        format!("{base}\n{}\n{}\n{secrets}", base_config("5s"), plugin()),
    )
    .unwrap();
    env.ok(&["init"], None);
    env
}

fn rotate(env: &Env, name: &str) -> (Option<i32>, Value) {
    let out = env.run(&["rotate", name, "--json"], None);
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code(), v)
}

fn settings(preset: &str, port: u16, extra: &str) -> String {
    format!(
        "settings = {{ preset = \"{preset}\", base_url = \"http://127.0.0.1:{port}\", allowed_hosts = [\"127.0.0.1\"], allow_private_addresses = true, allow_http = true{extra} }}"
    )
}

fn bearer(seen: &Seen) -> String {
    seen.headers
        .get("authorization")
        .and_then(|a| a.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_string()
}

// ---- OpenAI project service accounts ----------------------------------------------------------

#[derive(Default)]
struct OpenAi {
    accounts: BTreeMap<String, (String, String)>, // id -> (name, key value)
    next: u32,
    fail_next_create_after_storing: bool,
}

fn openai(state: Arc<Mutex<OpenAi>>) -> Handler {
    Arc::new(move |req: &Seen| {
        let mut s = state.lock().unwrap();
        let base = "/v1/organization/projects/proj_test/service_accounts";
        if req.path == "/v1/models" && req.method == "GET" {
            let key = bearer(req);
            return if s.accounts.values().any(|(_, v)| *v == key) {
                (
                    200,
                    json!({"object": "list", "data": [{"id": "gpt-5", "object": "model"}]}),
                )
            } else {
                (
                    401,
                    json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}),
                )
            };
        }
        if bearer(req) != "sk-admin-test" {
            return (401, json!({"error": {"message": "admin key required"}}));
        }
        if req.path.starts_with(base) && req.method == "POST" {
            let body: Value = serde_json::from_slice(&req.body).unwrap();
            s.next += 1;
            let id = format!("svc_acct_{}", s.next);
            let key = format!("sk-svcacct-{}-{}", s.next, "x".repeat(20));
            s.accounts.insert(
                id.clone(),
                (body["name"].as_str().unwrap().to_string(), key.clone()),
            );
            if s.fail_next_create_after_storing {
                s.fail_next_create_after_storing = false;
                return (503, json!({"error": {"message": "upstream hiccup"}}));
            }
            return (
                201,
                json!({"object": "organization.project.service_account", "id": id, "name": body["name"], "role": "member",
                       "created_at": 1711471533, "api_key": {"object": "organization.project.service_account.api_key",
                       "value": key, "name": "Secret Key", "created_at": 1711471533, "id": format!("key_{}", s.next)}}),
            );
        }
        if req.path.starts_with(base) && req.method == "GET" {
            let data: Vec<Value> = s
                .accounts
                .iter()
                .map(|(id, (name, _))| json!({"object": "organization.project.service_account", "id": id, "name": name}))
                .collect();
            return (
                200,
                json!({"object": "list", "data": data, "has_more": false}),
            );
        }
        if let Some(id) = req.path.strip_prefix(&format!("{base}/")) {
            if req.method == "DELETE" {
                return match s.accounts.remove(id) {
                    Some(_) => (
                        200,
                        json!({"object": "organization.project.service_account.deleted", "id": id, "deleted": true}),
                    ),
                    None => (404, json!({"error": {"message": "not found"}})),
                };
            }
        }
        (
            404,
            json!({"error": {"message": format!("no route {} {}", req.method, req.path)}}),
        )
    })
}

#[test]
fn openai_service_accounts_rotate_without_orphans() {
    let state = Arc::new(Mutex::new(OpenAi::default()));
    let port = serve(openai(state.clone()));
    let env = env_with(&format!(
        "[secrets.\"openai/admin\"]\nprovider = \"manual\"\n\n[secrets.\"openai/prod\"]\nprovider = \"http\"\n\
         credentials = {{ admin = \"openai/admin\" }}\n{}\n\n[secrets.\"openai/misdirected\"]\nprovider = \"http\"\n\
         credentials = {{ admin = \"openai/admin\" }}\nsettings = {{ preset = \"openai-service-account\", base_url = \"http://127.0.0.1:{port}\", project_id = \"proj_test\" }}\n",
        settings(
            "openai-service-account",
            port,
            ", project_id = \"proj_test\""
        )
    ));
    env.put("openai/admin", "sk-admin-test");
    let (code, first) = rotate(&env, "openai/prod");
    assert_eq!(code, Some(0), "{first}");
    let first_key = env.ok(&["get", "openai/prod", "-n"], None);
    // The next create fails after the provider stored the account: the retry must clean it up.
    state.lock().unwrap().fail_next_create_after_storing = true;
    let (code, second) = rotate(&env, "openai/prod");
    assert_eq!(code, Some(0), "{second}");
    assert_eq!(second["state"], "done");
    let current: Value =
        serde_json::from_str(&env.ok(&["get", "openai/prod", "--json"], None)).unwrap();
    let s = state.lock().unwrap();
    assert_eq!(
        s.accounts.len(),
        1,
        "only the current service account exists: {:?}",
        s.accounts.keys()
    );
    let (id, (name, key)) = s.accounts.iter().next().unwrap();
    assert_eq!(current["value"], key.as_str());
    assert_eq!(current["meta"]["service_account_id"], id.as_str());
    assert!(name.starts_with("keywarden-"));
    assert!(
        !s.accounts.values().any(|(_, v)| *v == first_key),
        "the old key is gone"
    );
    drop(s);
    // Without allowed_hosts naming the server, nothing is sent.
    let (code, result) = rotate(&env, "openai/misdirected");
    assert_eq!(code, Some(1));
    assert!(
        result["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("allowed_hosts")
            || result["quarantine_reason"]
                .as_str()
                .unwrap_or_default()
                .contains("allowed_hosts"),
        "{result}"
    );
}

// ---- Cloudflare token roll --------------------------------------------------------------------

fn cloudflare(token: Arc<Mutex<String>>) -> Handler {
    Arc::new(move |req: &Seen| {
        let mut t = token.lock().unwrap();
        match (req.method.as_str(), req.path.as_str()) {
            ("PUT", "/client/v4/user/tokens/tok_123/value") if bearer(req) == "cf-admin" => {
                *t = format!("cf-rolled-{}", t.len());
                (
                    200,
                    json!({"result": *t, "success": true, "errors": [], "messages": []}),
                )
            }
            ("GET", "/client/v4/user/tokens/verify") => {
                if bearer(req) == *t {
                    (
                        200,
                        json!({"result": {"id": "tok_123", "status": "active"}, "success": true, "errors": [], "messages": []}),
                    )
                } else {
                    (
                        401,
                        json!({"success": false, "errors": [{"code": 1000, "message": "Invalid API Token"}]}),
                    )
                }
            }
            _ => (
                403,
                json!({"success": false, "errors": [{"code": 9109, "message": "Unauthorized"}]}),
            ),
        }
    })
}

#[test]
fn cloudflare_tokens_roll_in_place_and_skip_draining() {
    let token = Arc::new(Mutex::new("cf-original".to_string()));
    let port = serve(cloudflare(token.clone()));
    let env = env_with(&format!(
        "[secrets.\"cf/admin\"]\nprovider = \"manual\"\n\n[secrets.\"cf/dns\"]\nprovider = \"http-exclusive\"\n\
         credentials = {{ admin = \"cf/admin\" }}\ngrace = \"1h\"\n{}\n",
        settings("cloudflare-token", port, ", token_id = \"tok_123\"")
    ));
    env.put("cf/admin", "cf-admin");
    let (code, first) = rotate(&env, "cf/dns");
    assert_eq!(code, Some(0), "{first}");
    let (code, second) = rotate(&env, "cf/dns");
    assert_eq!(code, Some(0), "{second}");
    assert_eq!(
        second["state"], "done",
        "no draining for a token rolled in place"
    );
    let current: Value = serde_json::from_str(&env.ok(&["get", "cf/dns", "--json"], None)).unwrap();
    assert_eq!(current["value"], token.lock().unwrap().as_str());
    assert_eq!(current["meta"]["token_id"], "tok_123");
    // Misconfigured: the exclusive preset under the overlapping kind is refused.
    let env2 = env_with(&format!(
        "[secrets.\"cf/admin\"]\nprovider = \"manual\"\n\n[secrets.\"cf/wrong\"]\nprovider = \"http\"\n\
         credentials = {{ admin = \"cf/admin\" }}\n{}\n",
        settings("cloudflare-token", port, ", token_id = \"tok_123\"")
    ));
    env2.put("cf/admin", "cf-admin");
    let (code, result) = rotate(&env2, "cf/wrong");
    assert_eq!(code, Some(1));
    assert!(result.to_string().contains("http-exclusive"), "{result}");
}

// ---- Anthropic: deactivate only ---------------------------------------------------------------

#[test]
fn anthropic_keys_need_a_person_and_a_compromise_deactivates_them() {
    let keys = Arc::new(Mutex::new(BTreeMap::from([(
        "apikey_01".to_string(),
        ("sk-ant-api03-live".to_string(), "active".to_string()),
    )])));
    let state = keys.clone();
    let port = serve(Arc::new(move |req: &Seen| {
        let mut k = state.lock().unwrap();
        if req.headers.get("anthropic-version").map(String::as_str) != Some("2023-06-01") {
            return (
                400,
                json!({"type": "error", "error": {"type": "invalid_request_error", "message": "anthropic-version required"}}),
            );
        }
        let key = req.headers.get("x-api-key").cloned().unwrap_or_default();
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/v1/models") if k.values().any(|(v, s)| *v == key && s == "active") => {
                (200, json!({"data": []}))
            }
            ("GET", "/v1/models") => (
                401,
                json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}),
            ),
            ("POST", p)
                if key == "sk-ant-admin-test" && p.starts_with("/v1/organizations/api_keys/") =>
            {
                let id = &p["/v1/organizations/api_keys/".len()..];
                let body: Value = serde_json::from_slice(&req.body).unwrap();
                match k.get_mut(id) {
                    Some(entry) => {
                        entry.1 = body["status"].as_str().unwrap().to_string();
                        (200, json!({"id": id, "type": "api_key", "status": entry.1}))
                    }
                    None => (
                        404,
                        json!({"type": "error", "error": {"type": "not_found_error", "message": "no such key"}}),
                    ),
                }
            }
            _ => (
                401,
                json!({"type": "error", "error": {"type": "authentication_error", "message": "admin key required"}}),
            ),
        }
    }));
    let env = env_with(&format!(
        "[secrets.\"anthropic/admin\"]\nprovider = \"manual\"\n\n[secrets.\"anthropic/prod\"]\nprovider = \"http-manual\"\n\
         credentials = {{ admin = \"anthropic/admin\" }}\n{}\n",
        settings(
            "anthropic-admin-deactivate",
            port,
            ", console_url = \"https://console.anthropic.com/settings/keys\""
        )
    ));
    env.put("anthropic/admin", "sk-ant-admin-test");
    env.ok(
        &["put", "anthropic/prod", "--meta", "api_key_id=apikey_01"],
        Some(b"sk-ant-api03-live"),
    );
    let err = env.fails(1, &["rotate", "anthropic/prod"], None);
    assert!(
        err.contains("cannot create credentials")
            && err.contains("https://console.anthropic.com/settings/keys"),
        "{err}"
    );
    assert_eq!(
        keys.lock().unwrap()["apikey_01"].1,
        "active",
        "a plain rotation changes nothing upstream"
    );

    let out = env.run(
        &[
            "rotate-all",
            "--assume-compromise",
            "anthropic/prod",
            "--yes",
            "--json",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1), "a person is needed");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["needs_person"][0]["name"], "anthropic/prod");
    assert!(
        report["needs_person"][0]["error"]
            .as_str()
            .unwrap()
            .contains("console.anthropic.com"),
        "{report}"
    );
    assert_eq!(
        keys.lock().unwrap()["apikey_01"].1,
        "inactive",
        "the key was deactivated at once"
    );
}

// ---- Bearer tokens: per-lease credentials -----------------------------------------------------

#[test]
fn bearer_tokens_are_issued_per_lease_and_deleted_when_the_lease_ends() {
    let tokens: Arc<Mutex<BTreeMap<String, (String, i64)>>> = Arc::default();
    let state = tokens.clone();
    let port = serve(Arc::new(move |req: &Seen| {
        let mut t = state.lock().unwrap();
        if bearer(req) != "admin-token" {
            return (401, json!({"message": "unauthorized"}));
        }
        match (req.method.as_str(), req.path.as_str()) {
            ("POST", "/api/tokens") => {
                let body: Value = serde_json::from_slice(&req.body).unwrap();
                let id = format!("t{}", t.len() + 1);
                let token = format!("bt-{id}-secret-value");
                t.insert(
                    id.clone(),
                    (token.clone(), body["ttl_seconds"].as_i64().unwrap_or(0)),
                );
                (
                    201,
                    json!({"id": id, "token": token, "expires_at": "2099-01-01T00:00:00Z"}),
                )
            }
            ("DELETE", p) => match t.remove(&p["/api/tokens/".len()..]) {
                Some(_) => (200, json!({})),
                None => (404, json!({"message": "not found"})),
            },
            _ => (404, json!({"message": "no route"})),
        }
    }));
    let env = env_with(&format!(
        "[secrets.\"svc/admin\"]\nprovider = \"manual\"\n\n[secrets.\"svc/short\"]\nprovider = \"http-lease\"\n\
         credentials = {{ admin = \"svc/admin\" }}\n{}\n\n[[policy]]\nname = \"curl\"\nexe = [\"/usr/bin/curl\"]\nsecrets = [\"svc/short\"]\n",
        settings("bearer-token", port, "")
    ));
    env.put("svc/admin", "admin-token");
    let daemon = env.start_daemon();
    let sock = env.agent_socket();
    let fetch = || -> Value {
        let (_, body) = curl(&sock, "GET", "/v1/secrets/svc/short?ttl=120", &[]);
        serde_json::from_str(&body).unwrap()
    };
    let a = fetch();
    let b = fetch();
    assert_ne!(a["value"], b["value"]);
    assert_eq!(tokens.lock().unwrap().len(), 2);
    assert_eq!(
        tokens.lock().unwrap()["t1"].1,
        120,
        "the lease's TTL was passed to the provider"
    );
    let lease = format!("/v1/leases/{}", a["lease_id"].as_str().unwrap());
    assert_eq!(curl(&sock, "DELETE", &lease, &[]).0, 204);
    let remaining: Vec<String> = tokens
        .lock()
        .unwrap()
        .values()
        .map(|(v, _)| v.clone())
        .collect();
    assert_eq!(
        remaining,
        [b["value"].as_str().unwrap().to_string()],
        "the deleted lease's token is gone upstream"
    );
    drop(daemon);
}

// ---- Signed webhook consumer ------------------------------------------------------------------

#[test]
fn webhook_deliveries_are_signed_and_retried_on_500() {
    let deliveries: Arc<Mutex<Vec<(bool, Value)>>> = Arc::default();
    let attempts = Arc::new(Mutex::new(0));
    let (seen, count) = (deliveries.clone(), attempts.clone());
    let port = serve(Arc::new(move |req: &Seen| {
        let mut n = count.lock().unwrap();
        *n += 1;
        if *n <= 2 {
            return (500, json!({"error": "try again"}));
        }
        let signature = req
            .headers
            .get("x-keywarden-signature")
            .cloned()
            .unwrap_or_default();
        let out = std::process::Command::new("python3")
            .args(["-c", "import hmac,hashlib,sys; print('sha256=' + hmac.new(b'hook-key', sys.stdin.buffer.read(), hashlib.sha256).hexdigest())"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(&req.body)?;
                c.wait_with_output()
            })
            .unwrap();
        let expected = String::from_utf8(out.stdout).unwrap().trim().to_string();
        seen.lock().unwrap().push((
            signature == expected,
            serde_json::from_slice(&req.body).unwrap(),
        ));
        (200, json!({"ok": true}))
    }));
    let env = env_with(&format!(
        "[secrets.\"hooks/key\"]\nprovider = \"manual\"\n\n[secrets.\"app/token\"]\nprovider = \"random\"\nconsumers = [\"notify\"]\n\n\
         [consumers.notify]\nkind = \"webhook\"\ncredentials = {{ hmac = \"hooks/key\" }}\n\
         settings = {{ url = \"http://127.0.0.1:{port}/hooks/keywarden\", allowed_hosts = [\"127.0.0.1\"], allow_private_addresses = true, allow_http = true }}\n"
    ));
    env.put("hooks/key", "hook-key");
    let (code, result) = rotate(&env, "app/token");
    assert_eq!(code, Some(0), "{result}");
    wait_for("a delivery", Duration::from_secs(10), || {
        (!deliveries.lock().unwrap().is_empty()).then_some(())
    });
    assert_eq!(
        *attempts.lock().unwrap(),
        3,
        "two 500s, then the acknowledgement"
    );
    let (valid, body) = deliveries.lock().unwrap()[0].clone();
    assert!(valid, "the signature verifies with the shared key");
    assert_eq!(body["event"], "keywarden.rotated");
    assert_eq!(body["secret"], "app/token");
    assert_eq!(body["version"], 1);
    assert!(
        body.get("value").is_none(),
        "values are not sent unless include_value"
    );
}

// ---- Private addresses ------------------------------------------------------------------------

#[test]
fn a_request_to_a_private_or_loopback_address_is_refused_unless_allowed() {
    // A cloud metadata service or an admin port on loopback, reached through an allowed host
    // name or a provider-controlled base URL: nothing is sent unless the secret allows it.
    let hits = Arc::new(Mutex::new(0));
    let counter = hits.clone();
    let port = serve(Arc::new(move |_req: &Seen| {
        *counter.lock().unwrap() += 1;
        (200, json!({ "id": "x" }))
    }));
    let verify = |host: &str| {
        format!(
            "settings = {{ preset = \"bearer-token\", base_url = \"http://{host}:{port}\", allowed_hosts = [\"{host}\"], allow_http = true, \
             verify = {{ method = \"GET\", url = \"http://{host}:{port}/whoami\" }} }}"
        )
    };
    let env = env_with(&format!(
        "[secrets.\"svc/admin\"]\nprovider = \"manual\"\n\n\
         [secrets.\"svc/literal\"]\nprovider = \"http\"\ncredentials = {{ admin = \"svc/admin\" }}\nmax_attempts = 1\n{}\n\n\
         [secrets.\"svc/named\"]\nprovider = \"http\"\ncredentials = {{ admin = \"svc/admin\" }}\nmax_attempts = 1\n{}\n",
        verify("127.0.0.1"),
        verify("localhost"),
    ));
    env.put("svc/admin", "admin-token");
    for (name, says) in [
        ("svc/literal", "127.0.0.1 is not a public address"),
        ("svc/named", "resolves to no public address"),
    ] {
        let (code, result) = rotate(&env, name);
        assert_eq!(code, Some(1), "{result}");
        assert!(result.to_string().contains(says), "{name}: {result}");
    }
    assert_eq!(*hits.lock().unwrap(), 0, "no request reached the server");
}

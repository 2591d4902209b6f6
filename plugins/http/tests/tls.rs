//! TLS is verified by default: a provider with a certificate nobody vouches for is refused, and
//! accepted once its CA is given in `ca_file`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use keywarden_testkit::daemon::{base_config, sha256_of};
use keywarden_testkit::tls::private_ca;
use keywarden_testkit::{Env, spawn_tcp_server};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An HTTPS server that answers every request with a new bearer token.
fn serve_tls(cert: &Path, key: &Path) -> u16 {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    spawn_tcp_server(move |stream| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(mut tls) = acceptor.accept(stream).await else {
                return;
            };
            let mut buf = vec![0u8; 8192];
            let _ = tls.read(&mut buf).await;
            let body = r#"{"id":"t1","token":"tls-token-value-1234"}"#;
            let reply = format!(
                "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tls.write_all(reply.as_bytes()).await;
            let _ = tls.shutdown().await;
        }
    })
}

/// An environment whose `svc/tls` trusts `ca_file`, which the plugin's sandbox lets it read
/// when `granted`.
fn env_for(port: u16, ca_file: Option<&Path>, granted: bool) -> Env {
    let env = Env::new();
    let bin = Path::new(env!("CARGO_BIN_EXE_keywarden-plugin-http"));
    let ca = ca_file
        .map(|p| format!(", ca_file = {:?}", p.display().to_string()))
        .unwrap_or_default();
    let sandbox = match ca_file.filter(|_| granted) {
        Some(p) => format!(
            "sandbox = {{ read_paths = [{:?}] }}\n",
            p.display().to_string()
        ),
        None => String::new(),
    };
    let config = format!(
        "{}\n[plugins.http]\ncommand = [{:?}]\nsha256 = \"{}\"\n{sandbox}\n[secrets.\"svc/admin\"]\nprovider = \"manual\"\n\n\
         [secrets.\"svc/tls\"]\nprovider = \"http\"\ncredentials = {{ admin = \"svc/admin\" }}\nmax_attempts = 2\n\
         settings = {{ preset = \"bearer-token\", base_url = \"https://127.0.0.1:{port}\", allowed_hosts = [\"127.0.0.1\"], allow_private_addresses = true{ca}, verify = {{ method = \"GET\", url = \"https://127.0.0.1:{port}/api/whoami\" }} }}\n",
        base_config("5s"),
        bin.display().to_string(),
        sha256_of(bin)
    );
    let base = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(&env.config, format!("{base}\n{config}")).unwrap();
    env.ok(&["init"], None);
    env.put("svc/admin", "admin-token");
    env
}

#[test]
fn an_unknown_certificate_is_refused_and_a_configured_ca_is_trusted() {
    let scratch = tempfile::tempdir().unwrap();
    // Reachable by the plugin's own user when the tests run as root.
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let (ca, cert, key) = private_ca(scratch.path());
    let port = serve_tls(&cert, &key);

    let untrusted = env_for(port, None, false);
    let out = untrusted.run(&["rotate", "svc/tls", "--json"], None);
    assert_eq!(out.status.code(), Some(1));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("certificate") || report.contains("Certificate"),
        "{report}"
    );
    assert!(
        untrusted.entry("svc/tls")["version"].is_null(),
        "nothing was stored"
    );

    // The plugin is confined: a CA file its sandbox does not grant cannot even be read.
    let ungranted = env_for(port, Some(&ca), false);
    let out = ungranted.run(&["rotate", "svc/tls", "--json"], None);
    assert_eq!(out.status.code(), Some(1));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("cannot read ca_file") && report.contains("ermission denied"),
        "{report}"
    );

    let trusted = env_for(port, Some(&ca), true);
    let out = trusted.run(&["rotate", "svc/tls", "--json"], None);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(trusted.get("svc/tls"), "tls-token-value-1234");
}

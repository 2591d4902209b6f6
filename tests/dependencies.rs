//! The daemon's small dependency tree is an invariant: the `keywarden` package must never depend,
//! directly or transitively, on a provider SDK (`aws-*`) or on an HTTP client for providers
//! (`reqwest`, `hyper-rustls`). Those live in plugins and in `keywarden-broker`, which in turn
//! links nothing of the store, and keeps its own tree small: it is the one process where a
//! provider key meets an HTTP client, so that client is hyper's own, not `reqwest`.

use std::collections::{BTreeSet, HashMap};
use std::process::Command;

/// The names of every crate `package` depends on to build and run (not dev-dependencies: tests
/// may use anything).
fn runtime_dependencies(package: &str) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    let names: HashMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let nodes: HashMap<&str, &serde_json::Value> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), n))
        .collect();
    let root = names
        .iter()
        .find(|(_, name)| **name == package)
        .map(|(id, _)| *id)
        .expect("the package");

    let mut seen = BTreeSet::new();
    let mut stack = vec![root];
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        for dep in nodes[id]["deps"].as_array().unwrap() {
            let runtime = dep["dep_kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["kind"].is_null() || k["kind"] == "build");
            if runtime {
                stack.push(dep["pkg"].as_str().unwrap());
            }
        }
    }
    seen.iter().map(|id| names[id].to_string()).collect()
}

#[test]
fn keywarden_depends_on_no_aws_crate_and_no_http_client_for_providers() {
    let all = runtime_dependencies("keywarden");
    assert!(
        all.iter().any(|n| n == "sqlx") && all.iter().any(|n| n == "ring"),
        "the walk found the real tree"
    );
    let forbidden: Vec<&String> = all
        .iter()
        .filter(|n| {
            n.starts_with("aws-")
                || n.starts_with("aws_")
                || *n == "reqwest"
                || *n == "hyper-rustls"
        })
        .collect();
    assert!(forbidden.is_empty(), "keywarden depends on {forbidden:?}");
}

#[test]
fn the_broker_links_nothing_of_the_store_and_no_reqwest() {
    let all = runtime_dependencies("keywarden-broker");
    assert!(
        all.iter().any(|n| n == "hyper-rustls"),
        "the walk found the real tree"
    );
    let forbidden: Vec<&String> = all
        .iter()
        .filter(|n| {
            ["keywarden", "sqlx", "argon2", "libsqlite3-sys", "reqwest"].contains(&n.as_str())
        })
        .collect();
    assert!(
        forbidden.is_empty(),
        "keywarden-broker depends on {forbidden:?}"
    );
}

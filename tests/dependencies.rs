//! The daemon's small dependency tree is an invariant: the `keywarden` package must never depend,
//! directly or transitively, on a provider SDK (`aws-*`) or on `reqwest`. Those live in plugins.

use std::collections::{BTreeSet, HashMap};
use std::process::Command;

#[test]
fn keywarden_depends_on_no_aws_crate_and_no_reqwest() {
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
        .find(|(_, name)| **name == "keywarden")
        .map(|(id, _)| *id)
        .expect("the keywarden package");

    // Walk normal and build dependencies (not dev-dependencies: tests may use anything).
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
    let all: Vec<&str> = seen.iter().map(|id| names[id]).collect();
    assert!(
        all.contains(&"sqlx") && all.contains(&"ring"),
        "the walk found the real tree"
    );
    let forbidden: Vec<&&str> = all
        .iter()
        .filter(|n| n.starts_with("aws-") || n.starts_with("aws_") || **n == "reqwest")
        .collect();
    assert!(forbidden.is_empty(), "keywarden depends on {forbidden:?}");
}

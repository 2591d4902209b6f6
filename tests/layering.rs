//! The crate's floors, checked on the source: ground (crypto, values, the store, the vault),
//! middle (rotation, plugins, consumers, leases, policy, attestation, incidents), top (the
//! daemon's wiring, the APIs, the CLI). A module may use its own floor or those below it, never
//! one above, and the modules of a floor never import each other in a circle.
//!
//! Run alone with `cargo test --test layering`; it reads `src/` as text (every `crate::NAME`
//! path outside comments), so it needs no build of the crate beyond itself.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const GROUND: &[&str] = &[
    "audit",
    "audit_archive",
    "backup",
    "clock",
    "crypto",
    "generate",
    "hardening",
    "name",
    "parse",
    "passphrase",
    "sandbox",
    "store",
    "sys",
    "value",
    "vault",
];
const MIDDLE: &[&str] = &[
    "attest",
    "broker",
    "consumer",
    "group_commit",
    "http",
    "incident",
    "leases",
    "metrics",
    "plugin_host",
    "policy",
    "provider",
    "rejections",
    "rotation",
    "scan",
];
const TOP: &[&str] = &[
    "admin",
    "agent_api",
    "broker_api",
    "cli",
    "config",
    "daemon",
    "lib",
    "main",
    "services",
    "status",
];

fn floor(module: &str) -> Option<(usize, &'static str)> {
    [
        (0, "ground", GROUND),
        (1, "middle", MIDDLE),
        (2, "top", TOP),
    ]
    .into_iter()
    .find(|(_, _, members)| members.contains(&module))
    .map(|(n, name, _)| (n, name))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to: `src/store/sqlite/mod.rs` → `store`.
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative.components().next().unwrap().as_os_str();
    first.to_string_lossy().trim_end_matches(".rs").to_string()
}

/// Every top-level module a file names as `crate::NAME` (or, in `main.rs`, `keywarden::NAME`),
/// with the line, outside comments.
fn references(text: &str, prefix: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find(prefix) {
            let after = &rest[at + prefix.len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.push((n + 1, name));
            }
            rest = after;
        }
    }
    found
}

/// Edges between top-level modules, with one example site for each.
fn module_graph() -> BTreeMap<(String, String), String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges = BTreeMap::new();
    for file in files {
        let from = module_of(&src, &file);
        let text = std::fs::read_to_string(&file).unwrap();
        let prefix = if from == "main" {
            "keywarden::"
        } else {
            "crate::"
        };
        for (line, to) in references(&text, prefix) {
            if to != from {
                edges
                    .entry((from.clone(), to))
                    .or_insert_with(|| format!("{}:{line}", file.display()));
            }
        }
    }
    edges
}

#[test]
fn every_module_has_a_floor_and_no_import_runs_upward() {
    let mut upward = Vec::new();
    for ((from, to), site) in module_graph() {
        let (Some(f), Some(t)) = (floor(&from), floor(&to)) else {
            panic!("{from} or {to} has no floor: add it to tests/layering.rs ({site})");
        };
        if t.0 > f.0 {
            upward.push(format!("{from} ({}) imports {to} ({}) at {site}", f.1, t.1));
        }
    }
    assert!(
        upward.is_empty(),
        "imports that run upward:\n{}",
        upward.join("\n")
    );
}

#[test]
fn no_modules_import_each_other_in_a_circle() {
    let edges = module_graph();
    let mut next: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        next.entry(from).or_default().insert(to);
    }
    // Depth-first search; a node met again while still on the path closes a circle.
    fn visit<'a>(
        node: &'a str,
        next: &BTreeMap<&'a str, BTreeSet<&'a str>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
        circles: &mut Vec<String>,
    ) {
        if let Some(at) = path.iter().position(|n| *n == node) {
            let mut circle = path[at..].to_vec();
            circle.push(node);
            circles.push(circle.join(" -> "));
            return;
        }
        if !done.insert(node) {
            return;
        }
        path.push(node);
        for to in next.get(node).into_iter().flatten() {
            visit(to, next, path, done, circles);
        }
        path.pop();
    }
    let mut circles = Vec::new();
    let mut done = BTreeSet::new();
    for node in next.keys() {
        visit(node, &next, &mut Vec::new(), &mut done, &mut circles);
    }
    let sites: Vec<String> = circles
        .iter()
        .map(|c| {
            let names: Vec<&str> = c.split(" -> ").collect();
            let hops: Vec<String> = names
                .windows(2)
                .map(|w| edges[&(w[0].to_string(), w[1].to_string())].clone())
                .collect();
            format!("{c} (at {})", hops.join(", "))
        })
        .collect();
    assert!(sites.is_empty(), "import circles:\n{}", sites.join("\n"));
}

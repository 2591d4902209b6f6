//! Where a harvester looks: process environments, files in a home directory, system places.

use std::path::Path;

use zeroize::Zeroizing;

use super::{Finding, Report, Severity, findings_in, mask, read_small};
use crate::value::SecretValue;

/// Largest file read whole (credential files are small; a 10 MB `.tfstate` still is).
const MAX_FILE: u64 = 16 << 20;
/// How deep `.env*`, Terraform and CI files are looked for under a home (the payload's depth).
const MAX_DEPTH: usize = 6;
/// Directories never descended into: what they hold is not configuration.
const SKIP_DIRS: &[&str] = &[
    ".git",
    "node_modules",
    ".cache",
    "target",
    "__pycache__",
    ".venv",
    "venv",
    "site-packages",
    ".npm",
    ".cargo",
    ".rustup",
];

/// Files under a home, relative to it, a harvester reads by name.
const HOME_FILES: &[&str] = &[
    ".aws/credentials",
    ".aws/config",
    ".config/gcloud/application_default_credentials.json",
    ".azure/accessTokens.json",
    ".azure/msal_token_cache.json",
    ".kube/config",
    ".git-credentials",
    ".gitconfig",
    ".docker/config.json",
    ".npmrc",
    ".pypirc",
    ".netrc",
    ".pgpass",
    ".my.cnf",
    ".bash_history",
    ".zsh_history",
    ".psql_history",
    ".mysql_history",
    ".rediscli_history",
    ".python_history",
];

/// Files whose whole content is a token, by name.
const TOKEN_FILES: &[(&str, &str)] = &[(".vault-token", "vault-token")];

/// Cryptocurrency wallets: reported by presence.
const WALLETS: &[&str] = &[
    ".bitcoin/wallet.dat",
    ".ethereum/keystore",
    ".electrum/wallets",
    ".config/Exodus",
    ".local/share/solana",
];

/// Environment variable names that hold credentials even when no token pattern matches.
pub fn secret_variable(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    [
        "API_KEY",
        "_TOKEN",
        "_SECRET",
        "PASSWORD",
        "PASSPHRASE",
        "_ACCESS_KEY",
    ]
    .iter()
    .any(|s| upper.contains(s))
        && !upper.ends_with("_FILE")
        && !upper.ends_with("_PATH")
}

/// Every process environment this user may read (`/proc/*/environ`), this process's excepted.
pub fn process_environments(report: &mut Report) {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(bytes) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let bytes = Zeroizing::new(bytes);
        report.processes_scanned += 1;
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        for var in bytes.split(|b| *b == 0) {
            let var = Zeroizing::new(String::from_utf8_lossy(var).into_owned());
            let Some((name, value)) = var.split_once('=') else {
                continue;
            };
            let place = format!("process {pid} ({comm}) environment {name}");
            let fix = "run the program with `keywarden exec` (the value then comes from the \
                       daemon, not a file or a shell profile), or better, through the broker";
            if name == "NODE_OPTIONS" && (value.contains("--require") || value.contains("-r ")) {
                report.findings.push(Finding {
                    place: place.clone(),
                    kind: "node-startup-hook".into(),
                    severity: Severity::High,
                    masked: None,
                    sha256: None,
                    fix: "check what NODE_OPTIONS makes every Node start load".into(),
                    value: None,
                });
            }
            let before = report.findings.len();
            findings_in(value, &place, fix, report);
            if report.findings.len() == before && !value.is_empty() && secret_variable(name) {
                report.findings.push(Finding {
                    place,
                    kind: "secret-variable".into(),
                    severity: Severity::Medium,
                    masked: Some(mask(value, false)),
                    sha256: None,
                    fix: fix.into(),
                    value: Some(SecretValue::new(value.to_string())),
                });
            }
        }
    }
}

/// Everything under one home directory.
pub fn home(home: &Path, report: &mut Report) {
    for rel in HOME_FILES {
        scan_file(&home.join(rel), report);
    }
    for (rel, kind) in TOKEN_FILES {
        token_file(&home.join(rel), kind, report);
    }
    ssh(home, report);
    for rel in WALLETS {
        let path = home.join(rel);
        if path.exists() {
            report.findings.push(Finding {
                place: path.display().to_string(),
                kind: "crypto-wallet".into(),
                severity: Severity::Medium,
                masked: None,
                sha256: None,
                fix: "keep wallets off hosts that run agents".into(),
                value: None,
            });
        }
    }
    walk(home, 0, report);
}

/// System-wide places: Kubernetes configs and service-account tokens, TLS private keys.
pub fn system(report: &mut Report) {
    for dir in ["/etc/kubernetes"] {
        for path in files_in(Path::new(dir)) {
            if path.extension().is_some_and(|e| e == "conf") {
                scan_file(&path, report);
            }
        }
    }
    token_file(
        Path::new("/var/run/secrets/kubernetes.io/serviceaccount/token"),
        "kubernetes-service-account-token",
        report,
    );
    for path in files_in(Path::new("/etc/ssl/private")) {
        scan_file(&path, report);
    }
    for live in files_in(Path::new("/etc/letsencrypt/live")) {
        scan_file(&live.join("privkey.pem"), report);
    }
}

fn files_in(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// A file read whole and searched for every pattern.
fn scan_file(path: &Path, report: &mut Report) {
    let Some(text) = read_small(path, MAX_FILE) else {
        return;
    };
    report.files_scanned += 1;
    let fix = fix_for(path);
    findings_in(&text, &path.display().to_string(), &fix, report);
}

/// A file whose content is one token.
fn token_file(path: &Path, kind: &str, report: &mut Report) {
    let Some(text) = read_small(path, MAX_FILE) else {
        return;
    };
    report.files_scanned += 1;
    let token = text.trim();
    if token.is_empty() {
        return;
    }
    report.findings.push(Finding {
        place: path.display().to_string(),
        kind: kind.into(),
        severity: Severity::High,
        masked: Some(mask(token, false)),
        sha256: None,
        fix: fix_for(path),
        value: Some(SecretValue::new(token.to_string())),
    });
}

/// SSH private keys (any file in `~/.ssh` holding one) and, as low findings, what tells a
/// harvester where they lead.
fn ssh(home: &Path, report: &mut Report) {
    for path in files_in(&home.join(".ssh")) {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".pub") {
            continue;
        }
        if matches!(name.as_str(), "authorized_keys" | "known_hosts" | "config") {
            if path.is_file() {
                report.findings.push(Finding {
                    place: path.display().to_string(),
                    kind: "ssh-metadata".into(),
                    severity: Severity::Low,
                    masked: None,
                    sha256: None,
                    fix: "harvesters take it to find the next hosts; nothing to remove".into(),
                    value: None,
                });
            }
            continue;
        }
        scan_file(&path, report);
    }
}

/// `.env*`, Terraform and CI files, up to [`MAX_DEPTH`] below `dir`.
fn walk(dir: &Path, depth: usize, report: &mut Report) {
    if depth > MAX_DEPTH {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let path = entry.path();
        if kind.is_dir() {
            // `.ssh` at the top is read by `ssh` already.
            let skip = SKIP_DIRS.contains(&name.as_ref()) || (depth == 0 && name == ".ssh");
            if !skip {
                walk(&path, depth + 1, report);
            }
        } else if kind.is_file() && harvested_file(&name) && !(depth == 0 && top_level(&name)) {
            scan_file(&path, report);
        }
    }
}

/// Files named in [`HOME_FILES`] at a home's top level are scanned there already.
fn top_level(name: &str) -> bool {
    HOME_FILES.contains(&name)
}

/// The file names a harvester collects wherever it finds them.
fn harvested_file(name: &str) -> bool {
    name == ".env"
        || name.starts_with(".env.")
        || name.ends_with(".tfvars")
        || name.ends_with(".tfstate")
        || matches!(
            name,
            ".gitlab-ci.yml" | ".travis.yml" | "Jenkinsfile" | ".drone.yml"
        )
}

/// What to do about a credential in this file.
fn fix_for(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name == ".env" || name.starts_with(".env.") {
        format!(
            "keywarden import --env-file {} --shred, then run the app with `keywarden exec \
             --env-file` (rotate the value: it sat in plaintext)",
            path.display()
        )
    } else if name.ends_with("_history") {
        format!(
            "rotate the value and remove the line from {} (a history keeps what was typed)",
            path.display()
        )
    } else {
        format!(
            "move the value into keywarden (`keywarden put`), remove it from {} (or chmod 600 \
             it if a tool needs it), and rotate it",
            path.display()
        )
    }
}

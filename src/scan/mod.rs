//! Host hygiene (README "Host hygiene: scan and import"): what a credential harvester running as this user (or as
//! root) would collect on this host, in the harvester's own order — readable process
//! environments, `.env*` files, cloud and tool credential files, SSH keys, histories, Terraform
//! and CI files — plus the start-up hooks such attacks plant (`.pth` files, `sitecustomize`)
//! and the March 2026 payload's persistence. Never touches the network; never keeps or prints
//! a value beyond what the caller needs to fingerprint it.
//!
//! [`scan`] returns [`Finding`]s; matching them against the store (by keyed fingerprint) is the
//! caller's, who holds the vault or talks to the daemon.

pub mod hooks;
pub mod patterns;
pub mod places;

use std::path::{Path, PathBuf};

use serde::Serialize;
use zeroize::Zeroizing;

use crate::value::SecretValue;

/// How bad a finding is. Ordered: `--fail-on high` fails on high and critical.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing (SSH metadata, a wallet's presence).
    Low,
    /// A credential of limited power, or a hook without executable content.
    Medium,
    /// A live credential in plaintext.
    High,
    /// An admin credential, a private key, an active start-up hook or a known indicator.
    Critical,
}

/// One thing found.
#[derive(Debug, Serialize)]
pub struct Finding {
    /// Where: a file path, `process 1234 (python3) environment VAR`, …
    pub place: String,
    /// What (`openai-key`, `python-startup-hook`, `known-indicator`, …).
    pub kind: String,
    /// How bad.
    pub severity: Severity,
    /// The value's length, and its first characters when they are a public marker
    /// (`sk-p… (56 chars)`), when there is a value ([`mask`]).
    pub masked: Option<String>,
    /// A SHA-256 of the file, for hooks and indicators.
    pub sha256: Option<String>,
    /// What to do about it.
    pub fix: String,
    /// The credential itself, for the caller to fingerprint; never serialized or printed.
    #[serde(skip)]
    pub value: Option<SecretValue>,
}

/// What to scan.
#[derive(Debug, Clone)]
pub struct Options {
    /// Home directories to walk.
    pub homes: Vec<PathBuf>,
    /// Whether to read other processes' environments (those this user may read).
    pub processes: bool,
    /// Whether to look at system-wide places (`/etc/kubernetes`, service-account tokens, TLS
    /// private keys, `/tmp` indicators) and every Python on `PATH`.
    pub system: bool,
}

/// What a scan found, and how much it looked at.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Findings, in the order found.
    pub findings: Vec<Finding>,
    /// Files read.
    pub files_scanned: usize,
    /// Process environments read.
    pub processes_scanned: usize,
}

/// `sk-p… (56 chars)`: enough to recognise a value you hold, not to use it. Characters are
/// shown only when the value starts with a public marker (`public_prefix`), at most a quarter
/// of it and never of a value of 8 characters or fewer; otherwise only the length.
pub fn mask(value: &str, public_prefix: bool) -> String {
    let length = value.chars().count();
    if !public_prefix || length <= 8 {
        return format!("({length} chars)");
    }
    let shown: String = value.chars().take((length / 4).min(4)).collect();
    format!("{shown}… ({length} chars)")
}

/// Scans what `options` names.
pub fn scan(options: &Options) -> Report {
    let mut report = Report {
        findings: Vec::new(),
        files_scanned: 0,
        processes_scanned: 0,
    };
    if options.processes {
        places::process_environments(&mut report);
    }
    for home in &options.homes {
        places::home(home, &mut report);
    }
    if options.system {
        places::system(&mut report);
    }
    hooks::startup_hooks(&options.homes, options.system, &mut report);
    hooks::indicators(&options.homes, options.system, &mut report);
    report
}

/// Adds a finding for each credential in `text`, read from `place`.
pub(crate) fn findings_in(text: &str, place: &str, fix: &str, report: &mut Report) {
    for m in patterns::find(text) {
        report.findings.push(Finding {
            place: place.to_string(),
            kind: m.kind.to_string(),
            severity: m.severity,
            masked: Some(mask(m.value.expose(), m.public_prefix)),
            sha256: None,
            fix: fix.to_string(),
            value: Some(m.value),
        });
    }
}

/// A file's contents as text, if it is a regular file of at most `max` bytes (lossy: binary
/// files still show their ASCII tokens).
pub(crate) fn read_small(path: &Path, max: u64) -> Option<Zeroizing<String>> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.is_file() || meta.len() > max {
        return None;
    }
    let bytes = Zeroizing::new(std::fs::read(path).ok()?);
    Some(Zeroizing::new(String::from_utf8_lossy(&bytes).into_owned()))
}

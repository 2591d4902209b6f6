//! The secrets-hygiene sweep, run at the end of each drill with its daemon still up: every known
//! value (everything the fake provider ever created or issued, everything an agent was given)
//! and the passphrase are looked for in the store, its WAL and shared memory, the daemons' logs
//! and every other file the daemon made; every file, directory and socket it made is checked for
//! loose modes; the daemon's core-dump limit must be zero.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use keywarden_testkit::{Env, PASSPHRASE};

use crate::kit::Violations;

/// Files the drill itself wrote or that hold values by design: the config and passphrase, the
/// fake provider's state (`upstream/`) and the consumers' targets (`out/`).
fn by_design(rel: &Path) -> bool {
    matches!(
        rel.to_str(),
        Some("keywarden.toml" | "passphrase" | "daemons.log")
    ) || rel.starts_with("upstream")
        || rel.starts_with("out")
}

/// Known byte strings grouped by length, with a table of their first two bytes to skip most
/// positions at the cost of an array read, so a file is read once whatever their number.
struct Needles {
    by_len: HashMap<usize, HashSet<Vec<u8>>>,
    starts: Vec<bool>,
}

impl Needles {
    fn new<'a>(values: impl Iterator<Item = &'a [u8]>) -> Needles {
        let mut by_len: HashMap<usize, HashSet<Vec<u8>>> = HashMap::new();
        let mut starts = vec![false; 1 << 16];
        for v in values.filter(|v| v.len() >= 8) {
            starts[usize::from(v[0]) << 8 | usize::from(v[1])] = true;
            by_len.entry(v.len()).or_default().insert(v.to_vec());
        }
        Needles { by_len, starts }
    }

    fn count(&self) -> usize {
        self.by_len.values().map(HashSet::len).sum()
    }

    /// How many positions of `hay` start a known string.
    fn found_in(&self, hay: &[u8]) -> usize {
        let mut found = 0;
        for i in 0..hay.len().saturating_sub(1) {
            if !self.starts[usize::from(hay[i]) << 8 | usize::from(hay[i + 1])] {
                continue;
            }
            for (len, set) in &self.by_len {
                found += usize::from(hay.get(i..i + len).is_some_and(|w| set.contains(w)));
            }
        }
        found
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        out.push(path.clone());
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&path, out);
        }
    }
}

/// Sweeps `env` (daemon `pid` running) for `known` values; a one-line summary.
pub fn sweep(env: &Env, pid: u32, known: &[String], violations: &mut Violations) -> String {
    let needles = Needles::new(
        known
            .iter()
            .map(|v| v.as_bytes())
            .chain(std::iter::once(PASSPHRASE.as_bytes())),
    );
    let root = env.dir.path();
    let mut paths = Vec::new();
    walk(root, &mut paths);
    let (mut files, mut sockets, mut bytes) = (0, 0, 0u64);
    for path in &paths {
        let rel = path.strip_prefix(root).unwrap();
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            continue; // gone since the walk (a temporary file)
        };
        let mode = meta.mode() & 0o7777;
        let ft = meta.file_type();
        if ft.is_socket() {
            sockets += 1;
            let admin = rel.ends_with("admin.sock");
            let loose = if admin {
                mode & 0o077 != 0
            } else {
                mode & 0o002 != 0
            };
            violations.check(!loose, || {
                format!("socket {} has mode {mode:o}", rel.display())
            });
            continue;
        }
        if ft.is_dir() {
            if rel.starts_with("upstream") {
                continue; // the fake provider's, open to the plugin's user by the test kit
            }
            violations.check(mode & 0o022 == 0, || {
                format!(
                    "directory {} is writable by others ({mode:o})",
                    rel.display()
                )
            });
            if rel.starts_with("data") {
                violations.check(mode & 0o077 == 0, || {
                    format!("the store's directory {} has mode {mode:o}", rel.display())
                });
            }
            continue;
        }
        // Every file the daemon made is 0600 (consumers' targets as configured: 0600 here).
        if !matches!(rel.to_str(), Some("keywarden.toml" | "daemons.log"))
            && !rel.starts_with("upstream")
        {
            violations.check(mode & 0o077 == 0, || {
                format!("file {} has mode {mode:o}", rel.display())
            });
        }
        if by_design(rel) && rel.to_str() != Some("daemons.log") {
            continue;
        }
        let Ok(content) = std::fs::read(path) else {
            continue;
        };
        files += 1;
        bytes += content.len() as u64;
        let found = needles.found_in(&content);
        violations.check(found == 0, || {
            format!(
                "{found} known values or the passphrase in {}",
                rel.display()
            )
        });
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let core_soft = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .and_then(|l| l.split_whitespace().nth(4).map(str::to_string));
    violations.check(core_soft.as_deref() == Some("0"), || {
        format!("the daemon's core-dump limit is {core_soft:?}")
    });
    format!(
        "hygiene: {} known values and the passphrase looked for in {files} files ({:.1} MB); {} paths and {sockets} sockets checked for modes; core limit {}",
        needles.count() - 1,
        bytes as f64 / 1e6,
        paths.len(),
        core_soft.unwrap_or_default()
    )
}

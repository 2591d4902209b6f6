//! Start-up hooks and indicators: the `.pth` file the March 2026 payload used to run at every
//! Python start-up (site.py executes each `.pth` line that begins with `import`),
//! `sitecustomize`/`usercustomize` modules, and the payload's persistence files.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Finding, Report, Severity, read_small};

/// The payload's file names and places: its hook, its persistence, its drop and state files.
const PAYLOAD_HOOK: &str = "litellm_init.pth";
const HOME_INDICATORS: &[&str] = &[
    ".config/sysmon/sysmon.py",
    ".config/systemd/user/sysmon.service",
];
const SYSTEM_INDICATORS: &[&str] = &["/tmp/pglog", "/tmp/.pg_state"];
/// Words in an executable `.pth` line that only a loader of hidden or fetched code needs.
const HIDDEN_CODE_WORDS: &[&str] = &["base64", "b64decode", "urlopen", "marshal", "zlib"];
/// Words of a `.pth` line that runs arbitrary code (legitimate packages rarely need them).
const RUNS_CODE_WORDS: &[&str] = &["exec(", "eval(", "subprocess", "os.system"];
/// How long one Python may take to name its site-packages.
const PYTHON_TIMEOUT: Duration = Duration::from_secs(5);
/// How deep virtualenvs are looked for under a home.
const VENV_DEPTH: usize = 5;

/// Every `.pth` hook and customize module in the site-packages of every Python on `PATH` (with
/// `system`) and of the virtualenvs under `homes`.
pub fn startup_hooks(homes: &[PathBuf], system: bool, report: &mut Report) {
    let mut dirs = BTreeSet::new();
    if system {
        for python in pythons_on_path() {
            dirs.extend(site_packages_of(&python));
        }
    }
    for home in homes {
        find_site_packages(home, 0, &mut dirs);
    }
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".pth") {
                pth(&path, &name, report);
            } else if matches!(name.as_str(), "sitecustomize.py" | "usercustomize.py") {
                report.findings.push(file_finding(
                    &path,
                    "python-customize-module",
                    Severity::Medium,
                    "it runs at every Python start-up: check that you put it there",
                ));
            }
        }
    }
}

/// The payload's persistence and drop files.
pub fn indicators(homes: &[PathBuf], system: bool, report: &mut Report) {
    let mut paths: Vec<PathBuf> = homes
        .iter()
        .flat_map(|h| HOME_INDICATORS.iter().map(move |rel| h.join(rel)))
        .collect();
    if system {
        paths.extend(SYSTEM_INDICATORS.iter().map(PathBuf::from));
    }
    for path in paths.into_iter().filter(|p| p.exists()) {
        report.findings.push(file_finding(
            &path,
            "known-indicator",
            Severity::Critical,
            "a file the March 2026 credential harvester leaves: treat this host as compromised \
             (`keywarden rotate-all --assume-compromise`), stop its unit, remove the file",
        ));
    }
}

/// A `.pth` file: reported when a line will be executed; critical when it is the payload's
/// name or its executable lines look like a loader.
fn pth(path: &Path, name: &str, report: &mut Report) {
    let Some(text) = read_small(path, 1 << 20) else {
        return;
    };
    report.files_scanned += 1;
    let executable: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("import ") || l.starts_with("import\t"))
        .collect();
    if executable.is_empty() && name != PAYLOAD_HOOK {
        return;
    }
    let has = |words: &[&str]| {
        executable
            .iter()
            .any(|l| words.iter().any(|w| l.contains(w)))
    };
    let (severity, fix) = if name == PAYLOAD_HOOK || has(HIDDEN_CODE_WORDS) {
        (
            Severity::Critical,
            "a start-up hook that loads hidden code, as the March 2026 payload's did: treat \
             this host as compromised (`keywarden rotate-all --assume-compromise`), then remove \
             the package that installed it",
        )
    } else if has(RUNS_CODE_WORDS) {
        (
            Severity::High,
            "it runs arbitrary code (exec, eval or a subprocess) at every Python start-up: read \
             it, and remove it unless you know what put it there",
        )
    } else {
        (
            Severity::Medium,
            "it runs code at every Python start-up: check which package installed it",
        )
    };
    report
        .findings
        .push(file_finding(path, "python-startup-hook", severity, fix));
}

fn file_finding(path: &Path, kind: &str, severity: Severity, fix: &str) -> Finding {
    let sha256 = std::fs::read(path)
        .ok()
        .map(|b| crate::crypto::hex(&crate::crypto::sha256(&b)));
    Finding {
        place: path.display().to_string(),
        kind: kind.into(),
        severity,
        masked: None,
        sha256,
        fix: fix.into(),
        value: None,
    }
}

/// `python3`, `python3.N` and `python` executables on `PATH`, each real file once.
fn pythons_on_path() -> Vec<PathBuf> {
    let mut seen = BTreeSet::new();
    let mut found = Vec::new();
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let python = name == "python"
                || name == "python3"
                || (name.starts_with("python3.") && name[8..].chars().all(|c| c.is_ascii_digit()));
            if python
                && let Ok(real) = entry.path().canonicalize()
                && seen.insert(real.clone())
            {
                found.push(real);
            }
        }
    }
    found
}

/// The site-packages directories `python` loads at start-up (`site.getsitepackages()` and the
/// user site), asked of it with a timeout and no site of its own (`-S`, `-I`).
fn site_packages_of(python: &Path) -> Vec<PathBuf> {
    let mut child = match std::process::Command::new(python)
        .args([
            "-I",
            "-S",
            "-c",
            "import site,sys\nfor p in site.getsitepackages()+[site.getusersitepackages()]: print(p)",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(_) => return Vec::new(),
    };
    let deadline = std::time::Instant::now() + PYTHON_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Vec::new();
            }
        }
    }
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        use std::io::Read;
        let _ = stdout.read_to_string(&mut out);
    }
    out.lines().map(PathBuf::from).collect()
}

/// `lib/python3*/site-packages` directories of virtualenvs under `dir`.
fn find_site_packages(dir: &Path, depth: usize, found: &mut BTreeSet<PathBuf>) {
    if depth > VENV_DEPTH {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "site-packages" {
            found.insert(entry.path());
        } else if !matches!(name.as_str(), ".git" | "node_modules" | ".cache" | "target") {
            find_site_packages(&entry.path(), depth + 1, found);
        }
    }
}

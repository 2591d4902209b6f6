//! `scan`: what a credential harvester would take from this host, and which of it keywarden
//! already manages; `import`: moving plaintext credentials out of `.env` files (or the
//! environment) into the store.

use std::io::IsTerminal;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Args;
use hyper::Method;
use serde_json::{Value, json};
use zeroize::Zeroizing;

use super::Context;
use super::daemon_cmds::{admin, daemon_socket};
use super::output::print_json;
use crate::passphrase::{self, Purpose};
use crate::scan::{self, Finding, Severity};
use crate::store::Access;
use crate::vault::Vault;

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    keywarden scan                      # this user's home, readable processes, system places\n  \
    keywarden scan --all-users --json   # as root: every home\n  \
    keywarden scan --home /srv/app --fail-on critical\n\n\
    Values are never printed: a finding shows the first characters and the length. Exit code 1 \
    when a finding at or above --fail-on is found. Nothing is sent anywhere.")]
pub(crate) struct ScanArgs {
    /// Print {"findings":[…],"files_scanned","processes_scanned","matched_against_store"}.
    #[arg(long)]
    json: bool,
    /// A home directory to scan (repeatable). Default: $HOME, plus the system places and every
    /// Python on PATH; given explicitly, only these homes (and process environments).
    #[arg(long = "home", value_name = "DIR")]
    homes: Vec<PathBuf>,
    /// Every user's home (from /etc/passwd); needs root to read them.
    #[arg(long)]
    all_users: bool,
    /// Exit 1 when a finding is at least this severe.
    #[arg(long, value_enum, default_value_t = Severity::High)]
    fail_on: Severity,
}

pub(crate) async fn scan(ctx: &Context, args: ScanArgs) -> anyhow::Result<ExitCode> {
    let explicit = !args.homes.is_empty();
    let mut homes = args.homes.clone();
    if args.all_users {
        homes.extend(all_homes());
    } else if !explicit {
        homes.extend(std::env::var_os("HOME").map(PathBuf::from));
    }
    homes.sort();
    homes.dedup();
    let options = scan::Options {
        homes,
        processes: true,
        system: !explicit || args.all_users,
    };
    let report = tokio::task::spawn_blocking(move || scan::scan(&options)).await?;
    let copies = copies(ctx, &report.findings).await;
    let worst = report.findings.iter().map(|f| f.severity).max();
    if args.json {
        let findings: Vec<Value> = report
            .findings
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let mut v = serde_json::to_value(f).expect("findings serialize");
                v["managed"] = copies
                    .as_ref()
                    .and_then(|c| c.get(i).cloned())
                    .unwrap_or(Value::Null);
                v
            })
            .collect();
        print_json(&json!({
            "findings": findings,
            "files_scanned": report.files_scanned,
            "processes_scanned": report.processes_scanned,
            "matched_against_store": copies.is_some(),
        }))?;
    } else {
        for (i, f) in report.findings.iter().enumerate() {
            let managed = copies
                .as_ref()
                .and_then(|c| c.get(i))
                .filter(|m| !m.is_null())
                .map(describe_copy)
                .unwrap_or_default();
            println!(
                "{:<8} {:<26} {}{}{}",
                format!("{:?}", f.severity).to_uppercase(),
                f.kind,
                f.place,
                f.masked
                    .as_ref()
                    .map(|m| format!("  {m}"))
                    .unwrap_or_default(),
                managed
            );
            println!("         fix: {}", f.fix);
        }
        println!(
            "{} finding(s) in {} file(s) and {} process environment(s){}",
            report.findings.len(),
            report.files_scanned,
            report.processes_scanned,
            if copies.is_some() {
                ""
            } else {
                " (not matched against the store: no daemon, and no store or passphrase here)"
            }
        );
    }
    Ok(if worst.is_some_and(|w| w >= args.fail_on) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `  = a copy of openai/prod version 3 (current)`.
fn describe_copy(hit: &Value) -> String {
    format!(
        "  = a copy of {} version {} ({})",
        hit["secret"].as_str().unwrap_or(""),
        hit["version"],
        hit["stage"].as_str().unwrap_or("")
    )
}

/// For each finding, the newest stored version it is a copy of (or null): through the daemon,
/// or on the store unlocked here; `None` when neither is possible (said on stderr).
async fn copies(ctx: &Context, findings: &[Finding]) -> Option<Vec<Value>> {
    // Each distinct value once (a token in many process environments is one question).
    let mut values: Vec<&str> = findings
        .iter()
        .filter_map(|f| f.value.as_ref().map(|v| v.expose()))
        .collect();
    values.sort_unstable();
    values.dedup();
    let found = if let Some(socket) = daemon_socket(ctx).await {
        let body = json!({ "values": values });
        match admin(socket, Method::POST, "/v1/admin/copies", Some(body)).await {
            Ok(found) => found,
            Err(e) => {
                eprintln!("could not match the findings against the store: {e:#}");
                return None;
            }
        }
    } else {
        let store = ctx.open_store(Access::ReadOnly).await.ok()?;
        let passphrase = passphrase::obtain(Purpose::Unlock).ok()?;
        let vault = Vault::unlock(store, &passphrase).await.ok()?;
        crate::admin::copies_json(&vault.copies_of(&values).await.ok()?)
    };
    let found = found.as_array()?;
    Some(
        findings
            .iter()
            .map(|f| {
                let value = f.value.as_ref()?;
                let at = values.binary_search(&value.expose()).ok()?;
                // The newest version it copies says most (is it still current?).
                let hits = found.get(at)?.as_array()?;
                hits.iter().max_by_key(|h| h["version"].as_i64()).cloned()
            })
            .map(|hit| hit.unwrap_or(Value::Null))
            .collect(),
    )
}

/// Home directories of every account in /etc/passwd that has one, and /root.
fn all_homes() -> Vec<PathBuf> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let mut homes: Vec<PathBuf> = passwd
        .lines()
        .filter_map(|l| l.split(':').nth(5))
        .map(PathBuf::from)
        .filter(|h| h.is_dir() && h != Path::new("/") && !h.starts_with("/nonexistent"))
        .collect();
    homes.push(PathBuf::from("/root"));
    homes
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    keywarden import --env-file app/.env --prefix app/            # store, print the config\n  \
    keywarden import --env-file app/.env --prefix app/ --shred --yes\n  \
    keywarden import --env OPENAI_API_KEY --prefix agent/\n  \
    keywarden import --aws-profile deployer --prefix aws/ --shred --yes\n\n\
    Only lines that hold credentials (a known token shape, or a name like *_API_KEY, *_TOKEN, \
    *_SECRET, *PASSWORD*) are imported; the rest of the file stays. --shred rewrites the file \
    without them (same owner and mode; a file left with nothing but comments and blank lines is \
    removed; symlinks and hard-linked files are refused). Overwriting a file does not \
    reach copies a journaling file system or an SSD keeps elsewhere: rotate what you import \
    (--rotate does, where the secret's provider can).")]
pub(crate) struct ImportArgs {
    /// A `.env`-style file of VAR=value lines.
    #[arg(long, value_name = "FILE", required_unless_present_any = ["env", "aws_profile"])]
    env_file: Option<PathBuf>,
    /// A variable of this process's environment (repeatable).
    #[arg(long = "env", value_name = "VAR")]
    env: Vec<String>,
    /// A profile of ~/.aws/credentials (or $AWS_SHARED_CREDENTIALS_FILE): its secret access key
    /// becomes a secret for the `aws-iam` provider, with `meta.access_key_id`; `--shred` removes
    /// the two key lines from that file.
    #[arg(long, value_name = "NAME")]
    aws_profile: Option<String>,
    /// Secret names are this prefix plus the variable's name in lower case, `_` as `-`.
    #[arg(long, default_value = "imported/")]
    prefix: String,
    /// Remove the imported lines from the file afterwards.
    #[arg(long)]
    shred: bool,
    /// Ask the daemon to rotate each imported secret whose declared provider can create one.
    #[arg(long)]
    rotate: bool,
    /// Do not ask before shredding (needed without a terminal).
    #[arg(long)]
    yes: bool,
    /// Print {"imported":[{"variable","secret","version","kind","provider"}],"shredded",
    /// "rotated"}.
    #[arg(long)]
    json: bool,
}

/// Where a credential to import was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    EnvFile,
    Environment,
    AwsCredentials,
}

/// One credential to import.
struct Candidate {
    variable: String,
    value: Zeroizing<String>,
    kind: String,
    from: Source,
    /// Its line numbers in the file it came from (0-based), for --shred.
    lines: Vec<usize>,
    meta: crate::vault::Meta,
}

/// The provider to declare a credential of this kind with, and a note where a plugin could
/// rotate it instead.
fn provider_for(kind: &str) -> (&'static str, Option<&'static str>) {
    match kind {
        "aws-secret-access-key" | "aws-access-key-id" => ("aws-iam", None),
        "openai-admin-key" | "openai-key" | "anthropic-admin-key" | "anthropic-key" => (
            "manual",
            Some("or a keywarden-plugin-http preset (README \"The HTTP plugin\")"),
        ),
        _ => ("manual", None),
    }
}

/// The shared credentials file of the AWS CLI.
fn aws_credentials_file() -> PathBuf {
    std::env::var_os("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".aws/credentials")
        })
}

/// The access key of `[profile]` in an AWS credentials file, as one candidate.
fn aws_profile_candidate(text: &str, profile: &str) -> anyhow::Result<Candidate> {
    let mut in_profile = false;
    let (mut id, mut secret) = (None, None);
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.starts_with('[') {
            in_profile = line.trim_matches(|c| c == '[' || c == ']').trim() == profile;
            continue;
        }
        if !in_profile {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            match k.trim() {
                "aws_access_key_id" => id = Some((n, v.trim().to_string())),
                "aws_secret_access_key" => secret = Some((n, Zeroizing::new(v.trim().to_string()))),
                _ => {}
            }
        }
    }
    let (Some((id_line, id)), Some((secret_line, secret))) = (id, secret) else {
        bail!("no aws_access_key_id and aws_secret_access_key in profile [{profile}]");
    };
    let mut meta = crate::vault::Meta::new();
    meta.insert("access_key_id".into(), Value::String(id));
    Ok(Candidate {
        variable: format!("aws_{profile}"),
        value: secret,
        kind: "aws-secret-access-key".into(),
        from: Source::AwsCredentials,
        lines: vec![id_line, secret_line],
        meta,
    })
}

pub(crate) async fn import(ctx: &Context, args: ImportArgs) -> anyhow::Result<ExitCode> {
    let mut candidates = Vec::new();
    let mut file_text = None;
    if let Some(path) = &args.env_file {
        let file = read_plain_file(path)?;
        candidates.extend(env_file_candidates(&file.text));
        file_text = Some(file);
    }
    for variable in &args.env {
        let value = Zeroizing::new(
            std::env::var(variable)
                .with_context(|| format!("{variable} is not set in this environment"))?,
        );
        let kind = credential_kind(variable, &value).unwrap_or_else(|| "value".into());
        candidates.push(Candidate {
            variable: variable.clone(),
            value,
            kind,
            from: Source::Environment,
            lines: Vec::new(),
            meta: crate::vault::Meta::new(),
        });
    }
    let mut aws_file = None;
    if let Some(profile) = &args.aws_profile {
        let path = aws_credentials_file();
        let file = read_plain_file(&path)?;
        candidates.push(aws_profile_candidate(&file.text, profile)?);
        aws_file = Some((path, file));
    }
    if args.shred && args.env_file.is_none() && aws_file.is_none() {
        bail!("--shred removes lines from --env-file or the --aws-profile file; there is none");
    }
    if candidates.is_empty() {
        bail!("nothing that looks like a credential to import");
    }
    let target = super::vault_cmds::Target::of(ctx).await?;
    let mut imported = Vec::new();
    for c in &candidates {
        let name = format!(
            "{}{}",
            args.prefix,
            c.variable.to_ascii_lowercase().replace('_', "-")
        );
        crate::name::validate(&name)
            .with_context(|| format!("{} would be stored as {name:?}", c.variable))?;
        let value = crate::value::SecretValue::new(c.value.to_string());
        let version = target.put(ctx, &name, &value, c.meta.clone()).await?;
        imported.push(json!({
            "variable": c.variable,
            "secret": name,
            "version": version,
            "kind": c.kind,
            "provider": provider_for(&c.kind).0,
        }));
    }
    let mut shredded = Vec::new();
    if args.shred {
        // Each file loses the lines its candidates came from.
        let lines_from = |source: Source| -> Vec<usize> {
            candidates
                .iter()
                .filter(|c| c.from == source)
                .flat_map(|c| c.lines.iter().copied())
                .collect()
        };
        if let (Some(path), Some(file)) = (&args.env_file, &file_text) {
            confirm_shred(path, args.yes)?;
            shred(path, file, &lines_from(Source::EnvFile))?;
            shredded.push(path.display().to_string());
        }
        if let Some((path, file)) = &aws_file {
            confirm_shred(path, args.yes)?;
            shred(path, file, &lines_from(Source::AwsCredentials))?;
            shredded.push(path.display().to_string());
        }
    }
    let rotated = if args.rotate {
        rotate(ctx, &imported).await
    } else {
        Vec::new()
    };
    if args.json {
        print_json(&json!({ "imported": imported, "shredded": shredded, "rotated": rotated }))?;
    } else {
        print_imported(&imported, &shredded, &rotated);
    }
    Ok(ExitCode::SUCCESS)
}

/// The credentials among a `.env` file's lines.
fn env_file_candidates(text: &str) -> Vec<Candidate> {
    let mut candidates = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let Some((variable, value)) = env_line(line) else {
            continue;
        };
        if let Some(kind) = credential_kind(&variable, &value) {
            candidates.push(Candidate {
                variable,
                value,
                kind,
                from: Source::EnvFile,
                lines: vec![n],
                meta: crate::vault::Meta::new(),
            });
        }
    }
    candidates
}

/// What `import` did, for a person: what was stored (stderr), the config to declare and the
/// `exec` line that replaces the file (stdout).
fn print_imported(imported: &[Value], shredded: &[String], rotated: &[String]) {
    for i in imported {
        eprintln!(
            "stored {} ({}) as {} version {}",
            i["variable"].as_str().unwrap_or(""),
            i["kind"].as_str().unwrap_or(""),
            i["secret"].as_str().unwrap_or(""),
            i["version"]
        );
    }
    println!("# keywarden.toml: declare them");
    for i in imported {
        let note = provider_for(i["kind"].as_str().unwrap_or(""))
            .1
            .map(|n| format!("  # {n}"))
            .unwrap_or_default();
        println!(
            "[secrets.\"{}\"]\nprovider = \"{}\"{note}\n",
            i["secret"].as_str().unwrap_or(""),
            i["provider"].as_str().unwrap_or("manual")
        );
    }
    println!("# run the app with them (put these lines in a file for --env-file):");
    let mut exec = String::from("keywarden exec");
    for i in imported {
        let var = i["variable"].as_str().unwrap_or("");
        let secret = i["secret"].as_str().unwrap_or("");
        println!("# {var}={secret}");
        exec.push_str(&format!(" --env {var}={secret}"));
    }
    println!("{exec} -- YOUR-APP");
    if !shredded.is_empty() {
        eprintln!(
            "removed the imported lines from {}; rotate the values too (they sat in plaintext)",
            shredded.join(" and ")
        );
    }
    for r in rotated {
        eprintln!("{r}");
    }
}

/// `VAR=value` (or `export VAR="value"`): a quoted value up to its closing quote (a double-
/// quoted one with `\"` and `\\` unescaped), an unquoted one up to ` #`; `None` for comments,
/// blank lines, and what cannot be read for sure (an unclosed quote: a multi-line value), which
/// `import` then neither stores nor removes.
fn env_line(line: &str) -> Option<(String, Zeroizing<String>)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let line = line.strip_prefix("export ").unwrap_or(line);
    let (var, value) = line.split_once('=')?;
    let var = var.trim();
    if var.is_empty() || !var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return None;
    }
    let value = value.trim_start();
    let parsed = if let Some(rest) = value.strip_prefix('\'') {
        let end = rest.find('\'')?;
        rest[..end].to_string()
    } else if let Some(rest) = value.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = rest.chars();
        loop {
            match chars.next()? {
                '"' => break,
                '\\' => match chars.next()? {
                    c @ ('"' | '\\') => out.push(c),
                    c => {
                        out.push('\\');
                        out.push(c);
                    }
                },
                c => out.push(c),
            }
        }
        out
    } else {
        let end = value.find(" #").unwrap_or(value.len());
        value[..end].trim_end().to_string()
    };
    Some((var.to_string(), Zeroizing::new(parsed)))
}

/// The kind of credential `value` is (by its shape, else by its variable's name), or `None`.
fn credential_kind(variable: &str, value: &str) -> Option<String> {
    if value.is_empty() {
        return None;
    }
    if let Some(m) = scan::patterns::find(value).first() {
        return Some(m.kind.to_string());
    }
    scan::places::secret_variable(variable).then(|| "secret-variable".to_string())
}

fn confirm_shred(path: &Path, yes: bool) -> anyhow::Result<()> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        bail!(
            "refusing to rewrite {} without --yes (stdin is not a terminal); the values are stored",
            path.display()
        );
    }
    eprint!(
        "Remove the imported lines from {}? Type yes: ",
        path.display()
    );
    let mut typed = String::new();
    std::io::stdin().read_line(&mut typed)?;
    if typed.trim() != "yes" {
        bail!("not confirmed; the file is unchanged (the values are stored)");
    }
    Ok(())
}

/// A file read for `import`, with what identifies it, so `--shred` rewrites that very file.
struct PlainFile {
    text: Zeroizing<String>,
    dev: u64,
    ino: u64,
}

/// Reads a regular file that is not a symlink and has no other hard link (a shred must not
/// reach another file through it).
fn read_plain_file(path: &Path) -> anyhow::Result<PlainFile> {
    use std::io::Read;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("cannot read {} (symlinks are not followed)", path.display()))?;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.nlink() > 1 {
        bail!(
            "{} is not a plain file (a directory, device, or a file with other hard links): \
             refusing to import from it",
            path.display()
        );
    }
    let mut bytes = Zeroizing::new(Vec::new());
    file.read_to_end(&mut bytes)?;
    let text = std::str::from_utf8(&bytes)
        .with_context(|| format!("{} is not UTF-8 text", path.display()))?;
    Ok(PlainFile {
        text: Zeroizing::new(text.to_string()),
        dev: meta.dev(),
        ino: meta.ino(),
    })
}

/// Rewrites `path` without the lines `remove`, atomically (a new file beside it, same owner and
/// mode, synced, renamed over it) after zeroing the old one in place; removes it when nothing
/// but blank lines and comments is left. Refuses if `path` is no longer the file that was read.
fn shred(path: &Path, file: &PlainFile, remove: &[usize]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut old = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("cannot rewrite {}", path.display()))?;
    let meta = old.metadata()?;
    if (meta.dev(), meta.ino()) != (file.dev, file.ino) || meta.nlink() > 1 {
        bail!(
            "{} changed since it was read: not rewriting it (the values are stored)",
            path.display()
        );
    }
    let kept: Vec<&str> = file
        .text
        .lines()
        .enumerate()
        .filter(|(n, _)| !remove.contains(n))
        .map(|(_, l)| l)
        .collect();
    let nothing_left = kept
        .iter()
        .all(|l| l.trim().is_empty() || l.trim().starts_with('#'));
    let tmp = path.with_file_name(format!(
        ".{}.keywarden-import",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    if !nothing_left {
        let mut out = kept.join("\n");
        out.push('\n');
        let mut new = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        new.write_all(out.as_bytes())?;
        // The mode exactly (keywarden's own umask is 077), then the owner.
        new.set_permissions(meta.permissions())?;
        let _ = std::os::unix::fs::fchown(&new, Some(meta.uid()), Some(meta.gid()));
        new.sync_all()?;
    }
    // Zero the old blocks in place (what this does and does not reach: README).
    old.write_all(&vec![0u8; meta.len() as usize])?;
    old.sync_all()?;
    drop(old);
    if nothing_left {
        std::fs::remove_file(path)?;
    } else {
        std::fs::rename(&tmp, path)?;
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let _ = std::fs::File::open(dir.unwrap_or(Path::new("."))).and_then(|d| d.sync_all());
    Ok(())
}

/// Requests a rotation of each imported secret the daemon can rotate; returns what happened.
async fn rotate(ctx: &Context, imported: &[Value]) -> Vec<String> {
    let Some(socket) = daemon_socket(ctx).await else {
        return vec![
            "not rotated: the daemon is not running (start it, then `keywarden rotate NAME`)"
                .into(),
        ];
    };
    let mut said = Vec::new();
    for i in imported {
        let name = i["secret"].as_str().unwrap_or("");
        let path = format!("/v1/admin/rotate/{name}?wait=0");
        match admin(socket, Method::POST, &path, None).await {
            Ok(_) => said.push(format!("rotation of {name} started")),
            Err(e) => said.push(format!(
                "not rotated: {name}: {e:#} (rotate it at its provider, then `keywarden put {name}`)"
            )),
        }
    }
    said
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotenv_lines_are_read_as_dotenv_reads_them_or_not_at_all() {
        let read = |l: &str| env_line(l).map(|(k, v)| (k, v.to_string()));
        let pair = |k: &str, v: &str| Some((k.to_string(), v.to_string()));
        assert_eq!(read("API_KEY=abc # prod"), pair("API_KEY", "abc"));
        assert_eq!(read("API_KEY=\"abc\" # prod"), pair("API_KEY", "abc"));
        assert_eq!(read("export API_KEY='a#b c'"), pair("API_KEY", "a#b c"));
        assert_eq!(read(r#"API_KEY="a\"b\\c""#), pair("API_KEY", r#"a"b\c"#));
        assert_eq!(read("API_KEY=a#b"), pair("API_KEY", "a#b"));
        assert_eq!(read("JWT_SECRET=\"-----BEGIN PRIVATE KEY-----"), None);
        assert_eq!(read("# API_KEY=abc"), None);
        assert_eq!(read("not a line"), None);
    }
}

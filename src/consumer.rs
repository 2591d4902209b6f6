//! Consumers: where each new version is delivered. The built-in `file` consumer (atomic write
//! through a temporary file and rename, mode and owner as configured, a template, an optional
//! command afterwards) and plugin kinds that support `push`.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use zeroize::Zeroizing;

use crate::plugin_host::PluginHost;
use crate::plugin_host::Settings;
use crate::sandbox::Confinement;
use crate::value::SecretValue;
use crate::vault::{Meta, Revealed};

/// One version on its way to a consumer.
#[derive(Debug)]
pub struct Delivery<'a> {
    /// The secret's name.
    pub secret: &'a str,
    /// The version number.
    pub version: i64,
    /// The value.
    pub value: &'a SecretValue,
    /// Its non-secret facts.
    pub meta: &'a Meta,
}

impl<'a> Delivery<'a> {
    /// The delivery of a version read from the vault.
    pub fn of(revealed: &'a Revealed) -> Delivery<'a> {
        Delivery {
            secret: &revealed.name,
            version: revealed.version,
            value: &revealed.value,
            meta: &revealed.meta,
        }
    }
}

/// A configured consumer.
#[derive(Debug)]
pub enum Consumer {
    /// Writes a file.
    File(FileConsumer),
    /// Calls `push` on a plugin kind.
    Plugin {
        /// The plugin.
        host: Arc<PluginHost>,
        /// The kind.
        kind: String,
        /// Settings sent with each push.
        settings: Settings,
        /// Other secrets the push may use, by role.
        credentials: BTreeMap<String, String>,
    },
}

/// The `file` consumer.
#[derive(Debug, Clone)]
pub struct FileConsumer {
    /// The file written.
    pub path: PathBuf,
    /// Its mode.
    pub mode: u32,
    /// Its owner, if set.
    pub owner: Option<u32>,
    /// Its group, if set.
    pub group: Option<u32>,
    /// Its content template (default `{{value}}`).
    pub template: Template,
    /// A command run after each write.
    pub after: Vec<String>,
    /// How long `after` may run.
    pub after_timeout: Duration,
    /// How `after` is confined (it may also read the file it follows).
    pub after_confinement: Confinement,
}

/// A file consumer's content, parsed once from the config: text and placeholders
/// (`{{value}}`, `{{version}}`, `{{name}}`, `{{meta.KEY}}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Value,
    Version,
    Name,
    Meta(String),
}

/// Why a template was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `{{` with no `}}` after it.
    #[error("a '{{{{' has no closing '}}}}'")]
    Unterminated,
    /// A placeholder that is not one of the four.
    #[error("unknown placeholder {{{{{0}}}}}; use value, version, name or meta.KEY")]
    UnknownPlaceholder(String),
}

impl Template {
    /// Parses a template.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let end = after.find("}}").ok_or(TemplateError::Unterminated)?;
            parts.push(match after[..end].trim() {
                "value" => Part::Value,
                "version" => Part::Version,
                "name" => Part::Name,
                key => match key.strip_prefix("meta.").filter(|m| !m.is_empty()) {
                    Some(field) => Part::Meta(field.to_string()),
                    None => return Err(TemplateError::UnknownPlaceholder(key.to_string())),
                },
            });
            rest = &after[end + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// The template that writes the value alone (`{{value}}`).
    pub fn value_only() -> Template {
        Template {
            parts: vec![Part::Value],
        }
    }

    /// Whether the template writes lines (an env file, a config): its own text has a line
    /// break, so a line break inside a value would start a line of someone else's choosing.
    fn is_line_based(&self) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, Part::Text(t) if t.contains(['\n', '\r'])))
    }

    /// The content for one delivery. Fails when the version lacks a `meta` key the template
    /// names, or, in a line-based template, when a value or `meta` field carries a control
    /// character (a provider's `meta` with `\nLD_PRELOAD=…` must not become a line of its own).
    pub fn render(&self, d: &Delivery<'_>) -> Result<Zeroizing<String>, DeliveryError> {
        let line_based = self.is_line_based();
        let checked = |field: &str, text: &str| {
            if line_based && text.chars().any(char::is_control) {
                return Err(DeliveryError::ControlCharacter(field.to_string()));
            }
            Ok(())
        };
        let mut out = Zeroizing::new(String::with_capacity(64 + d.value.len()));
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Value => {
                    checked("value", d.value.expose())?;
                    out.push_str(d.value.expose());
                }
                Part::Version => out.push_str(&d.version.to_string()),
                Part::Name => out.push_str(d.secret),
                Part::Meta(field) => {
                    let text = match d.meta.get(field) {
                        Some(serde_json::Value::String(s)) => s.clone(),
                        Some(other) => other.to_string(),
                        None => return Err(DeliveryError::MissingMeta(field.clone())),
                    };
                    checked(&format!("meta.{field}"), &text)?;
                    out.push_str(&text);
                }
            }
        }
        Ok(out)
    }
}

impl<'de> serde::Deserialize<'de> for Template {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Template, D::Error> {
        let text = String::deserialize(d)?;
        Template::parse(&text).map_err(|e| serde::de::Error::custom(format!("template: {e}")))
    }
}

/// Why a delivery to the file consumer failed.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The template names a `meta` key the version does not have.
    #[error("the version has no meta.{0} for the template")]
    MissingMeta(String),
    /// A line-based template would get a control character (a line break) from a field.
    #[error(
        "{0} contains a control character (a line break?); a line-based template does not take \
         it, since it would add a line of its own"
    )]
    ControlCharacter(String),
    /// The target's directory could let another user swap the file.
    #[error("refusing to write into {path}: {why}")]
    UnsafeDirectory {
        /// The directory.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The consumer's path ends in no file name.
    #[error("{0} has no file name")]
    NoFileName(PathBuf),
    /// A filesystem call failed.
    #[error("cannot {what} {path}: {source}")]
    Io {
        /// What was tried (`write`, `create`).
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The blocking write task did not finish.
    #[error("the write task failed: {0}")]
    Task(String),
    /// The `after` command could not start, run, or finish well.
    #[error("{command:?} {problem}")]
    After {
        /// The command.
        command: String,
        /// What went wrong with it.
        problem: String,
    },
}

/// A [`DeliveryError::Io`] maker: what was being done, to which path.
fn io_error(what: &'static str, path: &Path) -> impl Fn(std::io::Error) -> DeliveryError {
    let path = path.to_path_buf();
    move |source| DeliveryError::Io {
        what,
        path: path.clone(),
        source,
    }
}

/// Removes what interrupted writes left beside the files of `consumers`: temporary files of
/// their naming (`.NAME.<32 hex digits>.tmp`), which a daemon killed between creating one and
/// renaming it over its file leaves behind, holding a value. Run at start, before anything is
/// delivered (no write of this daemon is in flight); each directory is listed once, and one that
/// others could write to is not touched (its files' writes fail with the reason). Returns the
/// paths removed, and the directories that could not be swept with why.
pub fn remove_leftovers(consumers: &[&FileConsumer]) -> (Vec<PathBuf>, Vec<DeliveryError>) {
    let mut by_directory: BTreeMap<&Path, Vec<&FileConsumer>> = BTreeMap::new();
    for c in consumers {
        by_directory.entry(c.directory()).or_default().push(c);
    }
    let (mut removed, mut failed) = (Vec::new(), Vec::new());
    for (dir, files) in by_directory {
        if !dir.is_dir() {
            continue;
        }
        sweep(dir, &files, &mut removed, &mut failed);
    }
    (removed, failed)
}

/// [`remove_leftovers`] in one directory, which holds every file of `files`: what it removed
/// is added to `removed`, what it could not look at or remove to `failed`, and it goes on past
/// an entry it cannot remove (a directory of that name is not one of ours).
fn sweep(
    dir: &Path,
    files: &[&FileConsumer],
    removed: &mut Vec<PathBuf>,
    failed: &mut Vec<DeliveryError>,
) {
    let dirfd = match files[0].open_directory() {
        Ok((dirfd, _)) => dirfd,
        Err(e) => return failed.push(e),
    };
    let names: std::collections::HashSet<&[u8]> = files
        .iter()
        .filter_map(|c| c.path.file_name())
        .map(|name| name.as_encoded_bytes())
        .collect();
    // `.NAME.<32 hex digits>.tmp`, NAME one of `files`.
    let ours = |entry: &[u8]| {
        let Some(middle) = entry
            .strip_prefix(b".")
            .and_then(|rest| rest.strip_suffix(b".tmp"))
        else {
            return false;
        };
        let (name, id) = middle.split_at(middle.len().saturating_sub(33));
        id.strip_prefix(b".")
            .is_some_and(|id| id.len() == 32 && id.iter().all(u8::is_ascii_hexdigit))
            && names.contains(name)
    };
    let listing = match rustix::fs::Dir::read_from(&dirfd) {
        Ok(listing) => listing,
        Err(e) => return failed.push(io_error("list", dir)(e.into())),
    };
    for entry in listing {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => return failed.push(io_error("list", dir)(e.into())),
        };
        let name = entry.file_name();
        if entry.file_type() == rustix::fs::FileType::Directory || !ours(name.to_bytes()) {
            continue;
        }
        let path = dir.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
        match rustix::fs::unlinkat(&dirfd, name, rustix::fs::AtFlags::empty()) {
            Ok(()) => removed.push(path),
            Err(e) => failed.push(io_error("remove", &path)(e.into())),
        }
    }
}

/// A user or group name that could not be resolved to an id.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{spec:?}: {why}")]
pub struct UnknownId {
    /// The name asked for.
    pub spec: String,
    /// Why it did not resolve.
    pub why: String,
}

/// Resolves a user (or group) given by name or number, from /etc/passwd (or /etc/group).
pub fn resolve_id(spec: &str, database: &str) -> Result<u32, UnknownId> {
    if let Ok(id) = spec.parse::<u32>() {
        return Ok(id);
    }
    let entry = crate::sandbox::database_entry(database, spec).map_err(|e| UnknownId {
        spec: spec.to_string(),
        why: format!("cannot read {database}: {e}"),
    })?;
    entry
        .and_then(|fields| fields.get(2)?.parse().ok())
        .ok_or_else(|| UnknownId {
            spec: spec.to_string(),
            why: format!("no entry in {database}"),
        })
}

impl FileConsumer {
    /// Writes the rendered template atomically, then runs `after`.
    pub async fn deliver(&self, d: &Delivery<'_>) -> Result<(), DeliveryError> {
        let content = self.template.render(d)?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.write_atomically(&content))
            .await
            .map_err(|e| DeliveryError::Task(e.to_string()))??;
        if !self.after.is_empty() {
            self.run_after(d).await?;
        }
        Ok(())
    }

    /// Whether the file holds what delivering `d` writes: not deleted, emptied or edited since.
    /// Whatever is at the path is not followed (a symlink), not waited on (a FIFO) and not read
    /// unless it is a regular file of the expected size, so the check is one small read on the
    /// caller's thread (at start every secret checks its files at once, and as many blocking
    /// tasks would each start a thread).
    pub fn holds(&self, d: &Delivery<'_>) -> bool {
        use rustix::fs::{FileType, Mode, OFlags};
        use std::io::Read;
        let Ok(content) = self.template.render(d) else {
            return false;
        };
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let Ok(fd) = rustix::fs::open(&self.path, flags, Mode::empty()) else {
            return false;
        };
        let regular_of_size = rustix::fs::fstat(&fd).is_ok_and(|st| {
            FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
                && u64::try_from(st.st_size).is_ok_and(|n| n == content.len() as u64)
        });
        if !regular_of_size {
            return false;
        }
        let mut bytes = Zeroizing::new(vec![0; content.len()]);
        std::fs::File::from(fd).read_exact(&mut bytes).is_ok()
            && bytes.as_slice() == content.as_bytes()
    }

    /// Writes `content` to a new temporary file beside the target and renames it over the
    /// target, everything relative to the target's directory opened once without following a
    /// symlink anywhere on its path (`openat2` with `RESOLVE_NO_SYMLINKS`): a directory on the
    /// path that another user swapped for a symlink cannot redirect the write. The directory
    /// must not be replaceable by others (see [`unsafe_directory`]).
    fn write_atomically(&self, content: &str) -> Result<(), DeliveryError> {
        use rustix::fs::{AtFlags, Mode, OFlags};
        self.make_directories()?;
        let (dirfd, file_name) = self.open_directory()?;
        // The name [`remove_leftovers`] looks for, byte for byte.
        let mut tmp = std::ffi::OsString::from(".");
        tmp.push(file_name);
        tmp.push(format!(".{}.tmp", uuid::Uuid::new_v4().simple()));
        let tmp = tmp.as_os_str();
        let result = (|| -> std::io::Result<()> {
            let fd = rustix::fs::openat(
                &dirfd,
                tmp,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )?;
            let mut f = std::fs::File::from(fd);
            f.write_all(content.as_bytes())?;
            if self.owner.is_some() || self.group.is_some() {
                rustix::fs::fchown(
                    &f,
                    self.owner.map(rustix::fs::Uid::from_raw),
                    self.group.map(rustix::fs::Gid::from_raw),
                )?;
            }
            rustix::fs::fchmod(&f, Mode::from_raw_mode(self.mode))?;
            f.sync_all()?;
            crash_point!("consumer.temp-written");
            rustix::fs::renameat(&dirfd, tmp, &dirfd, file_name)?;
            Ok(rustix::fs::fsync(&dirfd)?)
        })();
        result.map_err(|source| {
            let _ = rustix::fs::unlinkat(&dirfd, tmp, AtFlags::empty());
            io_error("write", &self.path)(source)
        })
    }

    /// Makes the file's missing directories, 0755 (explicitly: the daemon's umask is 077) so
    /// the program that reads the file can reach it; the file's own mode protects it. Each is
    /// made with `mkdirat` in its parent's handle (the first parent opened without following a
    /// symlink, as [`Self::open_directory`] opens), then opened without following a symlink,
    /// made 0755 through that handle and synced into its parent. Nothing is done by path: a
    /// user who can write above a new directory and swaps it for a symlink as it is made gets
    /// an error, not a chmod or a directory made wherever the symlink points.
    fn make_directories(&self) -> Result<(), DeliveryError> {
        use rustix::fs::{Mode, OFlags, ResolveFlags};
        let missing: Vec<&Path> = self
            .directory()
            .ancestors()
            .take_while(|d| !d.exists())
            .collect();
        let Some(top) = missing.last() else {
            return Ok(());
        };
        let base = top
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let directory = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let mut parent = rustix::fs::openat2(
            rustix::fs::CWD,
            base,
            directory,
            Mode::empty(),
            ResolveFlags::NO_SYMLINKS,
        )
        .map_err(|e| io_error("open", base)(e.into()))?;
        for d in missing.into_iter().rev() {
            let name = d
                .file_name()
                .ok_or_else(|| DeliveryError::NoFileName(d.to_path_buf()))?;
            let made = match rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o755)) {
                Ok(()) => true,
                Err(rustix::io::Errno::EXIST) => false,
                Err(e) => return Err(io_error("create", d)(e.into())),
            };
            #[cfg(feature = "failpoints")]
            fail::fail_point!("consumer.directory-made");
            let fd = rustix::fs::openat(&parent, name, directory | OFlags::NOFOLLOW, Mode::empty())
                .map_err(|e| io_error("open", d)(e.into()))?;
            if made {
                rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o755))
                    .and_then(|()| rustix::fs::fsync(&parent))
                    .map_err(|e| io_error("create", d)(e.into()))?;
            }
            parent = fd;
        }
        Ok(())
    }

    /// The directory the file is in.
    fn directory(&self) -> &Path {
        self.path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    }

    /// The file's directory, opened without following a symlink anywhere on its path
    /// (`openat2` with `RESOLVE_NO_SYMLINKS`) and checked (see [`Self::unsafe_directory`]), and
    /// the file's name in it.
    fn open_directory(&self) -> Result<(rustix::fd::OwnedFd, &std::ffi::OsStr), DeliveryError> {
        use rustix::fs::{Mode, OFlags, ResolveFlags};
        let dir = self.directory();
        let file_name = self
            .path
            .file_name()
            .ok_or_else(|| DeliveryError::NoFileName(self.path.clone()))?;
        let dirfd = rustix::fs::openat2(
            rustix::fs::CWD,
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::NO_SYMLINKS,
        )
        .map_err(|e| io_error("open the directory of", &self.path)(e.into()))?;
        let st = rustix::fs::fstat(&dirfd).map_err(|e| io_error("inspect", dir)(e.into()))?;
        if let Some(why) = self.unsafe_directory(&st) {
            return Err(DeliveryError::UnsafeDirectory {
                path: dir.to_path_buf(),
                why,
            });
        }
        Ok((dirfd, file_name))
    }

    /// Why the target's directory could let another user swap or read what is written: owned
    /// by someone other than root, this daemon's user or the consumer's `owner`, or writable by
    /// others (unless sticky), or by a group other than the consumer's `group`.
    fn unsafe_directory(&self, st: &rustix::fs::Stat) -> Option<String> {
        let me = rustix::process::geteuid().as_raw();
        let mode = st.st_mode;
        if st.st_uid != 0 && st.st_uid != me && Some(st.st_uid) != self.owner {
            return Some(format!("it is owned by uid {}", st.st_uid));
        }
        let sticky = mode & 0o1000 != 0;
        if mode & 0o002 != 0 && !sticky {
            return Some(format!(
                "it is writable by everyone (mode {:o})",
                mode & 0o7777
            ));
        }
        if mode & 0o020 != 0 && !sticky && Some(st.st_gid) != self.group {
            return Some(format!(
                "it is writable by group {} (mode {:o})",
                st.st_gid,
                mode & 0o7777
            ));
        }
        None
    }

    async fn run_after(&self, d: &Delivery<'_>) -> Result<(), DeliveryError> {
        let failed = |problem: String| DeliveryError::After {
            command: self.after[0].clone(),
            problem,
        };
        let mut cmd = self
            .after_confinement
            .command_for(&self.after, &[&self.path]);
        cmd.env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
            )
            .env("LANG", "C")
            .env("KEYWARDEN_SECRET", d.secret)
            .env("KEYWARDEN_VERSION", d.version.to_string())
            .env("KEYWARDEN_FILE", &self.path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| failed(format!("could not start: {e}")))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let run = async {
            let said = last_lines(stderr, AFTER_STDERR_KEPT).await?;
            Ok::<_, std::io::Error>((child.wait().await?, said))
        };
        match tokio::time::timeout(self.after_timeout, run).await {
            Err(_) => Err(failed(format!(
                "did not finish within {:?} and was killed",
                self.after_timeout
            ))),
            Ok(Err(e)) => Err(failed(format!("failed: {e}"))),
            Ok(Ok((status, _))) if status.success() => Ok(()),
            Ok(Ok((status, said))) => {
                // The command was handed the value (in the file it reads); what it says about
                // its failure is kept as the consumer's last error, so never with the value.
                let stderr = Zeroizing::new(String::from_utf8_lossy(&said).into_owned());
                let scrubbed = redact(&stderr, d.value.expose());
                let tail: String = scrubbed
                    .lines()
                    .last()
                    .unwrap_or("")
                    .chars()
                    .take(200)
                    .collect();
                Err(failed(format!(
                    "exited with {}{}",
                    status,
                    if tail.is_empty() {
                        String::new()
                    } else {
                        format!(": {tail}")
                    }
                )))
            }
        }
    }
}

/// How much of the end of an `after` command's stderr is kept (the rest is read and dropped, so
/// a command that writes without end neither blocks on its pipe nor grows the daemon).
const AFTER_STDERR_KEPT: usize = 64 << 10;

/// The whole lines among the last `keep` bytes `from` gives until its end. A line cut by the
/// window is dropped, so a value it held is never shown in part (where `redact` could not
/// find it).
async fn last_lines(
    mut from: impl tokio::io::AsyncRead + Unpin,
    keep: usize,
) -> std::io::Result<Zeroizing<Vec<u8>>> {
    use tokio::io::AsyncReadExt;
    // Made once as large as it gets: growing would leave copies of what it held behind.
    let mut kept = Zeroizing::new(Vec::with_capacity(2 * keep + 8192));
    let mut piece = Zeroizing::new(vec![0u8; 8192]);
    let mut mid_line = false;
    loop {
        let n = from.read(&mut piece).await?;
        if n == 0 {
            break;
        }
        kept.extend_from_slice(&piece[..n]);
        if kept.len() > 2 * keep {
            let excess = kept.len() - keep;
            mid_line = kept[excess - 1] != b'\n';
            kept.drain(..excess);
        }
    }
    if mid_line {
        let first_line_end = kept
            .iter()
            .position(|&b| b == b'\n')
            .map_or(kept.len(), |i| i + 1);
        kept.drain(..first_line_end);
    }
    Ok(kept)
}

/// `text` with `value`, and each line of it of 8 characters or more, replaced by `[redacted]`:
/// a command that prints one line of a multi-line value (a PEM key) shows nothing of it either.
fn redact(text: &str, value: &str) -> Zeroizing<String> {
    let mut out = Zeroizing::new(text.replace(value, "[redacted]"));
    for line in value.lines().map(str::trim).filter(|line| line.len() >= 8) {
        if out.contains(line) {
            out = Zeroizing::new(out.replace(line, "[redacted]"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn an_after_commands_endless_stderr_keeps_only_its_last_whole_lines() {
        let mut said = vec![b'x'; 10 << 20];
        said.extend_from_slice(b"\nfirst\nlast words\n");
        let kept = last_lines(&said[..], 1024).await.unwrap();
        assert_eq!(&kept[..], b"first\nlast words\n");
        // One line longer than the window: none of it.
        let kept = last_lines(&vec![b'k'; 1 << 20][..], 1024).await.unwrap();
        assert!(kept.is_empty());
        let kept = last_lines(&b"short\n"[..], 1024).await.unwrap();
        assert_eq!(&kept[..], b"short\n");
        // A window that starts right at a line's start keeps that line.
        let said = b"a\n".repeat(1600);
        let kept = last_lines(&said[..], 1024).await.unwrap();
        assert_eq!(kept.len(), 1024);
    }

    #[test]
    fn templates_render_value_version_name_and_meta() {
        let value = SecretValue::new("s3cr3t".into());
        let mut meta = Meta::new();
        meta.insert("access_key_id".into(), "AKIA1".into());
        let d = Delivery {
            secret: "aws/x",
            version: 7,
            value: &value,
            meta: &meta,
        };
        let t = Template::parse(
            "ID={{meta.access_key_id}}\nKEY={{ value }}\n# {{name}} v{{version}}\n",
        )
        .unwrap();
        assert_eq!(
            t.render(&d).unwrap().as_str(),
            "ID=AKIA1\nKEY=s3cr3t\n# aws/x v7\n"
        );
        assert!(
            Template::parse("{{meta.nope}}")
                .unwrap()
                .render(&d)
                .unwrap_err()
                .to_string()
                .contains("meta.nope")
        );
        assert_eq!(
            Template::parse("{{secret}}"),
            Err(TemplateError::UnknownPlaceholder("secret".into()))
        );
        assert_eq!(Template::parse("{{value"), Err(TemplateError::Unterminated));
        assert!(Template::parse("{{meta.}}").is_err());
    }

    #[test]
    fn ids_resolve_by_number_or_name() {
        assert_eq!(resolve_id("1234", "/etc/passwd").unwrap(), 1234);
        assert_eq!(resolve_id("root", "/etc/passwd").unwrap(), 0);
        assert!(resolve_id("no-such-user-here", "/etc/passwd").is_err());
    }

    // `after` commands run through the launcher of the `keywarden` binary, so they are tested
    // end to end in tests/sandbox.rs.
    fn consumer_at(path: PathBuf) -> FileConsumer {
        FileConsumer {
            path,
            mode: 0o600,
            owner: None,
            group: None,
            template: Template::value_only(),
            after: Vec::new(),
            after_timeout: Duration::from_secs(10),
            after_confinement: Confinement::default(),
        }
    }

    async fn deliver_v1(c: &FileConsumer) -> Result<(), DeliveryError> {
        let value = SecretValue::new("sk-consumer-value".into());
        c.deliver(&Delivery {
            secret: "s",
            version: 1,
            value: &value,
            meta: &Meta::new(),
        })
        .await
    }

    #[test]
    fn what_an_after_command_prints_of_a_multi_line_value_is_redacted() {
        let pem = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nBKcwggSjAgEAAoIBAQC7\n-----END PRIVATE KEY-----\n";
        let said = "reload failed: bad key line MIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n";
        let shown = redact(said, pem);
        assert!(
            !shown.contains("MIIEvQIBADANBgkqhkiG9w0BAQEFAASC"),
            "{}",
            *shown
        );
        assert!(
            shown.contains("reload failed: bad key line [redacted]"),
            "{}",
            *shown
        );
        assert_eq!(
            *redact("whole: sk-one-line-key", "sk-one-line-key"),
            "whole: [redacted]"
        );
    }

    #[test]
    fn leftovers_of_interrupted_writes_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let c = consumer_at(dir.path().join("token"));
        let missing = consumer_at(dir.path().join("not-yet/token"));
        let (removed, failed) = remove_leftovers(&[&c, &missing]);
        assert!(removed.is_empty() && failed.is_empty(), "{failed:?}");
        let hex = "0123456789abcdef0123456789abcdef";
        let leftover = format!(".token.{hex}.tmp");
        let kept = [
            "token".to_string(),
            format!(".token.{}.tmp", &hex[..31]),
            format!(".other.{hex}.tmp"),
            format!(".token.{}g.tmp", &hex[..31]),
            format!("token.{hex}.tmp"),
            ".token.tmp".to_string(),
        ];
        for name in kept.iter().chain([&leftover]) {
            std::fs::write(dir.path().join(name), "sk-left-behind").unwrap();
        }
        let (removed, failed) = remove_leftovers(&[&c, &missing]);
        assert_eq!(removed, [dir.path().join(&leftover)], "{failed:?}");
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut expected = kept.to_vec();
        expected.sort();
        assert_eq!(left, expected);
        // A directory of a leftover's name is not one: the sweep goes on past it.
        let not_ours = format!(".token.{}.tmp", "f".repeat(32));
        std::fs::create_dir(dir.path().join(&not_ours)).unwrap();
        std::fs::write(dir.path().join(&leftover), "sk-left-behind").unwrap();
        let (removed, failed) = remove_leftovers(&[&c]);
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(removed, [dir.path().join(&leftover)]);
        std::fs::remove_dir(dir.path().join(&not_ours)).unwrap();
        // Nothing is touched in a directory others can write to.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::write(dir.path().join(&leftover), "sk-left-behind").unwrap();
        let (removed, failed) = remove_leftovers(&[&c]);
        assert!(removed.is_empty());
        assert!(matches!(
            failed[..],
            [DeliveryError::UnsafeDirectory { .. }]
        ));
        assert!(dir.path().join(&leftover).exists());
    }

    /// The attack: a user who can write above a consumer's missing directory swaps each new
    /// directory for a symlink to a victim the moment it is made. Nothing outside is changed
    /// (before the fix, the daemon chmod-ed the victim 0755 and made directories inside it).
    #[tokio::test]
    async fn a_directory_swapped_for_a_symlink_as_it_is_made_redirects_nothing() {
        let root = tempfile::tempdir().unwrap();
        let victim = root.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o700)).unwrap();
        let made = root.path().join("a");
        let (made_in_callback, victim_in_callback) = (made.clone(), victim.clone());
        fail::cfg_callback("consumer.directory-made", move || {
            if made_in_callback.is_dir() && !made_in_callback.is_symlink() {
                std::fs::rename(&made_in_callback, made_in_callback.with_extension("moved"))
                    .unwrap();
                std::os::unix::fs::symlink(&victim_in_callback, &made_in_callback).unwrap();
            }
        })
        .unwrap();
        let c = consumer_at(made.join("b/token"));
        let result = deliver_v1(&c).await;
        fail::remove("consumer.directory-made");
        assert!(result.is_err(), "delivered through a symlink");
        let mode = std::fs::metadata(&victim).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o700, "the victim's mode was changed");
        assert_eq!(
            std::fs::read_dir(&victim).unwrap().count(),
            0,
            "made inside the victim"
        );
    }

    #[tokio::test]
    async fn a_file_holds_its_delivery_until_it_is_edited_or_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let c = consumer_at(dir.path().join("token"));
        let value = SecretValue::new("sk-consumer-value".into());
        let meta = Meta::new();
        let v1 = Delivery {
            secret: "s",
            version: 1,
            value: &value,
            meta: &meta,
        };
        assert!(!c.holds(&v1), "nothing written yet");
        deliver_v1(&c).await.unwrap();
        assert!(c.holds(&v1));
        std::fs::write(&c.path, "sk-consumer-valuX").unwrap();
        assert!(!c.holds(&v1), "edited");
        std::fs::remove_file(&c.path).unwrap();
        assert!(!c.holds(&v1), "deleted");
        // What something else put at the path is neither followed nor waited on.
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, "sk-consumer-value").unwrap();
        std::os::unix::fs::symlink(&elsewhere, &c.path).unwrap();
        assert!(!c.holds(&v1), "a symlink to the right content");
        std::fs::remove_file(&c.path).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &c.path,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert!(!c.holds(&v1), "a FIFO");
    }

    #[tokio::test]
    async fn a_symlinked_directory_on_the_path_does_not_redirect_the_write() {
        // Someone who could write above the target replaced a directory with a symlink to a
        // place of their choosing: the write must not land there.
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path().join("app")).unwrap();
        let c = consumer_at(dir.path().join("app/config/token"));
        std::fs::create_dir(elsewhere.join("config")).unwrap();
        let err = deliver_v1(&c).await.unwrap_err().to_string();
        assert!(err.contains("open the directory of"), "{err}");
        assert!(!elsewhere.join("config/token").exists());
        assert_eq!(
            std::fs::read_dir(elsewhere.join("config")).unwrap().count(),
            0
        );
    }

    #[tokio::test]
    async fn a_directory_others_may_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = deliver_v1(&consumer_at(shared.join("token")))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("writable by everyone"), "{err}");
        // Sticky (like /tmp): others cannot replace what they do not own.
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        deliver_v1(&consumer_at(shared.join("token")))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn file_consumer_writes_atomically_with_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.env");
        let c = FileConsumer {
            path: path.clone(),
            mode: 0o640,
            owner: None,
            group: None,
            template: Template::parse("KEY={{value}}\n").unwrap(),
            after: Vec::new(),
            after_timeout: Duration::from_secs(10),
            after_confinement: Confinement::default(),
        };
        let value = SecretValue::new("v1".into());
        let meta = Meta::new();
        c.deliver(&Delivery {
            secret: "s",
            version: 3,
            value: &value,
            meta: &meta,
        })
        .await
        .unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "KEY=v1\n");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
    }

    #[tokio::test]
    async fn a_meta_value_cannot_add_a_line_to_an_env_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deploy.env");
        let c = FileConsumer {
            path: path.clone(),
            mode: 0o600,
            owner: None,
            group: None,
            template: Template::parse("ACCESS_KEY_ID={{meta.key_id}}\nSECRET={{value}}\n").unwrap(),
            after: vec![],
            after_timeout: Duration::from_secs(10),
            after_confinement: Confinement::default(),
        };
        let value = SecretValue::new("s3cr3t".into());
        let mut meta = Meta::new();
        meta.insert("key_id".into(), "AKIA1\nLD_PRELOAD=/tmp/evil.so".into());
        let err = c
            .deliver(&Delivery {
                secret: "aws/x",
                version: 2,
                value: &value,
                meta: &meta,
            })
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("meta.key_id contains a control character"),
            "{err}"
        );
        assert!(!path.exists(), "nothing was written");

        // A template that is the value alone still takes a multi-line value (a PEM key).
        let pem = FileConsumer {
            template: Template::value_only(),
            ..c.clone()
        };
        let key = SecretValue::new("-----BEGIN KEY-----\nabc\n-----END KEY-----\n".into());
        pem.deliver(&Delivery {
            secret: "tls/key",
            version: 1,
            value: &key,
            meta: &Meta::new(),
        })
        .await
        .unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), key.expose());
    }
}

//! Where the passphrase comes from: the environment, a file, systemd credentials, or a prompt.
//!
//! Sources, first match wins: `KEYWARDEN_PASSPHRASE`; the file named by
//! `KEYWARDEN_PASSPHRASE_FILE`; `$CREDENTIALS_DIRECTORY/passphrase` (systemd's
//! `LoadCredential=`); a no-echo prompt when standard input is a terminal. A new passphrase
//! (`keywarden passwd`) comes from `KEYWARDEN_NEW_PASSPHRASE`, `KEYWARDEN_NEW_PASSPHRASE_FILE`,
//! or a prompt asked twice. One trailing newline is stripped from files.

use std::io::IsTerminal;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::vault::Passphrase;

/// Errors obtaining a passphrase.
#[derive(Debug, thiserror::Error)]
pub enum PassphraseError {
    /// A passphrase file could not be read.
    #[error("cannot read the passphrase file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// No source was set and there is no terminal to ask on.
    #[error(
        "no passphrase: set {var}_FILE (or {var}, or run under systemd with \
         LoadCredential=passphrase:...), or run on a terminal to be prompted"
    )]
    NoSource {
        /// The environment variable family that was consulted.
        var: &'static str,
    },
    /// The prompt failed.
    #[error("cannot read the passphrase from the terminal: {0}")]
    Prompt(std::io::Error),
    /// A source was set but holds nothing.
    #[error("{0} is empty: a passphrase is needed")]
    Empty(String),
    /// A new passphrase typed at the prompt is shorter than [`MIN_TYPED_LEN`].
    #[error(
        "a passphrase of {0} characters is too easy to guess: this one wraps every key in the \
         store, and anyone with a copy of the file can try guesses offline. Use at least {min} \
         (a few random words), or pass --weak-passphrase if this store protects nothing real",
        min = MIN_TYPED_LEN
    )]
    TooShort(usize),
    /// The two entries of a new passphrase differ.
    #[error("the two passphrases do not match")]
    Mismatch,
}

/// Which passphrase is wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The store's passphrase, to unlock it.
    Unlock,
    /// The passphrase for a new store (asked twice on a terminal).
    Create,
    /// The replacement passphrase for `passwd` (asked twice on a terminal).
    Change,
}

fn read_file(path: &Path) -> Result<Passphrase, PassphraseError> {
    let file_error = |source| PassphraseError::File {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "the passphrase file is readable by other users; chmod 600 it");
        }
    }
    let bytes = Zeroizing::new(std::fs::read(path).map_err(file_error)?);
    let text = std::str::from_utf8(&bytes).map_err(|_| {
        file_error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not UTF-8",
        ))
    })?;
    let text = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(text);
    if text.is_empty() {
        return Err(PassphraseError::Empty(format!(
            "the passphrase file {}",
            path.display()
        )));
    }
    Ok(Zeroizing::new(text.to_string()))
}

fn from_env(var: &str) -> Result<Option<Passphrase>, PassphraseError> {
    if let Some(value) = std::env::var_os(var) {
        if value.is_empty() {
            return Err(PassphraseError::Empty(format!(
                "{var} (set, but to nothing)"
            )));
        }
        return Ok(Some(Zeroizing::new(value.to_string_lossy().into_owned())));
    }
    if let Some(path) = std::env::var_os(format!("{var}_FILE")) {
        return read_file(Path::new(&path)).map(Some);
    }
    Ok(None)
}

fn prompt(text: &str) -> Result<Passphrase, PassphraseError> {
    rpassword::prompt_password(text)
        .map(Zeroizing::new)
        .map_err(PassphraseError::Prompt)
}

/// The shortest new passphrase accepted at the prompt without `--weak-passphrase`. (From the
/// environment or a file it is only warned about: automation chose it deliberately.)
pub const MIN_TYPED_LEN: usize = 12;

/// Obtains a passphrase for `purpose` from the sources above; a new one typed at the prompt
/// must have [`MIN_TYPED_LEN`] characters.
pub fn obtain(purpose: Purpose) -> Result<Passphrase, PassphraseError> {
    obtain_new(purpose, false)
}

/// [`obtain`], accepting a short new passphrase at the prompt when `weak_ok`.
pub fn obtain_new(purpose: Purpose, weak_ok: bool) -> Result<Passphrase, PassphraseError> {
    let var = match purpose {
        Purpose::Unlock | Purpose::Create => "KEYWARDEN_PASSPHRASE",
        Purpose::Change => "KEYWARDEN_NEW_PASSPHRASE",
    };
    if let Some(p) = from_env(var)? {
        return Ok(p);
    }
    if purpose != Purpose::Change {
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            let path = Path::new(&dir).join("passphrase");
            if path.exists() {
                return read_file(&path);
            }
        }
    }
    if !std::io::stdin().is_terminal() {
        return Err(PassphraseError::NoSource { var });
    }
    match purpose {
        Purpose::Unlock => prompt("keywarden passphrase: "),
        Purpose::Create | Purpose::Change => {
            let first = prompt("new keywarden passphrase: ")?;
            let length = first.chars().count();
            if length < MIN_TYPED_LEN && !weak_ok {
                return Err(PassphraseError::TooShort(length));
            }
            let second = prompt("repeat the new passphrase: ")?;
            if first != second {
                return Err(PassphraseError::Mismatch);
            }
            Ok(first)
        }
    }
}

//! Audit archives (`keywarden audit archive`): the oldest rows of the chain moved out of the
//! store into a file that verifies on its own and joins the chain that stays.
//!
//! A file is JSON lines: a header `{"format","first_seq","prev_hash"}`, one object per row with
//! every field and both hashes (hex), and a trailer `{"end":{"last_seq","head","rows"}}`, so a
//! truncated file is found. The store keeps the last archived row's seq and hash as its anchor
//! (sealed under the vault's key), and its next row links to it; `audit verify --archive FILE`
//! walks the files and then the store as one chain.

use std::io::{BufRead, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::audit::{AuditRecord, ChainBreak, ChainVerifier};
use crate::crypto;

/// The first line's `format`.
pub const FORMAT: &str = "keywarden-audit-archive/1";

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    format: String,
    first_seq: i64,
    prev_hash: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Row {
    seq: i64,
    at: i64,
    actor: String,
    action: String,
    secret: Option<String>,
    incident_id: Option<String>,
    detail: String,
    prev_hash: String,
    hash: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct End {
    last_seq: i64,
    head: String,
    rows: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Trailer {
    end: End,
}

/// Why an archive could not be written or does not verify.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The archive.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A line is not what the format says.
    #[error("{path} line {line}: {reason}")]
    Malformed {
        /// The archive.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The chain breaks inside the file, or the file does not continue the chain before it.
    #[error("{path}: audit chain broken at row {}: {}", .brk.seq, .brk.reason)]
    Broken {
        /// The archive.
        path: PathBuf,
        /// Where and why.
        brk: ChainBreak,
    },
}

/// Writes an archive to a new file (mode 0600; never over an existing one), row by row.
#[derive(Debug)]
pub struct ArchiveWriter {
    path: PathBuf,
    out: BufWriter<std::fs::File>,
    rows: u64,
    last: Option<(i64, String)>,
}

impl ArchiveWriter {
    /// Creates `path` for rows that continue the chain after row `first_seq - 1`, whose hash
    /// is `prev_hash`.
    pub fn create(path: &Path, first_seq: i64, prev_hash: &[u8]) -> Result<Self, ArchiveError> {
        let io = |source| ArchiveError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        let mut writer = ArchiveWriter {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
            rows: 0,
            last: None,
        };
        writer.line(&Header {
            format: FORMAT.into(),
            first_seq,
            prev_hash: crypto::hex(prev_hash),
        })?;
        Ok(writer)
    }

    /// Appends one row.
    pub fn push(&mut self, row: &AuditRecord) -> Result<(), ArchiveError> {
        let hash = crypto::hex(&row.hash);
        self.line(&Row {
            seq: row.seq,
            at: row.at,
            actor: row.actor.clone(),
            action: row.action.clone(),
            secret: row.secret.clone(),
            incident_id: row.incident_id.clone(),
            detail: row.detail.clone(),
            prev_hash: crypto::hex(&row.prev_hash),
            hash: hash.clone(),
        })?;
        self.rows += 1;
        self.last = Some((row.seq, hash));
        Ok(())
    }

    /// Writes the trailer and flushes the file to disk; returns how many rows it holds.
    pub fn finish(mut self) -> Result<u64, ArchiveError> {
        let (last_seq, head) = self.last.clone().unwrap_or_default();
        self.line(&Trailer {
            end: End {
                last_seq,
                head,
                rows: self.rows,
            },
        })?;
        let io = |source| ArchiveError::Io {
            path: self.path.clone(),
            source,
        };
        let file = self.out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        Ok(self.rows)
    }

    fn line(&mut self, value: &impl Serialize) -> Result<(), ArchiveError> {
        serde_json::to_writer(&mut self.out, value)
            .map_err(std::io::Error::from)
            .and_then(|()| self.out.write_all(b"\n"))
            .map_err(|source| ArchiveError::Io {
                path: self.path.clone(),
                source,
            })
    }
}

/// Reads the archive at `path` and checks every row, going on from where `verifier` stands
/// (the start of the chain, or the end of the archive before this one).
pub fn verify(path: &Path, verifier: &mut ChainVerifier) -> Result<(), ArchiveError> {
    let file = std::fs::File::open(path).map_err(|source| ArchiveError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let malformed = |line: usize, reason: String| ArchiveError::Malformed {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let broken = |brk: ChainBreak| ArchiveError::Broken {
        path: path.to_path_buf(),
        brk,
    };
    let mut lines = std::io::BufReader::new(file).lines().enumerate();
    let mut next = || -> Result<Option<(usize, String)>, ArchiveError> {
        match lines.next() {
            None => Ok(None),
            Some((i, Ok(text))) => Ok(Some((i + 1, text))),
            Some((_, Err(source))) => Err(ArchiveError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    };
    let Some((_, first)) = next()? else {
        return Err(malformed(1, "the file is empty".into()));
    };
    let header: Header =
        serde_json::from_str(&first).map_err(|e| malformed(1, format!("not a header: {e}")))?;
    if header.format != FORMAT {
        return Err(malformed(1, format!("unknown format {:?}", header.format)));
    }
    let (seq, hash) = verifier.last();
    if header.first_seq != seq + 1 || crypto::from_hex(&header.prev_hash).as_deref() != Some(hash) {
        return Err(broken(ChainBreak {
            seq: header.first_seq,
            reason: format!(
                "the archive does not continue the chain: it starts after row {} and the chain \
                 before it ends at row {seq}",
                header.first_seq - 1
            ),
        }));
    }
    let hex = |line: usize, text: &str| {
        crypto::from_hex(text).ok_or_else(|| malformed(line, "a hash is not hex".into()))
    };
    let mut rows = 0u64;
    while let Some((line, text)) = next()? {
        if let Ok(trailer) = serde_json::from_str::<Trailer>(&text) {
            let (last_seq, head) = verifier.last();
            if trailer.end.rows != rows
                || (rows > 0 && trailer.end.last_seq != last_seq)
                || (rows > 0 && hex(line, &trailer.end.head)? != head)
            {
                return Err(malformed(
                    line,
                    "the trailer does not match the rows before it".into(),
                ));
            }
            return match next()? {
                None => Ok(()),
                Some((line, _)) => Err(malformed(line, "text after the trailer".into())),
            };
        }
        let row: Row =
            serde_json::from_str(&text).map_err(|e| malformed(line, format!("not a row: {e}")))?;
        let record = AuditRecord {
            seq: row.seq,
            at: row.at,
            actor: row.actor,
            action: row.action,
            secret: row.secret,
            incident_id: row.incident_id,
            detail: row.detail,
            prev_hash: hex(line, &row.prev_hash)?,
            hash: hex(line, &row.hash)?,
        };
        verifier.check(&record).map_err(broken)?;
        rows += 1;
    }
    Err(malformed(
        rows as usize + 2,
        "the file ends without its trailer (truncated?)".into(),
    ))
}

//! Output helpers shared by commands: JSON documents on stdout, times, aligned tables.

use std::io::Write;

use crate::clock::Millis;

/// Prints one JSON document (pretty, newline-terminated) on stdout.
pub(crate) fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// Text for a terminal: control characters (escape sequences, carriage returns, C1 codes),
/// which a peer can put in its executable's path, are shown escaped instead of acted on.
pub(crate) fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().collect::<String>()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

pub(crate) use crate::clock::rfc3339;

/// A coarse human duration: `42s`, `5m`, `3h`, `12d`.
pub(crate) fn coarse_duration(ms: i64) -> String {
    let s = ms.abs() / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// `5m ago` or `in 5m` relative to now.
pub(crate) fn relative(ms: Millis) -> String {
    let delta = ms - crate::clock::now_millis();
    if delta <= 0 {
        format!("{} ago", coarse_duration(delta))
    } else {
        format!("in {}", coarse_duration(delta))
    }
}

/// Prints rows as left-aligned columns under a header.
pub(crate) fn print_table(header: &[&str], rows: &[Vec<String>]) -> anyhow::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = std::io::stdout().lock();
    let line = |cells: Vec<&str>| -> String {
        let last = cells.len().saturating_sub(1);
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == last {
                    c.to_string()
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for row in rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

/// Writes a secret's value to stdout, ended by a newline unless `no_newline` (the exact bytes,
/// for a file or a program that must not see one).
pub(crate) fn print_value(value: &str, no_newline: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(value.as_bytes())?;
    if !no_newline {
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

//! Secret names: what a valid one looks like.
//!
//! Names appear in URLs of the agent socket, in file paths of consumers and in globs of policies,
//! so they are strict: 1 to 200 bytes of `A-Z a-z 0-9 . _ -` in segments separated by single
//! `/`, no segment `.` or `..`, no leading or trailing `/`.

/// Longest name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 200;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid secret name {name:?}: {reason}")]
pub struct InvalidName {
    /// The refused name (already checked to be printable before it is shown).
    pub name: String,
    /// What rule it broke.
    pub reason: &'static str,
}

/// Checks a secret name against the rules above.
pub fn validate(name: &str) -> Result<(), InvalidName> {
    let fail = |reason| {
        Err(InvalidName {
            name: name.chars().take(MAX_NAME_LEN).collect(),
            reason,
        })
    };
    if name.is_empty() {
        return fail("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return fail("it is longer than 200 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
    {
        return fail("only letters, digits, '.', '_', '-' and '/' are allowed");
    }
    for segment in name.split('/') {
        match segment {
            "" => return fail("it has an empty path segment (leading, trailing or double '/')"),
            "." | ".." => return fail("'.' and '..' are not allowed as path segments"),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for ok in [
            "openai/prod",
            "aws/ci-deployer",
            "db.main_pw",
            "a",
            "x/y/z.v2",
        ] {
            assert!(validate(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_traversal_and_odd_bytes() {
        for bad in [
            "",
            "/abs",
            "trail/",
            "a//b",
            "../etc",
            "a/./b",
            "a/..",
            "sp ace",
            "new\nline",
            "pct%2f",
            "uni\u{e9}",
            "back\\slash",
        ] {
            assert!(validate(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate(&"a".repeat(201)).is_err());
        assert!(validate(&"a".repeat(200)).is_ok());
    }
}

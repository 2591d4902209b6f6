//! What a credential looks like: the table of well-known token shapes `scan` recognises.
//!
//! To recognise another kind, add a row to [`PATTERNS`]: a kind name, a severity, and a regular
//! expression (regex-lite syntax) whose first capture group, if it has one, is the secret part
//! (so `password` in a database URL, not the whole URL).

use std::sync::OnceLock;

use regex_lite::Regex;

use super::Severity;
use crate::value::SecretValue;

/// One recognisable kind of credential.
#[derive(Debug)]
pub struct Pattern {
    /// Its name in reports (`openai-key`, `aws-access-key-id`, …).
    pub kind: &'static str,
    /// How bad a plaintext copy of it is.
    pub severity: Severity,
    /// Its shape; the first capture group, if any, is the secret part.
    pub regex: &'static str,
    /// Whether the value starts with a public marker (`sk-proj-`, `AKIA`, `ghp_`): then a few
    /// leading characters may be shown to recognise it; otherwise only its length.
    pub public_prefix: bool,
}

/// Every kind `scan` recognises, most specific first (a value is reported as the first kind
/// that matches it).
pub const PATTERNS: &[Pattern] = &[
    Pattern {
        kind: "openai-admin-key",
        severity: Severity::Critical,
        regex: r"sk-admin-[A-Za-z0-9_\-]{20,}",
        public_prefix: true,
    },
    Pattern {
        kind: "openai-key",
        severity: Severity::High,
        regex: r"sk-(?:proj|svcacct)-[A-Za-z0-9_\-]{20,}",
        public_prefix: true,
    },
    Pattern {
        kind: "anthropic-admin-key",
        severity: Severity::Critical,
        regex: r"sk-ant-admin01-[A-Za-z0-9_\-]{20,}",
        public_prefix: true,
    },
    Pattern {
        kind: "anthropic-key",
        severity: Severity::High,
        regex: r"sk-ant-api03-[A-Za-z0-9_\-]{20,}",
        public_prefix: true,
    },
    Pattern {
        kind: "aws-secret-access-key",
        severity: Severity::Critical,
        regex: r#"(?i)aws_secret_access_key["']?\s*[=:]\s*["']?([A-Za-z0-9/+]{40})"#,
        public_prefix: false,
    },
    Pattern {
        kind: "aws-access-key-id",
        severity: Severity::High,
        regex: r"\b((?:AKIA|ASIA)[A-Z0-9]{16})\b",
        public_prefix: true,
    },
    Pattern {
        kind: "github-token",
        severity: Severity::High,
        regex: r"\b((?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22,})",
        public_prefix: true,
    },
    Pattern {
        kind: "gitlab-token",
        severity: Severity::High,
        regex: r"\b(glpat-[A-Za-z0-9_\-]{20,})",
        public_prefix: true,
    },
    Pattern {
        kind: "slack-token",
        severity: Severity::High,
        regex: r"\b(xox[baprs]-[A-Za-z0-9\-]{10,})",
        public_prefix: true,
    },
    Pattern {
        kind: "stripe-live-key",
        severity: Severity::Critical,
        regex: r"\b((?:sk|rk)_live_[A-Za-z0-9]{24,})",
        public_prefix: true,
    },
    Pattern {
        kind: "google-api-key",
        severity: Severity::High,
        regex: r"\b(AIza[0-9A-Za-z_\-]{35})",
        public_prefix: true,
    },
    Pattern {
        kind: "huggingface-token",
        severity: Severity::High,
        regex: r"\b(hf_[A-Za-z0-9]{30,})",
        public_prefix: true,
    },
    Pattern {
        kind: "private-key",
        severity: Severity::Critical,
        regex: r"(-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----)",
        public_prefix: true,
    },
    Pattern {
        kind: "database-url",
        severity: Severity::High,
        regex: r"\b(?:postgres(?:ql)?|mysql|mariadb|rediss?|mongodb(?:\+srv)?|amqps?)://[^:/\s@]*:([^@\s/]+)@",
        public_prefix: false,
    },
    Pattern {
        kind: "jwt",
        severity: Severity::Medium,
        regex: r"\b(eyJ[A-Za-z0-9_\-]{10,}\.eyJ[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,})",
        public_prefix: true,
    },
];

/// A credential found in some text: its kind, severity, and the secret part.
#[derive(Debug)]
pub struct Match {
    /// The pattern's kind.
    pub kind: &'static str,
    /// The pattern's severity.
    pub severity: Severity,
    /// The secret part of the match (never printed, not even by `Debug`).
    pub value: SecretValue,
    /// See [`Pattern::public_prefix`].
    pub public_prefix: bool,
}

fn compiled() -> &'static [(Regex, &'static Pattern)] {
    static COMPILED: OnceLock<Vec<(Regex, &'static Pattern)>> = OnceLock::new();
    COMPILED.get_or_init(|| {
        PATTERNS
            .iter()
            .map(|p| (Regex::new(p.regex).expect("the pattern table compiles"), p))
            .collect()
    })
}

/// Every credential in `text`, each value once (the first, most specific kind wins).
pub fn find(text: &str) -> Vec<Match> {
    let mut found: Vec<Match> = Vec::new();
    for (regex, pattern) in compiled() {
        for caps in regex.captures_iter(text) {
            let whole = caps.get(0).expect("group 0 always matches");
            let value = caps.get(1).unwrap_or(whole).as_str();
            // A shorter kind inside a longer one already found (an access key id inside a
            // database URL's password, say) is the same credential.
            if found
                .iter()
                .any(|f| f.value.expose().contains(value) || value.contains(f.value.expose()))
            {
                continue;
            }
            found.push(Match {
                kind: pattern.kind,
                severity: pattern.severity,
                value: SecretValue::new(value.to_string()),
                public_prefix: pattern.public_prefix,
            });
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_is_recognised_with_its_secret_part() {
        let openai = format!("sk-proj-{}", "a1B2".repeat(12));
        let aws_id = "AKIAABCDEFGHIJKLMNOP";
        let aws_secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
        let text = format!(
            "OPENAI_API_KEY={openai}\naws_access_key_id = {aws_id}\n\
             aws_secret_access_key = {aws_secret}\nDATABASE_URL=postgres://app:s3cr3t-pass@db:5432/x\n"
        );
        let found = find(&text);
        let kinds: Vec<(&str, &str)> = found.iter().map(|m| (m.kind, m.value.expose())).collect();
        assert_eq!(
            kinds,
            [
                ("openai-key", openai.as_str()),
                ("aws-secret-access-key", aws_secret),
                ("aws-access-key-id", aws_id),
                ("database-url", "s3cr3t-pass"),
            ]
        );
    }

    #[test]
    fn ordinary_text_is_not_a_credential() {
        assert!(find("sk-learn is a library; AKIA is a prefix; eyJhbGci alone").is_empty());
    }
}

//! Secret values in memory: a zeroizing string whose `Debug` and `Display` never show it.

use std::fmt;

use zeroize::Zeroizing;

/// A secret value (a password, an API key, a JSON credential document).
///
/// The bytes are zeroized when dropped. Formatting prints `[redacted]`; the only way to see the
/// value is [`SecretValue::expose`], so every place that reveals one is easy to find.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<String>);

impl SecretValue {
    /// Wraps a string.
    pub fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }

    /// Takes a UTF-8 buffer, or gives it back (zeroized on drop) if it is not UTF-8.
    pub fn from_utf8(bytes: Zeroizing<Vec<u8>>) -> Result<Self, std::str::Utf8Error> {
        std::str::from_utf8(&bytes)?;
        let mut bytes = bytes;
        let owned = std::mem::take(&mut *bytes);
        // Cannot fail: checked above. The original buffer is now empty and the string owns it.
        Ok(Self::new(String::from_utf8(owned).expect("checked UTF-8")))
    }

    /// The value itself. Call sites of this method are the places a secret leaves the vault.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_never_reveals_the_value() {
        let v = SecretValue::new("sk-live-123".into());
        assert_eq!(format!("{v}"), "[redacted]");
        assert_eq!(format!("{v:?}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(&v)), "Some([redacted])");
        assert_eq!(v.expose(), "sk-live-123");
    }

    #[test]
    fn non_utf8_is_refused() {
        assert!(SecretValue::from_utf8(Zeroizing::new(vec![0xff, 0xfe])).is_err());
        let ok = SecretValue::from_utf8(Zeroizing::new(b"abc".to_vec())).unwrap();
        assert_eq!(ok.expose(), "abc");
    }
}

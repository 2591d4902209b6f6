//! Generating values: the `random` provider's values and the `proposed` values sent to plugins
//! whose providers take a chosen value (passwords).

use serde::Deserialize;

use crate::crypto::{self, CryptoError};
use crate::value::SecretValue;

/// The characters a generated value is drawn from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Charset {
    /// `A-Z a-z 0-9`
    Alphanumeric,
    /// `0-9 a-f`
    Hex,
    /// `A-Z a-z 0-9 - _`
    Base64url,
    /// Printable ASCII without space, quotes or backslash (safe in most config formats).
    Printable,
}

impl Charset {
    fn alphabet(self) -> &'static [u8] {
        match self {
            Charset::Alphanumeric => b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
            Charset::Hex => b"0123456789abcdef",
            Charset::Base64url => {
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
            }
            Charset::Printable => {
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$%&()*+,-./:;<=>?@[]^_{|}~"
            }
        }
    }
}

/// `generate = { length = 32, charset = "alphanumeric" }` on a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeneratePolicy {
    /// Characters in the value.
    pub length: usize,
    /// Which characters.
    pub charset: Charset,
}

impl Default for GeneratePolicy {
    fn default() -> Self {
        GeneratePolicy {
            length: 32,
            charset: Charset::Alphanumeric,
        }
    }
}

/// A generated value's length outside 16 to 4096 characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("length must be between 16 and 4096, not {0}")]
pub struct LengthOutOfRange(pub usize);

impl GeneratePolicy {
    /// Checks the policy is sensible (16 to 4096 characters).
    pub fn check(&self) -> Result<(), LengthOutOfRange> {
        if !(16..=4096).contains(&self.length) {
            return Err(LengthOutOfRange(self.length));
        }
        Ok(())
    }

    /// A fresh value, each character uniform over the charset (rejection sampling, no bias).
    pub fn generate(&self) -> Result<SecretValue, CryptoError> {
        let alphabet = self.charset.alphabet();
        let n = alphabet.len();
        let limit = 256 - (256 % n);
        let mut out = String::with_capacity(self.length);
        while out.len() < self.length {
            for &b in crypto::random_bytes(self.length * 2)?.iter() {
                if (b as usize) < limit && out.len() < self.length {
                    out.push(alphabet[b as usize % n] as char);
                }
            }
        }
        Ok(SecretValue::new(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_have_the_length_and_charset_asked_for() {
        for charset in [
            Charset::Alphanumeric,
            Charset::Hex,
            Charset::Base64url,
            Charset::Printable,
        ] {
            let p = GeneratePolicy {
                length: 40,
                charset,
            };
            let v = p.generate().unwrap();
            assert_eq!(v.len(), 40);
            assert!(v.expose().bytes().all(|b| charset.alphabet().contains(&b)));
            assert_ne!(v, p.generate().unwrap());
        }
        assert!(
            GeneratePolicy {
                length: 8,
                charset: Charset::Hex
            }
            .check()
            .is_err()
        );
    }

    #[test]
    fn every_character_of_the_charset_shows_up() {
        let p = GeneratePolicy {
            length: 4096,
            charset: Charset::Alphanumeric,
        };
        let v = p.generate().unwrap();
        for c in Charset::Alphanumeric.alphabet() {
            assert!(v.expose().as_bytes().contains(c), "{}", *c as char);
        }
    }
}

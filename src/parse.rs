//! Deserializers for the configuration's primitive values (durations, octal file modes), each
//! with an error that shows what was written and what was expected. Every section's config
//! type uses these, so a value is parsed once, while the file is read.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A duration such as `"15m"` or `"1h 30m"`.
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text)
        .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?}: {e}")))
}

/// An optional [`duration`].
pub fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// A file mode in octal, such as `"0640"`.
pub fn octal_mode<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let text = String::deserialize(d)?;
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| {
            serde::de::Error::custom(format!("invalid octal mode {text:?} (e.g. \"0640\")"))
        })
}

/// An optional [`octal_mode`].
pub fn opt_octal_mode<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    octal_mode(d).map(Some)
}

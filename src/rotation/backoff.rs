//! Exponential backoff with jitter for retried steps.

use std::time::Duration;

/// `base × 2^(attempt-1)`, capped at `max`, then scaled by a random factor in [0.5, 1.0) so
/// retries of many secrets do not land on a provider at the same instant.
pub fn delay(attempt: u32, base: Duration, max: Duration) -> Duration {
    let exp = attempt.saturating_sub(1).min(30);
    let raw = base.saturating_mul(1u32 << exp).min(max);
    let jitter = 0.5 + (rand_unit() * 0.5);
    raw.mul_f64(jitter)
}

/// A uniform random number in [0, 1).
pub(crate) fn rand_unit() -> f64 {
    let bytes = crate::crypto::random_bytes(8).expect("system randomness");
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes);
    (u64::from_le_bytes(raw) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_within_jitter_and_caps() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(60);
        for (attempt, nominal) in [
            (1, 1.0),
            (2, 2.0),
            (3, 4.0),
            (6, 32.0),
            (7, 60.0),
            (50, 60.0),
        ] {
            for _ in 0..20 {
                let d = delay(attempt, base, max).as_secs_f64();
                assert!(d >= nominal * 0.5 && d < nominal, "attempt {attempt}: {d}");
            }
        }
    }
}

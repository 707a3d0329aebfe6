//! Wall-clock time. A clock set before 1970 reads as the epoch rather than failing: these
//! values are recorded and compared, never used to order events on one machine (that is
//! what `Instant` is for).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn since_epoch() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    u64::try_from(since_epoch().as_millis()).unwrap_or(u64::MAX)
}

/// Nanoseconds since the Unix epoch (file times).
pub fn now_ns() -> i64 {
    i64::try_from(since_epoch().as_nanos()).unwrap_or(i64::MAX)
}

/// Unix milliseconds `ttl` from now (expiry stamps).
pub fn ms_after(ttl: Duration) -> u64 {
    u64::try_from((since_epoch() + ttl).as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_agree_and_move_forward() {
        let ms = now_ms();
        let ns = now_ns();
        // 2020-01-01 in ms: any machine running this is past it.
        assert!(ms > 1_577_836_800_000, "{ms}");
        assert!((ns / 1_000_000 - ms as i64).abs() < 5_000, "{ns} vs {ms}");
        let later = ms_after(Duration::from_secs(60));
        assert!(later >= ms + 60_000 && later < ms + 65_000, "{later} vs {ms}");
    }
}

//! What the CLI prints besides results: notes on stderr (silenced by `--quiet`), spinners for
//! long calls (only on a terminal, never with `--json` or `--quiet`), the user-error type
//! behind exit code 2, the "service not running" error, and display helpers.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static QUIET: AtomicBool = AtomicBool::new(false);
static JSON: AtomicBool = AtomicBool::new(false);

/// Records the global output flags (once, from `main`).
pub(crate) fn init(quiet: bool, json: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
    JSON.store(json, Ordering::Relaxed);
}

/// Whether `--quiet` was given: print only results.
pub(crate) fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// A note for a person on stderr (what happened, how long it took), unless `--quiet`.
macro_rules! note {
    ($($arg:tt)*) => {
        if !$crate::output::quiet() {
            eprintln!($($arg)*);
        }
    };
}
pub(crate) use note;

/// A spinner on stderr with `message` and the elapsed time while a long call runs; `None`
/// (nothing drawn) unless stderr is a terminal and neither `--json` nor `--quiet` was given.
pub(crate) fn spinner(message: impl Into<String>) -> Option<indicatif::ProgressBar> {
    if quiet() || JSON.load(Ordering::Relaxed) || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new_spinner().with_message(message.into());
    if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(100));
    Some(bar)
}

/// Runs `f` under a [`spinner`], cleared when it returns.
pub(crate) async fn spin<T>(message: impl Into<String>, f: impl std::future::Future<Output = T>) -> T {
    let bar = spinner(message);
    let out = f.await;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    out
}

/// An error in what the user asked for (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UserError(pub(crate) String);

/// The service at the endpoint did not answer (exit code 1): names what to run.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot reach the sail service at {endpoint} ({cause}); is it running? Start it with `sail up`, \
     or point --endpoint / SAIL_ENDPOINT at a running one"
)]
pub(crate) struct ServiceUnreachable {
    /// The endpoint tried.
    pub(crate) endpoint: String,
    /// The innermost cause (for instance "Connection refused (os error 111)").
    pub(crate) cause: String,
}

impl ServiceUnreachable {
    /// From a connection error: the cause is its innermost source (an OS error, usually),
    /// which says more than the transport's wrapping.
    pub(crate) fn new(endpoint: &str, err: &(dyn std::error::Error + 'static)) -> Self {
        let mut inner = err;
        while let Some(next) = inner.source() {
            inner = next;
        }
        Self { endpoint: endpoint.to_owned(), cause: inner.to_string() }
    }
}

/// The first 12 characters of an id, for display (ids come from the server: never slice blindly).
pub(crate) fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// Bytes in binary units, one decimal.
pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(5 << 30), "5.0 GiB");
    }

    #[test]
    fn short_never_panics() {
        assert_eq!(short("abc"), "abc");
        assert_eq!(short("0123456789abcdef"), "0123456789ab");
        assert_eq!(short("ééééééé"), "éééééé");
    }

    #[test]
    fn unreachable_names_the_innermost_cause() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        let wrapped = anyhow::Error::new(io).context("tcp connect");
        let e = ServiceUnreachable::new("http://127.0.0.1:1", wrapped.as_ref());
        assert_eq!(e.cause, "Connection refused");
        let msg = e.to_string();
        assert!(msg.contains("http://127.0.0.1:1") && msg.contains("sail up"), "{msg}");
    }
}

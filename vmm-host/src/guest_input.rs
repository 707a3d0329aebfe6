//! What the host takes from a guest, bounded and validated. A guest runs whatever code it was
//! given, so every string its agent sends may be huge, full of control characters, or a lie;
//! nothing it says becomes host state or reaches a client unchecked (DESIGN 2.5: nothing a
//! guest writes can become host-trusted state).
//!
//! - Free text (the agent's version, a mount's last error) is capped in bytes, cut on a
//!   character boundary, with control characters replaced.
//! - Mount reports are joined to the host's own record of the sailbox's mounts: only recorded
//!   paths are reported, with the volume and org the host recorded; from the guest come only
//!   the state (one of the agent's known words), the head commit (64 hex digits or nothing)
//!   and the counters.
//! - The serial console is read from its tail only, and cut down to its last sixteenth
//!   whenever it passes its cap (1 MiB by default): a guest can print without end. QEMU
//!   appends to it, so bytes it writes while the file is cut land after the kept tail, at
//!   worst a few out of order.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use proto::agent as apb;
use proto::sailbox as pb;

use crate::model::VolumeRecord;

/// Longest agent version string kept.
pub const MAX_AGENT_VERSION: usize = 64;
/// Longest error text kept from a guest.
pub const MAX_ERROR: usize = 512;
/// Bytes of the console read for an error message.
pub const CONSOLE_TAIL_BYTES: u64 = 8 << 10;
/// Largest a VM's console log grows before it is cut down to its tail (the default of
/// `HostConfig::console_max_bytes`; a sixteenth of it is kept).
pub const CONSOLE_MAX_BYTES: u64 = 1 << 20;
/// Bytes of stdout and of stderr kept per exec request (the limit the agent applies too).
pub const MAX_OUTPUT: usize = proto::agent::OUTPUT_CAP;
/// The mount states the agent reports (agent.proto `MountInfo.state`).
const MOUNT_STATES: &[&str] = &["mounting", "mounted", "restarting", "failed", "unmounted"];

/// `s` with control characters replaced by `?`, cut to at most `max` bytes on a character
/// boundary (with `…` marking a cut).
pub fn text(s: &str, max: usize) -> String {
    let cleaned = s.chars().map(|c| if c.is_control() { '?' } else { c });
    let mut out = String::new();
    for c in cleaned {
        if out.len() + c.len_utf8() > max {
            // Room for the marker: drop characters until it fits.
            while out.len() + '…'.len_utf8() > max {
                if out.pop().is_none() {
                    break;
                }
            }
            if max >= '…'.len_utf8() {
                out.push('…');
            }
            return out;
        }
        out.push(c);
    }
    out
}

/// One output stream of an exec as the agent reported it, held to [`MAX_OUTPUT`]: the bytes
/// kept, whether any were dropped, and the total produced (never less than what was kept).
pub fn output(mut kept: Vec<u8>, truncated: bool, total: u64) -> (Vec<u8>, bool, u64) {
    let mut truncated = truncated;
    if kept.len() > MAX_OUTPUT {
        kept.truncate(MAX_OUTPUT);
        truncated = true;
    }
    let total = total.max(kept.len() as u64);
    (kept, truncated, total)
}

/// The agent version a guest reports, as kept in the sailbox record.
pub fn agent_version(s: &str) -> String {
    text(s, MAX_AGENT_VERSION)
}

/// The mounts of a sailbox as the host recorded them, with what the guest's agent reports
/// about each (see the module docs). Recorded mounts the guest does not report are "unknown".
pub fn mounts(recorded: &BTreeMap<String, VolumeRecord>, reported: &[apb::MountInfo]) -> Vec<pb::MountStatus> {
    recorded
        .iter()
        .map(|(path, v)| {
            let mut status = pb::MountStatus {
                path: path.clone(),
                volume: v.volume.clone(),
                org: v.org.clone(),
                state: "unknown".into(),
                ..Default::default()
            };
            if let Some(m) = reported.iter().find(|m| &m.path == path) {
                status.state = if MOUNT_STATES.contains(&m.state.as_str()) { m.state.clone() } else { "unknown".into() };
                status.head_commit = if is_commit_id(&m.head_commit) { m.head_commit.clone() } else { String::new() };
                status.dirty_bytes = m.dirty_bytes;
                status.restarts = m.restarts;
                status.last_error = text(&m.last_error, MAX_ERROR);
            } else {
                status.last_error = "the agent does not report this mount".into();
            }
            status
        })
        .collect()
}

fn is_commit_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The last non-empty lines (at most six) of a VM's serial console, read from the last
/// [`CONSOLE_TAIL_BYTES`] of `console.log` only, joined with ` | `; `(empty)` if none.
pub fn console_tail(dir: &Path) -> String {
    let tail = read_tail(&dir.join("console.log"), CONSOLE_TAIL_BYTES).unwrap_or_default();
    let text = String::from_utf8_lossy(&tail);
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.trim_matches(|c: char| c == '\0' || c.is_whitespace()))
        .filter(|l| !l.is_empty())
        .rev()
        .take(6)
        .map(|l| self::text(l, 256))
        .collect();
    if lines.is_empty() {
        return "(empty)".into();
    }
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Cuts `console.log` in `dir` down to its last `keep` bytes when it is larger than `max`;
/// returns whether it did.
pub fn trim_console(dir: &Path, max: u64, keep: u64) -> std::io::Result<bool> {
    let path = dir.join("console.log");
    let len = match std::fs::metadata(&path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= max {
        return Ok(false);
    }
    let tail = read_tail(&path, keep)?;
    let f = std::fs::OpenOptions::new().append(true).open(&path)?;
    f.set_len(0)?;
    std::io::Write::write_all(&mut &f, &tail)?;
    Ok(true)
}

fn read_tail(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut out = Vec::new();
    f.take(max).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_capped_on_a_character_boundary_and_has_no_control_characters() {
        assert_eq!(text("0.1.0", 64), "0.1.0");
        assert_eq!(text("a\nb\u{1b}[31mc", 64), "a?b?[31mc");
        let long = "é".repeat(100);
        let cut = text(&long, 11);
        assert!(cut.len() <= 11 && cut.ends_with('…'), "{cut:?}");
        assert_eq!(cut, format!("{}…", "é".repeat(4)));
        assert_eq!(text(&"x".repeat(10_000_000), MAX_AGENT_VERSION).len(), MAX_AGENT_VERSION);
        assert_eq!(text("abc", 2), "");
        assert_eq!(text("", 0), "");
    }

    #[test]
    fn the_console_is_cut_down_to_its_tail() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!trim_console(dir.path(), 100, 10).unwrap(), "no console yet");
        let path = dir.path().join("console.log");
        std::fs::write(&path, b"0123456789").unwrap();
        assert!(!trim_console(dir.path(), 100, 10).unwrap());
        let mut all = vec![b'a'; 150];
        all.extend_from_slice(b"0123456789");
        std::fs::write(&path, &all).unwrap();
        assert!(trim_console(dir.path(), 100, 10).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"0123456789");
    }

    #[test]
    fn exec_output_is_held_to_the_contract_limit() {
        let (kept, truncated, total) = output(vec![7; MAX_OUTPUT + 10], false, 3);
        assert_eq!((kept.len(), truncated, total), (MAX_OUTPUT, true, MAX_OUTPUT as u64));
        assert_eq!(output(b"hi".to_vec(), false, 2), (b"hi".to_vec(), false, 2));
        assert_eq!(output(b"hi".to_vec(), true, 100), (b"hi".to_vec(), true, 100));
    }

    fn recorded() -> BTreeMap<String, VolumeRecord> {
        BTreeMap::from([("/mnt/a".to_owned(), VolumeRecord { org: "o".into(), volume: "va".into() })])
    }

    #[test]
    fn mounts_report_only_what_the_host_recorded() {
        let good = apb::MountInfo {
            path: "/mnt/a".into(),
            volume: "someone-elses".into(),
            org: "other-org".into(),
            state: "mounted".into(),
            head_commit: "a".repeat(64),
            dirty_bytes: 5,
            restarts: 1,
            last_error: "x".repeat(100_000),
            pid: 7,
        };
        let planted = apb::MountInfo { path: "/etc".into(), state: "mounted".into(), ..Default::default() };
        let out = mounts(&recorded(), &[planted, good]);
        assert_eq!(out.len(), 1, "an unrecorded path is not reported: {out:?}");
        let m = &out[0];
        assert_eq!((m.volume.as_str(), m.org.as_str()), ("va", "o"), "volume and org come from the host's record");
        assert_eq!((m.state.as_str(), m.dirty_bytes, m.restarts), ("mounted", 5, 1));
        assert_eq!(m.head_commit, "a".repeat(64));
        assert!(m.last_error.len() <= MAX_ERROR);

        let odd = apb::MountInfo {
            path: "/mnt/a".into(),
            state: "pwned\n".into(),
            head_commit: "not a commit".into(),
            ..Default::default()
        };
        let m = &mounts(&recorded(), &[odd])[0];
        assert_eq!((m.state.as_str(), m.head_commit.as_str()), ("unknown", ""));
        let m = &mounts(&recorded(), &[])[0];
        assert_eq!(m.state, "unknown");
        assert!(!m.last_error.is_empty());
    }

    #[test]
    fn the_console_is_read_from_its_tail_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        assert_eq!(console_tail(dir.path()), "(empty)");
        // A guest that printed 64 GiB: a sparse file, its last lines at the end.
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(64 << 30).unwrap();
        drop(f);
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        std::io::Write::write_all(&mut f, b"\nkernel panic\n\x1b[0mlast words\n").unwrap();
        assert_eq!(console_tail(dir.path()), "kernel panic | ?[0mlast words");
    }
}

//! Path normalisation: never panics; accepted paths have no empty, `.` or `..` component,
//! no NUL, respect the limits, and normalising twice changes nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use volume_model::VolPath;
use volume_model::path::{MAX_DEPTH, MAX_NAME_BYTES, MAX_PATH_BYTES};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let Ok(p) = VolPath::parse(s) else { return };
    assert!(p.components().len() <= MAX_DEPTH);
    for c in p.components() {
        assert!(!c.is_empty() && c != "." && c != "..");
        assert!(!c.contains('/') && !c.contains('\0'));
        assert!(c.len() <= MAX_NAME_BYTES);
    }
    let text = p.to_string();
    assert!(text.len() <= MAX_PATH_BYTES);
    assert_eq!(VolPath::parse(&text).unwrap(), p, "normalisation is idempotent");
    assert!(!text.starts_with('/') && !text.ends_with('/'));
});

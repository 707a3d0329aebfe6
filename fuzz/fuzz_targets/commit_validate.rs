//! Commit-request validator: arbitrary protobuf bytes decode (or not) and validate (or not)
//! without panicking; an accepted request satisfies every invariant the server relies on,
//! checked here by independent code rather than by the validator's own helpers.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use proto::volume::CommitRequest;
use volume_model::commit::{MAX_AUTHOR_BYTES, MAX_MESSAGE_BYTES};
use volume_model::convert::{entry_from_proto, entry_to_proto, validate_commit};
use volume_model::{ChangeOp, EntryKind, VolPath};

fuzz_target!(|data: &[u8]| {
    let Ok(req) = CommitRequest::decode(data) else { return };
    let Ok(valid) = validate_commit(&req) else { return };
    assert!(!valid.changes.is_empty());
    assert_eq!(valid.changes.len(), req.changes.len(), "every change is kept, in order");
    // Message and author are kept as sent, within their bounds (a commit record holds them).
    assert!(valid.message.len() <= MAX_MESSAGE_BYTES && valid.message == req.message);
    assert!(valid.author.len() <= MAX_AUTHOR_BYTES && valid.author == req.author);
    // A path appears once, or twice as a delete marker followed by an upsert (a replace).
    let mut seen: HashMap<&VolPath, Vec<bool>> = HashMap::new();
    for c in &valid.changes {
        seen.entry(&c.path).or_default().push(matches!(c.op, ChangeOp::Delete));
    }
    for (path, ops) in &seen {
        assert!(ops.len() == 1 || ops == &[true, false], "path {path} accepted with ops {ops:?} (true = delete)");
    }
    for (c, raw) in valid.changes.iter().zip(&req.changes) {
        assert!(!c.path.to_string().is_empty(), "a change on the volume root was accepted");
        // Normalised paths are fixed points of normalisation, and have no empty, `.` or
        // `..` component.
        let text = c.path.to_string();
        assert_eq!(VolPath::parse(&text).ok().as_ref(), Some(&c.path));
        assert!(text.split('/').all(|p| !p.is_empty() && p != "." && p != ".."), "{text:?}");
        let ChangeOp::Upsert(e) = &c.op else { continue };
        assert!(e.mode <= 0o7777, "mode {:o}", e.mode);
        match &e.kind {
            EntryKind::File(f) => {
                let total: u64 = f.chunks.iter().map(|(_, len)| u64::from(*len)).sum();
                assert_eq!(total, f.size, "chunk lengths must sum to the size");
                assert!(f.chunks.iter().all(|(_, len)| *len > 0), "an empty chunk was accepted");
            }
            EntryKind::Symlink(t) => assert!(!t.is_empty() && !t.contains('\0')),
            EntryKind::Dir(_) => {}
        }
        // The entry survives the trip back to the wire and in again unchanged.
        let back = entry_from_proto(&entry_to_proto(e), true).expect("an accepted entry re-validates");
        assert_eq!(&back, e);
        assert!(!raw.path.is_empty());
    }
});

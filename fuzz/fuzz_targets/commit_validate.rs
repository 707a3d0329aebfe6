//! Commit-request validator: arbitrary protobuf bytes decode (or not) and validate (or not)
//! without panicking; an accepted request satisfies every invariant the server relies on.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use proto::volume::CommitRequest;
use volume_model::{ChangeOp, VolPath};
use volume_model::convert::validate_commit;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = CommitRequest::decode(data) else { return };
    let Ok(valid) = validate_commit(&req) else { return };
    assert!(!valid.changes.is_empty());
    let mut seen = HashSet::new();
    for c in &valid.changes {
        assert!(!c.path.is_root());
        assert!(seen.insert(c.path.clone()), "duplicate path accepted");
        // Normalised paths are fixed points of normalisation.
        assert_eq!(VolPath::parse(&c.path.to_string()).ok().as_ref(), Some(&c.path));
        if let ChangeOp::Upsert(e) = &c.op {
            assert!(e.validate().is_ok());
        }
    }
});

//! Tree-node decoder: arbitrary bytes never panic or over-allocate; whatever decodes
//! re-encodes to the same bytes (the encoding is canonical), so ids are stable.
#![no_main]

use libfuzzer_sys::fuzz_target;
use volume_model::{Commit, TreeNode};

fuzz_target!(|data: &[u8]| {
    if let Ok(node) = TreeNode::decode(data) {
        assert_eq!(node.encode(), data, "decoded node must re-encode to the same bytes");
    }
    if let Ok(commit) = Commit::decode(data) {
        assert_eq!(commit.encode(), data, "decoded commit must re-encode to the same bytes");
    }
});

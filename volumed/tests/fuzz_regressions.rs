//! Inputs the fuzz targets once found, replayed on every test run.

use volumed::model::{Commit, TreeNode};

/// A commit whose varint had a trailing zero group (`c3 .. c3 00`): it decoded, but
/// re-encoded to other bytes, so one commit had two encodings (and two ids).
#[test]
fn non_canonical_varints_are_rejected() {
    let data = include_bytes!("fuzz_regressions/tree_node_noncanonical_varint.bin");
    let decoded = [TreeNode::decode(data).map(|n| n.encode()), Commit::decode(data).map(|c| c.encode())];
    for bytes in decoded.into_iter().flatten() {
        assert_eq!(&bytes[..], &data[..], "decoded input must re-encode to the same bytes");
    }
}

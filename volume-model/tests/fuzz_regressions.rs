//! Inputs the fuzz targets once found, replayed on every test run.

use volume_model::{Commit, TreeNode};

/// A commit whose `seq` varint had a trailing zero group (`c3 .. c3 00`): it decoded, but
/// re-encoded to other bytes, so one commit had two encodings (and two ids). Both decoders
/// must now reject it, the commit decoder for exactly that varint; the same commit written
/// canonically decodes and re-encodes to its own bytes.
#[test]
fn non_canonical_varints_are_rejected() {
    let data: &[u8] = include_bytes!("fuzz_regressions/tree_node_noncanonical_varint.bin");

    let err = Commit::decode(data).expect_err("a commit with a non-minimal varint decoded");
    assert_eq!(err.what, "commit");
    assert!(err.reason.starts_with("non-minimal varint"), "rejected for another reason: {err}");
    // As a tree node the bytes fail earlier (the entry's mode is out of range), but fail.
    let err = TreeNode::decode(data).expect_err("the input decoded as a tree node");
    assert_eq!(err.what, "tree node");

    // The varint starts at byte 50 (after version, volume id, flags and root) and ends with
    // the `c3 00` pair; dropping the zero group and clearing the continuation bit before it
    // gives the minimal form of the same value.
    let end = data.windows(2).position(|w| w == [0xc3, 0x00]).expect("the input holds the c3 00 pair");
    let mut canonical = data[..end].to_vec();
    canonical.push(0x43);
    canonical.extend_from_slice(&data[end + 2..]);
    let commit = Commit::decode(&canonical).expect("the canonical form decodes");
    assert_eq!(commit.encode(), canonical, "a decoded commit re-encodes to the same bytes");
}

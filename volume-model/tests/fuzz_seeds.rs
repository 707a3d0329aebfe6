//! The committed seeds of the `commit_validate` fuzz target (fuzz/seeds/) must reach the
//! accept path: a seed the validator rejects would leave the fuzzer starting from nothing.

use prost::Message;
use proto::volume::CommitRequest;
use volume_model::ChangeOp;
use volume_model::convert::validate_commit;

fn seed(name: &str) -> CommitRequest {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/commit_validate").join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    CommitRequest::decode(bytes.as_slice()).unwrap_or_else(|e| panic!("{name} is not a CommitRequest: {e}"))
}

#[test]
fn every_seed_is_accepted() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/commit_validate");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("fuzz/seeds/commit_validate")
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["delete", "dir_and_symlink", "file", "replace"]);
    for name in &names {
        let valid = validate_commit(&seed(name)).unwrap_or_else(|e| panic!("seed {name} rejected: {e}"));
        assert!(!valid.changes.is_empty());
    }
}

#[test]
fn the_file_seed_carries_an_author() {
    assert_eq!(validate_commit(&seed("file")).expect("file accepted").author, "fuse/seed");
}

#[test]
fn the_replace_seed_is_a_delete_then_an_upsert_of_one_path() {
    let valid = validate_commit(&seed("replace")).expect("replace accepted");
    assert_eq!(valid.changes.len(), 2);
    assert_eq!(valid.changes[0].path, valid.changes[1].path);
    assert!(matches!(valid.changes[0].op, ChangeOp::Delete));
    assert!(matches!(valid.changes[1].op, ChangeOp::Upsert(_)));
}

//! LocalBackend: atomic, durable, verified.

use bytes::Bytes;
use chunkstore::{Backend, ChunkError, ChunkId, LocalBackend};

fn data(n: usize, seed: u8) -> Bytes {
    Bytes::from((0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>())
}

/// Temp entries other than the open backends' owner files.
fn tmp_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("tmp"))
        .unwrap()
        .filter(|e| !e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".owner"))
        .count()
}

#[tokio::test]
async fn put_get_range_exists_delete() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBackend::open(dir.path()).unwrap();
    let d = data(100_000, 1);
    let id = ChunkId::of(&d);
    assert!(!b.exists(id).await.unwrap());
    assert!(matches!(b.get(id).await, Err(ChunkError::NotFound(x)) if x == id));
    b.put(id, d.clone()).await.unwrap();
    b.put(id, d.clone()).await.unwrap(); // idempotent
    assert_eq!(b.get(id).await.unwrap(), d);
    assert_eq!(b.size(id).await.unwrap(), Some(100_000));
    assert_eq!(b.get_range(id, 10, 5).await.unwrap(), d.slice(10..15));
    assert!(b.get_range(id, 99_999, 2).await.is_err(), "range past the end");
    assert!(
        matches!(
            b.get_range(id, 99_999, 2).await,
            Err(ChunkError::InvalidRange { offset: 99_999, len: 2, size: Some(100_000), .. })
        ),
        "range past the end"
    );
    assert!(matches!(b.get_range(id, u64::MAX, 2).await, Err(ChunkError::InvalidRange { .. })), "overflowing range");
    assert_eq!(b.list().unwrap(), vec![id]);
    assert!(b.presign_get(id, std::time::Duration::from_secs(1)).await.unwrap().is_none());
    b.delete(id).await.unwrap();
    b.delete(id).await.unwrap();
    assert!(!b.exists(id).await.unwrap());
    assert_eq!(tmp_files(dir.path()), 0);
}

#[tokio::test]
async fn wrong_id_and_corruption_are_integrity_errors() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBackend::open(dir.path()).unwrap();
    let d = data(5000, 2);
    let wrong = ChunkId::of(b"something else");
    assert!(matches!(b.put(wrong, d.clone()).await, Err(ChunkError::Integrity { .. })));
    assert!(!b.exists(wrong).await.unwrap(), "nothing stored under a wrong id");

    let id = ChunkId::of(&d);
    b.put(id, d.clone()).await.unwrap();
    let path = b.chunk_path(id);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[1234] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    assert!(matches!(b.get(id).await, Err(ChunkError::Integrity { expected, .. }) if expected == id));
    let too_big = Bytes::from(vec![0u8; (chunkstore::MAX_CHUNK_SIZE + 1) as usize]);
    assert!(matches!(b.put(ChunkId::of(&too_big), too_big).await, Err(ChunkError::TooLarge { .. })));
}

#[tokio::test]
async fn streamed_uploads_become_visible_only_when_verified() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBackend::open(dir.path()).unwrap();
    let d = data(70_000, 3);
    let id = ChunkId::of(&d);

    let mut up = b.begin_upload(id, d.len() as u64).unwrap();
    for part in d.chunks(8192) {
        up.write(part).unwrap();
    }
    assert!(!b.exists(id).await.unwrap(), "invisible before finish");
    assert_eq!(up.finish().unwrap(), 70_000);
    assert_eq!(b.get(id).await.unwrap(), d);

    let other = data(70_000, 4);
    let oid = ChunkId::of(&other);
    let mut bad = b.begin_upload(oid, 70_000).unwrap();
    bad.write(&d).unwrap(); // wrong bytes for `oid`
    assert!(matches!(bad.finish(), Err(ChunkError::Integrity { .. })));
    assert!(!b.exists(oid).await.unwrap());

    let mut over = b.begin_upload(oid, 10).unwrap();
    assert!(matches!(over.write(&other[..11]), Err(ChunkError::TooLarge { .. })));
    drop(over);
    let mut abandoned = b.begin_upload(oid, 70_000).unwrap();
    abandoned.write(&other[..100]).unwrap();
    drop(abandoned);
    assert_eq!(tmp_files(dir.path()), 0, "failed and dropped uploads leave no temp files");
}

#[tokio::test]
async fn stale_temp_files_are_removed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBackend::open(dir.path()).unwrap();
    let mut up = b.begin_upload(ChunkId::of(b"x"), 1).unwrap();
    up.write(b"x").unwrap();
    std::mem::forget(up); // simulate a crash: the temp file stays
    assert_eq!(tmp_files(dir.path()), 1);
    // Another opener while the backend that staged it lives keeps it (it may be mid-upload).
    LocalBackend::open(dir.path()).unwrap();
    assert_eq!(tmp_files(dir.path()), 1);
    // What a crashed process left (its owner file is gone or unlocked) is removed.
    std::fs::write(dir.path().join("tmp/o99x00000000000000aa-0-00000000000000aa"), b"x").unwrap();
    std::fs::write(dir.path().join("tmp/o98x00000000000000bb.owner"), b"").unwrap();
    std::fs::write(dir.path().join("tmp/o98x00000000000000bb-3-00000000000000bb"), b"x").unwrap();
    assert_eq!(tmp_files(dir.path()), 3);
    LocalBackend::open(dir.path()).unwrap();
    assert_eq!(tmp_files(dir.path()), 1, "only the live backend's upload is left");
    drop(b);
}

#[tokio::test]
async fn a_batch_stores_its_chunks_only_on_commit() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBackend::open(dir.path()).unwrap();
    let chunks: Vec<Bytes> = (0..300).map(|i| data(100 + i, i as u8)).collect();
    b.put(ChunkId::of(&chunks[0]), chunks[0].clone()).await.unwrap();
    let mut batch = b.begin_batch().unwrap();
    for c in &chunks {
        batch.add(ChunkId::of(c), c).unwrap();
    }
    batch.add(ChunkId::of(&chunks[5]), &chunks[5]).unwrap(); // twice: stored once
    assert_eq!((batch.len(), batch.already_present()), (300, 1));
    assert_eq!(tmp_files(dir.path()), 1, "one staging directory");
    assert!(!b.exists(ChunkId::of(&chunks[1])).await.unwrap(), "invisible before commit");
    let stored = batch.commit().unwrap();
    assert_eq!(stored.len(), 300);
    assert_eq!(tmp_files(dir.path()), 0);
    for c in &chunks {
        assert_eq!(b.get(ChunkId::of(c)).await.unwrap(), *c);
    }
    assert_eq!(b.list().unwrap().len(), 300);
    // Both durability passes store the same way.
    for (k, policy) in [chunkstore::SyncPolicy::PerFile, chunkstore::SyncPolicy::Syncfs].into_iter().enumerate() {
        let more: Vec<Bytes> = (0..70).map(|i| data(50 + i, 100 + k as u8 * 70 + i as u8)).collect();
        let mut batch = b.begin_batch().unwrap();
        for c in &more {
            batch.add(ChunkId::of(c), c).unwrap();
        }
        assert_eq!(batch.commit_with(policy).unwrap().len(), 70);
        for c in &more {
            assert_eq!(b.get(ChunkId::of(c)).await.unwrap(), *c);
        }
    }
    assert_eq!(tmp_files(dir.path()), 0);
}

#[tokio::test]
async fn a_failed_or_dropped_batch_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let b = LocalBackend::open(dir.path()).unwrap();
    let (x, y) = (data(1000, 1), data(1000, 2));
    let mut batch = b.begin_batch().unwrap();
    batch.add(ChunkId::of(&x), &x).unwrap();
    assert!(matches!(batch.add(ChunkId::of(&x), &y), Err(ChunkError::Integrity { .. })));
    assert!(matches!(batch.add(ChunkId::of(&y), &x), Err(ChunkError::Integrity { .. })));
    drop(batch);
    assert_eq!(tmp_files(dir.path()), 0);
    assert!(b.list().unwrap().is_empty());
    // What a crash mid-batch leaves (a staging directory with files) is removed at open.
    let stale = dir.path().join("tmp/1-2-3.batch");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("0"), b"partial").unwrap();
    LocalBackend::open(dir.path()).unwrap();
    assert_eq!(tmp_files(dir.path()), 0);
}

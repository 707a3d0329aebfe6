//! ChunkCache: verified, size-capped LRU, one fetch per missing chunk, survives restarts.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use chunkstore::{ChunkCache, ChunkError, ChunkId};

fn chunk(seed: u8, len: usize) -> (ChunkId, Bytes) {
    let b = Bytes::from((0..len).map(|i| (i as u8) ^ seed).collect::<Vec<u8>>());
    (ChunkId::of(&b), b)
}

/// Gives cached files distinct, ordered mtimes (the LRU clock) without sleeping.
fn set_age(cache: &ChunkCache, id: ChunkId, secs_ago: u64) {
    let f = std::fs::File::options().write(true).open(cache.path_of(id)).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(secs_ago)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_fetch_once() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
    let (id, data) = chunk(1, 10_000);
    let fetches = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Barrier::new(32));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (cache, fetches, gate, data) = (cache.clone(), fetches.clone(), gate.clone(), data.clone());
        tasks.push(tokio::spawn(async move {
            gate.wait().await;
            cache
                .get_or_fetch(id, || async move {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    Ok(data)
                })
                .await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), data);
    }
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
    assert_eq!(cache.stats().fetches, 1);
    assert!(cache.contains(id));
}

#[tokio::test]
async fn wrong_bytes_are_never_cached_or_served() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
    let (id, data) = chunk(2, 5000);
    let (_, other) = chunk(3, 5000);
    let err = cache.get_or_fetch(id, || async { Ok(other.clone()) }).await.unwrap_err();
    assert!(matches!(err, ChunkError::Integrity { .. }));
    assert!(!cache.contains(id));
    assert!(matches!(cache.insert(id, other.clone()).await, Err(ChunkError::Integrity { .. })));
    // A failed fetch is retried by the next call.
    assert_eq!(cache.get_or_fetch(id, || async { Ok(data.clone()) }).await.unwrap(), data);

    // Corrupt the cached file: the next read drops it and refetches.
    let path = cache.path_of(id);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    assert_eq!(cache.get(id).await.unwrap(), None);
    assert_eq!(cache.stats().corrupt_dropped, 1);
    let refetched = Arc::new(AtomicUsize::new(0));
    let r = refetched.clone();
    let got = cache
        .get_or_fetch(id, || async move {
            r.fetch_add(1, Ordering::SeqCst);
            Ok(data.clone())
        })
        .await
        .unwrap();
    assert_eq!(ChunkId::of(&got), id);
    assert_eq!(refetched.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn capacity_is_kept_with_lru_order_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(dir.path(), 30_000).unwrap();
    let chunks: Vec<_> = (0..3).map(|i| chunk(10 + i, 10_000)).collect();
    for (i, (id, data)) in chunks.iter().enumerate() {
        cache.insert(*id, data.clone()).await.unwrap();
        set_age(&cache, *id, 100 - i as u64 * 10); // chunk 0 oldest
    }
    // Touch chunk 0: now chunk 1 is the least recently used.
    assert!(cache.get(chunks[0].0).await.unwrap().is_some());
    let (new_id, new_data) = chunk(20, 10_000);
    cache.insert(new_id, new_data).await.unwrap();
    assert!(cache.contains(chunks[0].0), "recently used chunk kept");
    assert!(!cache.contains(chunks[1].0), "least recently used chunk evicted");
    assert!(cache.contains(chunks[2].0) && cache.contains(new_id));
    assert_eq!(cache.stats().bytes_cached, 30_000);
    assert_eq!(cache.stats().evictions, 1);

    // Survives reopen with the right size; oversize chunks are not stored.
    drop(cache);
    let reopened = ChunkCache::open(dir.path(), 30_000).unwrap();
    assert_eq!(reopened.stats().bytes_cached, 30_000);
    assert!(reopened.get(new_id).await.unwrap().is_some());
    let (big, big_data) = chunk(30, 40_000);
    reopened.insert(big, big_data).await.unwrap();
    assert!(!reopened.contains(big));
    assert_eq!(reopened.stats().fills_skipped, 1);
}

#[tokio::test]
async fn two_instances_on_one_directory_stay_under_capacity_together() {
    let dir = tempfile::tempdir().unwrap();
    let a = ChunkCache::open(dir.path(), 25_000).unwrap();
    let b = ChunkCache::open(dir.path(), 25_000).unwrap();
    for i in 0..10u8 {
        let (id, data) = chunk(40 + i, 5_000);
        let target = if i % 2 == 0 { &a } else { &b };
        target.insert(id, data).await.unwrap();
        set_age(target, id, 1000 - i as u64);
    }
    let on_disk: u64 = walk(dir.path());
    assert!(on_disk <= 25_000, "{on_disk} bytes cached by two instances, cap 25000");
    // The newest five survive, whichever instance wrote them.
    for i in 5..10u8 {
        assert!(a.contains(chunk(40 + i, 5_000).0), "chunk {i}");
    }
}

fn walk(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for shard in std::fs::read_dir(dir).unwrap() {
        let shard = shard.unwrap();
        if shard.file_name().len() == 2 {
            for f in std::fs::read_dir(shard.path()).unwrap() {
                total += f.unwrap().metadata().unwrap().len();
            }
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_shared_fetch_fails_every_waiter_with_its_cause() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
    let (id, _) = chunk(50, 1000);
    let gate = Arc::new(tokio::sync::Barrier::new(8));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (cache, gate) = (cache.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            gate.wait().await;
            cache
                .get_or_fetch(id, || async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "no route");
                    Err(ChunkError::Fetch { chunk: id, source: Box::new(refused) })
                })
                .await
        }));
    }
    for t in tasks {
        let err = t.await.unwrap().unwrap_err();
        assert!(matches!(err.root(), ChunkError::Fetch { chunk, .. } if *chunk == id), "{err:?}");
        assert_eq!(err.to_string(), format!("fetching chunk {id}: no route"));
        let source = std::error::Error::source(err.root()).expect("the fetch's error is the source");
        assert_eq!(source.to_string(), "no route");
        assert!(!err.is_transient() && !err.is_integrity());
    }
    assert!(!cache.contains(id));
}

//! Crash safety: kill -9 the real `volumed` binary at random points during a stream of
//! commits, restart it, and check that every acknowledged commit is readable with the right
//! bytes, that the head never points at a partial commit, and that the store always opens.
//!
//! `SAIL_CRASH_ROUNDS` (default 50) and `SAIL_CRASH_SEED` (default: time) make runs
//! replayable; the seed is printed.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{bytes_for, file};
use proto::volume as pb;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use volume_client::VolumeClient;

const ORG: &str = "crash";
const VOL: &str = "stream";

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

async fn start_volumed(dir: &std::path::Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_volumed"))
        .args(["--data-dir", dir.to_str().unwrap(), "--listen", "127.0.0.1:0", "--print-addr"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn volumed");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("volumed did not start within 60 s")
        .unwrap()
        .expect("volumed exited before listening (store failed to open?)");
    let addr = line.strip_prefix("listening on ").expect("address line").to_owned();
    (child, format!("http://{addr}"))
}

/// A client with the data directory's operator key (volumed wrote it on first start).
async fn connect(dir: &std::path::Path, endpoint: &str) -> Result<VolumeClient, volume_client::ClientError> {
    let key = tenancy::credentials::read_key_file(&dir.join("keys/operator.key")).unwrap().expect("operator key written");
    VolumeClient::connect_with_key(endpoint, Some(&key)).await
}

/// File names carry what their contents must be: `r{round}/c{i}-{seed}-{len}`.
fn expected(name: &str) -> Vec<u8> {
    let tail = name.rsplit('/').next().unwrap();
    let mut parts = tail.split('-').skip(1);
    let seed: u64 = parts.next().unwrap().parse().unwrap();
    let len: usize = parts.next().unwrap().parse().unwrap();
    bytes_for(seed, len)
}

/// Walks the whole head tree. Every file's chunk list must be exactly what its expected
/// bytes chunk and hash to (so the head references the right bytes); files for which
/// `download` says yes are also downloaded, every chunk verified by the client.
async fn verify_head(
    c: &mut VolumeClient,
    known: &mut HashMap<String, Vec<chunkstore::ChunkId>>,
    mut download: impl FnMut(&str) -> bool,
) -> BTreeMap<String, usize> {
    let mut files = BTreeMap::new();
    let mut dirs = vec![String::new()];
    let head = c.head(ORG, VOL).await.unwrap().commit;
    while let Some(dir) = dirs.pop() {
        let req = pb::ListDirRequest {
            volume: Some(pb::VolumeRef { org: ORG.into(), name: VOL.into() }),
            commit: head.clone(),
            path: dir.clone(),
        };
        let listing = c.grpc().list_dir(req).await.unwrap().into_inner();
        for e in listing.entries {
            let path = if dir.is_empty() { e.name.clone() } else { format!("{dir}/{}", e.name) };
            match e.entry.unwrap().kind.unwrap() {
                pb::entry::Kind::Dir(_) => dirs.push(path),
                pb::entry::Kind::File(f) => {
                    // The ids the expected bytes chunk to, computed once per path.
                    let want_ids = known.entry(path.clone()).or_insert_with(|| {
                        let want = expected(&path);
                        chunkstore::Chunking::Fixed.policy_for(want.len() as u64).chunk(&want).iter().map(|s| s.id).collect()
                    });
                    let ids: Vec<chunkstore::ChunkId> =
                        f.chunks.iter().map(|c| chunkstore::ChunkId::from_slice(&c.id).unwrap()).collect();
                    assert_eq!(&ids, want_ids, "{path} references the wrong chunks");
                    if download(&path) {
                        // Each chunk is verified against its id, and the ids are the expected
                        // bytes' ids: the downloaded file is byte-for-byte the expected one.
                        let parts = c
                            .download_chunks(ORG, VOL, &ids)
                            .await
                            .unwrap_or_else(|e| panic!("head references {path} whose chunks are unreadable: {e}"));
                        assert_eq!(parts.iter().map(|p| p.len() as u64).sum::<u64>(), f.size, "{path} size");
                    }
                    files.insert(path, f.size as usize);
                }
                other => panic!("unexpected entry {other:?}"),
            }
        }
    }
    files
}

/// What a call fails with when the server is killed under it: the connection breaks.
fn transport_failure(e: &volume_client::ClientError) -> bool {
    use volume_client::ClientError;
    match e {
        ClientError::Connect { .. } | ClientError::Transfer { .. } => true,
        ClientError::Server { code, .. } => {
            matches!(code, tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled)
        }
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_commits_loses_no_acknowledged_commit() {
    let rounds: u64 = std::env::var("SAIL_CRASH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let seed: u64 = std::env::var("SAIL_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64);
    eprintln!("crash test: {rounds} rounds, SAIL_CRASH_SEED={seed}");
    let mut rng = Rng(seed | 1);
    let dir = tempfile::tempdir().unwrap();
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default(); // (commit id, file)
    let mut total_acked = 0;
    let mut verified = std::collections::HashSet::new();
    let mut known = HashMap::new();

    for round in 0..rounds {
        let (mut child, endpoint) = start_volumed(dir.path()).await;
        let mut c = connect(dir.path(), &endpoint).await.unwrap();
        c.get_volume(ORG, VOL, true).await.unwrap();

        // Everything acknowledged so far is there and references the right bytes; files
        // acknowledged since the last check, and a random sample of older ones, are
        // downloaded and verified (all of them are after the last round); the log has them.
        let mut sample = Rng(rng.next() | 1);
        let files = verify_head(&mut c, &mut known, |p| !verified.contains(p) || sample.next().is_multiple_of(50)).await;
        verified.extend(files.keys().cloned());
        // The whole log, paged newest first (`before_seq` is exclusive).
        let mut logged = std::collections::HashSet::new();
        let mut before_seq = 0;
        loop {
            let volume = Some(pb::VolumeRef { org: ORG.into(), name: VOL.into() });
            let page = c.grpc().log(pb::LogRequest { volume, limit: 1000, before_seq }).await.unwrap().into_inner();
            let Some(oldest) = page.commits.iter().map(|c| c.seq).min() else { break };
            logged.extend(page.commits.into_iter().map(|c| c.id));
            if oldest == 0 {
                break;
            }
            assert!(before_seq == 0 || oldest < before_seq, "log paging went backwards: {oldest} after {before_seq}");
            before_seq = oldest;
        }
        for (commit, path) in acked.lock().unwrap().iter() {
            assert!(files.contains_key(path), "round {round}: acknowledged {path} lost (seed {seed})");
            assert!(logged.contains(commit), "round {round}: commit {commit} missing from log (seed {seed})");
        }

        // Commit a stream of small (sometimes two-chunk) files until killed.
        let writer = {
            let acked = acked.clone();
            let mut wrng = Rng(rng.next() | 1);
            tokio::spawn(async move {
                for i in 0.. {
                    let len = if wrng.next().is_multiple_of(40) { (8 << 20) + 4096 } else { 1 + (wrng.next() % 32768) as usize };
                    let fseed = wrng.next() % 1_000_000;
                    let path = format!("r{round}/c{i}-{fseed}-{len}");
                    let head = c.head(ORG, VOL).await?.commit;
                    let r = c.commit_files(ORG, VOL, &head, vec![file(&path, bytes_for(fseed, len))], &[]).await?;
                    acked.lock().unwrap().push((r.commit, path));
                }
                Ok::<(), volume_client::ClientError>(())
            })
        };
        let kill_after = Duration::from_millis(20 + rng.next() % 400);
        tokio::time::sleep(kill_after).await;
        child.start_kill().unwrap(); // SIGKILL
        child.wait().await.unwrap();
        // The writer never stops on its own: it ends with the error the kill caused, and
        // that must be a transport failure, not a refusal by a server that was still up.
        match writer.await.expect("writer panicked") {
            Ok(()) => {}
            Err(e) if transport_failure(&e) => {}
            Err(e) => panic!("round {round}: the writer failed with a non-transport error: {e:?} (seed {seed})"),
        }
        total_acked = acked.lock().unwrap().len();
    }

    // One last restart: the store opens and holds every acknowledged commit.
    let (_child, endpoint) = start_volumed(dir.path()).await;
    let mut c = connect(dir.path(), &endpoint).await.unwrap();
    let files = verify_head(&mut c, &mut known, |_| true).await;
    for (_, path) in acked.lock().unwrap().iter() {
        assert!(files.contains_key(path), "acknowledged {path} lost (seed {seed})");
    }
    assert!(total_acked >= rounds as usize, "too few commits acknowledged to mean anything: {total_acked}");
    eprintln!("crash test: {total_acked} acknowledged commits survived {rounds} kill -9 rounds");
}

//! Merge semantics of DESIGN 2.1 over the real gRPC API and data path: concurrent commits to
//! different paths all survive, the later commit to one path wins, delete markers merge the
//! same way, and chunks already stored are never uploaded again.

mod common;

use common::{bytes_for, client, file, start};
use proto::volume as pb;

const ORG: &str = "acme";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_concurrent_clients_on_different_paths_all_survive() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut c = client(&server).await;
    let vol = c.get_volume(ORG, "ws", true).await.unwrap();
    let base = vol.head.clone();

    let mut tasks = Vec::new();
    for i in 0..8u64 {
        let endpoint = server.endpoint();
        let key = server.operator_key().clone();
        let base = base.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = volume_client::VolumeClient::connect_with_key(&endpoint, Some(&key)).await.unwrap();
            let mut last = None;
            for j in 0..5u64 {
                let files = vec![
                    file(&format!("client{i}/file{j}.txt"), bytes_for(i * 100 + j, 3000 + j as usize)),
                    file(&format!("shared/dir{j}/from{i}"), bytes_for(i * 1000 + j, 100)),
                ];
                let r = c.commit_files(ORG, "ws", &base, files, &[]).await.unwrap();
                last = Some(r);
            }
            last.unwrap()
        }));
    }
    let mut merged = 0;
    for t in tasks {
        if t.await.unwrap().merged {
            merged += 1;
        }
    }
    assert!(merged >= 7, "all but the first client commit onto a moved head, got {merged}");

    let head = c.head(ORG, "ws").await.unwrap();
    assert_eq!(head.seq, 40, "8 clients x 5 commits");
    for i in 0..8u64 {
        for j in 0..5u64 {
            let got = c.read_file(ORG, "ws", &format!("client{i}/file{j}.txt")).await.unwrap();
            assert_eq!(got, bytes_for(i * 100 + j, 3000 + j as usize), "client{i}/file{j}");
            let got = c.read_file(ORG, "ws", &format!("shared/dir{j}/from{i}")).await.unwrap();
            assert_eq!(got, bytes_for(i * 1000 + j, 100));
        }
    }
    let root = c
        .grpc()
        .list_dir(pb::ListDirRequest { volume: vref("ws"), commit: String::new(), path: "/".into() })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = root.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names.len(), 9, "{names:?}");

    // Tree nodes are readable by id, and Stat agrees with the listing.
    let shared = root.entries.iter().find(|e| e.name == "shared").unwrap();
    let Some(pb::entry::Kind::Dir(dir)) = shared.entry.as_ref().unwrap().kind.clone() else { panic!("shared is a dir") };
    let node = c.grpc().get_tree(pb::GetTreeRequest { volume: vref("ws"), tree: dir.tree }).await.unwrap().into_inner();
    assert_eq!(node.entries.len(), 5, "shared/dir0..dir4");
    let stat = c
        .grpc()
        .stat(pb::StatRequest { volume: vref("ws"), commit: head.commit.clone(), path: "client3/file2.txt".into() })
        .await
        .unwrap()
        .into_inner();
    let Some(pb::entry::Kind::File(f)) = stat.entry.unwrap().kind else { panic!("a file") };
    assert_eq!(f.size, 3002);
    assert_eq!(stat.commit, head.commit);
    let err = c.grpc().get_tree(pb::GetTreeRequest { volume: vref("ws"), tree: vec![7; 32] }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "unknown tree ids are a clear error");
}

fn vref(name: &str) -> Option<pb::VolumeRef> {
    Some(pb::VolumeRef { org: ORG.into(), name: name.into() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_path_last_writer_wins_and_deletes_merge_the_same_way() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut a = client(&server).await;
    let mut b = client(&server).await;
    let base = a.get_volume(ORG, "lww", true).await.unwrap().head;

    // Same path: both start from `base`; the later commit wins.
    a.commit_files(ORG, "lww", &base, vec![file("f", b"from a".to_vec())], &[]).await.unwrap();
    let rb = b.commit_files(ORG, "lww", &base, vec![file("f", b"from b".to_vec())], &[]).await.unwrap();
    assert!(rb.merged);
    assert_eq!(a.read_file(ORG, "lww", "f").await.unwrap(), b"from b");

    // Update then delete: the later delete wins.
    let base = a.head(ORG, "lww").await.unwrap().commit;
    a.commit_files(ORG, "lww", &base, vec![file("f", b"update".to_vec())], &[]).await.unwrap();
    b.commit_files(ORG, "lww", &base, vec![], &["f"]).await.unwrap();
    let err = a.read_file(ORG, "lww", "f").await.unwrap_err();
    assert_eq!(err.name(), Some("VolumePathNotFoundError"), "{err}");

    // Delete then update: the later update wins (and re-creates missing parents).
    a.commit_files(ORG, "lww", &base, vec![file("d/g", b"one".to_vec())], &[]).await.unwrap();
    let base = a.head(ORG, "lww").await.unwrap().commit;
    a.commit_files(ORG, "lww", &base, vec![], &["d"]).await.unwrap();
    b.commit_files(ORG, "lww", &base, vec![file("d/g", b"two".to_vec())], &[]).await.unwrap();
    assert_eq!(a.read_file(ORG, "lww", "d/g").await.unwrap(), b"two");

    // Deleting what someone else already deleted is a no-op, not an error.
    let base = a.head(ORG, "lww").await.unwrap().commit;
    a.commit_files(ORG, "lww", &base, vec![], &["d"]).await.unwrap();
    b.commit_files(ORG, "lww", &base, vec![], &["d"]).await.unwrap();

    // A change below a path that is now a file cannot merge.
    let base = a.head(ORG, "lww").await.unwrap().commit;
    a.commit_files(ORG, "lww", &base, vec![file("x", b"file".to_vec())], &[]).await.unwrap();
    let err = b.commit_files(ORG, "lww", &base, vec![file("x/y", b"nested".to_vec())], &[]).await.unwrap_err();
    assert_eq!(err.name(), Some("VolumeCommitConflictError"), "{err}");
    assert_eq!(a.read_file(ORG, "lww", "x").await.unwrap(), b"file");

    // The log lists every commit newest first, and diff reports exactly what changed.
    let log = a.grpc().log(pb::LogRequest { volume: vref("lww"), limit: 0, before_seq: 0 }).await.unwrap().into_inner();
    let seqs: Vec<u64> = log.commits.iter().map(|c| c.seq).collect();
    assert_eq!(seqs, (0..=seqs[0]).rev().collect::<Vec<_>>());
    let before = log.commits[1].id.clone();
    let diff =
        a.grpc().diff(pb::DiffRequest { volume: vref("lww"), from: before, to: String::new() }).await.unwrap().into_inner();
    assert_eq!(diff.changes.len(), 1);
    assert_eq!(diff.changes[0].path, "x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_chunks_are_never_uploaded_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut c = client(&server).await;
    let base = c.get_volume(ORG, "dedupe", true).await.unwrap().head;
    const MIB: usize = 1 << 20;
    let mut data = bytes_for(7, 16 * MIB); // two full 8 MiB chunks
    c.commit_files(ORG, "dedupe", &base, vec![file("big", data.clone())], &[]).await.unwrap();
    assert_eq!(c.last_upload.chunks_uploaded, 2);

    // Append after the full final chunk: only the new tail chunk goes up.
    data.extend(bytes_for(8, 1000));
    let head = c.head(ORG, "dedupe").await.unwrap().commit;
    c.commit_files(ORG, "dedupe", &head, vec![file("big", data.clone())], &[]).await.unwrap();
    assert_eq!((c.last_upload.chunks_uploaded, c.last_upload.bytes_uploaded), (1, 1000));

    // Rewrite one byte inside the first chunk: exactly that chunk goes up again.
    data[5] ^= 0xff;
    let head = c.head(ORG, "dedupe").await.unwrap().commit;
    c.commit_files(ORG, "dedupe", &head, vec![file("big", data.clone())], &[]).await.unwrap();
    assert_eq!((c.last_upload.chunks_uploaded, c.last_upload.bytes_uploaded), (1, 8 * MIB as u64));

    // The same bytes under another name upload nothing.
    let head = c.head(ORG, "dedupe").await.unwrap().commit;
    c.commit_files(ORG, "dedupe", &head, vec![file("copy", data.clone())], &[]).await.unwrap();
    assert_eq!(c.last_upload.chunks_uploaded, 0);
    assert_eq!(c.read_file(ORG, "dedupe", "copy").await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_are_org_scoped_and_minted_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut c = client(&server).await;
    let err = c.get_volume(ORG, "nope", false).await.unwrap_err();
    assert_eq!(err.name(), Some("VolumeNotFoundError"));
    let a = c.get_volume(ORG, "same", true).await.unwrap();
    let b = c.get_volume("other-org", "same", true).await.unwrap();
    assert_ne!(a.id, b.id);
    assert_eq!(c.get_volume(ORG, "same", true).await.unwrap().id, a.id, "minting twice returns the same volume");
    let list = c.grpc().list_volumes(pb::ListVolumesRequest { org: ORG.into() }).await.unwrap().into_inner();
    assert_eq!(list.volumes.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), vec!["same"]);

    // Delete keeps chunks another volume references.
    let data = bytes_for(1, 5000);
    c.commit_files(ORG, "same", &a.head, vec![file("f", data.clone())], &[]).await.unwrap();
    c.commit_files("other-org", "same", &b.head, vec![file("f", data.clone())], &[]).await.unwrap();
    c.grpc().delete_volume(pb::DeleteVolumeRequest { volume: vref("same") }).await.unwrap();
    assert_eq!(c.get_volume(ORG, "same", false).await.unwrap_err().name(), Some("VolumeNotFoundError"));
    assert_eq!(c.read_file("other-org", "same", "f").await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_through_the_shared_verified_cache() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let cache_dir = dir.path().join("cache");
    let cached_client = || async {
        let cache = chunkstore::ChunkCache::open(&cache_dir, 1 << 30).unwrap();
        volume_client::VolumeClient::connect_with_key(&server.endpoint(), Some(server.operator_key()))
            .await
            .unwrap()
            .with_cache(cache)
    };
    let mut a = cached_client().await;
    let base = a.get_volume(ORG, "cached", true).await.unwrap().head;
    let data = bytes_for(11, (8 << 20) * 2 + 77); // three chunks
    a.commit_files(ORG, "cached", &base, vec![file("f.bin", data.clone())], &[]).await.unwrap();

    assert_eq!(a.read_file(ORG, "cached", "f.bin").await.unwrap(), data);
    assert_eq!(a.cache().unwrap().stats().fetches, 3);
    // Another client (another process, in production) on the same cache directory: no fetch.
    let mut b = cached_client().await;
    assert_eq!(b.read_file(ORG, "cached", "f.bin").await.unwrap(), data);
    assert_eq!(b.cache().unwrap().stats().fetches, 0);
    assert_eq!(b.cache().unwrap().stats().hits, 3);

    // A corrupted cached chunk is dropped and fetched again; the reader still gets the right bytes.
    let first = chunkstore::ChunkId::of(&data[..8 << 20]);
    let path = b.cache().unwrap().path_of(first);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 0x55;
    std::fs::write(&path, bytes).unwrap();
    assert_eq!(b.read_file(ORG, "cached", "f.bin").await.unwrap(), data);
    let stats = b.cache().unwrap().stats();
    assert_eq!((stats.corrupt_dropped, stats.fetches), (1, 1));
}

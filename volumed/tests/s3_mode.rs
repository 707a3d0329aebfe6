//! volumed with chunks in a real S3-compatible server (s3s-fs on 127.0.0.1): the same API,
//! with presigned S3 URLs, and no chunk byte passing through volumed.

mod common;

use common::{bytes_for, file};
use proto::volume as pb;
use volume_client::VolumeClient;
use volumed::server::{BackendConfig, Server, ServerConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_and_reads_through_presigned_s3_urls() {
    let s3 = chunkstore::testing::LocalS3Server::start().await.expect("s3s-fs starts (run scripts/setup.sh test)");
    let cfg = s3.s3_config("volumes");
    chunkstore::S3Backend::new(cfg.clone()).await.unwrap().ensure_bucket().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut sc = ServerConfig::local(dir.path(), "127.0.0.1:0".parse().unwrap());
    sc.backend = BackendConfig::S3(cfg);
    let server = Server::bind(sc).await.unwrap().spawn();
    let mut c = VolumeClient::connect_with_key(&server.endpoint(), Some(server.operator_key())).await.unwrap();
    let vol = c.get_volume("acme", "s3vol", true).await.unwrap();

    // Upload URLs point at the object store, not at volumed.
    let data = bytes_for(1, (8 << 20) + 123); // two chunks
    let id = chunkstore::ChunkId::of(&data[..8 << 20]);
    let req = pb::MissingChunksRequest {
        volume: Some(pb::VolumeRef { org: "acme".into(), name: "s3vol".into() }),
        chunks: vec![pb::ChunkSpec { id: id.as_bytes().to_vec(), len: 8 << 20, piece_cvs: vec![] }],
        accept_batches: false,
    };
    let urls = c.grpc().missing_chunks(req).await.unwrap().into_inner().uploads;
    assert_eq!(urls.len(), 1);
    assert!(urls[0].url.starts_with(&s3.endpoint()), "{} is not an S3 URL", urls[0].url);
    assert!(!urls[0].url.contains(&server.addr.to_string()));

    let r = c.commit_files("acme", "s3vol", &vol.head, vec![file("big.bin", data.clone())], &[]).await.unwrap();
    assert_eq!(c.last_upload.chunks_uploaded, 2);
    assert_eq!(c.read_file("acme", "s3vol", "big.bin").await.unwrap(), data);

    // A second volume referencing the same bytes uploads nothing: the store already has them.
    let other = c.get_volume("acme", "s3vol2", true).await.unwrap();
    c.commit_files("acme", "s3vol2", &other.head, vec![file("copy.bin", data.clone())], &[]).await.unwrap();
    assert_eq!(c.last_upload.chunks_uploaded, 0);
    assert!(!r.commit.is_empty());

    // Small files keep one presigned PUT each: S3 has no multi-object put, and batching them
    // through volumed would route their bytes through it.
    let files: Vec<_> = (0..40).map(|i| file(&format!("small/{i}"), bytes_for(100 + i, 300 + i as usize))).collect();
    let head = c.head("acme", "s3vol").await.unwrap().commit;
    let req = pb::MissingChunksRequest {
        volume: Some(pb::VolumeRef { org: "acme".into(), name: "s3vol".into() }),
        chunks: vec![pb::ChunkSpec { id: chunkstore::ChunkId::of(b"tiny").as_bytes().to_vec(), len: 4, piece_cvs: vec![] }],
        accept_batches: true,
    };
    let resp = c.grpc().missing_chunks(req).await.unwrap().into_inner();
    assert!(resp.batches.is_empty());
    assert_eq!(resp.uploads.len(), 1);
    c.commit_files("acme", "s3vol", &head, files, &[]).await.unwrap();
    assert_eq!((c.last_upload.chunks_uploaded, c.last_upload.batches), (40, 0));
    assert_eq!(c.read_file("acme", "s3vol", "small/7").await.unwrap(), bytes_for(107, 307));
}

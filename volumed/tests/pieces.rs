//! Piece chaining values: registered with MissingChunks (checked against the id), returned
//! by ChunkUrls, and used to fetch and verify 1 MiB ranges of a large chunk.

mod common;

use std::collections::HashMap;

use bytes::Bytes;
use chunkstore::ChunkId;
use chunkstore::pieces::{PIECE_SIZE, piece_cvs};
use proto::volume as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_chunks_are_readable_in_verified_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path()).await;
    let mut c = common::client(&server).await;
    c.get_volume("acme", "v", true).await.unwrap();
    let data = Bytes::from(common::bytes_for(1, (20 << 20) + 12345));
    let id = ChunkId::of(&data);

    // CVs that do not merge into the id are refused.
    let mut bad = piece_cvs(&data);
    bad[5] ^= 1;
    let req = pb::MissingChunksRequest {
        volume: Some(pb::VolumeRef { org: "acme".into(), name: "v".into() }),
        chunks: vec![pb::ChunkSpec { id: id.as_bytes().to_vec(), len: data.len() as u64, piece_cvs: bad }],
        accept_batches: false,
    };
    let err = c.grpc().missing_chunks(req).await.unwrap_err();
    assert_eq!(volume_client::error_name(&err).as_deref(), Some("VolumeInvalidArgumentError"));

    // upload_chunks computes and registers them for chunks of 16 MiB and more.
    c.upload_chunks("acme", "v", &HashMap::from([(id, data.clone())])).await.unwrap();
    let url = c.chunk_urls("acme", "v", &[id]).await.unwrap().remove(0);
    assert_eq!(url.piece_cvs, piece_cvs(&data));
    let last = 20; // the 21st piece holds the 12345-byte tail
    for idx in [0usize, 7, last] {
        let piece = c.fetch_piece(&url, id, data.len() as u64, idx).await.unwrap();
        let start = idx * PIECE_SIZE as usize;
        assert_eq!(&piece[..], &data[start..(start + PIECE_SIZE as usize).min(data.len())], "piece {idx}");
    }
    // A tampered CV list is caught before any byte is trusted.
    let mut forged = url.clone();
    forged.piece_cvs[40] ^= 1;
    assert!(matches!(c.fetch_piece(&forged, id, data.len() as u64, 1).await, Err(volume_client::ClientError::Integrity(_))));
    server.stop().await.unwrap();
}

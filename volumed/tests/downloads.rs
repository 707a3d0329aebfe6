//! Downloads of large chunks stream piece by piece, each piece verified against the chunk's
//! CVs before it is sent: 40 concurrent downloads of a 256 MiB chunk stay in bounded memory
//! (they used to read the chunk whole: 10 GiB), and a stored chunk damaged on disk is never
//! sent past its bad piece.

mod common;

use std::collections::HashMap;

use bytes::Bytes;
use chunkstore::ChunkId;
use common::{bytes_for, client, start};
use futures::StreamExt;

const ORG: &str = "acme";

/// Peak resident memory of this process (the server runs in it), bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap();
    kb.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024
}

/// Downloads `url` with reqwest, counting bytes without keeping them; (status, bytes read).
async fn drain(http: &reqwest::Client, url: &str) -> (u16, u64) {
    let resp = http.get(url).send().await.unwrap();
    let status = resp.status().as_u16();
    let mut body = resp.bytes_stream();
    let mut n = 0u64;
    while let Some(Ok(frame)) = body.next().await {
        n += frame.len() as u64;
    }
    (status, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forty_downloads_of_a_256_mib_chunk_stay_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut c = client(&server).await;
    c.get_volume(ORG, "v", true).await.unwrap();
    let len = chunkstore::MAX_CHUNK_SIZE as usize;
    let data = Bytes::from(bytes_for(3, len));
    let id = ChunkId::of(&data);
    c.upload_chunks(ORG, "v", &HashMap::from([(id, data.clone())])).await.unwrap();
    let url = c.chunk_urls(ORG, "v", &[id]).await.unwrap().remove(0);
    drop(data);
    // The whole chunk reads back right through the client (verified against its id).
    let got = c.download_chunks(ORG, "v", &[id]).await.unwrap().remove(0);
    assert_eq!(ChunkId::of(&got), id);
    drop(got);

    let before = peak_rss();
    let http = reqwest::Client::new();
    let results = futures::future::join_all((0..40).map(|_| drain(&http, &url.url))).await;
    for (status, n) in &results {
        assert_eq!((*status, *n), (200, len as u64));
    }
    let grew = peak_rss().saturating_sub(before);
    assert!(grew < 1 << 30, "40 downloads of a 256 MiB chunk raised the peak by {} MiB", grew >> 20);
}

#[tokio::test]
async fn a_chunk_damaged_on_disk_is_not_sent_past_its_bad_piece() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut c = client(&server).await;
    c.get_volume(ORG, "v", true).await.unwrap();
    let len = 20 << 20;
    let data = Bytes::from(bytes_for(4, len));
    let id = ChunkId::of(&data);
    c.upload_chunks(ORG, "v", &HashMap::from([(id, data.clone())])).await.unwrap();
    // Flip one byte of piece 5 in the stored file.
    let path = chunkstore::LocalBackend::open(dir.path().join("chunks")).unwrap().chunk_path(id);
    let mut stored = std::fs::read(&path).unwrap();
    stored[5 * (1 << 20) + 123] ^= 0xff;
    std::fs::write(&path, &stored).unwrap();
    let url = c.chunk_urls(ORG, "v", &[id]).await.unwrap().remove(0);
    let (status, n) = drain(&reqwest::Client::new(), &url.url).await;
    assert_eq!(status, 200, "the header went before the bad piece was read");
    assert!(n <= 5 << 20, "nothing of the bad piece or after it was sent: {n} bytes");
    assert!(c.download_chunks(ORG, "v", &[id]).await.is_err(), "the client sees a failed download");
}

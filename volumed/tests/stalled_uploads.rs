//! Stalled clients cannot hang the service: hundreds of uploads that send their headers and a
//! few bytes and then stop (more than tokio's 512 blocking threads) while another client
//! commits and reads. Each stalled upload is answered in bounded time: 408 once it stalled
//! past the limit, or 503 when it waited too long for an upload slot.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use chunkstore::ChunkId;
use common::{bytes_for, client, file};
use proto::volume as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use volumed::datapath::body::UploadLimits;
use volumed::server::{Server, ServerConfig};

const ORG: &str = "acme";
const STALLED: usize = 600;

fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// `http://host:port/path?query` -> (host:port, /path?query).
fn split_url(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let slash = rest.find('/').unwrap();
    (rest[..slash].to_owned(), rest[slash..].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundreds_of_stalled_uploads_do_not_hold_up_commits_and_reads() {
    raise_fd_limit(8192);
    let dir = tempfile::tempdir().unwrap();
    let limits = UploadLimits {
        concurrent: 32,
        queue_wait: Duration::from_secs(2),
        stall: Duration::from_secs(3),
        ..UploadLimits::default()
    };
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let config = ServerConfig { upload_limits: limits, ..ServerConfig::local(dir.path(), addr) };
    let server = Server::bind(config).await.unwrap().spawn();
    let mut c = client(&server).await;
    c.get_volume(ORG, "v", true).await.unwrap();

    // Signed upload URLs for chunks whose uploads will never finish.
    let chunks: Vec<Vec<u8>> = (0..STALLED as u64).map(|i| bytes_for(i + 1000, 64 << 10)).collect();
    let mut urls = Vec::new();
    for part in chunks.chunks(200) {
        let specs = part
            .iter()
            .map(|d| pb::ChunkSpec { id: ChunkId::of(d).as_bytes().to_vec(), len: d.len() as u64, piece_cvs: vec![] })
            .collect();
        let volume = Some(pb::VolumeRef { org: ORG.into(), name: "v".into() });
        let req = pb::MissingChunksRequest { volume, chunks: specs, accept_batches: false };
        urls.extend(c.grpc().missing_chunks(req).await.unwrap().into_inner().uploads);
    }
    assert_eq!(urls.len(), STALLED);
    let mut stalled = Vec::with_capacity(STALLED);
    for u in &urls {
        let (host, path) = split_url(&u.url);
        let mut s = tokio::net::TcpStream::connect(&host).await.unwrap();
        let head = format!("PUT {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {}\r\n\r\n", 64 << 10);
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(b"only these").await.unwrap();
        stalled.push(s);
    }

    // Meanwhile another client commits (its upload gets a slot, or 503 and retries) and reads.
    let big = bytes_for(7, 3 << 20);
    let work = async {
        let head = c.head(ORG, "v").await.unwrap();
        c.commit_files(ORG, "v", &head.commit, vec![file("a.bin", big.clone())], &[]).await.unwrap();
        c.read_file(ORG, "v", "a.bin").await.unwrap()
    };
    let got = tokio::time::timeout(Duration::from_secs(90), work).await;
    assert_eq!(got.expect("a commit and a read finish while hundreds of uploads stall"), big);

    // Every stalled upload gets an answer in bounded time: 408 or 503.
    let answers = futures::future::join_all(stalled.into_iter().map(|mut s| async move {
        let mut buf = vec![0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(60), s.read(&mut buf)).await.ok()?.ok()?;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        text.split_whitespace().nth(1).map(str::to_owned)
    }))
    .await;
    let timed_out = answers.iter().filter(|a| a.as_deref() == Some("408")).count();
    let busy = answers.iter().filter(|a| a.as_deref() == Some("503")).count();
    assert_eq!(
        timed_out + busy,
        STALLED,
        "answers: {:?}",
        answers.iter().filter(|a| !matches!(a.as_deref(), Some("408" | "503"))).take(5).collect::<Vec<_>>()
    );
    assert!(timed_out >= 32, "the uploads holding a slot were cut off when they stalled: {timed_out}");
    // Nothing of theirs was stored.
    let req = pb::MissingChunksRequest {
        volume: Some(pb::VolumeRef { org: ORG.into(), name: "v".into() }),
        chunks: vec![pb::ChunkSpec { id: ChunkId::of(&chunks[0]).as_bytes().to_vec(), len: 64 << 10, piece_cvs: vec![] }],
        accept_batches: false,
    };
    assert_eq!(c.grpc().missing_chunks(req).await.unwrap().into_inner().uploads.len(), 1);
}

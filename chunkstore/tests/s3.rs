//! S3Backend against a real S3-compatible server (s3s-fs on 127.0.0.1, which verifies
//! signatures): round trips, conditional puts, multipart, integrity on read, presigned URLs,
//! tampered and expired signatures, wrong credentials.
#![cfg(feature = "testing")]

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use chunkstore::error::S3Failure;
use chunkstore::testing::LocalS3Server;
use chunkstore::{Backend, ChunkError, ChunkId, S3Backend, S3Config, S3Credentials};

fn data(n: usize, seed: u64) -> Bytes {
    Bytes::from(chunkstore::testing::pseudo_random(n, seed))
}

async fn backend(server: &LocalS3Server, bucket: &str, tweak: impl FnOnce(&mut S3Config)) -> S3Backend {
    let mut cfg = server.s3_config(bucket);
    tweak(&mut cfg);
    let b = S3Backend::new(cfg).await.unwrap();
    b.ensure_bucket().await.unwrap();
    b
}

fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roundtrip_conditional_put_multipart_and_integrity() {
    let server = LocalS3Server::start().await.expect("s3s-fs (bash scripts/setup.sh test installs it)");
    let b = backend(&server, "chunks", |c| {
        c.multipart_threshold = 8 << 20;
        c.part_size = 5 << 20;
    })
    .await;
    for (len, seed) in [(1usize, 1u64), (4096, 2), (8 << 20, 3)] {
        let d = data(len, seed);
        let id = ChunkId::of(&d);
        assert!(matches!(b.get(id).await, Err(ChunkError::NotFound(_))));
        assert!(!b.exists(id).await.unwrap());
        b.put(id, d.clone()).await.unwrap();
        b.put(id, d.clone()).await.unwrap(); // 412 Precondition Failed = already stored
        assert_eq!(b.get(id).await.unwrap(), d);
        assert_eq!(b.size(id).await.unwrap(), Some(len as u64));
    }
    // Multipart: 21 MiB in 5 MiB parts.
    let big = data(21 << 20, 9);
    let big_id = ChunkId::of(&big);
    b.put(big_id, big.clone()).await.unwrap();
    assert_eq!(b.get(big_id).await.unwrap(), big);
    assert_eq!(b.get_range(big_id, (6 << 20) + 3, 100).await.unwrap(), big.slice((6 << 20) + 3..(6 << 20) + 103));
    b.delete(big_id).await.unwrap();
    b.delete(big_id).await.unwrap();
    assert!(!b.exists(big_id).await.unwrap());

    // A wrong id is refused before anything is sent.
    let d = data(1000, 4);
    let wrong = ChunkId::of(b"not these bytes");
    assert!(matches!(b.put(wrong, d.clone()).await, Err(ChunkError::Integrity { .. })));
    assert!(!b.exists(wrong).await.unwrap());

    // Bytes changed behind our back are an integrity error on read.
    let id = ChunkId::of(&d);
    b.put(id, d.clone()).await.unwrap();
    let stored = server.root_dir().join("chunks").join(b.key(id));
    assert!(stored.is_file(), "s3s-fs stores objects at <root>/<bucket>/<key>: {}", stored.display());
    let mut bytes = std::fs::read(&stored).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&stored, bytes).unwrap();
    assert!(matches!(b.get(id).await, Err(ChunkError::Integrity { expected, .. }) if expected == id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presigned_urls_work_and_tampered_or_expired_ones_do_not() {
    let server = LocalS3Server::start().await.unwrap();
    let b = backend(&server, "presign", |_| {}).await;
    let d = data(50_000, 5);
    let id = ChunkId::of(&d);
    let client = http();

    let put = b.presign_put(id, d.len() as u64, Duration::from_secs(60)).await.unwrap().unwrap();
    assert_eq!(put.method, "PUT");
    let mut tampered = put.url.clone();
    let sig = tampered.find("X-Amz-Signature=").unwrap() + "X-Amz-Signature=".len();
    let flipped = if &tampered[sig..sig + 1] == "0" { "1" } else { "0" };
    tampered.replace_range(sig..sig + 1, flipped);
    let resp = client.put(&tampered).body(d.clone()).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 403, "tampered signature accepted");
    assert!(!b.exists(id).await.unwrap());

    let mut req = client.put(&put.url).body(d.clone());
    for (k, v) in &put.headers {
        req = req.header(k, v);
    }
    assert!(req.send().await.unwrap().status().is_success());
    let get = b.presign_get(id, Duration::from_secs(60)).await.unwrap().unwrap();
    let got = client.get(&get.url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(got, d);

    // Expired: signed an hour ago, valid for a minute (no sleeping).
    let cfg = aws_sdk_s3::presigning::PresigningConfig::builder()
        .start_time(SystemTime::now() - Duration::from_secs(3600))
        .expires_in(Duration::from_secs(60))
        .build()
        .unwrap();
    let raw = S3Backend::new(server.s3_config("presign")).await.unwrap();
    let expired = raw.client().get_object().bucket("presign").key(raw.key(id)).presigned(cfg).await.unwrap();
    let status = client.get(expired.uri()).send().await.unwrap().status().as_u16();
    assert!(status == 403 || status == 400, "expired URL got {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_fail_cleanly() {
    let server = LocalS3Server::start().await.unwrap();
    backend(&server, "creds", |_| {}).await;
    let mut cfg = server.s3_config("creds");
    cfg.max_attempts = 1;
    cfg.credentials = S3Credentials::Static {
        access_key_id: chunkstore::testing::TEST_ACCESS_KEY.into(),
        secret_access_key: "not-the-secret".into(),
        session_token: None,
    };
    let bad = S3Backend::new(cfg).await.unwrap();
    let d = data(100, 6);
    match bad.put(ChunkId::of(&d), d).await {
        Err(e @ ChunkError::S3 { op, failure, .. }) => {
            assert_eq!(op, "PutObject", "{e}");
            assert_eq!(failure, S3Failure::Status(403), "a wrong secret is refused, not a transient failure: {e}");
            assert!(!e.is_transient(), "{e}");
            let msg = e.to_string();
            assert!(msg.contains("PutObject"), "{msg}");
            assert!(std::error::Error::source(&e).is_some(), "the SDK error is kept as the source");
        }
        other => panic!("expected an S3 error, got {other:?}"),
    }
}

#[test]
fn environment_credentials_are_read_and_required() {
    let env = |k: &str| match k {
        "AWS_ACCESS_KEY_ID" => Some("AK".to_owned()),
        "AWS_SECRET_ACCESS_KEY" => Some("SK".to_owned()),
        _ => None,
    };
    let creds = S3Credentials::Environment.resolve_with(env).unwrap();
    assert_eq!(creds.access_key_id(), "AK");
    assert_eq!(creds.secret_access_key(), "SK");
    assert!(matches!(S3Credentials::Environment.resolve_with(|_| None), Err(ChunkError::Config(_))));
    let debug = format!(
        "{:?}",
        S3Credentials::Static { access_key_id: "AK".into(), secret_access_key: "SECRET".into(), session_token: None }
    );
    assert!(!debug.contains("SECRET"), "secrets are redacted: {debug}");
}

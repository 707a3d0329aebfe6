//! Commit authors: volumed stores the author a commit request declares and `Log` returns it,
//! across a restart; an author over the limit is refused and commits nothing.

mod common;

use common::{bytes_for, client, file, start};
use proto::volume as pb;
use volume_client::VolumeClient;
use volume_model::commit::MAX_AUTHOR_BYTES;

const ORG: &str = "acme";

fn vref(name: &str) -> Option<pb::VolumeRef> {
    Some(pb::VolumeRef { org: ORG.into(), name: name.into() })
}

async fn log(c: &mut VolumeClient, volume: &str) -> Vec<pb::CommitInfo> {
    c.grpc().log(pb::LogRequest { volume: vref(volume), limit: 0, before_seq: 0 }).await.unwrap().into_inner().commits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_returns_the_author_each_commit_declared() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let c = client(&server).await;
    let vol = c.clone().get_volume(ORG, "ws", true).await.unwrap();
    let mut alice = c.clone().with_author("alice@example.com");
    let r1 = alice.commit_files(ORG, "ws", &vol.head, vec![file("a.txt", bytes_for(1, 100))], &[]).await.unwrap();
    // A raw request: the author at its longest (multi-byte UTF-8), with a message.
    let longest = "é".repeat(MAX_AUTHOR_BYTES / 2);
    let req = pb::CommitRequest {
        volume: vref("ws"),
        base: r1.commit.clone(),
        changes: vec![pb::Change { path: "a.txt".into(), op: Some(pb::change::Op::Delete(true)) }],
        message: "tidy".into(),
        author: longest.clone(),
    };
    let r2 = alice.grpc().commit(req).await.unwrap().into_inner();
    // No author declared: stored as none.
    let mut anonymous = c.clone();
    let r3 = anonymous.commit_files(ORG, "ws", &r2.commit, vec![file("b.txt", bytes_for(2, 100))], &[]).await.unwrap();

    let expect = [
        (r3.commit.as_str(), "", ""),
        (r2.commit.as_str(), longest.as_str(), "tidy"),
        (r1.commit.as_str(), "alice@example.com", ""),
        (vol.head.as_str(), "", "volume created"),
    ];
    let got = log(&mut alice, "ws").await;
    let got: Vec<(&str, &str, &str)> = got.iter().map(|c| (c.id.as_str(), c.author.as_str(), c.message.as_str())).collect();
    assert_eq!(got, expect);

    // The authors are in the stored records: a restarted server returns them.
    server.stop().await.unwrap();
    let server = start(dir.path()).await;
    let got = log(&mut client(&server).await, "ws").await;
    let got: Vec<(&str, &str, &str)> = got.iter().map(|c| (c.id.as_str(), c.author.as_str(), c.message.as_str())).collect();
    assert_eq!(got, expect);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_long_author_is_refused_and_nothing_is_committed() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut c = client(&server).await;
    let vol = c.get_volume(ORG, "ws", true).await.unwrap();
    let before = log(&mut c, "ws").await;

    let mut long = c.clone().with_author("a".repeat(MAX_AUTHOR_BYTES + 1));
    let err = long.commit_files(ORG, "ws", &vol.head, vec![file("a.txt", bytes_for(3, 100))], &[]).await.unwrap_err();
    assert_eq!(err.name(), Some("VolumeInvalidArgumentError"), "{err}");
    let status = long
        .grpc()
        .commit(pb::CommitRequest {
            volume: vref("ws"),
            base: vol.head.clone(),
            changes: vec![pb::Change { path: "gone".into(), op: Some(pb::change::Op::Delete(true)) }],
            message: String::new(),
            author: "é".repeat(MAX_AUTHOR_BYTES / 2 + 1),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("author too long"), "{status:?}");

    assert_eq!(c.head(ORG, "ws").await.unwrap().commit, vol.head, "the head did not move");
    assert_eq!(log(&mut c, "ws").await, before, "nothing was committed");
    assert_eq!(c.head(ORG, "ws").await.unwrap().seq, 0);
}

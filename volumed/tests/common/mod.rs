//! Shared helpers for volumed's integration tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;

use volume_client::{FileUpload, VolumeClient};
use volumed::server::{RunningServer, Server, ServerConfig};

/// Starts an in-process volumed on a free loopback port with local defaults under `dir`.
pub async fn start(dir: &Path) -> RunningServer {
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    Server::bind(ServerConfig::local(dir, addr)).await.expect("volumed starts").spawn()
}

/// Deterministic pseudo-random bytes (xorshift), so expected contents can be recomputed.
pub fn bytes_for(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn file(path: &str, data: Vec<u8>) -> FileUpload {
    FileUpload::from_bytes(path, data, 0o644)
}

pub async fn client(server: &RunningServer) -> VolumeClient {
    VolumeClient::connect_with_key(&server.endpoint(), Some(server.operator_key())).await.expect("client connects")
}

//! Running volumed: configuration, opening the stores, and serving gRPC and the chunk HTTP
//! endpoint on one listener (gRPC requests are routed by their content type).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chunkstore::{LocalBackend, S3Backend, S3Config};
use tokio::net::TcpListener;

use crate::datapath::http::{ChunkHttpState, routes};
use crate::datapath::sign::UrlSigner;
use crate::datapath::{DataPath, DataPathStats};
use crate::error::{Result, VolumeError};
use crate::keys::{BootstrapKeys, GrpcKeys, Keys};
use crate::meta::MetaStore;
use crate::service::{GrpcVolumes, Volumes};

/// Where chunks are stored.
#[derive(Clone, Debug)]
pub enum BackendConfig {
    /// `<data_dir>/chunks` (the embedded default).
    Local,
    /// An S3-compatible bucket.
    S3(S3Config),
}

/// Everything volumed needs to start.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// RocksDB lives in `<data_dir>/meta`, local chunks in `<data_dir>/chunks`.
    pub data_dir: PathBuf,
    /// Address to listen on (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Base URL clients use to reach this server's chunk endpoint; defaults to
    /// `http://<bound address>`.
    pub public_url: Option<String>,
    /// Chunk backend.
    pub backend: BackendConfig,
    /// Lifetime of signed URLs.
    pub url_ttl: Duration,
    /// Limits on upload bodies (local backend's chunk endpoint): concurrency, stalls, rate.
    pub upload_limits: crate::datapath::body::UploadLimits,
}

impl ServerConfig {
    /// Local defaults under `data_dir`, listening on `listen`.
    pub fn local(data_dir: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen,
            public_url: None,
            backend: BackendConfig::Local,
            url_ttl: crate::service::DEFAULT_URL_TTL,
            upload_limits: crate::datapath::body::UploadLimits::default(),
        }
    }
}

/// Refuses a listen address beyond loopback: API keys travel in every call's metadata and
/// volumed serves no TLS yet, so a key sent over a network could be read on the way. Until
/// TLS is served (issue 19, item 4), reach a remote host through a tunnel (ssh -L) to its
/// loopback port.
pub fn check_listen_address(addr: SocketAddr) -> Result<()> {
    if addr.ip().is_loopback() {
        return Ok(());
    }
    Err(VolumeError::invalid(format!(
        "refusing to listen on {addr}: API keys would cross the network in clear text and TLS is not served yet; \
         listen on 127.0.0.1 (reach it from elsewhere through an ssh tunnel)"
    )))
}

/// A started server.
pub struct Server {
    /// The bound address.
    pub addr: SocketAddr,
    /// The service (for in-process use by tests and benches).
    pub volumes: Volumes,
    /// Upload counters of the local data path (all zero with S3).
    pub data_stats: Arc<DataPathStats>,
    /// The API key store (also the authenticator of every gRPC call served here).
    pub keys: Keys,
    /// The data directory's first keys (see [`Keys::bootstrap`]).
    pub bootstrap: BootstrapKeys,
    listener: TcpListener,
    grpc: tonic::service::Routes,
    chunk_routes: Option<axum::Router>,
}

impl Server {
    /// Opens the stores and binds the listener; call [`Server::serve`] to start serving.
    pub async fn bind(config: ServerConfig) -> Result<Self> {
        check_listen_address(config.listen)?;
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| VolumeError::io(format!("creating data dir {}", config.data_dir.display()), e))?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| VolumeError::io(format!("binding listener {}", config.listen), e))?;
        let addr = listener.local_addr().map_err(|e| VolumeError::io("local address", e))?;
        let meta_dir = config.data_dir.join("meta");
        let store = tokio::task::spawn_blocking(move || MetaStore::open(meta_dir))
            .await
            .map_err(VolumeError::task("opening the metadata store"))??;
        let base_url = config.public_url.clone().unwrap_or_else(|| format!("http://{addr}"));
        let data_stats = Arc::new(DataPathStats::default());
        let (data, chunk_routes) = match &config.backend {
            BackendConfig::Local => {
                let backend = LocalBackend::open(config.data_dir.join("chunks"))?;
                let signer = UrlSigner::load_or_create(&config.data_dir.join("url-signing.key"))?;
                let state = ChunkHttpState {
                    backend: backend.clone(),
                    signer: signer.clone(),
                    store: store.clone(),
                    stats: data_stats.clone(),
                    limits: config.upload_limits,
                    slots: Arc::new(tokio::sync::Semaphore::new(config.upload_limits.concurrent.max(1))),
                    whole_reads: Arc::new(tokio::sync::Semaphore::new(crate::datapath::http::WHOLE_READS)),
                };
                (DataPath::Local { backend, signer, base_url }, Some(routes(state)))
            }
            BackendConfig::S3(s3) => {
                let backend = S3Backend::new(s3.clone()).await?;
                (DataPath::S3 { backend: Arc::new(backend) }, None)
            }
        };
        let keys = Keys::new(store.clone());
        let bootstrap = {
            let (keys, dir) = (keys.clone(), config.data_dir.clone());
            tokio::task::spawn_blocking(move || keys.bootstrap(&dir))
                .await
                .map_err(VolumeError::task("creating the first keys"))??
        };
        let volumes = Volumes::new(store, data, config.url_ttl);
        let grpc = tonic::service::Routes::new(GrpcVolumes::new(volumes.clone()).into_server())
            .add_service(GrpcKeys::new(keys.clone()).into_server());
        tracing::info!(%addr, data_dir = %config.data_dir.display(), backend = ?config.backend, "volumed bound");
        Ok(Self { addr, volumes, data_stats, keys, bootstrap, listener, grpc, chunk_routes })
    }

    /// Adds gRPC services (vmm-host's) to the ones served on this listener:
    /// `server.with_grpc(|routes| routes.add_service(other))`.
    pub fn with_grpc(mut self, add: impl FnOnce(tonic::service::Routes) -> tonic::service::Routes) -> Self {
        self.grpc = add(self.grpc);
        self
    }

    /// Serves until `shutdown` resolves.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<()> {
        use axum::serve::ListenerExt;
        // Without TCP_NODELAY a response spanning several segments waits ~40 ms for the
        // client's delayed ACK (Nagle): a 100-entry directory listing took 44 ms instead of 1.
        let listener = self.listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::warn!(error = %e, "could not set TCP_NODELAY");
            }
        });
        // Every gRPC call (volumes, keys, and vmm-host's sailboxes when `sail up` adds them)
        // passes the key check; chunk transfers are authorised by their signed URLs instead.
        let auth = tenancy::server::AuthLayer::new(Arc::new(self.keys.clone()));
        let mut router = self.grpc.prepare().into_axum_router().layer(auth);
        if let Some(chunk_routes) = self.chunk_routes {
            router = router.merge(chunk_routes);
        }
        let router = router.layer(axum::middleware::from_fn(request_span));
        axum::serve(listener, router).with_graceful_shutdown(shutdown).await.map_err(|e| VolumeError::io("serving", e))
    }

    /// Serves in a background task; the returned handle stops it when dropped or on
    /// [`RunningServer::stop`].
    pub fn spawn(self) -> RunningServer {
        let addr = self.addr;
        let volumes = self.volumes.clone();
        let data_stats = self.data_stats.clone();
        let bootstrap = self.bootstrap.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(self.serve(async {
            let _ = rx.await;
        }));
        RunningServer { addr, volumes, data_stats, bootstrap, stop: Some(tx), task }
    }
}

/// Runs every request (gRPC call or chunk transfer) inside a span carrying a request id, which
/// is also returned to the client as `x-request-id`; logs failures and the latency at debug.
async fn request_span(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    use tracing::Instrument;
    let request_id = format!("{:016x}", rand::random::<u64>());
    let span = tracing::info_span!("request", request_id = %request_id, method = %req.method(), path = %req.uri().path());
    let started = std::time::Instant::now();
    async move {
        let mut resp = next.run(req).await;
        let status = resp.status();
        let grpc_status = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        if status.is_client_error() || status.is_server_error() || !matches!(grpc_status.as_str(), "" | "0") {
            tracing::warn!(%status, grpc_status, elapsed_ms = started.elapsed().as_secs_f64() * 1e3, "request failed");
        } else {
            tracing::debug!(%status, elapsed_ms = started.elapsed().as_secs_f64() * 1e3, "request done");
        }
        if let Ok(v) = axum::http::HeaderValue::from_str(&request_id) {
            resp.headers_mut().insert("x-request-id", v);
        }
        resp
    }
    .instrument(span)
    .await
}

/// A server running in the background of this process.
pub struct RunningServer {
    /// The bound address.
    pub addr: SocketAddr,
    /// The service.
    pub volumes: Volumes,
    /// Upload counters of the local data path.
    pub data_stats: Arc<DataPathStats>,
    /// The data directory's first keys.
    pub bootstrap: BootstrapKeys,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl RunningServer {
    /// `http://addr`, what clients connect to.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The operator key (acts for any org it names): what vmm-host and tests use.
    pub fn operator_key(&self) -> &tenancy::ApiKey {
        &self.bootstrap.operator
    }

    /// The first admin key (org `default`): what `sail up`'s local clients use.
    pub fn admin_key(&self) -> &tenancy::ApiKey {
        &self.bootstrap.admin
    }

    /// Stops serving and waits for the server task.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        (&mut self.task).await.map_err(VolumeError::task("server task"))?
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

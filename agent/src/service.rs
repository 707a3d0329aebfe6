//! The `sail.agent.v1.Agent` gRPC service.

use std::io::Read;
use std::pin::Pin;

use proto::agent as pb;
use proto::agent::agent_server::Agent;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::exec::{ExecError, ExecTable};
use crate::files::{self, FileError, FileWriter};
use crate::mounts::{MountError, Mounts};
use crate::{GUEST_SCHEMA_VERSION, PROTOCOL_VERSION, forward, system};

/// The agent's state: the exec table, and whether it owns the machine (PID 1).
pub struct AgentService {
    /// Exec requests of this boot.
    pub execs: ExecTable,
    /// Volume mounts and their helpers.
    pub mounts: Mounts,
    /// PID 1: power off really powers off; otherwise (tests on a host) the process exits.
    pub is_init: bool,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::ExecEvent, Status>> + Send>>;
type ForwardStream = Pin<Box<dyn Stream<Item = Result<pb::ForwardResponse, Status>> + Send>>;
type DataStream = Pin<Box<dyn Stream<Item = Result<pb::FileData, Status>> + Send>>;

impl From<ExecError> for Status {
    fn from(e: ExecError) -> Self {
        match e {
            ExecError::Invalid(m) => Status::invalid_argument(m),
            ExecError::NotFound(_) => Status::not_found(e.to_string()),
            ExecError::Spawn(_) => Status::failed_precondition(e.to_string()),
        }
    }
}

impl From<FileError> for Status {
    fn from(e: FileError) -> Self {
        match e {
            FileError::Invalid(m) => Status::invalid_argument(m),
            FileError::NotFound(_) => Status::not_found(e.to_string()),
            FileError::Precondition(m) => Status::failed_precondition(m),
            FileError::Io { ref source, .. } if source.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) => {
                Status::resource_exhausted(e.to_string())
            }
            FileError::Io { .. } => Status::failed_precondition(e.to_string()),
        }
    }
}

impl From<MountError> for Status {
    fn from(e: MountError) -> Self {
        match e {
            MountError::Invalid(m) => Status::invalid_argument(m),
            MountError::Conflict { .. } => Status::already_exists(e.to_string()),
            MountError::TooMany => Status::resource_exhausted(e.to_string()),
            MountError::NotFound(_) => Status::not_found(e.to_string()),
            MountError::Timeout { .. } => Status::deadline_exceeded(e.to_string()),
            MountError::MountPoint { .. } | MountError::NoHelper(_) | MountError::Helper(_) => {
                Status::failed_precondition(e.to_string())
            }
        }
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn hello(&self, req: Request<pb::HelloRequest>) -> Result<Response<pb::HelloResponse>, Status> {
        let req = req.into_inner();
        let clock_adjusted = match system::correct_clock(req.host_unix_ms) {
            Ok(adjusted) => adjusted,
            Err(e) => {
                tracing::warn!(error = %e, "could not set the clock");
                false
            }
        };
        if !req.hostname.is_empty() {
            system::set_hostname(&req.hostname).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let reseeded = !req.entropy.is_empty()
            && match system::reseed(&req.entropy) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "could not reseed the guest RNG");
                    false
                }
            };
        Ok(Response::new(pb::HelloResponse {
            protocol_version: PROTOCOL_VERSION,
            guest_schema_version: GUEST_SCHEMA_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            kernel: system::kernel_release(),
            hostname: sysutil::host::hostname(),
            boot_id_hash: system::boot_id_hash(),
            uptime_ms: system::uptime_ms(),
            clock_adjusted,
            reseeded,
        }))
    }

    async fn start_exec(&self, req: Request<pb::StartExecRequest>) -> Result<Response<pb::StartExecResponse>, Status> {
        let req = req.into_inner();
        tracing::info!(request_id = %req.request_id, background = req.background, "exec");
        Ok(Response::new(self.execs.start(req)?))
    }

    async fn wait_exec(&self, req: Request<pb::WaitExecRequest>) -> Result<Response<pb::ExecResult>, Status> {
        Ok(Response::new(self.execs.wait(&req.into_inner().request_id).await?))
    }

    type StreamExecStream = EventStream;

    async fn stream_exec(&self, req: Request<pb::WaitExecRequest>) -> Result<Response<EventStream>, Status> {
        let req = req.into_inner();
        let rx = self.execs.stream(&req.request_id, req.stdout_offset, req.stderr_offset)?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn write_file(&self, req: Request<Streaming<pb::WriteFileRequest>>) -> Result<Response<pb::WriteFileResponse>, Status> {
        let mut stream = req.into_inner();
        let first = stream.message().await?.ok_or_else(|| Status::invalid_argument("empty write stream"))?;
        let header = first.header.ok_or_else(|| Status::invalid_argument("first message has no header"))?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        // Disk writes run on a blocking thread; the channel bounds what is buffered.
        let writer = tokio::task::spawn_blocking(move || -> Result<u64, FileError> {
            let mut w = FileWriter::create(&header.path, header.mode, header.size, header.make_parents)?;
            while let Some(data) = rx.blocking_recv() {
                w.write(&data)?;
            }
            w.finish()
        });
        // A failed writer drops its receiver: stop reading and report its error.
        let mut open = first.data.is_empty() || tx.send(first.data).await.is_ok();
        while open {
            match stream.message().await? {
                Some(msg) if msg.header.is_some() => return Err(Status::invalid_argument("header after the first message")),
                Some(msg) => open = msg.data.is_empty() || tx.send(msg.data).await.is_ok(),
                None => break,
            }
        }
        drop(tx);
        let written = writer.await.map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(pb::WriteFileResponse { bytes_written: written }))
    }

    type ReadFileStream = DataStream;

    async fn read_file(&self, req: Request<pb::ReadFileRequest>) -> Result<Response<DataStream>, Status> {
        let req = req.into_inner();
        let (mut file, size) = files::open_for_read(&req.path, req.max_bytes)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::FileData, Status>>(4);
        tokio::task::spawn_blocking(move || {
            let mut first = true;
            let mut sent = 0u64;
            loop {
                let mut buf = vec![0u8; files::READ_PIECE];
                let n = match file.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(Status::data_loss(format!("reading: {e}"))));
                        return;
                    }
                };
                if n == 0 && !first {
                    if sent != size {
                        let _ = tx.blocking_send(Err(Status::data_loss("file changed size while being read")));
                    }
                    return;
                }
                buf.truncate(n);
                sent += n as u64;
                let msg = pb::FileData { size: if first { size } else { 0 }, data: buf };
                first = false;
                if tx.blocking_send(Ok(msg)).is_err() || n == 0 {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn probe_port(&self, req: Request<pb::ProbePortRequest>) -> Result<Response<pb::ProbePortResponse>, Status> {
        let port = u16::try_from(req.into_inner().port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| Status::invalid_argument("port must be 1..=65535"))?;
        Ok(Response::new(pb::ProbePortResponse { accepting: forward::probe(port).await }))
    }

    type ForwardStream = ForwardStream;

    async fn forward(&self, req: Request<Streaming<pb::ForwardRequest>>) -> Result<Response<ForwardStream>, Status> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut inbound = req.into_inner();
        let first = inbound.message().await?.ok_or_else(|| Status::invalid_argument("empty forward stream"))?;
        let port = u16::try_from(first.port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| Status::invalid_argument("the first message must name a port in 1..=65535"))?;
        let tcp = forward::connect_local(port)
            .await
            .map_err(|e| Status::unavailable(format!("nothing accepts on port {port} in the guest: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let (mut rd, mut wr) = tcp.into_split();
        // Host -> guest server; the end of the request stream is the client's half-close.
        tokio::spawn(async move {
            if !first.data.is_empty() && wr.write_all(&first.data).await.is_err() {
                return;
            }
            while let Some(Ok(msg)) = inbound.next().await {
                if wr.write_all(&msg.data).await.is_err() {
                    return;
                }
            }
            let _ = wr.shutdown().await;
        });
        // Guest server -> host, until the server closes.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::ForwardResponse, Status>>(8);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) => return,
                    Ok(n) => {
                        if tx.send(Ok(pb::ForwardResponse { data: buf[..n].to_vec() })).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::aborted(format!("port {port}: {e}")))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn mount(&self, req: Request<pb::MountRequest>) -> Result<Response<pb::MountInfo>, Status> {
        let req = req.into_inner();
        tracing::info!(path = %req.path, org = %req.org, volume = %req.volume, "mount");
        Ok(Response::new(self.mounts.mount(req).await?))
    }

    async fn unmount(&self, req: Request<pb::UnmountRequest>) -> Result<Response<pb::MountInfo>, Status> {
        let path = req.into_inner().path;
        tracing::info!(%path, "unmount");
        Ok(Response::new(self.mounts.unmount(&path).await?))
    }

    async fn list_mounts(&self, _req: Request<pb::ListMountsRequest>) -> Result<Response<pb::ListMountsResponse>, Status> {
        Ok(Response::new(pb::ListMountsResponse { mounts: self.mounts.list().await }))
    }

    async fn power_off(&self, req: Request<pb::PowerOffRequest>) -> Result<Response<pb::PowerOffResponse>, Status> {
        let reboot = req.into_inner().reboot;
        let is_init = self.is_init;
        // Answer first, then go down.
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            if is_init {
                let e = system::power_off(reboot);
                tracing::error!(error = %e, "power off failed");
            } else {
                std::process::exit(0);
            }
        });
        Ok(Response::new(pb::PowerOffResponse {}))
    }
}

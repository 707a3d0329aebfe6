//! File transfer into and out of a sailbox, streamed through the agent: vmm-host holds at
//! most a few messages of a transfer in memory, whatever the file's size.

use proto::agent as apb;
use proto::sailbox as pb;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::Streaming;

use crate::error::{Result, SailboxError};
use crate::host::Host;
use crate::model::check_guest_path;

/// Messages buffered between the client's stream and the agent's.
const PIPELINE: usize = 4;

fn agent_error(path: &str, status: tonic::Status) -> SailboxError {
    match status.code() {
        tonic::Code::InvalidArgument => SailboxError::InvalidArgument(status.message().to_owned()),
        tonic::Code::NotFound => SailboxError::FileNotFound(path.to_owned()),
        tonic::Code::ResourceExhausted => SailboxError::Execution(format!("{path}: the sailbox's disk is full")),
        _ => SailboxError::Execution(format!("{path}: {}", status.message())),
    }
}

impl Host {
    /// Writes a file from a client stream: the first message names the sailbox, path, mode
    /// and size; data follows in order.
    /// `allowed` is asked about the sailbox the stream's first message names before anything
    /// is written (the caller's org check).
    pub async fn write_file(
        &self,
        mut stream: Streaming<pb::WriteFileRequest>,
        allowed: impl FnOnce(&str) -> Result<()>,
    ) -> Result<pb::WriteFileResponse> {
        let first = stream
            .message()
            .await
            .map_err(|s| SailboxError::invalid(format!("reading the request: {}", s.message())))?
            .ok_or_else(|| SailboxError::invalid("empty write stream"))?;
        check_guest_path(&first.path).map_err(SailboxError::InvalidArgument)?;
        if first.mode > 0o7777 {
            return Err(SailboxError::invalid(format!("mode {:o} has bits beyond 0o7777", first.mode)));
        }
        allowed(&first.sailbox_id)?;
        let (live, vm) = self.awake(&first.sailbox_id).await?;
        let capacity = u64::from(live.snapshot().disk_gib) << 30;
        if first.size > capacity {
            return Err(SailboxError::invalid(format!(
                "{} bytes do not fit the sailbox's {} GiB disk",
                first.size,
                capacity >> 30
            )));
        }
        let (tx, rx) = mpsc::channel::<apb::WriteFileRequest>(PIPELINE);
        let header = apb::WriteFileHeader { path: first.path.clone(), mode: first.mode, size: first.size, make_parents: true };
        tx.send(apb::WriteFileRequest { header: Some(header), data: first.data })
            .await
            .map_err(|_| SailboxError::Execution("agent stream closed".into()))?;
        // Pump the client's data into the agent's stream; a client error ends the stream
        // early, which the agent reports as a short write (and then removes its temp file).
        let pump = tokio::spawn(async move {
            while let Some(msg) = stream.next().await {
                match msg {
                    Ok(m) if m.data.is_empty() => continue,
                    Ok(m) => {
                        if tx.send(apb::WriteFileRequest { header: None, data: m.data }).await.is_err() {
                            return Ok(());
                        }
                    }
                    Err(s) => return Err(s.message().to_owned()),
                }
            }
            Ok(())
        });
        let result = vm.agent.raw().write_file(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
        let pumped = pump.await.unwrap_or(Ok(()));
        match (result, pumped) {
            (_, Err(client)) => Err(SailboxError::invalid(format!("the upload failed: {client}"))),
            (Ok(resp), Ok(())) => Ok(pb::WriteFileResponse { bytes_written: resp.into_inner().bytes_written }),
            (Err(status), Ok(())) => Err(agent_error(&first.path, status)),
        }
    }

    /// Streams a regular file out of the sailbox.
    pub async fn read_file(&self, req: pb::ReadFileRequest) -> Result<mpsc::Receiver<Result<pb::FileData, tonic::Status>>> {
        check_guest_path(&req.path).map_err(SailboxError::InvalidArgument)?;
        let (_, vm) = self.awake(&req.sailbox_id).await?;
        let areq = apb::ReadFileRequest { path: req.path.clone(), max_bytes: 0 };
        let mut stream = vm.agent.raw().read_file(areq).await.map_err(|s| agent_error(&req.path, s))?.into_inner();
        // The first message tells the size (and surfaces errors such as "not a file").
        let first = stream.message().await.map_err(|s| agent_error(&req.path, s))?;
        let (tx, rx) = mpsc::channel(PIPELINE);
        let path = req.path.clone();
        tokio::spawn(async move {
            if let Some(first) = first
                && tx.send(Ok(pb::FileData { size: first.size, data: first.data })).await.is_err()
            {
                return;
            }
            while let Some(msg) = stream.next().await {
                let out = msg.map(|m| pb::FileData { size: 0, data: m.data }).map_err(|s| agent_error(&path, s).into());
                let failed = out.is_err();
                if tx.send(out).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(rx)
    }
}

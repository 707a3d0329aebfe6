//! The `sail.sailbox.v1.SailboxService` gRPC service over a [`Host`].

use std::pin::Pin;
use std::time::Duration;

use proto::sailbox as pb;
use proto::sailbox::sailbox_service_server::{SailboxService, SailboxServiceServer};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use tenancy::Identity;

use crate::error::SailboxError;
use crate::host::Host;

/// The gRPC face of a host.
#[derive(Clone)]
pub struct GrpcSailboxes {
    host: Host,
}

type OutputStream = Pin<Box<dyn Stream<Item = Result<pb::ExecOutput, Status>> + Send>>;
type DataStream = Pin<Box<dyn Stream<Item = Result<pb::FileData, Status>> + Send>>;

impl GrpcSailboxes {
    /// Wraps a host.
    pub fn new(host: Host) -> Self {
        Self { host }
    }

    /// The tonic server (add it to a router).
    pub fn into_server(self) -> SailboxServiceServer<Self> {
        SailboxServiceServer::new(self).max_decoding_message_size(8 << 20)
    }
}

/// The connections `listener` accepts, each with TCP_NODELAY set: without it a streamed
/// response's small frames wait ~40 ms for the client's delayed ACK (Nagle), as `sail up`'s
/// server notes too. For `serve_with_incoming`.
pub fn incoming_nodelay(listener: tokio::net::TcpListener) -> impl Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        if let Ok(c) = &conn
            && let Err(e) = c.set_nodelay(true)
        {
            tracing::warn!(error = %e, "could not set TCP_NODELAY");
        }
        conn
    })
}

fn image_info(m: &crate::image::ImageManifest) -> pb::ImageInfo {
    pb::ImageInfo {
        image_id: m.id.clone(),
        name: m.name.clone(),
        size: m.size,
        created_unix_ms: m.created_unix_ms,
        parent: m.parent.clone().unwrap_or_default(),
        step: m.step.clone().unwrap_or_default(),
        stored_bytes: m.stored_bytes,
        chunks: m.chunks.iter().flatten().count() as u64,
        building: false,
    }
}

impl GrpcSailboxes {
    /// Refuses `id` unless the caller's org owns it: another org's sailbox is "not found",
    /// exactly like one that does not exist.
    fn owned(&self, who: &Identity, id: &str) -> Result<(), Status> {
        owned(&self.host, who, id).map_err(Status::from)
    }

    /// The caller of `req` and the sailbox it names, once the sailbox is checked to be theirs.
    fn check<T>(&self, req: &Request<T>, id: &str) -> Result<Identity, Status> {
        let who = Identity::of(req)?;
        self.owned(&who, id)?;
        Ok(who)
    }

    /// Refuses exec request `id` unless it runs in a sailbox of the caller's org (another
    /// org's request is "not found").
    fn owned_exec<T>(&self, req: &Request<T>, id: &str) -> Result<(), Status> {
        let who = Identity::of(req)?;
        let sailbox = self.host.exec_sailbox(id)?;
        owned(&self.host, &who, &sailbox).map_err(|_| SailboxError::ExecNotFound(id.to_owned()).into())
    }
}

fn owned(host: &Host, who: &Identity, id: &str) -> crate::error::Result<()> {
    match host.sailbox_org(id) {
        Ok(org) if who.sees(&org) => Ok(()),
        Ok(_) => Err(SailboxError::NotFound(id.to_owned())),
        Err(e) => Err(e),
    }
}

/// The org whose objects a caller sees in listings: its own, or every org for an operator.
fn listing_org(who: &Identity) -> Option<&str> {
    (who.role != tenancy::Role::Operator).then_some(who.org.as_str())
}

fn span(op: &'static str, sailbox: &str) -> tracing::Span {
    tracing::info_span!("sailbox_op", op, sailbox = %sailbox)
}

#[tonic::async_trait]
impl SailboxService for GrpcSailboxes {
    async fn create_sailbox(&self, req: Request<pb::CreateSailboxRequest>) -> Result<Response<pb::Sailbox>, Status> {
        let who = Identity::of(&req)?;
        let req = req.into_inner();
        let org = who.scope(&req.org)?;
        let span = tracing::info_span!("create", org = %org, app = %req.app, image = %req.image);
        Ok(Response::new(self.host.create(&org, req).instrument(span).await?))
    }

    async fn get_sailbox(&self, req: Request<pb::GetSailboxRequest>) -> Result<Response<pb::Sailbox>, Status> {
        self.check(&req, &req.get_ref().sailbox_id)?;
        let req = req.into_inner();
        let id = req.sailbox_id;
        Ok(Response::new(self.host.get(&id, req.connect).instrument(span("get", &id)).await?))
    }

    async fn list_sailboxes(
        &self,
        req: Request<pb::ListSailboxesRequest>,
    ) -> Result<Response<pb::ListSailboxesResponse>, Status> {
        let who = Identity::of(&req)?;
        let sailboxes = self.host.list(listing_org(&who), req.get_ref()).await?;
        Ok(Response::new(pb::ListSailboxesResponse { sailboxes }))
    }

    async fn exec(&self, req: Request<pb::ExecRequest>) -> Result<Response<pb::ExecHandle>, Status> {
        self.check(&req, &req.get_ref().sailbox_id)?;
        let req = req.into_inner();
        let span = span("exec", &req.sailbox_id);
        Ok(Response::new(self.host.exec(req).instrument(span).await?))
    }

    async fn wait_exec(&self, req: Request<pb::WaitExecRequest>) -> Result<Response<pb::ExecResult>, Status> {
        self.owned_exec(&req, &req.get_ref().exec_id)?;
        let req = req.into_inner();
        let timeout = (req.timeout_ms > 0).then(|| Duration::from_millis(req.timeout_ms));
        let span = tracing::info_span!("wait_exec", exec = %req.exec_id);
        Ok(Response::new(self.host.wait_exec(&req.exec_id, timeout).instrument(span).await?))
    }

    type StreamExecStream = OutputStream;

    async fn stream_exec(&self, req: Request<pb::WaitExecRequest>) -> Result<Response<OutputStream>, Status> {
        self.owned_exec(&req, &req.get_ref().exec_id)?;
        let rx = self.host.stream_exec(&req.into_inner().exec_id).await?;
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn write_file(&self, req: Request<Streaming<pb::WriteFileRequest>>) -> Result<Response<pb::WriteFileResponse>, Status> {
        let who = Identity::of(&req)?;
        let host = self.host.clone();
        Ok(Response::new(self.host.write_file(req.into_inner(), move |id| owned(&host, &who, id)).await?))
    }

    type ReadFileStream = DataStream;

    async fn read_file(&self, req: Request<pb::ReadFileRequest>) -> Result<Response<DataStream>, Status> {
        self.check(&req, &req.get_ref().sailbox_id)?;
        let req = req.into_inner();
        let span = span("read_file", &req.sailbox_id);
        let rx = self.host.read_file(req).instrument(span).await?;
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn listeners(&self, req: Request<pb::ListenersRequest>) -> Result<Response<pb::ListenersResponse>, Status> {
        self.check(&req, &req.get_ref().sailbox_id)?;
        let req = req.into_inner();
        let wait = (req.wait_routed_ms > 0).then(|| Duration::from_millis(req.wait_routed_ms));
        let listeners =
            self.host.listeners(&req.sailbox_id, req.port, wait).instrument(span("listeners", &req.sailbox_id)).await?;
        Ok(Response::new(pb::ListenersResponse { listeners }))
    }

    async fn terminate(&self, req: Request<pb::TerminateRequest>) -> Result<Response<pb::Sailbox>, Status> {
        self.check(&req, &req.get_ref().sailbox_id)?;
        let id = req.into_inner().sailbox_id;
        Ok(Response::new(self.host.terminate(&id).instrument(span("terminate", &id)).await?))
    }

    type EnsureImageStream = Pin<Box<dyn Stream<Item = Result<pb::ImageProgress, Status>> + Send>>;

    async fn ensure_image(&self, req: Request<pb::EnsureImageRequest>) -> Result<Response<Self::EnsureImageStream>, Status> {
        let image = req.into_inner().image;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let host = self.host.clone();
        tokio::spawn(async move {
            let progress_tx = tx.clone();
            let progress: crate::image::Progress = std::sync::Arc::new(move |m: &str| {
                tracing::info!("{m}");
                let _ = progress_tx.try_send(Ok(pb::ImageProgress { message: m.to_owned(), ..Default::default() }));
            });
            let last = match host.ensure_image(&image, progress).await {
                Ok(img) => Ok(pb::ImageProgress { message: format!("image {} ready", img.id), image_id: img.id, size: img.size }),
                Err(e) => Err(Status::from(e)),
            };
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    type BuildImageStream = Pin<Box<dyn Stream<Item = Result<pb::ImageBuildEvent, Status>> + Send>>;

    async fn build_image(&self, req: Request<pb::BuildImageRequest>) -> Result<Response<Self::BuildImageStream>, Status> {
        let req = req.into_inner();
        let def = crate::image::definition::ImageDefinition::try_from(req.definition.unwrap_or_default())?;
        let timeout = Duration::from_secs(if req.timeout_secs == 0 { 1800 } else { u64::from(req.timeout_secs) });
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let host = self.host.clone();
        tokio::spawn(
            async move {
                let events = tx.clone();
                let report: crate::image::BuildReport = std::sync::Arc::new(move |e: crate::image::BuildEvent| {
                    use crate::image::BuildEvent as E;
                    let ev = match e {
                        E::Log(line) => {
                            tracing::debug!("{line}");
                            pb::ImageBuildEvent { log: line, ..Default::default() }
                        }
                        E::Planned { id } => pb::ImageBuildEvent { planned_image_id: id, ..Default::default() },
                        E::Step { step, steps, id, what, cached } => {
                            tracing::info!(step, cached, layer = %id, "{what}");
                            pb::ImageBuildEvent {
                                step: step as u32,
                                steps: steps as u32,
                                layer_id: id,
                                what,
                                cached,
                                ..Default::default()
                            }
                        }
                        E::Layer { step, id, size, stored_bytes, run_ms } => pb::ImageBuildEvent {
                            step: step as u32,
                            layer_id: id,
                            layer_stored: true,
                            stored_bytes,
                            layer_size: size,
                            run_ms,
                            ..Default::default()
                        },
                    };
                    // A slow reader loses log lines, never the build.
                    let _ = events.try_send(Ok(ev));
                });
                let last = match host.images().build_definition(&def, timeout, report).await {
                    Ok(img) => Ok(pb::ImageBuildEvent { image_id: img.id, size: img.size, ..Default::default() }),
                    Err(e) => Err(Status::from(e)),
                };
                let _ = tx.send(last).await;
            }
            .instrument(tracing::info_span!("build_image")),
        );
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn upload_context(
        &self,
        req: Request<Streaming<pb::UploadContextRequest>>,
    ) -> Result<Response<pb::UploadContextResponse>, Status> {
        use tokio_stream::StreamExt as _;
        let parts = req.into_inner().map(|r| r.map(|p| bytes::Bytes::from(p.data)));
        let (context, size) = self.host.images().put_context(parts).await?;
        Ok(Response::new(pb::UploadContextResponse { context, size }))
    }

    async fn list_images(&self, _req: Request<pb::ListImagesRequest>) -> Result<Response<pb::ListImagesResponse>, Status> {
        let images = self.host.images();
        let mut out = Vec::new();
        for id in images.list()? {
            if let Some(m) = images.manifest(&id)? {
                out.push(image_info(&m));
            }
        }
        out.sort_by_key(|i| i.created_unix_ms);
        Ok(Response::new(pb::ListImagesResponse { images: out }))
    }

    async fn get_image(&self, req: Request<pb::GetImageRequest>) -> Result<Response<pb::ImageInfo>, Status> {
        let id = req.into_inner().image_id;
        let images = self.host.images();
        match images.manifest(&id)? {
            Some(m) => Ok(Response::new(image_info(&m))),
            None if images.building(&id) => {
                Ok(Response::new(pb::ImageInfo { image_id: id, building: true, ..Default::default() }))
            }
            None => Err(crate::error::SailboxError::ImageNotFound(id).into()),
        }
    }

    async fn delete_image(&self, req: Request<pb::GetImageRequest>) -> Result<Response<pb::ImageInfo>, Status> {
        let id = req.into_inner().image_id;
        Ok(Response::new(image_info(&self.host.images().remove(&id)?)))
    }

    async fn checkpoint_sailbox(&self, req: Request<pb::SailboxIdRequest>) -> Result<Response<pb::Checkpoint>, Status> {
        self.check(&req, &req.get_ref().sailbox_id)?;
        let id = req.into_inner().sailbox_id;
        Ok(Response::new(self.host.checkpoint(&id).instrument(span("checkpoint", &id)).await?))
    }

    async fn pause(&self, req: Request<pb::SailboxIdRequest>) -> Result<Response<pb::Sailbox>, Status> {
        self.check(&req, &req.get_ref().sailbox_id)?;
        let id = req.into_inner().sailbox_id;
        Ok(Response::new(self.host.pause(&id).instrument(span("pause", &id)).await?))
    }

    async fn sleep(&self, req: Request<pb::SleepRequest>) -> Result<Response<pb::Sailbox>, Status> {
        self.check(&req, &req.get_ref().sailbox_id)?;
        let req = req.into_inner();
        let call = (!req.call.is_empty()).then_some(req.call);
        let span = span("sleep", &req.sailbox_id);
        Ok(Response::new(self.host.sleep(&req.sailbox_id, call).instrument(span).await?))
    }

    async fn resume(&self, req: Request<pb::SailboxIdRequest>) -> Result<Response<pb::Sailbox>, Status> {
        self.check(&req, &req.get_ref().sailbox_id)?;
        let id = req.into_inner().sailbox_id;
        Ok(Response::new(self.host.resume(&id).instrument(span("resume", &id)).await?))
    }

    async fn complete_call(&self, req: Request<pb::CompleteCallRequest>) -> Result<Response<pb::Sailbox>, Status> {
        self.check(&req, &req.get_ref().sailbox_id)?;
        let req = req.into_inner();
        let span = span("complete_call", &req.sailbox_id);
        Ok(Response::new(self.host.complete_call(&req.sailbox_id, &req.call).instrument(span).await?))
    }

    async fn fork(&self, req: Request<pb::SailboxIdRequest>) -> Result<Response<pb::ForkResponse>, Status> {
        self.check(&req, &req.get_ref().sailbox_id)?;
        let id = req.into_inner().sailbox_id;
        Ok(Response::new(self.host.fork(&id).instrument(span("fork", &id)).await?))
    }

    async fn restore_sailbox(&self, req: Request<pb::RestoreRequest>) -> Result<Response<pb::Sailbox>, Status> {
        let who = Identity::of(&req)?;
        let org = self.host.checkpoint_org(&req.get_ref().checkpoint_id).await?;
        if !who.sees(&org) {
            // Exactly what an unknown checkpoint id gets.
            return Err(SailboxError::NotFound(format!("checkpoint {}", req.get_ref().checkpoint_id)).into());
        }
        let req = req.into_inner();
        let span = tracing::info_span!("restore", checkpoint = %req.checkpoint_id);
        Ok(Response::new(self.host.restore(req).instrument(span).await?))
    }

    async fn upgrade(&self, req: Request<pb::SailboxIdRequest>) -> Result<Response<pb::UpgradeResponse>, Status> {
        self.check(&req, &req.get_ref().sailbox_id)?;
        let id = req.into_inner().sailbox_id;
        Ok(Response::new(self.host.upgrade(&id).instrument(span("upgrade", &id)).await?))
    }

    async fn get_app(&self, req: Request<pb::GetAppRequest>) -> Result<Response<pb::App>, Status> {
        let who = Identity::of(&req)?;
        let req = req.into_inner();
        let org = who.scope(&req.org)?;
        let span = tracing::info_span!("get_app", org = %org, app = %req.name);
        Ok(Response::new(span.in_scope(|| self.host.get_app(&org, &req))?))
    }

    async fn get_host_info(&self, _req: Request<pb::HostInfoRequest>) -> Result<Response<pb::HostInfo>, Status> {
        Ok(Response::new(self.host.host_info().await))
    }
}

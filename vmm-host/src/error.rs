//! Typed errors of vmm-host. Each variant carries a contract name (DESIGN 2.4) that travels in
//! gRPC status details, so the CLI and SDKs raise the same error type. Failures of the host
//! itself (files, processes, QEMU, cowfs, the state and chunk stores) are `SailError`s; each
//! keeps its cause as its `source`.

use std::sync::Arc;

use crate::hypervisor::qemu::mapped_ram::MappedRamError;
use crate::hypervisor::qemu::qmp::QmpError;

/// Everything a sailbox operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum SailboxError {
    /// A request argument is out of range or malformed (nothing was created or changed).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Create arguments are out of range: reported as a creation error, before anything
    /// is created.
    #[error("invalid sailbox configuration: {0}")]
    InvalidConfig(String),
    /// No sailbox with this id.
    #[error("sailbox {0} not found")]
    NotFound(String),
    /// No such file in the sailbox.
    #[error("{0}: no such file in the sailbox")]
    FileNotFound(String),
    /// No image or layer with this id on this host.
    #[error("image {0} not found")]
    ImageNotFound(String),
    /// Create (or start, stop, restore) failed; the partial sailbox was cleaned up.
    #[error("sailbox creation failed: {0}")]
    Creation(String),
    /// Create (or start, stop, restore) failed because of `0`; the partial sailbox was
    /// cleaned up.
    #[error("sailbox creation failed: {0}")]
    CreationFailed(#[source] Box<SailboxError>),
    /// A checkpoint (or the pause, sleep or fork that takes one) failed because of `0`.
    #[error("sailbox creation failed: checkpoint failed: {0}")]
    CheckpointFailed(#[source] Box<SailboxError>),
    /// The VMM backend or the guest kit could not be set up when vmm-host started, so no
    /// VM can be started.
    #[error("sailbox creation failed: {0}")]
    Unavailable(#[source] Arc<SailboxError>),
    /// Exec, a file transfer, or a listener failed, or the sailbox cannot run it now.
    #[error("sailbox execution failed: {0}")]
    Execution(String),
    /// Another exec request is active on this sailbox.
    #[error("exec request {active} is still running on sailbox {sailbox}")]
    ExecAlreadyRunning {
        /// The sailbox.
        sailbox: String,
        /// The request that is running.
        active: String,
    },
    /// No exec request with this id.
    #[error("exec request {0} not found")]
    ExecNotFound(String),
    /// The sailbox was terminated.
    #[error("sailbox {0} is terminated")]
    Terminated(String),
    /// The machine running the sailbox went away and it could not be restored.
    #[error("sailbox {id} was lost: {reason}")]
    WorkerLost {
        /// The sailbox.
        id: String,
        /// What happened.
        reason: String,
    },
    /// Building an image failed.
    #[error("image build failed: {0}")]
    ImageBuild(String),
    /// A step of an image build failed because of `source`.
    #[error("image build failed: {what}: {source}")]
    ImageBuildStep {
        /// The step.
        what: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An image definition is malformed (nothing was built).
    #[error("bad image definition: {0}")]
    ImageDefinition(String),
    /// A step of an image build exited with an error or ran out of time.
    #[error("image build failed at step {step} ({what}): {reason}\n--- log tail ---\n{log_tail}")]
    ImageStepFailed {
        /// 1-based step number.
        step: usize,
        /// The step, as written in the definition.
        what: String,
        /// Exit status or timeout.
        reason: String,
        /// The last lines the step printed.
        log_tail: String,
        /// The build ran out of time (maps to DEADLINE_EXCEEDED).
        timed_out: bool,
    },
    /// A waiting call ran out of time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The state database failed.
    #[error("state store error: {0}")]
    RocksDb(#[from] rocksdb::Error),
    /// A column family the state database must have is missing.
    #[error("state store error: column family {0} missing")]
    MissingColumnFamily(String),
    /// A stored record (or a checkpoint or image record in the chunk store) does not decode.
    #[error("state store error: corrupt {what}: {source}")]
    CorruptRecord {
        /// Which record.
        what: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A stored exec result does not decode.
    #[error("state store error: corrupt exec result {id}: {source}")]
    CorruptResult {
        /// The exec request.
        id: String,
        /// Why.
        #[source]
        source: prost::DecodeError,
    },
    /// A record could not be encoded.
    #[error("state store error: encoding {what}: {source}")]
    Encode {
        /// Which record.
        what: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// An exec is recorded as finished but its result is not stored.
    #[error("state store error: exec {0} is finished but its result is missing")]
    MissingResult(String),
    /// A record names a chunk with an id that does not parse.
    #[error("state store error: {what}: bad chunk id: {source}")]
    BadChunkId {
        /// Which record and field.
        what: String,
        /// Why.
        #[source]
        source: chunkstore::ChunkError,
    },
    /// The chunk store failed.
    #[error("chunk store error: {0}")]
    Chunks(#[from] chunkstore::ChunkError),
    /// A file or process operation on the host failed.
    #[error("host error: {op}: {source}")]
    Io {
        /// What was being done.
        op: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// A blocking task panicked or was cancelled.
    #[error("host error: a background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The cowfs daemon refused a request or could not be reached.
    #[error("host error: {0}")]
    Cowfs(#[from] cowfs::ClientError),
    /// The cowfs daemon could not be started.
    #[error("host error: {0}")]
    CowfsStart(String),
    /// A memory or disk manifest could not be made or decoded.
    #[error("host error: {what}: {source}")]
    Manifest {
        /// Which manifest.
        what: String,
        /// Why.
        #[source]
        source: cowfs::ManifestError,
    },
    /// A QMP exchange with a VM's QEMU failed.
    #[error("host error: sailbox {vm}: {source}")]
    Qmp {
        /// The sailbox.
        vm: String,
        /// Why.
        #[source]
        source: QmpError,
    },
    /// QEMU reported a migration (device state save or load) as failed, or it did not finish.
    #[error("host error: {command} failed: {reason}")]
    Migration {
        /// `migrate` or `migrate-incoming`.
        command: String,
        /// QEMU's reason, or that it timed out.
        reason: String,
    },
    /// A mapped-ram save could not be split or staged.
    #[error("host error: {what}: {source}")]
    MappedRam {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: MappedRamError,
    },
    /// Something this host needs is missing or unusable (the guest kit, the agent binary,
    /// QEMU and its firmware, a sailbox's files).
    #[error("host error: {0}")]
    Setup(String),
    /// `sail-agent --describe` printed something that is not its description.
    #[error("host error: parsing the output of {agent} --describe: {source}")]
    AgentDescribe {
        /// The agent binary.
        agent: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A running VM's agent did not answer when vmm-host re-attached to it.
    #[error("host error: {0}")]
    AgentUnreachable(String),
}

impl SailboxError {
    /// The contract name carried in status details.
    pub fn name(&self) -> &'static str {
        match self {
            Self::InvalidArgument(_) | Self::NotFound(_) | Self::FileNotFound(_) | Self::ImageNotFound(_) => "SailboxError",
            Self::InvalidConfig(_)
            | Self::Creation(_)
            | Self::CreationFailed(_)
            | Self::CheckpointFailed(_)
            | Self::Unavailable(_) => "SailboxCreationError",
            Self::Execution(_) => "SailboxExecutionError",
            Self::ExecAlreadyRunning { .. } => "SailboxExecAlreadyRunningError",
            Self::ExecNotFound(_) => "SailboxExecRequestNotFoundError",
            Self::Terminated(_) => "SailboxTerminatedError",
            Self::WorkerLost { .. } => "SailboxWorkerLostError",
            Self::ImageBuild(_) | Self::ImageBuildStep { .. } | Self::ImageDefinition(_) | Self::ImageStepFailed { .. } => {
                "ImageBuildError"
            }
            _ => "SailError",
        }
    }

    /// The gRPC code for this error.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::InvalidArgument(_) | Self::InvalidConfig(_) | Self::ImageDefinition(_) => Code::InvalidArgument,
            Self::ImageStepFailed { timed_out: true, .. } => Code::DeadlineExceeded,
            Self::ImageStepFailed { .. } => Code::FailedPrecondition,
            Self::NotFound(_) | Self::ExecNotFound(_) | Self::FileNotFound(_) | Self::ImageNotFound(_) => Code::NotFound,
            Self::ExecAlreadyRunning { .. } => Code::AlreadyExists,
            Self::Terminated(_) | Self::Execution(_) => Code::FailedPrecondition,
            Self::WorkerLost { .. } => Code::Unavailable,
            Self::Timeout(_) => Code::DeadlineExceeded,
            _ => Code::Internal,
        }
    }

    /// Shorthand for [`SailboxError::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }

    /// Shorthand for [`SailboxError::Io`]: `op` failed with `source`.
    pub fn io(op: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { op: op.into(), source }
    }

    /// Whether this error already says the sailbox could not be created (or is one of
    /// the errors a creation reports as is).
    pub(crate) fn is_creation(&self) -> bool {
        matches!(
            self,
            Self::InvalidConfig(_)
                | Self::Creation(_)
                | Self::CreationFailed(_)
                | Self::CheckpointFailed(_)
                | Self::Unavailable(_)
        )
    }
}

impl From<SailboxError> for tonic::Status {
    fn from(e: SailboxError) -> Self {
        use prost::Message;
        let detail = proto::sailbox::ErrorDetail { name: e.name().to_owned(), message: e.to_string() };
        tonic::Status::with_details(e.code(), e.to_string(), detail.encode_to_vec().into())
    }
}

/// Result alias for sailbox operations.
pub type Result<T, E = SailboxError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn host_failures_keep_their_cause_and_contract_name() {
        let io = SailboxError::io("creating the run dir", std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert_eq!(io.name(), "SailError");
        assert_eq!(io.code(), tonic::Code::Internal);
        assert!(io.source().is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some()));
        let wrapped = SailboxError::CreationFailed(Box::new(io));
        assert_eq!(wrapped.name(), "SailboxCreationError");
        assert_eq!(wrapped.code(), tonic::Code::Internal);
        assert!(wrapped.to_string().starts_with("sailbox creation failed: host error: creating the run dir"));
        // The chain goes on to the io::Error (the box forwards its content's source).
        let inner = wrapped.source().expect("the wrapped error");
        assert!(inner.to_string().starts_with("host error: creating the run dir"), "{inner}");
        assert!(inner.source().is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some()));
        let ck = SailboxError::CheckpointFailed(Box::new(SailboxError::Setup("x".into())));
        assert_eq!((ck.name(), ck.code()), ("SailboxCreationError", tonic::Code::Internal));
    }
}

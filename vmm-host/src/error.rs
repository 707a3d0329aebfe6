//! Typed errors of vmm-host. Each variant carries a contract name (DESIGN 2.4) that travels in
//! gRPC status details, so the CLI and SDKs raise the same error type.

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
    /// Create (or start, stop, restore) failed; the partial sailbox was cleaned up.
    #[error("sailbox creation failed: {0}")]
    Creation(String),
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
    /// A waiting call ran out of time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The state database failed.
    #[error("state store error: {0}")]
    Storage(String),
    /// The chunk store failed.
    #[error("chunk store error: {0}")]
    Chunks(#[from] chunkstore::ChunkError),
    /// Anything else on the host (a VMM, a file, a process).
    #[error("host error: {0}")]
    Host(String),
}

impl SailboxError {
    /// The contract name carried in status details.
    pub fn name(&self) -> &'static str {
        match self {
            Self::InvalidArgument(_) | Self::NotFound(_) | Self::FileNotFound(_) => "SailboxError",
            Self::InvalidConfig(_) | Self::Creation(_) => "SailboxCreationError",
            Self::Execution(_) => "SailboxExecutionError",
            Self::ExecAlreadyRunning { .. } => "SailboxExecAlreadyRunningError",
            Self::ExecNotFound(_) => "SailboxExecRequestNotFoundError",
            Self::Terminated(_) => "SailboxTerminatedError",
            Self::WorkerLost { .. } => "SailboxWorkerLostError",
            Self::ImageBuild(_) => "ImageBuildError",
            Self::Timeout(_) | Self::Storage(_) | Self::Chunks(_) | Self::Host(_) => "SailError",
        }
    }

    /// The gRPC code for this error.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::InvalidArgument(_) | Self::InvalidConfig(_) => Code::InvalidArgument,
            Self::NotFound(_) | Self::ExecNotFound(_) | Self::FileNotFound(_) => Code::NotFound,
            Self::ExecAlreadyRunning { .. } => Code::AlreadyExists,
            Self::Terminated(_) | Self::Execution(_) => Code::FailedPrecondition,
            Self::WorkerLost { .. } => Code::Unavailable,
            Self::Timeout(_) => Code::DeadlineExceeded,
            Self::Creation(_) | Self::ImageBuild(_) | Self::Storage(_) | Self::Chunks(_) | Self::Host(_) => Code::Internal,
        }
    }

    /// Shorthand for [`SailboxError::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }

    /// Shorthand for [`SailboxError::Host`] with context.
    pub fn host(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Self {
        Self::Host(format!("{what}: {e}"))
    }
}

impl From<rocksdb::Error> for SailboxError {
    fn from(e: rocksdb::Error) -> Self {
        Self::Storage(e.into_string())
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

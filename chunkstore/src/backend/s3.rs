//! `S3Backend`: chunks in any S3-compatible bucket through aws-sdk-s3.
//!
//! Object keys: `{prefix}chunks/{first 2 hex}/{64 hex}`. Puts are conditional
//! (`If-None-Match: *`): a chunk is immutable and content-addressed, so a 412 means it is
//! already there and the put succeeds. Chunks above `multipart_threshold` go up as multipart
//! uploads with bounded part concurrency (aborted on any failure). Every `get` verifies the
//! bytes against the id. Retries use the SDK's standard mode (exponential backoff with
//! jitter) up to `max_attempts`. The SDK's own CRC checksums are turned off ("when
//! required"): the BLAKE3 id already verifies every byte end to end.
//!
//! Durability: a put is durable when the S3 PUT (or CompleteMultipartUpload) succeeds.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_s3::presigning::{PresignedRequest, PresigningConfig};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_smithy_http_client::tls;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::backend::{Backend, MAX_CHUNK_SIZE, Presigned, expiry_ms};
use crate::error::{ChunkError, Result, S3Failure};
use crate::id::ChunkId;

/// Where the backend's credentials come from.
#[derive(Clone)]
pub enum S3Credentials {
    /// Given explicitly.
    Static {
        /// Access key id.
        access_key_id: String,
        /// Secret access key.
        secret_access_key: String,
        /// Session token for temporary credentials.
        session_token: Option<String>,
    },
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and optional `AWS_SESSION_TOKEN`, read
    /// when the backend is created.
    Environment,
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            S3Credentials::Static { access_key_id, .. } => {
                write!(f, "Static {{ access_key_id: {access_key_id:?}, secret_access_key: <redacted> }}")
            }
            S3Credentials::Environment => f.write_str("Environment"),
        }
    }
}

impl S3Credentials {
    /// Resolves to concrete credentials (reading the environment for `Environment`).
    pub fn resolve(&self) -> Result<Credentials> {
        self.resolve_with(|k| std::env::var(k).ok())
    }

    /// Like [`S3Credentials::resolve`] with an explicit variable lookup (for tests).
    pub fn resolve_with(&self, var: impl Fn(&str) -> Option<String>) -> Result<Credentials> {
        match self {
            S3Credentials::Static { access_key_id, secret_access_key, session_token } => {
                Ok(Credentials::new(access_key_id, secret_access_key, session_token.clone(), None, "sail-static"))
            }
            S3Credentials::Environment => {
                let key = var("AWS_ACCESS_KEY_ID").filter(|v| !v.is_empty());
                let secret = var("AWS_SECRET_ACCESS_KEY").filter(|v| !v.is_empty());
                match (key, secret) {
                    (Some(k), Some(s)) => Ok(Credentials::new(k, s, var("AWS_SESSION_TOKEN"), None, "sail-env")),
                    _ => Err(ChunkError::Config(
                        "S3 credentials from the environment need AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into(),
                    )),
                }
            }
        }
    }
}

/// Configuration of an [`S3Backend`].
#[derive(Clone, Debug)]
pub struct S3Config {
    /// Custom endpoint of an S3-compatible server (`None`: AWS).
    pub endpoint: Option<String>,
    /// Region (signing region for S3-compatible servers).
    pub region: String,
    /// Bucket name.
    pub bucket: String,
    /// Prefix prepended to every key (e.g. `"team-a/"`).
    pub prefix: String,
    /// Path-style addressing (`endpoint/bucket/key`), which most S3-compatible servers need.
    pub force_path_style: bool,
    /// Credentials.
    pub credentials: S3Credentials,
    /// Attempts per request, first try included (standard retry mode, exponential backoff).
    pub max_attempts: u32,
    /// Chunks larger than this use multipart upload.
    pub multipart_threshold: u64,
    /// Part size of multipart uploads (S3 needs at least 5 MiB except for the last part).
    pub part_size: u64,
    /// Parts uploaded at once in a multipart upload.
    pub part_concurrency: usize,
}

impl S3Config {
    /// Defaults for `bucket`: AWS endpoint, us-east-1, environment credentials, 5 attempts,
    /// multipart above 16 MiB in 8 MiB parts, 4 parts at once.
    pub fn new(bucket: impl Into<String>) -> Self {
        Self {
            endpoint: None,
            region: "us-east-1".into(),
            bucket: bucket.into(),
            prefix: String::new(),
            force_path_style: false,
            credentials: S3Credentials::Environment,
            max_attempts: 5,
            multipart_threshold: 16 << 20,
            part_size: 8 << 20,
            part_concurrency: 4,
        }
    }
}

/// Chunks in an S3-compatible bucket. Cheap to clone.
#[derive(Clone, Debug)]
pub struct S3Backend {
    client: Client,
    config: Arc<S3Config>,
}

/// A failed S3 request as a [`ChunkError::S3`], classified for retry decisions.
fn backend_err<E>(op: &'static str, chunk: Option<ChunkId>, e: SdkError<E, HttpResponse>) -> ChunkError
where
    E: std::error::Error + Send + Sync + 'static,
{
    let failure = match &e {
        SdkError::TimeoutError(_) => S3Failure::Timeout,
        SdkError::DispatchFailure(_) => S3Failure::Dispatch,
        _ => status_of(&e).map_or(S3Failure::Other, S3Failure::Status),
    };
    ChunkError::S3 { op, chunk, failure, source: Box::new(e) }
}

fn status_of<E>(e: &SdkError<E, HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

fn presigned(req: PresignedRequest, method: &'static str, ttl: Duration) -> Presigned {
    Presigned {
        url: req.uri().to_owned(),
        method,
        headers: req.headers().map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
        expires_unix_ms: expiry_ms(ttl),
    }
}

impl S3Backend {
    /// Builds the client (no request is made; see [`S3Backend::ensure_bucket`]).
    pub async fn new(config: S3Config) -> Result<Self> {
        if config.bucket.is_empty() {
            return Err(ChunkError::Config("S3 bucket name is empty".into()));
        }
        if config.part_size < 5 << 20 || config.part_concurrency == 0 || config.max_attempts == 0 {
            return Err(ChunkError::Config("part_size must be >= 5 MiB, part_concurrency and max_attempts >= 1".into()));
        }
        let credentials = config.credentials.resolve()?;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
            .build_https();
        let mut builder = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .credentials_provider(credentials)
            .http_client(http)
            .force_path_style(config.force_path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(
                RetryConfig::standard().with_max_attempts(config.max_attempts).with_initial_backoff(Duration::from_millis(50)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(300))
                    .build(),
            );
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        Ok(Self { client: Client::from_conf(builder.build()), config: Arc::new(config) })
    }

    /// The underlying aws-sdk-s3 client (for operations this trait does not cover).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The configuration.
    pub fn config(&self) -> &S3Config {
        &self.config
    }

    /// The object key of a chunk.
    pub fn key(&self, id: ChunkId) -> String {
        let hex = id.to_hex();
        format!("{}chunks/{}/{hex}", self.config.prefix, &hex[..2])
    }

    /// Creates the bucket if it does not exist (for embedded and test setups).
    pub async fn ensure_bucket(&self) -> Result<()> {
        let bucket = &self.config.bucket;
        match self.client.head_bucket().bucket(bucket).send().await {
            Ok(_) => return Ok(()),
            Err(e) if status_of(&e) == Some(404) => {}
            Err(e) => return Err(backend_err("HeadBucket", None, e)),
        }
        match self.client.create_bucket().bucket(bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) if status_of(&e) == Some(409) => Ok(()), // created concurrently
            Err(e) => Err(backend_err("CreateBucket", None, e)),
        }
    }

    /// GetObject (optionally a `Range`), body collected; 404 is [`ChunkError::NotFound`].
    async fn fetch(&self, id: ChunkId, range: Option<String>) -> Result<Bytes> {
        let res = self.client.get_object().bucket(&self.config.bucket).key(self.key(id)).set_range(range).send().await;
        let out = match res {
            Ok(out) => out,
            Err(e) if status_of(&e) == Some(404) => return Err(ChunkError::NotFound(id)),
            Err(e) => return Err(backend_err("GetObject", Some(id), e)),
        };
        let body = out.body.collect().await;
        let body = body.map_err(|e| ChunkError::S3 {
            op: "GetObject",
            chunk: Some(id),
            failure: S3Failure::Dispatch, // the connection broke while the body streamed
            source: Box::new(e),
        })?;
        Ok(body.into_bytes())
    }

    async fn put_multipart(&self, id: ChunkId, data: Bytes) -> Result<()> {
        let key = self.key(id);
        let bucket = &self.config.bucket;
        let created = self
            .client
            .create_multipart_upload()
            .bucket(bucket)
            .key(&key)
            .send()
            .await
            .map_err(|e| backend_err("CreateMultipartUpload", Some(id), e))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| ChunkError::S3Protocol {
                op: "CreateMultipartUpload",
                chunk: id,
                problem: "no upload id in the answer".into(),
            })?
            .to_owned();
        let part = self.config.part_size as usize;
        let parts: Vec<(i32, Bytes)> = (0..data.len())
            .step_by(part)
            .enumerate()
            .map(|(i, off)| (i as i32 + 1, data.slice(off..(off + part).min(data.len()))))
            .collect();
        let result: Result<Vec<CompletedPart>> = futures::stream::iter(parts)
            .map(|(n, body)| {
                let (client, key, upload_id) = (self.client.clone(), key.clone(), upload_id.clone());
                async move {
                    let out = client
                        .upload_part()
                        .bucket(&self.config.bucket)
                        .key(key)
                        .upload_id(upload_id)
                        .part_number(n)
                        .body(ByteStream::from(body))
                        .send()
                        .await
                        .map_err(|e| backend_err("UploadPart", Some(id), e))?;
                    Ok(CompletedPart::builder().set_e_tag(out.e_tag().map(str::to_owned)).part_number(n).build())
                }
            })
            .buffer_unordered(self.config.part_concurrency)
            .try_collect()
            .await;
        let completed = match result {
            Ok(mut parts) => {
                parts.sort_by_key(|p| p.part_number());
                self.client
                    .complete_multipart_upload()
                    .bucket(bucket)
                    .key(&key)
                    .upload_id(&upload_id)
                    .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| backend_err("CompleteMultipartUpload", Some(id), e))
            }
            Err(e) => Err(e),
        };
        if completed.is_err() {
            let abort = self.client.abort_multipart_upload().bucket(bucket).key(&key).upload_id(&upload_id).send().await;
            if let Err(e) = abort {
                tracing::warn!(chunk = %id, error = %DisplayErrorContext(&e), "aborting multipart upload failed");
            }
        }
        completed
    }
}

#[async_trait]
impl Backend for S3Backend {
    fn kind(&self) -> &'static str {
        "s3"
    }

    async fn put(&self, id: ChunkId, data: Bytes) -> Result<()> {
        let len = data.len() as u64;
        if len > MAX_CHUNK_SIZE {
            return Err(ChunkError::TooLarge { size: len, limit: MAX_CHUNK_SIZE });
        }
        id.verify(&data)?;
        if len > self.config.multipart_threshold {
            if self.exists(id).await? {
                return Ok(());
            }
            return self.put_multipart(id, data).await;
        }
        let res = self
            .client
            .put_object()
            .bucket(&self.config.bucket)
            .key(self.key(id))
            .if_none_match("*")
            .content_length(len as i64)
            .body(ByteStream::from(data))
            .send()
            .await;
        match res {
            Ok(_) => Ok(()),
            // Already stored: content addressing makes the existing object identical.
            Err(e) if status_of(&e) == Some(412) => Ok(()),
            // A server may answer 412 before reading the body and close the connection, which
            // the client sees as a broken pipe, not a 412. S3 puts are atomic and keys are
            // content hashes, so if the object exists now, it holds exactly these bytes.
            Err(e) => match self.exists(id).await {
                Ok(true) => {
                    tracing::debug!(chunk = %id, "conditional put failed but the chunk is stored");
                    Ok(())
                }
                _ => Err(backend_err("PutObject", Some(id), e)),
            },
        }
    }

    async fn get(&self, id: ChunkId) -> Result<Bytes> {
        let data = self.fetch(id, None).await?;
        id.verify(&data)?;
        Ok(data)
    }

    async fn get_range(&self, id: ChunkId, offset: u64, len: u64) -> Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let end = offset.checked_add(len - 1).ok_or(ChunkError::InvalidRange { chunk: id, offset, len, size: None })?;
        let data = self.fetch(id, Some(format!("bytes={offset}-{end}"))).await?;
        if data.len() as u64 != len {
            let problem = format!("range {offset}+{len} returned {} bytes", data.len());
            return Err(ChunkError::S3Protocol { op: "GetObject", chunk: id, problem });
        }
        Ok(data)
    }

    async fn exists(&self, id: ChunkId) -> Result<bool> {
        Ok(self.size(id).await?.is_some())
    }

    async fn size(&self, id: ChunkId) -> Result<Option<u64>> {
        match self.client.head_object().bucket(&self.config.bucket).key(self.key(id)).send().await {
            Ok(out) => Ok(Some(out.content_length().unwrap_or(0).max(0) as u64)),
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(backend_err("HeadObject", Some(id), e)),
        }
    }

    async fn delete(&self, id: ChunkId) -> Result<()> {
        match self.client.delete_object().bucket(&self.config.bucket).key(self.key(id)).send().await {
            Ok(_) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            Err(e) => Err(backend_err("DeleteObject", Some(id), e)),
        }
    }

    async fn presign_get(&self, id: ChunkId, ttl: Duration) -> Result<Option<Presigned>> {
        let cfg = PresigningConfig::expires_in(ttl).map_err(|e| ChunkError::PresignTtl { source: Box::new(e) })?;
        let req = self
            .client
            .get_object()
            .bucket(&self.config.bucket)
            .key(self.key(id))
            .presigned(cfg)
            .await
            .map_err(|e| backend_err("presign GetObject", Some(id), e))?;
        Ok(Some(presigned(req, "GET", ttl)))
    }

    async fn presign_put(&self, id: ChunkId, _len: u64, ttl: Duration) -> Result<Option<Presigned>> {
        let cfg = PresigningConfig::expires_in(ttl).map_err(|e| ChunkError::PresignTtl { source: Box::new(e) })?;
        let req = self
            .client
            .put_object()
            .bucket(&self.config.bucket)
            .key(self.key(id))
            .presigned(cfg)
            .await
            .map_err(|e| backend_err("presign PutObject", Some(id), e))?;
        Ok(Some(presigned(req, "PUT", ttl)))
    }
}

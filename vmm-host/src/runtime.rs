//! The shared core every part of a [`crate::Host`] works with: the configuration, the state
//! store, the chunk backend, the cowfs files, the VMM backend and guest kit, the images, and
//! the registry of the sailboxes this host holds ([`Live`], each with its [`Vm`] while one
//! runs). The parts (`lifecycle`, `snapshot`, `forkmem`, `exec`, `ingress`) own their own
//! state and hold an `Arc<Runtime>` for this.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chunkstore::{Backend, ChunkId, LocalBackend};
use parking_lot::Mutex;
use proto::sailbox as pb;

use crate::accel::AccelProbe;
use crate::agent_client::AgentClient;
use crate::error::{Result, SailboxError};
use crate::gateway::{Gateway, Scope};
use crate::guest::{GuestKit, Initramfs};
use crate::host::HostConfig;
use crate::host_nic::HostNic;
use crate::hypervisor::qemu::Qemu;
use crate::hypervisor::{Hypervisor, Incoming, VmHandle, VmSpec};
use crate::image::{ImageStore, LocalImage, Progress};
use crate::model::{self, CheckpointRecord, SailboxRecord, State};
use crate::seal::RecordKey;
use crate::store::StateStore;
use crate::vmfiles::VmFiles;

/// A running VM of a sailbox.
pub(crate) struct Vm {
    /// The backend's handle: spec, processes, control.
    pub(crate) handle: Box<dyn VmHandle>,
    /// Its agent.
    pub(crate) agent: AgentClient,
    /// Set before vmm-host itself stops the VMM, so its exit is not taken for a loss.
    stopping: AtomicBool,
    /// The task watching the VMM process.
    pub(crate) watcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Vm {
    pub(crate) fn new(handle: Box<dyn VmHandle>, agent: AgentClient) -> Self {
        Self { handle, agent, stopping: AtomicBool::new(false), watcher: Mutex::new(None) }
    }

    /// How it was launched.
    pub(crate) fn spec(&self) -> &VmSpec {
        self.handle.spec()
    }

    pub(crate) fn mark_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

/// A sailbox this host holds (running, paused or sleeping): its record (mirrored to the
/// store), its VM while one runs, and its listeners.
pub(crate) struct Live {
    record: Mutex<SailboxRecord>,
    vm: Mutex<Option<Arc<Vm>>>,
    /// Serialises lifecycle operations and exec starts on this sailbox.
    pub(crate) op: tokio::sync::Mutex<()>,
    /// Listeners and exec watchers.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Live {
    pub(crate) fn new(rec: SailboxRecord) -> Arc<Self> {
        Arc::new(Self { record: Mutex::new(rec), vm: Mutex::new(None), op: tokio::sync::Mutex::new(()), tasks: Mutex::default() })
    }

    pub(crate) fn snapshot(&self) -> SailboxRecord {
        self.record.lock().clone()
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut SailboxRecord)) -> SailboxRecord {
        let mut rec = self.record.lock();
        f(&mut rec);
        rec.clone()
    }

    pub(crate) fn id(&self) -> String {
        self.record.lock().id.clone()
    }

    pub(crate) fn vm(&self) -> Option<Arc<Vm>> {
        self.vm.lock().clone()
    }

    pub(crate) fn set_vm(&self, vm: Option<Arc<Vm>>) -> Option<Arc<Vm>> {
        std::mem::replace(&mut *self.vm.lock(), vm)
    }

    pub(crate) fn push_task(&self, t: tokio::task::JoinHandle<()>) {
        self.tasks.lock().push(t);
    }

    /// Takes the sailbox's background tasks (to abort and await them).
    pub(crate) fn take_tasks(&self) -> Vec<tokio::task::JoinHandle<()>> {
        self.tasks.lock().drain(..).collect()
    }

    /// Aborts the sailbox's background tasks (the calling task excepted).
    pub(crate) fn abort_tasks(&self) {
        let me = tokio::task::try_id();
        for t in self.take_tasks() {
            if Some(t.id()) != me {
                t.abort();
            }
        }
    }
}

/// The shared core of a host (see the module docs).
pub(crate) struct Runtime {
    pub(crate) config: HostConfig,
    pub(crate) state: StateStore,
    pub(crate) images: ImageStore,
    pub(crate) backend: Arc<dyn Backend>,
    /// Seals checkpoint records stored as chunks ([`crate::seal`]).
    pub(crate) record_key: RecordKey,
    pub(crate) files: VmFiles,
    pub(crate) accel: AccelProbe,
    pub(crate) hypervisor: std::result::Result<Arc<dyn Hypervisor>, Arc<SailboxError>>,
    pub(crate) kit: std::result::Result<GuestKit, Arc<SailboxError>>,
    /// The volume gateway (when a volumed endpoint is configured).
    pub(crate) gateway: Option<Arc<Gateway>>,
    initramfs: tokio::sync::Mutex<Option<Initramfs>>,
    live: Mutex<HashMap<String, Arc<Live>>>,
    /// Each sailbox's host-NIC namespace, kept from its first launch (or re-attach) to its
    /// end, so every VM it runs (wake, resume) gets the same one and the gateway stays bound.
    host_nics: Mutex<HashMap<String, Arc<HostNic>>>,
}

/// A new random id with a prefix.
pub(crate) fn random_id(prefix: &str) -> String {
    format!("{prefix}-{:024x}", rand::random::<u128>() >> 32)
}

impl Runtime {
    /// Opens the state store and the chunk directory, starts (or finds) the cowfs daemon,
    /// loads the guest kit and the VMM backend (remembering why, if either fails).
    pub(crate) async fn open(config: HostConfig) -> Result<Self> {
        for d in ["run", "images", "boot", "cowfs"] {
            std::fs::create_dir_all(config.data_dir.join(d)).map_err(|e| SailboxError::io("creating the data dir", e))?;
        }
        let db = config.data_dir.join("db");
        let state = tokio::task::spawn_blocking(move || StateStore::open(db)).await??;
        let backend: Arc<dyn Backend> = Arc::new(LocalBackend::open(&config.chunks_dir)?);
        let key_path = config.record_key.clone().unwrap_or_else(|| crate::seal::default_key_path(&config.chunks_dir));
        let record_key = RecordKey::load_or_create(&key_path)?;
        let files = VmFiles::ensure(&config.data_dir.join("cowfs"), &config.chunks_dir, &config.cowfs_binary).await?;
        let kit = GuestKit::load(&config.guest_dir).map_err(Arc::new);
        let images = ImageStore::new(state.clone(), backend.clone(), config.data_dir.join("images"), kit.clone().ok());
        let accel = crate::accel::detect(config.accel);
        let hypervisor = Qemu::new(config.qemu_binary.clone()).map(|q| Arc::new(q) as Arc<dyn Hypervisor>).map_err(Arc::new);
        let gateway = match &config.volumed_endpoint {
            Some(endpoint) => Some(Gateway::open(
                endpoint.clone(),
                config.volumed_key.clone(),
                crate::gateway::guest_endpoint(),
                &config.chunk_cache_dir,
                config.chunk_cache_bytes,
                config.chunk_memory_bytes,
                &config.data_dir.join("gateway.key"),
            )?),
            None => None,
        };
        tracing::info!(accel = accel.accel.as_str(), reason = %accel.reason, hypervisor = ?hypervisor.as_ref().map(|h| h.version()), "vmm-host starting");
        Ok(Self {
            config,
            state,
            images,
            backend,
            record_key,
            files,
            accel,
            hypervisor,
            kit,
            gateway,
            initramfs: tokio::sync::Mutex::new(None),
            live: Mutex::default(),
            host_nics: Mutex::default(),
        })
    }

    pub(crate) fn hypervisor(&self) -> Result<Arc<dyn Hypervisor>> {
        self.hypervisor.clone().map_err(SailboxError::Unavailable)
    }

    /// Serves the sailbox's volume gateway in its host-NIC namespace (see [`crate::gateway`],
    /// [`crate::host_nic`]) until its tasks end. Without a volumed endpoint there is none.
    pub(crate) fn bind_gateway(&self, live: &Arc<Live>) -> Result<()> {
        let Some(gateway) = &self.gateway else { return Ok(()) };
        let rec = live.snapshot();
        let scope = Scope {
            sailbox: rec.id.clone(),
            org: rec.org.clone(),
            volumes: rec.volumes.values().map(|v| v.volume.clone()).collect(),
        };
        let listener = self.host_nic(&rec.id)?.listen(crate::host_nic::GATEWAY_PORT)?;
        live.push_task(gateway.serve(listener, scope)?);
        Ok(())
    }

    /// The sailbox's host-NIC namespace: the one it has, else the one its still-running VM's
    /// passt is in (a vmm-host restarted under a running VM), else a new one.
    pub(crate) fn host_nic(&self, id: &str) -> Result<Arc<HostNic>> {
        if let Some(nic) = self.host_nics.lock().get(id) {
            return Ok(nic.clone());
        }
        let dir = self.run_dir(id);
        let nic = Arc::new(match HostNic::of_running_vm(&dir)? {
            Some(nic) => nic,
            None => HostNic::create()?,
        });
        Ok(self.host_nics.lock().entry(id.to_owned()).or_insert(nic).clone())
    }

    /// Lets the sailbox's host-NIC namespace go (it ends with the last process in it).
    pub(crate) fn forget_host_nic(&self, id: &str) {
        self.host_nics.lock().remove(id);
    }

    pub(crate) fn run_root(&self) -> PathBuf {
        self.config.data_dir.join("run")
    }

    pub(crate) fn run_dir(&self, id: &str) -> PathBuf {
        self.run_root().join(id)
    }

    /// The address ingress listeners are bound to, as shown in URLs.
    pub(crate) fn ingress_host(&self) -> String {
        self.config.ingress_addr.to_string()
    }

    pub(crate) fn to_proto(&self, rec: &SailboxRecord) -> pb::Sailbox {
        rec.to_proto(&self.config.host_name, &self.ingress_host())
    }

    pub(crate) fn live(&self, id: &str) -> Option<Arc<Live>> {
        self.live.lock().get(id).cloned()
    }

    pub(crate) fn add_live(&self, live: &Arc<Live>) {
        self.live.lock().insert(live.id(), live.clone());
    }

    pub(crate) fn drop_live(&self, id: &str) {
        self.live.lock().remove(id);
    }

    /// Takes every sailbox out of the registry (vmm-host stopping).
    pub(crate) fn take_all_live(&self) -> Vec<Arc<Live>> {
        self.live.lock().drain().map(|(_, l)| l).collect()
    }

    /// How many held sailboxes are running.
    pub(crate) fn running_count(&self) -> usize {
        self.live.lock().values().filter(|l| l.snapshot().state == State::Running).count()
    }

    /// The record of a sailbox, or a not-found error.
    pub(crate) fn record(&self, id: &str) -> Result<SailboxRecord> {
        if let Some(live) = self.live(id) {
            return Ok(live.snapshot());
        }
        self.state.sailbox(id)?.ok_or_else(|| SailboxError::NotFound(id.to_owned()))
    }

    /// A sailbox this host holds (not final), or the error that says why it is not.
    pub(crate) fn held(&self, id: &str) -> Result<Arc<Live>> {
        if let Some(live) = self.live(id) {
            return Ok(live);
        }
        let rec = self.record(id)?;
        Err(not_running(id, rec.state, &rec.state_reason))
    }

    /// A running sailbox and its VM, or the error that says why it is not running.
    pub(crate) fn running(&self, id: &str) -> Result<(Arc<Live>, Arc<Vm>)> {
        let live = self.held(id)?;
        let rec = live.snapshot();
        match (rec.state, live.vm()) {
            (State::Running, Some(vm)) => Ok((live, vm)),
            (state, _) => Err(not_running(id, state, &rec.state_reason)),
        }
    }

    /// Builds (or finds) the initramfs for the configured agent.
    pub(crate) async fn initramfs(&self) -> Result<Initramfs> {
        let mut cached = self.initramfs.lock().await;
        if let Some(i) = cached.as_ref() {
            return Ok(i.clone());
        }
        let kit = self.kit.clone().map_err(SailboxError::Unavailable)?;
        let agent = self.config.agent_binary.clone();
        let helper = self.config.volume_helper_binary.clone();
        let out = self.config.data_dir.join("boot");
        let built = tokio::task::spawn_blocking(move || kit.initramfs(&agent, &helper, &out)).await??;
        *cached = Some(built.clone());
        Ok(built)
    }

    /// Forgets the built initramfs, so the next boot rebuilds it from the agent binary.
    pub(crate) async fn forget_initramfs(&self) {
        *self.initramfs.lock().await = None;
    }

    /// Makes sure an image is built on this host (its chunks in the store).
    pub(crate) async fn ensure_image(&self, name: &str, progress: Progress) -> Result<LocalImage> {
        let name = if name.is_empty() { model::DEFAULT_IMAGE } else { name };
        model::check_name("image", name)?;
        self.images.ensure(name, progress).await
    }

    /// Loads a checkpoint record by id: from the state store, else from the chunk store (a
    /// checkpoint made by another host sharing it), where only a record sealed with the record
    /// key counts ([`crate::seal`]: anything else there, such as a record a guest wrote into
    /// its disk, is a checkpoint that does not exist). Either way its fields are validated.
    pub(crate) async fn load_checkpoint(&self, id: &str) -> Result<CheckpointRecord> {
        if let Some(rec) = self.state.checkpoint(id)? {
            rec.validate().map_err(|e| SailboxError::InvalidConfig(format!("checkpoint {id}: {e}")))?;
            return Ok(rec);
        }
        let hex = id.strip_prefix("ck-").ok_or_else(|| SailboxError::invalid(format!("{id:?} is not a checkpoint id")))?;
        let chunk: ChunkId = hex.parse().map_err(|_| SailboxError::invalid(format!("{id:?} is not a checkpoint id")))?;
        let bytes = match self.backend.get(chunk).await {
            Ok(b) => b,
            Err(chunkstore::ChunkError::NotFound(_)) => return Err(SailboxError::NotFound(format!("checkpoint {id}"))),
            Err(e) => return Err(e.into()),
        };
        let rec = checkpoint_from_chunk(&self.record_key, id, &bytes)?;
        self.state.commit(self.state.changes().checkpoint(&self.state, id, &rec))?;
        Ok(rec)
    }

    /// The kernel command line of a VM.
    fn cmdline(&self) -> String {
        let mut cmdline = String::from("console=ttyS0 quiet loglevel=4 panic=-1 random.trust_cpu=on sail.root=/dev/vda");
        // The agent's log filter, for debugging guests (the kernel hands unknown
        // `key=value` parameters to init as environment).
        if let Ok(filter) = std::env::var("SAIL_GUEST_RUST_LOG")
            && !filter.is_empty()
            && filter.bytes().all(|b| b.is_ascii_alphanumeric() || b"=,_:-".contains(&b))
        {
            cmdline.push_str(&format!(" RUST_LOG={filter}"));
        }
        if self.accel.accel == crate::accel::Accelerator::Tcg {
            // Without it the kernel hangs calibrating the TSC under TCG's microvm.
            cmdline.push_str(" tsc_early_khz=2000000");
        }
        cmdline
    }

    /// The VM spec for a sailbox's record (its files on the cowfs mount).
    pub(crate) fn vm_spec(&self, rec: &SailboxRecord, initramfs: &Path, incoming: Option<Incoming>) -> Result<VmSpec> {
        let kit = self.kit.clone().map_err(SailboxError::Unavailable)?;
        let hypervisor = self.hypervisor()?;
        let dir = self.run_dir(&rec.id);
        let spec = VmSpec {
            id: rec.id.clone(),
            memory_file: match &rec.memory_base {
                Some(ck) => self.files.path(&VmFiles::view_name(ck)),
                None => self.files.memory_path(&rec.id),
            },
            memory_private: rec.memory_base.is_some(),
            disk: self.files.disk_path(&rec.id),
            disk_format: "raw",
            incoming,
            link: hypervisor.link(&dir),
            dir,
            vcpus: rec.vcpus,
            memory_mib: rec.memory_mib,
            kernel: kit.vmlinux,
            initramfs: initramfs.to_path_buf(),
            cmdline: self.cmdline(),
            accel: self.accel.accel,
            network: rec.network,
            host_nic: self.host_nic(&rec.id)?,
        };
        // Unix socket paths are limited to 107 bytes.
        let longest = spec.dir.join("agent.sock.lock");
        if longest.as_os_str().len() > 100 {
            return Err(SailboxError::Creation(format!(
                "data directory path too long for Unix sockets ({}); use a shorter --data-dir",
                longest.display()
            )));
        }
        Ok(spec)
    }

    /// Stores a sailbox's record, logging (not failing) when the store refuses: for
    /// teardown paths whose caller has nothing better to do with the error.
    pub(crate) fn put_quietly(&self, rec: &SailboxRecord) {
        if let Err(e) = self.state.put_sailbox(rec) {
            tracing::warn!(sailbox = %rec.id, error = %e, "storing the sailbox record failed");
        }
    }
}

pub(crate) fn not_running(id: &str, state: State, reason: &str) -> SailboxError {
    match state {
        State::Terminated => SailboxError::Terminated(id.to_owned()),
        State::Lost => SailboxError::WorkerLost { id: id.to_owned(), reason: reason.to_owned() },
        State::Creating => SailboxError::Execution(format!("sailbox {id} is still being created")),
        State::Paused => SailboxError::Execution(format!("sailbox {id} is paused: resume it first")),
        State::Sleeping => SailboxError::Execution(format!("sailbox {id} is sleeping")),
        State::Running => SailboxError::Execution(format!("sailbox {id} is not reachable")),
    }
}

/// A checkpoint record from its chunk: sealed under `key` ([`crate::seal`]), well-formed and
/// valid, or a checkpoint that does not exist (an unsealed or forged record is not told
/// apart from a missing one).
pub(crate) fn checkpoint_from_chunk(key: &RecordKey, id: &str, bytes: &[u8]) -> Result<CheckpointRecord> {
    let Some(json) = key.open(bytes) else {
        tracing::warn!(checkpoint = %id, "a chunk named as a checkpoint is not a sealed record; refused");
        return Err(SailboxError::NotFound(format!("checkpoint {id}")));
    };
    let rec: CheckpointRecord = serde_json::from_slice(json)
        .map_err(|source| SailboxError::CorruptRecord { what: format!("checkpoint record {id}"), source })?;
    rec.validate().map_err(|e| SailboxError::InvalidConfig(format!("checkpoint {id}: {e}")))?;
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_sealed_valid_record_is_a_checkpoint() {
        let key = RecordKey::from_bytes([3; 32]);
        let json = serde_json::to_vec(&crate::model::record_tests::record_json()).unwrap();
        let rec = checkpoint_from_chunk(&key, "ck-1", &key.seal(&json)).unwrap();
        assert_eq!(rec.sailbox, "sb-1");
        // The same record unsealed (what a guest can get stored: its disk regions are chunks).
        assert!(matches!(checkpoint_from_chunk(&key, "ck-1", &json), Err(SailboxError::NotFound(_))));
        // Sealed with another host's key.
        let other = RecordKey::from_bytes([4; 32]);
        assert!(matches!(checkpoint_from_chunk(&key, "ck-1", &other.seal(&json)), Err(SailboxError::NotFound(_))));
        // Sealed but not valid.
        let mut j = crate::model::record_tests::record_json();
        j["ports"] = serde_json::json!([22]);
        let sealed = key.seal(&serde_json::to_vec(&j).unwrap());
        assert!(matches!(checkpoint_from_chunk(&key, "ck-1", &sealed), Err(SailboxError::InvalidConfig(_))));
    }
}

//! The durable records of vmm-host (stored as JSON in RocksDB) and the validation of create
//! requests against the contract (DESIGN 2.2).

use std::collections::{BTreeMap, BTreeSet};

use proto::sailbox as pb;
use serde::{Deserialize, Serialize};

use crate::error::{Result, SailboxError};

/// Lowest and highest `memory_mib`.
pub const MEMORY_MIB: std::ops::RangeInclusive<u32> = 1024..=65536;
/// Lowest and highest `disk_gib`.
pub const DISK_GIB: std::ops::RangeInclusive<u32> = 1..=64;
/// Largest `cpu`.
pub const MAX_CPU: f64 = 64.0;
/// Ingress ports that are never allowed (SSH and the agent's own port).
pub const RESERVED_PORTS: [u32; 2] = [22, proto::agent::VSOCK_PORT];
/// Most ingress ports per sailbox.
pub const MAX_PORTS: usize = 64;
/// Longest app or sailbox name.
pub const MAX_NAME: usize = 64;
/// Most volumes one sailbox mounts.
pub const MAX_MOUNTS: usize = 16;
/// The org of every request until API keys name one (the tenancy issue).
pub const DEFAULT_ORG: &str = "default";

/// The lifecycle states (DESIGN 3.4), plus `Lost` for a sailbox whose VMM died with no
/// checkpoint to restore it from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// The VM is being prepared and booted.
    Creating,
    /// The guest agent answers.
    Running,
    /// Checkpointed and powered down until an explicit resume.
    Paused,
    /// Checkpointed and powered down until ingress, an exec or a resume.
    Sleeping,
    /// Destroyed for good.
    Terminated,
    /// The VMM went away and could not be restored.
    Lost,
}

impl State {
    /// Whether the sailbox is gone for good.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Terminated | Self::Lost)
    }

    /// The wire enum.
    pub fn to_proto(self) -> pb::SailboxState {
        match self {
            Self::Creating => pb::SailboxState::Creating,
            Self::Running => pb::SailboxState::Running,
            Self::Paused => pb::SailboxState::Paused,
            Self::Sleeping => pb::SailboxState::Sleeping,
            Self::Terminated => pb::SailboxState::Terminated,
            Self::Lost => pb::SailboxState::Lost,
        }
    }

    /// From the wire enum (`None` for UNSPECIFIED or unknown values).
    pub fn from_proto(v: i32) -> Option<Self> {
        Some(match pb::SailboxState::try_from(v).ok()? {
            pb::SailboxState::Creating => Self::Creating,
            pb::SailboxState::Running => Self::Running,
            pb::SailboxState::Paused => Self::Paused,
            pb::SailboxState::Sleeping => Self::Sleeping,
            pb::SailboxState::Terminated => Self::Terminated,
            pb::SailboxState::Lost => Self::Lost,
            pb::SailboxState::Unspecified => return None,
        })
    }
}

/// A process vmm-host started for a sailbox: pid plus its start time, so a recycled pid is
/// never mistaken for it after a restart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRef {
    /// Process id.
    pub pid: u32,
    /// Start time in clock ticks since boot (field 22 of /proc/PID/stat).
    pub start_ticks: u64,
}

/// An ingress listener: the guest port and the host address that forwards to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerRecord {
    /// Guest TCP port.
    pub port: u32,
    /// Host port (on the configured ingress address).
    pub host_port: u16,
}

/// A volume mounted in the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Org of the volume.
    pub org: String,
    /// Volume name.
    pub volume: String,
}

/// A sailbox's network (DESIGN 2.2): whether it has the outbound network device. The host
/// NIC (the volume gateway's address) is there either way, so the device set of a sailbox
/// never changes across checkpoint, restore and fork. See docs/networking.md.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// Outbound connections go through a per-VM `passt` (the default).
    #[default]
    Outbound,
    /// No outbound network device.
    None,
}

impl Network {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::None => "none",
        }
    }

    /// From the wire name ("" is the default, outbound).
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "" | "outbound" => Ok(Self::Outbound),
            "none" => Ok(Self::None),
            other => Err(SailboxError::InvalidConfig(format!("network must be \"outbound\" or \"none\", got {other:?}"))),
        }
    }
}

/// Everything durable about one sailbox.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SailboxRecord {
    /// `sb-` + 24 hex digits.
    pub id: String,
    /// The org it belongs to (the caller's at create; records from before orgs: `default`).
    #[serde(default = "default_org")]
    pub org: String,
    /// App name.
    pub app: String,
    /// Optional name, unique among live sailboxes of the app.
    pub name: String,
    /// The image the disk was made from.
    pub image: String,
    /// Current state.
    pub state: State,
    /// Why it is in this state (set for lost and terminated ones, and on failures).
    pub state_reason: String,
    /// Requested CPU share; `vcpus = ceil(cpu)`.
    pub cpu: f64,
    /// vCPUs given to the VM.
    pub vcpus: u32,
    /// Guest memory.
    pub memory_mib: u32,
    /// Root disk size.
    pub disk_gib: u32,
    /// Ingress listeners.
    pub listeners: Vec<ListenerRecord>,
    /// Volumes by guest path.
    pub volumes: BTreeMap<String, VolumeRecord>,
    /// Creation time, Unix ms.
    pub created_unix_ms: u64,
    /// Agent behaviour version reported by the guest.
    pub guest_schema_version: u32,
    /// Agent crate version reported by the guest.
    pub agent_version: String,
    /// "qemu" or "cloud-hypervisor".
    pub hypervisor: String,
    /// "kvm" or "tcg".
    pub accelerator: String,
    /// VMM launch to the agent's first answer, ms.
    pub boot_ms: u64,
    /// The VMM process and its helpers (vhost-user daemons), while running.
    pub procs: Vec<ProcRef>,
    /// The exec request that is active, if any (one at a time per sailbox).
    pub active_exec: Option<String>,
    /// The newest completed checkpoint.
    #[serde(default)]
    pub last_checkpoint: Option<String>,
    /// Set while the VM is down and its cowfs files hold exactly this checkpoint (a resume
    /// can use them as they are instead of rebuilding them from the manifests).
    #[serde(default)]
    pub files_at: Option<String>,
    /// An upgrade to apply at the next wake (recorded while paused or sleeping).
    #[serde(default)]
    pub pending_upgrade: bool,
    /// The external call a sleep waits for.
    #[serde(default)]
    pub sleep_call: Option<String>,
    /// The checkpoint a fork or restore started from.
    #[serde(default)]
    pub forked_from: Option<String>,
    /// Ingress ports (kept so a restore or fork can rebind them).
    #[serde(default)]
    pub ports: Vec<u32>,
    /// While its VM runs on a private copy-on-write mapping of a checkpoint's memory (a
    /// fork or restore, sharing unmodified pages with the other VMs started from it): that
    /// checkpoint. `None`: the VM has its own memory file.
    #[serde(default)]
    pub memory_base: Option<String>,
    /// Its network (records from before it was recorded: outbound, the only kind then).
    #[serde(default)]
    pub network: Network,
}

/// The org of records written before records had one.
fn default_org() -> String {
    DEFAULT_ORG.to_owned()
}

impl SailboxRecord {
    /// A record in state `Creating` that has run nothing yet (no processes, listeners,
    /// checkpoints), created now; create, fork and restore fill in the rest with struct
    /// update syntax (`SailboxRecord { id, app, .., ..SailboxRecord::creating() }`).
    pub fn creating() -> Self {
        Self {
            id: String::new(),
            org: DEFAULT_ORG.to_owned(),
            app: String::new(),
            name: String::new(),
            image: String::new(),
            state: State::Creating,
            state_reason: String::new(),
            cpu: 0.0,
            vcpus: 0,
            memory_mib: 0,
            disk_gib: 0,
            listeners: Vec::new(),
            volumes: BTreeMap::new(),
            created_unix_ms: sysutil::clock::now_ms(),
            guest_schema_version: 0,
            agent_version: String::new(),
            hypervisor: String::new(),
            accelerator: String::new(),
            boot_ms: 0,
            procs: Vec::new(),
            active_exec: None,
            last_checkpoint: None,
            files_at: None,
            pending_upgrade: false,
            sleep_call: None,
            forked_from: None,
            ports: Vec::new(),
            memory_base: None,
            network: Network::Outbound,
        }
    }

    /// The wire form; `ingress_host` is where listeners are bound.
    pub fn to_proto(&self, host: &str, ingress_host: &str) -> pb::Sailbox {
        pb::Sailbox {
            sailbox_id: self.id.clone(),
            org: self.org.clone(),
            app: self.app.clone(),
            name: self.name.clone(),
            image: self.image.clone(),
            state: self.state.to_proto() as i32,
            cpu: self.cpu,
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            disk_gib: self.disk_gib,
            listeners: self
                .listeners
                .iter()
                .map(|l| pb::Listener {
                    port: l.port,
                    url: format!("http://{ingress_host}:{}", l.host_port),
                    host_addr: format!("{ingress_host}:{}", l.host_port),
                    routed: false,
                })
                .collect(),
            created_unix_ms: self.created_unix_ms,
            guest_schema_version: self.guest_schema_version,
            agent_version: self.agent_version.clone(),
            hypervisor: self.hypervisor.clone(),
            accelerator: self.accelerator.clone(),
            host: host.to_owned(),
            boot_ms: self.boot_ms,
            state_reason: self.state_reason.clone(),
            volumes: self
                .volumes
                .iter()
                .map(|(p, v)| {
                    (p.clone(), pb::VolumeMount { volume: v.volume.clone(), org: v.org.clone(), mint_if_missing: false })
                })
                .collect(),
            last_checkpoint: self.last_checkpoint.clone().unwrap_or_default(),
            pending_upgrade: self.pending_upgrade,
            sleeping_on_call: self.sleep_call.clone().unwrap_or_default(),
            forked_from: self.forked_from.clone().unwrap_or_default(),
            mounts: Vec::new(),
            network: self.network.as_str().to_owned(),
        }
    }
}

/// A completed checkpoint: everything needed to start the sailbox again on any host that
/// shares the chunk store. Stored as a chunk (its id, `ck-` + hex, names it) and indexed in
/// the state store.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// The sailbox checkpointed.
    pub sailbox: String,
    /// Its org: only that org restores it (records from before orgs: `default`).
    #[serde(default = "default_org")]
    pub org: String,
    /// Its app.
    pub app: String,
    /// Its name.
    pub name: String,
    /// The image its disk came from.
    pub image: String,
    /// CPU share.
    pub cpu: f64,
    /// vCPUs (the device state is for this many).
    pub vcpus: u32,
    /// Guest memory.
    pub memory_mib: u32,
    /// Disk size.
    pub disk_gib: u32,
    /// Ingress ports.
    pub ports: Vec<u32>,
    /// The sailbox's network (a restore or fork keeps it: the device state is for its
    /// device set). Older records: outbound.
    #[serde(default)]
    pub network: Network,
    /// Memory manifest (cowfs), chunk id hex.
    pub memory_manifest: String,
    /// Disk manifest (cowfs), chunk id hex.
    pub disk_manifest: String,
    /// Device state (QEMU migration stream without RAM), chunk id hex.
    pub device_state: String,
    /// How the device state was saved (older records: without RAM, `x-ignore-shared`).
    #[serde(default)]
    pub device_state_format: crate::hypervisor::StateFormat,
    /// Hypervisor and accelerator the device state belongs to.
    pub hypervisor: String,
    /// "kvm" or "tcg".
    pub accelerator: String,
    /// Agent behaviour version in the checkpointed guest.
    pub guest_schema_version: u32,
    /// Agent version in the checkpointed guest.
    pub agent_version: String,
    /// The previous checkpoint of the same sailbox (or the one it was forked from).
    pub parent: Option<String>,
    /// When, Unix ms.
    pub created_unix_ms: u64,
    /// Guest stopped, ms.
    pub pause_ms: u64,
    /// Until durable, ms.
    pub total_ms: u64,
    /// Memory regions written since the parent, bytes.
    pub memory_bytes_changed: u64,
    /// Of those, uploaded.
    pub memory_bytes_uploaded: u64,
    /// Disk regions written since the parent, bytes.
    pub disk_bytes_changed: u64,
    /// Of those, uploaded.
    pub disk_bytes_uploaded: u64,
    /// Volumes mounted in the guest (their helpers run in its memory, so a fork or restore
    /// keeps them mounted and its gateway must admit them).
    #[serde(default)]
    pub volumes: BTreeMap<String, VolumeRecord>,
}

impl CheckpointRecord {
    /// The wire form.
    pub fn to_proto(&self, id: &str) -> pb::Checkpoint {
        pb::Checkpoint {
            checkpoint_id: id.to_owned(),
            sailbox_id: self.sailbox.clone(),
            created_unix_ms: self.created_unix_ms,
            pause_ms: self.pause_ms,
            total_ms: self.total_ms,
            memory_bytes: u64::from(self.memory_mib) << 20,
            memory_bytes_changed: self.memory_bytes_changed,
            memory_bytes_uploaded: self.memory_bytes_uploaded,
            disk_bytes_changed: self.disk_bytes_changed,
            disk_bytes_uploaded: self.disk_bytes_uploaded,
            parent_checkpoint: self.parent.clone().unwrap_or_default(),
        }
    }
}

/// An exec request's durable state (its result, once there, is stored beside it).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExecRecord {
    /// `ex-` + 24 hex digits.
    pub id: String,
    /// The sailbox it runs in.
    pub sailbox: String,
    /// The shell command.
    pub command: String,
    /// Working directory.
    pub cwd: String,
    /// Runtime limit, ms (0: none).
    pub timeout_ms: u64,
    /// Launched detached.
    pub background: bool,
    /// Added environment.
    pub env: BTreeMap<String, String>,
    /// Start, Unix ms.
    pub started_unix_ms: u64,
    /// Where it is.
    pub status: ExecStatus,
}

/// Where an exec request is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status", content = "reason")]
pub enum ExecStatus {
    /// The agent runs it.
    Running,
    /// Finished: the result is stored.
    Finished,
    /// The agent could not start or report it (the reason says why).
    Failed(String),
    /// The sailbox was lost while it ran.
    Lost(String),
    /// The sailbox was terminated while it ran.
    Terminated,
}

/// A validated create request.
#[derive(Clone, Debug)]
pub struct CreateSpec {
    /// App name ("default" when empty).
    pub app: String,
    /// Image name or id ("debian" when empty).
    pub image: String,
    /// Sailbox name (may be empty).
    pub name: String,
    /// CPU share.
    pub cpu: f64,
    /// ceil(cpu).
    pub vcpus: u32,
    /// Guest memory.
    pub memory_mib: u32,
    /// Disk size.
    pub disk_gib: u32,
    /// Ingress ports, in request order.
    pub ports: Vec<u32>,
    /// Volumes by absolute guest path.
    pub volumes: BTreeMap<String, VolumeRecord>,
    /// Paths whose volume is minted if it does not exist.
    pub mint: BTreeSet<String>,
    /// Network.
    pub network: Network,
}

/// Default image of a sailbox created without one.
pub const DEFAULT_IMAGE: &str = "debian";

/// Checks a name: 1..=64 of `[A-Za-z0-9._-]`, starting with a letter or digit.
pub fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(SailboxError::InvalidConfig(format!(
            "{what} {name:?} must be 1..={MAX_NAME} of [A-Za-z0-9._-], starting with a letter or digit"
        )))
    }
}

/// Checks an absolute guest path: starts with `/`, is not `/`, no `.`/`..`/empty components,
/// no NUL, at most 4096 bytes.
pub fn check_guest_path(path: &str) -> std::result::Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("path {path:?} must be absolute"));
    }
    if path == "/" {
        return Err("path must not be /".into());
    }
    if path.len() > 4096 || path.contains('\0') {
        return Err("path must be at most 4096 bytes without NUL".into());
    }
    let body = path.strip_suffix('/').unwrap_or(path);
    if body[1..].split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(format!("path {path:?} must not contain empty, . or .. components"));
    }
    Ok(())
}

/// Validates a create request (DESIGN 2.2) and fills in defaults. Nothing is created here.
pub fn validate_create(req: &pb::CreateSailboxRequest, org: &str) -> Result<CreateSpec> {
    let bad = |m: String| Err(SailboxError::InvalidConfig(m));
    let app = if req.app.is_empty() { "default".to_owned() } else { req.app.clone() };
    check_name("app", &app)?;
    if !req.name.is_empty() {
        check_name("name", &req.name)?;
    }
    let image = if req.image.is_empty() { DEFAULT_IMAGE.to_owned() } else { req.image.clone() };
    check_name("image", &image)?;
    let cpu = if req.cpu == 0.0 { 1.0 } else { req.cpu };
    if !cpu.is_finite() || cpu <= 0.0 || cpu > MAX_CPU {
        return bad(format!("cpu must be > 0 and <= {MAX_CPU}, got {}", req.cpu));
    }
    let memory_mib = if req.memory_mib == 0 { 1024 } else { req.memory_mib };
    if !MEMORY_MIB.contains(&memory_mib) {
        return bad(format!("memory_mib must be in {}..={}, got {memory_mib}", MEMORY_MIB.start(), MEMORY_MIB.end()));
    }
    let disk_gib = if req.disk_gib == 0 { 8 } else { req.disk_gib };
    if !DISK_GIB.contains(&disk_gib) {
        return bad(format!("disk_gib must be in {}..={}, got {disk_gib}", DISK_GIB.start(), DISK_GIB.end()));
    }
    let ports = check_ports(&req.ingress_ports)?;
    if req.volumes.len() > MAX_MOUNTS {
        return bad(format!("at most {MAX_MOUNTS} volume mounts, got {}", req.volumes.len()));
    }
    let network = Network::parse(&req.network)?;
    let mut volumes = BTreeMap::new();
    let mut mint = BTreeSet::new();
    for (path, v) in &req.volumes {
        if let Err(m) = check_guest_path(path) {
            return bad(format!("volume mount {m}"));
        }
        let normalized = path.trim_end_matches('/').to_owned();
        if volumes.contains_key(&normalized) {
            return bad(format!("volume mount path {path:?} is listed twice"));
        }
        if v.volume.is_empty() {
            return bad(format!("volume mount {path:?} names no volume"));
        }
        check_name("volume", &v.volume)?;
        let org = if v.org.is_empty() { org.to_owned() } else { v.org.clone() };
        if v.mint_if_missing {
            mint.insert(normalized.clone());
        }
        volumes.insert(normalized, VolumeRecord { org, volume: v.volume.clone() });
    }
    check_mounts_apart(volumes.keys())?;
    Ok(CreateSpec {
        app,
        image,
        name: req.name.clone(),
        cpu,
        vcpus: cpu.ceil() as u32,
        memory_mib,
        disk_gib,
        ports,
        volumes,
        mint,
        network,
    })
}

/// Ingress ports as create takes them: at most [`MAX_PORTS`], each in 1..=65535, none
/// reserved, none twice.
pub fn check_ports(ports: &[u32]) -> Result<Vec<u32>> {
    let bad = |m: String| Err(SailboxError::InvalidConfig(m));
    if ports.len() > MAX_PORTS {
        return bad(format!("at most {MAX_PORTS} ingress ports"));
    }
    let mut out = Vec::with_capacity(ports.len());
    for &p in ports {
        if !(1..=65535).contains(&p) {
            return bad(format!("ingress port {p} is not in 1..=65535"));
        }
        if RESERVED_PORTS.contains(&p) {
            return bad(format!("ingress port {p} is reserved"));
        }
        if out.contains(&p) {
            return bad(format!("ingress port {p} is listed twice"));
        }
        out.push(p);
    }
    Ok(out)
}

/// Mount paths (normalized) of which none lies inside another.
fn check_mounts_apart<'a>(paths: impl Iterator<Item = &'a String> + Clone) -> Result<()> {
    for a in paths.clone() {
        for b in paths.clone() {
            if a != b && b.starts_with(a.as_str()) && b.as_bytes().get(a.len()) == Some(&b'/') {
                return Err(SailboxError::InvalidConfig(format!("volume mount {b:?} is inside mount {a:?}")));
            }
        }
    }
    Ok(())
}

/// Longest free-form string a checkpoint record may carry (versions, names of the VMM).
const MAX_RECORD_STRING: usize = 128;

impl CheckpointRecord {
    /// Checks every field as create checks a request (names, sizes, ports, mounts), and that
    /// the chunks it names are chunk ids: a record is what a restore hands to the VMM, so one
    /// that is not exactly what a host would have written is refused.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(SailboxError::InvalidConfig(m));
        check_name("app", &self.app)?;
        if !self.name.is_empty() {
            check_name("name", &self.name)?;
        }
        check_name("image", &self.image)?;
        check_name("sailbox", &self.sailbox)?;
        check_name("org", &self.org)?;
        if !self.cpu.is_finite() || self.cpu <= 0.0 || self.cpu > MAX_CPU {
            return bad(format!("cpu {} is out of range", self.cpu));
        }
        if self.vcpus == 0 || f64::from(self.vcpus) != self.cpu.ceil() {
            return bad(format!("vcpus {} does not match cpu {}", self.vcpus, self.cpu));
        }
        if !MEMORY_MIB.contains(&self.memory_mib) {
            return bad(format!("memory_mib {} is out of range", self.memory_mib));
        }
        if !DISK_GIB.contains(&self.disk_gib) {
            return bad(format!("disk_gib {} is out of range", self.disk_gib));
        }
        check_ports(&self.ports)?;
        for (what, hex) in [
            ("memory manifest", &self.memory_manifest),
            ("disk manifest", &self.disk_manifest),
            ("device state", &self.device_state),
        ] {
            if hex.parse::<chunkstore::ChunkId>().is_err() {
                return bad(format!("the {what} {hex:?} is not a chunk id"));
            }
        }
        for (what, v) in
            [("hypervisor", &self.hypervisor), ("accelerator", &self.accelerator), ("agent_version", &self.agent_version)]
        {
            if v.len() > MAX_RECORD_STRING || v.chars().any(char::is_control) {
                return bad(format!("{what} is not a short printable string"));
            }
        }
        if self.parent.as_ref().is_some_and(|p| p.len() > MAX_RECORD_STRING) {
            return bad("parent is too long".into());
        }
        if self.volumes.len() > MAX_MOUNTS {
            return bad(format!("at most {MAX_MOUNTS} volume mounts, got {}", self.volumes.len()));
        }
        for (path, v) in &self.volumes {
            if let Err(m) = check_guest_path(path) {
                return bad(format!("volume mount {m}"));
            }
            check_name("volume", &v.volume)?;
            check_name("org", &v.org)?;
        }
        check_mounts_apart(self.volumes.keys())
    }
}

#[cfg(test)]
pub(crate) mod record_tests {
    use super::*;

    /// A record as a host writes one, as JSON (tests change one field at a time).
    pub(crate) fn record_json() -> serde_json::Value {
        let hex = chunkstore::ChunkId::of(b"x").to_hex().to_string();
        serde_json::json!({
            "sailbox": "sb-1", "app": "default", "name": "", "image": "debian", "cpu": 1.0, "vcpus": 1,
            "memory_mib": 1024, "disk_gib": 8, "ports": [8080], "memory_manifest": hex, "disk_manifest": hex,
            "device_state": hex, "hypervisor": "QEMU 10.0.2", "accelerator": "tcg", "guest_schema_version": 2,
            "agent_version": "0.1.0", "parent": null, "created_unix_ms": 1, "pause_ms": 1, "total_ms": 1,
            "memory_bytes_changed": 0, "memory_bytes_uploaded": 0, "disk_bytes_changed": 0, "disk_bytes_uploaded": 0,
            "volumes": {"/mnt/v": {"org": "default", "volume": "v"}}
        })
    }

    fn with(field: &str, value: serde_json::Value) -> CheckpointRecord {
        let mut j = record_json();
        j[field] = value;
        serde_json::from_value(j).unwrap()
    }

    #[test]
    fn a_record_is_validated_like_a_create_request() {
        let ok: CheckpointRecord = serde_json::from_value(record_json()).unwrap();
        ok.validate().unwrap();
        let bad = [
            with("ports", serde_json::json!([22])),
            with("ports", serde_json::json!([8080, 8080])),
            with("ports", serde_json::json!([70000])),
            with("memory_mib", serde_json::json!(1)),
            with("cpu", serde_json::json!(1000.0)),
            with("vcpus", serde_json::json!(3)),
            with("disk_gib", serde_json::json!(100_000)),
            with("device_state", serde_json::json!("../../etc/passwd")),
            with("memory_manifest", serde_json::json!("")),
            with("app", serde_json::json!("../x")),
            with("image", serde_json::json!("a b")),
            with("agent_version", serde_json::json!("x".repeat(1000))),
            with("hypervisor", serde_json::json!("qemu\n-object")),
            with(
                "volumes",
                serde_json::json!({"/a": {"org": "default", "volume": "v"}, "/a/b": {"org": "default", "volume": "w"}}),
            ),
            with("volumes", serde_json::json!({"relative": {"org": "default", "volume": "v"}})),
            with("volumes", serde_json::json!({"/a": {"org": "", "volume": "v"}})),
        ];
        for rec in bad {
            assert!(rec.validate().is_err(), "{rec:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> pb::CreateSailboxRequest {
        pb::CreateSailboxRequest { app: "a".into(), ..Default::default() }
    }

    fn err(r: pb::CreateSailboxRequest) -> String {
        match validate_create(&r, "org") {
            Err(e @ SailboxError::InvalidConfig(_)) => {
                assert_eq!(e.name(), "SailboxCreationError");
                e.to_string()
            }
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_follow_the_contract() {
        let s = validate_create(&req(), "org").unwrap();
        assert_eq!((s.cpu, s.vcpus, s.memory_mib, s.disk_gib), (1.0, 1, 1024, 8));
        assert_eq!(s.image, "debian");
        assert_eq!(s.network, Network::Outbound);
        let s = validate_create(&pb::CreateSailboxRequest { network: "none".into(), ..req() }, "org").unwrap();
        assert_eq!(s.network, Network::None);
        let s = validate_create(&pb::CreateSailboxRequest { network: "outbound".into(), ..req() }, "org").unwrap();
        assert_eq!(s.network, Network::Outbound);
        let s = validate_create(&pb::CreateSailboxRequest { cpu: 1.5, ..req() }, "org").unwrap();
        assert_eq!(s.vcpus, 2);
    }

    #[test]
    fn out_of_range_arguments_are_refused() {
        assert!(err(pb::CreateSailboxRequest { cpu: -1.0, ..req() }).contains("cpu"));
        assert!(err(pb::CreateSailboxRequest { cpu: f64::NAN, ..req() }).contains("cpu"));
        assert!(err(pb::CreateSailboxRequest { cpu: 65.0, ..req() }).contains("cpu"));
        assert!(err(pb::CreateSailboxRequest { memory_mib: 1023, ..req() }).contains("memory_mib"));
        assert!(err(pb::CreateSailboxRequest { memory_mib: 65537, ..req() }).contains("memory_mib"));
        assert!(err(pb::CreateSailboxRequest { disk_gib: 65, ..req() }).contains("disk_gib"));
        for ports in [vec![22], vec![10000], vec![0], vec![65536], vec![80, 80]] {
            assert!(err(pb::CreateSailboxRequest { ingress_ports: ports.clone(), ..req() }).contains("port"), "{ports:?}");
        }
        for path in ["/", "rel", "/a/../b", "/a//b", ""] {
            let volumes = [(path.to_owned(), pb::VolumeMount { volume: "v".into(), ..Default::default() })].into();
            assert!(err(pb::CreateSailboxRequest { volumes, ..req() }).contains("volume mount"), "{path:?}");
        }
        let nested = [
            ("/data".to_owned(), pb::VolumeMount { volume: "v".into(), ..Default::default() }),
            ("/data/x".to_owned(), pb::VolumeMount { volume: "w".into(), ..Default::default() }),
        ]
        .into();
        assert!(err(pb::CreateSailboxRequest { volumes: nested, ..req() }).contains("inside"));
        assert!(err(pb::CreateSailboxRequest { name: "bad name".into(), ..req() }).contains("name"));
        assert!(err(pb::CreateSailboxRequest { app: "-x".into(), ..req() }).contains("app"));
        for network in ["off", "None", "host"] {
            let e = err(pb::CreateSailboxRequest { network: network.into(), ..req() });
            assert!(e.contains("network must be \"outbound\" or \"none\""), "{e}");
        }
    }

    #[test]
    fn records_without_a_network_are_outbound() {
        let rec = SailboxRecord { network: Network::None, ..SailboxRecord::creating() };
        let mut json = serde_json::to_value(&rec).unwrap();
        assert_eq!(json["network"], "none");
        json.as_object_mut().unwrap().remove("network");
        let old: SailboxRecord = serde_json::from_value(json).unwrap();
        assert_eq!(old.network, Network::Outbound);
        assert_eq!(old.to_proto("h", "127.0.0.1").network, "outbound");
    }

    #[test]
    fn edge_values_are_accepted() {
        let r =
            pb::CreateSailboxRequest { cpu: 0.25, memory_mib: 65536, disk_gib: 64, ingress_ports: vec![1, 65535, 8080], ..req() };
        let s = validate_create(&r, "org").unwrap();
        assert_eq!((s.vcpus, s.ports.len()), (1, 3));
    }
}

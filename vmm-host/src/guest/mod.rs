//! Guest artefacts: the kernel and modules that `scripts/guest-kernel.sh` extracts from
//! Debian's cloud kernel package, the static `sail-agent` and `sail-volume-fuse`, and the
//! initramfs vmm-host builds from them.
//!
//! Layout of the guest directory (written by the script):
//! - `vmlinux`: the uncompressed kernel (ELF with a PVH entry; both VMMs boot it directly)
//! - `kernel.release`: its `uname -r`
//! - `modules/<name>.ko` (decompressed) and `modules/order` (load order, one name a line)
//! - `busybox`: a static busybox for the initramfs and the minimal image

pub mod cpio;
pub mod sdk;

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Result, SailboxError};

/// The initramfs's `/init`.
const INIT_SCRIPT: &str = include_str!("init.sh");

/// The kernel-side artefacts, found in the guest directory.
#[derive(Clone, Debug)]
pub struct GuestKit {
    /// The directory.
    pub dir: PathBuf,
    /// Uncompressed kernel.
    pub vmlinux: PathBuf,
    /// `uname -r` of the kernel.
    pub release: String,
    /// Static busybox.
    pub busybox: PathBuf,
}

/// What `sail-agent --describe` prints.
#[derive(Clone, Debug, Deserialize)]
pub struct AgentInfo {
    /// The agent crate's version.
    pub agent_version: String,
    /// Its behaviour version.
    pub guest_schema_version: u32,
    /// Its protocol version.
    pub protocol_version: u32,
}

/// A built initramfs and the agent inside it.
#[derive(Clone, Debug)]
pub struct Initramfs {
    /// The archive on disk.
    pub path: PathBuf,
    /// The agent it carries.
    pub agent: AgentInfo,
    /// The volume mount helper it carries (`sail-volume-fuse`, installed beside the agent
    /// at `/run/sail/`), if one was found; without it guests cannot mount volumes.
    pub volume_helper: Option<PathBuf>,
}

fn missing(what: &str, path: &Path) -> SailboxError {
    SailboxError::Setup(format!("{what} not found at {}: run `bash scripts/setup.sh vm` (or set SAIL_GUEST_DIR)", path.display()))
}

impl GuestKit {
    /// Loads the artefacts from `dir`, checking that each is there.
    pub fn load(dir: &Path) -> Result<Self> {
        let vmlinux = dir.join("vmlinux");
        let busybox = dir.join("busybox");
        for (what, p) in [("guest kernel", &vmlinux), ("busybox", &busybox), ("module list", &dir.join("modules/order"))] {
            if !p.is_file() {
                return Err(missing(what, p));
            }
        }
        let release = std::fs::read_to_string(dir.join("kernel.release")).map(|s| s.trim().to_owned()).unwrap_or_default();
        Ok(Self { dir: dir.to_path_buf(), vmlinux, release, busybox })
    }

    /// Module names in load order.
    pub fn modules(&self) -> Result<Vec<String>> {
        let order =
            std::fs::read_to_string(self.dir.join("modules/order")).map_err(|e| SailboxError::io("reading modules/order", e))?;
        Ok(order.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect())
    }

    /// Builds (or finds, if unchanged) the initramfs for `agent` and the volume mount helper
    /// `volume_helper` under `out_dir`. Its name is the hash of its content, so a new agent,
    /// helper or module set gives a new file. A missing helper is left out (logged; guests
    /// then refuse mounts with a clear error); a dynamically linked one is an error.
    pub fn initramfs(&self, agent: &Path, volume_helper: &Path, out_dir: &Path) -> Result<Initramfs> {
        let info = describe_agent(agent)?;
        let volume_helper = check_volume_helper(volume_helper)?;
        let read = |p: &Path| std::fs::read(p).map_err(|e| SailboxError::io(format!("reading {}", p.display()), e));
        let mut w = cpio::CpioWriter::new();
        for d in ["bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"] {
            w.dir(d);
        }
        w.file("init", 0o755, INIT_SCRIPT.as_bytes());
        w.file("bin/busybox", 0o755, &read(&self.busybox)?);
        w.symlink("bin/sh", "busybox");
        let modules = self.modules()?;
        for m in &modules {
            w.file(&format!("lib/modules/{m}.ko"), 0o644, &read(&self.dir.join(format!("modules/{m}.ko")))?);
        }
        w.file("lib/modules/order", 0o644, modules.join("\n").as_bytes());
        w.file("sail-agent", 0o755, &read(agent)?);
        w.dir(sdk::DIR);
        w.dir(&format!("{}/sail", sdk::DIR));
        for (path, text) in sdk::FILES {
            w.file(&format!("{}/{path}", sdk::DIR), 0o644, text.as_bytes());
        }
        if let Some(helper) = &volume_helper {
            w.file("sail-volume-fuse", 0o755, &read(helper)?);
        }
        let archive = w.finish();
        let hash = blake3::hash(&archive).to_hex();
        std::fs::create_dir_all(out_dir).map_err(|e| SailboxError::io("creating the initramfs dir", e))?;
        let path = out_dir.join(format!("initramfs-{}.cpio", &hash[..16]));
        if !path.exists() {
            let tmp = out_dir.join(format!(".initramfs-{}.tmp{}", &hash[..16], std::process::id()));
            std::fs::write(&tmp, &archive).map_err(|e| SailboxError::io("writing the initramfs", e))?;
            std::fs::rename(&tmp, &path).map_err(|e| SailboxError::io("installing the initramfs", e))?;
        }
        Ok(Initramfs { path, agent: info, volume_helper })
    }
}

/// Runs the (static) agent binary on the host to learn its versions.
pub fn describe_agent(agent: &Path) -> Result<AgentInfo> {
    if !agent.is_file() {
        return Err(SailboxError::Setup(format!(
            "sail-agent not found at {}: build it with `bash scripts/build-agent.sh` (or set SAIL_AGENT_BIN)",
            agent.display()
        )));
    }
    if !is_static(agent)? {
        return Err(SailboxError::Setup(format!(
            "{} is dynamically linked; guests need the static build from scripts/build-agent.sh",
            agent.display()
        )));
    }
    let out = std::process::Command::new(agent)
        .arg("--describe")
        .output()
        .map_err(|e| SailboxError::io(format!("running {} --describe", agent.display()), e))?;
    if !out.status.success() {
        return Err(SailboxError::Setup(format!("{} --describe failed", agent.display())));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|source| SailboxError::AgentDescribe { agent: agent.display().to_string(), source })
}

/// The volume helper to put in the initramfs: `None` when there is no file at `path`
/// (logged), an error when it is not statically linked (it would not run in the guest).
pub fn check_volume_helper(path: &Path) -> Result<Option<PathBuf>> {
    if !path.is_file() {
        tracing::warn!(
            path = %path.display(),
            "sail-volume-fuse not found: guests will not mount volumes (build it with `bash scripts/build-agent.sh` or set SAIL_VOLUME_FUSE_BIN)"
        );
        return Ok(None);
    }
    if !is_static(path)? {
        return Err(SailboxError::Setup(format!(
            "{} is dynamically linked; guests need the static build from scripts/build-agent.sh",
            path.display()
        )));
    }
    Ok(Some(path.to_path_buf()))
}

/// Whether an ELF executable has no program interpreter (is statically linked).
pub fn is_static(path: &Path) -> Result<bool> {
    let data = std::fs::read(path).map_err(|e| SailboxError::io(format!("reading {}", path.display()), e))?;
    let bad = || SailboxError::Setup(format!("{} is not a 64-bit ELF executable", path.display()));
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 {
        return Err(bad());
    }
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| data.get(o..o + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    let phoff = u64_at(32).ok_or_else(bad)? as usize;
    let phentsize = u16_at(54).ok_or_else(bad)? as usize;
    let phnum = u16_at(56).ok_or_else(bad)? as usize;
    for i in 0..phnum {
        let off = phoff.checked_add(i.checked_mul(phentsize).ok_or_else(bad)?).ok_or_else(bad)?;
        let kind = data.get(off..off + 4).ok_or_else(bad)?;
        if u32::from_le_bytes([kind[0], kind[1], kind[2], kind[3]]) == 3 {
            return Ok(false); // PT_INTERP
        }
    }
    Ok(true)
}

/// Where the static agent is looked for: `$SAIL_AGENT_BIN`, then the static build beside
/// (or above) the running executable's target directory.
pub fn default_agent_path() -> PathBuf {
    static_guest_binary("SAIL_AGENT_BIN", "sail-agent")
}

/// Where the static volume mount helper is looked for: `$SAIL_VOLUME_FUSE_BIN`, then the
/// static build beside (or above) the running executable's target directory, as for the
/// agent.
pub fn default_volume_helper_path() -> PathBuf {
    static_guest_binary("SAIL_VOLUME_FUSE_BIN", "sail-volume-fuse")
}

/// A guest binary `name`: `$env` if set, else the first of `<dir>/<name>-static` and
/// `<dir>/x86_64-unknown-linux-gnu/release/<name>` (scripts/build-agent.sh's output) that
/// exists, for the three directories above the running executable; else the second of those.
fn static_guest_binary(env: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut candidates = Vec::new();
    for dir in exe.ancestors().skip(1).take(3) {
        candidates.push(dir.join(format!("{name}-static")));
        candidates.push(dir.join(format!("x86_64-unknown-linux-gnu/release/{name}")));
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| candidates.into_iter().nth(1).unwrap_or_else(|| PathBuf::from(name)))
}

/// The guest directory: `$SAIL_GUEST_DIR`, else `$XDG_CACHE_HOME/sail/guest`, else
/// `~/.cache/sail/guest`.
pub fn default_guest_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("SAIL_GUEST_DIR") {
        return p.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    cache.join("sail/guest")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_helper_is_optional_but_must_be_static() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(check_volume_helper(&dir.path().join("missing")).unwrap(), None, "a missing helper is left out");
        // This test binary is dynamically linked: it would not run in a guest.
        let exe = std::env::current_exe().unwrap();
        assert!(matches!(check_volume_helper(&exe), Err(SailboxError::Setup(_))));
    }
}

//! Which accelerator a VM gets: hardware KVM where it works, QEMU's TCG otherwise.
//!
//! `/dev/kvm` existing is not enough: our build machines expose KVM-PVM (pagetable-based
//! virtualisation), under which stock guest kernels do not run. KVM is used when `/dev/kvm`
//! answers `KVM_GET_API_VERSION` with 12, the CPU advertises VT-x or AMD-V, and the kvm_pvm
//! module is not what provides it.

use std::os::fd::AsRawFd;

/// A VM accelerator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accelerator {
    /// Hardware virtualisation through /dev/kvm.
    Kvm,
    /// QEMU's software emulation (Tiny Code Generator).
    Tcg,
}

impl Accelerator {
    /// "kvm" or "tcg".
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

/// What the host asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AccelChoice {
    /// Detect (the default).
    #[default]
    Auto,
    /// Always KVM (fails at launch where it does not work).
    Kvm,
    /// Always TCG.
    Tcg,
}

impl std::str::FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" | "" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            other => Err(format!("accelerator {other:?} must be auto, kvm or tcg")),
        }
    }
}

/// The decision and why.
#[derive(Clone, Debug)]
pub struct AccelProbe {
    /// What VMs get.
    pub accel: Accelerator,
    /// A sentence for `sail doctor` and logs.
    pub reason: String,
}

/// `_IO(KVMIO, 0x00)`.
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;

/// Decides the accelerator for `choice`.
pub fn detect(choice: AccelChoice) -> AccelProbe {
    match choice {
        AccelChoice::Kvm => AccelProbe { accel: Accelerator::Kvm, reason: "forced by configuration".into() },
        AccelChoice::Tcg => AccelProbe { accel: Accelerator::Tcg, reason: "forced by configuration".into() },
        AccelChoice::Auto => match kvm_usable() {
            Ok(()) => AccelProbe { accel: Accelerator::Kvm, reason: "/dev/kvm works with hardware virtualisation".into() },
            Err(why) => AccelProbe { accel: Accelerator::Tcg, reason: why },
        },
    }
}

fn kvm_usable() -> Result<(), String> {
    let dev =
        std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").map_err(|e| format!("/dev/kvm unusable ({e})"))?;
    // SAFETY: an argument-less ioctl on a file we own.
    let version = unsafe { libc::ioctl(dev.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version != 12 {
        return Err(format!("/dev/kvm reports API version {version}, not 12"));
    }
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        return Err("/dev/kvm is KVM-PVM: stock guest kernels cannot run under it".into());
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo.lines().filter(|l| l.starts_with("flags")).any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !hw {
        return Err("the CPU advertises neither VT-x (vmx) nor AMD-V (svm)".into());
    }
    Ok(())
}

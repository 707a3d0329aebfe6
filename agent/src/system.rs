//! The guest as a system: PID 1 duties (pseudo file systems, loopback), identity (hostname,
//! clock) and power.

use std::ffi::CStr;

use rustix::ioctl::{Getter, IntegerSetter, NoArg, Opcode, Setter, Updater, ioctl, opcode};
use rustix::mount::MountFlags;

/// Mounts the pseudo file systems a userland expects, when the agent is PID 1. The initramfs
/// hands over a root with `/run` already mounted (it holds the agent itself).
pub fn init_mounts() {
    let mounts: &[(&str, &str, &str, MountFlags, &CStr)] = &[
        ("proc", "/proc", "proc", MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC, c""),
        ("sysfs", "/sys", "sysfs", MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC, c""),
        ("devtmpfs", "/dev", "devtmpfs", MountFlags::NOSUID, c"mode=0755"),
        ("devpts", "/dev/pts", "devpts", MountFlags::NOSUID | MountFlags::NOEXEC, c"gid=5,mode=0620,ptmxmode=0666"),
        ("tmpfs", "/dev/shm", "tmpfs", MountFlags::NOSUID | MountFlags::NODEV, c"mode=1777"),
    ];
    for (src, target, fstype, flags, data) in mounts {
        let _ = std::fs::create_dir_all(target);
        match rustix::mount::mount(*src, *target, *fstype, *flags, *data) {
            Ok(()) | Err(rustix::io::Errno::BUSY) => {}
            Err(e) => tracing::warn!(target, error = %std::io::Error::from(e), "mount failed"),
        }
    }
    for (link, to) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(to, link);
    }
    let _ = std::fs::create_dir_all("/tmp");
    let _ = rustix::fs::chmod("/tmp", rustix::fs::Mode::from_raw_mode(0o1777));
    if let Err(e) = loopback_up() {
        tracing::warn!(error = %e, "could not bring up lo");
    }
}

// libc: rustix defines neither `struct ifreq` nor the interface-flags ioctls and flags.
const SIOCGIFFLAGS: Opcode = libc::SIOCGIFFLAGS as Opcode;
const SIOCSIFFLAGS: Opcode = libc::SIOCSIFFLAGS as Opcode;

/// Sets IFF_UP on `lo`: ingress reaches guest servers on 127.0.0.1.
fn loopback_up() -> std::io::Result<()> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    // Only for the two ioctls below; closed on drop.
    let sock = rustix::net::socket_with(AddressFamily::INET, SocketType::DGRAM, SocketFlags::CLOEXEC, None)?;
    // SAFETY: an all-zero ifreq is a valid value of this plain C struct.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo\0".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the NUL-terminated name from one ifreq and writes the flags
    // into it.
    unsafe { ioctl(&sock, Updater::<SIOCGIFFLAGS, libc::ifreq>::new(&mut req)) }?;
    // SAFETY: `ifru_flags` is the union member SIOCGIFFLAGS just filled.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads one ifreq (name and flags).
    unsafe { ioctl(&sock, Setter::<SIOCSIFFLAGS, libc::ifreq>::new(req)) }?;
    Ok(())
}

/// `_IOW('f', 16, __u64)`: grow a mounted ext4 file system to a new block count.
const EXT4_IOC_RESIZE_FS: Opcode = opcode::write::<u64>(b'f', 16);
/// `_IOR(0x12, 114, size_t)`: a block device's size in bytes.
const BLKGETSIZE64: Opcode = opcode::read::<usize>(0x12, 114);

/// Grows the root file system (ext4) online to fill its disk: images are built small and
/// every sailbox's disk is as large as it asked for. A no-op when it already fills it.
pub fn grow_root_fs() -> std::io::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    let Some(dev) = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?, f.next()?, f.next()?))
        })
        .filter(|(_, mnt, fstype)| *mnt == "/" && *fstype == "ext4")
        .map(|(dev, _, _)| dev.to_owned())
        .next_back()
    else {
        return Ok(()); // not ext4 (or no root line): nothing to grow
    };
    let disk = std::fs::File::open(&dev)?;
    // SAFETY: BLKGETSIZE64 writes one size_t (a u64 on the 64-bit guests).
    let dev_bytes = unsafe { ioctl(&disk, Getter::<BLKGETSIZE64, u64>::new()) }?;
    let st = rustix::fs::statvfs("/")?;
    let block = st.f_frsize.max(1);
    let want = dev_bytes / block;
    if want <= st.f_blocks + 1 {
        return Ok(());
    }
    let root = std::fs::File::open("/")?;
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64.
    unsafe { ioctl(&root, Setter::<EXT4_IOC_RESIZE_FS, u64>::new(want)) }?;
    tracing::info!(device = %dev, blocks = want, "grew the root file system");
    Ok(())
}

/// `_IOW('R', 0x03, int[2])`: add entropy to the pool, crediting it.
const RNDADDENTROPY: Opcode = opcode::write::<[i32; 2]>(b'R', 0x03);
/// `_IO('R', 0x07)`: reseed the CRNG from the pool now.
const RNDRESEEDCRNG: Opcode = opcode::none(b'R', 0x07);

/// Mixes `entropy` into the kernel's pool (credited) and reseeds the CRNG, so a restored or
/// forked guest stops producing its parent's random numbers.
pub fn reseed(entropy: &[u8]) -> std::io::Result<()> {
    if entropy.is_empty() || entropy.len() > 4096 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "entropy must be 1..=4096 bytes"));
    }
    let dev = std::fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + entropy.len());
    info.extend_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
    info.extend_from_slice(entropy);
    info.resize(8 + entropy.len().div_ceil(4) * 4, 0);
    // SAFETY: the pointer is the ioctl's argument; the buffer holds a rand_pool_info with
    // buf_size bytes after its header, and the kernel only reads it.
    unsafe { ioctl(&dev, IntegerSetter::<RNDADDENTROPY>::new_pointer(info.as_mut_ptr().cast())) }?;
    // SAFETY: an argument-less ioctl.
    unsafe { ioctl(&dev, NoArg::<RNDRESEEDCRNG>::new()) }?;
    Ok(())
}

/// Sets the wall clock to `unix_ms` if it is more than a second off; returns whether it did.
pub fn correct_clock(unix_ms: u64) -> std::io::Result<bool> {
    if unix_ms == 0 || sysutil::clock::now_ms().abs_diff(unix_ms) <= 1000 {
        return Ok(false);
    }
    let ts = rustix::time::Timespec { tv_sec: (unix_ms / 1000) as _, tv_nsec: ((unix_ms % 1000) * 1_000_000) as _ };
    rustix::time::clock_settime(rustix::time::ClockId::Realtime, ts)?;
    Ok(true)
}

/// Sets the hostname (and /etc/hostname when it exists, so the image agrees).
pub fn set_hostname(name: &str) -> std::io::Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-');
    if !valid {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("bad hostname {name:?}")));
    }
    rustix::system::sethostname(name.as_bytes())?;
    Ok(())
}

/// `uname -r`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// A hash of the kernel's boot id: changes on every boot of the guest.
pub fn boot_id_hash() -> u64 {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    // FNV-1a: stable and dependency-free; this is an identity, not a secret.
    id.trim().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// Milliseconds since the guest booted.
pub fn uptime_ms() -> u64 {
    let text = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    text.split_whitespace().next().and_then(|s| s.parse::<f64>().ok()).map(|s| (s * 1000.0) as u64).unwrap_or(0)
}

/// Flushes file systems and powers off (or reboots). Only returns on failure.
pub fn power_off(reboot: bool) -> std::io::Error {
    use rustix::system::RebootCommand;
    rustix::fs::sync();
    match rustix::system::reboot(if reboot { RebootCommand::Restart } else { RebootCommand::PowerOff }) {
        Err(e) => e.into(),
        // Both commands end the guest when they succeed.
        Ok(()) => std::io::Error::other("reboot returned"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The opcodes built with `rustix::ioctl::opcode` are the kernel's (as in its headers on
    /// the 64-bit guests).
    #[test]
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn ioctl_opcodes_match_the_kernel_headers() {
        assert_eq!(EXT4_IOC_RESIZE_FS, 0x4008_6610);
        assert_eq!(BLKGETSIZE64, 0x8008_1272);
        assert_eq!(RNDADDENTROPY, 0x4008_5203);
        assert_eq!(RNDRESEEDCRNG, 0x5207);
        assert_eq!(SIOCGIFFLAGS, 0x8913);
        assert_eq!(SIOCSIFFLAGS, 0x8914);
    }
}

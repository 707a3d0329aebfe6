//! The guest as a system: PID 1 duties (pseudo file systems, loopback), identity (hostname,
//! clock) and power.

use std::ffi::CString;

/// Mounts the pseudo file systems a userland expects, when the agent is PID 1. The initramfs
/// hands over a root with `/run` already mounted (it holds the agent itself).
pub fn init_mounts() {
    let mounts: &[(&str, &str, &str, libc::c_ulong, &str)] = &[
        ("proc", "/proc", "proc", libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, ""),
        ("sysfs", "/sys", "sysfs", libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, ""),
        ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755"),
        ("devpts", "/dev/pts", "devpts", libc::MS_NOSUID | libc::MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666"),
        ("tmpfs", "/dev/shm", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, "mode=1777"),
    ];
    for (src, target, fstype, flags, data) in mounts {
        let _ = std::fs::create_dir_all(target);
        if let Err(e) = mount(src, target, fstype, *flags, data)
            && e.raw_os_error() != Some(libc::EBUSY)
        {
            tracing::warn!(target, error = %e, "mount failed");
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
    // SAFETY: chmod on a NUL-terminated literal.
    unsafe { libc::chmod(c"/tmp".as_ptr(), 0o1777) };
    if let Err(e) = loopback_up() {
        tracing::warn!(error = %e, "could not bring up lo");
    }
}

fn mount(src: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) -> std::io::Result<()> {
    let c = |s: &str| CString::new(s).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput));
    let (src, target, fstype, data) = (c(src)?, c(target)?, c(fstype)?, c(data)?);
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let r = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, data.as_ptr().cast()) };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Sets IFF_UP on `lo`: ingress reaches guest servers on 127.0.0.1.
fn loopback_up() -> std::io::Result<()> {
    // SAFETY: a socket used only for the two ioctls below, closed at the end; ifreq is
    // zero-initialised and its name is NUL-terminated.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        let mut r = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req);
        if r == 0 {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            r = libc::ioctl(fd, libc::SIOCSIFFLAGS, &req);
        }
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if r == 0 { Ok(()) } else { Err(err) }
    }
}

/// `_IOW('f', 16, __u64)`: grow a mounted ext4 file system to a new block count.
const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;
/// `_IOR(0x12, 114, size_t)`: a block device's size in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Grows the root file system (ext4) online to fill its disk: images are built small and
/// every sailbox's disk is as large as it asked for. A no-op when it already fills it.
pub fn grow_root_fs() -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
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
    let mut dev_bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 into the pointer.
    if unsafe { libc::ioctl(disk.as_raw_fd(), BLKGETSIZE64, &mut dev_bytes) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs fills the struct; the path is a NUL-terminated literal.
    if unsafe { libc::statvfs(c"/".as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let block = st.f_frsize.max(1);
    let want = dev_bytes / block;
    if want <= st.f_blocks + 1 {
        return Ok(());
    }
    let root = std::fs::File::open("/")?;
    // SAFETY: the ioctl reads one u64 from the pointer.
    if unsafe { libc::ioctl(root.as_raw_fd(), EXT4_IOC_RESIZE_FS, &want) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    tracing::info!(device = %dev, blocks = want, "grew the root file system");
    Ok(())
}

/// `_IOW('R', 0x03, int[2])`: add entropy to the pool, crediting it.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG from the pool now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Mixes `entropy` into the kernel's pool (credited) and reseeds the CRNG, so a restored or
/// forked guest stops producing its parent's random numbers.
pub fn reseed(entropy: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
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
    // SAFETY: the buffer holds a rand_pool_info with buf_size bytes after its header.
    if unsafe { libc::ioctl(dev.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: an argument-less ioctl.
    if unsafe { libc::ioctl(dev.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the wall clock to `unix_ms` if it is more than a second off; returns whether it did.
pub fn correct_clock(unix_ms: u64) -> std::io::Result<bool> {
    if unix_ms == 0 || sysutil::clock::now_ms().abs_diff(unix_ms) <= 1000 {
        return Ok(false);
    }
    let ts = libc::timespec { tv_sec: (unix_ms / 1000) as libc::time_t, tv_nsec: ((unix_ms % 1000) * 1_000_000) as _ };
    // SAFETY: valid timespec pointer.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
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
    // SAFETY: pointer and length describe `name`.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
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
    // SAFETY: sync and reboot take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(if reboot { libc::RB_AUTOBOOT } else { libc::RB_POWER_OFF });
    }
    std::io::Error::last_os_error()
}

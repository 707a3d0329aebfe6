//! A sailbox's root disk: a qcow2 copy-on-write layer over the image's assembled raw file.
//! The image is never copied: the layer starts empty (a few hundred KiB of qcow2 metadata)
//! and holds only the clusters the guest writes. Both QEMU and Cloud Hypervisor open qcow2
//! files with a raw backing file.

use std::path::Path;

use crate::error::{Result, SailboxError};

/// Creates `layer` (qcow2, `size_gib` GiB virtual) over the read-only raw `base`.
pub async fn create_layer(base: &Path, layer: &Path, size_gib: u32) -> Result<()> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(layer)
        .arg(format!("{size_gib}G"))
        .output()
        .await
        .map_err(|e| SailboxError::host("running qemu-img (apt-get install qemu-utils)", e))?;
    if !out.status.success() {
        return Err(SailboxError::Creation(format!(
            "qemu-img create failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

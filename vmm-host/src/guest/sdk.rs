//! The in-guest part of the Python SDK (`sdk/python/sail` without its generated gRPC stubs:
//! `Volume.from_mount(p).commit()`, `.reload()` and the error classes work with the standard
//! library only; the gRPC half imports grpcio on first use), carried in every initramfs and
//! installed at `/run/sail/python/sail` by the init, where the agent's `PYTHONPATH` finds it:
//! `import sail` works in any image with a python3 (3.9+), with nothing installed in the image,
//! and a new SDK reaches running sailboxes the way a new agent does (a new initramfs).

/// Where the package lives in the initramfs (the init copies it to `/run/sail/python`).
pub const DIR: &str = "sail-python";

/// The package's files: path under [`DIR`], contents.
pub const FILES: &[(&str, &str)] = &[
    ("sail/__init__.py", include_str!("../../../sdk/python/sail/__init__.py")),
    ("sail/errors.py", include_str!("../../../sdk/python/sail/errors.py")),
    ("sail/_client.py", include_str!("../../../sdk/python/sail/_client.py")),
    ("sail/functions.py", include_str!("../../../sdk/python/sail/functions.py")),
    ("sail/image.py", include_str!("../../../sdk/python/sail/image.py")),
    ("sail/sailbox.py", include_str!("../../../sdk/python/sail/sailbox.py")),
    ("sail/volume.py", include_str!("../../../sdk/python/sail/volume.py")),
];

#[cfg(test)]
mod tests {
    /// `import sail` in a guest imports every module of the package (`__init__` names them
    /// all), so each one must be carried; the generated gRPC stubs (`sail/_pb`) are not.
    #[test]
    fn every_module_of_the_package_is_carried() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk/python/sail");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                name.ends_with(".py").then(|| format!("sail/{name}"))
            })
            .collect();
        on_disk.sort();
        let mut carried: Vec<String> = super::FILES.iter().map(|(p, _)| (*p).to_owned()).collect();
        carried.sort();
        assert_eq!(on_disk, carried);
    }
}

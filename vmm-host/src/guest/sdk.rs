//! The in-guest part of the Python SDK (`sdk/python/sail`: `Volume.from_mount(p).commit()`,
//! `.reload()` and the error classes; standard library only), carried in every initramfs and
//! installed at `/run/sail/python/sail` by the init, where the agent's `PYTHONPATH` finds it:
//! `import sail` works in any image with a python3 (3.9+), with nothing installed in the image,
//! and a new SDK reaches running sailboxes the way a new agent does (a new initramfs).

/// Where the package lives in the initramfs (the init copies it to `/run/sail/python`).
pub const DIR: &str = "sail-python";

/// The package's files: path under [`DIR`], contents.
pub const FILES: &[(&str, &str)] = &[
    ("sail/__init__.py", include_str!("../../../sdk/python/sail/__init__.py")),
    ("sail/errors.py", include_str!("../../../sdk/python/sail/errors.py")),
    ("sail/volume.py", include_str!("../../../sdk/python/sail/volume.py")),
];

//! guest-fuse: the FUSE helper that mounts a volume lazily inside a guest or on a Linux host.
//!
//! Not built yet: issue 4 ("Lazy FUSE volumes") fills this crate. It will depend on
//! `volumed`'s client and on `chunkstore`'s verified cache; see docs/guest-fuse.md.

//! vmm-host: the host service that runs sailboxes on a real VMM.
//!
//! Not built yet: issues 5 and 6 fill this crate. It will depend on `chunkstore` for disk and
//! memory snapshots; see docs/vmm-host.md.

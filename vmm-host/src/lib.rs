//! vmm-host: the host service that runs sailboxes on a real VMM.
//!
//! - [`host::Host`]: the sailboxes of one machine: create, exec, files, listeners,
//!   terminate, and recovery after a restart; state in RocksDB ([`store`]).
//! - [`hypervisor`]: the `Hypervisor` trait and its QEMU backend (KVM where it works, TCG
//!   otherwise: [`accel`]); guests are reached over a virtio-serial port or hybrid vsock
//!   ([`link`]).
//! - [`guest`]: the kernel kit and the initramfs that carries `sail-agent`; [`image`]: base
//!   images stored as chunks; [`vmfiles`]: memory and disk as cowfs files (forks map their
//!   checkpoint's memory privately, shared with the other forks of it).
//! - [`gateway`]: how guests reach their volumes (scoped to the sailbox's mounts) and the
//!   host's verified chunk cache every sailbox reads through; [`host_nic`]: the private
//!   network namespace per sailbox the guest reaches it through.
//! - [`service`]: the `sail.sailbox.v1` gRPC service.
//!
//! See docs/vmm-host.md for the layout on disk, the guest protocol and the tests.
#![warn(missing_docs)]

pub mod accel;
pub mod agent_client;
pub mod error;
mod exec;
mod files;
mod forkmem;
pub mod gateway;
pub mod guest;
pub mod guest_input;
pub mod host;
pub mod host_nic;
pub mod hypervisor;
pub mod image;
mod ingress;
mod lifecycle;
pub mod link;
pub mod model;
pub mod procs;
mod recover;
mod runtime;
pub mod seal;
pub mod service;
mod snapshot;
pub mod store;
pub mod vmfiles;

pub use error::{Result, SailboxError};
pub use host::{Host, HostConfig};
pub use service::GrpcSailboxes;

//! Volume metadata: the RocksDB store, the merge that applies commits, and tree reads.

pub mod apply;
pub mod read;
#[cfg(feature = "server")]
pub mod store;
pub mod volume;

pub use apply::{Applied, TreeSource, apply_changes};
#[cfg(feature = "server")]
pub use store::MetaStore;
pub use volume::{VolumeRecord, check_volume_name};

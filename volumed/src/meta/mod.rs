//! Volume metadata: the RocksDB store, the merge that applies commits, and tree reads.

pub mod apply;
pub mod read;
pub mod store;
pub mod volume;

pub use apply::{Applied, TreeSource, apply_changes};
pub use store::MetaStore;
pub use volume::VolumeRecord;

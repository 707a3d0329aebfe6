//! In-memory byte caches weighed by length (quick_cache), shared by the readers that keep
//! chunks or pieces in memory: the FUSE helper, vmm-host's volume gateway, cowfs.
//!
//! Loads through `get_value_or_guard` are single-flight: concurrent readers of one key share
//! one fetch, and retry it themselves if it failed.

use bytes::Bytes;
use quick_cache::sync::Cache;
use quick_cache::{OptionsBuilder, Weighter};

/// Weighs a cached item by its length (an empty one weighs 1: quick_cache never evicts
/// weightless entries).
#[derive(Clone, Copy, Debug, Default)]
pub struct ByLength;

impl<K> Weighter<K, Bytes> for ByLength {
    fn weight(&self, _key: &K, bytes: &Bytes) -> u64 {
        (bytes.len() as u64).max(1)
    }
}

/// Recently used byte strings (chunks or pieces), capped by bytes.
pub type ByteCache<K> = Cache<K, Bytes, ByLength>;

/// A byte cache of `cap` bytes whose items are about `typical` bytes, in ONE shard.
///
/// quick_cache splits its capacity between shards (several by default), and an item heavier
/// than its shard's part is never kept: a 64 MiB chunk in a 256 MiB cache of 8 shards was
/// evicted as soon as it was inserted, so every 1 MiB range read of it went back to disk and
/// re-read (and re-verified) the whole chunk (measured in vmm-host's gateway: 1 GiB read at
/// 6 MiB/s, 175 CPU-seconds on the host). With one shard an item may take (nearly) the whole
/// bound; the readers using this hold few, large items, so one lock is no loss.
pub fn byte_cache<K: Eq + std::hash::Hash + Clone>(cap: u64, typical: u64) -> ByteCache<K> {
    let items = usize::try_from(cap / typical.max(1)).unwrap_or(usize::MAX).max(1);
    let built = OptionsBuilder::new().shards(1).estimated_items_capacity(items).weight_capacity(cap).build();
    match built {
        Ok(options) => Cache::with_options(options, ByLength, Default::default(), Default::default()),
        // Only an unset capacity fails to build; both are set above.
        Err(_) => Cache::with_weighter(items, cap, ByLength),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_item_of_most_of_the_capacity_is_kept() {
        let cache: ByteCache<u32> = byte_cache(256 << 20, 64 << 20);
        for i in 0..3 {
            cache.insert(i, Bytes::from(vec![0u8; 64 << 20]));
        }
        assert!((0..3).all(|i| cache.contains_key(&i)), "three 64 MiB items fit in 256 MiB");
    }
}

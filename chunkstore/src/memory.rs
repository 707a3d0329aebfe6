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

/// Receive buffers for chunk bodies, reused instead of freed.
///
/// Why: a buffer freshly obtained from the kernel is zeroed page by page on first touch, and
/// glibc returns multi-MiB blocks to the kernel when they are freed, so every chunk received
/// into new memory paid for its pages again. Inside a sailbox under TCG that was a third of
/// the FUSE helper's CPU on a cold read (perf: `clear_page_erms` under
/// `do_huge_pmd_anonymous_page`, 33% of its samples; 2026-12-07, docs/benchmarks.md). A
/// buffer taken from the pool is already faulted in; a [`Bytes`] made by
/// [`PooledBuf::freeze`] hands it back when its last clone is dropped (a chunk evicted from a
/// memory cache, a piece served).
///
/// Bounded: the pool keeps at most `max_free` bytes of idle buffers (the rest are freed),
/// hands out buffers of at least [`BufferPool::MIN_POOLED`] bytes only (smaller bodies are
/// cheap to allocate), and never gives a buffer more than twice the size asked for.
pub struct BufferPool {
    free: parking_lot::Mutex<Vec<Vec<u8>>>,
    max_free: usize,
}

impl std::fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let free = self.free.lock();
        f.debug_struct("BufferPool")
            .field("idle_buffers", &free.len())
            .field("idle_bytes", &free.iter().map(Vec::capacity).sum::<usize>())
            .field("max_free", &self.max_free)
            .finish()
    }
}

impl BufferPool {
    /// Bodies smaller than this get a plain allocation.
    pub const MIN_POOLED: usize = 256 << 10;

    /// A pool keeping at most `max_free` bytes of idle buffers.
    pub fn new(max_free: usize) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self { free: parking_lot::Mutex::new(Vec::new()), max_free })
    }

    /// An empty buffer with room for `len` bytes: an idle one of the pool when one fits
    /// (the smallest that holds `len`, at most twice it), else a new one.
    pub fn take(self: &std::sync::Arc<Self>, len: usize) -> PooledBuf {
        let reused = if len >= Self::MIN_POOLED {
            let mut free = self.free.lock();
            let best = free
                .iter()
                .enumerate()
                .filter(|(_, v)| v.capacity() >= len && v.capacity() / 2 <= len)
                .min_by_key(|(_, v)| v.capacity())
                .map(|(i, _)| i);
            best.map(|i| free.swap_remove(i))
        } else {
            None
        };
        let pool = (len >= Self::MIN_POOLED).then(|| self.clone());
        PooledBuf { vec: reused.unwrap_or_else(|| Vec::with_capacity(len)), pool }
    }

    /// Idle bytes held.
    pub fn idle_bytes(&self) -> usize {
        self.free.lock().iter().map(Vec::capacity).sum()
    }

    fn give(&self, mut v: Vec<u8>) {
        v.clear();
        let mut free = self.free.lock();
        let held: usize = free.iter().map(Vec::capacity).sum();
        if held + v.capacity() <= self.max_free {
            free.push(v);
        }
    }
}

/// A buffer from a [`BufferPool`] being filled; [`PooledBuf::freeze`] makes it [`Bytes`].
pub struct PooledBuf {
    vec: Vec<u8>,
    pool: Option<std::sync::Arc<BufferPool>>,
}

impl PooledBuf {
    /// Appends bytes (growing past the room asked for if need be).
    pub fn extend_from_slice(&mut self, data: &[u8]) {
        self.vec.extend_from_slice(data);
    }

    /// Bytes held so far.
    pub fn len(&self) -> usize {
        self.vec.len()
    }

    /// Whether nothing was appended.
    pub fn is_empty(&self) -> bool {
        self.vec.is_empty()
    }

    /// The bytes, as [`Bytes`] that give the buffer back to its pool once the last clone
    /// (or slice) of them is dropped.
    pub fn freeze(self) -> Bytes {
        if self.pool.is_none() {
            let mut this = self;
            return Bytes::from(std::mem::take(&mut this.vec));
        }
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.vec
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.give(std::mem::take(&mut self.vec));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_buffers_come_back_when_their_bytes_are_dropped() {
        let pool = BufferPool::new(64 << 20);
        let mut b = pool.take(8 << 20);
        b.extend_from_slice(&[7u8; 8 << 20]);
        let bytes = b.freeze();
        let slice = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(pool.idle_bytes(), 0, "a slice still holds the buffer");
        assert_eq!(&slice[..], &[7u8; 10]);
        drop(slice);
        assert!(pool.idle_bytes() >= 8 << 20);
        // Reused for a body of about the same size, not for a much smaller one.
        let small = pool.take(1 << 20);
        assert!(small.vec.capacity() < 8 << 20);
        drop(small);
        let again = pool.take(6 << 20);
        assert!(again.vec.capacity() >= 8 << 20 && again.is_empty());
    }

    #[test]
    fn the_pool_keeps_at_most_its_bound_and_small_bodies_skip_it() {
        let pool = BufferPool::new(10 << 20);
        let bufs: Vec<Bytes> = (0..3)
            .map(|_| {
                let mut b = pool.take(4 << 20);
                b.extend_from_slice(&[1u8; 4 << 20]);
                b.freeze()
            })
            .collect();
        drop(bufs);
        assert!(pool.idle_bytes() <= 10 << 20);
        let mut tiny = pool.take(100);
        tiny.extend_from_slice(b"abc");
        assert_eq!(&tiny.freeze()[..], b"abc");
    }

    #[test]
    fn an_item_of_most_of_the_capacity_is_kept() {
        let cache: ByteCache<u32> = byte_cache(256 << 20, 64 << 20);
        for i in 0..3 {
            cache.insert(i, Bytes::from(vec![0u8; 64 << 20]));
        }
        assert!((0..3).all(|i| cache.contains_key(&i)), "three 64 MiB items fit in 256 MiB");
    }
}

//! Commit, reload and status of a mount.
//!
//! Commit sends only what changed since the base commit: delete markers for paths that went
//! away, and upserts for dirty entries. A dirty file is re-chunked only where it changed: with
//! fixed chunking, a chunk whose bytes were not touched (and whose length is unchanged) keeps
//! its id without being read or hashed; the chunks that were touched are hashed, and only
//! those the store lacks are uploaded, in batches, straight to their signed URLs.
//!
//! Files open for writing are committed as they are when commit reads them. A write that
//! races a commit leaves the file dirty, so the next commit picks it up.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use chunkstore::{ChunkId, ChunkPolicy, Chunking};
use fuser::INodeNo;
use proto::volume as pb;
use serde::{Deserialize, Serialize};
use volume_model::convert::entry_to_proto;
use volume_model::{Entry, EntryKind, FileData, TreeId};

use crate::error::Result;
use crate::file_io::{FileView, ViewReader};
use crate::mount::MountCore;
use crate::ranges::RangeSet;
use crate::remote::Remote;
use crate::tree::{DirState, Kind, ROOT, State};
use sysutil::clock::now_ns;

/// Chunk bytes held in memory before they are uploaded.
const UPLOAD_BATCH_BYTES: usize = 128 << 20;

/// What a commit did.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CommitOutcome {
    /// The new commit id (the base commit when there was nothing to commit).
    pub commit: String,
    /// Its sequence number (0 when nothing was committed).
    pub seq: u64,
    /// True when the head had moved and the changes were merged onto it.
    pub merged: bool,
    /// Entries upserted.
    pub upserts: usize,
    /// Delete markers sent.
    pub deletes: usize,
    /// Chunks hashed (those of changed file regions).
    pub chunks_hashed: usize,
    /// Chunks uploaded (hashed chunks the store lacked).
    pub chunks_uploaded: usize,
    /// Bytes uploaded.
    pub bytes_uploaded: u64,
    /// Chunks of those sent in batch uploads (many small chunks per signed request).
    #[serde(default)]
    pub chunks_batched: usize,
    /// Batch upload requests sent.
    #[serde(default)]
    pub batches: usize,
    /// Milliseconds spent collecting changes, reading and hashing changed chunks.
    #[serde(default)]
    pub hash_ms: f64,
    /// Milliseconds spent asking which chunks are missing and uploading them.
    #[serde(default)]
    pub upload_ms: f64,
    /// Milliseconds of the Commit call (volumed's merge and synced publish).
    #[serde(default)]
    pub publish_ms: f64,
    /// Wall time in milliseconds.
    pub elapsed_ms: f64,
}

/// What a reload did.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ReloadOutcome {
    /// The commit the mount now shows.
    pub commit: String,
    /// The commit it showed before.
    pub previous: String,
    /// Local changes (entries and delete markers) that were discarded.
    pub discarded: usize,
    /// Wall time in milliseconds.
    pub elapsed_ms: f64,
}

/// A mount's state, for `sail volume status` and the SDK.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MountStatus {
    /// Mount point.
    pub mountpoint: String,
    /// volumed endpoint.
    pub endpoint: String,
    /// Org of the volume.
    pub org: String,
    /// Volume name.
    pub volume: String,
    /// The commit the view is based on.
    pub head: String,
    /// Entries with local changes.
    pub dirty_entries: usize,
    /// Regular files with local changes.
    pub dirty_files: usize,
    /// Bytes changed in those files.
    pub dirty_bytes: u64,
    /// Delete markers the next commit sends.
    pub pending_deletes: usize,
    /// Chunk reads served from memory.
    pub memory_hits: u64,
    /// Chunk reads that went to the disk cache or the network.
    pub memory_misses: u64,
    /// Chunks fetched ahead of readers.
    pub prefetched: u64,
    /// Pieces of large chunks fetched with verified range requests.
    pub pieces_fetched: u64,
    /// First reads of a chunk served by a range of their own (trusted endpoints).
    #[serde(default)]
    pub first_reads: u64,
    /// Disk cache hits (this process).
    pub cache_hits: u64,
    /// Disk cache misses (this process).
    pub cache_misses: u64,
    /// Bytes in the shared disk cache.
    pub cache_bytes: u64,
    /// Its capacity.
    pub cache_capacity: u64,
    /// New opens may use FUSE passthrough (on by default; off with `--no-passthrough`, or
    /// when the kernel or the permissions do not allow it).
    #[serde(default)]
    pub passthrough: bool,
    /// Opens whose reads the kernel served from an assembled local file (passthrough).
    #[serde(default)]
    pub passthrough_opens: u64,
    /// Opens of a file in passthrough mode that this process served (`FOPEN_DIRECT_IO`:
    /// writers, and readers of a file changed since its passthrough handles were opened).
    #[serde(default)]
    pub passthrough_direct_opens: u64,
    /// Opens that fell back to the plain path because the kernel refused a backing file.
    #[serde(default)]
    pub passthrough_fallbacks: u64,
    /// Inodes with a passthrough handle open now (the kernel accepts only passthrough opens
    /// of them; it releases handles asynchronously, a moment after `close` returns).
    #[serde(default)]
    pub passthrough_inodes: usize,
    /// Files assembled from cached chunks for passthrough (now held).
    #[serde(default)]
    pub assembled_files: usize,
    /// Their bytes (capped by the cache capacity).
    #[serde(default)]
    pub assembled_bytes: u64,
    /// Files being assembled right now.
    #[serde(default)]
    pub assembling: usize,
    /// Helper process id.
    pub pid: u32,
}

/// One entry to upsert.
enum Item {
    /// A local node (file, directory or symlink) at `version`.
    Node { ino: u64, version: u64, mode: u32, mtime_ns: i64, body: Body },
    /// An entry of a renamed directory that was never loaded: sent as it is.
    Remote(Entry),
}

enum Body {
    File { view: FileView, changed: RangeSet },
    Dir,
    Symlink(String),
}

/// Chunks waiting to be uploaded.
struct Uploader<'a> {
    remote: &'a Remote,
    pending: HashMap<ChunkId, Bytes>,
    pieces: HashMap<ChunkId, Vec<u8>>,
    pending_bytes: usize,
    out: CommitOutcome,
}

impl Uploader<'_> {
    /// Hashes a new chunk (through its piece CVs when it is large enough to be read in
    /// pieces: the same work, and readers can then verify ranges) and queues it.
    fn hash_and_add(&mut self, data: Bytes) -> Result<ChunkId> {
        let len = data.len() as u64;
        let id = if len >= chunkstore::pieces::PIECED_MIN {
            let cvs = chunkstore::pieces::piece_cvs(&data);
            let id = chunkstore::pieces::root_from_cvs(len, &cvs).unwrap_or_else(|| ChunkId::of(&data));
            self.pieces.insert(id, cvs);
            id
        } else {
            ChunkId::of(&data)
        };
        self.add(id, data)?;
        Ok(id)
    }

    fn add(&mut self, id: ChunkId, data: Bytes) -> Result<()> {
        self.out.chunks_hashed += 1;
        self.pending_bytes += data.len();
        self.pending.insert(id, data);
        if self.pending_bytes >= UPLOAD_BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if !self.pending.is_empty() {
            let started = Instant::now();
            let stats = self.remote.upload(&self.pending, &self.pieces)?;
            self.out.upload_ms += started.elapsed().as_secs_f64() * 1e3;
            self.out.chunks_uploaded += stats.chunks_uploaded;
            self.out.bytes_uploaded += stats.bytes_uploaded;
            self.out.chunks_batched += stats.chunks_batched;
            self.out.batches += stats.batches;
            self.pending.clear();
            self.pieces.clear();
            self.pending_bytes = 0;
        }
        Ok(())
    }
}

impl MountCore {
    /// Commits the local changes; see the module docs.
    pub fn commit(&self) -> Result<CommitOutcome> {
        let _sync = self.sync_lock.lock();
        let started = Instant::now();
        // What is about to be sent is on disk first: a crash mid-commit keeps it.
        if let Err(e) = self.save_state(true) {
            tracing::warn!(error = %e, "saving the overlay state before the commit failed");
        }
        let (base, mut items, remote_dirs, deletes) = {
            let mut st = self.lock();
            let (items, remote_dirs) = plan(&st);
            (st.base.clone(), items, remote_dirs, std::mem::take(&mut st.deleted))
        };
        let result = self.send(&base, &mut items, remote_dirs, &deletes);
        let mut st = self.lock();
        match result {
            Ok((resp, mut out, new_data)) => {
                if let Some(resp) = resp {
                    finish(&mut st, &items, new_data, &resp.commit);
                    st.behind |= resp.merged;
                    st.base_root = None;
                    st.changes += 1;
                    out.commit = resp.commit;
                    out.seq = resp.seq;
                    out.merged = resp.merged;
                    drop(st);
                    self.learn_root(&out.commit, Some(out.seq));
                    if let Err(e) = self.save_state(true) {
                        tracing::warn!(error = %e, "saving the overlay state after the commit failed");
                    }
                } else {
                    out.commit = st.base.clone();
                    drop(st);
                }
                out.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
                tracing::info!(
                    commit = %out.commit, upserts = out.upserts, deletes = out.deletes, bytes = out.bytes_uploaded,
                    chunks = out.chunks_uploaded, batched = out.chunks_batched, hash_ms = out.hash_ms,
                    upload_ms = out.upload_ms, publish_ms = out.publish_ms, "committed"
                );
                Ok(out)
            }
            Err(e) => {
                st.deleted.extend(deletes);
                Err(e)
            }
        }
    }

    /// Chunks, uploads and publishes. Returns the commit (None when nothing changed).
    #[allow(clippy::type_complexity)]
    fn send(
        &self,
        base: &str,
        items: &mut BTreeMap<String, Item>,
        remote_dirs: Vec<(String, TreeId)>,
        deletes: &BTreeSet<String>,
    ) -> Result<(Option<pb::CommitResponse>, CommitOutcome, HashMap<u64, Arc<FileData>>)> {
        let started = Instant::now();
        for (path, tree) in remote_dirs {
            self.expand_remote(&path, tree, items)?;
        }
        let mut changes: Vec<pb::Change> =
            deletes.iter().map(|p| pb::Change { path: p.clone(), op: Some(pb::change::Op::Delete(true)) }).collect();
        let mut up = Uploader {
            remote: &self.remote,
            pending: HashMap::new(),
            pieces: HashMap::new(),
            pending_bytes: 0,
            out: CommitOutcome::default(),
        };
        up.out.deletes = deletes.len();
        let chunking = if items.values().any(|i| matches!(i, Item::Node { body: Body::File { .. }, .. })) {
            self.remote.chunking()?
        } else {
            Chunking::Fixed
        };
        let mut new_data = HashMap::new();
        for (path, item) in items.iter() {
            let entry = match item {
                Item::Remote(e) => entry_to_proto(e),
                Item::Node { ino, mode, mtime_ns, body, .. } => {
                    let kind = match body {
                        Body::File { view, changed } => {
                            let data = Arc::new(file_data(&self.remote, view, changed, chunking, &mut up)?);
                            let kind =
                                entry_to_proto(&Entry { mode: 0, mtime_ns: 0, kind: EntryKind::File((*data).clone()) }).kind;
                            new_data.insert(*ino, data);
                            kind
                        }
                        Body::Dir => Some(pb::entry::Kind::Dir(pb::DirEntry { tree: Vec::new() })),
                        Body::Symlink(t) => Some(pb::entry::Kind::Symlink(pb::SymlinkEntry { target: t.clone() })),
                    };
                    pb::Entry { mode: *mode, mtime_ns: *mtime_ns, kind }
                }
            };
            changes.push(pb::Change { path: path.clone(), op: Some(pb::change::Op::Upsert(entry)) });
        }
        up.flush()?;
        up.out.upserts = items.len();
        for c in &changes {
            let op = if matches!(c.op, Some(pb::change::Op::Delete(_))) { "delete" } else { "upsert" };
            tracing::debug!(path = %c.path, op, "change");
        }
        up.out.hash_ms = started.elapsed().as_secs_f64() * 1e3 - up.out.upload_ms;
        if changes.is_empty() {
            return Ok((None, up.out, new_data));
        }
        let publish = Instant::now();
        let resp = self.remote.commit(base, changes)?;
        up.out.publish_ms = publish.elapsed().as_secs_f64() * 1e3;
        Ok((Some(resp), up.out, new_data))
    }

    /// Adds every entry below a renamed directory that was never loaded locally.
    fn expand_remote(&self, path: &str, tree: TreeId, items: &mut BTreeMap<String, Item>) -> Result<()> {
        for (name, entry) in self.remote.tree(&tree)? {
            let child = format!("{path}/{name}");
            if let EntryKind::Dir(t) = entry.kind {
                self.expand_remote(&child, t, items)?;
            }
            items.entry(child).or_insert(Item::Remote(entry));
        }
        Ok(())
    }

    /// Switches the view to the volume's newest commit, discarding local changes.
    pub fn reload(&self) -> Result<ReloadOutcome> {
        let _sync = self.sync_lock.lock();
        let started = Instant::now();
        let (commit, root) = self.remote.head()?;
        let mut st = self.lock();
        let previous = st.base.clone();
        let discarded = st.dirty.len() + st.deleted.len();
        if commit == previous && discarded == 0 && !st.behind {
            return Ok(ReloadOutcome { commit, previous, discarded, elapsed_ms: started.elapsed().as_secs_f64() * 1e3 });
        }
        // The kernel reaches every cached dentry through the root's children: dropping those
        // drops the subtrees below them.
        let top: Vec<String> = match &st.get(ROOT).map(|n| &n.kind) {
            Ok(Kind::Dir(DirState { children: Some(c), .. })) => c.keys().cloned().collect(),
            _ => Vec::new(),
        };
        for (ino, n) in st.nodes.iter_mut() {
            if *ino != ROOT {
                n.attached = false;
            }
        }
        let mem = st.mem.clone();
        st.nodes.retain(|ino, n| {
            let keep = *ino == ROOT || n.lookups > 0 || n.opens > 0;
            if !keep {
                crate::tree::release_overlay(&mem, n);
            }
            keep
        });
        if let Some(root_node) = st.nodes.get_mut(&ROOT) {
            root_node.kind = Kind::Dir(DirState { tree: Some(root), children: None, moved: false });
            root_node.mtime_ns = now_ns();
            root_node.touch();
        }
        st.base = commit.clone();
        st.base_root = Some(root);
        st.dirty.clear();
        st.deleted.clear();
        st.behind = false;
        st.changes += 1;
        drop(st);
        if let Err(e) = self.save_state(true) {
            tracing::warn!(error = %e, "saving the overlay state after the reload failed");
        }
        if let Some(n) = self.notifier.get() {
            for name in top {
                let _ = n.inval_entry(INodeNo(ROOT), std::ffi::OsStr::new(&name));
            }
            let _ = n.inval_inode(INodeNo(ROOT), 0, 0);
        }
        tracing::info!(%commit, %previous, discarded, "reloaded");
        Ok(ReloadOutcome { commit, previous, discarded, elapsed_ms: started.elapsed().as_secs_f64() * 1e3 })
    }

    /// Looks up the root tree of `commit` (just made by this mount) for the saved state.
    pub fn learn_root(&self, commit: &str, seq: Option<u64>) {
        match self.remote.commit_root(commit, seq) {
            Ok(Some(root)) => {
                let mut st = self.lock();
                if st.base == commit {
                    st.base_root = Some(root);
                }
            }
            Ok(None) => tracing::warn!(%commit, "commit not found in the log; its root is unknown"),
            Err(e) => tracing::warn!(%commit, error = %e, "looking up the commit's root failed"),
        }
    }

    /// The mount's status.
    pub fn status(&self) -> MountStatus {
        let st = self.lock();
        let (dirty_files, dirty_bytes) = st.dirty_summary();
        let cache = self.remote.cache().map(|c| c.stats()).unwrap_or_default();
        let c = &self.remote.counters;
        let p = &self.passthrough.counters;
        let (assembled_files, assembled_bytes, assembling) = self.passthrough.assembled();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        MountStatus {
            mountpoint: self.mountpoint.display().to_string(),
            endpoint: self.endpoint.clone(),
            org: self.remote.org().to_owned(),
            volume: self.remote.volume().to_owned(),
            head: st.base.clone(),
            dirty_entries: st.dirty.len(),
            dirty_files,
            dirty_bytes,
            pending_deletes: st.deleted.len(),
            memory_hits: load(&c.memory_hits),
            memory_misses: load(&c.memory_misses),
            prefetched: load(&c.prefetched),
            pieces_fetched: load(&c.pieces_fetched),
            first_reads: load(&c.first_reads),
            cache_hits: cache.hits,
            cache_misses: cache.misses,
            cache_bytes: cache.bytes_cached,
            cache_capacity: cache.capacity,
            passthrough: self.passthrough.enabled(),
            passthrough_opens: load(&p.opens),
            passthrough_direct_opens: load(&p.direct_opens),
            passthrough_fallbacks: load(&p.fallbacks),
            passthrough_inodes: self.passthrough.held_inodes(),
            assembled_files,
            assembled_bytes,
            assembling,
            pid: std::process::id(),
        }
    }
}

/// Collects the upserts of the dirty set (with renamed subtrees) under the state lock.
/// Returns them by path, plus the unloaded directories of renamed subtrees.
fn plan(st: &State) -> (BTreeMap<String, Item>, Vec<(String, TreeId)>) {
    let mut items = BTreeMap::new();
    let mut remote_dirs = Vec::new();
    for &ino in &st.dirty {
        if ino == ROOT || !st.nodes.get(&ino).is_some_and(|n| n.attached) {
            continue;
        }
        add_node(st, ino, st.path_of(ino), false, &mut items, &mut remote_dirs);
    }
    (items, remote_dirs)
}

/// Adds `ino`'s upsert; for a renamed directory (`in_moved`: or one inside a renamed
/// directory) every entry below it too, since none of them exists at its new path yet.
fn add_node(
    st: &State,
    ino: u64,
    path: String,
    in_moved: bool,
    items: &mut BTreeMap<String, Item>,
    remote_dirs: &mut Vec<(String, TreeId)>,
) {
    let Some(n) = st.nodes.get(&ino) else { return };
    let body = match &n.kind {
        Kind::File(f) => Body::File { view: FileView::of(f), changed: f.changed.clone() },
        Kind::Symlink(t) => Body::Symlink(t.clone()),
        Kind::Dir(d) => {
            if d.moved || in_moved {
                match (&d.children, d.tree) {
                    (Some(children), _) => {
                        for (name, &child) in children {
                            add_node(st, child, format!("{path}/{name}"), true, items, remote_dirs);
                        }
                    }
                    (None, Some(tree)) => remote_dirs.push((path.clone(), tree)),
                    (None, None) => {}
                }
            }
            Body::Dir
        }
    };
    items.insert(path, Item::Node { ino, version: n.version, mode: n.mode, mtime_ns: n.mtime_ns, body });
}

/// The new content description of a dirty file; see the module docs.
fn file_data(
    remote: &Arc<Remote>,
    view: &FileView,
    changed: &RangeSet,
    chunking: Chunking,
    up: &mut Uploader,
) -> Result<FileData> {
    let size = view.size;
    let policy = chunking.policy_for(size);
    let mut chunks = Vec::new();
    match policy {
        // Fixed chunks are read one at a time, each exactly as long as it is (a small file
        // costs its own size, not a chunk-sized buffer), and reused when untouched.
        ChunkPolicy::Fixed { size: cs } => {
            let base = view.base.as_ref().filter(|b| b.policy == policy);
            let mut start = 0;
            let mut idx = 0usize;
            while start < size {
                let end = (start + cs).min(size);
                let len = end - start;
                match base.and_then(|b| b.chunks.get(idx)) {
                    Some(&(id, l)) if l as u64 == len && !changed.intersects(start, end) => chunks.push((id, l)),
                    _ => {
                        let data = view.read(remote, start, len as usize, false)?;
                        let id = up.hash_and_add(Bytes::from(data))?;
                        chunks.push((id, len as u32));
                    }
                }
                start = end;
                idx += 1;
            }
        }
        ChunkPolicy::FastCdc { .. } => {
            policy.chunk_reader(ViewReader::new(view, remote), |span, data| -> Result<()> {
                chunks.push((span.id, span.len as u32));
                if span.len >= chunkstore::pieces::PIECED_MIN {
                    up.pieces.insert(span.id, chunkstore::pieces::piece_cvs(data));
                }
                up.add(span.id, Bytes::copy_from_slice(data))
            })?;
        }
    }
    let data = FileData { size, policy, chunks };
    data.validate()?;
    Ok(data)
}

/// Marks what was committed as clean. Entries changed while the commit ran stay dirty.
fn finish(st: &mut State, items: &BTreeMap<String, Item>, mut new_data: HashMap<u64, Arc<FileData>>, commit: &str) {
    st.base = commit.to_owned();
    for item in items.values() {
        let Item::Node { ino, version, .. } = item else {
            continue;
        };
        let Some(n) = st.nodes.get_mut(ino) else {
            continue;
        };
        let unchanged = n.version == *version;
        match &mut n.kind {
            Kind::File(f) => {
                if let Some(d) = new_data.remove(ino) {
                    f.base = Some(d);
                }
                if unchanged {
                    f.changed = RangeSet::new();
                } else {
                    f.changed.insert(0, u64::MAX);
                }
            }
            Kind::Dir(d) if unchanged => d.moved = false,
            _ => {}
        }
        if unchanged && n.attached {
            n.committed = true;
            st.dirty.remove(ino);
        }
    }
}

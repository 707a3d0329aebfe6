//! The mount's in-memory view of the volume: an inode table over the commit it is based on,
//! plus local changes. Directories are loaded lazily (a directory's children exist here only
//! after its first lookup or readdir); files point at their committed chunks and, once
//! written, at a sparse overlay file holding the bytes written locally.
//!
//! What commit needs is tracked as changes happen, so a commit costs O(changes):
//! - `dirty`: inodes whose entry must be upserted (new or changed files, new directories,
//!   symlinks, mode or mtime changes, and renamed directories, whose whole subtree is
//!   upserted at its new path);
//! - `deleted`: paths of the base commit that are gone (unlinked, removed, renamed away or
//!   replaced), sent as delete markers.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use fuser::Errno;
use sysutil::clock::now_ns;
use volume_model::{Entry, EntryKind, FileData, TreeId};

use crate::overlay::{MemUsage, Overlay};
use crate::ranges::RangeSet;

/// The root directory's inode number.
pub const ROOT: u64 = 1;

/// A regular file's state.
#[derive(Debug)]
pub struct FileState {
    /// The committed content this file started from (None for a file created locally).
    pub base: Option<Arc<FileData>>,
    /// Current length.
    pub size: u64,
    /// The bytes written here (created on first write or truncate).
    pub overlay: Option<Overlay>,
    /// Byte ranges whose current content is in the overlay (holes there read as zeros).
    pub local: RangeSet,
    /// Byte ranges changed since `base` (commit re-chunks only chunks touching these).
    pub changed: RangeSet,
}

/// A directory's state.
#[derive(Debug)]
pub struct DirState {
    /// The committed tree node, for lazy loading (None for a directory made locally).
    pub tree: Option<TreeId>,
    /// Children by name, once loaded.
    pub children: Option<BTreeMap<String, u64>>,
    /// Renamed here since the base commit: the whole subtree is upserted at commit.
    pub moved: bool,
}

/// What an inode is.
#[derive(Debug)]
pub enum Kind {
    /// A directory.
    Dir(DirState),
    /// A regular file.
    File(FileState),
    /// A symbolic link with its target.
    Symlink(String),
}

/// One inode.
#[derive(Debug)]
pub struct Node {
    /// Parent directory (the root is its own parent).
    pub parent: u64,
    /// Name in the parent.
    pub name: String,
    /// Still reachable from the root (false once unlinked, replaced, or after a reload).
    pub attached: bool,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// Change time, ns since the epoch (local only).
    pub ctime_ns: i64,
    /// Type-specific state.
    pub kind: Kind,
    /// Kernel lookup count (decremented by forget).
    pub lookups: u64,
    /// Open file handles.
    pub opens: u32,
    /// This node exists at its current path in the base commit.
    pub committed: bool,
    /// Bumped on every change; commit compares it to know what changed while it ran.
    pub version: u64,
}

impl Node {
    /// A node for an entry of the base commit.
    pub fn from_entry(parent: u64, name: String, entry: Entry) -> Self {
        let kind = match entry.kind {
            EntryKind::File(data) => Kind::File(FileState {
                size: data.size,
                base: Some(Arc::new(data)),
                overlay: None,
                local: RangeSet::new(),
                changed: RangeSet::new(),
            }),
            EntryKind::Dir(tree) => Kind::Dir(DirState { tree: Some(tree), children: None, moved: false }),
            EntryKind::Symlink(target) => Kind::Symlink(target),
        };
        Node {
            parent,
            name,
            attached: true,
            mode: entry.mode,
            mtime_ns: entry.mtime_ns,
            ctime_ns: entry.mtime_ns,
            kind,
            lookups: 0,
            opens: 0,
            committed: true,
            version: 0,
        }
    }

    /// A node made locally.
    pub fn new_local(parent: u64, name: String, mode: u32, kind: Kind) -> Self {
        let now = now_ns();
        Node {
            parent,
            name,
            attached: true,
            mode: mode & 0o7777,
            mtime_ns: now,
            ctime_ns: now,
            kind,
            lookups: 0,
            opens: 0,
            committed: false,
            version: 1,
        }
    }

    /// True for directories.
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, Kind::Dir(_))
    }

    /// Marks a change (new version, ctime now).
    pub fn touch(&mut self) {
        self.version += 1;
        self.ctime_ns = now_ns();
    }
}

/// A new empty file.
pub fn empty_file() -> Kind {
    Kind::File(FileState { base: None, size: 0, overlay: None, local: RangeSet::new(), changed: RangeSet::new() })
}

/// A new empty directory.
pub fn empty_dir() -> Kind {
    Kind::Dir(DirState { tree: None, children: Some(BTreeMap::new()), moved: false })
}

/// Returns an in-memory overlay's bytes to the budget when its node goes away.
pub fn release_overlay(mem: &MemUsage, node: &Node) {
    if let Kind::File(FileState { overlay: Some(o), .. }) = &node.kind {
        mem.release(o.mem_len());
    }
}

/// The inode table and the pending changes.
#[derive(Debug)]
pub struct State {
    /// Commit the view is based on.
    pub base: String,
    /// Its root tree (None right after a commit, until looked up; see [`crate::persist`]).
    pub base_root: Option<TreeId>,
    /// Every live inode.
    pub nodes: HashMap<u64, Node>,
    /// Next inode number (never reused while the helper runs).
    pub next_ino: u64,
    /// Inodes whose entry must be upserted at commit.
    pub dirty: HashSet<u64>,
    /// Base-commit paths to send delete markers for.
    pub deleted: BTreeSet<String>,
    /// A commit of this mount was merged onto a newer head: `base` holds changes the view
    /// does not show yet, so the next reload must not be skipped.
    pub behind: bool,
    /// Memory held by in-memory overlays.
    pub mem: Arc<MemUsage>,
    /// Bumped by every change the persisted state must follow (see [`crate::persist`]).
    pub changes: u64,
}

impl State {
    /// A view of commit `base` whose root tree is `root`.
    pub fn new(base: String, root: TreeId, root_mode: u32) -> Self {
        let mut nodes = HashMap::new();
        let mut node =
            Node::from_entry(ROOT, String::new(), Entry { mode: root_mode, mtime_ns: now_ns(), kind: EntryKind::Dir(root) });
        node.lookups = 1;
        nodes.insert(ROOT, node);
        State {
            base,
            base_root: Some(root),
            nodes,
            next_ino: ROOT + 1,
            dirty: HashSet::new(),
            deleted: BTreeSet::new(),
            behind: false,
            mem: Arc::default(),
            changes: 0,
        }
    }

    /// The node, or ENOENT.
    pub fn get(&self, ino: u64) -> Result<&Node, Errno> {
        self.nodes.get(&ino).ok_or(Errno::ENOENT)
    }

    /// The node mutably, or ENOENT.
    pub fn get_mut(&mut self, ino: u64) -> Result<&mut Node, Errno> {
        self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    /// The loaded children of a directory; `Ok(None)` when it must be loaded first.
    pub fn children(&self, ino: u64) -> Result<Option<&BTreeMap<String, u64>>, Errno> {
        match &self.get(ino)?.kind {
            Kind::Dir(d) => Ok(d.children.as_ref()),
            _ => Err(Errno::ENOTDIR),
        }
    }

    /// Installs the loaded entries of directory `ino` (no-op if already loaded).
    pub fn install_children(&mut self, ino: u64, tree: TreeId, entries: Vec<(String, Entry)>) {
        let still_wanted = matches!(self.nodes.get(&ino), Some(Node { kind: Kind::Dir(DirState { children: None, tree: Some(t), .. }), .. }) if *t == tree);
        if !still_wanted {
            return;
        }
        let mut children = BTreeMap::new();
        for (name, entry) in entries {
            let child = self.next_ino;
            self.next_ino += 1;
            self.nodes.insert(child, Node::from_entry(ino, name.clone(), entry));
            children.insert(name, child);
        }
        if let Some(Node { kind: Kind::Dir(d), .. }) = self.nodes.get_mut(&ino) {
            d.children = Some(children);
        }
    }

    /// The volume-relative path of an attached node ("" for the root).
    pub fn path_of(&self, ino: u64) -> String {
        let mut parts = Vec::new();
        let mut cur = ino;
        while cur != ROOT {
            let Some(n) = self.nodes.get(&cur) else { break };
            parts.push(n.name.as_str());
            cur = n.parent;
        }
        parts.reverse();
        parts.join("/")
    }

    /// Whether the node's current path holds this node in the base commit.
    pub fn in_base(&self, ino: u64) -> bool {
        let Some(n) = self.nodes.get(&ino) else { return false };
        if !n.committed {
            return false;
        }
        let mut cur = n.parent;
        while cur != ROOT {
            match self.nodes.get(&cur) {
                Some(Node { kind: Kind::Dir(d), parent, .. }) => {
                    if d.moved {
                        return false;
                    }
                    cur = *parent;
                }
                _ => return false,
            }
        }
        true
    }

    /// Adds a local node under a loaded directory; EEXIST if the name is taken.
    pub fn add_child(&mut self, parent: u64, name: &str, node: Node) -> Result<u64, Errno> {
        let children = self.children(parent)?.ok_or(Errno::EIO)?;
        if children.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(ino, node);
        self.link(parent, name, ino);
        self.dirty.insert(ino);
        self.changes += 1;
        Ok(ino)
    }

    fn link(&mut self, parent: u64, name: &str, ino: u64) {
        if let Some(Node { kind: Kind::Dir(d), .. }) = self.nodes.get_mut(&parent)
            && let Some(children) = d.children.as_mut()
        {
            children.insert(name.to_owned(), ino);
        }
        if let Some(p) = self.nodes.get_mut(&parent) {
            p.mtime_ns = now_ns();
            p.touch();
        }
    }

    /// Detaches `ino` from its parent, recording a delete marker if its path is in the base.
    /// The node itself lives on while the kernel or open handles reference it.
    pub fn detach(&mut self, ino: u64) {
        if self.in_base(ino) {
            let path = self.path_of(ino);
            self.deleted.insert(path);
        }
        self.changes += 1;
        let Some(n) = self.nodes.get_mut(&ino) else { return };
        n.attached = false;
        let (parent, name) = (n.parent, n.name.clone());
        self.dirty.remove(&ino);
        if let Some(Node { kind: Kind::Dir(d), .. }) = self.nodes.get_mut(&parent)
            && let Some(children) = d.children.as_mut()
            && children.get(&name) == Some(&ino)
        {
            children.remove(&name);
        }
        if let Some(p) = self.nodes.get_mut(&parent) {
            p.mtime_ns = now_ns();
            p.touch();
        }
        self.detach_descendants(ino);
        self.maybe_drop(ino);
    }

    fn detach_descendants(&mut self, ino: u64) {
        let kids: Vec<u64> = match self.nodes.get(&ino) {
            Some(Node { kind: Kind::Dir(DirState { children: Some(c), .. }), .. }) => c.values().copied().collect(),
            _ => return,
        };
        for k in kids {
            if let Some(n) = self.nodes.get_mut(&k) {
                n.attached = false;
            }
            self.dirty.remove(&k);
            self.detach_descendants(k);
            self.maybe_drop(k);
        }
    }

    /// Moves `ino` to `(parent, name)` (the target slot must be free). The node leaves its
    /// base path, so that path gets a delete marker and the node (for a directory, its whole
    /// subtree) is upserted at the new one.
    pub fn move_node(&mut self, ino: u64, parent: u64, name: &str) {
        if self.in_base(ino) {
            let path = self.path_of(ino);
            self.deleted.insert(path);
        }
        let Some(n) = self.nodes.get(&ino) else { return };
        let (old_parent, old_name) = (n.parent, n.name.clone());
        if let Some(Node { kind: Kind::Dir(d), .. }) = self.nodes.get_mut(&old_parent)
            && let Some(children) = d.children.as_mut()
        {
            children.remove(&old_name);
        }
        if let Some(p) = self.nodes.get_mut(&old_parent) {
            p.mtime_ns = now_ns();
            p.touch();
        }
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.parent = parent;
            n.name = name.to_owned();
            n.committed = false;
            if let Kind::Dir(d) = &mut n.kind {
                d.moved = true;
            }
            n.touch();
        }
        self.link(parent, name, ino);
        self.dirty.insert(ino);
        self.changes += 1;
    }

    /// Forgets a detached node once nothing references it (its overlay file goes with it).
    pub fn maybe_drop(&mut self, ino: u64) {
        if ino == ROOT {
            return;
        }
        if let Some(n) = self.nodes.get(&ino)
            && !n.attached
            && n.lookups == 0
            && n.opens == 0
            && let Some(node) = self.nodes.remove(&ino)
        {
            release_overlay(&self.mem, &node);
        }
    }

    /// Whether `ancestor` is `ino` or one of its ancestors.
    pub fn is_ancestor(&self, ancestor: u64, mut ino: u64) -> bool {
        loop {
            if ino == ancestor {
                return true;
            }
            if ino == ROOT {
                return false;
            }
            match self.nodes.get(&ino) {
                Some(n) => ino = n.parent,
                None => return false,
            }
        }
    }

    /// Puts `node` at `(parent, name)` of a loaded directory, replacing what is there
    /// without recording a delete marker (restoring saved state: the markers are restored
    /// separately). Returns the new inode number.
    pub fn place(&mut self, parent: u64, name: &str, node: Node) -> Result<u64, Errno> {
        self.children(parent)?.ok_or(Errno::EIO)?;
        self.unplace(parent, name);
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(ino, node);
        if let Some(Node { kind: Kind::Dir(d), .. }) = self.nodes.get_mut(&parent)
            && let Some(children) = d.children.as_mut()
        {
            children.insert(name.to_owned(), ino);
        }
        Ok(ino)
    }

    /// Removes `name` from loaded directory `parent` without recording a delete marker
    /// (restoring saved state). Returns whether something was there.
    pub fn unplace(&mut self, parent: u64, name: &str) -> bool {
        let old = match self.nodes.get_mut(&parent) {
            Some(Node { kind: Kind::Dir(DirState { children: Some(c), .. }), .. }) => c.remove(name),
            _ => None,
        };
        let Some(old) = old else { return false };
        if let Some(n) = self.nodes.get_mut(&old) {
            n.attached = false;
        }
        self.dirty.remove(&old);
        self.detach_descendants(old);
        self.maybe_drop(old);
        true
    }

    /// Files with local changes and their changed bytes (for status).
    pub fn dirty_summary(&self) -> (usize, u64) {
        let mut files = 0;
        let mut bytes = 0;
        for ino in &self.dirty {
            if let Some(Node { kind: Kind::File(f), .. }) = self.nodes.get(ino) {
                files += 1;
                bytes += f.changed.len_below(f.size);
            }
        }
        (files, bytes)
    }
}

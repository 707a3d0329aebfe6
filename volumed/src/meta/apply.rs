//! Applying a commit's changes onto a tree: the merge of DESIGN 2.1.
//!
//! Changes are applied in request order onto the *current head*, not the client's base, so
//! concurrent commits to different paths both survive and, on the same path, the later commit
//! wins. A delete marker removes the path (and its subtree); deleting a path that no longer
//! exists is a no-op (someone else deleted it first), and never creates parent directories. An upsert below a path creates missing
//! parent directories (mode 0755). The one case that cannot merge is an upsert below a path
//! that is a file or symlink in the head: that is [`VolumeError::CommitConflict`].
//!
//! Only directories on the paths of changes are decoded and re-encoded, so a commit touching
//! k files in a tree of depth d writes O(k * d) nodes regardless of the volume's size.

use std::collections::BTreeMap;

use crate::error::{Result, VolumeError};
use volume_model::{Change, ChangeOp, Entry, EntryKind, TreeId, TreeNode};

/// Where tree nodes come from (the metadata store, or a test double).
pub trait TreeSource {
    /// Loads and verifies one node.
    fn load(&self, id: &TreeId) -> Result<TreeNode>;
}

impl TreeSource for crate::meta::MetaStore {
    fn load(&self, id: &TreeId) -> Result<TreeNode> {
        self.tree(id)
    }
}

/// The outcome of [`apply_changes`].
#[derive(Debug)]
pub struct Applied {
    /// The new root tree.
    pub root: TreeId,
    /// Every node that was created, encoded (to write in the commit's batch).
    pub new_nodes: Vec<(TreeId, Vec<u8>)>,
}

/// Mode given to directories created implicitly as parents of an upserted path.
pub const IMPLICIT_DIR_MODE: u32 = 0o755;

/// Applies `changes` in order onto the tree `root` and returns the new root.
/// `now_ns` stamps implicitly created directories.
pub fn apply_changes(src: &impl TreeSource, root: TreeId, changes: &[Change], now_ns: i64) -> Result<Applied> {
    let mut new_nodes = Vec::new();
    let ops: Vec<(&[String], &ChangeOp)> = changes.iter().map(|c| (c.path.components(), &c.op)).collect();
    let node = src.load(&root)?;
    let node = apply_dir(src, node, &ops, now_ns, &mut new_nodes, "")?;
    let (root, bytes) = node.encode_with_id();
    new_nodes.push((root, bytes));
    Ok(Applied { root, new_nodes })
}

/// State of one name of a directory while its changes are replayed.
enum Slot<'a> {
    Absent,
    Leaf(Entry),
    Dir { mode: u32, mtime_ns: i64, base: Option<TreeId>, pending: Vec<(&'a [String], &'a ChangeOp)> },
}

fn apply_dir<'a>(
    src: &impl TreeSource,
    mut node: TreeNode,
    ops: &[(&'a [String], &'a ChangeOp)],
    now_ns: i64,
    new_nodes: &mut Vec<(TreeId, Vec<u8>)>,
    prefix: &str,
) -> Result<TreeNode> {
    // Group by first component, keeping request order inside each group.
    let mut groups: BTreeMap<&'a str, Vec<(&'a [String], &'a ChangeOp)>> = BTreeMap::new();
    for (path, op) in ops {
        let Some((first, rest)) = path.split_first() else {
            return Err(VolumeError::invalid("a change cannot target the volume root"));
        };
        groups.entry(first.as_str()).or_default().push((rest, op));
    }
    for (name, group) in groups {
        let display = if prefix.is_empty() { name.to_owned() } else { format!("{prefix}/{name}") };
        let mut slot = match node.entries.remove(name) {
            None => Slot::Absent,
            Some(Entry { mode, mtime_ns, kind: EntryKind::Dir(tree) }) => {
                Slot::Dir { mode, mtime_ns, base: Some(tree), pending: Vec::new() }
            }
            Some(leaf) => Slot::Leaf(leaf),
        };
        for (rest, op) in group {
            slot = match (rest.is_empty(), op, slot) {
                (true, ChangeOp::Delete, _) => Slot::Absent,
                (true, ChangeOp::Upsert(e), slot) => match (&e.kind, slot) {
                    (EntryKind::Dir(_), Slot::Dir { base, pending, .. }) => {
                        Slot::Dir { mode: e.mode, mtime_ns: e.mtime_ns, base, pending }
                    }
                    (EntryKind::Dir(_), _) => Slot::Dir { mode: e.mode, mtime_ns: e.mtime_ns, base: None, pending: Vec::new() },
                    (_, _) => Slot::Leaf(e.clone()),
                },
                // Deleting below a path that is gone (or is a file) deletes nothing, and must
                // not create the parents an upsert would.
                (false, ChangeOp::Delete, slot @ (Slot::Absent | Slot::Leaf(_))) => slot,
                (false, _, Slot::Absent) => {
                    Slot::Dir { mode: IMPLICIT_DIR_MODE, mtime_ns: now_ns, base: None, pending: vec![(rest, op)] }
                }
                (false, _, Slot::Dir { mode, mtime_ns, base, mut pending }) => {
                    pending.push((rest, op));
                    Slot::Dir { mode, mtime_ns, base, pending }
                }
                (false, _, Slot::Leaf(_)) => {
                    return Err(VolumeError::CommitConflict(format!(
                        "cannot change {display}/{}: {display} is not a directory in the head",
                        rest.join("/")
                    )));
                }
            };
        }
        match slot {
            Slot::Absent => {}
            Slot::Leaf(e) => {
                node.entries.insert(name.to_owned(), e);
            }
            Slot::Dir { mode, mtime_ns, base, pending } => {
                let tree = match (base, pending.is_empty()) {
                    (Some(id), true) => id,
                    (base, _) => {
                        let child = match base {
                            Some(id) => src.load(&id)?,
                            None => TreeNode::default(),
                        };
                        let child = apply_dir(src, child, &pending, now_ns, new_nodes, &display)?;
                        let (id, bytes) = child.encode_with_id();
                        new_nodes.push((id, bytes));
                        id
                    }
                };
                node.entries.insert(name.to_owned(), Entry { mode, mtime_ns, kind: EntryKind::Dir(tree) });
            }
        }
    }
    Ok(node)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::HashMap;

    use chunkstore::{ChunkId, ChunkPolicy};

    use super::*;
    use crate::meta::read::{diff, list_dir, resolve};
    use volume_model::{FileData, VolPath};

    /// Tree nodes in memory, counting loads.
    #[derive(Default)]
    struct Mem {
        nodes: RefCell<HashMap<TreeId, Vec<u8>>>,
    }

    impl TreeSource for Mem {
        fn load(&self, id: &TreeId) -> Result<TreeNode> {
            let nodes = self.nodes.borrow();
            let raw = nodes.get(id).ok_or_else(|| VolumeError::Integrity(format!("missing {id}")))?;
            Ok(TreeNode::decode(raw)?)
        }
    }

    impl Mem {
        fn new() -> (Self, TreeId) {
            let m = Mem::default();
            let (id, bytes) = TreeNode::default().encode_with_id();
            m.nodes.borrow_mut().insert(id, bytes);
            (m, id)
        }
        fn apply(&self, root: TreeId, changes: &[Change]) -> Result<(TreeId, usize)> {
            let a = apply_changes(self, root, changes, 7)?;
            let n = a.new_nodes.len();
            self.nodes.borrow_mut().extend(a.new_nodes);
            Ok((a.root, n))
        }
    }

    fn file(content: &str) -> ChangeOp {
        ChangeOp::Upsert(Entry {
            mode: 0o644,
            mtime_ns: 1,
            kind: EntryKind::File(FileData {
                size: content.len() as u64,
                policy: ChunkPolicy::Fixed { size: 8 << 20 },
                chunks: if content.is_empty() { vec![] } else { vec![(ChunkId::of(content.as_bytes()), content.len() as u32)] },
            }),
        })
    }

    fn dir(mode: u32) -> ChangeOp {
        ChangeOp::Upsert(Entry { mode, mtime_ns: 2, kind: EntryKind::Dir(TreeId::from_bytes([0; 32])) })
    }

    fn ch(path: &str, op: ChangeOp) -> Change {
        Change { path: VolPath::parse(path).unwrap(), op }
    }

    fn content(m: &Mem, root: TreeId, path: &str) -> Option<ChunkId> {
        match resolve(m, root, &VolPath::parse(path).unwrap()) {
            Ok(Entry { kind: EntryKind::File(f), .. }) => f.chunks.first().map(|c| c.0),
            Ok(_) => panic!("{path} is not a file"),
            Err(VolumeError::PathNotFound(_)) => None,
            Err(e) => panic!("resolving {path} failed: {e:?}"),
        }
    }

    #[test]
    fn upserts_create_parents_and_deletes_remove_subtrees() {
        let (m, root) = Mem::new();
        let (root, _) = m.apply(root, &[ch("a/b/c.txt", file("c")), ch("a/d.txt", file("d"))]).unwrap();
        assert_eq!(content(&m, root, "a/b/c.txt"), Some(ChunkId::of(b"c")));
        let a = resolve(&m, root, &VolPath::parse("a").unwrap()).unwrap();
        assert_eq!(a.mode, IMPLICIT_DIR_MODE);
        let (root, _) = m.apply(root, &[ch("a/b", ChangeOp::Delete)]).unwrap();
        assert_eq!(content(&m, root, "a/b/c.txt"), None);
        assert_eq!(content(&m, root, "a/d.txt"), Some(ChunkId::of(b"d")));
        // Deleting what is not there is a no-op.
        let (again, _) = m.apply(root, &[ch("a/b", ChangeOp::Delete), ch("zzz", ChangeOp::Delete)]).unwrap();
        assert_eq!(again, root);
        // Even below a deleted or missing path, or below a file: no parents appear.
        let (again, _) = m.apply(root, &[ch("a/d.txt/x", ChangeOp::Delete), ch("gone/x/y", ChangeOp::Delete)]).unwrap();
        assert_eq!(again, root);
        let (after, _) = m.apply(root, &[ch("a", ChangeOp::Delete), ch("a/d.txt", ChangeOp::Delete)]).unwrap();
        assert!(
            matches!(resolve(&m, after, &VolPath::parse("a").unwrap()), Err(VolumeError::PathNotFound(_))),
            "a stays deleted"
        );
    }

    #[test]
    fn request_order_matters_within_one_commit() {
        let (m, root) = Mem::new();
        let (root, _) = m.apply(root, &[ch("a/old", file("old"))]).unwrap();
        // Delete the directory, then create inside it: only the new file remains.
        let (root, _) = m.apply(root, &[ch("a", ChangeOp::Delete), ch("a/new", file("new"))]).unwrap();
        assert_eq!(content(&m, root, "a/old"), None);
        assert_eq!(content(&m, root, "a/new"), Some(ChunkId::of(b"new")));
        // A directory upsert on an existing directory keeps its children and takes the mode.
        let (root, _) = m.apply(root, &[ch("a", dir(0o700))]).unwrap();
        assert_eq!(resolve(&m, root, &VolPath::parse("a").unwrap()).unwrap().mode, 0o700);
        assert!(content(&m, root, "a/new").is_some());
        // A file replaces a directory, and a directory replaces a file.
        let (root, _) = m.apply(root, &[ch("a", file("flat"))]).unwrap();
        assert_eq!(content(&m, root, "a"), Some(ChunkId::of(b"flat")));
        let (root, _) = m.apply(root, &[ch("a", dir(0o755)), ch("a/x", file("x"))]).unwrap();
        assert_eq!(content(&m, root, "a/x"), Some(ChunkId::of(b"x")));
    }

    #[test]
    fn a_change_below_a_file_is_a_conflict() {
        let (m, root) = Mem::new();
        let (root, _) = m.apply(root, &[ch("f", file("f"))]).unwrap();
        let err = m.apply(root, &[ch("f/g", file("g"))]).unwrap_err();
        assert!(matches!(err, VolumeError::CommitConflict(_)), "{err}");
    }

    #[test]
    fn one_change_rewrites_only_the_nodes_on_its_path() {
        let (m, root) = Mem::new();
        let mut changes = Vec::new();
        for d in 0..50 {
            for f in 0..50 {
                changes.push(ch(&format!("d{d}/sub/f{f}"), file(&format!("{d}-{f}"))));
            }
        }
        let (root, created) = m.apply(root, &changes).unwrap();
        assert_eq!(created, 1 + 50 * 2);
        let (next, created) = m.apply(root, &[ch("d7/sub/f3", file("changed"))]).unwrap();
        assert_eq!(created, 3, "root, d7 and d7/sub only");
        let (_, listing) = list_dir(&m, next, &VolPath::parse("d7/sub").unwrap()).unwrap();
        assert_eq!(listing.entries.len(), 50);

        let d = diff(&m, root, next).unwrap();
        assert_eq!(d, vec![ch("d7/sub/f3", file("changed"))]);
        let back = diff(&m, next, root).unwrap();
        assert_eq!(back, vec![ch("d7/sub/f3", file("7-3"))]);
        let (gone, _) = m.apply(next, &[ch("d9", ChangeOp::Delete)]).unwrap();
        assert_eq!(diff(&m, next, gone).unwrap(), vec![ch("d9", ChangeOp::Delete)]);
    }
}

//! Reading trees: resolving paths, and diffing two trees in O(changes).

use crate::error::{Result, VolumeError};
use crate::meta::apply::TreeSource;
use volume_model::{Change, ChangeOp, Entry, EntryKind, TreeId, TreeNode, VolPath};

/// The entry at `path` under `root`; the root itself is reported as a directory entry.
pub fn resolve(src: &impl TreeSource, root: TreeId, path: &VolPath) -> Result<Entry> {
    let mut entry = Entry { mode: 0o755, mtime_ns: 0, kind: EntryKind::Dir(root) };
    for (i, name) in path.components().iter().enumerate() {
        let EntryKind::Dir(tree) = entry.kind else {
            return Err(VolumeError::PathNotFound(path.components()[..=i].join("/")));
        };
        let mut node = src.load(&tree)?;
        entry = node.entries.remove(name).ok_or_else(|| VolumeError::PathNotFound(path.components()[..=i].join("/")))?;
    }
    Ok(entry)
}

/// The directory at `path` under `root`: its tree id and node.
pub fn list_dir(src: &impl TreeSource, root: TreeId, path: &VolPath) -> Result<(TreeId, TreeNode)> {
    match resolve(src, root, path)?.kind {
        EntryKind::Dir(id) => Ok((id, src.load(&id)?)),
        _ => Err(VolumeError::invalid(format!("{path} is not a directory"))),
    }
}

/// Changes that turn tree `from` into tree `to`. Subtrees with equal ids are skipped, so the
/// cost is proportional to what changed. New directories are reported as a directory upsert
/// followed by upserts of their contents.
pub fn diff(src: &impl TreeSource, from: TreeId, to: TreeId) -> Result<Vec<Change>> {
    let mut out = Vec::new();
    diff_dir(src, Some(from), to, &VolPath::root(), &mut out)?;
    Ok(out)
}

fn diff_dir(src: &impl TreeSource, from: Option<TreeId>, to: TreeId, at: &VolPath, out: &mut Vec<Change>) -> Result<()> {
    if from == Some(to) {
        return Ok(());
    }
    let a = match from {
        Some(id) => src.load(&id)?,
        None => TreeNode::default(),
    };
    let b = src.load(&to)?;
    for name in a.entries.keys() {
        if !b.entries.contains_key(name) {
            out.push(Change { path: at.join(name)?, op: ChangeOp::Delete });
        }
    }
    for (name, new) in &b.entries {
        let path = at.join(name)?;
        let old = a.entries.get(name);
        match (&new.kind, old) {
            (_, Some(old)) if old == new => {}
            (EntryKind::Dir(new_tree), Some(Entry { kind: EntryKind::Dir(old_tree), mode, mtime_ns })) => {
                if *mode != new.mode || *mtime_ns != new.mtime_ns {
                    out.push(Change { path: path.clone(), op: ChangeOp::Upsert(new.clone()) });
                }
                diff_dir(src, Some(*old_tree), *new_tree, &path, out)?;
            }
            (EntryKind::Dir(new_tree), _) => {
                out.push(Change { path: path.clone(), op: ChangeOp::Upsert(new.clone()) });
                diff_dir(src, None, *new_tree, &path, out)?;
            }
            _ => out.push(Change { path, op: ChangeOp::Upsert(new.clone()) }),
        }
    }
    Ok(())
}

//! `InodeTable`: the FUSE adapter's map between kernel inode numbers and store file handles.
//!
//! It owns the numbering and the lifetime of inodes: each reply that hands the kernel an inode (lookup,
//! create, mkdir, symlink, link, each readdirplus entry) adds one lookup, and `forget` takes them away; an
//! inode leaves the table when the kernel has forgotten it and no file is open on it. It also keeps the
//! per-inode state the adapter needs between requests: open count, unflushed writes, and the hidden name
//! of a file unlinked while open. It must not call the store: every method is a short critical section that
//! never waits, so one slow request cannot hold up others.
//!
//! Numbers: the root is always 1 (FUSE's fixed root). Any other object gets the store's `fileid`, so `ls -i`
//! and hard links show stable numbers across mounts; when that number is 1 or already taken by another
//! live handle, a synthetic number from the top half of the range is used instead.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use super::store::FileHandle;
use crate::sync::Recover;

/// FUSE's inode number for the root directory.
pub const ROOT_INODE: u64 = 1;

/// Synthetic inode numbers start here, far above the fileids that servers hand out in practice.
const SYNTHETIC_BASE: u64 = 1 << 63;

/// A file unlinked while open, renamed to a hidden name so its data survives until the last close (what the
/// kernel NFS client calls a silly rename).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hidden {
    pub dir: FileHandle,
    pub name: Vec<u8>,
}

#[derive(Debug)]
struct Entry {
    handle: FileHandle,
    lookups: u64,
    opens: u32,
    /// Writes went to the store since the last commit.
    dirty: bool,
    hidden: Option<Hidden>,
    /// The store's version of the file when it was last opened here (see `opened_at`).
    opened: Option<Version>,
}

/// What identifies one state of a file's data on the store: every change of data moves the change time
/// (ctime) forward, and the size is compared as well in case a server keeps coarse times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    pub ctime: std::time::SystemTime,
    pub size: u64,
}

#[derive(Debug, Default)]
struct Inner {
    by_inode: HashMap<u64, Entry>,
    by_handle: HashMap<FileHandle, u64>,
    next_synthetic: u64,
    /// Inodes with at least one open file, so unlink can skip the open check when nothing is open.
    open_inodes: usize,
}

/// See the module documentation.
#[derive(Debug)]
pub struct InodeTable {
    inner: Mutex<Inner>,
}

impl InodeTable {
    /// A table holding only the root, bound to the store's root handle.
    pub fn new(root: FileHandle) -> Self {
        let mut inner = Inner {
            next_synthetic: SYNTHETIC_BASE,
            ..Inner::default()
        };
        inner.by_handle.insert(root.clone(), ROOT_INODE);
        inner.by_inode.insert(
            ROOT_INODE,
            Entry {
                handle: root,
                lookups: 1,
                opens: 0,
                dirty: false,
                hidden: None,
                opened: None,
            },
        );
        InodeTable {
            inner: Mutex::new(inner),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves the maps consistent before anything can panic, so a poisoned lock
        // still guards valid data.
        self.inner.lock().recover()
    }

    /// The handle of a live inode.
    pub fn handle(&self, inode: u64) -> Option<FileHandle> {
        self.lock().by_inode.get(&inode).map(|e| e.handle.clone())
    }

    /// The inode of a handle the kernel knows, without counting a lookup.
    pub fn inode_of(&self, handle: &FileHandle) -> Option<u64> {
        self.lock().by_handle.get(handle).copied()
    }

    /// Records that the kernel was given this handle once more, and returns its inode number.
    pub fn remember(&self, handle: &FileHandle, fileid: u64) -> u64 {
        let mut inner = self.lock();
        if let Some(&inode) = inner.by_handle.get(handle) {
            if let Some(e) = inner.by_inode.get_mut(&inode) {
                e.lookups += 1;
            }
            return inode;
        }
        let inode = if fileid != ROOT_INODE && fileid != 0 && !inner.by_inode.contains_key(&fileid)
        {
            fileid
        } else {
            let mut n = inner.next_synthetic;
            while inner.by_inode.contains_key(&n) || n == 0 {
                n = n.wrapping_add(1).max(SYNTHETIC_BASE);
            }
            inner.next_synthetic = n.wrapping_add(1).max(SYNTHETIC_BASE);
            n
        };
        inner.by_handle.insert(handle.clone(), inode);
        inner.by_inode.insert(
            inode,
            Entry {
                handle: handle.clone(),
                lookups: 1,
                opens: 0,
                dirty: false,
                hidden: None,
                opened: None,
            },
        );
        inode
    }

    /// The kernel dropped `count` lookups of `inode`.
    pub fn forget(&self, inode: u64, count: u64) {
        let mut inner = self.lock();
        let Some(e) = inner.by_inode.get_mut(&inode) else {
            return;
        };
        e.lookups = e.lookups.saturating_sub(count);
        if inode != ROOT_INODE && e.lookups == 0 && e.opens == 0 {
            inner.remove(inode);
        }
    }

    /// A file was opened on `inode`.
    pub fn open(&self, inode: u64) {
        let mut inner = self.lock();
        if let Some(e) = inner.by_inode.get_mut(&inode) {
            e.opens += 1;
            if e.opens == 1 {
                inner.open_inodes += 1;
            }
        }
    }

    /// A file on `inode` was closed for the last time. Returns the hidden name to remove if this was the last
    /// open of a file unlinked while open.
    pub fn release(&self, inode: u64) -> Option<Hidden> {
        let mut inner = self.lock();
        let e = inner.by_inode.get_mut(&inode)?;
        e.opens = e.opens.saturating_sub(1);
        if e.opens > 0 {
            return None;
        }
        let hidden = e.hidden.take();
        let gone = e.lookups == 0 && inode != ROOT_INODE;
        inner.open_inodes = inner.open_inodes.saturating_sub(1);
        if gone {
            inner.remove(inode);
        }
        hidden
    }

    /// Whether any file is open at all (a cheap check before the costlier one per name).
    pub fn any_open(&self) -> bool {
        self.lock().open_inodes > 0
    }

    pub fn is_open(&self, inode: u64) -> bool {
        self.lock()
            .by_inode
            .get(&inode)
            .is_some_and(|e| e.opens > 0)
    }

    /// Records the hidden name of an open file that was unlinked. Returns false, recording nothing, if the
    /// file was closed meanwhile: the caller then removes the hidden name itself.
    pub fn hide(&self, inode: u64, hidden: Hidden) -> bool {
        let mut inner = self.lock();
        match inner.by_inode.get_mut(&inode) {
            Some(e) if e.opens > 0 => {
                e.hidden = Some(hidden);
                true
            }
            _ => false,
        }
    }

    /// Takes back a hidden name recorded by `hide`, if it is still the one recorded. Returns whether it was.
    pub fn unhide(&self, inode: u64, hidden: &Hidden) -> bool {
        let mut inner = self.lock();
        match inner.by_inode.get_mut(&inode) {
            Some(e) if e.hidden.as_ref() == Some(hidden) => {
                e.hidden = None;
                true
            }
            _ => false,
        }
    }

    /// Records that `inode` is being opened with the store at `version`, and says whether that is the
    /// version it had at its previous open here. If so, nothing can have changed the data since (the kernel
    /// then keeps its cached pages and attributes, which were read at that version or later from the same
    /// data); if not, or if this is the first open, the caller must drop them.
    pub fn opened_at(&self, inode: u64, version: Version) -> bool {
        self.lock()
            .by_inode
            .get_mut(&inode)
            .is_some_and(|e| e.opened.replace(version) == Some(version))
    }

    /// Notes that `inode` has writes not yet committed.
    pub fn mark_dirty(&self, inode: u64) {
        if let Some(e) = self.lock().by_inode.get_mut(&inode) {
            e.dirty = true;
        }
    }

    /// Clears and returns whether `inode` has uncommitted writes. Cleared before the commit starts, so a write
    /// that lands during the commit marks it dirty again.
    pub fn take_dirty(&self, inode: u64) -> bool {
        self.lock()
            .by_inode
            .get_mut(&inode)
            .is_some_and(|e| std::mem::take(&mut e.dirty))
    }

    /// How many inodes the table holds (the root included).
    pub fn len(&self) -> usize {
        self.lock().by_inode.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    fn remove(&mut self, inode: u64) {
        if let Some(e) = self.by_inode.remove(&inode) {
            self.by_handle.remove(&e.handle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn h(n: u8) -> FileHandle {
        FileHandle(Bytes::from(vec![n; 4]))
    }

    #[test]
    fn the_root_is_one_and_never_forgotten() {
        let t = InodeTable::new(h(0));
        assert_eq!(t.remember(&h(0), 77), ROOT_INODE);
        t.forget(ROOT_INODE, 100);
        assert_eq!(t.handle(ROOT_INODE), Some(h(0)));
    }

    #[test]
    fn inodes_are_fileids_unless_taken_or_one() {
        let t = InodeTable::new(h(0));
        assert_eq!(t.remember(&h(1), 500), 500);
        // Another handle with the same fileid (another filesystem on the server) gets its own number.
        let other = t.remember(&h(2), 500);
        assert!(other >= SYNTHETIC_BASE);
        // fileid 1 would collide with the root.
        let third = t.remember(&h(3), 1);
        assert!(third >= SYNTHETIC_BASE && third != other);
        assert_eq!(t.handle(500), Some(h(1)));
        assert_eq!(t.inode_of(&h(2)), Some(other));
    }

    #[test]
    fn an_inode_lives_until_all_its_lookups_are_forgotten() {
        let t = InodeTable::new(h(0));
        let i = t.remember(&h(1), 9);
        assert_eq!(t.remember(&h(1), 9), i);
        t.forget(i, 1);
        assert_eq!(t.handle(i), Some(h(1)));
        t.forget(i, 1);
        assert_eq!(t.handle(i), None);
        assert_eq!(t.inode_of(&h(1)), None);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn an_open_file_outlives_forget_and_goes_at_release() {
        let t = InodeTable::new(h(0));
        let i = t.remember(&h(1), 9);
        t.open(i);
        assert!(t.any_open());
        t.forget(i, 1);
        assert_eq!(t.handle(i), Some(h(1)));
        assert_eq!(t.release(i), None);
        assert_eq!(t.handle(i), None);
        assert!(!t.any_open());
    }

    #[test]
    fn the_hidden_name_comes_back_at_the_last_release_only() {
        let t = InodeTable::new(h(0));
        let i = t.remember(&h(1), 9);
        t.open(i);
        t.open(i);
        let hidden = Hidden {
            dir: h(0),
            name: b".hidden".to_vec(),
        };
        assert!(t.hide(i, hidden.clone()));
        assert_eq!(t.release(i), None);
        assert_eq!(t.release(i), Some(hidden.clone()));
        // Closed files cannot be hidden: the caller must remove the name itself.
        assert!(!t.hide(i, hidden.clone()));
        assert!(!t.unhide(i, &hidden));
    }

    #[test]
    fn unhide_takes_back_only_the_recorded_name() {
        let t = InodeTable::new(h(0));
        let i = t.remember(&h(1), 9);
        t.open(i);
        let hidden = Hidden {
            dir: h(0),
            name: b".a".to_vec(),
        };
        let other = Hidden {
            dir: h(0),
            name: b".b".to_vec(),
        };
        assert!(t.hide(i, hidden.clone()));
        assert!(!t.unhide(i, &other));
        assert!(t.unhide(i, &hidden));
        assert_eq!(t.release(i), None);
    }

    #[test]
    fn dirty_is_taken_once() {
        let t = InodeTable::new(h(0));
        let i = t.remember(&h(1), 9);
        assert!(!t.take_dirty(i));
        t.mark_dirty(i);
        assert!(t.take_dirty(i));
        assert!(!t.take_dirty(i));
    }
}

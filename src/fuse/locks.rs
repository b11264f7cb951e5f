//! Advisory locks through the mount: POSIX byte-range locks (`fcntl` F_GETLK, F_SETLK, F_SETLKW), which the
//! kernel hands to FUSE as GETLK/SETLK/SETLKW requests with a lock owner (one per process's file table).
//!
//! This module owns the kernel-facing rules: what a request means, waiting for a blocked lock (by polling the
//! store with non-blocking attempts and a growing pause, so the store needs no call-back from a server),
//! cancelling that wait when the kernel interrupts the request (a signal), and releasing an owner's locks
//! when it closes the file (FLUSH carries the owner; POSIX drops a process's locks on a file at any close of
//! it). Where the locks live is the `LockStore`'s business: a server's lock manager (`nfs::locks`) or a
//! table in this process (`LocalLocks`). With no store (`Locking::Refuse`) every lock request fails with
//! ENOLCK: granting a lock that no other host sees would protect nothing.
//!
//! `flock(2)` comes here too: the session asks for FUSE_FLOCK_LOCKS at INIT, and the kernel then sends a
//! flock as a whole-file lock whose owner is the open file (released by the file's RELEASE), which goes to
//! the same store as a kernel NFS client sends it to the server's lock manager.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::store::FileHandle;
use crate::sync::Recover;

/// The kernel's "to the end of the file" (OFFSET_MAX): the largest end a lock may have.
pub const TO_EOF: u64 = i64::MAX as u64;
/// The first and longest pause between attempts at a blocked lock.
const FIRST_PAUSE: Duration = Duration::from_millis(10);
const LONGEST_PAUSE: Duration = Duration::from_millis(500);

/// A read (shared) or write (exclusive) lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    Read,
    Write,
}

/// A lock as the kernel asks for it: an owner, a kind and the bytes `start..=end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockRequest {
    /// The kernel's lock owner: all locks of one process's file table share it.
    pub owner: u64,
    /// The process asking (its thread-group id as the mount's helper sees it); told to other hosts as the
    /// holder's "pid".
    pub pid: u32,
    pub kind: LockKind,
    pub start: u64,
    /// Inclusive; `TO_EOF` for "to the end of the file".
    pub end: u64,
}

/// A lock in the way of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflict {
    pub kind: LockKind,
    pub start: u64,
    pub end: u64,
    /// The holder's pid on its own host (0 when unknown).
    pub pid: u32,
}

/// A failed lock operation: the errno for the application, and a lowercase message for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct LockError {
    pub errno: i32,
    pub message: String,
}

impl LockError {
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        Self {
            errno,
            message: message.into(),
        }
    }
}

pub type LockResult<T> = Result<T, LockError>;

/// Where locks are kept. Every call answers at once (within the store's deadline): none waits for a lock.
#[async_trait]
pub trait LockStore: Send + Sync {
    /// The first lock of another owner that conflicts with `lock`, if any.
    async fn test(&self, file: &FileHandle, lock: &LockRequest) -> LockResult<Option<Conflict>>;
    /// Takes `lock` if nothing conflicts (replacing the owner's own locks on those bytes): whether it did.
    async fn try_lock(&self, file: &FileHandle, lock: &LockRequest) -> LockResult<bool>;
    /// Releases the owner's locks on `start..=end` (nothing held is not an error).
    async fn unlock(&self, file: &FileHandle, owner: u64, start: u64, end: u64) -> LockResult<()>;
    /// Releases every lock of `owner` on `file`: it closed the file.
    async fn unlock_owner(&self, file: &FileHandle, owner: u64) -> LockResult<()> {
        self.unlock(file, owner, 0, TO_EOF).await
    }
}

/// What a mount does with lock requests.
#[derive(Clone, Default)]
pub enum Locking {
    /// Fail them with ENOLCK.
    #[default]
    Refuse,
    /// Keep them in this store.
    Store(Arc<dyn LockStore>),
}

impl std::fmt::Debug for Locking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Locking::Refuse => "Refuse",
            Locking::Store(_) => "Store",
        })
    }
}

/// The adapter's side of locking: the store, which owners may hold locks on which inode (so a close costs
/// a store call only when it has something to release), and the waits an interrupt may cancel.
#[derive(Debug, Default)]
pub(crate) struct Locks {
    locking: Locking,
    /// Per inode, the owners that took a lock on it and have not closed it since.
    held: Mutex<HashMap<u64, Vec<u64>>>,
    /// Blocked SETLKW requests by their FUSE request id.
    waits: Mutex<HashMap<u64, CancellationToken>>,
    /// Interrupts that arrived before their request was registered (each request runs in its own task).
    early_interrupts: Mutex<Vec<u64>>,
    /// Tells the kernel to drop an inode's cached pages and attributes; set once the session is ready.
    notify: std::sync::OnceLock<super::session::Notifier>,
}

/// At most this many unmatched interrupts are remembered; older ones are for requests long finished.
const EARLY_INTERRUPTS: usize = 64;

fn lock_err(op: &'static str, e: LockError) -> super::Errno {
    tracing::warn!(op, error = %e, "lock request failed");
    e.errno.into()
}

fn kind_of(r#type: u32) -> Option<LockKind> {
    match r#type as i32 {
        libc::F_RDLCK => Some(LockKind::Read),
        libc::F_WRLCK => Some(LockKind::Write),
        _ => None,
    }
}

fn type_of(kind: LockKind) -> u32 {
    match kind {
        LockKind::Read => libc::F_RDLCK as u32,
        LockKind::Write => libc::F_WRLCK as u32,
    }
}

impl Locks {
    pub(crate) fn new(locking: Locking) -> Self {
        Self {
            locking,
            ..Self::default()
        }
    }

    fn store(&self) -> super::FuseResult<&Arc<dyn LockStore>> {
        match &self.locking {
            Locking::Store(s) => Ok(s),
            Locking::Refuse => Err(libc::ENOLCK.into()),
        }
    }

    fn note_held(&self, inode: u64, owner: u64) {
        let mut held = self.held.lock().recover();
        let owners = held.entry(inode).or_default();
        if !owners.contains(&owner) {
            owners.push(owner);
        }
    }

    /// Whether `owner` may hold locks on `inode`; forgets it.
    fn take_held(&self, inode: u64, owner: u64) -> bool {
        let mut held = self.held.lock().recover();
        let Some(owners) = held.get_mut(&inode) else {
            return false;
        };
        let before = owners.len();
        owners.retain(|o| *o != owner);
        let found = owners.len() != before;
        if owners.is_empty() {
            held.remove(&inode);
        }
        found
    }

    /// F_GETLK: the conflicting lock as the kernel wants it, or F_UNLCK.
    pub(crate) async fn getlk(
        &self,
        file: &FileHandle,
        owner: u64,
        start: u64,
        end: u64,
        r#type: u32,
        pid: u32,
    ) -> super::FuseResult<super::ReplyLock> {
        let store = self.store()?;
        let kind = kind_of(r#type).ok_or(super::Errno::from(libc::EINVAL))?;
        let request = LockRequest {
            owner,
            pid,
            kind,
            start,
            end: end.min(TO_EOF),
        };
        match store
            .test(file, &request)
            .await
            .map_err(|e| lock_err("getlk", e))?
        {
            Some(c) => Ok(super::ReplyLock {
                start: c.start,
                end: c.end.min(TO_EOF),
                r#type: type_of(c.kind),
                pid: c.pid,
            }),
            None => Ok(super::ReplyLock {
                start,
                end,
                r#type: libc::F_UNLCK as u32,
                pid: 0,
            }),
        }
    }

    /// F_SETLK and F_SETLKW (`block`). `unique` is the FUSE request id an interrupt names.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn setlk(
        &self,
        inode: u64,
        file: &FileHandle,
        unique: u64,
        owner: u64,
        start: u64,
        end: u64,
        r#type: u32,
        pid: u32,
        block: bool,
    ) -> super::FuseResult<()> {
        let store = self.store()?;
        let end = end.min(TO_EOF);
        if r#type as i32 == libc::F_UNLCK {
            store
                .unlock(file, owner, start, end)
                .await
                .map_err(|e| lock_err("unlock", e))?;
            return Ok(());
        }
        let kind = kind_of(r#type).ok_or(super::Errno::from(libc::EINVAL))?;
        let request = LockRequest {
            owner,
            pid,
            kind,
            start,
            end,
        };
        // Noted before the first attempt: an attempt whose answer is lost may still have been granted, and
        // the owner's close must then release it.
        self.note_held(inode, owner);
        if !block {
            return match store.try_lock(file, &request).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(libc::EAGAIN.into()),
                Err(e) => Err(lock_err("setlk", e)),
            };
        }
        let cancel = CancellationToken::new();
        {
            let mut early = self.early_interrupts.lock().recover();
            if let Some(i) = early.iter().position(|u| *u == unique) {
                early.swap_remove(i);
                return Err(libc::EINTR.into());
            }
            self.waits.lock().recover().insert(unique, cancel.clone());
        }
        let result = self.wait_for(store, file, &request, &cancel).await;
        self.waits.lock().recover().remove(&unique);
        result
    }

    /// Tries until granted, pausing longer each time; an interrupt ends the wait between attempts, never
    /// during one, so a lock granted by an attempt is never abandoned.
    async fn wait_for(
        &self,
        store: &Arc<dyn LockStore>,
        file: &FileHandle,
        request: &LockRequest,
        cancel: &CancellationToken,
    ) -> super::FuseResult<()> {
        let mut pause = FIRST_PAUSE;
        loop {
            match store.try_lock(file, request).await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(lock_err("setlkw", e)),
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = cancel.cancelled() => return Err(libc::EINTR.into()),
            }
            pause = (pause * 2).min(LONGEST_PAUSE);
        }
    }

    pub(crate) fn set_notify(&self, notify: super::session::Notifier) {
        let _ = self.notify.set(notify);
    }

    /// After a lock is granted: what this host cached of the file may predate another host's writes made
    /// under the lock just released there (NFS clients revalidate on locking too). Only the attributes are
    /// dropped, before the grant is answered: the next read then asks the server for them, and the kernel
    /// drops the cached pages itself when the change time or size moved (FUSE_AUTO_INVAL_DATA). Dropping
    /// pages from here could wait for a page that a read in flight holds locked.
    pub(crate) async fn invalidate(&self, inode: u64) {
        if let Some(n) = self.notify.get() {
            n.inval_inode(inode, -1, 0);
        }
    }

    /// The kernel interrupts request `unique` (its caller got a signal): end its wait if it is a blocked lock.
    pub(crate) fn interrupt(&self, unique: u64) {
        let mut early = self.early_interrupts.lock().recover();
        if let Some(token) = self.waits.lock().recover().get(&unique) {
            token.cancel();
            return;
        }
        // Not (yet) a registered wait: most interrupts are for other requests, which finish on their own.
        if early.len() >= EARLY_INTERRUPTS {
            early.remove(0);
        }
        early.push(unique);
    }

    /// FLUSH or RELEASE by `owner`: drops its locks on the file, if it took any.
    pub(crate) async fn release_owner(&self, inode: u64, file: &FileHandle, owner: u64) {
        if !self.take_held(inode, owner) {
            return;
        }
        let Ok(store) = self.store() else { return };
        if let Err(e) = store.unlock_owner(file, owner).await {
            // Nothing to tell the application: close(2) succeeded as far as its data goes.
            tracing::warn!(inode, error = %e, "cannot release a closed file's locks");
        }
    }
}

/// Locks kept in this process only: they hold between users of this mount and no further. For
/// `[nfs] locks = "local"` and for stores that no other host shares.
#[derive(Debug, Default)]
pub struct LocalLocks {
    files: Mutex<HashMap<FileHandle, Vec<Held>>>,
}

#[derive(Debug, Clone, Copy)]
struct Held {
    owner: u64,
    pid: u32,
    kind: LockKind,
    start: u64,
    end: u64,
}

impl Held {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }
}

/// Removes `owner`'s locks from `start..=end`, keeping the parts of them outside it.
fn carve(locks: &mut Vec<Held>, owner: u64, start: u64, end: u64) {
    let mut kept = Vec::with_capacity(locks.len() + 1);
    for h in locks.drain(..) {
        if h.owner != owner || !h.overlaps(start, end) {
            kept.push(h);
            continue;
        }
        if h.start < start {
            kept.push(Held {
                end: start - 1,
                ..h
            });
        }
        if h.end > end {
            kept.push(Held {
                start: end + 1,
                ..h
            });
        }
    }
    *locks = kept;
}

impl LocalLocks {
    fn conflict(locks: &[Held], lock: &LockRequest) -> Option<Conflict> {
        locks
            .iter()
            .find(|h| {
                h.owner != lock.owner
                    && h.overlaps(lock.start, lock.end)
                    && (h.kind == LockKind::Write || lock.kind == LockKind::Write)
            })
            .map(|h| Conflict {
                kind: h.kind,
                start: h.start,
                end: h.end,
                pid: h.pid,
            })
    }
}

#[async_trait]
impl LockStore for LocalLocks {
    async fn test(&self, file: &FileHandle, lock: &LockRequest) -> LockResult<Option<Conflict>> {
        let files = self.files.lock().recover();
        Ok(files.get(file).and_then(|l| Self::conflict(l, lock)))
    }

    async fn try_lock(&self, file: &FileHandle, lock: &LockRequest) -> LockResult<bool> {
        let mut files = self.files.lock().recover();
        let locks = files.entry(file.clone()).or_default();
        if Self::conflict(locks, lock).is_some() {
            return Ok(false);
        }
        carve(locks, lock.owner, lock.start, lock.end);
        locks.push(Held {
            owner: lock.owner,
            pid: lock.pid,
            kind: lock.kind,
            start: lock.start,
            end: lock.end,
        });
        Ok(true)
    }

    async fn unlock(&self, file: &FileHandle, owner: u64, start: u64, end: u64) -> LockResult<()> {
        let mut files = self.files.lock().recover();
        if let Some(locks) = files.get_mut(file) {
            carve(locks, owner, start, end);
            if locks.is_empty() {
                files.remove(file);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn file() -> FileHandle {
        FileHandle(Bytes::from_static(b"f"))
    }

    fn req(owner: u64, kind: LockKind, start: u64, end: u64) -> LockRequest {
        LockRequest {
            owner,
            pid: owner as u32,
            kind,
            start,
            end,
        }
    }

    #[tokio::test]
    async fn local_locks_follow_posix_rules() {
        let l = LocalLocks::default();
        let f = file();
        assert!(l
            .try_lock(&f, &req(1, LockKind::Read, 0, 99))
            .await
            .unwrap());
        // Readers share; a writer conflicts with them; other bytes are free.
        assert!(l
            .try_lock(&f, &req(2, LockKind::Read, 50, 60))
            .await
            .unwrap());
        assert!(!l
            .try_lock(&f, &req(3, LockKind::Write, 10, 10))
            .await
            .unwrap());
        assert!(l
            .try_lock(&f, &req(3, LockKind::Write, 100, TO_EOF))
            .await
            .unwrap());
        let c = l.test(&f, &req(4, LockKind::Read, 200, 300)).await.unwrap();
        assert_eq!(
            c,
            Some(Conflict {
                kind: LockKind::Write,
                start: 100,
                end: TO_EOF,
                pid: 3
            })
        );
        // An owner's own locks never conflict, and upgrading replaces them.
        assert!(l
            .try_lock(&f, &req(1, LockKind::Write, 0, 9))
            .await
            .unwrap());
        // Unlocking the middle of a range splits it.
        l.unlock(&f, 1, 20, 29).await.unwrap();
        assert!(l
            .try_lock(&f, &req(5, LockKind::Write, 20, 29))
            .await
            .unwrap());
        assert!(!l
            .try_lock(&f, &req(5, LockKind::Write, 30, 30))
            .await
            .unwrap());
        assert!(!l.try_lock(&f, &req(5, LockKind::Read, 5, 5)).await.unwrap());
        l.unlock_owner(&f, 1).await.unwrap();
        l.unlock_owner(&f, 2).await.unwrap();
        assert!(l
            .try_lock(&f, &req(5, LockKind::Write, 0, 99))
            .await
            .unwrap());
    }

    #[tokio::test]
    async fn refusing_gives_enolck_and_a_blocked_lock_waits_until_released_or_interrupted() {
        let refuse = Locks::new(Locking::Refuse);
        let err = refuse
            .setlk(1, &file(), 1, 1, 0, TO_EOF, libc::F_WRLCK as u32, 1, false)
            .await
            .unwrap_err();
        assert_eq!(err.raw(), libc::ENOLCK);

        let locks = Arc::new(Locks::new(Locking::Store(Arc::new(LocalLocks::default()))));
        let w = libc::F_WRLCK as u32;
        locks
            .setlk(1, &file(), 1, 1, 0, TO_EOF, w, 1, false)
            .await
            .unwrap();
        let err = locks
            .setlk(1, &file(), 2, 2, 0, 0, w, 2, false)
            .await
            .unwrap_err();
        assert_eq!(err.raw(), libc::EAGAIN);
        // A blocked request is granted once the holder closes the file.
        let waiter = {
            let locks = Arc::clone(&locks);
            tokio::spawn(async move { locks.setlk(1, &file(), 3, 2, 0, 0, w, 2, true).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        locks.release_owner(1, &file(), 1).await;
        waiter.await.unwrap().unwrap();
        // Owner 1 now waits for owner 2, and an interrupt ends the wait with EINTR.
        let waiter = {
            let locks = Arc::clone(&locks);
            tokio::spawn(async move { locks.setlk(1, &file(), 4, 1, 0, 0, w, 1, true).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        locks.interrupt(4);
        let err = waiter.await.unwrap().unwrap_err();
        assert_eq!(err.raw(), libc::EINTR);
    }
}

//! Cluster fencing of a FUSE-served volume with one writer (nfs `access=single`): once fenced, nothing more
//! reaches the server from this host, not even data already buffered for write-behind, so the next owner
//! never sees a write the old one made after losing its claim. Reads go on.
//!
//! The helper fences itself when the daemon's fence deadline passes (the daemon renews it in a file with
//! every lease renewal, so a hung or stopped daemon cannot leave its volumes writable), or at once when
//! the daemon says so (SIGUSR1).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::store::{
    Attr, CookieVerifier, CreateMode, DirPage, FileHandle, FileKind, FileStore, FsStat, NewAttr,
    ReadReply, SetAttr, StoreError, StoreErrorKind, StoreResult,
};

/// Now on CLOCK_MONOTONIC, in nanoseconds: the clock both the daemon and its helpers read, which no
/// wall-clock change moves.
pub fn monotonic_nanos() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => (t.tv_sec() as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(t.tv_nsec() as u64),
        Err(_) => 0,
    }
}

/// The fence deadline a daemon wrote, if the file holds one.
pub fn read_deadline(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Writes the deadline (monotonic nanoseconds) atomically. Not durably: it is rewritten every second
/// or so, and after a crash an old deadline is exactly what must be read.
pub fn write_deadline(path: &Path, deadline: u64) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, deadline.to_string())?;
    std::fs::rename(&tmp, path)
}

/// The switch shared by the store and whoever fences it.
#[derive(Clone, Default)]
pub struct Fence(Arc<AtomicBool>);

impl Fence {
    pub fn fence(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_fenced(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Watches `deadline_file` until the deadline in it passes (or it cannot be read for as long as the
/// grace), then fences. Returns when fenced.
pub async fn watch_deadline(fence: Fence, deadline_file: PathBuf) {
    let mut unreadable_since: Option<u64> = None;
    loop {
        if fence.is_fenced() {
            return;
        }
        let now = monotonic_nanos();
        match read_deadline(&deadline_file) {
            Some(deadline) if now > deadline => {
                tracing::error!(file = %deadline_file.display(), "the daemon's fence deadline passed: this volume no longer accepts writes here");
                fence.fence();
                return;
            }
            Some(_) => unreadable_since = None,
            None => {
                // Between the daemon's atomic rename and our read the file always exists; a missing one
                // for two seconds means the daemon is gone or broken.
                let since = *unreadable_since.get_or_insert(now);
                if now.saturating_sub(since) > 2_000_000_000 {
                    tracing::error!(file = %deadline_file.display(), "the daemon's fence deadline cannot be read: fencing");
                    fence.fence();
                    return;
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A store that refuses every change once fenced.
pub struct FencedStore {
    inner: Arc<dyn FileStore>,
    fence: Fence,
}

impl FencedStore {
    pub fn new(inner: Arc<dyn FileStore>, fence: Fence) -> Self {
        FencedStore { inner, fence }
    }

    fn check(&self) -> StoreResult<()> {
        if self.fence.is_fenced() {
            return Err(StoreError::new(
                StoreErrorKind::Io,
                "fenced: this host lost its claim on the volume",
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl FileStore for FencedStore {
    async fn root(&self) -> StoreResult<FileHandle> {
        self.inner.root().await
    }
    async fn lookup(&self, dir: &FileHandle, name: &[u8]) -> StoreResult<(FileHandle, Attr)> {
        self.inner.lookup(dir, name).await
    }
    async fn getattr(&self, handle: &FileHandle) -> StoreResult<Attr> {
        self.inner.getattr(handle).await
    }
    async fn setattr(&self, handle: &FileHandle, set: &SetAttr) -> StoreResult<Attr> {
        self.check()?;
        self.inner.setattr(handle, set).await
    }
    async fn read(&self, handle: &FileHandle, offset: u64, len: u32) -> StoreResult<ReadReply> {
        self.inner.read(handle, offset, len).await
    }
    async fn write(&self, handle: &FileHandle, offset: u64, data: Bytes) -> StoreResult<u32> {
        self.check()?;
        self.inner.write(handle, offset, data).await
    }
    async fn commit(&self, handle: &FileHandle) -> StoreResult<()> {
        self.check()?;
        self.inner.commit(handle).await
    }
    async fn create(
        &self,
        dir: &FileHandle,
        name: &[u8],
        attr: NewAttr,
        how: CreateMode,
    ) -> StoreResult<(FileHandle, Attr)> {
        self.check()?;
        self.inner.create(dir, name, attr, how).await
    }
    async fn mkdir(
        &self,
        dir: &FileHandle,
        name: &[u8],
        attr: NewAttr,
    ) -> StoreResult<(FileHandle, Attr)> {
        self.check()?;
        self.inner.mkdir(dir, name, attr).await
    }
    async fn symlink(
        &self,
        dir: &FileHandle,
        name: &[u8],
        target: &[u8],
        attr: NewAttr,
    ) -> StoreResult<(FileHandle, Attr)> {
        self.check()?;
        self.inner.symlink(dir, name, target, attr).await
    }
    async fn readlink(&self, handle: &FileHandle) -> StoreResult<Vec<u8>> {
        self.inner.readlink(handle).await
    }
    async fn mknod(
        &self,
        dir: &FileHandle,
        name: &[u8],
        kind: FileKind,
        rdev: (u32, u32),
        attr: NewAttr,
    ) -> StoreResult<(FileHandle, Attr)> {
        self.check()?;
        self.inner.mknod(dir, name, kind, rdev, attr).await
    }
    async fn link(&self, handle: &FileHandle, dir: &FileHandle, name: &[u8]) -> StoreResult<Attr> {
        self.check()?;
        self.inner.link(handle, dir, name).await
    }
    async fn unlink(&self, dir: &FileHandle, name: &[u8]) -> StoreResult<()> {
        self.check()?;
        self.inner.unlink(dir, name).await
    }
    async fn rmdir(&self, dir: &FileHandle, name: &[u8]) -> StoreResult<()> {
        self.check()?;
        self.inner.rmdir(dir, name).await
    }
    async fn rename(
        &self,
        from_dir: &FileHandle,
        from_name: &[u8],
        to_dir: &FileHandle,
        to_name: &[u8],
    ) -> StoreResult<()> {
        self.check()?;
        self.inner
            .rename(from_dir, from_name, to_dir, to_name)
            .await
    }
    async fn readdirplus(
        &self,
        dir: &FileHandle,
        cookie: u64,
        verifier: CookieVerifier,
        max_entries: u32,
    ) -> StoreResult<DirPage> {
        self.inner
            .readdirplus(dir, cookie, verifier, max_entries)
            .await
    }
    async fn statfs(&self, handle: &FileHandle) -> StoreResult<FsStat> {
        self.inner.statfs(handle).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_round_trip_and_the_clock_moves() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("deadline");
        assert_eq!(read_deadline(&f), None);
        let now = monotonic_nanos();
        assert!(now > 0);
        write_deadline(&f, now + 5).unwrap();
        assert_eq!(read_deadline(&f), Some(now + 5));
    }

    #[tokio::test]
    async fn a_passed_deadline_fences() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("deadline");
        write_deadline(&f, monotonic_nanos() + 200_000_000).unwrap();
        let fence = Fence::default();
        let watch = tokio::spawn(watch_deadline(fence.clone(), f));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!fence.is_fenced());
        tokio::time::timeout(std::time::Duration::from_secs(2), watch)
            .await
            .unwrap()
            .unwrap();
        assert!(fence.is_fenced());
    }
}

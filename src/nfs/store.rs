//! `NfsStore`: the FUSE adapter's `FileStore`, served from an NFSv3 export through `HandleOps`.
//!
//! It owns the translation between the store's contract and NFS: handles and attributes, errors into
//! the store's kinds, the owner of new objects, and the durability of writes. It is rooted at one
//! directory (a volume's directory, not the export root), but like any NFS client it cannot stop a
//! handle from naming something outside it: the adapter only hands out handles it got from this root.
//!
//! Writes are UNSTABLE by default and made durable by `commit` (the adapter commits on fsync and close).
//! The server's write verifier is checked: if it changed between a file's writes and its commit, the
//! server restarted and may have dropped the data, and `commit` fails with `Io` instead of reporting a
//! durability it cannot promise.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::fuse::{
    Attr, CookieVerifier, CreateMode, DirEntry, DirPage, FileHandle as StoreHandle, FileKind,
    FileStore, FsStat, NewAttr, ReadReply, SetAttr, SetTime as StoreTime, StoreError,
    StoreErrorKind, StoreResult,
};

use super::attr::{CreateHow, Fattr, FileHandle, SetAttrs, SetTime, Special, Stability};
use super::client::NfsClient;
use super::error::NfsError;
use super::ops::{HandleOps, WriteVerifier};
use crate::sync::Recover;

/// A `FileStore` over one directory of an NFS export. Cheap to share: calls run concurrently on the
/// client's connection pool, each under the client's deadline.
pub struct NfsStore {
    ops: HandleOps,
    root: FileHandle,
    stability: Stability,
    /// Files with UNSTABLE writes not yet committed, and the verifier of their first such write.
    uncommitted: Mutex<HashMap<FileHandle, Uncommitted>>,
    /// Makes EXCLUSIVE create verifiers unique per store and call.
    create_serial: AtomicU64,
    /// Distinguishes this store's verifiers from those of other stores and processes.
    create_salt: u64,
}

#[derive(Debug, Clone, Copy)]
struct Uncommitted {
    verifier: WriteVerifier,
    /// A later write came back with another verifier: the server restarted in between.
    verifier_changed: bool,
}

impl std::fmt::Debug for NfsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NfsStore")
            .field("client", self.ops.client())
            .field("root", &self.root)
            .field("stability", &self.stability)
            .finish_non_exhaustive()
    }
}

impl NfsStore {
    /// A store rooted at the directory `root` of `client`'s export, writing UNSTABLE.
    pub fn new(client: &NfsClient, root: FileHandle) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Self {
            ops: client.handle_ops(),
            root,
            stability: Stability::Unstable,
            uncommitted: Mutex::new(HashMap::new()),
            create_serial: AtomicU64::new(0),
            create_salt: nanos ^ (u64::from(std::process::id()) << 32),
        }
    }

    /// A store rooted at the directory `path` (relative to the export root).
    pub async fn open(client: &NfsClient, path: &str) -> Result<Self, NfsError> {
        let root = client.lookup_path(path).await?;
        Ok(Self::new(client, root))
    }

    /// Writes with `stability` instead of UNSTABLE; with `FileSync` every write is durable when it
    /// returns and `commit` has nothing left to do on the server.
    pub fn with_stability(mut self, stability: Stability) -> Self {
        self.stability = stability;
        self
    }

    fn verifier(&self) -> [u8; 8] {
        let serial = self.create_serial.fetch_add(1, Ordering::Relaxed);
        (self.create_salt ^ serial.rotate_left(17)).to_le_bytes()
    }

    fn note_unstable_write(&self, fh: &FileHandle, verifier: WriteVerifier) {
        let mut map = self.uncommitted.lock().recover();
        map.entry(fh.clone())
            .and_modify(|u| u.verifier_changed |= u.verifier != verifier)
            .or_insert(Uncommitted {
                verifier,
                verifier_changed: false,
            });
    }
}

fn handle(h: &StoreHandle) -> FileHandle {
    FileHandle::from_bytes(h.0.clone())
}

fn store_handle(h: &FileHandle) -> StoreHandle {
    StoreHandle(h.to_bytes())
}

fn attr(a: &Fattr) -> Attr {
    Attr {
        kind: match a.kind {
            super::attr::FileKind::File => FileKind::File,
            super::attr::FileKind::Directory => FileKind::Directory,
            super::attr::FileKind::Symlink => FileKind::Symlink,
            super::attr::FileKind::Fifo => FileKind::Fifo,
            super::attr::FileKind::Socket => FileKind::Socket,
            super::attr::FileKind::CharDevice => FileKind::CharDevice,
            super::attr::FileKind::BlockDevice => FileKind::BlockDevice,
        },
        mode: a.mode,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        size: a.size,
        used: a.used,
        fileid: a.fileid,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        rdev: a.rdev,
    }
}

fn entry(fh: FileHandle, a: Fattr) -> (StoreHandle, Attr) {
    (store_handle(&fh), attr(&a))
}

fn new_attrs(a: NewAttr) -> SetAttrs {
    SetAttrs::owner_and_mode(a.mode & 0o7777, a.uid, a.gid)
}

fn set_time(t: Option<StoreTime>) -> SetTime {
    match t {
        None => SetTime::DontChange,
        Some(StoreTime::Now) => SetTime::ServerTime,
        Some(StoreTime::At(t)) => SetTime::ClientTime(t),
    }
}

/// The store's kind for an NFS failure; the message is the client's, which names the server and the
/// operation.
fn store_error(e: NfsError) -> StoreError {
    let kind = if e.is_timeout() {
        StoreErrorKind::TimedOut
    } else {
        match e.errno() {
            libc::ENOENT => StoreErrorKind::NotFound,
            libc::EEXIST => StoreErrorKind::Exists,
            libc::ENOTEMPTY => StoreErrorKind::NotEmpty,
            libc::ENOTDIR => StoreErrorKind::NotDir,
            libc::EISDIR => StoreErrorKind::IsDir,
            libc::EACCES => StoreErrorKind::Access,
            libc::EPERM => StoreErrorKind::Perm,
            libc::ENOSPC | libc::EDQUOT => StoreErrorKind::NoSpace,
            libc::ESTALE => StoreErrorKind::Stale,
            libc::ENAMETOOLONG => StoreErrorKind::NameTooLong,
            libc::EROFS => StoreErrorKind::ReadOnly,
            libc::EINVAL => StoreErrorKind::Invalid,
            libc::EFBIG => StoreErrorKind::TooBig,
            libc::EXDEV => StoreErrorKind::CrossDevice,
            libc::EMLINK => StoreErrorKind::TooManyLinks,
            libc::EOPNOTSUPP => StoreErrorKind::NotSupported,
            _ => StoreErrorKind::Io,
        }
    };
    StoreError::new(kind, e.to_string())
}

#[async_trait]
impl FileStore for NfsStore {
    /// The root directory, checked with a GETATTR so that mounting an unreachable or removed volume
    /// fails at once.
    async fn root(&self) -> StoreResult<StoreHandle> {
        let a = self.ops.getattr(&self.root).await.map_err(store_error)?;
        if a.kind != super::attr::FileKind::Directory {
            return Err(StoreError::new(
                StoreErrorKind::NotDir,
                "the volume's root on the nfs export is not a directory",
            ));
        }
        Ok(store_handle(&self.root))
    }

    async fn lookup(&self, dir: &StoreHandle, name: &[u8]) -> StoreResult<(StoreHandle, Attr)> {
        let (fh, a) = self
            .ops
            .lookup(&handle(dir), name)
            .await
            .map_err(store_error)?;
        Ok(entry(fh, a))
    }

    async fn getattr(&self, h: &StoreHandle) -> StoreResult<Attr> {
        let a = self.ops.getattr(&handle(h)).await.map_err(store_error)?;
        Ok(attr(&a))
    }

    async fn setattr(&self, h: &StoreHandle, set: &SetAttr) -> StoreResult<Attr> {
        let set = SetAttrs {
            mode: set.mode.map(|m| m & 0o7777),
            uid: set.uid,
            gid: set.gid,
            size: set.size,
            atime: set_time(set.atime),
            mtime: set_time(set.mtime),
        };
        let a = self
            .ops
            .setattr(&handle(h), &set)
            .await
            .map_err(store_error)?;
        Ok(attr(&a))
    }

    /// Fills `len` bytes unless the file ends first: a server may answer a READ with less.
    async fn read(&self, h: &StoreHandle, offset: u64, len: u32) -> StoreResult<ReadReply> {
        let fh = handle(h);
        let (first, eof) = self.ops.read(&fh, offset, len).await.map_err(store_error)?;
        if eof || first.len() >= len as usize {
            return Ok(ReadReply { data: first, eof });
        }
        let mut data = BytesMut::from(&first[..]);
        let mut eof = false;
        while data.len() < len as usize && !eof {
            let got = data.len() as u32;
            let (more, at_end) = self
                .ops
                .read(&fh, offset + u64::from(got), len - got)
                .await
                .map_err(store_error)?;
            // No bytes and not the end would loop forever; treat it as the end, as the kernel would.
            eof = at_end || more.is_empty();
            data.extend_from_slice(&more);
        }
        Ok(ReadReply {
            data: data.freeze(),
            eof,
        })
    }

    async fn write(&self, h: &StoreHandle, offset: u64, data: Bytes) -> StoreResult<u32> {
        let fh = handle(h);
        let w = self
            .ops
            .write(&fh, offset, &data, self.stability)
            .await
            .map_err(store_error)?;
        if w.committed == Stability::Unstable {
            self.note_unstable_write(&fh, w.verifier);
        }
        Ok(w.count)
    }

    async fn commit(&self, h: &StoreHandle) -> StoreResult<()> {
        let fh = handle(h);
        let pending = self.uncommitted.lock().recover().get(&fh).copied();
        let Some(pending) = pending else {
            // Nothing written UNSTABLE since the last commit: nothing the server could still lose.
            return Ok(());
        };
        let verifier = self.ops.commit(&fh).await.map_err(store_error)?;
        self.uncommitted.lock().recover().remove(&fh);
        if pending.verifier_changed || pending.verifier != verifier {
            return Err(StoreError::new(
                StoreErrorKind::Io,
                format!(
                    "{} restarted before written data was committed; data written since the last fsync may be lost",
                    self.ops.client().endpoint()
                ),
            ));
        }
        Ok(())
    }

    async fn create(
        &self,
        dir: &StoreHandle,
        name: &[u8],
        new: NewAttr,
        how: CreateMode,
    ) -> StoreResult<(StoreHandle, Attr)> {
        let dir = handle(dir);
        let attrs = new_attrs(new);
        match how {
            // GUARDED, then the existing file on EXIST: an UNCHECKED create may apply the new mode and
            // owner to a file that exists, which open(2) without O_EXCL must never do.
            CreateMode::Unchecked => {
                match self
                    .ops
                    .create(&dir, name, CreateHow::Guarded, &attrs)
                    .await
                {
                    Ok((fh, a)) => Ok(entry(fh, a)),
                    Err(e) if e.errno() == libc::EEXIST => {
                        let (fh, a) = self.ops.lookup(&dir, name).await.map_err(store_error)?;
                        if a.kind == super::attr::FileKind::Directory {
                            return Err(StoreError::new(
                                StoreErrorKind::IsDir,
                                format!(
                                    "{:?} is a directory",
                                    String::from_utf8_lossy(name).as_ref()
                                ),
                            ));
                        }
                        Ok(entry(fh, a))
                    }
                    Err(e) => Err(store_error(e)),
                }
            }
            // EXCLUSIVE rather than GUARDED: if the reply is lost and the call repeated on a new
            // connection, the same verifier makes the server answer "created" again, not "exists".
            CreateMode::Exclusive => {
                let how = CreateHow::Exclusive(self.verifier());
                let (fh, a) = self
                    .ops
                    .create(&dir, name, how, &attrs)
                    .await
                    .map_err(store_error)?;
                Ok(entry(fh, a))
            }
        }
    }

    async fn mkdir(
        &self,
        dir: &StoreHandle,
        name: &[u8],
        new: NewAttr,
    ) -> StoreResult<(StoreHandle, Attr)> {
        let (fh, a) = self
            .ops
            .mkdir(&handle(dir), name, &new_attrs(new))
            .await
            .map_err(store_error)?;
        Ok(entry(fh, a))
    }

    async fn symlink(
        &self,
        dir: &StoreHandle,
        name: &[u8],
        target: &[u8],
        new: NewAttr,
    ) -> StoreResult<(StoreHandle, Attr)> {
        let owner = SetAttrs {
            uid: Some(new.uid),
            gid: Some(new.gid),
            ..SetAttrs::default()
        };
        let (fh, a) = self
            .ops
            .symlink(&handle(dir), name, target, &owner)
            .await
            .map_err(store_error)?;
        Ok(entry(fh, a))
    }

    async fn readlink(&self, h: &StoreHandle) -> StoreResult<Vec<u8>> {
        self.ops.readlink(&handle(h)).await.map_err(store_error)
    }

    async fn mknod(
        &self,
        dir: &StoreHandle,
        name: &[u8],
        kind: FileKind,
        rdev: (u32, u32),
        new: NewAttr,
    ) -> StoreResult<(StoreHandle, Attr)> {
        let what = match kind {
            FileKind::Fifo => Special::Fifo,
            FileKind::Socket => Special::Socket,
            FileKind::CharDevice => Special::CharDevice(rdev.0, rdev.1),
            FileKind::BlockDevice => Special::BlockDevice(rdev.0, rdev.1),
            FileKind::File | FileKind::Directory | FileKind::Symlink => {
                return Err(StoreError::new(
                    StoreErrorKind::Invalid,
                    format!("mknod cannot make a {kind:?}; it makes fifos, sockets and devices"),
                ))
            }
        };
        let (fh, a) = self
            .ops
            .mknod(&handle(dir), name, what, &new_attrs(new))
            .await
            .map_err(store_error)?;
        Ok(entry(fh, a))
    }

    async fn link(&self, h: &StoreHandle, dir: &StoreHandle, name: &[u8]) -> StoreResult<Attr> {
        let a = self
            .ops
            .link(&handle(h), &handle(dir), name)
            .await
            .map_err(store_error)?;
        Ok(attr(&a))
    }

    async fn unlink(&self, dir: &StoreHandle, name: &[u8]) -> StoreResult<()> {
        self.ops
            .remove(&handle(dir), name)
            .await
            .map_err(store_error)
    }

    async fn rmdir(&self, dir: &StoreHandle, name: &[u8]) -> StoreResult<()> {
        self.ops
            .rmdir(&handle(dir), name)
            .await
            .map_err(store_error)
    }

    async fn rename(
        &self,
        from_dir: &StoreHandle,
        from_name: &[u8],
        to_dir: &StoreHandle,
        to_name: &[u8],
    ) -> StoreResult<()> {
        self.ops
            .rename(&handle(from_dir), from_name, &handle(to_dir), to_name)
            .await
            .map_err(store_error)
    }

    async fn readdirplus(
        &self,
        dir: &StoreHandle,
        cookie: u64,
        verifier: CookieVerifier,
        max_entries: u32,
    ) -> StoreResult<DirPage> {
        let page = self
            .ops
            .readdirplus(&handle(dir), cookie, verifier, max_entries)
            .await
            .map_err(store_error)?;
        Ok(DirPage {
            entries: page
                .entries
                .into_iter()
                .map(|e| DirEntry {
                    name: e.name,
                    cookie: e.cookie,
                    handle: store_handle(&e.handle),
                    attr: attr(&e.attr),
                })
                .collect(),
            verifier: page.cookieverf,
            eof: page.eof,
        })
    }

    async fn statfs(&self, h: &StoreHandle) -> StoreResult<FsStat> {
        let s = self.ops.fsstat(&handle(h)).await.map_err(store_error)?;
        Ok(FsStat {
            total_bytes: s.total_bytes,
            free_bytes: s.free_bytes,
            avail_bytes: s.avail_bytes,
            total_files: s.total_files,
            free_files: s.free_files,
            avail_files: s.avail_files,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nfs3_client::nfs3_types::nfs3::nfsstat3;
    use std::time::Duration;

    fn status(status: nfsstat3) -> NfsError {
        NfsError::Status {
            at: super::super::error::Endpoint {
                server: "192.0.2.7".parse().unwrap(),
                export: "/srv".into(),
            },
            op: "lookup",
            path: "x".into(),
            status,
        }
    }

    #[test]
    fn nfs_failures_become_store_kinds_with_the_same_errno() {
        for (s, kind) in [
            (nfsstat3::NFS3ERR_NOENT, StoreErrorKind::NotFound),
            (nfsstat3::NFS3ERR_EXIST, StoreErrorKind::Exists),
            (nfsstat3::NFS3ERR_NOTEMPTY, StoreErrorKind::NotEmpty),
            (nfsstat3::NFS3ERR_NOTDIR, StoreErrorKind::NotDir),
            (nfsstat3::NFS3ERR_ISDIR, StoreErrorKind::IsDir),
            (nfsstat3::NFS3ERR_ACCES, StoreErrorKind::Access),
            (nfsstat3::NFS3ERR_PERM, StoreErrorKind::Perm),
            (nfsstat3::NFS3ERR_NOSPC, StoreErrorKind::NoSpace),
            (nfsstat3::NFS3ERR_DQUOT, StoreErrorKind::NoSpace),
            (nfsstat3::NFS3ERR_STALE, StoreErrorKind::Stale),
            (nfsstat3::NFS3ERR_BADHANDLE, StoreErrorKind::Stale),
            (nfsstat3::NFS3ERR_NAMETOOLONG, StoreErrorKind::NameTooLong),
            (nfsstat3::NFS3ERR_ROFS, StoreErrorKind::ReadOnly),
            (nfsstat3::NFS3ERR_INVAL, StoreErrorKind::Invalid),
            (nfsstat3::NFS3ERR_FBIG, StoreErrorKind::TooBig),
            (nfsstat3::NFS3ERR_XDEV, StoreErrorKind::CrossDevice),
            (nfsstat3::NFS3ERR_MLINK, StoreErrorKind::TooManyLinks),
            (nfsstat3::NFS3ERR_NOTSUPP, StoreErrorKind::NotSupported),
            (nfsstat3::NFS3ERR_IO, StoreErrorKind::Io),
            (nfsstat3::NFS3ERR_SERVERFAULT, StoreErrorKind::Io),
        ] {
            let err = status(s);
            let errno = err.errno();
            let store = store_error(err);
            assert_eq!(store.kind, kind, "{s:?}");
            if ![nfsstat3::NFS3ERR_DQUOT, nfsstat3::NFS3ERR_BADHANDLE].contains(&s) {
                assert_eq!(store.errno(), errno, "{s:?}");
            }
            assert!(store.message.contains("192.0.2.7"), "{}", store.message);
        }
        let timeout = NfsError::Timeout {
            at: super::super::error::Endpoint {
                server: "192.0.2.7".parse().unwrap(),
                export: "/srv".into(),
            },
            op: "read",
            path: "".into(),
            timeout: Duration::from_secs(1),
        };
        let store = store_error(timeout);
        assert_eq!(store.kind, StoreErrorKind::TimedOut);
        assert_eq!(store.errno(), libc::EIO);
    }
}

//! `FileStore`: the remote filesystem that a FUSE mount serves, in NFSv3 terms.
//!
//! This module owns the contract between the FUSE adapter and whatever holds the data: opaque file
//! handles, attributes, the operations, and the one mapping from `StoreError` to an errno. It is shaped after
//! NFSv3 (handles, not paths; cookies and cookie verifiers for directory paging; unstable writes made durable
//! by `commit`) so that an NFS client can implement it without translation. It must not know about FUSE,
//! inode numbers or the kernel: those belong to the adapter in `super`.
//!
//! Every implementation enforces its own deadline: a call that cannot reach its server returns
//! `StoreErrorKind::TimedOut` after that deadline instead of waiting forever. The deadline covers a whole
//! request of the adapter, not each store call: the adapter runs each request inside `as_request`, and a
//! store ends every call made for it by `request_started()` plus its timeout, so a system call fails within
//! the timeout however many calls it needs.

use std::fmt;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;

tokio::task_local! {
    /// When the request that the current task serves began.
    static REQUEST_STARTED: Instant;
}

/// When the adapter's request that the current task serves began, if it serves one. Work spawned into
/// other tasks (write-behind) is not part of the request and has its own deadline.
pub fn request_started() -> Option<Instant> {
    REQUEST_STARTED.try_with(|t| *t).ok()
}

/// Runs `f` as one request that begins now; see `request_started`.
pub async fn as_request<F: std::future::Future>(f: F) -> F::Output {
    REQUEST_STARTED.scope(Instant::now(), f).await
}

/// An opaque, stable reference to one file, directory or symlink (an NFSv3 `nfs_fh3`: at most 64 bytes).
/// Two handles are the same object exactly when their bytes are equal.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct FileHandle(pub Bytes);

impl fmt::Debug for FileHandle {
    // Hex, because handles are binary and a log line with raw bytes is unreadable.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FileHandle(")?;
        for b in self.0.iter() {
            write!(f, "{b:02x}")?;
        }
        f.write_str(")")
    }
}

/// What kind of object a handle names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    File,
    Directory,
    Symlink,
    /// A named pipe; its data never goes through the store (the kernel connects the two ends).
    Fifo,
    /// The name of a Unix domain socket; likewise only a name in the store.
    Socket,
    CharDevice,
    BlockDevice,
}

/// The attributes of an object (NFSv3 `fattr3`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub kind: FileKind,
    /// Permission bits only (`0o7777`); the kind is in `kind`.
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    /// Length in bytes.
    pub size: u64,
    /// Bytes of storage actually used (less than `size` for a sparse file).
    pub used: u64,
    /// The server's stable number for the object; hard links share it.
    pub fileid: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    /// Major and minor number of a device; zero for other kinds.
    pub rdev: (u32, u32),
}

/// A time to set: the server's clock, or a given instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetTime {
    Now,
    At(SystemTime),
}

/// Attributes to change (NFSv3 `sattr3`); `None` leaves a field as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Truncates or extends (with zeros) to this length.
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// The owner and permissions of an object being created: the caller's uid and gid, and the mode after the
/// kernel applied the umask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewAttr {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// How `create` treats an existing name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreateMode {
    /// Open the existing file if there is one (NFSv3 UNCHECKED, without a size attribute).
    Unchecked,
    /// Fail with `Exists` if the name exists (`O_EXCL`; NFSv3 GUARDED or EXCLUSIVE).
    Exclusive,
}

/// The result of a read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadReply {
    /// At most the requested length; shorter only at the end of the file.
    pub data: Bytes,
    /// The read reached the end of the file.
    pub eof: bool,
}

/// NFSv3's `cookieverf3`: returned with each page of a directory and passed back to continue it. Zero starts
/// a listing.
pub type CookieVerifier = [u8; 8];

/// One entry of a directory listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// A single path component, never `.` or `..`.
    pub name: Vec<u8>,
    /// Passing this cookie back continues the listing after this entry. Never zero.
    pub cookie: u64,
    pub handle: FileHandle,
    pub attr: Attr,
}

/// One page of a directory listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirPage {
    pub entries: Vec<DirEntry>,
    pub verifier: CookieVerifier,
    /// No entries follow the last one of this page.
    pub eof: bool,
}

/// Capacity and free space of the filesystem holding a handle (NFSv3 `FSSTAT`), in bytes and file slots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsStat {
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// Free bytes available to an unprivileged user.
    pub avail_bytes: u64,
    pub total_files: u64,
    pub free_files: u64,
    pub avail_files: u64,
}

/// Why a store operation failed, as an errno-like class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreErrorKind {
    NotFound,
    Exists,
    NotEmpty,
    NotDir,
    IsDir,
    /// The caller lacks the permission (NFS3ERR_ACCES).
    Access,
    /// The operation needs ownership or privilege (NFS3ERR_PERM).
    Perm,
    NoSpace,
    /// The handle no longer names an object (NFS3ERR_STALE).
    Stale,
    NameTooLong,
    ReadOnly,
    /// A bad argument: renaming a directory into itself, a bad cookie, a name like `.`.
    Invalid,
    /// The file would grow past the server's largest size (NFS3ERR_FBIG).
    TooBig,
    /// A rename or hard link across filesystems of the server (NFS3ERR_XDEV): `mv` copies instead.
    CrossDevice,
    /// The object has as many hard links as the server allows (NFS3ERR_MLINK).
    TooManyLinks,
    /// The object is of a kind this operation does not handle.
    NotSupported,
    /// The server failed or spoke nonsense; the message says how.
    Io,
    /// The server did not answer within the store's deadline.
    TimedOut,
}

/// A failed store operation: its kind, and a lowercase message for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StoreError {
    pub kind: StoreErrorKind,
    pub message: String,
}

impl StoreError {
    pub fn new(kind: StoreErrorKind, message: impl Into<String>) -> Self {
        StoreError {
            kind,
            message: message.into(),
        }
    }

    /// The errno that the kernel gives the application for this failure. This is the one place that decides
    /// it. A timeout is `EIO`, not `ETIMEDOUT`: applications treat `EIO` as "the storage failed", which is what
    /// happened, and many do not expect `ETIMEDOUT` from a file operation.
    pub fn errno(&self) -> i32 {
        self.kind.errno()
    }
}

impl StoreErrorKind {
    /// See `StoreError::errno`.
    pub fn errno(self) -> i32 {
        match self {
            StoreErrorKind::NotFound => libc::ENOENT,
            StoreErrorKind::Exists => libc::EEXIST,
            StoreErrorKind::NotEmpty => libc::ENOTEMPTY,
            StoreErrorKind::NotDir => libc::ENOTDIR,
            StoreErrorKind::IsDir => libc::EISDIR,
            StoreErrorKind::Access => libc::EACCES,
            StoreErrorKind::Perm => libc::EPERM,
            StoreErrorKind::NoSpace => libc::ENOSPC,
            // ESTALE is what the kernel NFS client reports too; tools print "stale file handle".
            StoreErrorKind::Stale => libc::ESTALE,
            StoreErrorKind::NameTooLong => libc::ENAMETOOLONG,
            StoreErrorKind::ReadOnly => libc::EROFS,
            StoreErrorKind::Invalid => libc::EINVAL,
            StoreErrorKind::TooBig => libc::EFBIG,
            StoreErrorKind::CrossDevice => libc::EXDEV,
            StoreErrorKind::TooManyLinks => libc::EMLINK,
            StoreErrorKind::NotSupported => libc::EOPNOTSUPP,
            StoreErrorKind::Io | StoreErrorKind::TimedOut => libc::EIO,
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A filesystem reachable through handles: what a FUSE mount serves.
///
/// Names are single path components as bytes (never containing `/`). Methods that create an object return
/// its handle and attributes, so the adapter never needs a second round trip.
#[async_trait]
pub trait FileStore: Send + Sync + 'static {
    /// The handle of the volume's root directory.
    async fn root(&self) -> StoreResult<FileHandle>;

    /// Finds `name` in the directory `dir`.
    async fn lookup(&self, dir: &FileHandle, name: &[u8]) -> StoreResult<(FileHandle, Attr)>;

    async fn getattr(&self, handle: &FileHandle) -> StoreResult<Attr>;

    /// Changes attributes and returns the new ones.
    async fn setattr(&self, handle: &FileHandle, set: &SetAttr) -> StoreResult<Attr>;

    /// Reads up to `len` bytes at `offset`.
    async fn read(&self, handle: &FileHandle, offset: u64, len: u32) -> StoreResult<ReadReply>;

    /// Writes `data` at `offset` and returns how many bytes were taken (possibly fewer than given). The data
    /// may be held unstably by the server until `commit`.
    async fn write(&self, handle: &FileHandle, offset: u64, data: Bytes) -> StoreResult<u32>;

    /// Makes all writes to the file durable (fsync).
    async fn commit(&self, handle: &FileHandle) -> StoreResult<()>;

    /// Creates a regular file (or, with `CreateMode::Unchecked`, opens an existing one).
    async fn create(
        &self,
        dir: &FileHandle,
        name: &[u8],
        attr: NewAttr,
        how: CreateMode,
    ) -> StoreResult<(FileHandle, Attr)>;

    async fn mkdir(
        &self,
        dir: &FileHandle,
        name: &[u8],
        attr: NewAttr,
    ) -> StoreResult<(FileHandle, Attr)>;

    /// Creates a symlink named `name` pointing at `target`. `attr.mode` is ignored by most servers.
    async fn symlink(
        &self,
        dir: &FileHandle,
        name: &[u8],
        target: &[u8],
        attr: NewAttr,
    ) -> StoreResult<(FileHandle, Attr)>;

    async fn readlink(&self, handle: &FileHandle) -> StoreResult<Vec<u8>>;

    /// Creates a special file: `kind` is `Fifo`, `Socket`, `CharDevice` or `BlockDevice` (with `rdev`, the
    /// major and minor number); any other kind is `Invalid`. A store without special files says
    /// `NotSupported`.
    async fn mknod(
        &self,
        dir: &FileHandle,
        name: &[u8],
        kind: FileKind,
        rdev: (u32, u32),
        attr: NewAttr,
    ) -> StoreResult<(FileHandle, Attr)> {
        let _ = (dir, name, kind, rdev, attr);
        Err(StoreError::new(
            StoreErrorKind::NotSupported,
            "this store cannot make special files",
        ))
    }

    /// Adds the name `name` in `dir` for the existing object `handle`; returns its new attributes.
    async fn link(&self, handle: &FileHandle, dir: &FileHandle, name: &[u8]) -> StoreResult<Attr>;

    /// Removes a non-directory name.
    async fn unlink(&self, dir: &FileHandle, name: &[u8]) -> StoreResult<()>;

    /// Removes an empty directory.
    async fn rmdir(&self, dir: &FileHandle, name: &[u8]) -> StoreResult<()>;

    /// Renames, replacing an existing target of a compatible kind (a file over a file, a directory over an
    /// empty directory).
    async fn rename(
        &self,
        from_dir: &FileHandle,
        from_name: &[u8],
        to_dir: &FileHandle,
        to_name: &[u8],
    ) -> StoreResult<()>;

    /// Lists up to `max_entries` entries of `dir` after `cookie` (0: from the start), with handles and
    /// attributes. `verifier` is zero with cookie 0, otherwise the one the previous page returned.
    async fn readdirplus(
        &self,
        dir: &FileHandle,
        cookie: u64,
        verifier: CookieVerifier,
        max_entries: u32,
    ) -> StoreResult<DirPage>;

    async fn statfs(&self, handle: &FileHandle) -> StoreResult<FsStat>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_maps_to_its_errno() {
        let table = [
            (StoreErrorKind::NotFound, libc::ENOENT),
            (StoreErrorKind::Exists, libc::EEXIST),
            (StoreErrorKind::NotEmpty, libc::ENOTEMPTY),
            (StoreErrorKind::NotDir, libc::ENOTDIR),
            (StoreErrorKind::IsDir, libc::EISDIR),
            (StoreErrorKind::Access, libc::EACCES),
            (StoreErrorKind::Perm, libc::EPERM),
            (StoreErrorKind::NoSpace, libc::ENOSPC),
            (StoreErrorKind::Stale, libc::ESTALE),
            (StoreErrorKind::NameTooLong, libc::ENAMETOOLONG),
            (StoreErrorKind::ReadOnly, libc::EROFS),
            (StoreErrorKind::Invalid, libc::EINVAL),
            (StoreErrorKind::TooBig, libc::EFBIG),
            (StoreErrorKind::CrossDevice, libc::EXDEV),
            (StoreErrorKind::TooManyLinks, libc::EMLINK),
            (StoreErrorKind::NotSupported, libc::EOPNOTSUPP),
            (StoreErrorKind::Io, libc::EIO),
            (StoreErrorKind::TimedOut, libc::EIO),
        ];
        for (kind, errno) in table {
            assert_eq!(StoreError::new(kind, "x").errno(), errno, "{kind:?}");
        }
    }

    #[test]
    fn handles_print_as_hex() {
        let h = FileHandle(Bytes::from_static(&[0x01, 0xab]));
        assert_eq!(format!("{h:?}"), "FileHandle(01ab)");
    }
}

//! FUSE: serves a `FileStore` as a mounted filesystem, for backends whose data the kernel cannot mount itself
//! (NFS on a kernel without an NFS client).
//!
//! This module owns the kernel-facing side only: mounting and unmounting, translating FUSE requests into
//! `FileStore` calls, inode numbers (`inode`), and the few things the kernel expects that a stateless remote
//! store does not give: keeping an unlinked-but-open file alive, committing writes on close, and paging
//! directories with cookies, and write-behind (`write_behind`): a WRITE is acknowledged once its data is
//! copied and the store write started, with a bounded amount in flight per file, as the kernel NFS client
//! does; close-to-open consistency (an open asks the store for the file's attributes and makes the kernel
//! drop what it cached of a file changed since its last open here). Advisory locks are `locks`' business.
//! Everything about where the data lives is in the store (`store` defines the contract, `memory` is the
//! in-memory double). It must not retry, cache
//! data beyond the writes in flight or enforce deadlines: the store owns its deadline (each request runs in
//! `store::as_request`, which tells the store when the system call began), and the kernel owns the page
//! cache and permission checks (`default_permissions`).
//!
//! Mounting and the kernel's messages are `session`'s and `wire`'s; unmounting goes through the real
//! `SystemMounter`, as every umount2(2) does (a FUSE mount has no recording double: there is no session
//! without the kernel).
//!
//! Every request runs in its own task (`session` spawns one per request) and holds no lock across a store
//! call, so a request stuck on an unreachable server never delays the others.

pub mod fence;
mod inode;
pub mod locks;
pub mod memory;
mod session;
pub mod store;
mod wire;
mod write_behind;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use polyfuse_kernel as k;
use wire::{DirBuf, FileAttr, FileType, Op, Reply};

pub use inode::{InodeTable, ROOT_INODE};
pub use memory::MemoryStore;
pub use store::{
    Attr, CookieVerifier, CreateMode, DirEntry, DirPage, FileHandle, FileKind, FileStore, FsStat,
    NewAttr, ReadReply, SetAttr, SetTime, StoreError, StoreErrorKind, StoreResult,
};

use crate::mount::{MountError, Mounter, SystemMounter};
use crate::sync::Recover;
use inode::{Hidden, Version};
use write_behind::WriteBehind;

/// The largest read and write the kernel sends in one request: 1 MiB, the kernel's ceiling (256 pages) and
/// the usual NFS rsize/wsize, so one FUSE request becomes one NFS call.
pub const MAX_IO: u32 = 1 << 20;

/// How many directory entries to ask the store for per FUSE readdir. The kernel's reply buffer usually holds
/// a few dozen; more would be fetched only to be thrown away.
const DIR_PAGE: u32 = 128;

/// The block size reported to `statfs` and used to count blocks.
const BLOCK: u64 = 4096;

/// FUSE's open reply flag that keeps the kernel's cached pages of the file.
const FOPEN_KEEP_CACHE: u32 = k::FOPEN_KEEP_CACHE;

#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error(
        "/dev/fuse is missing; load the fuse module (modprobe fuse) or give the plugin the device"
    )]
    NoDevice,
    #[error("cannot reach the volume's root through the store: {0}")]
    Root(#[source] StoreError),
    #[error("cannot mount FUSE on {path}: {source}")]
    Mount {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot unmount {path}: {errno}{}", if *.errno == nix::errno::Errno::EBUSY { "; a process still uses it, stop it and try again" } else { "" })]
    Unmount {
        path: PathBuf,
        errno: nix::errno::Errno,
    },
    #[error("the FUSE session on {path} ended with an error: {source}")]
    Session {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How to mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// How long the kernel may trust attributes and names before asking again.
    pub attr_ttl: Duration,
    /// Let users other than the mounting one (root) use the mount: needed for containers with other uids.
    pub allow_other: bool,
    /// The source column of the mount table, e.g. `ferry-nfs:VOLUME`.
    pub fsname: String,
    /// Shown as the type `fuse.SUBTYPE` in the mount table.
    pub subtype: String,
    /// What `fcntl` locks on the mount do; by default they fail with ENOLCK.
    pub locks: locks::Locking,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            attr_ttl: Duration::from_secs(1),
            allow_other: false,
            fsname: "ferry".into(),
            subtype: "ferry".into(),
            locks: locks::Locking::Refuse,
        }
    }
}

/// A mounted FUSE filesystem. `unmount` unmounts and waits. Dropping a handle whose session still runs
/// unmounts in the background, never lazily: if a process still uses the mount, its connection is cut
/// instead, so it answers "transport endpoint is not connected" at once (rather than waiting on a session
/// nobody will end) until it is unmounted once that process has left. So unmount explicitly.
pub struct MountHandle {
    /// Reports once the session has ended (the filesystem is unmounted or its connection cut).
    session: Option<tokio::sync::oneshot::Receiver<std::io::Result<()>>>,
    channel: Arc<session::Channel>,
    mountpoint: PathBuf,
    /// Writes the session acknowledged may still be on their way when it ends; `finished` waits for them.
    writes: Arc<WriteBehind>,
}

impl std::fmt::Debug for MountHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountHandle")
            .field("mountpoint", &self.mountpoint)
            .finish_non_exhaustive()
    }
}

impl MountHandle {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts and waits for the session to end. If a process still uses the mount this fails with
    /// `Unmount` (EBUSY) and the filesystem stays mounted and served; call again later. Succeeds if someone
    /// already unmounted it.
    pub async fn unmount(&mut self) -> Result<(), FuseError> {
        if self.session.is_none() {
            return Ok(());
        }
        let path = self.mountpoint.clone();
        // A FUSE mount is always the kernel's, so the real mounter; it succeeds if someone unmounted it
        // already.
        let result = tokio::task::spawn_blocking(move || SystemMounter.unmount(&path)).await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(MountError::Unmount { errno, .. })) => {
                return Err(FuseError::Unmount {
                    path: self.mountpoint.clone(),
                    errno,
                })
            }
            Ok(Err(other)) => {
                return Err(FuseError::Session {
                    path: self.mountpoint.clone(),
                    source: std::io::Error::other(other.to_string()),
                })
            }
            Err(join) => {
                return Err(FuseError::Session {
                    path: self.mountpoint.clone(),
                    source: std::io::Error::other(join.to_string()),
                })
            }
        }
        // The kernel has cut the connection; the session's next read fails with ENODEV and it ends.
        self.finished().await
    }

    /// Waits until the filesystem is unmounted from outside (`umount`) and the session has ended.
    pub async fn wait(&mut self) -> Result<(), FuseError> {
        self.finished().await
    }

    async fn finished(&mut self) -> Result<(), FuseError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let ended = match session.await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::other("the FUSE session's task is gone")),
        }
        .map_err(|source| FuseError::Session {
            path: self.mountpoint.clone(),
            source,
        });
        // The kernel flushes every file before an unmount succeeds, so normally nothing is left; writes of
        // pages from a shared mapping can still arrive after the last close. Each ends within the store's
        // deadline, and the caller may exit right after this.
        self.writes.settle_all().await;
        ended
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if self.session.take().is_none() {
            return;
        }
        // Still served: unmount in the background (the kernel may ask the session for a last flush),
        // never lazily; a busy mount is cut off instead.
        let path = self.mountpoint.clone();
        let channel = Arc::clone(&self.channel);
        let spawned = std::thread::Builder::new()
            .name("ferry-fuse-drop".into())
            .spawn(move || cut_off_unless_unmounted(&path, &channel));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot unmount a dropped FUSE mount");
        }
    }
}

/// Unmounts a mount whose session nobody will end, or, if a process still uses it, cuts its connection.
/// Blocking.
fn cut_off_unless_unmounted(path: &Path, channel: &session::Channel) {
    if SystemMounter.unmount(path).is_ok() {
        return;
    }
    if let Err(e) = channel.abort() {
        tracing::warn!(path = %path.display(), error = %e, "cannot cut off a dropped FUSE mount");
    }
}

/// Mounts `store` on `mountpoint` (an existing, empty directory) and serves it until unmounted. Needs root
/// and `/dev/fuse`. Must be called inside a multi-threaded Tokio runtime, which then serves the requests:
/// do not block its worker threads on the mount itself.
pub async fn mount(
    store: Arc<dyn FileStore>,
    mountpoint: &Path,
    opts: MountOptions,
) -> Result<MountHandle, FuseError> {
    if !Path::new("/dev/fuse").exists() {
        return Err(FuseError::NoDevice);
    }
    let root = store.root().await.map_err(FuseError::Root)?;
    let mut fs = FerryFs::new(store, root, opts.attr_ttl);
    fs.locks = locks::Locks::new(opts.locks.clone());
    let writes = Arc::clone(&fs.writes);
    let mount_error = |source| FuseError::Mount {
        path: mountpoint.to_path_buf(),
        source,
    };
    let (path, o) = (mountpoint.to_path_buf(), opts.clone());
    let ch = tokio::task::spawn_blocking(move || {
        let spec = session::MountSpec {
            fsname: &o.fsname,
            subtype: &o.subtype,
            allow_other: o.allow_other,
        };
        session::mount(&path, &spec)
    })
    .await
    .map_err(|e| mount_error(std::io::Error::other(e.to_string())))?
    .map_err(mount_error)?;
    let notifier = session::Notifier::new(Arc::clone(&ch));
    let _ = fs.notify.set(notifier.clone());
    fs.locks.set_notify(notifier);
    let started = session::serve(
        Arc::clone(&ch),
        Arc::new(fs),
        &tokio::runtime::Handle::current(),
    );
    let ended = match started {
        Ok(ended) => ended,
        Err(e) => {
            let path = mountpoint.to_path_buf();
            let _ = tokio::task::spawn_blocking(move || cut_off_unless_unmounted(&path, &ch)).await;
            return Err(mount_error(e));
        }
    };
    raise_readahead(mountpoint).await;
    Ok(MountHandle {
        session: Some(ended),
        channel: ch,
        mountpoint: mountpoint.to_path_buf(),
        writes,
    })
}

/// Lets the kernel read ahead up to `MAX_IO` at a time on this mount, so sequential reads reach the store as
/// 1 MiB requests instead of the default 128 KiB. The kernel caps FUSE readahead at what it proposed at init
/// (its 128 KiB default), and only this sysfs knob of the mount's backing device raises it. Failing is not
/// fatal: reads still work, in smaller pieces.
async fn raise_readahead(mountpoint: &Path) {
    let path = mountpoint.to_path_buf();
    let result = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        // The stat is answered by the session, which already runs in its own tasks.
        let dev = std::fs::metadata(&path)?.dev();
        let knob = format!(
            "/sys/class/bdi/{}:{}/read_ahead_kb",
            nix::sys::stat::major(dev),
            nix::sys::stat::minor(dev)
        );
        std::fs::write(knob, format!("{}", MAX_IO / 1024))
    })
    .await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(mountpoint = %mountpoint.display(), error = %e, "cannot raise FUSE readahead; reads stay at 128 KiB per request")
        }
        Err(e) => tracing::warn!(error = %e, "cannot raise FUSE readahead"),
    }
}

/// The FUSE filesystem: requests in, store calls out.
struct FerryFs {
    store: Arc<dyn FileStore>,
    /// Shared with readdirplus replies, which count lookups as the kernel takes entries.
    inodes: Arc<InodeTable>,
    ttl: Duration,
    next_fh: AtomicU64,
    /// The cookie verifier of each open directory, to continue its listing.
    dirs: Mutex<std::collections::HashMap<u64, CookieVerifier>>,
    /// Makes hidden names of unlinked open files unique.
    hidden_serial: AtomicU64,
    /// Writes acknowledged to the kernel and still on their way to the store. Every request that reads or
    /// replaces an inode's data or size, or reports its attributes, settles them first.
    writes: Arc<WriteBehind>,
    /// The session's channel for telling the kernel to drop cached attributes; set when the session starts.
    notify: std::sync::OnceLock<session::Notifier>,
    /// Advisory locks: where they go, who may hold some, which waits an interrupt cancels.
    locks: locks::Locks,
}

/// A failed request's errno (positive), as the application will see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Errno(i32);

impl From<i32> for Errno {
    fn from(errno: i32) -> Self {
        Errno(errno)
    }
}

impl From<Errno> for std::io::Error {
    fn from(e: Errno) -> Self {
        std::io::Error::from_raw_os_error(e.0)
    }
}

impl Errno {
    pub(crate) fn raw(self) -> i32 {
        self.0
    }
}

type FuseResult<T> = Result<T, Errno>;

/// Who asks: the request's id (which an interrupt names) and the caller's credentials.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Request {
    pub unique: u64,
    pub uid: u32,
    pub gid: u32,
}

pub(crate) struct ReplyEntry {
    pub ttl: Duration,
    pub attr: FileAttr,
    pub generation: u64,
}

pub(crate) struct ReplyAttr {
    pub ttl: Duration,
    pub attr: FileAttr,
}

pub(crate) struct ReplyData {
    pub data: Bytes,
}

pub(crate) struct ReplyOpen {
    pub fh: u64,
    pub flags: u32,
}

pub(crate) struct ReplyCreated {
    pub ttl: Duration,
    pub attr: FileAttr,
    pub fh: u64,
    pub flags: u32,
}

pub(crate) struct ReplyWrite {
    pub written: u32,
}

pub(crate) struct ReplyStatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

pub(crate) struct ReplyLock {
    pub start: u64,
    pub end: u64,
    pub r#type: u32,
    pub pid: u32,
}

/// What a SETATTR asks to change; times as instants ("now" is this host's clock, as the kernel's own
/// `utimensat(UTIME_NOW)` would take it).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct KernelSetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
}

impl From<&k::fuse_setattr_in> for KernelSetAttr {
    fn from(s: &k::fuse_setattr_in) -> Self {
        let has = |bit: u32| s.valid & bit != 0;
        let time = |set: u32, now: u32, secs: u64, nanos: u32| {
            if has(now) {
                Some(SystemTime::now())
            } else if has(set) {
                Some(wire::system_time(secs, nanos))
            } else {
                None
            }
        };
        KernelSetAttr {
            mode: has(k::FATTR_MODE).then_some(s.mode),
            uid: has(k::FATTR_UID).then_some(s.uid),
            gid: has(k::FATTR_GID).then_some(s.gid),
            size: has(k::FATTR_SIZE).then_some(s.size),
            atime: time(k::FATTR_ATIME, k::FATTR_ATIME_NOW, s.atime, s.atimensec),
            mtime: time(k::FATTR_MTIME, k::FATTR_MTIME_NOW, s.mtime, s.mtimensec),
        }
    }
}

/// What `hide_if_open` did with a name about to vanish.
#[derive(Debug)]
enum Hiding {
    /// Not a file open here (or no such name): the caller goes ahead.
    NotOpen,
    /// Renamed to the hidden name, recorded for the last close of the inode.
    Hidden(u64, Hidden),
    /// Renamed, then removed at once because its last close came meanwhile: the name is gone.
    Removed,
}

/// Writes all of `data` at `offset`: a store may take less per call, and the kernel was told it all went.
/// Marks the inode dirty after every part the store took, before the write counts as finished, so a flush
/// that waited for this write also commits it.
async fn write_all(
    store: &dyn FileStore,
    inodes: &InodeTable,
    inode: u64,
    handle: &FileHandle,
    offset: u64,
    data: Bytes,
) -> StoreResult<()> {
    let mut done = 0usize;
    while done < data.len() {
        let n = store
            .write(handle, offset + done as u64, data.slice(done..))
            .await?;
        if n == 0 {
            return Err(StoreError::new(
                StoreErrorKind::Io,
                "the store took no bytes of a write",
            ));
        }
        done += (n as usize).min(data.len() - done);
        inodes.mark_dirty(inode);
    }
    Ok(())
}

/// Turns a store failure into the errno the application sees, logging it here, once. Expected outcomes
/// (ENOENT for a missing name, EEXIST, ...) are debug noise; a failing or silent server is a warning.
fn fail(op: &'static str, e: StoreError) -> Errno {
    match e.kind {
        StoreErrorKind::Io | StoreErrorKind::TimedOut | StoreErrorKind::Stale => {
            tracing::warn!(op, error = %e, "fuse request failed")
        }
        _ => tracing::debug!(op, error = %e, "fuse request failed"),
    }
    e.errno().into()
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::File => FileType::RegularFile,
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
    }
}

fn fuse_attr(inode: u64, a: &Attr) -> FileAttr {
    FileAttr {
        ino: inode,
        size: a.size,
        blocks: a.used.div_ceil(512),
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        kind: file_type(a.kind),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        // The kernel's encoding of a device number in 32 bits, which glibc's makedev also produces.
        rdev: libc::makedev(a.rdev.0, a.rdev.1) as u32,
        blksize: BLOCK as u32,
    }
}

/// Runs one request's work with its deadline starting now (`store::as_request`): the store's calls for it
/// all end within the store's timeout of this instant.
async fn request<T>(work: impl std::future::Future<Output = FuseResult<T>>) -> FuseResult<T> {
    store::as_request(work).await
}

fn name_bytes(name: &OsStr) -> &[u8] {
    name.as_bytes()
}

impl FerryFs {
    fn new(store: Arc<dyn FileStore>, root: FileHandle, ttl: Duration) -> Self {
        FerryFs {
            store,
            inodes: Arc::new(InodeTable::new(root)),
            ttl,
            next_fh: AtomicU64::new(1),
            dirs: Mutex::new(std::collections::HashMap::new()),
            hidden_serial: AtomicU64::new(0),
            writes: Arc::new(WriteBehind::default()),
            notify: std::sync::OnceLock::new(),
            locks: locks::Locks::default(),
        }
    }

    /// FLUSH's data part: waits for the writes in flight and commits what they wrote.
    async fn flush_data(&self, inode: u64) -> FuseResult<()> {
        let fs = self;
        if let Some(e) = fs.writes.settle_and_take_error(inode).await {
            return Err(e.errno().into());
        }
        if !fs.inodes.take_dirty(inode) {
            return Ok(());
        }
        let handle = fs.handle(inode)?;
        if let Err(e) = fs.store.commit(&handle).await {
            fs.inodes.mark_dirty(inode);
            return Err(fail("commit", e));
        }
        Ok(())
    }

    fn handle(&self, inode: u64) -> FuseResult<FileHandle> {
        // An inode the table does not know was forgotten already; the kernel should not ask, so say stale.
        self.inodes.handle(inode).ok_or_else(|| libc::ESTALE.into())
    }

    /// Hands the kernel an inode for `handle` (one lookup) and the entry reply.
    fn entry(&self, handle: &FileHandle, attr: &Attr) -> ReplyEntry {
        let inode = self.inodes.remember(handle, attr.fileid);
        ReplyEntry {
            ttl: self.ttl,
            attr: fuse_attr(inode, attr),
            generation: 0,
        }
    }

    /// The attributes to hand the kernel for `handle`: `attr` as the store gave it, unless writes of its
    /// inode are still in flight. The kernel already took the sizes of those acknowledged writes, and an
    /// entry with the server's older size would shrink the file under the application (an O_APPEND writer
    /// would then overwrite its own data), so wait for them and ask again.
    async fn settled_attr(&self, handle: &FileHandle, attr: Attr) -> FuseResult<Attr> {
        match self.inodes.inode_of(handle) {
            Some(inode) if self.writes.busy(inode) => {
                self.writes.settle(inode).await;
                self.store
                    .getattr(handle)
                    .await
                    .map_err(|e| fail("getattr", e))
            }
            _ => Ok(attr),
        }
    }

    /// Lets the writes in flight to the object named `name` in `dir` reach the store before that name is
    /// removed or replaced, so they neither land on a destroyed file nor fail late against it. Costs a
    /// lookup only while some write is in flight; a failed lookup is left to the operation to report.
    async fn settle_name(&self, dir: &FileHandle, name: &[u8]) {
        if !self.writes.any_busy() {
            return;
        }
        if let Ok((handle, _)) = self.store.lookup(dir, name).await {
            if let Some(inode) = self.inodes.inode_of(&handle) {
                self.writes.settle(inode).await;
            }
        }
    }

    /// Takes a write the way the kernel NFS client does: waits for its turn (`WriteBehind` bounds what is in
    /// flight and orders overlapping writes), copies the data, starts the store write in its own task and
    /// returns without waiting for the server. A failure is reported by the next write, flush or fsync.
    async fn write_behind(&self, inode: u64, offset: u64, data: Bytes) -> FuseResult<u32> {
        let handle = self.handle(inode)?;
        if data.is_empty() {
            return Ok(0);
        }
        // An unreported failure: logged when it happened, so only its errno here.
        let ticket = self
            .writes
            .begin(inode, offset, data.len() as u64)
            .await
            .map_err(|e| Errno::from(e.errno()))?;
        // The request's own copy of the message: the store keeps it until the data is written.
        let written = data.len() as u32;
        let store = Arc::clone(&self.store);
        let inodes = Arc::clone(&self.inodes);
        let writes = Arc::clone(&self.writes);
        tokio::spawn(async move {
            let result = write_all(&*store, &inodes, inode, &handle, offset, data).await;
            writes.finish(ticket, result);
        });
        Ok(written)
    }

    /// Close-to-open consistency, whatever the attribute cache's lifetime: an open asks the store for the
    /// file's attributes, and when its data changed since the previous open here (another host wrote it),
    /// tells the kernel to drop its cached attributes and pages, so reads see the new size and data. Writes
    /// from this host settle first, so they do not count as a change. Returns the open reply's flags.
    async fn revalidate(&self, inode: u64, handle: &FileHandle, flags: u32) -> FuseResult<u32> {
        self.writes.settle(inode).await;
        let attr = self
            .store
            .getattr(handle)
            .await
            .map_err(|e| fail("getattr", e))?;
        if attr.kind != FileKind::File {
            return Ok(0);
        }
        let version = Version {
            ctime: attr.ctime,
            size: attr.size,
        };
        // A truncating open changed the data itself, and the kernel drops pages past the new size.
        if self.inodes.opened_at(inode, version) && flags as i32 & libc::O_TRUNC == 0 {
            return Ok(FOPEN_KEEP_CACHE);
        }
        // Attributes only (a negative offset): without FOPEN_KEEP_CACHE the kernel drops the pages itself
        // when the open completes. The notification is written before the reply, so the kernel has
        // forgotten the old size before the application can read.
        if let Some(notify) = self.notify.get() {
            notify.inval_inode(inode, -1, 0);
        }
        Ok(0)
    }

    fn new_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// If `name` in `dir` is a file that is open here and would vanish with this name, renames it to a
    /// hidden name instead and records that for the last close.
    /// A stateless server would otherwise destroy the file and the open descriptors would fail with ESTALE.
    async fn hide_if_open(&self, dir: &FileHandle, name: &[u8]) -> FuseResult<Hiding> {
        if !self.inodes.any_open() {
            return Ok(Hiding::NotOpen);
        }
        let (handle, attr) = match self.store.lookup(dir, name).await {
            Ok(found) => found,
            Err(e) if e.kind == StoreErrorKind::NotFound => return Ok(Hiding::NotOpen),
            Err(e) => return Err(fail("lookup", e)),
        };
        let Some(inode) = self.inodes.inode_of(&handle) else {
            return Ok(Hiding::NotOpen);
        };
        if attr.kind == FileKind::Directory || attr.nlink > 1 || !self.inodes.is_open(inode) {
            return Ok(Hiding::NotOpen);
        }
        let serial = self.hidden_serial.fetch_add(1, Ordering::Relaxed);
        let hidden_name = format!(".ferry-unlinked-{inode:x}-{serial}").into_bytes();
        self.store
            .rename(dir, name, dir, &hidden_name)
            .await
            .map_err(|e| fail("rename", e))?;
        let hidden = Hidden {
            dir: dir.clone(),
            name: hidden_name,
        };
        if !self.inodes.hide(inode, hidden.clone()) {
            // Closed while we renamed (the kernel sends RELEASE after close(2) has returned, so an unlink
            // right after a close often gets here): nobody will release it any more, so remove it now.
            self.remove_hidden(hidden).await;
            return Ok(Hiding::Removed);
        }
        Ok(Hiding::Hidden(inode, hidden))
    }

    /// Unlinks `name` in `dir`, keeping a file that is open here readable until its last close.
    async fn unlink_name(&self, dir: &FileHandle, name: &[u8]) -> FuseResult<()> {
        self.settle_name(dir, name).await;
        match self.hide_if_open(dir, name).await? {
            // The name is gone already, by the rename that hid it: the unlink is done.
            Hiding::Hidden(..) | Hiding::Removed => Ok(()),
            Hiding::NotOpen => self
                .store
                .unlink(dir, name)
                .await
                .map_err(|e| fail("unlink", e)),
        }
    }

    /// Undoes `hide_if_open` after the operation it made room for failed: the file gets its name back.
    async fn unhide(&self, inode: u64, hidden: Hidden, name: &[u8]) {
        if !self.inodes.unhide(inode, &hidden) {
            // Closed meanwhile and its hidden name already removed: nothing to give back.
            return;
        }
        if let Err(e) = self
            .store
            .rename(&hidden.dir, &hidden.name, &hidden.dir, name)
            .await
        {
            tracing::warn!(
                name = %String::from_utf8_lossy(&hidden.name),
                error = %e,
                "cannot give an open file its name back after a failed rename; it stays under the hidden name"
            );
            // Still open: keep it hidden so the last close removes it. Already closed: it stays under the
            // hidden name, as the warning says, rather than losing data that the failed rename should keep.
            let _ = self.inodes.hide(inode, hidden);
        }
    }

    async fn remove_hidden(&self, hidden: Hidden) {
        if let Err(e) = self.store.unlink(&hidden.dir, &hidden.name).await {
            tracing::warn!(
                name = %String::from_utf8_lossy(&hidden.name),
                error = %e,
                "cannot remove the hidden name of a file unlinked while open; remove it by hand"
            );
        }
    }

    /// Reads `size` bytes at `offset` from the store, fewer only at the end of the file.
    async fn read_range(&self, handle: &FileHandle, offset: u64, size: u32) -> FuseResult<Bytes> {
        let first = self
            .store
            .read(handle, offset, size)
            .await
            .map_err(|e| fail("read", e))?;
        if first.eof || first.data.len() >= size as usize {
            return Ok(first.data);
        }
        // The kernel takes a short reply for end of file and fills the rest with zeros, so a short read
        // that is not at the end must be completed here.
        let mut data = BytesMut::from(&first.data[..]);
        while data.len() < size as usize {
            let got = data.len() as u32;
            let more = self
                .store
                .read(handle, offset + u64::from(got), size - got)
                .await
                .map_err(|e| fail("read", e))?;
            data.extend_from_slice(&more.data);
            if more.eof || more.data.is_empty() {
                break;
            }
        }
        Ok(data.freeze())
    }

    /// One page of `dir` after `cookie`, using the verifier remembered for the open directory `fh`.
    async fn dir_page(&self, dir: &FileHandle, fh: u64, cookie: u64) -> FuseResult<DirPage> {
        let verifier = if cookie == 0 {
            [0; 8]
        } else {
            self.dirs
                .lock()
                .recover()
                .get(&fh)
                .copied()
                .unwrap_or([0; 8])
        };
        let page = self
            .store
            .readdirplus(dir, cookie, verifier, DIR_PAGE)
            .await
            .map_err(|e| fail("readdirplus", e))?;
        if let Some(v) = self.dirs.lock().recover().get_mut(&fh) {
            *v = page.verifier;
        }
        Ok(page)
    }
}

/// The requests the kernel sends, one method each, as `session` hands them over.
impl FerryFs {
    async fn lookup(&self, _req: Request, parent: u64, name: &OsStr) -> FuseResult<ReplyEntry> {
        request(async {
            let fs = self;
            let dir = fs.handle(parent)?;
            let (handle, attr) = fs
                .store
                .lookup(&dir, name_bytes(name))
                .await
                .map_err(|e| fail("lookup", e))?;
            let attr = fs.settled_attr(&handle, attr).await?;
            Ok(fs.entry(&handle, &attr))
        })
        .await
    }

    async fn getattr(
        &self,
        _req: Request,
        inode: u64,
        _fh: Option<u64>,
        _flags: u32,
    ) -> FuseResult<ReplyAttr> {
        request(async {
            let fs = self;
            let handle = fs.handle(inode)?;
            fs.writes.settle(inode).await;
            let attr = fs
                .store
                .getattr(&handle)
                .await
                .map_err(|e| fail("getattr", e))?;
            Ok(ReplyAttr {
                ttl: fs.ttl,
                attr: fuse_attr(inode, &attr),
            })
        })
        .await
    }

    async fn setattr(
        &self,
        _req: Request,
        inode: u64,
        _fh: Option<u64>,
        set: KernelSetAttr,
    ) -> FuseResult<ReplyAttr> {
        request(async {
            let fs = self;
            let handle = fs.handle(inode)?;
            // A truncation must not be overtaken by earlier writes, and the reply carries the size.
            fs.writes.settle(inode).await;
            let to_set = SetAttr {
                mode: set.mode.map(|m| m & 0o7777),
                uid: set.uid,
                gid: set.gid,
                size: set.size,
                atime: set.atime.map(SetTime::At),
                mtime: set.mtime.map(SetTime::At),
            };
            let attr = fs
                .store
                .setattr(&handle, &to_set)
                .await
                .map_err(|e| fail("setattr", e))?;
            Ok(ReplyAttr {
                ttl: fs.ttl,
                attr: fuse_attr(inode, &attr),
            })
        })
        .await
    }

    async fn readlink(&self, _req: Request, inode: u64) -> FuseResult<ReplyData> {
        request(async {
            let fs = self;
            let handle = fs.handle(inode)?;
            let target = fs
                .store
                .readlink(&handle)
                .await
                .map_err(|e| fail("readlink", e))?;
            Ok(ReplyData {
                data: Bytes::from(target),
            })
        })
        .await
    }

    async fn symlink(
        &self,
        req: Request,
        parent: u64,
        name: &OsStr,
        link: &OsStr,
    ) -> FuseResult<ReplyEntry> {
        request(async {
            let fs = self;
            let dir = fs.handle(parent)?;
            let owner = NewAttr {
                mode: 0o777,
                uid: req.uid,
                gid: req.gid,
            };
            let (handle, attr) = fs
                .store
                .symlink(&dir, name_bytes(name), link.as_bytes(), owner)
                .await
                .map_err(|e| fail("symlink", e))?;
            Ok(fs.entry(&handle, &attr))
        })
        .await
    }

    async fn mkdir(
        &self,
        req: Request,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
    ) -> FuseResult<ReplyEntry> {
        request(async {
            let fs = self;
            let dir = fs.handle(parent)?;
            // The kernel applied the umask already (no FUSE_DONT_MASK).
            let owner = NewAttr {
                mode: mode & 0o7777,
                uid: req.uid,
                gid: req.gid,
            };
            let (handle, attr) = fs
                .store
                .mkdir(&dir, name_bytes(name), owner)
                .await
                .map_err(|e| fail("mkdir", e))?;
            Ok(fs.entry(&handle, &attr))
        })
        .await
    }

    async fn unlink(&self, _req: Request, parent: u64, name: &OsStr) -> FuseResult<()> {
        request(async {
            let fs = self;
            let dir = fs.handle(parent)?;
            fs.unlink_name(&dir, name_bytes(name)).await
        })
        .await
    }

    async fn rmdir(&self, _req: Request, parent: u64, name: &OsStr) -> FuseResult<()> {
        request(async {
            let fs = self;
            let dir = fs.handle(parent)?;
            fs.store
                .rmdir(&dir, name_bytes(name))
                .await
                .map_err(|e| fail("rmdir", e))
        })
        .await
    }

    async fn rename(
        &self,
        _req: Request,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
    ) -> FuseResult<()> {
        request(async {
            let fs = self;
            let from = fs.handle(parent)?;
            let to = fs.handle(new_parent)?;
            fs.settle_name(&from, name_bytes(name)).await;
            fs.settle_name(&to, name_bytes(new_name)).await;
            // A target that is open here would be destroyed by the rename; keep it alive under a hidden name.
            let hidden = fs.hide_if_open(&to, name_bytes(new_name)).await?;
            let result = fs
                .store
                .rename(&from, name_bytes(name), &to, name_bytes(new_name))
                .await;
            if let (Err(_), Hiding::Hidden(inode, hidden)) = (&result, hidden) {
                fs.unhide(inode, hidden, name_bytes(new_name)).await;
            }
            result.map_err(|e| fail("rename", e))
        })
        .await
    }

    async fn rename2(
        &self,
        req: Request,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: u32,
    ) -> FuseResult<()> {
        // NFSv3 has no atomic no-replace or exchange; refusing is honest, emulating would race.
        if flags != 0 {
            return Err(libc::EINVAL.into());
        }
        self.rename(req, parent, name, new_parent, new_name).await
    }

    async fn link(
        &self,
        _req: Request,
        inode: u64,
        new_parent: u64,
        new_name: &OsStr,
    ) -> FuseResult<ReplyEntry> {
        request(async {
            let fs = self;
            let handle = fs.handle(inode)?;
            let dir = fs.handle(new_parent)?;
            fs.writes.settle(inode).await;
            let attr = fs
                .store
                .link(&handle, &dir, name_bytes(new_name))
                .await
                .map_err(|e| fail("link", e))?;
            Ok(fs.entry(&handle, &attr))
        })
        .await
    }

    async fn open(&self, _req: Request, inode: u64, flags: u32) -> FuseResult<ReplyOpen> {
        request(async {
            let fs = self;
            let handle = fs.handle(inode)?;
            // FUSE_ATOMIC_O_TRUNC is negotiated, so truncation on open is ours to do.
            if flags as i32 & libc::O_TRUNC != 0 {
                // Writes through another open file that arrived before this open must not land after the
                // truncation.
                fs.writes.settle(inode).await;
                let set = SetAttr {
                    size: Some(0),
                    ..SetAttr::default()
                };
                fs.store
                    .setattr(&handle, &set)
                    .await
                    .map_err(|e| fail("truncate", e))?;
            }
            let flags = fs.revalidate(inode, &handle, flags).await?;
            fs.inodes.open(inode);
            Ok(ReplyOpen {
                fh: fs.new_fh(),
                flags,
            })
        })
        .await
    }

    async fn mknod(
        &self,
        req: Request,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
    ) -> FuseResult<ReplyEntry> {
        request(async {
            let fs = self;
            let dir = fs.handle(parent)?;
            // The kernel applied the umask already (no FUSE_DONT_MASK).
            let owner = NewAttr {
                mode: mode & 0o7777,
                uid: req.uid,
                gid: req.gid,
            };
            let kind = match mode & libc::S_IFMT {
                libc::S_IFIFO => FileKind::Fifo,
                libc::S_IFSOCK => FileKind::Socket,
                libc::S_IFCHR => FileKind::CharDevice,
                libc::S_IFBLK => FileKind::BlockDevice,
                // mknod(2) of a regular file comes here, not to create: make it as O_CREAT|O_EXCL would.
                0 | libc::S_IFREG => {
                    let (handle, attr) = fs
                        .store
                        .create(&dir, name_bytes(name), owner, CreateMode::Exclusive)
                        .await
                        .map_err(|e| fail("mknod", e))?;
                    return Ok(fs.entry(&handle, &attr));
                }
                _ => return Err(libc::EINVAL.into()),
            };
            let dev = u64::from(rdev);
            let numbers = (libc::major(dev), libc::minor(dev));
            let (handle, attr) = fs
                .store
                .mknod(&dir, name_bytes(name), kind, numbers, owner)
                .await
                .map_err(|e| fail("mknod", e))?;
            Ok(fs.entry(&handle, &attr))
        })
        .await
    }

    async fn create(
        &self,
        req: Request,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: u32,
    ) -> FuseResult<ReplyCreated> {
        request(async {
            let fs = self;
            let dir = fs.handle(parent)?;
            let how = if flags as i32 & libc::O_EXCL != 0 {
                CreateMode::Exclusive
            } else {
                CreateMode::Unchecked
            };
            let owner = NewAttr {
                mode: mode & 0o7777,
                uid: req.uid,
                gid: req.gid,
            };
            let (handle, mut attr) = fs
                .store
                .create(&dir, name_bytes(name), owner, how)
                .await
                .map_err(|e| fail("create", e))?;
            // An existing file, opened: its writes in flight decide the size, and go before a truncation.
            attr = fs.settled_attr(&handle, attr).await?;
            // Unchecked create may have opened a file another client made meanwhile: honour O_TRUNC on it.
            if flags as i32 & libc::O_TRUNC != 0 && attr.size > 0 {
                let set = SetAttr {
                    size: Some(0),
                    ..SetAttr::default()
                };
                attr = fs
                    .store
                    .setattr(&handle, &set)
                    .await
                    .map_err(|e| fail("truncate", e))?;
            }
            let entry = fs.entry(&handle, &attr);
            fs.inodes.open(entry.attr.ino);
            Ok(ReplyCreated {
                ttl: entry.ttl,
                attr: entry.attr,
                fh: fs.new_fh(),
                flags: 0,
            })
        })
        .await
    }

    async fn read(
        &self,
        _req: Request,
        inode: u64,
        _fh: u64,
        offset: u64,
        size: u32,
    ) -> FuseResult<ReplyData> {
        request(async {
            let fs = self;
            let handle = fs.handle(inode)?;
            // Only the writes in flight to this range: random readers and writers of one file go in parallel.
            let end = offset.saturating_add(u64::from(size));
            fs.writes.settle_range(inode, offset, end).await;
            let data = fs.read_range(&handle, offset, size).await?;
            if data.len() < size as usize && fs.writes.busy(inode) {
                // A short reply ends at the server's end of file, which a write in flight elsewhere may still
                // move; the kernel would take the short reply as the file's size. So wait for them all, and read
                // again.
                fs.writes.settle(inode).await;
                return Ok(ReplyData {
                    data: fs.read_range(&handle, offset, size).await?,
                });
            }
            Ok(ReplyData { data })
        })
        .await
    }

    async fn write(
        &self,
        _req: Request,
        inode: u64,
        _fh: u64,
        offset: u64,
        data: Bytes,
    ) -> FuseResult<ReplyWrite> {
        let written = self.write_behind(inode, offset, data).await?;
        Ok(ReplyWrite { written })
    }

    async fn statfs(&self, _req: Request, inode: u64) -> FuseResult<ReplyStatFs> {
        request(async {
            let fs = self;
            let handle = fs.handle(inode).or_else(|_| fs.handle(ROOT_INODE))?;
            let st = fs
                .store
                .statfs(&handle)
                .await
                .map_err(|e| fail("statfs", e))?;
            Ok(ReplyStatFs {
                blocks: st.total_bytes / BLOCK,
                bfree: st.free_bytes / BLOCK,
                bavail: st.avail_bytes / BLOCK,
                files: st.total_files,
                ffree: st.free_files,
                bsize: BLOCK as u32,
                namelen: 255,
                frsize: BLOCK as u32,
            })
        })
        .await
    }

    async fn release(
        &self,
        _req: Request,
        inode: u64,
        _fh: u64,
        _flags: u32,
        lock_owner: u64,
        _flush: bool,
    ) -> FuseResult<()> {
        request(async {
            let fs = self;
            // A flock-style owner (the open file) is released with the file; POSIX owners at flush.
            if let Some(handle) = fs.inodes.handle(inode) {
                fs.locks.release_owner(inode, &handle, lock_owner).await;
            }
            fs.writes.settle(inode).await;
            let hidden = fs.inodes.release(inode);
            if !fs.inodes.is_open(inode) {
                fs.writes.forget_error(inode);
            }
            if let Some(hidden) = hidden {
                fs.remove_hidden(hidden).await;
            }
            Ok(())
        })
        .await
    }

    async fn fsync(&self, _req: Request, inode: u64, _fh: u64, _datasync: bool) -> FuseResult<()> {
        request(async {
            let fs = self;
            let handle = fs.handle(inode)?;
            // A background write that failed: its data never reached the server, whatever a commit says.
            if let Some(e) = fs.writes.settle_and_take_error(inode).await {
                return Err(e.errno().into());
            }
            fs.inodes.take_dirty(inode);
            if let Err(e) = fs.store.commit(&handle).await {
                fs.inodes.mark_dirty(inode);
                return Err(fail("commit", e));
            }
            Ok(())
        })
        .await
    }

    async fn flush(&self, _req: Request, inode: u64, _fh: u64, lock_owner: u64) -> FuseResult<()> {
        request(async {
            // Close-to-open consistency, as NFS clients do: data written through this file is committed by
            // close(2), and a failure is reported there.
            let fs = self;
            // POSIX: any close of a file drops the closing process's locks on it. After the data: a lock
            // protects what was written under it until the next holder can read it.
            let result = fs.flush_data(inode).await;
            if let Some(handle) = fs.inodes.handle(inode) {
                fs.locks.release_owner(inode, &handle, lock_owner).await;
            }
            result
        })
        .await
    }

    /// F_GETLK: `lk` as the kernel sent it (owner, range, type, pid).
    async fn getlk(&self, _req: Request, inode: u64, lk: &k::fuse_lk_in) -> FuseResult<ReplyLock> {
        let handle = self.handle(inode)?;
        let l = &lk.lk;
        self.locks
            .getlk(&handle, lk.owner, l.start, l.end, l.typ, l.pid)
            .await
    }

    /// F_SETLK, F_SETLKW (`block`) and flock(2), which the kernel sends as a whole-file lock of the open
    /// file's owner (FUSE_LK_FLOCK in `lk.lk_flags`, needing nothing else here).
    async fn setlk(
        &self,
        req: Request,
        inode: u64,
        lk: &k::fuse_lk_in,
        block: bool,
    ) -> FuseResult<()> {
        let (lock_owner, r#type) = (lk.owner, lk.lk.typ);
        let handle = self.handle(inode)?;
        let unlock = r#type as i32 == libc::F_UNLCK;
        if unlock {
            // What was written under the lock reaches the server before another host can take it.
            if let Err(e) = self.flush_data(inode).await {
                tracing::warn!(
                    inode,
                    errno = e.raw(),
                    "cannot commit a file's writes before unlocking it"
                );
            }
        }
        self.locks
            .setlk(
                inode,
                &handle,
                req.unique,
                lock_owner,
                lk.lk.start,
                lk.lk.end,
                r#type,
                lk.lk.pid,
                block,
            )
            .await?;
        if !unlock {
            self.locks.invalidate(inode).await;
        }
        Ok(())
    }

    async fn opendir(&self, _req: Request, inode: u64, _flags: u32) -> FuseResult<ReplyOpen> {
        let fs = self;
        fs.handle(inode)?;
        let fh = fs.new_fh();
        fs.dirs.lock().recover().insert(fh, [0; 8]);
        Ok(ReplyOpen { fh, flags: 0 })
    }

    async fn releasedir(&self, _req: Request, _inode: u64, fh: u64, _flags: u32) -> FuseResult<()> {
        self.dirs.lock().recover().remove(&fh);
        Ok(())
    }

    async fn fsyncdir(
        &self,
        _req: Request,
        _inode: u64,
        _fh: u64,
        _datasync: bool,
    ) -> FuseResult<()> {
        // NFSv3 directory operations are synchronous on the server: nothing is pending.
        Ok(())
    }

    async fn readdir(
        &self,
        _req: Request,
        parent: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> FuseResult<DirBuf> {
        request(async {
            let fs = self;
            let dir = fs.handle(parent)?;
            // Offsets are the store's cookies, passed through unchanged.
            let page = fs.dir_page(&dir, fh, offset).await?;
            let mut buf = DirBuf::new(size);
            for e in page.entries {
                if !buf.fits(&e.name, false) {
                    break;
                }
                let inode = fs.inodes.inode_of(&e.handle).unwrap_or(e.attr.fileid);
                buf.add(inode, e.cookie, file_type(e.attr.kind), &e.name);
            }
            Ok(buf)
        })
        .await
    }

    /// Every entry handed to the kernel counts as a lookup of its inode; one that does not fit is not
    /// counted (the kernel asks again from its cookie).
    async fn readdirplus(
        &self,
        _req: Request,
        parent: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> FuseResult<DirBuf> {
        request(async {
            let fs = self;
            let dir = fs.handle(parent)?;
            let mut page = fs.dir_page(&dir, fh, offset).await?;
            if fs.writes.any_busy() {
                for e in &mut page.entries {
                    e.attr = fs.settled_attr(&e.handle, e.attr.clone()).await?;
                }
            }
            let mut buf = DirBuf::new(size);
            for e in page.entries {
                if !buf.fits(&e.name, true) {
                    break;
                }
                let inode = fs.inodes.remember(&e.handle, e.attr.fileid);
                buf.add_plus(e.cookie, fs.ttl, &fuse_attr(inode, &e.attr), &e.name);
            }
            Ok(buf)
        })
        .await
    }
}

impl session::Serve for FerryFs {
    fn inline(&self, _header: wire::Header, op: Op<'_>) {
        match op {
            Op::Forget { nlookup } => self.inodes.forget(_header.nodeid, nlookup),
            Op::BatchForget(all) => {
                for (inode, n) in all {
                    self.inodes.forget(inode, n);
                }
            }
            Op::Interrupt { unique } => self.locks.interrupt(unique),
            _ => {}
        }
    }

    async fn answer(self: Arc<Self>, msg: Bytes) -> Option<Reply> {
        let (h, op) = match wire::decode(&msg) {
            Ok(parsed) => parsed,
            // Checked by the reading thread already.
            Err(_) => return None,
        };
        let u = h.unique;
        let req = Request {
            unique: u,
            uid: h.uid,
            gid: h.gid,
        };
        let ino = h.nodeid;
        let fs = &*self;
        let entry = |e: ReplyEntry| Reply::entry(u, e.ttl, &e.attr, e.generation);
        let attr = |a: ReplyAttr| Reply::attr(u, a.ttl, &a.attr);
        let empty = |()| Reply::empty(u);
        let result = match op {
            Op::Lookup { name } => fs.lookup(req, ino, name).await.map(entry),
            Op::Getattr => fs.getattr(req, ino, None, 0).await.map(attr),
            Op::Setattr(set) => fs.setattr(req, ino, None, (&set).into()).await.map(attr),
            Op::Readlink => fs
                .readlink(req, ino)
                .await
                .map(|d| Reply::new(u, &[], d.data)),
            Op::Symlink { name, link } => fs.symlink(req, ino, name, link).await.map(entry),
            Op::Mknod { mode, rdev, name } => fs.mknod(req, ino, name, mode, rdev).await.map(entry),
            Op::Mkdir { mode, name } => fs.mkdir(req, ino, name, mode, 0).await.map(entry),
            Op::Unlink { name } => fs.unlink(req, ino, name).await.map(empty),
            Op::Rmdir { name } => fs.rmdir(req, ino, name).await.map(empty),
            Op::Rename {
                newdir,
                flags,
                name,
                newname,
            } => fs
                .rename2(req, ino, name, newdir, newname, flags)
                .await
                .map(empty),
            // The header names the new parent; the body the inode linked.
            Op::Link { oldnodeid, newname } => {
                fs.link(req, oldnodeid, ino, newname).await.map(entry)
            }
            Op::Open { flags } => fs
                .open(req, ino, flags)
                .await
                .map(|o| Reply::open(u, o.fh, o.flags)),
            Op::Read { offset, size } => fs
                .read(req, ino, 0, offset, size)
                .await
                .map(|d| Reply::new(u, &[], d.data)),
            Op::Write { offset, data } => fs
                .write(req, ino, 0, offset, msg.slice(data))
                .await
                .map(|w| Reply::write(u, w.written)),
            Op::Statfs => fs.statfs(req, ino).await.map(|st| {
                Reply::statfs(
                    u,
                    k::fuse_kstatfs {
                        blocks: st.blocks,
                        bfree: st.bfree,
                        bavail: st.bavail,
                        files: st.files,
                        ffree: st.ffree,
                        bsize: st.bsize,
                        namelen: st.namelen,
                        frsize: st.frsize,
                        padding: 0,
                        spare: [0; 6],
                    },
                )
            }),
            Op::Release {
                release_flags,
                lock_owner,
            } => {
                // Only a RELEASE of a file that took flock locks carries their owner.
                let owner =
                    (release_flags & k::FUSE_RELEASE_FLOCK_UNLOCK != 0).then_some(lock_owner);
                fs.release(req, ino, 0, 0, owner.unwrap_or(0), false)
                    .await
                    .map(empty)
            }
            Op::Fsync => fs.fsync(req, ino, 0, false).await.map(empty),
            Op::Flush { lock_owner } => fs.flush(req, ino, 0, lock_owner).await.map(empty),
            Op::Opendir => fs
                .opendir(req, ino, 0)
                .await
                .map(|o| Reply::open(u, o.fh, o.flags)),
            Op::Readdir {
                fh,
                offset,
                size,
                plus,
            } => if plus {
                fs.readdirplus(req, ino, fh, offset, size).await
            } else {
                fs.readdir(req, ino, fh, offset, size).await
            }
            .map(|buf| buf.reply(u)),
            Op::Releasedir { fh } => fs.releasedir(req, ino, fh, 0).await.map(empty),
            Op::Fsyncdir => fs.fsyncdir(req, ino, 0, false).await.map(empty),
            Op::Getlk(lk) => fs.getlk(req, ino, &lk).await.map(|l| {
                Reply::lock(
                    u,
                    k::fuse_file_lock {
                        start: l.start,
                        end: l.end,
                        typ: l.r#type,
                        pid: l.pid,
                    },
                )
            }),
            Op::Setlk { lk, block } => fs.setlk(req, ino, &lk, block).await.map(empty),
            Op::Create { flags, mode, name } => fs
                .create(req, ino, name, mode, flags)
                .await
                .map(|c| Reply::created(u, c.ttl, &c.attr, c.fh, c.flags)),
            Op::Destroy => {
                fs.writes.settle_all().await;
                Ok(Reply::empty(u))
            }
            // A second INIT, or an operation NFSv3 has no use for (xattrs, fallocate, ...).
            Op::Init(_) => Err(Errno(libc::EIO)),
            Op::Unsupported => Err(Errno(libc::ENOSYS)),
            Op::Forget { .. } | Op::BatchForget(_) | Op::Interrupt { .. } => return None,
        };
        Some(result.unwrap_or_else(|e| Reply::error(u, e.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuse::memory::MemoryStore;

    fn ferry_fs(store: Arc<MemoryStore>, root: FileHandle) -> FerryFs {
        FerryFs::new(store, root, Duration::from_secs(1))
    }

    /// The kernel sends RELEASE after close(2) returns, so an application's close-then-unlink (SQLite
    /// deleting its journal) can find the file still open here, hide it, and see the release land while
    /// the hiding rename runs. The unlink must still succeed and leave nothing behind.
    #[tokio::test(start_paused = true)]
    async fn unlink_succeeds_when_the_last_close_lands_during_the_hiding_rename() {
        let store = Arc::new(MemoryStore::new());
        let root = store.root().await.unwrap();
        let fs = Arc::new(ferry_fs(store.clone(), root.clone()));
        let new = NewAttr {
            mode: 0o644,
            uid: 0,
            gid: 0,
        };
        let (handle, attr) = store
            .create(&root, b"app.db-journal", new, CreateMode::Exclusive)
            .await
            .unwrap();
        let inode = fs.inodes.remember(&handle, attr.fileid);
        fs.inodes.open(inode);

        // Every store call now takes 100 ms of virtual time: the lookup ends at 100 ms, the rename at 200.
        store.set_delay(Duration::from_millis(100));
        let unlink = tokio::spawn({
            let fs = fs.clone();
            let root = root.clone();
            async move { fs.unlink_name(&root, b"app.db-journal").await }
        });
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(fs.inodes.release(inode).is_none(), "nothing hidden yet");
        unlink.await.unwrap().expect("the unlink succeeds");

        store.set_delay(Duration::ZERO);
        let page = store
            .readdirplus(&root, 0, CookieVerifier::default(), 100)
            .await
            .unwrap();
        let names: Vec<_> = page
            .entries
            .iter()
            .map(|e| String::from_utf8_lossy(&e.name).into_owned())
            .filter(|n| n != "." && n != "..")
            .collect();
        assert!(names.is_empty(), "left behind: {names:?}");
    }

    fn req() -> Request {
        Request {
            unique: 0,
            uid: 0,
            gid: 0,
        }
    }

    /// A mounted-like adapter with one empty file, known to the kernel and open: (fs, store, inode, fileid).
    async fn one_open_file(store: MemoryStore) -> (Arc<FerryFs>, Arc<MemoryStore>, u64, u64) {
        let store = Arc::new(store);
        let root = store.root().await.unwrap();
        let fs = Arc::new(ferry_fs(store.clone(), root));
        let created = fs
            .create(req(), ROOT_INODE, OsStr::new("f"), 0o644, 0)
            .await
            .unwrap();
        (fs, store, created.attr.ino, created.attr.ino)
    }

    async fn write(fs: &FerryFs, inode: u64, offset: u64, data: &[u8]) -> FuseResult<u32> {
        fs.write(req(), inode, 0, offset, Bytes::copy_from_slice(data))
            .await
            .map(|w| w.written)
    }

    fn errno_of<T: std::fmt::Debug>(r: FuseResult<T>) -> i32 {
        let e = std::io::Error::from(r.expect_err("should fail"));
        e.raw_os_error().unwrap_or_default()
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_returns_before_the_store_takes_it_and_what_depends_on_it_waits() {
        let (fs, store, inode, _) = one_open_file(MemoryStore::new()).await;
        store.set_delay(Duration::from_millis(100));
        let t = tokio::time::Instant::now();
        assert_eq!(write(&fs, inode, 0, &[7u8; 4096]).await.unwrap(), 4096);
        assert_eq!(write(&fs, inode, 4096, &[8u8; 4096]).await.unwrap(), 4096);
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "{:?}",
            t.elapsed()
        );

        // getattr and read wait for both writes (100 ms, concurrently), then take their own 100 ms.
        let attr = fs.getattr(req(), inode, None, 0).await.unwrap();
        assert_eq!(attr.attr.size, 8192);
        assert!(
            t.elapsed() >= Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
        write(&fs, inode, 100, &[9u8; 10]).await.unwrap();
        let data = fs.read(req(), inode, 0, 0, 8192).await.unwrap().data;
        assert_eq!(&data[..100], &[7u8; 100][..]);
        assert_eq!(&data[100..110], &[9u8; 10][..]);
        assert_eq!(&data[4096..], &[8u8; 4096][..]);

        // A lookup of the file while a write extends it answers the extended size.
        write(&fs, inode, 8192, &[1u8; 8]).await.unwrap();
        let entry = fs.lookup(req(), ROOT_INODE, OsStr::new("f")).await.unwrap();
        assert_eq!(entry.attr.size, 8200);
        fs.fsync(req(), inode, 0, false).await.unwrap();
        fs.flush(req(), inode, 0, 0).await.unwrap();
    }

    /// Close-to-open: an open keeps the kernel's cached pages only when the file is as it was at the
    /// previous open here; a change by anyone else (here: straight in the store) makes it drop them.
    #[tokio::test(start_paused = true)]
    async fn an_open_keeps_the_cache_only_while_the_file_is_unchanged_since_the_last_open() {
        let (fs, store, inode, _) = one_open_file(MemoryStore::new()).await;
        let keep = |r: ReplyOpen| r.flags & FOPEN_KEEP_CACHE != 0;
        assert!(!keep(fs.open(req(), inode, 0).await.unwrap()), "first open");
        assert!(keep(fs.open(req(), inode, 0).await.unwrap()), "unchanged");

        // Another host writes and extends the file.
        let handle = fs.inodes.handle(inode).unwrap();
        tokio::time::advance(Duration::from_millis(5)).await;
        store
            .write(&handle, 0, Bytes::from_static(b"from elsewhere"))
            .await
            .unwrap();
        assert!(!keep(fs.open(req(), inode, 0).await.unwrap()), "changed");
        assert!(
            keep(fs.open(req(), inode, 0).await.unwrap()),
            "unchanged again"
        );

        // Writes through this host settle before the check; a truncating open never keeps the cache.
        write(&fs, inode, 0, b"local").await.unwrap();
        assert!(
            !keep(fs.open(req(), inode, 0).await.unwrap()),
            "written here"
        );
        assert!(keep(fs.open(req(), inode, 0).await.unwrap()), "unchanged");
        let trunc = libc::O_TRUNC as u32;
        assert!(
            !keep(fs.open(req(), inode, trunc).await.unwrap()),
            "truncated"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_waits_only_for_the_writes_in_flight_that_overlap_it() {
        let (fs, store, inode, _) = one_open_file(MemoryStore::new()).await;
        write(&fs, inode, 0, &[1u8; 65536]).await.unwrap();
        fs.fsync(req(), inode, 0, false).await.unwrap();
        // Every store call now takes 100 ms of virtual time.
        store.set_delay(Duration::from_millis(100));
        let t = tokio::time::Instant::now();
        write(&fs, inode, 0, &[2u8; 4096]).await.unwrap();
        // Elsewhere in the file: only the read's own 100 ms, concurrent with the write's.
        let data = fs.read(req(), inode, 0, 32768, 4096).await.unwrap().data;
        assert_eq!(&data[..], &[1u8; 4096][..]);
        assert_eq!(t.elapsed(), Duration::from_millis(100));
        // Over the written range: after the write, and with its data.
        write(&fs, inode, 0, &[3u8; 4096]).await.unwrap();
        let data = fs.read(req(), inode, 0, 0, 8192).await.unwrap().data;
        assert_eq!(&data[..4096], &[3u8; 4096][..]);
        assert_eq!(&data[4096..], &[1u8; 4096][..]);
        assert_eq!(t.elapsed(), Duration::from_millis(300));

        // Past the server's end of file while a write further on extends it: the short reply is not the
        // end, so the read waits for that write and returns the hole between as zeros.
        write(&fs, inode, 100 << 10, &[4u8; 4096]).await.unwrap();
        let data = fs.read(req(), inode, 0, 64 << 10, 8192).await.unwrap().data;
        assert_eq!(&data[..], &[0u8; 8192][..]);
        let data = fs
            .read(req(), inode, 0, 100 << 10, 8192)
            .await
            .unwrap()
            .data;
        assert_eq!(&data[..], &[4u8; 4096][..]);
        fs.flush(req(), inode, 0, 0).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_background_write_is_reported_by_later_writes_until_fsync_takes_it() {
        let (fs, store, inode, _) = one_open_file(MemoryStore::new()).await;
        store.set_capacity(1 << 20);
        store.set_delay(Duration::from_millis(10));
        // Taken at once; the second cannot fit, which only the store finds out, later.
        write(&fs, inode, 0, &vec![1u8; 1 << 20]).await.unwrap();
        write(&fs, inode, 1 << 20, &vec![2u8; 1 << 20])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Every write reports it until a flush or fsync has.
        assert_eq!(errno_of(write(&fs, inode, 0, b"x").await), libc::ENOSPC);
        assert_eq!(errno_of(write(&fs, inode, 0, b"x").await), libc::ENOSPC);
        assert_eq!(
            errno_of(fs.fsync(req(), inode, 0, false).await),
            libc::ENOSPC
        );
        // Reported once: the data that fit is committed by the next fsync.
        fs.fsync(req(), inode, 0, false).await.unwrap();
        assert_eq!(
            fs.getattr(req(), inode, None, 0).await.unwrap().attr.size,
            1 << 20
        );

        // The same through close: flush reports it.
        write(&fs, inode, 1 << 20, b"more").await.unwrap();
        assert_eq!(errno_of(fs.flush(req(), inode, 0, 0).await), libc::ENOSPC);
        fs.flush(req(), inode, 0, 0).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_file_takes_writes_up_to_the_bound_then_fails_within_the_deadline() {
        let store = MemoryStore::with_timeout(Duration::from_secs(2));
        let (fs, store, inode, fileid) = one_open_file(store).await;
        store.stall(fileid);
        let t = tokio::time::Instant::now();
        let mib = vec![3u8; 1 << 20];
        let bound = write_behind::MAX_BYTES_IN_FLIGHT >> 20;
        for i in 0..bound {
            write(&fs, inode, i << 20, &mib).await.unwrap();
        }
        assert!(t.elapsed() < Duration::from_millis(10), "{:?}", t.elapsed());
        // Over the bound: waits for the writes in flight, which time out, and reports that.
        assert_eq!(
            errno_of(write(&fs, inode, bound << 20, &mib).await),
            libc::EIO
        );
        let took = t.elapsed();
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert_eq!(errno_of(fs.fsync(req(), inode, 0, false).await), libc::EIO);
        assert!(t.elapsed() < Duration::from_secs(3));

        // The server answers again: the file works again.
        store.resume(fileid);
        write(&fs, inode, 0, b"back").await.unwrap();
        fs.fsync(req(), inode, 0, false).await.unwrap();
        let data = fs.read(req(), inode, 0, 0, 4).await.unwrap().data;
        assert_eq!(&data[..], b"back");
    }

    #[tokio::test(start_paused = true)]
    async fn truncation_and_unlink_wait_for_the_writes_before_them() {
        let (fs, store, inode, _) = one_open_file(MemoryStore::new()).await;
        store.set_delay(Duration::from_millis(100));
        write(&fs, inode, 0, &[5u8; 1000]).await.unwrap();
        let set = KernelSetAttr {
            size: Some(10),
            ..KernelSetAttr::default()
        };
        let attr = fs.setattr(req(), inode, None, set).await.unwrap();
        assert_eq!(
            attr.attr.size, 10,
            "the earlier write must not land after the truncation"
        );
        write(&fs, inode, 0, &[6u8; 1000]).await.unwrap();
        // The write settles before the name goes, so it cannot fail late against a removed file.
        fs.unlink(req(), ROOT_INODE, OsStr::new("f")).await.unwrap();
        assert!(!fs.writes.any_busy());
        fs.release(req(), inode, 0, 0, 0, false).await.unwrap();
    }

    /// A store that takes at most `most` bytes per write, and none at all while `takes_none` is set; all else
    /// goes to the memory store.
    struct ShortWrites {
        inner: Arc<MemoryStore>,
        most: usize,
        takes_none: std::sync::atomic::AtomicBool,
        writes: AtomicU64,
    }

    #[async_trait::async_trait]
    impl FileStore for ShortWrites {
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
            self.inner.setattr(handle, set).await
        }
        async fn read(&self, handle: &FileHandle, offset: u64, len: u32) -> StoreResult<ReadReply> {
            self.inner.read(handle, offset, len).await
        }
        async fn write(&self, handle: &FileHandle, offset: u64, data: Bytes) -> StoreResult<u32> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            if self.takes_none.load(Ordering::Relaxed) {
                return Ok(0);
            }
            let n = data.len().min(self.most);
            self.inner.write(handle, offset, data.slice(..n)).await
        }
        async fn commit(&self, handle: &FileHandle) -> StoreResult<()> {
            self.inner.commit(handle).await
        }
        async fn create(
            &self,
            dir: &FileHandle,
            name: &[u8],
            attr: NewAttr,
            how: CreateMode,
        ) -> StoreResult<(FileHandle, Attr)> {
            self.inner.create(dir, name, attr, how).await
        }
        async fn mkdir(
            &self,
            dir: &FileHandle,
            name: &[u8],
            attr: NewAttr,
        ) -> StoreResult<(FileHandle, Attr)> {
            self.inner.mkdir(dir, name, attr).await
        }
        async fn symlink(
            &self,
            dir: &FileHandle,
            name: &[u8],
            target: &[u8],
            attr: NewAttr,
        ) -> StoreResult<(FileHandle, Attr)> {
            self.inner.symlink(dir, name, target, attr).await
        }
        async fn readlink(&self, handle: &FileHandle) -> StoreResult<Vec<u8>> {
            self.inner.readlink(handle).await
        }
        async fn link(
            &self,
            handle: &FileHandle,
            dir: &FileHandle,
            name: &[u8],
        ) -> StoreResult<Attr> {
            self.inner.link(handle, dir, name).await
        }
        async fn unlink(&self, dir: &FileHandle, name: &[u8]) -> StoreResult<()> {
            self.inner.unlink(dir, name).await
        }
        async fn rmdir(&self, dir: &FileHandle, name: &[u8]) -> StoreResult<()> {
            self.inner.rmdir(dir, name).await
        }
        async fn rename(
            &self,
            from_dir: &FileHandle,
            from_name: &[u8],
            to_dir: &FileHandle,
            to_name: &[u8],
        ) -> StoreResult<()> {
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

    #[tokio::test(start_paused = true)]
    async fn short_writes_are_continued_in_the_background_and_a_write_of_nothing_is_eio() {
        let memory = Arc::new(MemoryStore::new());
        let store = Arc::new(ShortWrites {
            inner: memory.clone(),
            most: 1000,
            takes_none: std::sync::atomic::AtomicBool::new(false),
            writes: AtomicU64::new(0),
        });
        let root = store.root().await.unwrap();
        let fs = FerryFs::new(store.clone(), root, Duration::from_secs(1));
        let inode = fs
            .create(req(), ROOT_INODE, OsStr::new("f"), 0o644, 0)
            .await
            .unwrap()
            .attr
            .ino;
        let data: Vec<u8> = (0..4500u32).map(|i| i as u8).collect();
        assert_eq!(write(&fs, inode, 0, &data).await.unwrap(), 4500);
        fs.fsync(req(), inode, 0, false).await.unwrap();
        assert_eq!(
            store.writes.load(Ordering::Relaxed),
            5,
            "4500 bytes in parts of 1000"
        );
        let back = fs.read(req(), inode, 0, 0, 5000).await.unwrap().data;
        assert_eq!(&back[..], &data[..]);

        // A store that takes nothing: the background write gives up with EIO, reported by the next flush.
        store.takes_none.store(true, Ordering::Relaxed);
        assert_eq!(write(&fs, inode, 0, b"lost").await.unwrap(), 4);
        assert_eq!(errno_of(fs.flush(req(), inode, 0, 0).await), libc::EIO);
    }

    #[test]
    fn timestamps_convert_both_sides_of_the_epoch() {
        use std::time::UNIX_EPOCH;
        let t = wire::system_time(1_600_000_000, 5);
        assert_eq!(t, UNIX_EPOCH + Duration::new(1_600_000_000, 5));
        // -1.5 s is sec -2 plus 0.5 s, as timespec holds it.
        let t = wire::system_time((-2i64) as u64, 500_000_000);
        assert_eq!(t, UNIX_EPOCH - Duration::from_millis(1500));
        // The extremes convert without panicking.
        assert!(wire::system_time((i64::MAX) as u64, 999_999_999) > SystemTime::now());
        assert!(wire::system_time((i64::MIN) as u64, 0) < UNIX_EPOCH);
    }

    #[test]
    fn attributes_carry_the_inode_not_the_fileid() {
        let now = SystemTime::now();
        let a = Attr {
            kind: FileKind::Symlink,
            mode: 0o100777,
            nlink: 1,
            uid: 5,
            gid: 6,
            size: 3,
            used: 513,
            fileid: 99,
            atime: now,
            mtime: now,
            ctime: now,
            rdev: (8, 1),
        };
        let f = fuse_attr(42, &a);
        assert_eq!(f.ino, 42);
        assert_eq!(f.kind, FileType::Symlink);
        assert_eq!(f.perm, 0o777);
        assert_eq!(f.blocks, 2);
        assert_eq!((f.uid, f.gid), (5, 6));
        assert_eq!(f.rdev, 0x801, "major 8, minor 1 as the kernel encodes it");
    }
}

//! `MemoryStore`: a `FileStore` held in memory, for tests of the FUSE adapter and of what sits above it.
//!
//! It owns an honest model of a POSIX filesystem as an NFSv3 server presents it: hard links share one object
//! and count in `nlink`, an object disappears with its last name (a handle to it then answers `Stale`, as an
//! NFS server does), rename replaces a compatible target, `rmdir` refuses a non-empty directory, files are
//! sparse (holes read as zeros and use no space) and directory cookies stay valid while the directory changes.
//! It also injects faults: a delay on every call, and an outage of the whole store or of single objects, during
//! which calls wait for the store's deadline and fail with `TimedOut`, like a network store that stopped
//! answering. It must not check permissions: the kernel does that for a FUSE mount (`default_permissions`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use tokio::sync::watch;

use super::store::{
    Attr, CookieVerifier, CreateMode, DirEntry, DirPage, FileHandle, FileKind, FileStore, FsStat,
    NewAttr, ReadReply, SetAttr, SetTime, StoreError, StoreErrorKind, StoreResult,
};
use crate::sync::Recover;

/// File data is kept in chunks of this size; a chunk exists only once something was written into it.
const CHUNK: u64 = 64 * 1024;

/// The fileid of the root directory.
const ROOT_ID: u64 = 1;

/// Longest name accepted, as on Linux filesystems.
const NAME_MAX: usize = 255;

/// Which calls an outage blocks.
#[derive(Clone, Debug, Default)]
struct Outage {
    /// Every call.
    all: bool,
    /// Calls whose first handle names one of these fileids.
    objects: HashSet<u64>,
}

impl Outage {
    fn blocks(&self, id: u64) -> bool {
        self.all || self.objects.contains(&id)
    }
}

/// An in-memory `FileStore`. See the module documentation.
pub struct MemoryStore {
    state: Mutex<State>,
    /// How long a call waits for an outage to end before it fails with `TimedOut`.
    timeout: Duration,
    delay: Mutex<Duration>,
    outage: watch::Sender<Outage>,
    /// The largest read and write asked for so far, to check what request sizes reach the store.
    largest_read: AtomicU64,
    largest_write: AtomicU64,
}

struct State {
    nodes: HashMap<u64, Node>,
    next_id: u64,
    /// Directory cookies come from one counter, so a cookie is never reused within a directory.
    next_cookie: u64,
    capacity: u64,
    /// Bytes held by all file chunks.
    used: u64,
}

struct Node {
    attr: Attr,
    content: Content,
}

enum Content {
    File(Chunks),
    Dir(Directory),
    Symlink(Vec<u8>),
}

/// A sparse file body. Invariant: bytes at or beyond `Attr::size` inside a chunk are zero, so extending a
/// file never exposes old data.
#[derive(Default)]
struct Chunks(BTreeMap<u64, Box<[u8]>>);

#[derive(Default)]
struct Directory {
    /// The parent's fileid (the root is its own parent).
    parent: u64,
    /// name -> (cookie, fileid)
    by_name: HashMap<Vec<u8>, (u64, u64)>,
    /// cookie -> name, so a listing resumes after a cookie in order, whatever changed meanwhile.
    by_cookie: BTreeMap<u64, Vec<u8>>,
}

impl Directory {
    fn insert(&mut self, name: Vec<u8>, id: u64, cookie: u64) {
        self.by_cookie.insert(cookie, name.clone());
        self.by_name.insert(name, (cookie, id));
    }

    fn remove(&mut self, name: &[u8]) -> Option<u64> {
        let (cookie, id) = self.by_name.remove(name)?;
        self.by_cookie.remove(&cookie);
        Some(id)
    }
}

fn err(kind: StoreErrorKind, message: impl Into<String>) -> StoreError {
    StoreError::new(kind, message)
}

fn handle_of(id: u64) -> FileHandle {
    FileHandle(Bytes::copy_from_slice(&id.to_be_bytes()))
}

fn id_of(handle: &FileHandle) -> StoreResult<u64> {
    let bytes: [u8; 8] = handle.0.as_ref().try_into().map_err(|_| {
        err(
            StoreErrorKind::Stale,
            "the file handle is not one this store issued",
        )
    })?;
    Ok(u64::from_be_bytes(bytes))
}

fn check_name(name: &[u8]) -> StoreResult<()> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(err(
            StoreErrorKind::Invalid,
            format!("invalid name {:?}", String::from_utf8_lossy(name)),
        ));
    }
    if name.len() > NAME_MAX {
        return Err(err(
            StoreErrorKind::NameTooLong,
            "the name is longer than 255 bytes",
        ));
    }
    Ok(())
}

fn resolve(time: SetTime, now: SystemTime) -> SystemTime {
    match time {
        SetTime::Now => now,
        SetTime::At(t) => t,
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store (a root directory owned by root, mode 0755) with a 5 s deadline and 1 TiB of space.
    pub fn new() -> Self {
        Self::with_timeout(Duration::from_secs(5))
    }

    /// An empty store whose calls give up after `timeout` during an outage.
    pub fn with_timeout(timeout: Duration) -> Self {
        let now = SystemTime::now();
        let root = Node {
            attr: Attr {
                kind: FileKind::Directory,
                mode: 0o755,
                nlink: 2,
                uid: 0,
                gid: 0,
                size: 4096,
                used: 4096,
                fileid: ROOT_ID,
                atime: now,
                mtime: now,
                ctime: now,
                rdev: (0, 0),
            },
            content: Content::Dir(Directory {
                parent: ROOT_ID,
                ..Directory::default()
            }),
        };
        MemoryStore {
            state: Mutex::new(State {
                nodes: HashMap::from([(ROOT_ID, root)]),
                next_id: ROOT_ID + 1,
                next_cookie: 1,
                capacity: 1 << 40,
                used: 0,
            }),
            timeout,
            delay: Mutex::new(Duration::ZERO),
            outage: watch::Sender::new(Outage::default()),
            largest_read: AtomicU64::new(0),
            largest_write: AtomicU64::new(0),
        }
    }

    /// Delays every later call by `delay` (zero: none).
    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().recover() = delay;
    }

    /// Makes the whole store stop answering (`true`) or answer again (`false`).
    pub fn set_unreachable(&self, down: bool) {
        self.outage.send_modify(|o| o.all = down);
    }

    /// Makes calls on one object (by fileid) stop answering until `resume`; other objects still answer.
    pub fn stall(&self, fileid: u64) {
        self.outage.send_modify(|o| {
            o.objects.insert(fileid);
        });
    }

    /// Ends a `stall`.
    pub fn resume(&self, fileid: u64) {
        self.outage.send_modify(|o| {
            o.objects.remove(&fileid);
        });
    }

    /// The largest read and the largest write requested so far, in bytes.
    pub fn largest_io(&self) -> (u64, u64) {
        (
            self.largest_read.load(Ordering::Relaxed),
            self.largest_write.load(Ordering::Relaxed),
        )
    }

    /// Sets the space available for file data; writes beyond it fail with `NoSpace`.
    pub fn set_capacity(&self, bytes: u64) {
        self.lock().capacity = bytes;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves the model as consistent as any crash would; carry on.
        self.state.lock().recover()
    }

    /// Applies the injected delay and waits out an outage that covers `id`, up to the deadline.
    async fn gate(&self, handle: &FileHandle) -> StoreResult<u64> {
        let id = id_of(handle)?;
        let delay = *self.delay.lock().recover();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut rx = self.outage.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait; if it did, that is a timeout.
        let answered = matches!(
            tokio::time::timeout(self.timeout, rx.wait_for(|o| !o.blocks(id))).await,
            Ok(Ok(_))
        );
        if answered {
            Ok(id)
        } else {
            Err(err(
                StoreErrorKind::TimedOut,
                format!(
                    "the store did not answer within {:?}; check that the server is reachable",
                    self.timeout
                ),
            ))
        }
    }
}

impl State {
    fn node(&self, id: u64) -> StoreResult<&Node> {
        self.nodes.get(&id).ok_or_else(stale)
    }

    fn node_mut(&mut self, id: u64) -> StoreResult<&mut Node> {
        self.nodes.get_mut(&id).ok_or_else(stale)
    }

    fn dir(&self, id: u64) -> StoreResult<&Directory> {
        match &self.node(id)?.content {
            Content::Dir(d) => Ok(d),
            _ => Err(err(StoreErrorKind::NotDir, "not a directory")),
        }
    }

    fn dir_mut(&mut self, id: u64) -> StoreResult<&mut Directory> {
        match &mut self.node_mut(id)?.content {
            Content::Dir(d) => Ok(d),
            _ => Err(err(StoreErrorKind::NotDir, "not a directory")),
        }
    }

    fn child(&self, dir: u64, name: &[u8]) -> StoreResult<Option<u64>> {
        Ok(self.dir(dir)?.by_name.get(name).map(|&(_, id)| id))
    }

    /// Marks a directory's contents as changed.
    fn touch_dir(&mut self, dir: u64, now: SystemTime) {
        if let Some(n) = self.nodes.get_mut(&dir) {
            n.attr.mtime = now;
            n.attr.ctime = now;
        }
    }

    /// Adds a new object named `name` in `dir`.
    fn add(
        &mut self,
        dir: u64,
        name: &[u8],
        kind: FileKind,
        new: NewAttr,
        content: Content,
    ) -> StoreResult<(FileHandle, Attr)> {
        check_name(name)?;
        if self.child(dir, name)?.is_some() {
            return Err(err(StoreErrorKind::Exists, "the name already exists"));
        }
        let now = SystemTime::now();
        let id = self.next_id;
        self.next_id += 1;
        let (nlink, size) = match &content {
            Content::Dir(_) => (2, 4096),
            Content::Symlink(t) => (1, t.len() as u64),
            Content::File(_) => (1, 0),
        };
        let attr = Attr {
            kind,
            mode: new.mode & 0o7777,
            nlink,
            uid: new.uid,
            gid: new.gid,
            size,
            used: if kind == FileKind::Directory { 4096 } else { 0 },
            fileid: id,
            atime: now,
            mtime: now,
            ctime: now,
            rdev: (0, 0),
        };
        self.nodes.insert(
            id,
            Node {
                attr: attr.clone(),
                content,
            },
        );
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        self.dir_mut(dir)?.insert(name.to_vec(), id, cookie);
        if kind == FileKind::Directory {
            self.node_mut(dir)?.attr.nlink += 1;
        }
        self.touch_dir(dir, now);
        Ok((handle_of(id), attr))
    }

    /// Drops one name of `id`; the object goes when its last name does.
    fn drop_link(&mut self, id: u64, now: SystemTime) {
        let gone = match self.nodes.get_mut(&id) {
            Some(n) => {
                n.attr.nlink = n.attr.nlink.saturating_sub(1);
                n.attr.ctime = now;
                n.attr.nlink == 0 || n.attr.kind == FileKind::Directory
            }
            None => false,
        };
        if gone {
            if let Some(Node {
                content: Content::File(chunks),
                ..
            }) = self.nodes.remove(&id)
            {
                self.used -= chunks.0.len() as u64 * CHUNK;
            }
        }
    }

    /// Removes `name` from `dir`, checking its kind: `want_dir` for rmdir, otherwise unlink.
    fn remove(&mut self, dir: u64, name: &[u8], want_dir: bool) -> StoreResult<()> {
        check_name(name)?;
        let id = self
            .child(dir, name)?
            .ok_or_else(|| err(StoreErrorKind::NotFound, "no such file or directory"))?;
        let node = self.node(id)?;
        match (&node.content, want_dir) {
            (Content::Dir(d), true) if !d.by_name.is_empty() => {
                return Err(err(StoreErrorKind::NotEmpty, "the directory is not empty"))
            }
            (Content::Dir(_), true) => {}
            (Content::Dir(_), false) => {
                return Err(err(StoreErrorKind::IsDir, "is a directory; use rmdir"))
            }
            (_, true) => return Err(err(StoreErrorKind::NotDir, "not a directory")),
            (_, false) => {}
        }
        let now = SystemTime::now();
        self.dir_mut(dir)?.remove(name);
        if want_dir {
            self.node_mut(dir)?.attr.nlink -= 1;
        }
        self.drop_link(id, now);
        self.touch_dir(dir, now);
        Ok(())
    }

    /// Whether `ancestor` is `id` or one of the directories above it.
    fn is_within(&self, mut id: u64, ancestor: u64) -> bool {
        loop {
            if id == ancestor {
                return true;
            }
            match self.dir(id) {
                Ok(d) if d.parent != id => id = d.parent,
                _ => return false,
            }
        }
    }

    fn rename(&mut self, from: u64, from_name: &[u8], to: u64, to_name: &[u8]) -> StoreResult<()> {
        check_name(from_name)?;
        check_name(to_name)?;
        self.dir(to)?;
        let id = self
            .child(from, from_name)?
            .ok_or_else(|| err(StoreErrorKind::NotFound, "no such file or directory"))?;
        let moving_dir = self.node(id)?.attr.kind == FileKind::Directory;
        if moving_dir && self.is_within(to, id) {
            return Err(err(
                StoreErrorKind::Invalid,
                "cannot move a directory into itself",
            ));
        }
        let now = SystemTime::now();
        if let Some(target) = self.child(to, to_name)? {
            // Two names of one object: POSIX says do nothing.
            if target == id {
                return Ok(());
            }
            match (&self.node(target)?.content, moving_dir) {
                (Content::Dir(d), true) if !d.by_name.is_empty() => {
                    return Err(err(
                        StoreErrorKind::NotEmpty,
                        "the target directory is not empty",
                    ))
                }
                (Content::Dir(_), true) => {}
                (Content::Dir(_), false) => {
                    return Err(err(StoreErrorKind::IsDir, "the target is a directory"))
                }
                (_, true) => {
                    return Err(err(StoreErrorKind::NotDir, "the target is not a directory"))
                }
                (_, false) => {}
            }
            self.dir_mut(to)?.remove(to_name);
            if moving_dir {
                self.node_mut(to)?.attr.nlink -= 1;
            }
            self.drop_link(target, now);
        }
        self.dir_mut(from)?.remove(from_name);
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        self.dir_mut(to)?.insert(to_name.to_vec(), id, cookie);
        if moving_dir {
            self.node_mut(from)?.attr.nlink -= 1;
            self.node_mut(to)?.attr.nlink += 1;
            self.dir_mut(id)?.parent = to;
        }
        self.node_mut(id)?.attr.ctime = now;
        self.touch_dir(from, now);
        self.touch_dir(to, now);
        Ok(())
    }

    /// Sets a file's length: drops chunks past the end and zeroes the tail of the last one.
    fn truncate(&mut self, id: u64, size: u64) -> StoreResult<()> {
        let node = self.nodes.get_mut(&id).ok_or_else(stale)?;
        let Content::File(chunks) = &mut node.content else {
            return Err(match node.attr.kind {
                FileKind::Directory => err(StoreErrorKind::IsDir, "cannot truncate a directory"),
                _ => err(StoreErrorKind::Invalid, "only regular files have a length"),
            });
        };
        if size < node.attr.size {
            let keep = size.div_ceil(CHUNK);
            let dropped = chunks.0.split_off(&keep);
            if !size.is_multiple_of(CHUNK) {
                if let Some(last) = chunks.0.get_mut(&(size / CHUNK)) {
                    last[(size % CHUNK) as usize..].fill(0);
                }
            }
            self.used -= dropped.len() as u64 * CHUNK;
        }
        node.attr.size = size;
        node.attr.used = chunks.0.len() as u64 * CHUNK;
        Ok(())
    }

    fn write(&mut self, id: u64, offset: u64, data: &[u8]) -> StoreResult<u32> {
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| err(StoreErrorKind::Invalid, "the write ends past 2^64"))?;
        let capacity = self.capacity;
        let mut used = self.used;
        let node = self.nodes.get_mut(&id).ok_or_else(stale)?;
        let Content::File(chunks) = &mut node.content else {
            return Err(err(StoreErrorKind::IsDir, "cannot write to a directory"));
        };
        // Check space for the chunks this write adds before changing anything, so a failed write changes nothing.
        let first = offset / CHUNK;
        let last = end.saturating_sub(1) / CHUNK;
        if !data.is_empty() {
            let new_chunks = (first..=last).filter(|i| !chunks.0.contains_key(i)).count() as u64;
            if used + new_chunks * CHUNK > capacity {
                return Err(err(StoreErrorKind::NoSpace, "the store is full"));
            }
        }
        let mut pos = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let index = pos / CHUNK;
            let within = (pos % CHUNK) as usize;
            let n = rest.len().min(CHUNK as usize - within);
            let chunk = chunks.0.entry(index).or_insert_with(|| {
                used += CHUNK;
                vec![0; CHUNK as usize].into_boxed_slice()
            });
            chunk[within..within + n].copy_from_slice(&rest[..n]);
            rest = &rest[n..];
            pos += n as u64;
        }
        let now = SystemTime::now();
        node.attr.size = node.attr.size.max(end);
        node.attr.used = chunks.0.len() as u64 * CHUNK;
        node.attr.mtime = now;
        node.attr.ctime = now;
        self.used = used;
        Ok(data.len() as u32)
    }

    fn read(&mut self, id: u64, offset: u64, len: u32) -> StoreResult<ReadReply> {
        let node = self.nodes.get_mut(&id).ok_or_else(stale)?;
        let Content::File(chunks) = &node.content else {
            return Err(err(StoreErrorKind::IsDir, "cannot read a directory"));
        };
        let size = node.attr.size;
        let end = offset.saturating_add(u64::from(len)).min(size);
        if offset >= end {
            return Ok(ReadReply {
                data: Bytes::new(),
                eof: offset >= size,
            });
        }
        let mut out = BytesMut::zeroed((end - offset) as usize);
        // Holes stay zero: copy only the chunks that exist.
        for (&index, chunk) in chunks.0.range(offset / CHUNK..=(end - 1) / CHUNK) {
            let chunk_start = index * CHUNK;
            let from = offset.max(chunk_start);
            let to = end.min(chunk_start + CHUNK);
            out[(from - offset) as usize..(to - offset) as usize].copy_from_slice(
                &chunk[(from - chunk_start) as usize..(to - chunk_start) as usize],
            );
        }
        node.attr.atime = SystemTime::now();
        Ok(ReadReply {
            data: out.freeze(),
            eof: end == size,
        })
    }
}

fn stale() -> StoreError {
    err(
        StoreErrorKind::Stale,
        "the file no longer exists (stale file handle)",
    )
}

/// The verifier of a directory: constant, because cookies in this store never become invalid.
fn verifier_of(dir: u64) -> CookieVerifier {
    dir.to_be_bytes()
}

#[async_trait]
impl FileStore for MemoryStore {
    async fn root(&self) -> StoreResult<FileHandle> {
        let root = handle_of(ROOT_ID);
        self.gate(&root).await?;
        Ok(root)
    }

    async fn lookup(&self, dir: &FileHandle, name: &[u8]) -> StoreResult<(FileHandle, Attr)> {
        let dir = self.gate(dir).await?;
        let state = self.lock();
        let id = if name == b"." {
            dir
        } else if name == b".." {
            state.dir(dir)?.parent
        } else {
            check_name(name)?;
            state
                .child(dir, name)?
                .ok_or_else(|| err(StoreErrorKind::NotFound, "no such file or directory"))?
        };
        Ok((handle_of(id), state.node(id)?.attr.clone()))
    }

    async fn getattr(&self, handle: &FileHandle) -> StoreResult<Attr> {
        let id = self.gate(handle).await?;
        Ok(self.lock().node(id)?.attr.clone())
    }

    async fn setattr(&self, handle: &FileHandle, set: &SetAttr) -> StoreResult<Attr> {
        let id = self.gate(handle).await?;
        let mut state = self.lock();
        state.node(id)?;
        if let Some(size) = set.size {
            state.truncate(id, size)?;
        }
        let now = SystemTime::now();
        let node = state.node_mut(id)?;
        let a = &mut node.attr;
        if let Some(mode) = set.mode {
            a.mode = mode & 0o7777;
        }
        if let Some(uid) = set.uid {
            a.uid = uid;
        }
        if let Some(gid) = set.gid {
            a.gid = gid;
        }
        if let Some(t) = set.atime {
            a.atime = resolve(t, now);
        }
        if let Some(t) = set.mtime {
            a.mtime = resolve(t, now);
        } else if set.size.is_some() {
            // A truncate changes the data, so it moves mtime like a write.
            a.mtime = now;
        }
        a.ctime = now;
        Ok(a.clone())
    }

    async fn read(&self, handle: &FileHandle, offset: u64, len: u32) -> StoreResult<ReadReply> {
        let id = self.gate(handle).await?;
        self.largest_read
            .fetch_max(u64::from(len), Ordering::Relaxed);
        self.lock().read(id, offset, len)
    }

    async fn write(&self, handle: &FileHandle, offset: u64, data: Bytes) -> StoreResult<u32> {
        let id = self.gate(handle).await?;
        self.largest_write
            .fetch_max(data.len() as u64, Ordering::Relaxed);
        self.lock().write(id, offset, &data)
    }

    async fn commit(&self, handle: &FileHandle) -> StoreResult<()> {
        // Memory is as durable as this store gets; only check that the file still exists.
        let id = self.gate(handle).await?;
        self.lock().node(id).map(|_| ())
    }

    async fn create(
        &self,
        dir: &FileHandle,
        name: &[u8],
        attr: NewAttr,
        how: CreateMode,
    ) -> StoreResult<(FileHandle, Attr)> {
        let dir = self.gate(dir).await?;
        let mut state = self.lock();
        check_name(name)?;
        if let Some(id) = state.child(dir, name)? {
            let node = state.node(id)?;
            return match (how, node.attr.kind) {
                (CreateMode::Exclusive, _) => {
                    Err(err(StoreErrorKind::Exists, "the file already exists"))
                }
                (CreateMode::Unchecked, FileKind::Directory) => {
                    Err(err(StoreErrorKind::IsDir, "a directory has that name"))
                }
                (CreateMode::Unchecked, _) => Ok((handle_of(id), node.attr.clone())),
            };
        }
        state.add(
            dir,
            name,
            FileKind::File,
            attr,
            Content::File(Chunks::default()),
        )
    }

    async fn mkdir(
        &self,
        dir: &FileHandle,
        name: &[u8],
        attr: NewAttr,
    ) -> StoreResult<(FileHandle, Attr)> {
        let dir = self.gate(dir).await?;
        let content = Content::Dir(Directory {
            parent: dir,
            ..Directory::default()
        });
        self.lock()
            .add(dir, name, FileKind::Directory, attr, content)
    }

    /// A special file is an empty file of its kind here, with its device number.
    async fn mknod(
        &self,
        dir: &FileHandle,
        name: &[u8],
        kind: FileKind,
        rdev: (u32, u32),
        attr: NewAttr,
    ) -> StoreResult<(FileHandle, Attr)> {
        let dir = self.gate(dir).await?;
        if matches!(
            kind,
            FileKind::File | FileKind::Directory | FileKind::Symlink
        ) {
            return Err(err(
                StoreErrorKind::Invalid,
                "mknod makes only special files",
            ));
        }
        let mut state = self.lock();
        let (handle, mut made) =
            state.add(dir, name, kind, attr, Content::File(Default::default()))?;
        let id = made.fileid;
        state.node_mut(id)?.attr.rdev = rdev;
        made.rdev = rdev;
        Ok((handle, made))
    }

    async fn symlink(
        &self,
        dir: &FileHandle,
        name: &[u8],
        target: &[u8],
        attr: NewAttr,
    ) -> StoreResult<(FileHandle, Attr)> {
        let dir = self.gate(dir).await?;
        // Symlinks are 0777 on Linux whatever mode is asked for.
        let attr = NewAttr {
            mode: 0o777,
            ..attr
        };
        self.lock().add(
            dir,
            name,
            FileKind::Symlink,
            attr,
            Content::Symlink(target.to_vec()),
        )
    }

    async fn readlink(&self, handle: &FileHandle) -> StoreResult<Vec<u8>> {
        let id = self.gate(handle).await?;
        match &self.lock().node(id)?.content {
            Content::Symlink(target) => Ok(target.clone()),
            _ => Err(err(StoreErrorKind::Invalid, "not a symbolic link")),
        }
    }

    async fn link(&self, handle: &FileHandle, dir: &FileHandle, name: &[u8]) -> StoreResult<Attr> {
        let id = self.gate(handle).await?;
        let dir = id_of(dir)?;
        let mut state = self.lock();
        check_name(name)?;
        if state.node(id)?.attr.kind == FileKind::Directory {
            return Err(err(
                StoreErrorKind::Perm,
                "directories cannot be hard-linked",
            ));
        }
        if state.child(dir, name)?.is_some() {
            return Err(err(StoreErrorKind::Exists, "the name already exists"));
        }
        let cookie = state.next_cookie;
        state.next_cookie += 1;
        state.dir_mut(dir)?.insert(name.to_vec(), id, cookie);
        let now = SystemTime::now();
        state.touch_dir(dir, now);
        let node = state.node_mut(id)?;
        node.attr.nlink += 1;
        node.attr.ctime = now;
        Ok(node.attr.clone())
    }

    async fn unlink(&self, dir: &FileHandle, name: &[u8]) -> StoreResult<()> {
        let dir = self.gate(dir).await?;
        self.lock().remove(dir, name, false)
    }

    async fn rmdir(&self, dir: &FileHandle, name: &[u8]) -> StoreResult<()> {
        let dir = self.gate(dir).await?;
        self.lock().remove(dir, name, true)
    }

    async fn rename(
        &self,
        from_dir: &FileHandle,
        from_name: &[u8],
        to_dir: &FileHandle,
        to_name: &[u8],
    ) -> StoreResult<()> {
        let from = self.gate(from_dir).await?;
        let to = id_of(to_dir)?;
        self.lock().rename(from, from_name, to, to_name)
    }

    async fn readdirplus(
        &self,
        dir: &FileHandle,
        cookie: u64,
        verifier: CookieVerifier,
        max_entries: u32,
    ) -> StoreResult<DirPage> {
        let id = self.gate(dir).await?;
        let state = self.lock();
        let d = state.dir(id)?;
        if cookie != 0 && verifier != verifier_of(id) {
            return Err(err(
                StoreErrorKind::Invalid,
                "the directory cookie is no longer valid; list the directory again",
            ));
        }
        let mut entries = Vec::new();
        let mut rest = d.by_cookie.range(cookie + 1..);
        for (&cookie, name) in rest.by_ref().take(max_entries as usize) {
            let &(_, child) = d
                .by_name
                .get(name)
                .ok_or_else(|| err(StoreErrorKind::Io, "directory index out of step"))?;
            entries.push(DirEntry {
                name: name.clone(),
                cookie,
                handle: handle_of(child),
                attr: state.node(child)?.attr.clone(),
            });
        }
        Ok(DirPage {
            entries,
            verifier: verifier_of(id),
            eof: rest.next().is_none(),
        })
    }

    async fn statfs(&self, handle: &FileHandle) -> StoreResult<FsStat> {
        self.gate(handle).await?;
        let state = self.lock();
        let free = state.capacity.saturating_sub(state.used);
        // A made-up but consistent file-slot budget: one per KiB of capacity.
        let total_files = state.capacity / 1024;
        let free_files = total_files.saturating_sub(state.nodes.len() as u64);
        Ok(FsStat {
            total_bytes: state.capacity,
            free_bytes: free,
            avail_bytes: free,
            total_files,
            free_files,
            avail_files: free_files,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: NewAttr = NewAttr {
        mode: 0o644,
        uid: 1000,
        gid: 1000,
    };

    async fn file(s: &MemoryStore, dir: &FileHandle, name: &str) -> (FileHandle, Attr) {
        s.create(dir, name.as_bytes(), OWNER, CreateMode::Exclusive)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn sparse_write_reads_zeros_in_the_hole_and_uses_only_written_chunks() {
        let s = MemoryStore::new();
        let root = s.root().await.unwrap();
        let (f, _) = file(&s, &root, "f").await;
        s.write(&f, 10 * CHUNK + 5, Bytes::from_static(b"abc"))
            .await
            .unwrap();
        let a = s.getattr(&f).await.unwrap();
        assert_eq!(a.size, 10 * CHUNK + 8);
        assert_eq!(a.used, CHUNK);
        let r = s.read(&f, CHUNK, 16).await.unwrap();
        assert_eq!(&r.data[..], &[0u8; 16]);
        assert!(!r.eof);
        let r = s.read(&f, 10 * CHUNK + 4, 100).await.unwrap();
        assert_eq!(&r.data[..], b"\0abc");
        assert!(r.eof);
    }

    #[tokio::test]
    async fn truncate_then_extend_does_not_bring_old_data_back() {
        let s = MemoryStore::new();
        let root = s.root().await.unwrap();
        let (f, _) = file(&s, &root, "f").await;
        s.write(&f, 0, Bytes::from(vec![7u8; 100])).await.unwrap();
        let set = |size| SetAttr {
            size: Some(size),
            ..SetAttr::default()
        };
        s.setattr(&f, &set(10)).await.unwrap();
        s.setattr(&f, &set(100)).await.unwrap();
        let r = s.read(&f, 0, 100).await.unwrap();
        assert_eq!(&r.data[..10], &[7u8; 10]);
        assert_eq!(&r.data[10..], &[0u8; 90]);
    }

    #[tokio::test]
    async fn hard_links_share_data_and_count_names() {
        let s = MemoryStore::new();
        let root = s.root().await.unwrap();
        let (f, _) = file(&s, &root, "a").await;
        let a = s.link(&f, &root, b"b").await.unwrap();
        assert_eq!(a.nlink, 2);
        s.unlink(&root, b"a").await.unwrap();
        assert_eq!(s.getattr(&f).await.unwrap().nlink, 1);
        s.unlink(&root, b"b").await.unwrap();
        let e = s.getattr(&f).await.unwrap_err();
        assert_eq!(e.kind, StoreErrorKind::Stale);
    }

    #[tokio::test]
    async fn rmdir_refuses_a_non_empty_directory_and_counts_subdirectories() {
        let s = MemoryStore::new();
        let root = s.root().await.unwrap();
        let (d, _) = s.mkdir(&root, b"d", OWNER).await.unwrap();
        assert_eq!(s.getattr(&root).await.unwrap().nlink, 3);
        file(&s, &d, "x").await;
        let e = s.rmdir(&root, b"d").await.unwrap_err();
        assert_eq!(e.kind, StoreErrorKind::NotEmpty);
        s.unlink(&d, b"x").await.unwrap();
        s.rmdir(&root, b"d").await.unwrap();
        assert_eq!(s.getattr(&root).await.unwrap().nlink, 2);
    }

    #[tokio::test]
    async fn rename_replaces_a_file_and_refuses_a_loop() {
        let s = MemoryStore::new();
        let root = s.root().await.unwrap();
        let (a, _) = file(&s, &root, "a").await;
        let (b, _) = file(&s, &root, "b").await;
        s.rename(&root, b"a", &root, b"b").await.unwrap();
        assert_eq!(s.lookup(&root, b"b").await.unwrap().0, a);
        assert_eq!(s.getattr(&b).await.unwrap_err().kind, StoreErrorKind::Stale);
        let (d, _) = s.mkdir(&root, b"d", OWNER).await.unwrap();
        s.mkdir(&d, b"e", OWNER).await.unwrap();
        let e = s.rename(&root, b"d", &d, b"inside").await.unwrap_err();
        assert_eq!(e.kind, StoreErrorKind::Invalid);
        let e = s.rename(&root, b"b", &root, b"d").await.unwrap_err();
        assert_eq!(e.kind, StoreErrorKind::IsDir);
    }

    #[tokio::test]
    async fn listing_pages_resume_after_their_cookie_despite_changes() {
        let s = MemoryStore::new();
        let root = s.root().await.unwrap();
        for i in 0..10 {
            file(&s, &root, &format!("f{i}")).await;
        }
        let first = s.readdirplus(&root, 0, [0; 8], 4).await.unwrap();
        assert_eq!(first.entries.len(), 4);
        assert!(!first.eof);
        // Removing an entry already listed must not shift the rest.
        s.unlink(&root, b"f0").await.unwrap();
        let last = first.entries[3].cookie;
        let rest = s
            .readdirplus(&root, last, first.verifier, 100)
            .await
            .unwrap();
        assert!(rest.eof);
        let names: Vec<_> = rest.entries.iter().map(|e| e.name.clone()).collect();
        let want: Vec<_> = (4..10).map(|i| format!("f{i}").into_bytes()).collect();
        assert_eq!(names, want);
    }

    #[tokio::test]
    async fn exclusive_create_of_an_existing_name_fails_and_unchecked_opens_it() {
        let s = MemoryStore::new();
        let root = s.root().await.unwrap();
        let (f, _) = file(&s, &root, "f").await;
        let e = s
            .create(&root, b"f", OWNER, CreateMode::Exclusive)
            .await
            .unwrap_err();
        assert_eq!(e.kind, StoreErrorKind::Exists);
        let (again, _) = s
            .create(&root, b"f", OWNER, CreateMode::Unchecked)
            .await
            .unwrap();
        assert_eq!(again, f);
    }

    #[tokio::test]
    async fn a_full_store_refuses_writes_without_changing_the_file() {
        let s = MemoryStore::new();
        s.set_capacity(CHUNK);
        let root = s.root().await.unwrap();
        let (f, _) = file(&s, &root, "f").await;
        s.write(&f, 0, Bytes::from_static(b"x")).await.unwrap();
        let e = s
            .write(&f, CHUNK, Bytes::from_static(b"y"))
            .await
            .unwrap_err();
        assert_eq!(e.kind, StoreErrorKind::NoSpace);
        assert_eq!(s.getattr(&f).await.unwrap().size, 1);
    }

    #[tokio::test]
    async fn an_outage_times_out_and_a_stall_spares_other_objects() {
        let s = MemoryStore::with_timeout(Duration::from_millis(100));
        let root = s.root().await.unwrap();
        let (f, a) = file(&s, &root, "f").await;
        s.stall(a.fileid);
        let e = s.getattr(&f).await.unwrap_err();
        assert_eq!(e.kind, StoreErrorKind::TimedOut);
        s.getattr(&root).await.unwrap();
        s.resume(a.fileid);
        s.getattr(&f).await.unwrap();
        s.set_unreachable(true);
        assert_eq!(
            s.getattr(&root).await.unwrap_err().kind,
            StoreErrorKind::TimedOut
        );
        s.set_unreachable(false);
        s.getattr(&root).await.unwrap();
    }
}

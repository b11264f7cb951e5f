//! `NfsClient`: path-level operations on one NFSv3 export, and `NfsClient::call`, the one path every NFS
//! procedure takes (these and `HandleOps`'): a deadline, JUKEBOX retries and the pool's reconnecting.
//! `NfsClientConfig` is the one type of the connection settings.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nfs3_client::nfs3_types::nfs3::{
    cookieverf3, createhow3, createverf3, diropargs3, fattr3, filename3, ftype3, nfs_fh3, nfsstat3,
    sattr3, set_gid3, set_mode3, set_size3, set_uid3, stable_how, CREATE3args, FSSTAT3args,
    GETATTR3args, LOOKUP3args, MKDIR3args, Nfs3Option, Nfs3Result, READ3args, READDIR3args,
    REMOVE3args, RMDIR3args, SETATTR3args, WRITE3args,
};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::RpcError;
use tokio::time::Instant;

use super::attr::{Fattr, FileHandle, FsInfo, FsStat};
use super::error::{describe_connect, describe_rpc, Endpoint, ExportPath, NfsError};
use super::path;
use super::pool::{Connection, Pool, PoolFailure};
use crate::sync::Recover;

/// The deadline of one RPC when the configuration names none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections per client when the configuration names no number: each carries one call at a time, so
/// this is how many READs or WRITEs a data path can have in flight.
pub const DEFAULT_CONNECTIONS: usize = 8;
/// Bounds of the deadline of calls made while the server is suspected down (a quarter of the timeout).
/// At most a quarter second: a system call that follows one that timed out (touch's utimensat after its
/// open failed) must fail within the half second that the deadline promise leaves.
const MIN_PROBE_TIMEOUT: Duration = Duration::from_millis(100);
const MAX_PROBE_TIMEOUT: Duration = Duration::from_millis(250);
/// The most `read_file` returns: it is meant for markers and small records, not data.
pub const SMALL_FILE_LIMIT: u64 = 1 << 20;
/// Bytes per READ and WRITE in the small-file helpers, and the reply budget of one READDIR page.
const IO_CHUNK: u32 = 64 * 1024;
/// How often `remove_tree` lists and empties a directory again when entries keep appearing in it.
const RMDIR_ATTEMPTS: usize = 5;
/// Mode of files made by `write_file` and `create_exclusive`.
const FILE_MODE: u32 = 0o644;
/// How long to wait before asking a server that answered JUKEBOX again.
const JUKEBOX_PAUSE: Duration = Duration::from_millis(100);

/// Where the export is and how to talk to it: the one type of these settings, from the `[nfs]`
/// configuration (`NfsSettings::client`) through the FUSE helper's spec (where it travels as JSON, the
/// timeout as `timeout_ms`) to the connection pool.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NfsClientConfig {
    /// The server's address (an IP literal: the client does no name lookups).
    pub server: IpAddr,
    /// The exported path, as the server's MOUNT service knows it.
    pub export: String,
    /// The NFS port; with `mount_port` also set, the portmapper is never asked.
    pub nfs_port: Option<u16>,
    /// The MOUNT port; with `nfs_port` also set, the portmapper is never asked.
    pub mount_port: Option<u16>,
    /// AUTH_UNIX user the calls are made as.
    pub uid: u32,
    /// AUTH_UNIX group the calls are made as.
    pub gid: u32,
    /// Deadline of each RPC, including waiting for and making a connection.
    #[serde(rename = "timeout_ms", with = "millis")]
    pub timeout: Duration,
    /// Most connections open at once (at least one).
    pub connections: usize,
    /// Connect from a port below 1024, for servers that demand it (Linux knfsd's `secure`); needs root.
    #[serde(default)]
    pub privileged_port: bool,
}

/// A duration as whole milliseconds, the form the FUSE helper's spec has always carried it in.
mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

impl NfsClientConfig {
    /// A configuration with the defaults: root credentials, portmapper, 10 s deadline, 8 connections.
    pub fn new(server: IpAddr, export: impl Into<String>) -> Self {
        Self {
            server,
            export: export.into(),
            nfs_port: None,
            mount_port: None,
            uid: 0,
            gid: 0,
            timeout: DEFAULT_TIMEOUT,
            connections: DEFAULT_CONNECTIONS,
            privileged_port: false,
        }
    }
}

/// The outcome of [`NfsClient::create_exclusive`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExclusiveCreate {
    /// This call made the file (or repeated the call that made it, with the same verifier).
    Created(FileHandle),
    /// Another creator, or a different verifier, got there first.
    AlreadyExists,
}

/// A client for one NFSv3 export. Cheap to clone: clones share the connection pool.
#[derive(Clone)]
pub struct NfsClient {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for NfsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NfsClient")
            .field("at", &self.shared.at)
            .field("timeout", &self.shared.timeout)
            .finish_non_exhaustive()
    }
}

struct Shared {
    at: Endpoint,
    timeout: Duration,
    pool: Pool,
    /// FSINFO of the export, read by the first call that needs it.
    fsinfo: tokio::sync::OnceCell<FsInfo>,
    /// Set when a call timed out and none has been answered since: the time from which a call may
    /// have the full deadline again. See `NfsClient::call_timeout`; a std mutex, never held across an
    /// await.
    suspect: Mutex<Option<std::time::Instant>>,
}

fn name3(name: &[u8]) -> filename3<'static> {
    filename3(Opaque::owned(name.to_vec()))
}

fn dirop(dir: &nfs_fh3, name: &[u8]) -> diropargs3<'static> {
    diropargs3 {
        dir: dir.clone(),
        name: name3(name),
    }
}

fn attrs_of(attr: Nfs3Option<fattr3>) -> Option<fattr3> {
    match attr {
        Nfs3Option::Some(a) => Some(a),
        Nfs3Option::None => None,
    }
}

/// What a call is about, for its error messages: a path inside the export, or (for `HandleOps`) a
/// handle. Rendered only when a call fails.
pub(super) trait Describe: Copy {
    fn describe(self) -> ExportPath;
}

impl Describe for &str {
    fn describe(self) -> ExportPath {
        self.into()
    }
}

impl Describe for &String {
    fn describe(self) -> ExportPath {
        self.as_str().into()
    }
}

/// A reply, as far as the call path needs to know it: whether the server was too busy to act.
pub(super) trait Reply {
    /// NFS3ERR_JUKEBOX: nothing was done, ask again later.
    fn busy(&self) -> bool;
}

impl<T, E> Reply for Nfs3Result<T, E> {
    fn busy(&self) -> bool {
        matches!(self, Nfs3Result::Err((nfsstat3::NFS3ERR_JUKEBOX, _)))
    }
}

/// The NULL procedure's reply: nothing to be busy with.
impl Reply for () {
    fn busy(&self) -> bool {
        false
    }
}

type BoxedResult<'a> = Pin<Box<dyn Future<Output = Result<(), NfsError>> + Send + 'a>>;

impl NfsClient {
    /// A client for the export in `config`. Connects lazily: the first call makes the first connection.
    pub fn new(config: NfsClientConfig) -> Self {
        let at = Endpoint {
            server: config.server,
            export: config.export.as_str().into(),
        };
        Self {
            shared: Arc::new(Shared {
                at,
                timeout: config.timeout,
                pool: Pool::new(config),
                fsinfo: tokio::sync::OnceCell::new(),
                suspect: Mutex::new(None),
            }),
        }
    }

    /// The server and export this client talks to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.shared.at
    }

    /// Checks that the server answers: makes (or reuses) a connection and sends the NULL procedure.
    pub async fn ping(&self) -> Result<(), NfsError> {
        self.call("ping", "", |mut conn: Connection| async move {
            let reply = conn.nfs.null().await;
            (conn, reply)
        })
        .await
    }

    /// The handle of `path` (relative to the export root; `""` is the root).
    pub async fn lookup_path(&self, path: &str) -> Result<FileHandle, NfsError> {
        let names = self.components(path)?;
        let (fh, _) = self.walk(path, &names).await?;
        Ok(FileHandle::from_fh3(fh))
    }

    /// The attributes of `path`.
    pub async fn getattr(&self, path: &str) -> Result<Fattr, NfsError> {
        let names = self.components(path)?;
        let (fh, _) = self.walk(path, &names).await?;
        Ok(Fattr::from(&self.getattr_fh(&fh, path).await?))
    }

    /// Makes directory `path` if it is missing and applies `uid`, `gid` and `mode` (`& 0o7777`) to it.
    ///
    /// Idempotent, and safe when several hosts race: MKDIR is atomic on the server, and "exists" counts as
    /// success when the existing object is a directory. The parent must exist.
    pub async fn ensure_dir(
        &self,
        path: &str,
        uid: u32,
        gid: u32,
        mode: u32,
    ) -> Result<FileHandle, NfsError> {
        let (parent_names, name) = self.parent_and_name(path)?;
        let parent_path = parent_names.join("/");
        let (parent, _) = self.walk(&parent_path, &parent_names).await?;
        let mode = mode & 0o7777;
        let reply = rpc!(
            self => call,
            "mkdir",
            path,
            mkdir,
            MKDIR3args {
                where_: dirop(&parent, name.as_bytes()),
                attributes: sattr3 {
                    mode: set_mode3::Some(mode),
                    ..sattr3::default()
                },
            }
        )
        .await?;
        let fh = match reply {
            Nfs3Result::Ok(ok) => match ok.obj {
                Nfs3Option::Some(fh) => fh,
                // The server may omit the new handle; then ask for it.
                Nfs3Option::None => self.lookup(&parent, name.as_bytes(), path).await?.0,
            },
            Nfs3Result::Err((nfsstat3::NFS3ERR_EXIST, _)) => {
                let (fh, attrs) = self.lookup(&parent, name.as_bytes(), path).await?;
                let attrs = match attrs {
                    Some(a) => a,
                    None => self.getattr_fh(&fh, path).await?,
                };
                if attrs.type_ != ftype3::NF3DIR {
                    return Err(NfsError::NotADirectory {
                        at: self.at(),
                        path: path.into(),
                    });
                }
                fh
            }
            Nfs3Result::Err((status, _)) => return Err(self.status("mkdir", path, status)),
        };
        // Always set all three, also on a directory that existed: the MKDIR mode is subject to the
        // server's umask, and a racing creator may have made the directory with its own credentials.
        self.setattr(
            &fh,
            path,
            sattr3 {
                mode: set_mode3::Some(mode),
                uid: set_uid3::Some(uid),
                gid: set_gid3::Some(gid),
                ..sattr3::default()
            },
        )
        .await?;
        Ok(FileHandle::from_fh3(fh))
    }

    /// Removes `path` and, if it is a directory, everything below it. A path that is already gone is
    /// success, and so is an entry that disappears midway (another host removing the same tree).
    /// Symbolic links are removed, never followed.
    pub async fn remove_tree(&self, path: &str) -> Result<(), NfsError> {
        let names = self.components(path)?;
        let Some((name, parent_names)) = names.split_last() else {
            return Err(NfsError::RemoveRoot { at: self.at() });
        };
        let parent_path = parent_names.join("/");
        let parent = match self.walk(&parent_path, parent_names).await {
            Ok((fh, _)) => fh,
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e),
        };
        self.remove_entry(&parent, name.as_bytes().to_vec(), path.to_owned())
            .await
    }

    /// Removes the file `path`. Returns false if it did not exist.
    pub async fn remove_file(&self, path: &str) -> Result<bool, NfsError> {
        let (parent_names, name) = self.parent_and_name(path)?;
        let parent_path = parent_names.join("/");
        let parent = match self.walk(&parent_path, &parent_names).await {
            Ok((fh, _)) => fh,
            Err(e) if e.is_not_found() => return Ok(false),
            Err(e) => return Err(e),
        };
        let reply = rpc!(
            self => call,
            "remove",
            path,
            remove,
            REMOVE3args {
                object: dirop(&parent, name.as_bytes()),
            }
        )
        .await?;
        match reply {
            Nfs3Result::Ok(_) => Ok(true),
            Nfs3Result::Err((nfsstat3::NFS3ERR_NOENT, _)) => Ok(false),
            Nfs3Result::Err((status, _)) => Err(self.status("remove", path, status)),
        }
    }

    /// The names in directory `path`, without `.` and `..`, in the server's order. Names that are not
    /// UTF-8 are converted lossily.
    pub async fn readdir(&self, path: &str) -> Result<Vec<String>, NfsError> {
        let names = self.components(path)?;
        let (fh, _) = self.walk(path, &names).await?;
        Ok(self
            .list(&fh, path)
            .await?
            .iter()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect())
    }

    /// Space and inode counts of the exported file system.
    pub async fn fsstat(&self) -> Result<FsStat, NfsError> {
        let root = self.root().await?;
        let reply = rpc!(
            self => call,
            "fsstat",
            "",
            fsstat,
            FSSTAT3args {
                fsroot: root.clone()
            }
        )
        .await?;
        match reply {
            Nfs3Result::Ok(ok) => Ok(FsStat::from(&ok)),
            Nfs3Result::Err((status, _)) => Err(self.status("fsstat", "", status)),
        }
    }

    /// Creates file `name` in directory `dir` unless something by that name exists; atomic on the server.
    ///
    /// Of several hosts racing, exactly one gets `Created`. Repeating a call with the same `verifier`
    /// (say, after a lost reply) returns `Created` with the same handle again, so the verifier should be
    /// unique per creator and attempt.
    pub async fn create_exclusive(
        &self,
        dir: &str,
        name: &str,
        verifier: [u8; 8],
    ) -> Result<ExclusiveCreate, NfsError> {
        let file_path = path::join(dir, name);
        path::check_name(name).map_err(|reason| self.invalid(&file_path, reason))?;
        let names = self.components(dir)?;
        let (dir_fh, _) = self.walk(dir, &names).await?;
        let reply = rpc!(
            self => call,
            "create",
            &file_path,
            create,
            CREATE3args {
                where_: dirop(&dir_fh, name.as_bytes()),
                how: createhow3::EXCLUSIVE(createverf3(verifier)),
            }
        )
        .await?;
        let fh = match reply {
            Nfs3Result::Ok(ok) => match ok.obj {
                Nfs3Option::Some(fh) => fh,
                Nfs3Option::None => self.lookup(&dir_fh, name.as_bytes(), &file_path).await?.0,
            },
            Nfs3Result::Err((nfsstat3::NFS3ERR_EXIST, _)) => {
                return Ok(ExclusiveCreate::AlreadyExists)
            }
            Nfs3Result::Err((status, _)) => return Err(self.status("create", &file_path, status)),
        };
        // An EXCLUSIVE create sets no attributes (servers keep the verifier in the times), so RFC 1813
        // has the client set them afterwards. Only the mode: the times must keep the verifier so that a
        // repeated call is still recognised.
        self.setattr(
            &fh,
            &file_path,
            sattr3 {
                mode: set_mode3::Some(FILE_MODE),
                ..sattr3::default()
            },
        )
        .await?;
        Ok(ExclusiveCreate::Created(FileHandle::from_fh3(fh)))
    }

    /// Writes `data` as the whole content of file `path`, creating it (mode 0644) if missing.
    ///
    /// The new bytes are written over the old ones and the file is then cut to length, so a reader never
    /// sees it empty, but it can see old and new bytes mixed while the write is in progress: readers of
    /// files that are rewritten in place must check what they read (a marker carries its own format).
    pub async fn write_file(&self, path: &str, data: &[u8]) -> Result<(), NfsError> {
        let (parent_names, name) = self.parent_and_name(path)?;
        let parent_path = parent_names.join("/");
        let (parent, _) = self.walk(&parent_path, &parent_names).await?;
        let reply = rpc!(
            self => call,
            "create",
            path,
            create,
            CREATE3args {
                where_: dirop(&parent, name.as_bytes()),
                how: createhow3::UNCHECKED(sattr3 {
                    mode: set_mode3::Some(FILE_MODE),
                    ..sattr3::default()
                }),
            }
        )
        .await?;
        let fh = match reply {
            Nfs3Result::Ok(ok) => match ok.obj {
                Nfs3Option::Some(fh) => fh,
                Nfs3Option::None => self.lookup(&parent, name.as_bytes(), path).await?.0,
            },
            Nfs3Result::Err((status, _)) => return Err(self.status("create", path, status)),
        };
        let mut offset = 0usize;
        while offset < data.len() {
            let end = data.len().min(offset + IO_CHUNK as usize);
            let chunk = &data[offset..end];
            let reply = rpc!(
                self => call,
                "write",
                path,
                write,
                WRITE3args {
                    file: fh.clone(),
                    offset: offset as u64,
                    // A chunk is at most IO_CHUNK bytes, so it fits.
                    count: chunk.len() as u32,
                    // Markers are few and small: make each durable before reporting success.
                    stable: stable_how::FILE_SYNC,
                    data: Opaque::borrowed(chunk),
                }
            )
            .await?;
            match reply {
                // A server may write less than asked; continue from where it stopped.
                Nfs3Result::Ok(ok) if ok.count > 0 => offset += ok.count as usize,
                Nfs3Result::Ok(_) => {
                    return Err(self.protocol("write", path, "the server wrote no bytes"))
                }
                Nfs3Result::Err((status, _)) => return Err(self.status("write", path, status)),
            }
        }
        self.setattr(
            &fh,
            path,
            sattr3 {
                size: set_size3::Some(data.len() as u64),
                ..sattr3::default()
            },
        )
        .await
    }

    /// The whole content of the regular file `path`, which must be at most [`SMALL_FILE_LIMIT`] bytes.
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>, NfsError> {
        let names = self.components(path)?;
        let (fh, attrs) = self.walk(path, &names).await?;
        let attrs = match attrs {
            Some(a) => a,
            None => self.getattr_fh(&fh, path).await?,
        };
        if attrs.type_ != ftype3::NF3REG {
            return Err(NfsError::NotAFile {
                at: self.at(),
                path: path.into(),
            });
        }
        let too_large = || NfsError::FileTooLarge {
            at: self.at(),
            path: path.into(),
            limit: SMALL_FILE_LIMIT,
        };
        if attrs.size > SMALL_FILE_LIMIT {
            return Err(too_large());
        }
        let mut data = Vec::with_capacity(attrs.size as usize);
        loop {
            let reply = rpc!(
                self => call,
                "read",
                path,
                read,
                READ3args {
                    file: fh.clone(),
                    offset: data.len() as u64,
                    count: IO_CHUNK,
                }
            )
            .await?;
            match reply {
                Nfs3Result::Ok(ok) => {
                    data.extend_from_slice(ok.data.as_ref());
                    // The file may have grown since GETATTR.
                    if data.len() as u64 > SMALL_FILE_LIMIT {
                        return Err(too_large());
                    }
                    if ok.eof || ok.data.is_empty() {
                        return Ok(data);
                    }
                }
                Nfs3Result::Err((status, _)) => return Err(self.status("read", path, status)),
            }
        }
    }

    // ---- building blocks ----

    /// Runs one procedure on a pooled connection: the one call path of every NFS procedure, the path
    /// operations here and `HandleOps` alike. The deadline covers waiting for a connection, making one
    /// (reconnecting once if an idle one had been closed, see `Pool::run`) and JUKEBOX pauses: a server
    /// that answers JUKEBOX ("busy, try later") is asked again until the deadline. It is shortened while
    /// the server is suspected down (see `call_timeout`), and a call made for a FUSE request ends with
    /// the request's deadline, so a system call that needs several calls still fails within the timeout.
    /// Returns the server's reply, NFS error statuses included; the caller says what they mean.
    pub(super) async fn call<R, F, Fut>(
        &self,
        op: &'static str,
        subject: impl Describe,
        f: F,
    ) -> Result<R, NfsError>
    where
        R: Reply,
        F: Fn(Connection) -> Fut,
        Fut: Future<Output = (Connection, Result<R, RpcError>)>,
    {
        let timeout = self.call_timeout();
        let started = Instant::now();
        let request = crate::fuse::store::request_started().map(|t| t + self.timeout());
        let deadline = request.map_or(started + timeout, |r| r.min(started + timeout));
        // A call left with less than half its time by its request proves little about the server when it
        // times out; one that waited longer does.
        let telling = deadline >= started + timeout / 2;
        loop {
            // On expiry the pool's future is dropped, and with it the connection: its stream may still
            // carry the late reply, so it must never be reused.
            let reply = match tokio::time::timeout_at(deadline, self.shared.pool.run(&f)).await {
                Ok(Ok(reply)) => {
                    self.note_answer();
                    reply
                }
                Ok(Err(PoolFailure::Connect(e))) => {
                    return Err(NfsError::Connect {
                        at: self.at(),
                        reason: describe_connect(&e),
                    })
                }
                Ok(Err(PoolFailure::Rpc(e))) => {
                    return Err(NfsError::Rpc {
                        at: self.at(),
                        op,
                        path: subject.describe(),
                        reason: describe_rpc(&e),
                    })
                }
                Err(_elapsed) => {
                    if telling {
                        self.note_timeout();
                    }
                    return Err(NfsError::Timeout {
                        at: self.at(),
                        op,
                        path: subject.describe(),
                        timeout,
                    });
                }
            };
            if reply.busy() && Instant::now() + JUKEBOX_PAUSE < deadline {
                tokio::time::sleep(JUKEBOX_PAUSE).await;
                continue;
            }
            return Ok(reply);
        }
    }

    /// The deadline of a call starting now: the configured timeout, or, while the server is suspected
    /// down (a call timed out and none has been answered since), a short probe.
    ///
    /// Without the probe, whatever retries after an error waits the full deadline again: the kernel
    /// re-reads a page synchronously after its readahead failed, so a read(2) on a FUSE mount would take
    /// twice the deadline, and an application's loop of calls many times it. Probes still reach the
    /// server, so the first one answered ends the suspicion; and once per two deadlines one call gets
    /// the full deadline, so a server that is back but slower to reach than a probe allows (a new
    /// connection and MOUNT over a slow link) is still found.
    pub(super) fn call_timeout(&self) -> Duration {
        let full = self.shared.timeout;
        let mut suspect = self.shared.suspect.lock().recover();
        match *suspect {
            None => full,
            Some(full_allowed_at) => {
                let now = std::time::Instant::now();
                if now >= full_allowed_at {
                    *suspect = Some(now + 2 * full);
                    full
                } else {
                    full.min((full / 4).clamp(MIN_PROBE_TIMEOUT, MAX_PROBE_TIMEOUT))
                }
            }
        }
    }

    /// The server answered a call (with success or an NFS error: either way it is alive).
    pub(super) fn note_answer(&self) {
        let mut suspect = self.shared.suspect.lock().recover();
        if suspect.take().is_some() {
            tracing::info!(at = %self.shared.at, "the nfs server answers again");
        }
    }

    /// A call reached its deadline without an answer.
    pub(super) fn note_timeout(&self) {
        let mut suspect = self.shared.suspect.lock().recover();
        if suspect.is_none() {
            *suspect = Some(std::time::Instant::now() + self.shared.timeout);
            tracing::warn!(
                at = %self.shared.at,
                timeout = ?self.shared.timeout,
                "the nfs server does not answer; calls get a short deadline until it does"
            );
        }
    }

    /// The deadline of each call.
    pub fn timeout(&self) -> Duration {
        self.shared.timeout
    }

    pub(super) fn fsinfo_cell(&self) -> &tokio::sync::OnceCell<FsInfo> {
        &self.shared.fsinfo
    }

    /// The export root's handle, mounting a first connection if there is none yet.
    pub(super) async fn root(&self) -> Result<nfs_fh3, NfsError> {
        if let Some(root) = self.shared.pool.cached_root() {
            return Ok(root);
        }
        self.ping().await?;
        self.shared.pool.cached_root().ok_or_else(|| {
            self.protocol("mount", "", "no root file handle after mounting the export")
        })
    }

    /// Looks up `names` one by one from the root; returns the handle and, if the server sent them, the
    /// attributes of the last one (none for the root itself).
    async fn walk(
        &self,
        path: &str,
        names: &[&str],
    ) -> Result<(nfs_fh3, Option<fattr3>), NfsError> {
        let mut fh = self.root().await?;
        let mut attrs = None;
        for (i, name) in names.iter().enumerate() {
            // Errors name the prefix that failed, not the whole path.
            let prefix = if i + 1 == names.len() {
                path.to_owned()
            } else {
                names[..=i].join("/")
            };
            (fh, attrs) = self.lookup(&fh, name.as_bytes(), &prefix).await?;
        }
        Ok((fh, attrs))
    }

    async fn lookup(
        &self,
        dir: &nfs_fh3,
        name: &[u8],
        path: &str,
    ) -> Result<(nfs_fh3, Option<fattr3>), NfsError> {
        let reply = rpc!(
            self => call,
            "lookup",
            path,
            lookup,
            LOOKUP3args {
                what: dirop(dir, name),
            }
        )
        .await?;
        match reply {
            Nfs3Result::Ok(ok) => Ok((ok.object, attrs_of(ok.obj_attributes))),
            Nfs3Result::Err((status, _)) => Err(self.status("lookup", path, status)),
        }
    }

    async fn getattr_fh(&self, fh: &nfs_fh3, path: &str) -> Result<fattr3, NfsError> {
        let reply = rpc!(
            self => call,
            "getattr",
            path,
            getattr,
            GETATTR3args { object: fh.clone() }
        )
        .await?;
        match reply {
            Nfs3Result::Ok(ok) => Ok(ok.obj_attributes),
            Nfs3Result::Err((status, _)) => Err(self.status("getattr", path, status)),
        }
    }

    async fn setattr(&self, fh: &nfs_fh3, path: &str, attrs: sattr3) -> Result<(), NfsError> {
        let reply = rpc!(
            self => call,
            "setattr",
            path,
            setattr,
            SETATTR3args {
                object: fh.clone(),
                new_attributes: attrs.clone(),
                guard: Nfs3Option::None,
            }
        )
        .await?;
        match reply {
            Nfs3Result::Ok(_) => Ok(()),
            Nfs3Result::Err((status, _)) => Err(self.status("setattr", path, status)),
        }
    }

    /// Every name in a directory (without `.` and `..`), following READDIR cookies page by page.
    async fn list(&self, dir: &nfs_fh3, path: &str) -> Result<Vec<Vec<u8>>, NfsError> {
        let mut names = Vec::new();
        let mut cookie = 0;
        let mut cookieverf = cookieverf3::default();
        loop {
            let reply = rpc!(
                self => call,
                "readdir",
                path,
                readdir,
                READDIR3args {
                    dir: dir.clone(),
                    cookie,
                    cookieverf,
                    count: IO_CHUNK,
                }
            )
            .await?;
            let ok = match reply {
                Nfs3Result::Ok(ok) => ok,
                Nfs3Result::Err((status, _)) => return Err(self.status("readdir", path, status)),
            };
            cookieverf = ok.cookieverf;
            let entries = ok.reply.entries.into_inner();
            let Some(last) = entries.last() else {
                if ok.reply.eof {
                    return Ok(names);
                }
                // Neither entries nor the end: asking again with the same cookie would loop forever.
                return Err(self.protocol(
                    "readdir",
                    path,
                    "the server returned an empty page before the end",
                ));
            };
            cookie = last.cookie;
            names.extend(
                entries
                    .into_iter()
                    .map(|e| e.name.0.into_owned())
                    .filter(|n| n != b"." && n != b".."),
            );
            if ok.reply.eof {
                return Ok(names);
            }
        }
    }

    /// Removes `name` in `parent` and, for a directory, everything below it (depth first).
    fn remove_entry<'a>(
        &'a self,
        parent: &'a nfs_fh3,
        name: Vec<u8>,
        path: String,
    ) -> BoxedResult<'a> {
        // Boxed because it recurses into subdirectories.
        Box::pin(async move {
            let (fh, attrs) = match self.lookup(parent, &name, &path).await {
                Ok(found) => found,
                Err(e) if e.is_not_found() => return Ok(()),
                Err(e) => return Err(e),
            };
            let kind = match attrs {
                Some(a) => a.type_,
                None => match self.getattr_fh(&fh, &path).await {
                    Ok(a) => a.type_,
                    Err(e) if matches!(e.status(), Some(nfsstat3::NFS3ERR_STALE)) => return Ok(()),
                    Err(e) => return Err(e),
                },
            };
            if kind != ftype3::NF3DIR {
                let reply = rpc!(
                    self => call,
                    "remove",
                    &path,
                    remove,
                    REMOVE3args {
                        object: dirop(parent, &name)
                    }
                )
                .await?;
                return match reply {
                    Nfs3Result::Ok(_) | Nfs3Result::Err((nfsstat3::NFS3ERR_NOENT, _)) => Ok(()),
                    Nfs3Result::Err((status, _)) => Err(self.status("remove", &path, status)),
                };
            }
            let mut attempt = 0;
            loop {
                attempt += 1;
                let children = match self.list(&fh, &path).await {
                    Ok(children) => children,
                    // Removed by someone else while we looked.
                    Err(e) if e.is_not_found() || e.status() == Some(nfsstat3::NFS3ERR_STALE) => {
                        return Ok(())
                    }
                    Err(e) => return Err(e),
                };
                for child in children {
                    let child_path = path::join(&path, &String::from_utf8_lossy(&child));
                    self.remove_entry(&fh, child, child_path).await?;
                }
                let reply = rpc!(
                    self => call,
                    "rmdir",
                    &path,
                    rmdir,
                    RMDIR3args {
                        object: dirop(parent, &name)
                    }
                )
                .await?;
                match reply {
                    Nfs3Result::Ok(_) | Nfs3Result::Err((nfsstat3::NFS3ERR_NOENT, _)) => {
                        return Ok(())
                    }
                    // Something was added meanwhile (some servers say EXIST for a full directory).
                    Nfs3Result::Err((nfsstat3::NFS3ERR_NOTEMPTY | nfsstat3::NFS3ERR_EXIST, _))
                        if attempt < RMDIR_ATTEMPTS => {}
                    Nfs3Result::Err((status, _)) => return Err(self.status("rmdir", &path, status)),
                }
            }
        })
    }

    // ---- errors ----

    pub(super) fn at(&self) -> Endpoint {
        self.shared.at.clone()
    }

    fn components<'p>(&self, path: &'p str) -> Result<Vec<&'p str>, NfsError> {
        path::components(path).map_err(|reason| self.invalid(path, reason))
    }

    fn parent_and_name<'p>(&self, path: &'p str) -> Result<(Vec<&'p str>, &'p str), NfsError> {
        path::parent_and_name(path).map_err(|reason| self.invalid(path, reason))
    }

    fn invalid(&self, path: &str, reason: &'static str) -> NfsError {
        NfsError::InvalidPath {
            at: self.at(),
            path: path.into(),
            reason,
        }
    }

    fn status(&self, op: &'static str, path: &str, status: nfsstat3) -> NfsError {
        NfsError::Status {
            at: self.at(),
            op,
            path: path.into(),
            status,
        }
    }

    pub(super) fn protocol(&self, op: &'static str, path: &str, reason: &'static str) -> NfsError {
        NfsError::Protocol {
            at: self.at(),
            op,
            path: path.into(),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const MOUNT_PROGRAM: u32 = 100_005;
    const MOUNT_MNT: u32 = 1;
    const NFS_FSSTAT: u32 = 18;

    /// A server on one port for MOUNT and NFS that answers the first `busy` FSSTATs with JUKEBOX and the
    /// rest with fixed figures. Returns its port and how many FSSTATs it was asked.
    async fn busy_server(busy: usize) -> (u16, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let asked = Arc::new(AtomicUsize::new(0));
        let counter = asked.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut header = [0u8; 4];
                    while stream.read_exact(&mut header).await.is_ok() {
                        let len = (u32::from_be_bytes(header) & 0x7fff_ffff) as usize;
                        let mut call = vec![0u8; len];
                        stream.read_exact(&mut call).await.unwrap();
                        let word = |i: usize| {
                            u32::from_be_bytes(call[i * 4..i * 4 + 4].try_into().unwrap())
                        };
                        let (xid, program, procedure) = (word(0), word(3), word(5));
                        // REPLY, MSG_ACCEPTED, a null verifier, SUCCESS.
                        let mut reply: Vec<u32> = vec![xid, 1, 0, 0, 0, 0];
                        if program == MOUNT_PROGRAM && procedure == MOUNT_MNT {
                            // MNT3_OK, a 4-byte root handle, AUTH_UNIX.
                            reply.extend([0, 4, 0x0102_0304, 1, 1]);
                        } else if procedure == NFS_FSSTAT {
                            if counter.fetch_add(1, Ordering::SeqCst) < busy {
                                // NFS3ERR_JUKEBOX, no attributes.
                                reply.extend([10008, 0]);
                            } else {
                                // NFS3_OK, no attributes, six u64 figures, invarsec.
                                reply.extend([0, 0]);
                                for figure in 1..=6u32 {
                                    reply.extend([0, figure]);
                                }
                                reply.push(0);
                            }
                        }
                        let bytes: Vec<u8> = reply.iter().flat_map(|w| w.to_be_bytes()).collect();
                        let marker = 0x8000_0000 | bytes.len() as u32;
                        let mut out = marker.to_be_bytes().to_vec();
                        out.extend(bytes);
                        if stream.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (port, asked)
    }

    fn client(port: u16, timeout: Duration) -> NfsClient {
        NfsClient::new(NfsClientConfig {
            nfs_port: Some(port),
            mount_port: Some(port),
            timeout,
            ..NfsClientConfig::new("127.0.0.1".parse().unwrap(), "/export")
        })
    }

    /// Path operations take the same call path as `HandleOps`: a busy server is asked again.
    #[tokio::test]
    async fn a_busy_server_is_asked_again_until_it_answers() {
        let (port, asked) = busy_server(2).await;
        let stat = client(port, Duration::from_secs(5)).fsstat().await.unwrap();
        assert_eq!((stat.total_bytes, stat.avail_files), (1, 6));
        assert_eq!(asked.load(Ordering::SeqCst), 3);
    }

    /// A server busy for the whole deadline: its JUKEBOX reaches the caller, in time.
    #[tokio::test]
    async fn a_server_busy_until_the_deadline_fails_the_call() {
        let (port, asked) = busy_server(usize::MAX).await;
        let timeout = Duration::from_millis(450);
        let started = std::time::Instant::now();
        let err = client(port, timeout).fsstat().await.unwrap_err();
        assert!(
            matches!(
                err,
                NfsError::Status {
                    status: nfsstat3::NFS3ERR_JUKEBOX,
                    ..
                }
            ),
            "{err}"
        );
        assert!(started.elapsed() < timeout + Duration::from_secs(1));
        assert!(asked.load(Ordering::SeqCst) >= 2);
    }
}

//! The HTTP/1.1 serving shared by Ferry's three listeners (the plugin socket, the admin socket and the
//! optional metrics endpoint), and what each of them must guarantee whatever its clients do:
//! - a Unix socket is never, not for an instant, open to other users: it is bound inside a private 0700
//!   directory, restricted to 0600 there, then renamed into place (`bind_unix_socket`);
//! - where a server asks for it, the peer's uid (SO_PEERCRED) is checked before anything is read, and a
//!   refused peer is closed unserved;
//! - each listener caps its connections; at the cap the longest-idle connection (then the oldest
//!   half-received one) is closed to admit the new one, and a call in progress is never cut;
//! - an idle connection is closed after the idle timeout, and a request whose headers and body have not
//!   arrived within the request timeout (or whose answer is not read within it) is dropped;
//! - the plugin socket keeps one spare file descriptor, so descriptors exhausted elsewhere still let it
//!   accept, make room and answer instead of leaving Docker in the backlog;
//! - a stop closes idle and half-received connections at once and waits only for calls already handed to
//!   the handler.
//!
//! It knows nothing of what is served: routing, answers and their error format belong to each server's
//! `Handler`. Timeouts here never cut a call in progress; the service's own deadlines bound those.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::sync::Recover;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::Response;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Longer than any HTTP client's keep-alive Docker uses (dockerd's plugin client idles connections 30 s,
/// Go's default transport 90 s), so the client, not Ferry, closes an idle connection it might reuse.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Docker writes each request whole, at once; ten seconds is ample on a loaded host.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Far above the calls Docker makes at once (one per container starting or stopping).
pub const DEFAULT_PLUGIN_CONNECTIONS: usize = 512;
pub const DEFAULT_ADMIN_CONNECTIONS: usize = 32;
pub const DEFAULT_METRICS_CONNECTIONS: usize = 32;
/// Descriptors kept for everything but the listeners' connections: the catalog, backends' connections,
/// loop devices, pipes to helpers and tools.
pub const RESERVED_FDS: u64 = 256;
/// How often one kind of log line (per uid, for refused peers) may appear.
const LOG_INTERVAL: Duration = Duration::from_secs(60);
/// How long to wait before accepting again when descriptors are exhausted and no spare is left.
const FD_BACKOFF: Duration = Duration::from_millis(100);

/// The listeners' settings from the configuration (`[listeners]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSettings {
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
    pub plugin_connections: usize,
    pub admin_connections: usize,
    pub metrics_connections: usize,
    /// Users besides root and Ferry's own whose processes may use the plugin socket (a rootless dockerd).
    pub docker_uids: Vec<u32>,
}

impl Default for ListenerSettings {
    fn default() -> Self {
        ListenerSettings {
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            plugin_connections: DEFAULT_PLUGIN_CONNECTIONS,
            admin_connections: DEFAULT_ADMIN_CONNECTIONS,
            metrics_connections: DEFAULT_METRICS_CONNECTIONS,
            docker_uids: Vec::new(),
        }
    }
}

impl ListenerSettings {
    /// The limits of one listener with the given connection cap.
    pub fn limits(&self, max_connections: usize) -> Limits {
        Limits {
            max_connections,
            idle_timeout: self.idle_timeout,
            request_timeout: self.request_timeout,
        }
    }
}

/// What one listener allows its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
}

/// Connection caps of the three listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionCaps {
    pub plugin: usize,
    pub admin: usize,
    pub metrics: usize,
}

/// Fits the wanted caps into the open-file limit `fd_limit`, so the listeners together can never exhaust
/// it: `RESERVED_FDS` (at most half the limit) stay for everything else, the admin and metrics listeners
/// get at most an eighth of the rest each, and the plugin socket what remains, less one connection per
/// listener admitted while another closes and its spare descriptor.
pub fn fit_to_fd_limit(fd_limit: u64, wanted: ConnectionCaps) -> ConnectionCaps {
    let reserved = RESERVED_FDS.min(fd_limit / 2);
    let available = usize::try_from(fd_limit - reserved).unwrap_or(usize::MAX);
    let side = (available / 8).max(1);
    let admin = wanted.admin.min(side).max(1);
    let metrics = wanted.metrics.min(side).max(1);
    let room = available.saturating_sub(admin + metrics + 4);
    ConnectionCaps {
        plugin: wanted.plugin.min(room).max(1),
        admin,
        metrics,
    }
}

/// Raises the soft open-file limit to the hard one, as far as the kernel lets, and returns the soft limit
/// in force: the connection caps are fitted to it.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => return hard,
            Err(e) => {
                tracing::debug!(soft, hard, error = %e, "cannot raise the open-file limit")
            }
        }
    }
    soft
}

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("another process is already serving {0}; stop it first, or choose another --socket")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot set up the socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot set up the socket {path}: a socket path may have at most 107 bytes, and so may {staged}, \
         where Ferry binds it first; choose a shorter path"
    )]
    TooLong { path: PathBuf, staged: PathBuf },
}

/// The longest path a Unix socket can be bound at (`sun_path` less its terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Binds a Unix socket at `path` that only root (and the daemon's own user) can open, with no instant in
/// which it is open to anyone else whatever the umask: it is bound in a fresh 0700 directory beside
/// `path`, set to 0600 there, and renamed over `path`. A socket file left by a dead process is replaced;
/// one that a live process answers on is not, and neither is anything that is not a socket.
pub fn bind_unix_socket(path: &Path) -> Result<UnixListener, SocketError> {
    let io = |source| SocketError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(SocketError::NotASocket(path.into()))
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(SocketError::InUse(path.into())),
            Err(e)
                if e.kind() == io::ErrorKind::ConnectionRefused
                    || e.kind() == io::ErrorKind::NotFound =>
            {
                // The rename below replaces it in one step.
                tracing::info!(socket = %path.display(), "replacing a stale socket");
            }
            Err(e) => return Err(io(e)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).map_err(io)?;
    let private = private_dir(parent).map_err(io)?;
    let staged = private.join("s");
    let bound = (|| {
        // rename(2) takes longer paths than connect(2) does: check both before binding.
        if staged.as_os_str().len().max(path.as_os_str().len()) > MAX_SOCKET_PATH {
            return Err(SocketError::TooLong {
                path: path.to_path_buf(),
                staged: staged.clone(),
            });
        }
        let listener = UnixListener::bind(&staged).map_err(io)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        std::fs::rename(&staged, path).map_err(io)?;
        Ok(listener)
    })();
    if bound.is_err() {
        let _ = std::fs::remove_file(&staged);
    }
    if let Err(e) = std::fs::remove_dir(&private) {
        tracing::warn!(dir = %private.display(), error = %e, "cannot remove the directory a socket was bound in");
    }
    bound
}

/// Makes a new directory beside the socket, on its filesystem (so the rename is atomic), that only this
/// user can enter. mkdir never follows or reuses an existing entry, so nobody else can own it.
fn private_dir(parent: &Path) -> io::Result<PathBuf> {
    let pid = std::process::id();
    let mut last = None;
    for n in 0..100u32 {
        // Short: the socket's path inside it must stay within 107 bytes.
        let dir = parent.join(if n == 0 {
            format!(".fb{pid}")
        } else {
            format!(".fb{pid}.{n}")
        });
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {
                // A umask could have left it narrower than 0700, too narrow for a non-root daemon.
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
                return Ok(dir);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AlreadyExists)))
}

/// Who may be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peers {
    /// Anyone who can reach the listener (the admin socket answers refused users itself, with 403).
    Anyone,
    /// Only processes of these users, by SO_PEERCRED; others are closed unserved.
    Uids(Vec<u32>),
}

impl Peers {
    fn admits(&self, peer: Peer) -> bool {
        match self {
            Peers::Anyone => true,
            Peers::Uids(uids) => peer.uid.is_some_and(|u| uids.contains(&u)),
        }
    }
}

/// The other end of a connection, as far as the kernel tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// The peer's uid on a Unix socket; `None` over TCP or when the kernel would not say.
    pub uid: Option<u32>,
}

/// A bound listener of either kind.
pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    async fn accept(&self) -> io::Result<(Stream, Peer)> {
        match self {
            Listener::Unix(l) => {
                let (s, _) = l.accept().await?;
                let uid = s.peer_cred().ok().map(|c| c.uid());
                Ok((Stream::Unix(s), Peer { uid }))
            }
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                Ok((Stream::Tcp(s), Peer { uid: None }))
            }
        }
    }
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

/// Why a request's body was not handed to the handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Longer than `Handler::max_body` bytes.
    TooLarge(usize),
    /// The client broke off or sent broken HTTP; the words are hyper's.
    Unreadable(String),
}

/// One server's answers. The listener reads each request's body in full (bounded by `max_body`) before
/// calling `handle`, so a call never waits on its client.
pub trait Handler: Send + Sync + 'static {
    /// The largest request body read; a larger one is answered by `body_error`.
    fn max_body(&self) -> usize;
    /// Answers one request whose body has arrived.
    fn handle(
        &self,
        head: hyper::http::request::Parts,
        body: Bytes,
        peer: Peer,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send;
    /// The answer, in this server's format, to a request whose body could not be read.
    fn body_error(&self, path: &str, err: BodyError) -> Response<Full<Bytes>>;
}

/// How one listener is served.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Names the listener in logs: "plugin socket", "admin socket", "metrics endpoint".
    pub name: &'static str,
    pub limits: Limits,
    pub peers: Peers,
    /// Keep one descriptor open to give up when accept runs out of them (the plugin socket).
    pub spare_fd: bool,
    /// How long a stop waits for calls already handed to the handler before closing their connections.
    pub drain: Duration,
}

/// Serves `listener` until `stop` is cancelled, then stops accepting, closes idle and half-received
/// connections, lets the calls in progress answer (for at most `opts.drain`) and returns.
pub async fn serve<H: Handler>(
    listener: Listener,
    handler: Arc<H>,
    opts: ServeOptions,
    stop: CancellationToken,
) {
    let name = opts.name;
    let table = Arc::new(ConnTable::default());
    let tracker = TaskTracker::new();
    let logs = Arc::new(LogThrottle::default());
    let mut http = hyper::server::conn::http1::Builder::new();
    // The watchdog in `drive` keeps the timeouts: hyper's header timeout would also run while a
    // connection idles between requests, closing dockerd's kept-alive connections under it.
    http.keep_alive(true).header_read_timeout(None);
    let mut spare = None;
    'serving: loop {
        if opts.spare_fd && spare.is_none() {
            spare = std::fs::File::open("/dev/null").ok();
        }
        // At the cap with nothing that may be closed: take no new connection until one ends; the kernel
        // queues newcomers meanwhile, and only calls in progress (bounded by their deadlines) hold slots.
        while table.len() >= opts.limits.max_connections && !table.has_evictable() {
            tokio::select! {
                () = table.changed.notified() => {}
                () = stop.cancelled() => break 'serving,
            }
        }
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            a = listener.accept() => a,
            // Without its spare (given up when descriptors ran out), try again as connections close.
            () = table.changed.notified(), if opts.spare_fd && spare.is_none() => continue,
        };
        let ctx = Admission {
            name,
            opts: &opts,
            table: &table,
            tracker: &tracker,
            logs: &logs,
            http: &http,
            handler: &handler,
            stop: &stop,
        };
        match accepted {
            Ok((stream, peer)) => ctx.admit(stream, peer, Room::UnderCap),
            Err(e) if is_fd_exhaustion(&e) => {
                if let Some(fd) = spare.take() {
                    // One descriptor to accept with: serve the newcomer in place of the longest-idle
                    // connection, or, with none to close, close the newcomer at once so its client sees
                    // an error (dockerd retries) rather than waiting in the backlog.
                    drop(fd);
                    let retried = tokio::select! {
                        biased;
                        () = stop.cancelled() => break,
                        a = listener.accept() => a,
                    };
                    match retried {
                        Ok((stream, peer)) => ctx.admit(stream, peer, Room::NoFds),
                        Err(e) => ctx.accept_failed(&e),
                    }
                } else {
                    logs.warn(LogKey::NoFds, |suppressed| {
                        tracing::warn!(listener = name, suppressed, error = %e, "accept failed: out of file descriptors; raise the open-file limit (LimitNOFILE)");
                    });
                    // The pending connection keeps the listener readable: wait instead of spinning.
                    tokio::select! {
                        () = tokio::time::sleep(FD_BACKOFF) => {}
                        () = table.changed.notified() => {}
                        () = stop.cancelled() => break,
                    }
                }
            }
            Err(e) => {
                ctx.accept_failed(&e);
                if e.kind() != io::ErrorKind::ConnectionAborted {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(50)) => {}
                        () = stop.cancelled() => break,
                    }
                }
            }
        }
    }
    drop(listener);
    tracing::info!(
        listener = name,
        "stopped accepting; finishing the calls in progress"
    );
    tracker.close();
    if tokio::time::timeout(opts.drain, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(listener = name, "some connections did not finish in time");
        table.evict_all();
        let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await;
    }
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// How a new connection gets its room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Room {
    /// Past the cap, by closing the longest-idle other connection.
    UnderCap,
    /// Descriptors ran out and the spare was given up to accept it: by closing another connection, or if
    /// none may be closed, by not being served.
    NoFds,
}

/// What admitting a connection needs from the accept loop.
struct Admission<'a, H> {
    name: &'static str,
    opts: &'a ServeOptions,
    table: &'a Arc<ConnTable>,
    tracker: &'a TaskTracker,
    logs: &'a Arc<LogThrottle>,
    http: &'a hyper::server::conn::http1::Builder,
    handler: &'a Arc<H>,
    stop: &'a CancellationToken,
}

impl<H: Handler> Admission<'_, H> {
    /// Checks the peer, makes room for the connection as `room` says, counts it and starts serving it.
    fn admit(&self, stream: Stream, peer: Peer, room: Room) {
        let name = self.name;
        if !self.opts.peers.admits(peer) {
            drop(stream);
            self.logs.warn(LogKey::Refused(peer.uid), |suppressed| match peer.uid {
                Some(uid) => tracing::warn!(listener = name, uid, suppressed, "refused a connection from a user who may not use this socket (only root, Ferry's own user and listeners.docker_uids may)"),
                None => tracing::warn!(listener = name, suppressed, "refused a connection whose user the kernel would not tell"),
            });
            return;
        }
        match room {
            // Room is made before the newcomer is counted, so it is never its own victim: it has sent
            // nothing yet and would rank as the youngest idle connection.
            Room::UnderCap if self.table.len() >= self.opts.limits.max_connections => {
                if self.table.evict_one() {
                    let max = self.opts.limits.max_connections;
                    self.logs.warn(LogKey::AtLimit, |suppressed| {
                        tracing::warn!(listener = name, max, suppressed, "connection limit reached: closed the longest-idle connection to admit a new one");
                    });
                }
            }
            Room::UnderCap => {}
            Room::NoFds if self.table.evict_one() => {
                self.logs.warn(LogKey::NoFds, |suppressed| {
                    tracing::warn!(listener = name, suppressed, "out of file descriptors: closed the longest-idle connection to serve a new one");
                });
            }
            Room::NoFds => {
                drop(stream);
                self.logs.warn(LogKey::NoFds, |suppressed| {
                    tracing::warn!(listener = name, suppressed, "out of file descriptors: closed a new connection unserved; raise the open-file limit (LimitNOFILE)");
                });
                return;
            }
        }
        let (conn, registration) = self.table.register();
        let watch = Watch {
            name,
            limits: self.opts.limits,
            stop: self.stop.clone(),
            logs: self.logs.clone(),
        };
        let (handler, http) = (self.handler.clone(), self.http.clone());
        self.tracker.spawn(async move {
            watch.drive(conn, stream, peer, handler, http).await;
            // Only now, with the socket closed, may the accept loop count the slot free.
            drop(registration);
        });
    }

    fn accept_failed(&self, e: &io::Error) {
        let name = self.name;
        self.logs.warn(LogKey::AcceptFailed, |suppressed| {
            tracing::warn!(listener = name, suppressed, error = %e, "accept failed");
        });
    }
}

/// Reads the body, then hands the request to the handler, marking each phase for the watchdog.
async fn answer<H: Handler>(
    handler: &H,
    conn: &ConnState,
    req: hyper::Request<Incoming>,
    peer: Peer,
) -> Response<Full<Bytes>> {
    conn.update(|p| p.on_request(Instant::now()));
    let (head, body) = req.into_parts();
    let max = handler.max_body();
    let body = match Limited::new(body, max).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            let err = if e.downcast_ref::<LengthLimitError>().is_some() {
                BodyError::TooLarge(max)
            } else {
                BodyError::Unreadable(e.to_string())
            };
            conn.update(|p| p.on_response(Instant::now()));
            return handler.body_error(head.uri.path(), err);
        }
    };
    conn.update(Phase::on_body);
    let resp = handler.handle(head, body, peer).await;
    conn.update(|p| p.on_response(Instant::now()));
    resp
}

/// Where a connection is in its life, for the timeouts, eviction and shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Between requests (or before the first) since then.
    Idle(Instant),
    /// A request's first byte arrived then; its headers or body are still arriving.
    Receiving(Instant),
    /// The handler has the request: only the service's deadlines bound it.
    Working,
    /// The answer was ready then and is being written; `next` is when a next request's first byte came.
    Replying {
        since: Instant,
        next: Option<Instant>,
    },
}

impl Phase {
    /// Bytes arrived from the client.
    fn on_read(self, now: Instant) -> Phase {
        match self {
            Phase::Idle(_) => Phase::Receiving(now),
            Phase::Replying { since, next: None } => Phase::Replying {
                since,
                next: Some(now),
            },
            p => p,
        }
    }

    /// hyper parsed a request's headers (possibly from bytes read with an earlier request).
    fn on_request(self, now: Instant) -> Phase {
        match self {
            Phase::Idle(_) | Phase::Working => Phase::Receiving(now),
            Phase::Replying { next, .. } => Phase::Receiving(next.unwrap_or(now)),
            p @ Phase::Receiving(_) => p,
        }
    }

    /// The body arrived in full.
    fn on_body(self) -> Phase {
        Phase::Working
    }

    /// The answer is ready to be written.
    fn on_response(self, now: Instant) -> Phase {
        Phase::Replying {
            since: now,
            next: None,
        }
    }

    /// The connection's writes reached the kernel. hyper flushes after writing an answer whole, so this
    /// ends a reply; other flushes change nothing.
    fn on_flush(self, now: Instant) -> Phase {
        match self {
            Phase::Replying { next: Some(t), .. } => Phase::Receiving(t),
            Phase::Replying { next: None, .. } => Phase::Idle(now),
            p => p,
        }
    }

    /// When the connection is closed if nothing changes.
    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        match self {
            Phase::Idle(t) => Some(*t + limits.idle_timeout),
            Phase::Receiving(t) | Phase::Replying { since: t, .. } => {
                Some(*t + limits.request_timeout)
            }
            Phase::Working => None,
        }
    }

    /// Whether it may be closed to make room or to stop, and in which order: the idle before the
    /// half-received, the longest waiting first. Calls in progress and answers being written are not.
    fn eviction_rank(&self) -> Option<(u8, Instant)> {
        match self {
            Phase::Idle(t) => Some((0, *t)),
            Phase::Receiving(t) => Some((1, *t)),
            Phase::Working | Phase::Replying { .. } => None,
        }
    }
}

/// One connection's shared state: its phase, set by its stream and its calls, and read by its watchdog.
struct ConnState {
    phase: Mutex<Phase>,
    evicted: AtomicBool,
    wake: Notify,
}

impl ConnState {
    fn new() -> ConnState {
        ConnState {
            phase: Mutex::new(Phase::Idle(Instant::now())),
            evicted: AtomicBool::new(false),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Phase> {
        // A phase is a plain value: one left by a panicking holder is still a valid phase.
        self.phase.lock().recover()
    }

    fn phase(&self) -> Phase {
        *self.lock()
    }

    fn update(&self, f: impl FnOnce(Phase) -> Phase) {
        let changed = {
            let mut phase = self.lock();
            let next = f(*phase);
            let changed = next != *phase;
            *phase = next;
            changed
        };
        if changed {
            self.wake.notify_one();
        }
    }

    fn evict(&self) {
        self.evicted.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}

/// The stream, telling its connection's state when bytes arrive and when writes are flushed.
struct TrackedStream {
    inner: Stream,
    conn: Arc<ConnState>,
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = match &mut this.inner {
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        };
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.conn.update(|p| p.on_read(Instant::now()));
        }
        polled
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.inner {
            Stream::Unix(s) => s.is_write_vectored(),
            Stream::Tcp(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = match &mut this.inner {
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
        };
        if matches!(polled, Poll::Ready(Ok(()))) {
            this.conn.update(|p| p.on_flush(Instant::now()));
        }
        polled
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A connection's watchdog: closes it when its phase's deadline passes, when it is evicted, or at a stop
/// unless a call is in progress on it.
struct Watch {
    name: &'static str,
    limits: Limits,
    stop: CancellationToken,
    logs: Arc<LogThrottle>,
}

impl Watch {
    async fn drive<H: Handler>(
        self,
        conn: Arc<ConnState>,
        stream: Stream,
        peer: Peer,
        handler: Arc<H>,
        http: hyper::server::conn::http1::Builder,
    ) {
        let io = TokioIo::new(TrackedStream {
            inner: stream,
            conn: conn.clone(),
        });
        let service = hyper::service::service_fn({
            let conn = conn.clone();
            move |req| {
                let (handler, conn) = (handler.clone(), conn.clone());
                async move { Ok::<_, Infallible>(answer(&*handler, &conn, req, peer).await) }
            }
        });
        let connection = http.serve_connection(io, service);
        let name = self.name;
        tokio::pin!(connection);
        let mut closing = false;
        loop {
            if conn.evicted.load(Ordering::Acquire) {
                tracing::debug!(listener = name, "closed a connection to make room");
                return;
            }
            let phase = conn.phase();
            let stopping = self.stop.is_cancelled();
            if stopping {
                if phase.eviction_rank().is_some() {
                    return;
                }
                if !closing {
                    // After the answer in progress, hyper closes the connection instead of keeping it.
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
            let deadline = phase.deadline(&self.limits);
            if deadline.is_some_and(|d| Instant::now() >= d) {
                self.timed_out(phase);
                return;
            }
            let expiry = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ended = &mut connection => {
                    if let Err(e) = ended {
                        tracing::debug!(listener = name, error = %e, "connection ended with an error");
                    }
                    return;
                }
                () = conn.wake.notified() => {}
                () = expiry => {}
                () = self.stop.cancelled(), if !stopping => {}
            }
        }
    }

    fn timed_out(&self, phase: Phase) {
        let (name, limits) = (self.name, self.limits);
        match phase {
            Phase::Idle(_) => tracing::debug!(listener = name, "closed an idle connection"),
            Phase::Receiving(_) => self.logs.warn(LogKey::RequestTimeout, |suppressed| {
                tracing::info!(listener = name, timeout = ?limits.request_timeout, suppressed, "dropped a connection whose request did not arrive in full within the request timeout");
            }),
            Phase::Replying { .. } => self.logs.warn(LogKey::RequestTimeout, |suppressed| {
                tracing::info!(listener = name, timeout = ?limits.request_timeout, suppressed, "dropped a connection that did not read its answer within the request timeout");
            }),
            Phase::Working => {}
        }
    }
}

/// The connections of one listener.
#[derive(Default)]
struct ConnTable {
    conns: Mutex<HashMap<u64, Arc<ConnState>>>,
    next_id: AtomicU64,
    /// Signalled when a connection leaves or may have become closable.
    changed: Notify,
}

impl ConnTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<ConnState>>> {
        // Entries are only inserted and removed whole; a panic elsewhere cannot leave one half-made.
        self.conns.lock().recover()
    }

    fn register(self: &Arc<Self>) -> (Arc<ConnState>, Registration) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(ConnState::new());
        self.lock().insert(id, conn.clone());
        (
            conn,
            Registration {
                table: self.clone(),
                id,
            },
        )
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    /// The connection to close first to make room, if any may be closed.
    fn victim(&self) -> Option<Arc<ConnState>> {
        self.lock()
            .values()
            .filter(|c| !c.evicted.load(Ordering::Acquire))
            .filter_map(|c| c.phase().eviction_rank().map(|r| (r, c)))
            .min_by_key(|(r, _)| *r)
            .map(|(_, c)| c.clone())
    }

    fn has_evictable(&self) -> bool {
        self.victim().is_some()
    }

    /// Closes the longest-idle connection (or the oldest half-received one); false if none may be closed.
    fn evict_one(&self) -> bool {
        match self.victim() {
            Some(c) => {
                c.evict();
                true
            }
            None => false,
        }
    }

    fn evict_all(&self) {
        for c in self.lock().values() {
            c.evict();
        }
    }
}

/// A connection's place in its table, given up when the connection is closed.
struct Registration {
    table: Arc<ConnTable>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.table.lock().remove(&self.id);
        self.table.changed.notify_one();
    }
}

/// What a log line is about, for rate limiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum LogKey {
    Refused(Option<u32>),
    AtLimit,
    RequestTimeout,
    NoFds,
    AcceptFailed,
}

/// At most one line per key per `LOG_INTERVAL` (each listener has its own), so a flood of connections
/// cannot flood the log; each line says how many it stands for.
#[derive(Default)]
struct LogThrottle {
    /// When each key was last logged, and how many lines were held back since.
    last: Mutex<HashMap<LogKey, (Instant, u64)>>,
}

impl LogThrottle {
    /// Calls `log` with the number of lines held back since the last one, if one may be written now.
    fn warn(&self, key: LogKey, log: impl FnOnce(u64)) {
        if let Some(suppressed) = self.admit(key, Instant::now()) {
            log(suppressed);
        }
    }

    fn admit(&self, key: LogKey, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().recover();
        // Keys are per uid: bound the memory a stream of strangers could take.
        if last.len() > 4096 {
            last.clear();
        }
        match last.get_mut(&key) {
            Some((at, held)) if now.duration_since(*at) < LOG_INTERVAL => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                let suppressed = *held;
                (*at, *held) = (now, 0);
                Some(suppressed)
            }
            None => {
                last.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_connections: 4,
        idle_timeout: Duration::from_secs(120),
        request_timeout: Duration::from_secs(10),
    };

    #[test]
    fn a_request_moves_through_the_phases_and_back_to_idle() {
        let t0 = Instant::now();
        let t = |s| t0 + Duration::from_secs(s);
        let idle = Phase::Idle(t0);
        assert_eq!(idle.deadline(&LIMITS), Some(t(120)));
        // The first byte starts the request clock; later bytes do not restart it.
        let receiving = idle.on_read(t(5));
        assert_eq!(receiving, Phase::Receiving(t(5)));
        assert_eq!(receiving.on_read(t(9)), receiving);
        assert_eq!(receiving.on_request(t(6)), receiving);
        assert_eq!(receiving.deadline(&LIMITS), Some(t(15)));
        let working = receiving.on_body();
        assert_eq!(working.deadline(&LIMITS), None);
        assert_eq!(working.on_read(t(7)), Phase::Working);
        assert_eq!(working.on_flush(t(7)), Phase::Working);
        let replying = working.on_response(t(8));
        assert_eq!(replying.deadline(&LIMITS), Some(t(18)));
        assert_eq!(replying.on_flush(t(9)), Phase::Idle(t(9)));
        // A pipelined request's first byte, read while the answer was written, keeps its own clock.
        let early = replying.on_read(t(8));
        assert_eq!(early.on_flush(t(20)), Phase::Receiving(t(8)));
        assert_eq!(early.on_request(t(20)), Phase::Receiving(t(8)));
        // A request hyper had buffered already starts its clock when it is parsed.
        assert_eq!(Phase::Idle(t0).on_request(t(3)), Phase::Receiving(t(3)));
    }

    #[test]
    fn only_idle_and_half_received_connections_are_closed_to_make_room() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(1);
        assert_eq!(Phase::Idle(later).eviction_rank(), Some((0, later)));
        assert_eq!(Phase::Receiving(t0).eviction_rank(), Some((1, t0)));
        assert!(Phase::Idle(later).eviction_rank() < Phase::Receiving(t0).eviction_rank());
        assert_eq!(Phase::Working.eviction_rank(), None);
        assert_eq!(
            Phase::Replying {
                since: t0,
                next: None
            }
            .eviction_rank(),
            None
        );
    }

    #[test]
    fn the_table_evicts_the_longest_idle_first_and_never_a_call() {
        let table = Arc::new(ConnTable::default());
        let t0 = Instant::now();
        let (working, _w) = table.register();
        working.update(|_| Phase::Working);
        let (receiving, _r) = table.register();
        receiving.update(|_| Phase::Receiving(t0));
        let (young, _y) = table.register();
        young.update(|_| Phase::Idle(t0 + Duration::from_secs(2)));
        let (old, _o) = table.register();
        old.update(|_| Phase::Idle(t0 + Duration::from_secs(1)));
        assert_eq!(table.len(), 4);
        let order: Vec<_> = std::iter::from_fn(|| {
            let v = table.victim()?;
            v.evict();
            Some(v)
        })
        .collect();
        assert_eq!(order.len(), 3, "the call in progress is never chosen");
        assert!(Arc::ptr_eq(&order[0], &old));
        assert!(Arc::ptr_eq(&order[1], &young));
        assert!(Arc::ptr_eq(&order[2], &receiving));
        assert!(!table.evict_one());
        drop(_o);
        assert_eq!(table.len(), 3);
    }

    #[test]
    fn caps_fit_the_open_file_limit() {
        let wanted = ConnectionCaps {
            plugin: DEFAULT_PLUGIN_CONNECTIONS,
            admin: DEFAULT_ADMIN_CONNECTIONS,
            metrics: DEFAULT_METRICS_CONNECTIONS,
        };
        // The common limits leave the defaults alone.
        assert_eq!(fit_to_fd_limit(1024, wanted), wanted);
        assert_eq!(fit_to_fd_limit(524_288, wanted), wanted);
        for limit in [64, 100, 256, 300, 512, 1024, 4096, 65_536] {
            for wanted in [
                wanted,
                ConnectionCaps {
                    plugin: 100_000,
                    admin: 100_000,
                    metrics: 100_000,
                },
            ] {
                let caps = fit_to_fd_limit(limit, wanted);
                let used = (caps.plugin + caps.admin + caps.metrics + 4) as u64;
                assert!(
                    used + RESERVED_FDS.min(limit / 2) <= limit,
                    "{limit}: {caps:?}"
                );
                assert!(caps.plugin >= 1 && caps.admin >= 1 && caps.metrics >= 1);
                // The side listeners never take more than a quarter of what connections may use.
                assert!((caps.admin + caps.metrics) as u64 * 4 <= limit, "{caps:?}");
                assert!(caps.plugin > caps.admin + caps.metrics, "{limit}: {caps:?}");
            }
        }
    }

    #[test]
    fn peers_are_admitted_by_uid() {
        let root_only = Peers::Uids(vec![0]);
        assert!(root_only.admits(Peer { uid: Some(0) }));
        assert!(!root_only.admits(Peer { uid: Some(65534) }));
        assert!(!root_only.admits(Peer { uid: None }));
        assert!(Peers::Anyone.admits(Peer { uid: None }));
    }

    #[test]
    fn log_lines_are_rate_limited_per_key() {
        let logs = LogThrottle::default();
        let t0 = Instant::now();
        let key = LogKey::Refused(Some(65534));
        assert_eq!(logs.admit(key, t0), Some(0));
        assert_eq!(logs.admit(key, t0 + LOG_INTERVAL / 2), None);
        assert_eq!(logs.admit(key, t0 + LOG_INTERVAL / 2), None);
        // Another user, or another kind of line, has its own.
        assert_eq!(logs.admit(LogKey::Refused(Some(1000)), t0), Some(0));
        assert_eq!(logs.admit(LogKey::AtLimit, t0), Some(0));
        assert_eq!(logs.admit(key, t0 + LOG_INTERVAL), Some(2));
        assert_eq!(logs.admit(key, t0 + LOG_INTERVAL), None);
    }

    #[tokio::test]
    async fn sockets_are_bound_0600_and_replace_only_stale_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.sock");
        // (Under a permissive umask too: tests/root/listeners.rs starts the daemon under umask 000; changing
        // this process's umask would race with the other unit tests.)
        let listener = bind_unix_socket(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Nothing is left of the private directory it was bound in.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("ferry.sock")]);
        // The renamed socket is the bound one.
        let client = tokio::net::UnixStream::connect(&path).await.unwrap();
        let (_accepted, _) = listener.accept().await.unwrap();
        drop(client);

        assert!(matches!(
            bind_unix_socket(&path),
            Err(SocketError::InUse(p)) if p == path
        ));
        drop(listener);
        // Left by a dead process: replaced.
        let again = bind_unix_socket(&path).unwrap();
        drop(again);
        let file = dir.path().join("file");
        std::fs::write(&file, b"keep").unwrap();
        assert!(matches!(
            bind_unix_socket(&file),
            Err(SocketError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
        let long = dir
            .path()
            .join("x".repeat(120 - dir.path().as_os_str().len()));
        let err = bind_unix_socket(&long).unwrap_err();
        assert!(err.to_string().contains("107 bytes"), "{err}");
        assert!(!long.exists());
    }
}

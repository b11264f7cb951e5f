//! The FUSE session: mounting with a /dev/fuse descriptor, the INIT handshake, the threads that read the
//! kernel's requests, and sending replies and notifications.
//!
//! Ours rather than a crate's because what Ferry needs from INIT is not offered by the crates: flock(2)
//! reaches a filesystem only if INIT answers FUSE_FLOCK_LOCKS, and an interrupted request (a signal to a
//! process blocked in F_SETLKW) must reach the filesystem as FUSE_INTERRUPT. Requests are read by one task
//! from the non-blocking device and each runs in a Tokio task of its own; a reply is one writev(2) from
//! that task.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use nix::errno::Errno as NixErrno;
use polyfuse_kernel as k;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::wire::{self, Op, Reply};
use super::MAX_IO;

/// Enough background requests for readahead and async writes of several files at once.
const MAX_BACKGROUND: u16 = 64;
const CONGESTION_THRESHOLD: u16 = 48;

/// What a read from /dev/fuse needs room for: the kernel refuses a read smaller than a full WRITE request
/// (header, write header, `max_write`) or FUSE_MIN_READ_BUFFER.
const READ_BUFFER: usize = MAX_IO as usize + 2 * k::FUSE_MIN_READ_BUFFER as usize;

/// The kernel's end of one mounted filesystem.
#[derive(Debug)]
pub(crate) struct Channel {
    fd: OwnedFd,
    /// Cancelled by `abort`: the reading task ends, as the device it waits on is gone.
    aborted: CancellationToken,
}

impl Channel {
    /// Cuts the connection now, whatever still holds the channel: every request in flight and every later
    /// one fails with ENOTCONN until the filesystem is unmounted, and the reading task ends. For a mount that
    /// cannot be unmounted because a process still uses it.
    ///
    /// The kernel aborts a connection when the last descriptor of its device is closed. Tasks in flight (a
    /// lock waiting on a server, say) hold the channel and would keep it open, so the descriptor is not
    /// closed but replaced, with dup3(2), by /dev/null: the device is released at once, and the number stays
    /// valid for the replies still being written, which go nowhere. This needs no fusectl filesystem
    /// (/sys/fs/fuse/connections), which many hosts and containers do not mount.
    pub(crate) fn abort(&self) -> std::io::Result<()> {
        use nix::fcntl::{open, OFlag};
        let null = open(
            "/dev/null",
            OFlag::O_RDWR | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        nix::unistd::dup3(null.as_raw_fd(), self.fd.as_raw_fd(), OFlag::O_CLOEXEC)?;
        // Only now: a reader that stopped while the device was still there would leave the mount hanging.
        self.aborted.cancel();
        Ok(())
    }

    /// Writes one reply or notification. ENOENT means the request was interrupted and is gone: not an error.
    pub(crate) fn send(&self, parts: &[&[u8]]) -> Result<(), NixErrno> {
        let slices: Vec<IoSlice<'_>> = parts
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| IoSlice::new(p))
            .collect();
        loop {
            match nix::sys::uio::writev(self.fd.as_fd(), &slices) {
                Ok(_) => return Ok(()),
                Err(NixErrno::EINTR) => continue,
                Err(NixErrno::ENOENT) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    pub(crate) fn reply(&self, r: &Reply) {
        if let Err(e) = self.send(&[&r.head, &r.data]) {
            // The connection is gone (unmounted or aborted): nobody waits for the reply.
            tracing::debug!(error = %e, "cannot send a FUSE reply");
        }
    }

    /// Reads one message into `buf`, waiting for it (the handshake's read, while the descriptor still
    /// blocks); `None` once the filesystem is unmounted or the connection aborted.
    fn read(&self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        loop {
            match nix::unistd::read(self.fd.as_raw_fd(), buf) {
                Ok(n) => return Ok(Some(n)),
                // ENOENT: the request was interrupted before we read it.
                Err(NixErrno::EINTR | NixErrno::ENOENT) => continue,
                Err(NixErrno::ENODEV) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Tells the kernel to forget what it cached about an inode.
#[derive(Clone, Debug)]
pub(crate) struct Notifier {
    ch: Arc<Channel>,
}

impl Notifier {
    pub(crate) fn new(ch: Arc<Channel>) -> Self {
        Notifier { ch }
    }

    /// Drops the kernel's cached attributes of `ino` (and, with `off` >= 0, its pages from `off` on, `len`
    /// bytes or to the end with 0). Attributes only never waits for a page, so it is written inline.
    pub(crate) fn inval_inode(&self, ino: u64, off: i64, len: i64) {
        let msg = wire::inval_inode(ino, off, len);
        match self.ch.send(&[&msg]) {
            // ENOENT: the kernel no longer has the inode; nothing is cached.
            Ok(()) | Err(NixErrno::ENOENT) => {}
            Err(e) => {
                tracing::debug!(ino, error = %e, "cannot tell the kernel to drop an inode's cache")
            }
        }
    }
}

/// How to mount, as `mount(2)` options.
pub(crate) struct MountSpec<'a> {
    pub fsname: &'a str,
    pub subtype: &'a str,
    pub allow_other: bool,
}

/// Opens /dev/fuse, mounts it on `mountpoint` and answers the kernel's INIT. Blocking.
pub(crate) fn mount(mountpoint: &Path, spec: &MountSpec<'_>) -> std::io::Result<Arc<Channel>> {
    use nix::fcntl::{open, OFlag};
    use nix::mount::MsFlags;
    use nix::sys::stat::Mode;
    let fd = open("/dev/fuse", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())?;
    let root_mode = nix::sys::stat::stat(mountpoint)?.st_mode & libc::S_IFMT;
    let mut options = format!(
        "fd={},rootmode={:o},user_id=0,group_id=0,default_permissions,max_read={MAX_IO}",
        fd.as_raw_fd(),
        root_mode
    );
    if spec.allow_other {
        options.push_str(",allow_other");
    }
    options.push_str(&format!(",subtype={}", spec.subtype));
    nix::mount::mount(
        Some(spec.fsname),
        mountpoint,
        Some("fuse"),
        MsFlags::MS_NOSUID,
        Some(options.as_str()),
    )?;
    let ch = Arc::new(Channel {
        // SAFETY: `open` returned this descriptor to us alone; nothing else closes it.
        fd: unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) },
        aborted: CancellationToken::new(),
    });
    if let Err(e) = handshake(&ch) {
        // A mount whose INIT failed serves nothing: take it away again.
        let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
        return Err(e);
    }
    Ok(ch)
}

/// The flags Ferry asks for, each only if the kernel offers it.
fn wanted_flags() -> u32 {
    k::FUSE_ASYNC_READ
        | k::FUSE_POSIX_LOCKS
        // flock(2) goes to the filesystem as a whole-file lock of the open file, as a kernel NFS client
        // sends it to the server's lock manager.
        | k::FUSE_FLOCK_LOCKS
        // Truncation on open is ours, so it is one SETATTR with the open, not a separate call.
        | k::FUSE_ATOMIC_O_TRUNC
        | k::FUSE_EXPORT_SUPPORT
        | k::FUSE_BIG_WRITES
        // Cached pages are dropped when the change time or size moved (close-to-open; lock grants).
        | k::FUSE_AUTO_INVAL_DATA
        // One store call lists names with attributes, no lookup per entry afterwards.
        | k::FUSE_DO_READDIRPLUS
        | k::FUSE_ASYNC_DIO
        | k::FUSE_PARALLEL_DIROPS
        | k::FUSE_POSIX_ACL
        | k::FUSE_MAX_PAGES
        | k::FUSE_CACHE_SYMLINKS
}

fn handshake(ch: &Channel) -> std::io::Result<()> {
    let mut buf = vec![0u8; READ_BUFFER];
    let n = ch
        .read(&mut buf)?
        .ok_or_else(|| std::io::Error::other("the FUSE connection ended before INIT"))?;
    let (h, op) = wire::decode(&buf[..n])
        .map_err(|e| std::io::Error::other(format!("malformed FUSE INIT: {}", e.0)))?;
    let Op::Init(init) = op else {
        ch.reply(&Reply::error(h.unique, libc::EIO));
        return Err(std::io::Error::other(
            "the kernel's first FUSE request is not INIT",
        ));
    };
    if init.major != k::FUSE_KERNEL_VERSION || init.minor < 23 {
        ch.reply(&Reply::error(h.unique, libc::EPROTO));
        return Err(std::io::Error::other(format!(
            "FUSE protocol {}.{} is too old (7.23 or later needed)",
            init.major, init.minor
        )));
    }
    let out = k::fuse_init_out {
        major: k::FUSE_KERNEL_VERSION,
        minor: k::FUSE_KERNEL_MINOR_VERSION.min(init.minor),
        max_readahead: init.max_readahead,
        flags: init.flags & wanted_flags(),
        max_background: MAX_BACKGROUND,
        congestion_threshold: CONGESTION_THRESHOLD,
        max_write: MAX_IO,
        time_gran: 1,
        max_pages: u16::MAX,
        padding: 0,
        unused: [0; 8],
    };
    tracing::debug!(
        minor = init.minor,
        offered = format!("{:#x}", init.flags),
        taken = format!("{:#x}", out.flags),
        "FUSE INIT"
    );
    ch.send(&[&Reply::init(h.unique, &out).head])
        .map_err(std::io::Error::from)
}

/// What the reading task hands each request to.
pub(crate) trait Serve: Send + Sync + 'static {
    /// Requests that need no reply and no waiting (FORGET, INTERRUPT), in the reading task.
    fn inline(&self, header: wire::Header, op: Op<'_>);
    /// Every other request, in its own task; returns the reply.
    fn answer(
        self: Arc<Self>,
        msg: Bytes,
    ) -> impl std::future::Future<Output = Option<Reply>> + Send;
}

/// Starts reading requests, in a task of `runtime`. The receiver gets the session's end: `Ok` once
/// unmounted or cut off.
pub(crate) fn serve<S: Serve>(
    ch: Arc<Channel>,
    fs: Arc<S>,
    runtime: &tokio::runtime::Handle,
) -> std::io::Result<oneshot::Receiver<std::io::Result<()>>> {
    // Non-blocking, so a runtime worker waits for requests in its event loop: a request is read and its
    // task started on the thread that epoll woke, with no hand-over from a reading thread to a worker
    // (one thread switch less per request).
    let flags = nix::fcntl::fcntl(ch.fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
    let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(ch.fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
    let ready = {
        let _entered = runtime.enter();
        // SAFETY: `Readable` holds the channel, so the descriptor stays open, and always the same one, for
        // as long as the AsyncFd lives.
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                Readable(ch.clone()),
                tokio::io::Interest::READABLE | tokio::io::Interest::ERROR,
            )
        }
        .map_err(std::io::Error::from)?
    };
    let (tx, rx) = oneshot::channel();
    runtime.spawn(async move {
        let result = read_loop(&ready, &ch, &fs).await;
        let _ = tx.send(result);
    });
    Ok(rx)
}

/// The channel's descriptor as the event loop watches it.
struct Readable(Arc<Channel>);

impl AsRawFd for Readable {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.fd.as_raw_fd()
    }
}

async fn read_loop<S: Serve>(
    ready: &tokio::io::unix::AsyncFd<Readable>,
    ch: &Arc<Channel>,
    fs: &Arc<S>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; READ_BUFFER];
    loop {
        // A cut connection (after an unmount, or an abort) polls as EPOLLERR only, not as readable; the
        // read then says ENODEV.
        let mut guard = tokio::select! {
            biased;
            // The device was replaced by /dev/null: it will never be ready again.
            () = ch.aborted.cancelled() => return Ok(()),
            guard = ready.ready(tokio::io::Interest::READABLE | tokio::io::Interest::ERROR) => guard?,
        };
        let n = match guard.try_io(|r| match nix::unistd::read(r.as_raw_fd(), &mut buf) {
            Ok(n) => Ok(Some(n)),
            // Interrupted before we read it: gone, as if never sent.
            Err(NixErrno::EINTR | NixErrno::ENOENT) => Ok(None),
            Err(NixErrno::ENODEV) => Err(std::io::Error::from_raw_os_error(libc::ENODEV)),
            Err(e) => Err(e.into()),
        }) {
            // End of file: /dev/null in the device's place after an abort.
            Ok(Ok(Some(0))) => return Ok(()),
            Ok(Ok(Some(n))) => n,
            Ok(Ok(None)) => continue,
            // Unmounted, or the connection was cut: the session is over.
            Ok(Err(e)) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            // Nothing to read after all (another wake-up took it).
            Err(_would_block) => continue,
        };
        let msg = &buf[..n];
        let (header, op) = match wire::decode(msg) {
            Ok(parsed) => parsed,
            Err(e) => {
                tracing::warn!(what = e.0, "malformed FUSE request");
                if let Ok((h, _)) =
                    <k::fuse_in_header as zerocopy::FromBytes>::read_from_prefix(msg)
                {
                    ch.reply(&Reply::error(h.unique, libc::EINVAL));
                }
                continue;
            }
        };
        match op {
            Op::Forget { .. } | Op::BatchForget(_) | Op::Interrupt { .. } => {
                fs.inline(header, op);
            }
            _ => {
                // The task owns a copy: the buffer is read into again at once.
                let msg = Bytes::copy_from_slice(msg);
                let (ch, fs) = (ch.clone(), fs.clone());
                tokio::spawn(async move {
                    if let Some(reply) = fs.answer(msg).await {
                        ch.reply(&reply);
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flock_and_interrupts_are_asked_for() {
        let f = wanted_flags();
        assert_ne!(f & k::FUSE_FLOCK_LOCKS, 0);
        assert_ne!(f & k::FUSE_POSIX_LOCKS, 0);
        assert_ne!(f & k::FUSE_DO_READDIRPLUS, 0);
        assert_eq!(
            f & k::FUSE_WRITEBACK_CACHE,
            0,
            "writes must reach the server at close"
        );
        assert!(READ_BUFFER >= MAX_IO as usize + 80);
    }
}

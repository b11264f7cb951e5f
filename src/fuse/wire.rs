//! The FUSE wire protocol without I/O: what the kernel's request messages say, and the bytes of the replies.
//!
//! The layouts are the kernel's ABI 7.31 (`polyfuse-kernel`'s definitions); a newer kernel speaks it too once
//! INIT has answered with that minor version. Every length and name in a message is checked: a message
//! that does not parse is answered EINVAL, never trusted.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use polyfuse_kernel as k;
use zerocopy::{FromBytes, IntoBytes};

/// The request header's fields a handler needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Header {
    pub unique: u64,
    pub opcode: u32,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// What a request asks, its names and data borrowed from the message.
pub(crate) enum Op<'a> {
    Init(k::fuse_init_in),
    Destroy,
    Lookup {
        name: &'a OsStr,
    },
    Forget {
        nlookup: u64,
    },
    BatchForget(Vec<(u64, u64)>),
    Getattr,
    Setattr(k::fuse_setattr_in),
    Readlink,
    Symlink {
        name: &'a OsStr,
        link: &'a OsStr,
    },
    Mknod {
        mode: u32,
        rdev: u32,
        name: &'a OsStr,
    },
    Mkdir {
        mode: u32,
        name: &'a OsStr,
    },
    Unlink {
        name: &'a OsStr,
    },
    Rmdir {
        name: &'a OsStr,
    },
    Rename {
        newdir: u64,
        flags: u32,
        name: &'a OsStr,
        newname: &'a OsStr,
    },
    Link {
        oldnodeid: u64,
        newname: &'a OsStr,
    },
    Open {
        flags: u32,
    },
    Read {
        offset: u64,
        size: u32,
    },
    /// The data as an offset into the message, so it can be handed on without a copy.
    Write {
        offset: u64,
        data: std::ops::Range<usize>,
    },
    Statfs,
    Release {
        release_flags: u32,
        lock_owner: u64,
    },
    Fsync,
    Flush {
        lock_owner: u64,
    },
    Opendir,
    Readdir {
        fh: u64,
        offset: u64,
        size: u32,
        plus: bool,
    },
    Releasedir {
        fh: u64,
    },
    Fsyncdir,
    Getlk(k::fuse_lk_in),
    Setlk {
        lk: k::fuse_lk_in,
        block: bool,
    },
    Create {
        flags: u32,
        mode: u32,
        name: &'a OsStr,
    },
    Interrupt {
        unique: u64,
    },
    /// An operation this filesystem does not offer: answered ENOSYS, which the kernel remembers for most.
    Unsupported,
}

/// A message that does not parse.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Malformed(pub &'static str);

/// Reads the fixed part of a request body and returns the rest.
fn fixed<'a, T: FromBytes>(body: &'a [u8], what: &'static str) -> Result<(T, &'a [u8]), Malformed> {
    T::read_from_prefix(body).map_err(|_| Malformed(what))
}

/// One NUL-terminated name, and what follows it.
fn name<'a>(body: &'a [u8], what: &'static str) -> Result<(&'a OsStr, &'a [u8]), Malformed> {
    let end = body.iter().position(|b| *b == 0).ok_or(Malformed(what))?;
    if end == 0 {
        return Err(Malformed(what));
    }
    Ok((OsStr::from_bytes(&body[..end]), &body[end + 1..]))
}

/// Parses one message as read from /dev/fuse.
pub(crate) fn decode(msg: &[u8]) -> Result<(Header, Op<'_>), Malformed> {
    let (h, _) = fixed::<k::fuse_in_header>(msg, "header")?;
    if (h.len as usize) != msg.len() {
        return Err(Malformed("length"));
    }
    let header = Header {
        unique: h.unique,
        opcode: h.opcode,
        nodeid: h.nodeid,
        uid: h.uid,
        gid: h.gid,
        pid: h.pid,
    };
    let at = std::mem::size_of::<k::fuse_in_header>();
    let body = &msg[at..];
    let op = match h.opcode {
        k::FUSE_INIT => Op::Init(fixed(body, "init")?.0),
        k::FUSE_DESTROY => Op::Destroy,
        k::FUSE_LOOKUP => Op::Lookup {
            name: name(body, "lookup")?.0,
        },
        k::FUSE_FORGET => Op::Forget {
            nlookup: fixed::<k::fuse_forget_in>(body, "forget")?.0.nlookup,
        },
        k::FUSE_BATCH_FORGET => {
            let (head, mut rest) = fixed::<k::fuse_batch_forget_in>(body, "batch forget")?;
            let mut all = Vec::with_capacity(head.count.min(1024) as usize);
            for _ in 0..head.count {
                let (one, more) = fixed::<k::fuse_forget_one>(rest, "batch forget")?;
                all.push((one.nodeid, one.nlookup));
                rest = more;
            }
            Op::BatchForget(all)
        }
        k::FUSE_GETATTR => Op::Getattr,
        k::FUSE_SETATTR => Op::Setattr(fixed(body, "setattr")?.0),
        k::FUSE_READLINK => Op::Readlink,
        k::FUSE_SYMLINK => {
            let (name, rest) = name(body, "symlink")?;
            let (link, _) = self::name(rest, "symlink target")?;
            Op::Symlink { name, link }
        }
        k::FUSE_MKNOD => {
            let (m, rest) = fixed::<k::fuse_mknod_in>(body, "mknod")?;
            Op::Mknod {
                mode: m.mode,
                rdev: m.rdev,
                name: name(rest, "mknod")?.0,
            }
        }
        k::FUSE_MKDIR => {
            let (m, rest) = fixed::<k::fuse_mkdir_in>(body, "mkdir")?;
            Op::Mkdir {
                mode: m.mode,
                name: name(rest, "mkdir")?.0,
            }
        }
        k::FUSE_UNLINK => Op::Unlink {
            name: name(body, "unlink")?.0,
        },
        k::FUSE_RMDIR => Op::Rmdir {
            name: name(body, "rmdir")?.0,
        },
        k::FUSE_RENAME | k::FUSE_RENAME2 => {
            let (newdir, flags, rest) = if h.opcode == k::FUSE_RENAME {
                let (r, rest) = fixed::<k::fuse_rename_in>(body, "rename")?;
                (r.newdir, 0, rest)
            } else {
                let (r, rest) = fixed::<k::fuse_rename2_in>(body, "rename")?;
                (r.newdir, r.flags, rest)
            };
            let (name, rest) = name(rest, "rename")?;
            let (newname, _) = self::name(rest, "rename")?;
            Op::Rename {
                newdir,
                flags,
                name,
                newname,
            }
        }
        k::FUSE_LINK => {
            let (l, rest) = fixed::<k::fuse_link_in>(body, "link")?;
            Op::Link {
                oldnodeid: l.oldnodeid,
                newname: name(rest, "link")?.0,
            }
        }
        k::FUSE_OPEN => Op::Open {
            flags: fixed::<k::fuse_open_in>(body, "open")?.0.flags,
        },
        k::FUSE_READ => {
            let r = fixed::<k::fuse_read_in>(body, "read")?.0;
            Op::Read {
                offset: r.offset,
                size: r.size,
            }
        }
        k::FUSE_WRITE => {
            let (w, rest) = fixed::<k::fuse_write_in>(body, "write")?;
            if rest.len() < w.size as usize {
                return Err(Malformed("write data"));
            }
            let start = at + std::mem::size_of::<k::fuse_write_in>();
            Op::Write {
                offset: w.offset,
                data: start..start + w.size as usize,
            }
        }
        k::FUSE_STATFS => Op::Statfs,
        k::FUSE_RELEASE => {
            let r = fixed::<k::fuse_release_in>(body, "release")?.0;
            Op::Release {
                release_flags: r.release_flags,
                lock_owner: r.lock_owner,
            }
        }
        k::FUSE_FSYNC => Op::Fsync,
        k::FUSE_FLUSH => Op::Flush {
            lock_owner: fixed::<k::fuse_flush_in>(body, "flush")?.0.lock_owner,
        },
        k::FUSE_OPENDIR => Op::Opendir,
        k::FUSE_READDIR | k::FUSE_READDIRPLUS => {
            let r = fixed::<k::fuse_read_in>(body, "readdir")?.0;
            Op::Readdir {
                fh: r.fh,
                offset: r.offset,
                size: r.size,
                plus: h.opcode == k::FUSE_READDIRPLUS,
            }
        }
        k::FUSE_RELEASEDIR => Op::Releasedir {
            fh: fixed::<k::fuse_release_in>(body, "releasedir")?.0.fh,
        },
        k::FUSE_FSYNCDIR => Op::Fsyncdir,
        k::FUSE_GETLK => Op::Getlk(fixed(body, "getlk")?.0),
        k::FUSE_SETLK | k::FUSE_SETLKW => Op::Setlk {
            lk: fixed(body, "setlk")?.0,
            block: h.opcode == k::FUSE_SETLKW,
        },
        k::FUSE_CREATE => {
            let (c, rest) = fixed::<k::fuse_create_in>(body, "create")?;
            Op::Create {
                flags: c.flags,
                mode: c.mode,
                name: name(rest, "create")?.0,
            }
        }
        k::FUSE_INTERRUPT => Op::Interrupt {
            unique: fixed::<k::fuse_interrupt_in>(body, "interrupt")?.0.unique,
        },
        _ => Op::Unsupported,
    };
    Ok((header, op))
}

/// File types as the kernel's mode bits carry them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FileType {
    RegularFile,
    Directory,
    Symlink,
    NamedPipe,
    Socket,
    CharDevice,
    BlockDevice,
}

impl FileType {
    fn mode_bits(self) -> u32 {
        match self {
            FileType::RegularFile => libc::S_IFREG,
            FileType::Directory => libc::S_IFDIR,
            FileType::Symlink => libc::S_IFLNK,
            FileType::NamedPipe => libc::S_IFIFO,
            FileType::Socket => libc::S_IFSOCK,
            FileType::CharDevice => libc::S_IFCHR,
            FileType::BlockDevice => libc::S_IFBLK,
        }
    }
}

/// A file's attributes as the kernel is told them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileAttr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub kind: FileType,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

/// Seconds and nanoseconds since the epoch, negative seconds before it, as the kernel stores them.
fn stamp(t: SystemTime) -> (u64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs(), d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            let (mut secs, mut nanos) = (-(d.as_secs() as i64), d.subsec_nanos());
            if nanos > 0 {
                secs -= 1;
                nanos = 1_000_000_000 - nanos;
            }
            (secs as u64, nanos)
        }
    }
}

/// A time the kernel sent (seconds may be negative), as a `SystemTime`; out of range clamps to the epoch.
pub(crate) fn system_time(secs: u64, nanos: u32) -> SystemTime {
    let secs = secs as i64;
    let whole = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(secs as u64))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    };
    whole
        .and_then(|w| w.checked_add(Duration::from_nanos(u64::from(nanos.min(999_999_999)))))
        .unwrap_or(UNIX_EPOCH)
}

fn attr(a: &FileAttr) -> k::fuse_attr {
    let (atime, atimensec) = stamp(a.atime);
    let (mtime, mtimensec) = stamp(a.mtime);
    let (ctime, ctimensec) = stamp(a.ctime);
    k::fuse_attr {
        ino: a.ino,
        size: a.size,
        blocks: a.blocks,
        atime,
        mtime,
        ctime,
        atimensec,
        mtimensec,
        ctimensec,
        mode: a.kind.mode_bits() | u32::from(a.perm),
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        padding: 0,
    }
}

fn entry_out(nodeid: u64, generation: u64, ttl: Duration, a: &FileAttr) -> k::fuse_entry_out {
    k::fuse_entry_out {
        nodeid,
        generation,
        entry_valid: ttl.as_secs(),
        attr_valid: ttl.as_secs(),
        entry_valid_nsec: ttl.subsec_nanos(),
        attr_valid_nsec: ttl.subsec_nanos(),
        attr: attr(a),
    }
}

/// A reply: the header and fixed part, and the data that follows it (kept apart to be written without a
/// copy).
#[derive(Debug)]
pub(crate) struct Reply {
    pub head: Vec<u8>,
    pub data: Bytes,
}

fn out_header(unique: u64, error: i32, len: usize) -> k::fuse_out_header {
    k::fuse_out_header {
        len: len as u32,
        error,
        unique,
    }
}

impl Reply {
    /// A reply whose body is `body` followed by `data`.
    pub fn new(unique: u64, body: &[u8], data: Bytes) -> Reply {
        let len = std::mem::size_of::<k::fuse_out_header>() + body.len() + data.len();
        let mut head = Vec::with_capacity(len - data.len());
        head.extend_from_slice(out_header(unique, 0, len).as_bytes());
        head.extend_from_slice(body);
        Reply { head, data }
    }

    /// A failure with a (positive) errno.
    pub fn error(unique: u64, errno: i32) -> Reply {
        let len = std::mem::size_of::<k::fuse_out_header>();
        Reply {
            head: out_header(unique, -errno, len).as_bytes().to_vec(),
            data: Bytes::new(),
        }
    }

    pub fn empty(unique: u64) -> Reply {
        Reply::new(unique, &[], Bytes::new())
    }

    pub fn entry(unique: u64, ttl: Duration, a: &FileAttr, generation: u64) -> Reply {
        Reply::new(
            unique,
            entry_out(a.ino, generation, ttl, a).as_bytes(),
            Bytes::new(),
        )
    }

    pub fn attr(unique: u64, ttl: Duration, a: &FileAttr) -> Reply {
        let out = k::fuse_attr_out {
            attr_valid: ttl.as_secs(),
            attr_valid_nsec: ttl.subsec_nanos(),
            dummy: 0,
            attr: attr(a),
        };
        Reply::new(unique, out.as_bytes(), Bytes::new())
    }

    pub fn open(unique: u64, fh: u64, flags: u32) -> Reply {
        let out = k::fuse_open_out {
            fh,
            open_flags: flags,
            padding: 0,
        };
        Reply::new(unique, out.as_bytes(), Bytes::new())
    }

    pub fn created(unique: u64, ttl: Duration, a: &FileAttr, fh: u64, flags: u32) -> Reply {
        let mut body = entry_out(a.ino, 0, ttl, a).as_bytes().to_vec();
        body.extend_from_slice(
            k::fuse_open_out {
                fh,
                open_flags: flags,
                padding: 0,
            }
            .as_bytes(),
        );
        Reply::new(unique, &body, Bytes::new())
    }

    pub fn write(unique: u64, written: u32) -> Reply {
        let out = k::fuse_write_out {
            size: written,
            padding: 0,
        };
        Reply::new(unique, out.as_bytes(), Bytes::new())
    }

    pub fn statfs(unique: u64, st: k::fuse_kstatfs) -> Reply {
        Reply::new(unique, k::fuse_statfs_out { st }.as_bytes(), Bytes::new())
    }

    pub fn lock(unique: u64, lk: k::fuse_file_lock) -> Reply {
        Reply::new(unique, k::fuse_lk_out { lk }.as_bytes(), Bytes::new())
    }

    pub fn init(unique: u64, out: &k::fuse_init_out) -> Reply {
        Reply::new(unique, out.as_bytes(), Bytes::new())
    }

    /// The message's bytes in one buffer (tests, and the rare reply built without data).
    #[cfg(test)]
    pub fn to_vec(&self) -> Vec<u8> {
        let mut all = self.head.clone();
        all.extend_from_slice(&self.data);
        all
    }
}

/// Tells the kernel to drop its cached attributes of `ino` (and its pages in `off..off+len`; `off` < 0 for
/// attributes only).
pub(crate) fn inval_inode(ino: u64, off: i64, len: i64) -> Vec<u8> {
    let body = k::fuse_notify_inval_inode_out { ino, off, len };
    let total = std::mem::size_of::<k::fuse_out_header>() + std::mem::size_of_val(&body);
    let mut msg = out_header(0, k::FUSE_NOTIFY_INVAL_INODE as i32, total)
        .as_bytes()
        .to_vec();
    msg.extend_from_slice(body.as_bytes());
    msg
}

/// Fills a READDIR or READDIRPLUS reply of at most `size` bytes, entry by entry.
pub(crate) struct DirBuf {
    buf: Vec<u8>,
    size: usize,
}

/// Entries are 8-byte aligned, names unterminated.
fn padded(len: usize) -> usize {
    len.div_ceil(8) * 8
}

impl DirBuf {
    pub fn new(size: u32) -> DirBuf {
        DirBuf {
            buf: Vec::with_capacity((size as usize).min(1 << 20)),
            size: size as usize,
        }
    }

    fn dirent(&mut self, ino: u64, off: u64, kind: FileType, name: &[u8]) {
        let d = k::fuse_dirent {
            ino,
            off,
            namelen: name.len() as u32,
            typ: kind.mode_bits() >> 12,
            name: [],
        };
        let start = self.buf.len();
        self.buf.extend_from_slice(d.as_bytes());
        self.buf.extend_from_slice(name);
        let end = start + padded(std::mem::size_of::<k::fuse_dirent>() + name.len());
        self.buf.resize(end, 0);
    }

    /// Whether an entry named `name` still fits (`plus`: a READDIRPLUS entry).
    pub fn fits(&self, name: &[u8], plus: bool) -> bool {
        let fixed = std::mem::size_of::<k::fuse_dirent>()
            + if plus {
                std::mem::size_of::<k::fuse_entry_out>()
            } else {
                0
            };
        self.buf.len() + padded(fixed + name.len()) <= self.size
    }

    /// Adds a READDIR entry; the caller checked `fits`.
    pub fn add(&mut self, ino: u64, off: u64, kind: FileType, name: &[u8]) {
        self.dirent(ino, off, kind, name);
    }

    /// Adds a READDIRPLUS entry, which counts as one lookup of `a.ino`; the caller checked `fits`.
    pub fn add_plus(&mut self, off: u64, ttl: Duration, a: &FileAttr, name: &[u8]) {
        self.buf
            .extend_from_slice(entry_out(a.ino, 0, ttl, a).as_bytes());
        self.dirent(a.ino, off, a.kind, name);
    }

    pub fn reply(self, unique: u64) -> Reply {
        Reply::new(unique, &[], Bytes::from(self.buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(opcode: u32, body: &[u8]) -> Vec<u8> {
        let len = std::mem::size_of::<k::fuse_in_header>() + body.len();
        let h = k::fuse_in_header {
            len: len as u32,
            opcode,
            unique: 7,
            nodeid: 1,
            uid: 1000,
            gid: 1000,
            pid: 42,
            padding: 0,
        };
        let mut m = h.as_bytes().to_vec();
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn names_are_nul_terminated_and_never_empty_or_unterminated() {
        let m = message(k::FUSE_LOOKUP, b"a.txt\0");
        let (h, op) = decode(&m).unwrap();
        assert_eq!((h.unique, h.uid, h.pid), (7, 1000, 42));
        assert!(matches!(op, Op::Lookup { name } if name == "a.txt"));
        assert!(decode(&message(k::FUSE_LOOKUP, b"a.txt")).is_err());
        assert!(decode(&message(k::FUSE_LOOKUP, b"\0")).is_err());
        let m = message(k::FUSE_SYMLINK, b"l\0/target\0");
        assert!(
            matches!(decode(&m).unwrap().1, Op::Symlink { name, link } if name == "l" && link == "/target")
        );
    }

    #[test]
    fn a_length_that_is_not_the_message_is_refused() {
        let mut m = message(k::FUSE_LOOKUP, b"a\0");
        m.push(0);
        assert_eq!(decode(&m).err(), Some(Malformed("length")));
        assert!(decode(&m[..10]).is_err());
    }

    #[test]
    fn a_write_points_at_its_data_and_a_short_one_is_refused() {
        let w = k::fuse_write_in {
            offset: 4096,
            size: 3,
            ..Default::default()
        };
        let mut body = w.as_bytes().to_vec();
        body.extend_from_slice(b"abc");
        let m = message(k::FUSE_WRITE, &body);
        match decode(&m).unwrap().1 {
            Op::Write { offset, data } => {
                assert_eq!(offset, 4096);
                assert_eq!(&m[data], b"abc");
            }
            _ => panic!("decoded as another operation"),
        }
        let short = message(k::FUSE_WRITE, &body[..body.len() - 1]);
        assert!(decode(&short).is_err());
    }

    #[test]
    fn flock_and_blocking_locks_are_told_apart() {
        let lk = k::fuse_lk_in {
            owner: 9,
            lk_flags: k::FUSE_LK_FLOCK,
            ..Default::default()
        };
        match decode(&message(k::FUSE_SETLKW, lk.as_bytes())).unwrap().1 {
            Op::Setlk { lk, block } => {
                assert!(block);
                assert_eq!(lk.lk_flags & k::FUSE_LK_FLOCK, k::FUSE_LK_FLOCK);
            }
            _ => panic!("decoded as another operation"),
        }
    }

    #[test]
    fn a_batch_forget_with_more_entries_than_it_carries_is_refused() {
        let head = k::fuse_batch_forget_in { count: 2, dummy: 0 };
        let one = k::fuse_forget_one {
            nodeid: 5,
            nlookup: 1,
        };
        let mut body = head.as_bytes().to_vec();
        body.extend_from_slice(one.as_bytes());
        assert!(decode(&message(k::FUSE_BATCH_FORGET, &body)).is_err());
        body.extend_from_slice(one.as_bytes());
        assert!(
            matches!(decode(&message(k::FUSE_BATCH_FORGET, &body)).unwrap().1, Op::BatchForget(v) if v == vec![(5, 1), (5, 1)])
        );
    }

    #[test]
    fn directory_entries_are_aligned_and_stop_at_the_size_asked() {
        let mut d = DirBuf::new(64);
        assert!(d.fits(b"abc", false));
        d.add(3, 1, FileType::RegularFile, b"abc");
        assert!(d.fits(b"abcdefgh", false));
        d.add(4, 2, FileType::Directory, b"abcdefgh");
        assert!(!d.fits(b"x", false));
        let r = d.reply(1).to_vec();
        let body = &r[std::mem::size_of::<k::fuse_out_header>()..];
        assert_eq!(body.len(), 32 + 32);
        let (first, _) = k::fuse_dirent::read_from_prefix(body).unwrap();
        assert_eq!((first.ino, first.off, first.namelen), (3, 1, 3));
        assert_eq!(first.typ, libc::S_IFREG >> 12);
        assert!(!DirBuf::new(100).fits(b"x", true));
    }

    #[test]
    fn times_before_the_epoch_keep_their_sign() {
        let t = UNIX_EPOCH - Duration::from_millis(1500);
        let (s, n) = stamp(t);
        assert_eq!((s as i64, n), (-2, 500_000_000));
        assert_eq!(system_time(s, n), t);
        assert_eq!(system_time(5, 7), UNIX_EPOCH + Duration::new(5, 7));
    }

    #[test]
    fn errors_are_negative_and_replies_carry_their_length() {
        let r = Reply::error(3, libc::ENOENT).to_vec();
        let (h, _) = k::fuse_out_header::read_from_prefix(&r[..]).unwrap();
        assert_eq!(
            (h.len as usize, h.error, h.unique),
            (r.len(), -libc::ENOENT, 3)
        );
        let r = Reply::new(4, b"ab", Bytes::from_static(b"cd"));
        let (h, _) = k::fuse_out_header::read_from_prefix(&r.head[..]).unwrap();
        assert_eq!(h.len as usize, 16 + 4);
    }
}

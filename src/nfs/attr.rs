//! The Rust-side types of the NFS client: file handles, attributes, attributes to set, file system
//! information, and their conversion to and from the wire types of `nfs3_types`. Pure: no I/O.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use nfs3_client::nfs3_types::nfs3::{
    fattr3, ftype3, nfs_fh3, nfstime3, sattr3, set_atime, set_gid3, set_mode3, set_mtime,
    set_size3, set_uid3, stable_how, FSINFO3resok, FSSTAT3resok, FSF3_CANSETTIME, FSF3_LINK,
    FSF3_SYMLINK,
};
use nfs3_client::nfs3_types::xdr_codec::Opaque;

/// An NFS file handle: opaque bytes (at most 64), valid until the object is removed or the export
/// changes. Cheap to clone; two handles name the same object exactly when their bytes are equal.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct FileHandle(Bytes);

impl FileHandle {
    /// A handle from bytes the server gave out earlier (say, kept by a FUSE adapter).
    pub fn from_bytes(bytes: Bytes) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn to_bytes(&self) -> Bytes {
        self.0.clone()
    }

    pub(super) fn from_fh3(fh: nfs_fh3) -> Self {
        Self(Bytes::from(fh.data.into_owned()))
    }

    /// The wire form. Copies at most 64 bytes: `nfs_fh3` owns its data.
    pub(super) fn to_fh3(&self) -> nfs_fh3 {
        nfs_fh3 {
            data: Opaque::owned(self.0.to_vec()),
        }
    }

    /// A short form for messages: the handle's last eight bytes in hex (servers put the object's
    /// own identity at the end; the prefix is usually the export's and the same for every handle).
    pub(super) fn short(&self) -> String {
        let tail = &self.0[self.0.len().saturating_sub(8)..];
        let mut out = String::from("handle ");
        for b in tail {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }
}

impl fmt::Debug for FileHandle {
    // Hex, because handles are binary.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FileHandle(")?;
        for b in self.0.iter() {
            write!(f, "{b:02x}")?;
        }
        f.write_str(")")
    }
}

/// What kind of object a handle names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    File,
    Directory,
    Symlink,
    /// A named pipe.
    Fifo,
    /// A Unix domain socket's name.
    Socket,
    CharDevice,
    BlockDevice,
}

impl From<ftype3> for FileKind {
    fn from(t: ftype3) -> Self {
        match t {
            ftype3::NF3REG => FileKind::File,
            ftype3::NF3DIR => FileKind::Directory,
            ftype3::NF3LNK => FileKind::Symlink,
            ftype3::NF3FIFO => FileKind::Fifo,
            ftype3::NF3SOCK => FileKind::Socket,
            ftype3::NF3CHR => FileKind::CharDevice,
            ftype3::NF3BLK => FileKind::BlockDevice,
        }
    }
}

/// A special file to make with MKNOD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Special {
    Fifo,
    Socket,
    /// A character device: major and minor number.
    CharDevice(u32, u32),
    /// A block device: major and minor number.
    BlockDevice(u32, u32),
}

/// The attributes of an object as the server reports them (NFSv3 `fattr3`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fattr {
    /// The server's number for the object (its inode number); hard links share it.
    pub fileid: u64,
    pub kind: FileKind,
    /// Permission bits, including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    /// Length in bytes.
    pub size: u64,
    /// Bytes of storage in use (less than `size` for a sparse file).
    pub used: u64,
    /// The file system the object lives on, as the server numbers it.
    pub fsid: u64,
    /// Major and minor number of a device (`specdata3`); zero for other kinds.
    pub rdev: (u32, u32),
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

/// The former name of [`Fattr`], kept for the path-level callers.
pub type Attributes = Fattr;

impl From<&fattr3> for Fattr {
    fn from(a: &fattr3) -> Self {
        Self {
            fileid: a.fileid,
            kind: FileKind::from(a.type_),
            mode: a.mode & 0o7777,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            size: a.size,
            used: a.used,
            fsid: a.fsid,
            rdev: (a.rdev.specdata1, a.rdev.specdata2),
            atime: SystemTime::from(&a.atime),
            mtime: SystemTime::from(&a.mtime),
            ctime: SystemTime::from(&a.ctime),
        }
    }
}

/// How to change one of an object's times.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SetTime {
    #[default]
    DontChange,
    /// The server's clock (`touch` without a time).
    ServerTime,
    /// A given instant (`touch -d`, `utimensat`). NFSv3 times are unsigned 32-bit seconds since 1970:
    /// earlier instants become 1970, later ones saturate in 2106.
    ClientTime(SystemTime),
}

/// Attributes to set (NFSv3 `sattr3`); `None` and `DontChange` leave a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetAttrs {
    /// Permission bits; masked with `0o7777`.
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Truncates, or extends with zeros, to this length.
    pub size: Option<u64>,
    pub atime: SetTime,
    pub mtime: SetTime,
}

impl SetAttrs {
    /// Mode and owner, the attributes of a new object.
    pub fn owner_and_mode(mode: u32, uid: u32, gid: u32) -> Self {
        Self {
            mode: Some(mode),
            uid: Some(uid),
            gid: Some(gid),
            ..Self::default()
        }
    }

    /// True when nothing would change.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// True when `attr` already shows every mode, owner and size change asked for (times are not
    /// compared: they are set relative to clocks).
    pub(super) fn satisfied_by(&self, attr: &Fattr) -> bool {
        self.mode.is_none_or(|m| m & 0o7777 == attr.mode)
            && self.uid.is_none_or(|u| u == attr.uid)
            && self.gid.is_none_or(|g| g == attr.gid)
            && self.size.is_none_or(|s| s == attr.size)
    }

    pub(super) fn to_sattr3(&self) -> sattr3 {
        sattr3 {
            mode: self
                .mode
                .map_or(set_mode3::None, |m| set_mode3::Some(m & 0o7777)),
            uid: self.uid.map_or(set_uid3::None, set_uid3::Some),
            gid: self.gid.map_or(set_gid3::None, set_gid3::Some),
            size: self.size.map_or(set_size3::None, set_size3::Some),
            atime: match self.atime {
                SetTime::DontChange => set_atime::DONT_CHANGE,
                SetTime::ServerTime => set_atime::SET_TO_SERVER_TIME,
                SetTime::ClientTime(t) => set_atime::SET_TO_CLIENT_TIME(nfstime(t)),
            },
            mtime: match self.mtime {
                SetTime::DontChange => set_mtime::DONT_CHANGE,
                SetTime::ServerTime => set_mtime::SET_TO_SERVER_TIME,
                SetTime::ClientTime(t) => set_mtime::SET_TO_CLIENT_TIME(nfstime(t)),
            },
        }
    }
}

/// `t` as NFSv3 time, clamped to what the protocol can carry (1970 to 2106).
pub(super) fn nfstime(t: SystemTime) -> nfstime3 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => match u32::try_from(d.as_secs()) {
            Ok(seconds) => nfstime3 {
                seconds,
                nseconds: d.subsec_nanos(),
            },
            Err(_) => nfstime3 {
                seconds: u32::MAX,
                nseconds: 999_999_999,
            },
        },
        Err(_) => nfstime3::default(),
    }
}

/// How durable a WRITE must be before the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stability {
    /// The server may keep the data in memory until a COMMIT (or lose it if it restarts first: the
    /// write verifier then changes).
    Unstable,
    /// The data, but not necessarily all metadata, is on stable storage.
    DataSync,
    /// Data and metadata are on stable storage.
    FileSync,
}

impl Stability {
    pub(super) fn to_wire(self) -> stable_how {
        match self {
            Stability::Unstable => stable_how::UNSTABLE,
            Stability::DataSync => stable_how::DATA_SYNC,
            Stability::FileSync => stable_how::FILE_SYNC,
        }
    }

    pub(super) fn from_wire(s: stable_how) -> Self {
        match s {
            stable_how::UNSTABLE => Stability::Unstable,
            stable_how::DATA_SYNC => Stability::DataSync,
            stable_how::FILE_SYNC => Stability::FileSync,
        }
    }
}

/// How CREATE treats a name that exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateHow {
    /// Creates the file, or uses the existing one. Beware: the server may apply the attributes to an
    /// existing file too (RFC 1813 leaves it open).
    Unchecked,
    /// Creates the file, or fails with EXIST; atomic on the server. Attributes are applied at creation.
    Guarded,
    /// Creates the file, or fails with EXIST, except that a repeated call with the same verifier (a lost
    /// reply) returns the same file again. Atomic on the server. The server keeps the verifier in the
    /// file's times, so the attributes are applied by a SETATTR afterwards, which also sets both times to
    /// the server's clock.
    Exclusive([u8; 8]),
}

/// Space and inodes of the exported file system (NFSv3 FSSTAT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsStat {
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// Free bytes available to this client's user (less than `free_bytes` when space is reserved).
    pub avail_bytes: u64,
    pub total_files: u64,
    pub free_files: u64,
    pub avail_files: u64,
}

impl From<&FSSTAT3resok> for FsStat {
    fn from(ok: &FSSTAT3resok) -> Self {
        Self {
            total_bytes: ok.tbytes,
            free_bytes: ok.fbytes,
            avail_bytes: ok.abytes,
            total_files: ok.tfiles,
            free_files: ok.ffiles,
            avail_files: ok.afiles,
        }
    }
}

/// The server's limits and preferences for the export (NFSv3 FSINFO), read once per client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsInfo {
    /// Largest READ the server accepts, in bytes.
    pub rtmax: u32,
    /// Preferred READ size.
    pub rtpref: u32,
    /// Largest WRITE the server accepts.
    pub wtmax: u32,
    /// Preferred WRITE size.
    pub wtpref: u32,
    /// Preferred READDIR reply size.
    pub dtpref: u32,
    /// Largest file size the server supports.
    pub maxfilesize: u64,
    /// Granularity of the server's times.
    pub time_delta: Duration,
    pub supports_hard_links: bool,
    pub supports_symlinks: bool,
    /// SETATTR can set times to a client's clock.
    pub can_set_time: bool,
}

impl From<&FSINFO3resok> for FsInfo {
    fn from(ok: &FSINFO3resok) -> Self {
        Self {
            rtmax: ok.rtmax,
            rtpref: ok.rtpref,
            wtmax: ok.wtmax,
            wtpref: ok.wtpref,
            dtpref: ok.dtpref,
            maxfilesize: ok.maxfilesize,
            time_delta: Duration::new(
                u64::from(ok.time_delta.seconds),
                ok.time_delta.nseconds.min(999_999_999),
            ),
            supports_hard_links: ok.properties & FSF3_LINK != 0,
            supports_symlinks: ok.properties & FSF3_SYMLINK != 0,
            can_set_time: ok.properties & FSF3_CANSETTIME != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_round_trip_and_print_as_hex() {
        let fh = nfs_fh3 {
            data: Opaque::owned(vec![0x01, 0xab, 0, 0, 0, 0, 0, 0, 0, 0x7f]),
        };
        let handle = FileHandle::from_fh3(fh.clone());
        assert_eq!(handle.to_fh3(), fh);
        assert_eq!(format!("{handle:?}"), "FileHandle(01ab000000000000007f)");
        assert_eq!(handle.short(), "handle 000000000000007f");
        assert_eq!(
            FileHandle::from_bytes(handle.to_bytes()),
            handle,
            "bytes round trip"
        );
    }

    #[test]
    fn times_are_clamped_to_what_nfsv3_carries() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        assert_eq!(
            nfstime(t),
            nfstime3 {
                seconds: 1_700_000_000,
                nseconds: 5
            }
        );
        assert_eq!(
            nfstime(UNIX_EPOCH - Duration::from_secs(1)),
            nfstime3::default()
        );
        assert_eq!(
            nfstime(UNIX_EPOCH + Duration::from_secs(1 << 33)).seconds,
            u32::MAX
        );
    }

    #[test]
    fn set_attrs_become_sattr3() {
        let set = SetAttrs {
            mode: Some(0o104_755),
            size: Some(7),
            mtime: SetTime::ServerTime,
            ..SetAttrs::default()
        };
        let s = set.to_sattr3();
        assert!(matches!(s.mode, set_mode3::Some(0o4755)));
        assert!(matches!(s.uid, set_uid3::None));
        assert!(matches!(s.size, set_size3::Some(7)));
        assert!(matches!(s.atime, set_atime::DONT_CHANGE));
        assert!(matches!(s.mtime, set_mtime::SET_TO_SERVER_TIME));
        assert!(SetAttrs::default().is_empty());
        assert!(!set.is_empty());
    }
}

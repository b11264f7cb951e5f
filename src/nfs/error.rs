//! Errors of the NFS client, and the translation of NFS, MOUNT and RPC codes into words.
//!
//! Every message names the server and the export, so an operator can tell which of several NFS backends
//! failed. Protocol codes are never shown as bare numbers.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use nfs3_client::nfs3_types::mount::mountstat3;
use nfs3_client::nfs3_types::nfs3::nfsstat3;
use nfs3_client::nfs3_types::rpc::auth_stat;
use nfs3_client::{ConnectError, MountError, PortmapError, RpcError};

/// Which server and export an error is about; displayed as `nfs server 10.0.0.5 (export /srv/vols)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub server: IpAddr,
    pub export: Arc<str>,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "nfs server {} (export {})", self.server, self.export)
    }
}

/// A path relative to the export root, displayed quoted, with the root shown as `"."`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportPath(pub String);

impl fmt::Display for ExportPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("\".\"")
        } else {
            write!(f, "{:?}", self.0)
        }
    }
}

impl From<&str> for ExportPath {
    fn from(path: &str) -> Self {
        Self(path.to_owned())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NfsError {
    /// Connecting, asking the portmapper or mounting the export failed.
    #[error("cannot connect to {at}: {reason}; check the server address and ports, that the server runs and that it exports this path to this host")]
    Connect { at: Endpoint, reason: String },
    /// The server did not answer within the deadline (the connection is dropped).
    #[error("{at} did not answer {op} of {path} within {timeout:?}; check that the server is running and reachable")]
    Timeout {
        at: Endpoint,
        op: &'static str,
        path: ExportPath,
        timeout: Duration,
    },
    /// The RPC layer failed: the connection broke, or the server refused the call itself.
    #[error("{at}: {op} of {path} failed: {reason}")]
    Rpc {
        at: Endpoint,
        op: &'static str,
        path: ExportPath,
        reason: String,
    },
    /// The server answered with an NFS error status.
    #[error("{at}: {op} of {path} failed: {}", describe_status(*.status))]
    Status {
        at: Endpoint,
        op: &'static str,
        path: ExportPath,
        status: nfsstat3,
    },
    #[error("{at}: {path} exists but is not a directory; remove it or choose another name")]
    NotADirectory { at: Endpoint, path: ExportPath },
    #[error("{at}: {path} is not a regular file")]
    NotAFile { at: Endpoint, path: ExportPath },
    #[error("{at}: {path} is larger than {limit} bytes, too large to read as a small file")]
    FileTooLarge {
        at: Endpoint,
        path: ExportPath,
        limit: u64,
    },
    #[error("{at}: invalid path {path}: {reason}")]
    InvalidPath {
        at: Endpoint,
        path: ExportPath,
        reason: &'static str,
    },
    #[error("{at}: refusing to remove the export root; name a directory inside it")]
    RemoveRoot { at: Endpoint },
    /// The server's reply lacks something the protocol lets it omit but this client needs.
    #[error("{at}: {op} of {path}: {reason}")]
    Protocol {
        at: Endpoint,
        op: &'static str,
        path: ExportPath,
        reason: &'static str,
    },
}

impl NfsError {
    /// The NFS status the server answered with, if that is what failed.
    pub fn status(&self) -> Option<nfsstat3> {
        match self {
            NfsError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// True when the named file or directory does not exist.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(nfsstat3::NFS3ERR_NOENT)
    }

    /// True when the server could not be reached or did not answer (as opposed to answering "no").
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            NfsError::Connect { .. } | NfsError::Timeout { .. } | NfsError::Rpc { .. }
        )
    }

    /// True when the server did not answer within the deadline.
    pub fn is_timeout(&self) -> bool {
        matches!(self, NfsError::Timeout { .. })
    }

    /// The errno an application should see for this failure (for a FUSE reply). Failures to reach
    /// the server, timeouts included, are `EIO`: applications read that as "the storage failed", which
    /// is what happened, and few expect `ETIMEDOUT` from a file operation.
    pub fn errno(&self) -> i32 {
        match self {
            NfsError::Status { status, .. } => status_errno(*status),
            NfsError::Connect { .. }
            | NfsError::Timeout { .. }
            | NfsError::Rpc { .. }
            | NfsError::Protocol { .. } => libc::EIO,
            NfsError::NotADirectory { .. } => libc::ENOTDIR,
            NfsError::NotAFile { .. } => libc::EISDIR,
            NfsError::FileTooLarge { .. } => libc::EFBIG,
            NfsError::InvalidPath { .. } | NfsError::RemoveRoot { .. } => libc::EINVAL,
        }
    }

    /// A stable, low-cardinality name of the failure, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            NfsError::Connect { .. } => "connect",
            NfsError::Timeout { .. } => "timeout",
            NfsError::Rpc { .. } => "rpc",
            NfsError::Status { .. } => "status",
            NfsError::NotADirectory { .. } => "not_a_directory",
            NfsError::NotAFile { .. } => "not_a_file",
            NfsError::FileTooLarge { .. } => "file_too_large",
            NfsError::InvalidPath { .. } => "invalid_path",
            NfsError::RemoveRoot { .. } => "remove_root",
            NfsError::Protocol { .. } => "protocol",
        }
    }
}

/// An NFSv3 status (RFC 1813, section 2.6) in words, close to the matching errno text.
pub fn describe_status(status: nfsstat3) -> &'static str {
    match status {
        nfsstat3::NFS3_OK => "no error",
        nfsstat3::NFS3ERR_PERM => "operation not permitted (not the owner, or root is squashed)",
        nfsstat3::NFS3ERR_NOENT => "no such file or directory",
        nfsstat3::NFS3ERR_IO => "i/o error on the server",
        nfsstat3::NFS3ERR_NXIO => "no such device or address",
        nfsstat3::NFS3ERR_ACCES => "permission denied",
        nfsstat3::NFS3ERR_EXIST => "file exists",
        nfsstat3::NFS3ERR_XDEV => "cross-device link",
        nfsstat3::NFS3ERR_NODEV => "no such device",
        nfsstat3::NFS3ERR_NOTDIR => "not a directory",
        nfsstat3::NFS3ERR_ISDIR => "is a directory",
        nfsstat3::NFS3ERR_INVAL => "invalid argument",
        nfsstat3::NFS3ERR_FBIG => "file too large",
        nfsstat3::NFS3ERR_NOSPC => "no space left on device",
        nfsstat3::NFS3ERR_ROFS => "read-only file system",
        nfsstat3::NFS3ERR_MLINK => "too many hard links",
        nfsstat3::NFS3ERR_NAMETOOLONG => "file name too long",
        nfsstat3::NFS3ERR_NOTEMPTY => "directory not empty",
        nfsstat3::NFS3ERR_DQUOT => "disk quota exceeded",
        nfsstat3::NFS3ERR_STALE => "stale file handle (the file was removed or the export changed)",
        nfsstat3::NFS3ERR_REMOTE => "too many levels of remote in path",
        nfsstat3::NFS3ERR_BADHANDLE => "invalid file handle",
        nfsstat3::NFS3ERR_NOT_SYNC => "attribute update out of sync",
        nfsstat3::NFS3ERR_BAD_COOKIE => "directory changed while it was being listed",
        nfsstat3::NFS3ERR_NOTSUPP => "operation not supported by the server",
        nfsstat3::NFS3ERR_TOOSMALL => "buffer too small",
        nfsstat3::NFS3ERR_SERVERFAULT => "internal server error",
        nfsstat3::NFS3ERR_BADTYPE => "file type not supported by the server",
        nfsstat3::NFS3ERR_JUKEBOX => "the server is busy; try again later",
    }
}

/// The errno matching an NFSv3 status. The NFS-only codes get the nearest errno an application knows
/// (the kernel's own NFS client uses internal codes for them that applications never see).
pub fn status_errno(status: nfsstat3) -> i32 {
    match status {
        nfsstat3::NFS3_OK => 0,
        nfsstat3::NFS3ERR_PERM => libc::EPERM,
        nfsstat3::NFS3ERR_NOENT => libc::ENOENT,
        nfsstat3::NFS3ERR_IO => libc::EIO,
        nfsstat3::NFS3ERR_NXIO => libc::ENXIO,
        nfsstat3::NFS3ERR_ACCES => libc::EACCES,
        nfsstat3::NFS3ERR_EXIST => libc::EEXIST,
        nfsstat3::NFS3ERR_XDEV => libc::EXDEV,
        nfsstat3::NFS3ERR_NODEV => libc::ENODEV,
        nfsstat3::NFS3ERR_NOTDIR => libc::ENOTDIR,
        nfsstat3::NFS3ERR_ISDIR => libc::EISDIR,
        nfsstat3::NFS3ERR_INVAL => libc::EINVAL,
        nfsstat3::NFS3ERR_FBIG => libc::EFBIG,
        nfsstat3::NFS3ERR_NOSPC => libc::ENOSPC,
        nfsstat3::NFS3ERR_ROFS => libc::EROFS,
        nfsstat3::NFS3ERR_MLINK => libc::EMLINK,
        nfsstat3::NFS3ERR_NAMETOOLONG => libc::ENAMETOOLONG,
        nfsstat3::NFS3ERR_NOTEMPTY => libc::ENOTEMPTY,
        nfsstat3::NFS3ERR_DQUOT => libc::EDQUOT,
        nfsstat3::NFS3ERR_STALE => libc::ESTALE,
        nfsstat3::NFS3ERR_REMOTE => libc::EREMOTE,
        // The handle is malformed rather than outdated, but either way it names nothing.
        nfsstat3::NFS3ERR_BADHANDLE => libc::ESTALE,
        nfsstat3::NFS3ERR_BAD_COOKIE | nfsstat3::NFS3ERR_TOOSMALL => libc::EINVAL,
        nfsstat3::NFS3ERR_NOTSUPP | nfsstat3::NFS3ERR_BADTYPE => libc::EOPNOTSUPP,
        // NOT_SYNC answers a SETATTR guard, which this client never sends; JUKEBOX is retried until
        // the deadline, so reaching the caller means the server stayed busy for all of it.
        nfsstat3::NFS3ERR_NOT_SYNC | nfsstat3::NFS3ERR_SERVERFAULT | nfsstat3::NFS3ERR_JUKEBOX => {
            libc::EIO
        }
    }
}

/// A MOUNT status in words; ganesha answers `MNT3ERR_ACCES` for a wrong export path as well.
pub fn describe_mount_status(status: mountstat3) -> &'static str {
    match status {
        mountstat3::MNT3_OK => "no error",
        mountstat3::MNT3ERR_PERM => "the server does not let this host mount the export",
        mountstat3::MNT3ERR_NOENT => "the export path does not exist on the server",
        mountstat3::MNT3ERR_IO => "i/o error on the server",
        mountstat3::MNT3ERR_ACCES => {
            "mount refused: permission denied, or no such export (check the export path)"
        }
        mountstat3::MNT3ERR_NOTDIR => "the export path is not a directory",
        mountstat3::MNT3ERR_INVAL => "invalid export path",
        mountstat3::MNT3ERR_NAMETOOLONG => "export path too long",
        mountstat3::MNT3ERR_NOTSUPP => "operation not supported by the mount service",
        mountstat3::MNT3ERR_SERVERFAULT => "internal server error in the mount service",
    }
}

/// An RPC authentication status in words.
pub fn describe_auth(stat: auth_stat) -> &'static str {
    match stat {
        auth_stat::AUTH_OK => "no error",
        auth_stat::AUTH_BADCRED => "the server rejected the credentials as malformed",
        auth_stat::AUTH_REJECTEDCRED => "the server rejected the credentials",
        auth_stat::AUTH_BADVERF => "the server rejected the verifier as malformed",
        auth_stat::AUTH_REJECTEDVERF => "the server rejected the verifier",
        auth_stat::AUTH_TOOWEAK => "the server requires stronger authentication than AUTH_UNIX",
        auth_stat::AUTH_INVALIDRESP => "the server found the authentication response invalid",
        auth_stat::AUTH_FAILED => "authentication failed",
    }
}

/// An I/O error in words; the common network failures get a fixed lowercase text.
pub fn describe_io(err: &io::Error) -> String {
    let fixed = match err.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused",
        io::ErrorKind::ConnectionReset => "connection reset by the server",
        io::ErrorKind::ConnectionAborted => "connection aborted",
        io::ErrorKind::BrokenPipe => "connection closed by the server",
        io::ErrorKind::UnexpectedEof => "the server closed the connection",
        io::ErrorKind::WriteZero => "the connection accepts no more data",
        io::ErrorKind::TimedOut => "connection timed out",
        io::ErrorKind::HostUnreachable => "host unreachable",
        io::ErrorKind::NetworkUnreachable => "network unreachable",
        io::ErrorKind::AddrNotAvailable => "address not available",
        _ => return err.to_string(),
    };
    fixed.to_owned()
}

/// An RPC-layer failure in words.
pub fn describe_rpc(err: &RpcError) -> String {
    match err {
        RpcError::Io(e) => describe_io(e),
        RpcError::Xdr(e) => format!("malformed reply from the server ({e})"),
        RpcError::Auth(stat) => describe_auth(*stat).to_owned(),
        RpcError::RpcMismatch { .. } => "the server does not speak ONC RPC version 2".to_owned(),
        RpcError::ProgUnavail => "the service is not offered on this port".to_owned(),
        RpcError::ProgMismatch { low, high } => {
            format!("the server offers only versions {low} to {high} of the service, not 3")
        }
        RpcError::ProcUnavail => "the server does not implement this procedure".to_owned(),
        RpcError::GarbageArgs => "the server could not decode the request".to_owned(),
        RpcError::SystemErr => "internal server error".to_owned(),
        RpcError::FragmentedReply => {
            "the server sent a fragmented reply, which is not supported".to_owned()
        }
        RpcError::UnexpectedCall
        | RpcError::WrongLength
        | RpcError::UnexpectedXid
        | RpcError::NotFullyParsed { .. } => format!("malformed reply from the server ({err})"),
    }
}

/// A failure to connect, ask the portmapper or mount, in words.
pub fn describe_connect(err: &ConnectError) -> String {
    match err {
        ConnectError::Io(e) => describe_io(e),
        ConnectError::Portmap(PortmapError::Rpc(e)) => format!("portmapper: {}", describe_rpc(e)),
        ConnectError::Portmap(PortmapError::ProgramUnavailable) => {
            "the portmapper does not list the NFS or MOUNT service; set both ports explicitly or start the services".to_owned()
        }
        ConnectError::Portmap(PortmapError::InvalidPortValue(port)) => {
            format!("the portmapper returned an invalid port ({port})")
        }
        ConnectError::Mount(MountError::Rpc(e)) => format!("mount: {}", describe_rpc(e)),
        ConnectError::Mount(MountError::Denied(stat)) => describe_mount_status(*stat).to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_STATUSES: [nfsstat3; 29] = [
        nfsstat3::NFS3_OK,
        nfsstat3::NFS3ERR_PERM,
        nfsstat3::NFS3ERR_NOENT,
        nfsstat3::NFS3ERR_IO,
        nfsstat3::NFS3ERR_NXIO,
        nfsstat3::NFS3ERR_ACCES,
        nfsstat3::NFS3ERR_EXIST,
        nfsstat3::NFS3ERR_XDEV,
        nfsstat3::NFS3ERR_NODEV,
        nfsstat3::NFS3ERR_NOTDIR,
        nfsstat3::NFS3ERR_ISDIR,
        nfsstat3::NFS3ERR_INVAL,
        nfsstat3::NFS3ERR_FBIG,
        nfsstat3::NFS3ERR_NOSPC,
        nfsstat3::NFS3ERR_ROFS,
        nfsstat3::NFS3ERR_MLINK,
        nfsstat3::NFS3ERR_NAMETOOLONG,
        nfsstat3::NFS3ERR_NOTEMPTY,
        nfsstat3::NFS3ERR_DQUOT,
        nfsstat3::NFS3ERR_STALE,
        nfsstat3::NFS3ERR_REMOTE,
        nfsstat3::NFS3ERR_BADHANDLE,
        nfsstat3::NFS3ERR_NOT_SYNC,
        nfsstat3::NFS3ERR_BAD_COOKIE,
        nfsstat3::NFS3ERR_NOTSUPP,
        nfsstat3::NFS3ERR_TOOSMALL,
        nfsstat3::NFS3ERR_SERVERFAULT,
        nfsstat3::NFS3ERR_BADTYPE,
        nfsstat3::NFS3ERR_JUKEBOX,
    ];

    fn at() -> Endpoint {
        Endpoint {
            server: "192.0.2.7".parse().unwrap(),
            export: "/srv/vols".into(),
        }
    }

    #[test]
    fn statuses_become_words() {
        assert_eq!(
            describe_status(nfsstat3::NFS3ERR_NOENT),
            "no such file or directory"
        );
        assert_eq!(describe_status(nfsstat3::NFS3ERR_EXIST), "file exists");
        assert_eq!(
            describe_status(nfsstat3::NFS3ERR_NOTEMPTY),
            "directory not empty"
        );
        for status in ALL_STATUSES {
            let words = describe_status(status);
            assert!(
                !words.chars().any(|c| c.is_ascii_digit()) && !words.contains("NFS3"),
                "{status:?} is described as {words:?}"
            );
            assert_eq!(words, words.to_lowercase(), "{status:?}");
        }
    }

    #[test]
    fn statuses_and_failures_become_errnos() {
        let table = [
            (nfsstat3::NFS3ERR_NOENT, libc::ENOENT),
            (nfsstat3::NFS3ERR_EXIST, libc::EEXIST),
            (nfsstat3::NFS3ERR_NOTEMPTY, libc::ENOTEMPTY),
            (nfsstat3::NFS3ERR_NOTDIR, libc::ENOTDIR),
            (nfsstat3::NFS3ERR_ISDIR, libc::EISDIR),
            (nfsstat3::NFS3ERR_ACCES, libc::EACCES),
            (nfsstat3::NFS3ERR_PERM, libc::EPERM),
            (nfsstat3::NFS3ERR_NOSPC, libc::ENOSPC),
            (nfsstat3::NFS3ERR_DQUOT, libc::EDQUOT),
            (nfsstat3::NFS3ERR_STALE, libc::ESTALE),
            (nfsstat3::NFS3ERR_NAMETOOLONG, libc::ENAMETOOLONG),
            (nfsstat3::NFS3ERR_ROFS, libc::EROFS),
            (nfsstat3::NFS3ERR_INVAL, libc::EINVAL),
            (nfsstat3::NFS3ERR_FBIG, libc::EFBIG),
            (nfsstat3::NFS3ERR_XDEV, libc::EXDEV),
            (nfsstat3::NFS3ERR_MLINK, libc::EMLINK),
            (nfsstat3::NFS3ERR_BADHANDLE, libc::ESTALE),
            (nfsstat3::NFS3ERR_NOTSUPP, libc::EOPNOTSUPP),
            (nfsstat3::NFS3ERR_JUKEBOX, libc::EIO),
        ];
        for (status, errno) in table {
            let err = NfsError::Status {
                at: at(),
                op: "op",
                path: "p".into(),
                status,
            };
            assert_eq!(err.errno(), errno, "{status:?}");
        }
        for status in ALL_STATUSES.into_iter().skip(1) {
            assert!(status_errno(status) > 0, "{status:?}");
        }
        let timeout = NfsError::Timeout {
            at: at(),
            op: "read",
            path: "".into(),
            timeout: Duration::from_secs(1),
        };
        assert_eq!(timeout.errno(), libc::EIO);
        assert!(timeout.is_timeout());
        let rpc = NfsError::Rpc {
            at: at(),
            op: "read",
            path: "".into(),
            reason: "connection reset by the server".into(),
        };
        assert_eq!(rpc.errno(), libc::EIO);
    }

    #[test]
    fn status_error_names_server_export_operation_and_path() {
        let err = NfsError::Status {
            at: at(),
            op: "lookup",
            path: "vols/a".into(),
            status: nfsstat3::NFS3ERR_NOENT,
        };
        assert_eq!(
            err.to_string(),
            r#"nfs server 192.0.2.7 (export /srv/vols): lookup of "vols/a" failed: no such file or directory"#
        );
        assert!(err.is_not_found());
        assert!(!err.is_unreachable());
    }

    #[test]
    fn timeout_error_names_the_server_and_the_deadline() {
        let err = NfsError::Timeout {
            at: at(),
            op: "fsstat",
            path: "".into(),
            timeout: Duration::from_millis(1500),
        };
        let text = err.to_string();
        assert!(text.starts_with("nfs server 192.0.2.7 (export /srv/vols) did not answer fsstat of \".\" within 1.5s"), "{text}");
        assert!(err.is_unreachable());
    }

    #[test]
    fn connect_errors_become_words() {
        let refused = ConnectError::Io(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert_eq!(describe_connect(&refused), "connection refused");
        let denied = ConnectError::Mount(MountError::Denied(mountstat3::MNT3ERR_ACCES));
        assert!(describe_connect(&denied).contains("check the export path"));
        let weak = ConnectError::Mount(MountError::Rpc(RpcError::Auth(auth_stat::AUTH_TOOWEAK)));
        assert_eq!(
            describe_connect(&weak),
            "mount: the server requires stronger authentication than AUTH_UNIX"
        );
        let eof = RpcError::Io(io::Error::from(io::ErrorKind::UnexpectedEof));
        assert_eq!(describe_rpc(&eof), "the server closed the connection");
    }
}

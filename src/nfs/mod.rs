//! A client for NFSv3 exports, built on `nfs3_client`: the control operations of the NFS backend
//! (make a volume directory with its owner and mode, remove a tree, report free space) and the small-file
//! and exclusive-create primitives that host markers and locks on the export are built from.
//!
//! It owns connections (a small pool, each call under a deadline, broken connections replaced lazily),
//! path validation inside the export, and the translation of protocol codes into words. It knows nothing
//! about Docker or volumes: callers pass paths relative to the export root.
//!
//! - `connector`: the TCP transport, which turns a closed connection into an error (a client defect).
//! - `pool`: the connections.
//! - `client`: `NfsClient` and its operations.
//! - `path`: what a path inside the export may look like.
//! - `error`: `NfsError` and the code-to-words tables.

mod client;
mod connector;
mod error;
mod path;
mod pool;

pub use client::{
    Attributes, ExclusiveCreate, FileHandle, FileKind, FsStat, NfsClient, NfsClientConfig,
    DEFAULT_CONNECTIONS, DEFAULT_TIMEOUT, SMALL_FILE_LIMIT,
};
pub use connector::{TcpConnector, TcpStreamIo};
pub use error::{
    describe_auth, describe_connect, describe_io, describe_mount_status, describe_rpc,
    describe_status, Endpoint, ExportPath, NfsError,
};
pub use path::MAX_NAME_LEN;

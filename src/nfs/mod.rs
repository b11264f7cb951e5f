//! A client for NFSv3 exports, built on `nfs3_client`: the control operations of the NFS backend
//! (make a volume directory with its owner and mode, remove a tree, report free space) and the small-file
//! and exclusive-create primitives that host markers and locks on the export are built from; and, through
//! `HandleOps`, every NFSv3 data operation on file handles, for the FUSE data path.
//!
//! It owns connections (a small pool, each call under a deadline, broken connections replaced lazily),
//! path validation inside the export, and the translation of protocol codes into words. It knows nothing
//! about Docker or volumes: callers pass paths relative to the export root.
//!
//! - `attr`: file handles, attributes and the other Rust-side types, and their wire forms.
//! - `ops`: `HandleOps`, the NFSv3 procedures on file handles, for a data path such as FUSE.
//! - `store`: `NfsStore`, the FUSE adapter's `FileStore` over `HandleOps`, rooted at a volume's directory.
//! - `nlm`: `NlmClient`, NFSv3's lock protocol (NLM 4) over ONC RPC.
//! - `locks`: `NfsLocks`, the FUSE adapter's lock store on the server's lock manager, and the clean-up
//!   after a helper that died holding locks.
//! - `connector`: the TCP transport, which turns a closed connection into an error (a client defect).
//! - `pool`: the connections.
//! - `client`: `NfsClient` and its operations.
//! - `path`: what a path inside the export may look like.
//! - `error`: `NfsError` and the code-to-words tables.

/// One NFS procedure on a pooled connection: `rpc!(caller => via, "op", subject, method, args)` calls
/// `caller.via(op, subject, f)`, where `via` is `NfsClient::call` (the one call path) or `HandleOps::procedure`
/// (the same, with error statuses turned into errors), and `f` runs `method` with the arguments `args`
/// builds: owned, and built again if the pool retries on a fresh connection.
macro_rules! rpc {
    ($caller:expr => $via:ident, $op:expr, $subject:expr, $method:ident, $args:expr) => {
        $caller.$via($op, $subject, |mut conn: $crate::nfs::pool::Connection| {
            let args = $args;
            async move {
                let reply = conn.nfs.$method(&args).await;
                (conn, reply)
            }
        })
    };
}

mod attr;
mod client;
mod connector;
mod error;
mod locks;
mod nlm;
mod ops;
mod path;
mod pool;
mod store;

pub use attr::{
    Attributes, CreateHow, Fattr, FileHandle, FileKind, FsInfo, FsStat, SetAttrs, SetTime, Special,
    Stability,
};
pub use client::{
    ExclusiveCreate, NfsClient, NfsClientConfig, DEFAULT_CONNECTIONS, DEFAULT_TIMEOUT,
    SMALL_FILE_LIMIT,
};
pub use connector::{TcpConnector, TcpStreamIo};
pub use error::{
    describe_auth, describe_connect, describe_io, describe_mount_status, describe_rpc,
    describe_status, status_errno, Endpoint, ExportPath, NfsError,
};
pub use locks::{release_journal, NfsLocks};
pub use nlm::{NlmClient, NlmConfig, NlmError, NlmHolder, NlmLock};
pub use ops::{DirEntryPlus, DirPagePlus, HandleOps, WriteVerifier, Written};
pub use path::MAX_NAME_LEN;
pub use store::NfsStore;

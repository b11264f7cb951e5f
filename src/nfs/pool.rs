//! A small pool of NFS connections to one export.
//!
//! `nfs3_client` allows one call in flight per connection, so parallelism comes from several connections.
//! Connections are made lazily, kept while they work, and dropped after any RPC failure (a broken stream,
//! or a call abandoned at its deadline with the reply still on the wire): the next call makes a new one.
//! The pool knows nothing about deadlines; the client wraps every use of it in one.

use std::future::Future;
use std::sync::Mutex;

use nfs3_client::nfs3_types::nfs3::nfs_fh3;
use nfs3_client::nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::{ConnectError, Nfs3Client, Nfs3ConnectionBuilder, RpcError};
use tokio::sync::Semaphore;

use super::client::NfsClientConfig;
use super::connector::{TcpConnector, TcpStreamIo};
use crate::sync::Recover;

/// One mounted connection: a stream to the NFS program, with this client's credentials.
pub struct Connection {
    pub nfs: Nfs3Client<TcpStreamIo>,
}

/// Why a pooled call failed before the server answered with an NFS status.
#[derive(Debug)]
pub enum PoolFailure {
    Connect(ConnectError),
    Rpc(RpcError),
}

pub struct Pool {
    /// Where and how to connect; the pool ignores the timeout, see the module documentation.
    target: NfsClientConfig,
    credential: opaque_auth<'static>,
    /// Bounds the connections in use (and so the number that exist) to the pool size.
    permits: Semaphore,
    /// Connections that answered their last call; a std mutex, as it is never held across an await.
    idle: Mutex<Vec<Connection>>,
    /// The export root from the newest MOUNT, so a path walk can start without holding a connection.
    root: Mutex<Option<nfs_fh3>>,
}

impl Pool {
    /// A pool of at most `target.connections` connections (at least one).
    pub fn new(target: NfsClientConfig) -> Self {
        let credential = opaque_auth::auth_unix(&auth_unix {
            // The stamp only has to be stable for this client; the PID will do.
            stamp: std::process::id(),
            machinename: Opaque::owned(machine_name()),
            uid: target.uid,
            gid: target.gid,
            gids: vec![target.gid],
        });
        let permits = Semaphore::new(target.connections.max(1));
        Self {
            target,
            credential,
            permits,
            idle: Mutex::new(Vec::new()),
            root: Mutex::new(None),
        }
    }

    /// The export root handle, if any connection has been mounted yet.
    pub fn cached_root(&self) -> Option<nfs_fh3> {
        self.root.lock().recover().clone()
    }

    /// Runs `call` on a pooled connection and returns the connection to the pool if the RPC worked.
    ///
    /// A transport failure on a connection that sat idle is retried once on a fresh connection: a server
    /// restart closes every idle connection, and that must not fail the first call afterwards. Every
    /// operation this client issues is safe to repeat (creates treat "exists" and removes treat "no such
    /// file" as done, and an EXCLUSIVE create with the same verifier returns the same file).
    pub async fn run<T, F, Fut>(&self, call: &F) -> Result<T, PoolFailure>
    where
        F: Fn(Connection) -> Fut,
        Fut: Future<Output = (Connection, Result<T, RpcError>)>,
    {
        // The semaphore is never closed, so acquire cannot fail; map it anyway rather than unwrap.
        let _permit = self.permits.acquire().await.map_err(|_| {
            PoolFailure::Connect(ConnectError::Io(std::io::Error::other(
                "the connection pool was closed",
            )))
        })?;
        let idle = self.take_idle();
        let reused = idle.is_some();
        let conn = match idle {
            Some(conn) => conn,
            None => self.connect().await.map_err(PoolFailure::Connect)?,
        };
        let (conn, result) = call(conn).await;
        match result {
            Ok(value) => {
                self.put_idle(conn);
                Ok(value)
            }
            Err(RpcError::Io(_)) if reused => {
                drop(conn);
                // The other idle connections most likely died with this one.
                self.idle.lock().recover().clear();
                let conn = self.connect().await.map_err(PoolFailure::Connect)?;
                let (conn, result) = call(conn).await;
                let value = result.map_err(PoolFailure::Rpc)?;
                self.put_idle(conn);
                Ok(value)
            }
            // Dropped, not returned: after a failed RPC the stream's state is not worth trusting.
            Err(e) => Err(PoolFailure::Rpc(e)),
        }
    }

    fn take_idle(&self) -> Option<Connection> {
        self.idle.lock().recover().pop()
    }

    fn put_idle(&self, conn: Connection) {
        self.idle.lock().recover().push(conn);
    }

    async fn connect(&self) -> Result<Connection, ConnectError> {
        let t = &self.target;
        let mut builder = Nfs3ConnectionBuilder::new(TcpConnector, t.server.to_string(), &t.export)
            .connect_from_privileged_port(t.privileged_port)
            .credential(self.credential.clone());
        // With both ports set the builder never asks the portmapper.
        if let Some(port) = t.mount_port {
            builder = builder.mount_port(port);
        }
        if let Some(port) = t.nfs_port {
            builder = builder.nfs3_port(port);
        }
        let mounted = builder.mount().await?;
        *self.root.lock().recover() = Some(mounted.root_nfs_fh3());
        // The MOUNT stream is only needed for the root handle; closing it keeps one socket per connection.
        Ok(Connection {
            nfs: mounted.into_nfs3_client(),
        })
    }
}

/// This host's name for AUTH_UNIX (informational on the server; at most 255 bytes by RFC 5531).
fn machine_name() -> Vec<u8> {
    let mut name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().as_bytes().to_vec())
        .unwrap_or_default();
    if name.is_empty() {
        name = b"ferry".to_vec();
    }
    name.truncate(255);
    name
}

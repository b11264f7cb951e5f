//! The catalog: the persistent record of every volume this host knows.
//!
//! One trait with compare-and-swap, so that a cluster store (etcd) can later replace the embedded one and
//! ownership and fencing can be built on versions. This module owns the record format; it must not know
//! about HTTP, backends' data paths or mounts.

pub mod record;
mod redb_store;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::spec::VolumeSpec;

#[cfg(test)]
pub(crate) use redb_store::test_disk::FillableDisk;
pub use redb_store::RedbCatalog;

/// Where a volume is in its life. Each transition is written before the slow work it announces begins, so a
/// crash mid-operation is recognisable at start-up and can be finished or rolled back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeState {
    /// Storage is being provisioned; a crash here is rolled back.
    Creating,
    /// Usable; `mountpoint` is set exactly when the storage is attached.
    Ready,
    /// The first mount is attaching storage.
    Attaching,
    /// The last unmount is releasing storage.
    Detaching,
    /// Storage is being deleted; a crash here is finished at start-up.
    Removing,
}

impl VolumeState {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeState::Creating => "creating",
            VolumeState::Ready => "ready",
            VolumeState::Attaching => "attaching",
            VolumeState::Detaching => "detaching",
            VolumeState::Removing => "removing",
        }
    }
}

/// Everything the catalog keeps about one volume (stored as `record`'s versioned form).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeRecord {
    pub name: String,
    pub spec: VolumeSpec,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    pub state: VolumeState,
    /// Active Docker mount IDs with a count each: `docker cp` mounts twice with one ID, so a set would
    /// release the volume while a container still uses it.
    pub mounts: BTreeMap<String, u32>,
    /// Where the volume's data is reachable while attached.
    pub mountpoint: Option<PathBuf>,
    /// For backends that ship data away (ebs): the newest snapshot this host knows of. Advanced only by a
    /// compare-and-swap on the record, after the snapshot is complete, so it never names a partial one.
    pub shipped: Option<Shipped>,
    /// Mount IDs whose containers still hold storage that died and was attached again for later
    /// containers (an nfs FUSE mount whose helper exited): they get ENOTCONN until restarted. Only IDs
    /// still in `mounts` count; an ID leaves with its last Unmount.
    pub dead_mounts: BTreeSet<String>,
}

/// A complete snapshot of a volume and its generation: 1 for the first snapshot, one more for each after.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shipped {
    pub snapshot: String,
    pub generation: u64,
}

impl VolumeRecord {
    pub fn active_mounts(&self) -> u64 {
        self.mounts.values().map(|c| u64::from(*c)).sum()
    }

    /// How many mount IDs still in use hold a dead connection (see `dead_mounts`).
    pub fn dead_mount_ids(&self) -> usize {
        self.dead_mounts
            .iter()
            .filter(|id| self.mounts.contains_key(*id))
            .count()
    }
}

/// A value with its version: the number of writes to that record since it was created (1 after the first),
/// as etcd counts a key's `version`. Because the next version is always the current one plus one, a writer
/// knows it before the write lands, which lets writes to one record be queued back to back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned<T> {
    pub value: T,
    pub version: u64,
}

/// The condition a write depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The name must not exist yet; the record is stored at version 1.
    Absent,
    /// The stored record must still be at this version; it is stored at the next one.
    Version(u64),
}

impl Expect {
    /// The version a put under this condition stores.
    pub fn next_version(self) -> u64 {
        match self {
            Expect::Absent => 1,
            Expect::Version(v) => v + 1,
        }
    }
}

/// A queued write: resolves once it is durable (with the stored version) or has failed.
pub type PendingWrite = futures_core::future::BoxFuture<'static, Result<u64, CatalogError>>;

#[derive(Clone, Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog conflict on volume {name:?}: expected {expected:?}, found version {found:?}")]
    Conflict {
        name: String,
        expected: Expect,
        found: Option<u64>,
    },
    #[error("catalog record of volume {name:?} is unreadable ({reason}); restore the state directory from a backup or remove the record")]
    Corrupt { name: String, reason: String },
    #[error("catalog storage failed: {0}")]
    Storage(String),
    /// The catalog file failed (a full or read-only filesystem, a disk error). The embedded store closes it
    /// and opens it again on the next call, so this lasts only as long as its cause.
    #[error("the catalog {path} cannot be used: {cause}; make room on (or repair) the filesystem of the state directory, and the next call opens the catalog again without a restart")]
    Unavailable { path: PathBuf, cause: String },
}

/// The persistent record of volumes, with compare-and-swap on versions.
///
/// `put` and `delete` queue the write when they are called, not when their future is first polled, and a
/// catalog applies writes in the order they were queued. A caller holding a record's lock can therefore
/// queue a write, release the lock and wait for durability outside it, while the next writer chains on the
/// version the first will store. A write is durable when its future resolves `Ok`.
#[async_trait]
pub trait Catalog: Send + Sync {
    /// Every record, in name order.
    async fn load(&self) -> Result<Vec<Versioned<VolumeRecord>>, CatalogError>;
    /// One record, as durably stored.
    async fn get(&self, name: &str) -> Result<Option<Versioned<VolumeRecord>>, CatalogError>;
    /// Queues storing a record if `expect` holds; resolves to the stored version.
    fn put(&self, record: VolumeRecord, expect: Expect) -> PendingWrite;
    /// Queues deleting a record if it is still at `version`.
    fn delete(&self, name: &str, version: u64) -> PendingWrite;
}

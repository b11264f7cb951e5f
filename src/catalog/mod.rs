//! The catalog: the persistent record of every volume this host knows.
//!
//! One trait with compare-and-swap, so that a cluster store (etcd) can later replace the embedded one and
//! ownership and fencing can be built on revisions. This module owns the record format; it must not know
//! about HTTP, backends' data paths or mounts.

mod redb_store;

use std::collections::BTreeMap;
use std::path::PathBuf;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::spec::VolumeSpec;

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

/// Everything the catalog keeps about one volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
}

impl VolumeRecord {
    pub fn active_mounts(&self) -> u64 {
        self.mounts.values().map(|c| u64::from(*c)).sum()
    }
}

/// A value with the revision the catalog stored it at. Revisions grow with every write to the catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned<T> {
    pub value: T,
    pub revision: u64,
}

/// The condition a write depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The name must not exist yet.
    Absent,
    /// The stored record must still be at this revision.
    Revision(u64),
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(
        "catalog conflict on volume {name:?}: expected {expected:?}, found revision {found:?}"
    )]
    Conflict {
        name: String,
        expected: Expect,
        found: Option<u64>,
    },
    #[error("catalog record of volume {name:?} is unreadable ({reason}); restore the state directory from a backup or remove the record")]
    Corrupt { name: String, reason: String },
    #[error("catalog storage failed: {0}")]
    Storage(String),
}

/// The persistent record of volumes, with compare-and-swap on revisions. Every successful write is durable
/// when the call returns.
#[async_trait]
pub trait Catalog: Send + Sync {
    /// Every record, in name order.
    async fn load(&self) -> Result<Vec<Versioned<VolumeRecord>>, CatalogError>;
    /// Stores a record if `expect` holds and returns its new revision.
    async fn put(&self, record: VolumeRecord, expect: Expect) -> Result<u64, CatalogError>;
    /// Deletes a record if it is still at `revision`.
    async fn delete(&self, name: &str, revision: u64) -> Result<(), CatalogError>;
}

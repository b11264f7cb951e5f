//! `VolumeService`: the protocol-agnostic core.
//!
//! It owns per-volume serialisation, mount counts per mount ID, idempotency and start-up reconciliation.
//! Every state change is durable in the catalog before a call returns. An in-memory view mirrors the catalog
//! so that Get, List and Path are answered from memory: they never wait for a per-volume lock, a backend or
//! a network. It must not know about HTTP.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};
use tokio::sync::OwnedMutexGuard;

use crate::backend::{Backend, BackendError};
use crate::catalog::{
    Catalog, CatalogError, Expect, PendingWrite, Versioned, VolumeRecord, VolumeState,
};
use crate::cluster::Cluster;
use crate::mount::{MountError, Mounter};
use crate::spec::{self, BackendKind, SpecDefaults, SpecError, VolumeSpec};
use crate::sync::Recover;

/// The longest mount ID accepted; Docker's are 64 hex characters.
const MAX_MOUNT_ID_LEN: usize = 256;

/// Errors of the core, each with a message a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    InvalidSpec(#[from] SpecError),
    #[error("invalid mount ID: {0}")]
    BadMountId(&'static str),
    #[error("volume {0:?} does not exist")]
    NotFound(String),
    #[error("volume {name:?} already exists with a different value for option {option:?}; remove it first or use the same options")]
    Conflict { name: String, option: &'static str },
    #[error("volume {name:?} is in use by {mounts} active mount(s); stop the containers using it and try again (if none does, `ferry release {name}` frees the mounts left behind)")]
    InUse { name: String, mounts: u64 },
    #[error("volume {name:?} has no active mount with ID {id:?}; `ferry inspect {name}` lists its mount IDs")]
    UnknownMountId { name: String, id: String },
    #[error("volume {name:?} is still mounted in another mount namespace ({holders}): a container still uses it; stop it first, or release with --force (the container keeps its own mount until it stops)")]
    Held { name: String, holders: String },
    #[error("volume {name:?} is {state}; try again when that has finished")]
    Busy { name: String, state: &'static str },
    #[error("backend {0} is not enabled on this host; enable it in the configuration file")]
    BackendUnavailable(BackendKind),
    #[error("volume {name:?}: {source}")]
    Backend { name: String, source: BackendError },
    #[error("volume {name:?}: the state could not be saved ({source}); nothing was changed")]
    Catalog { name: String, source: CatalogError },
    #[error("{op} of volume {name:?} did not finish within {secs} s; it goes on in the background, try again later")]
    Timeout {
        op: &'static str,
        name: String,
        secs: u64,
    },
    #[error("internal error: {0}")]
    Internal(String),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
}

impl ServiceError {
    /// Whether this is the caller's mistake (logged quietly) or the host's problem (logged as an error).
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            ServiceError::InvalidSpec(_)
                | ServiceError::BadMountId(_)
                | ServiceError::NotFound(_)
                | ServiceError::Conflict { .. }
                | ServiceError::InUse { .. }
                | ServiceError::UnknownMountId { .. }
                | ServiceError::Held { .. }
                | ServiceError::Busy { .. }
                | ServiceError::BackendUnavailable(_)
                | ServiceError::Cluster(
                    crate::cluster::ClusterError::OwnedElsewhere { .. }
                        | crate::cluster::ClusterError::LocalElsewhere { .. }
                        | crate::cluster::ClusterError::InUse { .. }
                        | crate::cluster::ClusterError::Busy { .. }
                        | crate::cluster::ClusterError::Conflict { .. }
                )
        )
    }
}

type Result<T, E = ServiceError> = std::result::Result<T, E>;

mod cluster;

/// What Get returns about a volume.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumeInfo {
    pub name: String,
    pub mountpoint: Option<PathBuf>,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    pub status: Map<String, Value>,
}

/// What List returns about a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeSummary {
    pub name: String,
    pub mountpoint: Option<PathBuf>,
}

/// Everything Ferry knows about one volume, for the operator CLI. Option values that may be secret are
/// redacted, as in Get.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VolumeReport {
    pub name: String,
    pub backend: String,
    pub state: String,
    pub health: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Where Docker sees the volume while it is mounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mountpoint: Option<PathBuf>,
    pub active_mounts: u64,
    /// Docker mount ID -> how many times it holds the volume.
    pub mount_ids: BTreeMap<String, u32>,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    pub options: BTreeMap<String, String>,
    /// The record's catalog version: it grows with every durable change.
    pub catalog_version: u64,
    /// What the backend reports (size, image, and in time generation or snapshot), as in Get's Status.
    pub backend_status: Map<String, Value>,
    /// Cluster mode: creator, owner, fencing token, published generation and where it is attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::cluster::VolumeClusterInfo>,
}

/// Whether one configured backend can be used right now.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BackendReport {
    pub backend: String,
    /// Whether volumes created without `-o backend=` use it.
    pub default: bool,
    pub reachable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub details: Map<String, Value>,
    pub checked_in_ms: u64,
}

/// What start-up reconciliation did, for the log and for tests.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReconcileReport {
    pub volumes: usize,
    pub adopted: usize,
    pub remounted: usize,
    pub released: usize,
    pub rolled_back: usize,
    pub removed: usize,
    pub failed: usize,
    /// Interrupted pushes and pulls left to finish in the background after the socket opens.
    #[serde(default)]
    pub deferred: usize,
    /// Mount IDs dropped because no mount namespace held the volume's storage any more (containers that
    /// stopped while Ferry was down, whose Unmount never came).
    #[serde(default)]
    pub stale_ids_released: usize,
}

/// What `release` did, for the operator.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReleaseReport {
    pub name: String,
    /// The mount IDs dropped.
    pub released: Vec<String>,
    /// Whether the storage was detached because no mount was left.
    pub detached: bool,
    /// Mounts of the storage in other namespaces that were overridden with `force`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forced_past: Vec<String>,
    /// Cluster mode: the host whose claim on the volume the operator took away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken_from: Option<String>,
}

/// Holds a volume's lock; on drop, forgets the lock entry if nobody else wants it, so churn of anonymous
/// volumes does not grow the lock table forever.
struct VolumeGuard<'a> {
    service: &'a VolumeService,
    name: String,
    _guard: OwnedMutexGuard<()>,
}

impl Drop for VolumeGuard<'_> {
    fn drop(&mut self) {
        let mut locks = self.service.locks.lock().recover();
        // Two references: the table's and the one inside our guard. Any waiter holds a third.
        if locks
            .get(&self.name)
            .is_some_and(|m| Arc::strong_count(m) == 2)
        {
            locks.remove(&self.name);
        }
    }
}

/// The core of Ferry.
pub struct VolumeService {
    catalog: Arc<dyn Catalog>,
    backends: BTreeMap<BackendKind, Arc<dyn Backend>>,
    mounter: Arc<dyn Mounter>,
    defaults: SpecDefaults,
    view: RwLock<BTreeMap<String, Arc<Versioned<VolumeRecord>>>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    tasks: tokio_util::task::TaskTracker,
    /// The last backend failure per volume, until an operation on it succeeds; shown as `health`.
    failures: Mutex<HashMap<String, String>>,
    /// Volumes whose view may be ahead of the catalog, after a failed write whose reload failed too.
    unsynced: Mutex<std::collections::HashSet<String>>,
    metrics: crate::metrics::Metrics,
    /// When each attached volume with a `checkpoint` interval was last checkpointed (or first seen
    /// attached).
    checkpoint_clock: Mutex<HashMap<String, std::time::Instant>>,
    /// Volumes whose interrupted push or pull start-up is finishing in the background: Mount and Remove
    /// of them answer "busy" instead of waiting, Get and List answer as always.
    recovering: Mutex<std::collections::HashSet<String>>,
    /// Mount IDs whose Unmount failed because the catalog could not record it, each with the version the
    /// failed write would have stored (`u64::MAX` when no write was tried). Docker never repeats an
    /// Unmount, so they are dropped by the next operation on the volume, or by `heal`, once the catalog
    /// works again.
    owed_unmounts: Mutex<HashMap<String, Vec<(String, u64)>>>,
    /// Problems of volumes' storage found by `check_storage` (a filesystem that logged errors, a full
    /// filesystem under an image), shown as health until a later check no longer finds them.
    storage_problems: Mutex<HashMap<String, String>>,
    /// Cluster mode: the shared catalog (see `crate::cluster`); `None` on the embedded catalog alone.
    cluster: Option<Arc<Cluster>>,
    /// Cluster mode: volumes of this host's embedded catalog that the cluster has under the same name with
    /// other options, with the report; they cannot be mounted until renamed or removed here.
    import_conflicts: Mutex<HashMap<String, String>>,
    /// Cluster mode: volumes whose claim could not be given back after their storage was released here
    /// (etcd out of reach); `heal` retries.
    owed_releases: Mutex<std::collections::HashSet<String>>,
}

/// A phrase of `BackendError::Lost`'s message, to tell that failure apart in `failures`.
const LOST_MARK: &str = "was lost while";

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn validate_mount_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(ServiceError::BadMountId(
            "it is empty (Docker 1.12 or newer sends one)",
        ));
    }
    if id.len() > MAX_MOUNT_ID_LEN {
        return Err(ServiceError::BadMountId("it is longer than 256 bytes"));
    }
    if id.chars().any(|c| c.is_control()) {
        return Err(ServiceError::BadMountId("it contains control characters"));
    }
    Ok(())
}

impl VolumeService {
    /// Loads the catalog and reconciles it with the mount table. The service must not answer requests
    /// before this returns.
    pub async fn start(
        catalog: Arc<dyn Catalog>,
        backends: Vec<Arc<dyn Backend>>,
        mounter: Arc<dyn Mounter>,
        defaults: SpecDefaults,
    ) -> Result<(Arc<Self>, ReconcileReport)> {
        Self::start_in(catalog, backends, mounter, defaults, None).await
    }

    /// `start`, in a cluster when `cluster` is given: after reconciliation, this host's volumes are
    /// imported into the cluster catalog and the ones attached here are claimed again.
    pub async fn start_in(
        catalog: Arc<dyn Catalog>,
        backends: Vec<Arc<dyn Backend>>,
        mounter: Arc<dyn Mounter>,
        defaults: SpecDefaults,
        cluster: Option<Arc<Cluster>>,
    ) -> Result<(Arc<Self>, ReconcileReport)> {
        let records = catalog
            .load()
            .await
            .map_err(|source| ServiceError::Catalog {
                name: "*".into(),
                source,
            })?;
        let service = Arc::new(VolumeService {
            catalog,
            backends: backends.into_iter().map(|b| (b.kind(), b)).collect(),
            mounter,
            defaults,
            view: RwLock::new(
                records
                    .into_iter()
                    .map(|r| (r.value.name.clone(), Arc::new(r)))
                    .collect(),
            ),
            locks: Mutex::new(HashMap::new()),
            tasks: tokio_util::task::TaskTracker::new(),
            failures: Mutex::new(HashMap::new()),
            unsynced: Mutex::new(std::collections::HashSet::new()),
            metrics: crate::metrics::Metrics::default(),
            checkpoint_clock: Mutex::new(HashMap::new()),
            recovering: Mutex::new(std::collections::HashSet::new()),
            owed_unmounts: Mutex::new(HashMap::new()),
            storage_problems: Mutex::new(HashMap::new()),
            cluster,
            import_conflicts: Mutex::new(HashMap::new()),
            owed_releases: Mutex::new(std::collections::HashSet::new()),
        });
        service.claim_attached().await;
        let report = service.reconcile().await?;
        service.finish_deferred();
        service.join_cluster().await;
        Ok((service, report))
    }

    /// Starts the reconciliation of every volume `reconcile` deferred, each under its volume's lock, which
    /// is taken before this returns so no request can act on the record first.
    fn finish_deferred(self: &Arc<Self>) {
        let names: Vec<String> = self.recovering.lock().recover().iter().cloned().collect();
        for name in names {
            let mutex = {
                let mut locks = self.locks.lock().recover();
                locks.entry(name.clone()).or_default().clone()
            };
            // Nothing has run yet that could hold it; if something did, the task waits for it.
            let held = mutex.clone().try_lock_owned().ok();
            let svc = self.clone();
            self.tasks.spawn(async move {
                let _guard = match held {
                    Some(g) => g,
                    None => mutex.lock_owned().await,
                };
                svc.reconcile_deferred(&name).await;
                svc.recovering.lock().recover().remove(&name);
            });
        }
    }

    /// Reconciles one deferred volume, with a fresh mount table; the caller holds its lock.
    async fn reconcile_deferred(&self, name: &str) {
        let Some(entry) = self.lookup(name) else {
            return;
        };
        let m = self.mounter.clone();
        let table = match tokio::task::spawn_blocking(move || m.mount_table()).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                tracing::error!(volume = name, error = %e, "cannot read the mount table to finish an interrupted operation");
                return;
            }
            Err(e) => {
                tracing::error!(volume = name, error = %e, "cannot read the mount table to finish an interrupted operation");
                return;
            }
        };
        let mut report = ReconcileReport::default();
        match self.reconcile_one(&entry, &table, &mut report).await {
            Ok(()) => {
                tracing::info!(
                    volume = name,
                    "finished an interrupted operation in the background"
                )
            }
            Err(e) => {
                // Shown as health until the next operation on the volume succeeds.
                let text = e.to_string();
                self.failures
                    .lock()
                    .recover()
                    .insert(name.to_string(), text);
                tracing::error!(volume = name, error = %e, "reconciliation failed; the volume is left as it was")
            }
        }
    }

    /// "Busy" while start-up finishes an interrupted push or pull of the volume.
    fn refuse_while_recovering(&self, name: &str) -> Result<()> {
        if self.recovering.lock().recover().contains(name) {
            return Err(ServiceError::Busy {
                name: name.into(),
                state: "finishing a push or pull interrupted by a restart",
            });
        }
        Ok(())
    }

    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// Volume counts for the metrics endpoint, from memory.
    pub fn gauges(&self) -> crate::metrics::Gauges {
        let view = self.view.read().recover();
        let mut g = crate::metrics::Gauges {
            volumes_by_backend: BTreeMap::new(),
            active_mounts: 0,
            attached_volumes: 0,
            transfers: self
                .backends
                .iter()
                .filter_map(|(k, b)| Some((k.as_str(), b.transfers()?)))
                .collect(),
        };
        for e in view.values().filter(|e| Self::visible(&e.value)) {
            *g.volumes_by_backend
                .entry(e.value.spec.kind().as_str())
                .or_default() += 1;
            g.active_mounts += e.value.active_mounts();
            g.attached_volumes += u64::from(e.value.mountpoint.is_some());
        }
        g
    }

    pub fn defaults(&self) -> &SpecDefaults {
        &self.defaults
    }

    /// Takes the volume's lock for an operation that changes it. If an earlier failed write left the view
    /// out of step with the catalog, the durable record is reloaded first; while the catalog cannot be
    /// read, the operation fails instead of acting on a record that may not exist. Unmounts that could not
    /// be recorded are recorded first (without releasing storage: the operation decides that).
    async fn lock_synced(&self, name: &str) -> Result<VolumeGuard<'_>> {
        let guard = self.lock(name).await;
        self.sync_locked(name).await?;
        self.apply_owed_unmounts(name, false).await?;
        Ok(guard)
    }

    /// Reloads the durable record if a failed write left the view out of step; the caller holds the lock.
    async fn sync_locked(&self, name: &str) -> Result<()> {
        let unsynced = self.unsynced.lock().recover().contains(name);
        if unsynced {
            let durable = self
                .catalog
                .get(name)
                .await
                .map_err(|source| ServiceError::Catalog {
                    name: name.to_string(),
                    source,
                })?;
            let mut view = self.view.write().recover();
            match durable {
                Some(d) => view.insert(name.to_string(), Arc::new(d)),
                None => view.remove(name),
            };
            drop(view);
            self.unsynced.lock().recover().remove(name);
            tracing::info!(volume = name, "reloaded the volume from the catalog");
        }
        Ok(())
    }

    /// Remembers mount IDs whose Unmount could not be recorded: the write that would have stored `version`
    /// failed, or none was tried (`u64::MAX`).
    fn owe_unmounts(&self, name: &str, ids: &[String], version: u64) {
        if ids.is_empty() {
            return;
        }
        tracing::warn!(volume = name, mount_ids = ?ids, "an unmount could not be recorded; it is recorded once the catalog works again");
        self.owed_unmounts
            .lock()
            .recover()
            .entry(name.to_string())
            .or_default()
            .extend(ids.iter().map(|id| (id.clone(), version)));
    }

    /// Records the unmounts `owe_unmounts` kept; the caller holds the volume's lock and has synced it.
    /// With `release`, storage no mount is left on is released as the last Unmount would; without, it
    /// stays attached but idle for the operation at hand to reuse or release.
    async fn apply_owed_unmounts(&self, name: &str, release: bool) -> Result<()> {
        let Some(owed) = self.owed_unmounts.lock().recover().remove(name) else {
            return Ok(());
        };
        let Some(entry) = self.lookup(name) else {
            return Ok(());
        };
        let mut rec = entry.value.clone();
        let mut dropped = Vec::new();
        for (id, version) in &owed {
            // The failed write may have landed after all (a failed fsync after a complete write): then the
            // record already holds it.
            if entry.version >= *version {
                continue;
            }
            if let Some(count) = rec.mounts.get_mut(id) {
                *count -= 1;
                if *count == 0 {
                    rec.mounts.remove(id);
                    rec.dead_mounts.remove(id);
                }
                dropped.push(id.clone());
            }
        }
        if dropped.is_empty() {
            return Ok(());
        }
        tracing::info!(volume = name, mount_ids = ?dropped, "recording unmounts that failed while the catalog could not be written");
        if release && rec.mounts.is_empty() && rec.mountpoint.is_some() {
            return self.release_storage(&entry, rec, &dropped).await;
        }
        if let Err(e) = self.store(rec, Expect::Version(entry.version)).await {
            self.owe_unmounts(name, &dropped, entry.version + 1);
            return Err(e);
        }
        Ok(())
    }

    /// Finishes what failed catalog writes left behind, once the catalog works again: records unmounts
    /// that could not be recorded (releasing storage no mount is left on), and brings volumes left
    /// attaching or detaching to ready, as start-up reconciliation does. Volumes with an operation under
    /// way are left to it. Returns how many volumes were set right.
    pub async fn heal(&self) -> usize {
        let mut names: std::collections::BTreeSet<String> = self
            .owed_unmounts
            .lock()
            .recover()
            .keys()
            .cloned()
            .collect();
        names.extend(self.unsynced.lock().recover().iter().cloned());
        names.extend(
            self.view
                .read()
                .recover()
                .values()
                .filter(|e| {
                    matches!(
                        e.value.state,
                        VolumeState::Attaching | VolumeState::Detaching
                    )
                })
                .map(|e| e.value.name.clone()),
        );
        let mut healed = self.retry_cluster_releases().await;
        for name in names {
            let recovering = self.recovering.lock().recover().contains(&name);
            if recovering {
                continue;
            }
            let Some(_guard) = self.try_lock(&name) else {
                continue;
            };
            let owed = self.owed_unmounts.lock().recover().contains_key(&name);
            let outcome = async {
                self.sync_locked(&name).await?;
                self.apply_owed_unmounts(&name, true).await?;
                let Some(entry) = self.lookup(&name) else {
                    return Ok(owed);
                };
                if !matches!(
                    entry.value.state,
                    VolumeState::Attaching | VolumeState::Detaching
                ) {
                    return Ok(owed);
                }
                let m = self.mounter.clone();
                let table = tokio::task::spawn_blocking(move || m.mount_table())
                    .await
                    .map_err(|e| ServiceError::Internal(e.to_string()))?
                    .map_err(|e| ServiceError::Internal(e.to_string()))?;
                self.reconcile_one(&entry, &table, &mut ReconcileReport::default())
                    .await?;
                tracing::info!(volume = %name, state = entry.value.state.as_str(), "finished an operation whose last catalog write had failed");
                Ok::<bool, ServiceError>(true)
            }
            .await;
            match outcome {
                Ok(true) => healed += 1,
                Ok(false) => {}
                // Most likely the catalog still fails; the next pass tries again.
                Err(e) => {
                    tracing::debug!(volume = %name, error = %e, "cannot set the volume right yet")
                }
            }
        }
        healed
    }

    async fn lock(&self, name: &str) -> VolumeGuard<'_> {
        let mutex = {
            let mut locks = self.locks.lock().recover();
            locks.entry(name.to_string()).or_default().clone()
        };
        VolumeGuard {
            service: self,
            name: name.to_string(),
            _guard: mutex.lock_owned().await,
        }
    }

    /// The volume's lock if nobody holds it now; `None` while an operation on it runs.
    fn try_lock(&self, name: &str) -> Option<VolumeGuard<'_>> {
        let mutex = {
            let mut locks = self.locks.lock().recover();
            locks.entry(name.to_string()).or_default().clone()
        };
        // On failure the holder's guard tidies the table entry, as it does after any waiter.
        let guard = mutex.try_lock_owned().ok()?;
        Some(VolumeGuard {
            service: self,
            name: name.to_string(),
            _guard: guard,
        })
    }

    fn lookup(&self, name: &str) -> Option<Arc<Versioned<VolumeRecord>>> {
        self.view.read().recover().get(name).cloned()
    }

    fn backend(&self, kind: BackendKind) -> Result<&Arc<dyn Backend>> {
        self.backends
            .get(&kind)
            .ok_or(ServiceError::BackendUnavailable(kind))
    }

    /// Writes a record durably, then publishes it to the view.
    async fn store(
        &self,
        record: VolumeRecord,
        expect: Expect,
    ) -> Result<Arc<Versioned<VolumeRecord>>> {
        let name = record.name.clone();
        let version = match self.catalog.put(record.clone(), expect).await {
            Ok(v) => v,
            Err(source) => {
                // A commit that failed may have landed all the same (a failed fsync), and a conflict means
                // the view is stale: the next operation reloads the durable record before trusting it.
                self.mark_unsynced(&name);
                return Err(ServiceError::Catalog { name, source });
            }
        };
        let entry = Arc::new(Versioned {
            value: record,
            version,
        });
        self.view.write().recover().insert(name, entry.clone());
        Ok(entry)
    }

    /// Queues a write and publishes it to the view at once, so the volume's lock can be released before the
    /// write is durable: concurrent mounts of one volume then share a commit instead of waiting for one
    /// each. The caller must pass the result to `settle` before replying.
    fn store_queued(&self, record: VolumeRecord, expect: Expect) -> PendingWrite {
        let pending = self.catalog.put(record.clone(), expect);
        let entry = Arc::new(Versioned {
            version: expect.next_version(),
            value: record,
        });
        self.view
            .write()
            .recover()
            .insert(entry.value.name.clone(), entry);
        pending
    }

    /// Waits until a queued write is durable. If it failed, the view ran ahead of the catalog: it is put
    /// back to what is durable, and writes queued after this one fail too, since they chain on its version.
    /// `owing` names the mount IDs the write dropped and the version it would have stored, to be recorded
    /// later if it failed.
    async fn settle(
        &self,
        name: &str,
        pending: PendingWrite,
        owing: Option<(&[String], u64)>,
    ) -> Result<()> {
        let Err(source) = pending.await else {
            return Ok(());
        };
        let _guard = self.lock(name).await;
        if let Some((ids, version)) = owing {
            self.owe_unmounts(name, ids, version);
        }
        match self.catalog.get(name).await {
            Ok(durable) => {
                let mut view = self.view.write().recover();
                match durable {
                    Some(d) => view.insert(name.to_string(), Arc::new(d)),
                    None => view.remove(name),
                };
            }
            Err(e) => {
                // The view may now be ahead of the catalog; the next operation on this volume reloads it
                // before trusting it, instead of chaining every later write on a version that never landed.
                tracing::error!(volume = name, error = %e, "cannot reload the volume after a failed write");
                self.unsynced.lock().recover().insert(name.to_string());
            }
        }
        Err(ServiceError::Catalog {
            name: name.to_string(),
            source,
        })
    }

    fn mark_unsynced(&self, name: &str) {
        self.unsynced.lock().recover().insert(name.to_string());
    }

    async fn forget(&self, name: &str, version: u64) -> Result<()> {
        if let Err(source) = self.catalog.delete(name, version).await {
            self.mark_unsynced(name);
            return Err(ServiceError::Catalog {
                name: name.to_string(),
                source,
            });
        }
        self.view.write().recover().remove(name);
        self.healthy(name);
        Ok(())
    }

    /// Records a backend failure for the volume's `health` in Status, and wraps it.
    fn failed(&self, name: &str, source: BackendError) -> ServiceError {
        let backend = self
            .lookup(name)
            .map(|e| e.value.spec.kind().as_str())
            .unwrap_or("unknown");
        self.metrics.backend_error(backend, source.kind());
        let err = ServiceError::Backend {
            name: name.to_string(),
            source,
        };
        self.failures
            .lock()
            .recover()
            .insert(name.to_string(), err.to_string());
        err
    }

    /// Ships what changed in a mounted volume now, without unmounting it (ebs); for other backends, and
    /// for volumes not mounted, there is nothing to do. The upload runs outside the volume's lock, so
    /// Mount and Unmount of other containers never wait for it; the backend serializes shipping per
    /// volume. Returns the newest snapshot afterwards.
    pub async fn checkpoint(&self, name: &str) -> Result<Option<crate::catalog::Shipped>> {
        spec::validate_name(name)?;
        let entry = self
            .lookup(name)
            .filter(|e| Self::visible(&e.value))
            .ok_or_else(|| ServiceError::NotFound(name.into()))?;
        let rec = &entry.value;
        if rec.mountpoint.is_none() {
            return Ok(rec.shipped.clone());
        }
        let backend = self.backend(rec.spec.kind())?.clone();
        let shipped = backend
            .checkpoint(name, &rec.spec, rec.shipped.as_ref())
            .await
            .map_err(|e| self.failed(name, e))?;
        if let Some(new) = &shipped {
            self.record_shipped(name, new.clone()).await?;
        }
        self.healthy(name);
        Ok(shipped)
    }

    /// Moves this host's copy of an unmounted volume to a rescue directory (ebs), so the next Mount takes
    /// the newest shared data; returns where the copy went. The operator's way out of a conflict.
    pub async fn set_aside(&self, name: &str) -> Result<PathBuf> {
        spec::validate_name(name)?;
        self.refuse_while_recovering(name)?;
        let _guard = self.lock_synced(name).await?;
        let entry = self
            .lookup(name)
            .filter(|e| Self::visible(&e.value))
            .ok_or_else(|| ServiceError::NotFound(name.into()))?;
        let rec = &entry.value;
        let mounts = rec.active_mounts();
        if mounts > 0 {
            return Err(ServiceError::InUse {
                name: name.into(),
                mounts,
            });
        }
        let backend = self.backend(rec.spec.kind())?.clone();
        // Not recorded as the volume's health: a refusal here (the wrong backend, still mounted) says
        // nothing about the volume's storage.
        let to = backend
            .set_aside(name, &rec.spec)
            .await
            .map_err(Self::backend_error(name))?;
        // The recorded snapshot guarded the copy just moved away; what EBS holds now is what the
        // operator asked for, even if its history was deleted and started again elsewhere.
        if rec.shipped.is_some() {
            let mut next = rec.clone();
            next.shipped = None;
            self.store(next, Expect::Version(entry.version)).await?;
        }
        self.healthy(name);
        Ok(to)
    }

    /// Applies a volume's snapshot retention now (ebs) and returns what was kept and deleted. Allowed
    /// while mounted: it deletes only old snapshots, never the data a mount uses.
    pub async fn prune(&self, name: &str) -> Result<Value> {
        spec::validate_name(name)?;
        self.refuse_while_recovering(name)?;
        let entry = self
            .lookup(name)
            .filter(|e| Self::visible(&e.value))
            .ok_or_else(|| ServiceError::NotFound(name.into()))?;
        let rec = &entry.value;
        let backend = self.backend(rec.spec.kind())?.clone();
        backend
            .prune(name, &rec.spec, rec.shipped.as_ref())
            .await
            .map_err(Self::backend_error(name))
    }

    /// Advances a volume's newest snapshot unless the catalog already records this one or a newer one
    /// (an Unmount that shipped after the checkpoint).
    async fn record_shipped(&self, name: &str, new: crate::catalog::Shipped) -> Result<()> {
        let _guard = self.lock_synced(name).await?;
        let Some(entry) = self.lookup(name) else {
            return Ok(());
        };
        if entry
            .value
            .shipped
            .as_ref()
            .is_some_and(|s| s.generation >= new.generation)
        {
            return Ok(());
        }
        let mut rec = entry.value.clone();
        rec.shipped = Some(new);
        self.store(rec, Expect::Version(entry.version)).await?;
        Ok(())
    }

    /// Checkpoints every attached volume whose `checkpoint` interval has passed since its last
    /// checkpoint (or since it was first seen attached). Returns how many were checkpointed.
    pub async fn run_due_checkpoints(&self) -> usize {
        let now = std::time::Instant::now();
        let attached: Vec<(String, u64)> = self
            .view
            .read()
            .recover()
            .values()
            .filter(|e| Self::visible(&e.value) && e.value.mountpoint.is_some())
            .filter_map(|e| Some((e.value.name.clone(), e.value.spec.checkpoint()?)))
            .collect();
        let due: Vec<String> = {
            let mut clock = self.checkpoint_clock.lock().recover();
            clock.retain(|name, _| attached.iter().any(|(n, _)| n == name));
            attached
                .iter()
                .filter(|(name, every)| {
                    let last = *clock.entry(name.clone()).or_insert(now);
                    now.duration_since(last) >= Duration::from_secs(*every)
                })
                .map(|(name, _)| name.clone())
                .collect()
        };
        let mut done = 0;
        for name in due {
            match self.checkpoint(&name).await {
                Ok(_) => done += 1,
                Err(e) => {
                    tracing::error!(volume = %name, error = %e, "checkpoint failed; retrying at the next interval")
                }
            }
            self.checkpoint_clock
                .lock()
                .recover()
                .insert(name, std::time::Instant::now());
        }
        done
    }

    /// Looks for storage that died under running containers (an nfs FUSE helper killed, a loop mount taken
    /// away by hand) and shows it as the volume's `health`, so `docker volume inspect` and `ferry ls` say so
    /// before the next container fails. Judged from the mount table and local process state only; volumes
    /// with an operation under way are skipped, that operation judges for itself. Returns how many volumes
    /// were found lost. The next Mount attaches such a volume again.
    pub async fn check_attachments(&self) -> usize {
        let names: Vec<String> = self
            .view
            .read()
            .recover()
            .values()
            .filter(|e| e.value.state == VolumeState::Ready && !e.value.mounts.is_empty())
            .map(|e| e.value.name.clone())
            .collect();
        let mut lost = 0;
        for name in names {
            let Some(_guard) = self.try_lock(&name) else {
                continue;
            };
            let Some(entry) = self.lookup(&name) else {
                continue;
            };
            let rec = &entry.value;
            if rec.state != VolumeState::Ready || rec.mounts.is_empty() {
                continue;
            }
            let Some(backend) = self.backends.get(&rec.spec.kind()) else {
                continue;
            };
            // Read under the lock: a table read before it could predate an attach that just finished.
            let table = match self.mounter.mount_table() {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the mount table to check attached volumes");
                    return lost;
                }
            };
            if backend.is_attached(&name, &rec.spec, &table) != Some(false) {
                continue;
            }
            lost += 1;
            let known = self
                .failures
                .lock()
                .recover()
                .get(&name)
                .is_some_and(|f| f.contains(LOST_MARK));
            if !known {
                let err = self.failed(
                    &name,
                    BackendError::Lost {
                        mounts: rec.active_mounts(),
                    },
                );
                tracing::error!(volume = %name, error = %err, "attached storage lost");
            }
        }
        lost
    }

    /// Asks the backends about every volume's storage (filesystem errors, a full filesystem under an image,
    /// a check still pending) and shows what they find as health until a later pass no longer finds it.
    /// Local I/O only, off the async threads; nothing waits on a network. Returns how many volumes have a
    /// problem.
    pub async fn check_storage(&self) -> usize {
        let volumes: Vec<(String, VolumeSpec)> = self
            .view
            .read()
            .recover()
            .values()
            .filter(|e| Self::visible(&e.value))
            .map(|e| (e.value.name.clone(), e.value.spec.clone()))
            .collect();
        let backends = self.backends.clone();
        let mounter = self.mounter.clone();
        let found = tokio::task::spawn_blocking(move || {
            let table = match mounter.mount_table() {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the mount table to check volumes' storage");
                    return None;
                }
            };
            for backend in backends.values() {
                backend.survey();
            }
            let mut found = HashMap::new();
            for (name, spec) in volumes {
                let Some(backend) = backends.get(&spec.kind()) else {
                    continue;
                };
                if let Some(problem) = backend.storage_problem(&name, &spec, &table) {
                    found.insert(name, problem);
                }
            }
            Some(found)
        })
        .await;
        let found = match found {
            Ok(Some(f)) => f,
            Ok(None) => return 0,
            Err(e) => {
                tracing::warn!(error = %e, "the storage check failed");
                return 0;
            }
        };
        let mut problems = self.storage_problems.lock().recover();
        for (name, problem) in &found {
            if problems.get(name) != Some(problem) {
                tracing::error!(volume = %name, problem = %problem, "the volume's storage has a problem");
            }
        }
        for name in problems.keys() {
            if !found.contains_key(name) {
                tracing::info!(volume = %name, "the volume's storage problem is gone");
            }
        }
        let n = found.len();
        *problems = found;
        n
    }

    /// Forgets a recorded failure once the storage was prepared or released successfully.
    fn healthy(&self, name: &str) {
        self.failures.lock().recover().remove(name);
    }

    fn backend_error(name: &str) -> impl FnOnce(BackendError) -> ServiceError + '_ {
        move |source| ServiceError::Backend {
            name: name.to_string(),
            source,
        }
    }

    /// Creates a volume, or succeeds if it exists with the same options.
    pub async fn create(&self, name: &str, opts: Option<&BTreeMap<String, String>>) -> Result<()> {
        spec::validate_name(name)?;
        let spec = VolumeSpec::from_options(opts, &self.defaults)?;
        let _guard = self.lock_synced(name).await?;
        if let Some(c) = self.cluster.clone() {
            return self.create_in_cluster(&c, name, spec).await;
        }
        self.create_locked(name, spec).await
    }

    /// Creates a volume on this host; the caller holds its lock.
    async fn create_locked(&self, name: &str, spec: VolumeSpec) -> Result<()> {
        if let Some(existing) = self.lookup(name) {
            let rec = &existing.value;
            match rec.state {
                // Every operation finishes under the lock we hold, so these are leftovers of one whose
                // cleanup failed (at start-up or after a failed create): finish it, then create afresh.
                VolumeState::Creating | VolumeState::Removing => {
                    let backend = self.backend(rec.spec.kind())?.clone();
                    Self::finish_leftover(&backend, name, rec)
                        .await
                        .map_err(|e| self.failed(name, e))?;
                    self.forget(name, existing.version).await?;
                    tracing::info!(
                        volume = name,
                        state = rec.state.as_str(),
                        "finished a leftover operation before creating"
                    );
                }
                _ => {
                    return match rec.spec.first_difference(&spec) {
                        Some(option) => Err(ServiceError::Conflict {
                            name: name.into(),
                            option,
                        }),
                        None => Ok(()),
                    }
                }
            }
        }
        let backend = self.backend(spec.kind())?.clone();
        // Refuse data Ferry does not own before recording anything: a crash after the record is written
        // rolls the create back, and that must never delete someone else's files.
        backend
            .preflight(name, &spec)
            .map_err(|e| self.failed(name, e))?;
        let mut record = VolumeRecord {
            name: name.to_string(),
            spec: spec.clone(),
            created_at: now_secs(),
            state: VolumeState::Creating,
            mounts: BTreeMap::new(),
            mountpoint: None,
            shipped: None,
            dead_mounts: Default::default(),
        };
        let creating = self.store(record.clone(), Expect::Absent).await?;
        match backend.create(name, &spec).await {
            Ok(adopted) => record.shipped = adopted,
            Err(e) => {
                // Roll back so a retry starts clean; an orphan directory is not ours to delete, and data
                // another host shipped is never deleted by a create that failed to adopt it.
                if !matches!(e, BackendError::Orphan { .. }) {
                    if let Err(cleanup) = backend.abandon(name, &spec).await {
                        tracing::warn!(volume = name, error = %cleanup, "cleanup after a failed create failed");
                    }
                }
                self.forget(name, creating.version).await?;
                return Err(self.failed(name, e));
            }
        }
        if let Some(s) = &record.shipped {
            tracing::info!(
                volume = name,
                snapshot = %s.snapshot,
                generation = s.generation,
                "adopted a volume another host shipped"
            );
        }
        record.state = VolumeState::Ready;
        self.store(record, Expect::Version(creating.version))
            .await?;
        self.healthy(name);
        tracing::info!(volume = name, backend = %spec.kind(), "volume created");
        Ok(())
    }

    /// Removes a volume and its data; refuses while any mount ID is active.
    pub async fn remove(&self, name: &str) -> Result<()> {
        spec::validate_name(name)?;
        self.refuse_while_recovering(name)?;
        let _guard = self.lock_synced(name).await?;
        if let Some(c) = self.cluster.clone() {
            return self.remove_in_cluster(&c, name).await;
        }
        self.remove_locked(name).await
    }

    /// Removes a volume of this host's catalog; the caller holds its lock.
    async fn remove_locked(&self, name: &str) -> Result<()> {
        let entry = self
            .lookup(name)
            .ok_or_else(|| ServiceError::NotFound(name.into()))?;
        let mut rec = entry.value.clone();
        // A record still Creating under the lock is the leftover of a create whose rollback failed; removing
        // it is exactly what finishes that rollback.
        let backend = self.backend(rec.spec.kind())?.clone();
        let mounts = rec.active_mounts();
        if mounts > 0 {
            // Mount IDs of containers that stopped while Ferry was down never get their Unmount; they are
            // dropped when the kernel shows that nothing holds the storage any more.
            if !Self::provably_unheld(&backend, name, &rec.spec).await {
                return Err(ServiceError::InUse {
                    name: name.into(),
                    mounts,
                });
            }
            tracing::warn!(
                volume = name,
                mount_ids = ?rec.mounts.keys().collect::<Vec<_>>(),
                "released mount IDs left by containers that stopped while Ferry was down: no mount namespace holds the volume's storage"
            );
            rec.mounts.clear();
        }
        let rec = &rec;
        let mut removing = rec.clone();
        removing.state = VolumeState::Removing;
        let marked = self
            .store(removing.clone(), Expect::Version(entry.version))
            .await?;
        if let Err(e) = Self::finish_leftover(&backend, name, rec).await {
            removing.state = VolumeState::Ready;
            self.store(removing, Expect::Version(marked.version))
                .await?;
            return Err(self.failed(name, e));
        }
        self.forget(name, marked.version).await?;
        self.healthy(name);
        tracing::info!(volume = name, "volume removed");
        Ok(())
    }

    /// Where the volume's storage is mounted outside Ferry's mount namespace, from the backend (`None`:
    /// it cannot tell).
    async fn holders_of(
        backend: &Arc<dyn Backend>,
        name: &str,
        spec: &VolumeSpec,
    ) -> Option<std::result::Result<Vec<crate::mount::Holder>, BackendError>> {
        let (backend, name, spec) = (backend.clone(), name.to_string(), spec.clone());
        match tokio::task::spawn_blocking(move || backend.holders(&name, &spec)).await {
            Ok(h) => h,
            Err(e) => Some(Err(BackendError::Internal(
                BackendKind::Local,
                format!("the scan of mount namespaces failed: {e}"),
            ))),
        }
    }

    /// Whether the kernel proves that no mount namespace but Ferry's holds the volume's storage; a backend
    /// that cannot tell, or a scan that failed, proves nothing.
    async fn provably_unheld(backend: &Arc<dyn Backend>, name: &str, spec: &VolumeSpec) -> bool {
        match Self::holders_of(backend, name, spec).await {
            Some(Ok(holders)) => {
                for h in &holders {
                    tracing::info!(volume = name, holder = %h, "the volume's storage is still mounted in another mount namespace");
                }
                holders.is_empty()
            }
            Some(Err(e)) => {
                tracing::warn!(volume = name, error = %e, "cannot tell whether a container still holds the volume");
                false
            }
            None => false,
        }
    }

    /// Drops mount IDs on an operator's word (`ferry release`): all of them, or only `id`. Refuses while
    /// another mount namespace still has the storage mounted, unless `force`. The last one gone releases
    /// the storage as the last Unmount would.
    pub async fn release(
        &self,
        name: &str,
        id: Option<&str>,
        force: bool,
    ) -> Result<ReleaseReport> {
        spec::validate_name(name)?;
        if let Some(id) = id {
            validate_mount_id(id)?;
        }
        let guard = self.lock_synced(name).await?;
        let entry = self
            .lookup(name)
            .ok_or_else(|| ServiceError::NotFound(name.into()))?;
        let mut rec = entry.value.clone();
        let mut report = ReleaseReport {
            name: name.into(),
            ..Default::default()
        };
        let released: Vec<String> = match id {
            Some(id) if !rec.mounts.contains_key(id) => {
                return Err(ServiceError::UnknownMountId {
                    name: name.into(),
                    id: id.into(),
                })
            }
            Some(id) => vec![id.to_string()],
            None => rec.mounts.keys().cloned().collect(),
        };
        if released.is_empty() {
            return Ok(report);
        }
        let backend = self.backend(rec.spec.kind())?.clone();
        match Self::holders_of(&backend, name, &rec.spec).await {
            Some(Ok(holders)) if !holders.is_empty() => {
                let holders: Vec<String> = holders.iter().map(ToString::to_string).collect();
                if !force {
                    return Err(ServiceError::Held {
                        name: name.into(),
                        holders: holders.join(", "),
                    });
                }
                report.forced_past = holders;
            }
            Some(Ok(_)) => {}
            // Not a failure of the volume: its health stays as it is.
            Some(Err(source)) if !force => {
                return Err(ServiceError::Backend {
                    name: name.into(),
                    source,
                })
            }
            // Without force, a backend that cannot tell is released on the operator's word alone.
            Some(Err(_)) | None => {}
        }
        for id in &released {
            rec.mounts.remove(id);
        }
        tracing::warn!(
            volume = name,
            mount_ids = ?released,
            forced_past = ?report.forced_past,
            "mount IDs released by the operator"
        );
        report.released = released;
        report.detached = rec.mounts.is_empty() && rec.mountpoint.is_some();
        // The operator sees a failure and can repeat the command, so nothing is kept for later.
        self.finish_unmount(guard, &entry, rec, &[]).await?;
        Ok(report)
    }

    /// Mounts a volume for one Docker mount ID and returns where its data is.
    pub async fn mount(&self, name: &str, id: &str) -> Result<PathBuf> {
        spec::validate_name(name)?;
        validate_mount_id(id)?;
        self.refuse_while_recovering(name)?;
        let guard = self.lock_synced(name).await?;
        if let Some(c) = &self.cluster {
            self.prepare_cluster_mount(c, name).await?;
        }
        let entry = self
            .lookup(name)
            .ok_or_else(|| ServiceError::NotFound(name.into()))?;
        let mut rec = entry.value.clone();
        // Under the volume's lock no operation is running, so Attaching or Detaching here is the trace of
        // one whose last catalog write failed; attach is idempotent, so carry on rather than stay stuck.
        if matches!(rec.state, VolumeState::Creating | VolumeState::Removing) {
            return Err(ServiceError::Busy {
                name: name.into(),
                state: rec.state.as_str(),
            });
        }
        if let Some(mut mountpoint) = rec.mountpoint.clone() {
            if let Some(c) = &self.cluster {
                if c.is_fenced(name) {
                    return Err(crate::cluster::ClusterError::Refused(format!(
                        "volume {name} is fenced on this host (it lost its lease): writes to it fail; stop its containers here, then mount it again"
                    ))
                    .into());
                }
            }
            let backend = self.backend(rec.spec.kind())?.clone();
            // Attached for other containers, but what attach set up can die under them (a FUSE helper
            // killed by the OOM killer): give this container working storage instead of a dead mount.
            let table = self
                .mounter
                .mount_table()
                .map_err(|e| self.failed(name, BackendError::Mount(e)))?;
            if backend.is_attached(name, &rec.spec, &table) == Some(false) {
                tracing::warn!(
                    volume = name,
                    "storage attached for other containers was lost; attaching it again"
                );
                let attached = backend
                    .attach(name, &rec.spec, rec.shipped.as_ref())
                    .await
                    .map_err(|e| self.failed(name, e))?;
                mountpoint = attached.path;
                rec.shipped = attached.shipped;
                rec.mountpoint = Some(mountpoint.clone());
                if backend.loss_strands_mounts(&rec.spec) {
                    // The containers mounted so far keep the dead mount: health says so until they go.
                    rec.dead_mounts.extend(rec.mounts.keys().cloned());
                }
                self.healthy(name);
            }
            *rec.mounts.entry(id.to_string()).or_insert(0) += 1;
            // What a failed catalog write left (detaching, with the storage still attached) ends here.
            rec.state = VolumeState::Ready;
            let pending = self.store_queued(rec, Expect::Version(entry.version));
            drop(guard);
            self.settle(name, pending, None).await?;
            return Ok(mountpoint);
        }
        let backend = self.backend(rec.spec.kind())?.clone();
        // Cluster mode: this host's use of the volume is recorded, and a single writer's ownership taken,
        // before anything is attached; the newest published generation is what attach starts from.
        let claimed = match &self.cluster {
            Some(c) => Some(self.claim_for_mount(c, &mut rec).await?),
            None => None,
        };
        rec.state = VolumeState::Attaching;
        let marked = match self
            .store(rec.clone(), Expect::Version(entry.version))
            .await
        {
            Ok(m) => m,
            Err(e) => {
                self.unclaim(claimed.as_ref(), name).await;
                return Err(e);
            }
        };
        let attached = backend.attach(name, &rec.spec, rec.shipped.as_ref()).await;
        rec.state = VolumeState::Ready;
        let path = match attached {
            Ok(a) => {
                rec.shipped = a.shipped;
                a.path
            }
            Err(e) => {
                self.unclaim(claimed.as_ref(), name).await;
                self.store(rec, Expect::Version(marked.version)).await?;
                return Err(self.failed(name, e));
            }
        };
        *rec.mounts.entry(id.to_string()).or_insert(0) += 1;
        rec.mountpoint = Some(path.clone());
        if let Err(e) = self
            .store(rec.clone(), Expect::Version(marked.version))
            .await
        {
            // Docker sends no Unmount for a failed Mount, so undo the attach now.
            if let Err(d) = backend.detach(name, &rec.spec, rec.shipped.as_ref()).await {
                tracing::warn!(volume = name, error = %d, "detach after a failed mount failed");
            } else {
                self.unclaim(claimed.as_ref(), name).await;
            }
            return Err(e);
        }
        self.healthy(name);
        // Attaching checked the storage (a filesystem marked for a check was checked and repaired); what
        // the last health pass found is out of date until the next one.
        self.storage_problems.lock().recover().remove(name);
        tracing::info!(volume = name, mountpoint = %path.display(), "storage prepared");
        Ok(path)
    }

    /// Drops one mount of a mount ID; the last mount of the volume releases its storage. An unknown ID is
    /// not an error: Docker may repeat an Unmount after a crash.
    pub async fn unmount(&self, name: &str, id: &str) -> Result<()> {
        spec::validate_name(name)?;
        validate_mount_id(id)?;
        let guard = match self.lock_synced(name).await {
            Ok(g) => g,
            Err(e) => {
                // Docker will not send this Unmount again: keep it for when the catalog works.
                if matches!(e, ServiceError::Catalog { .. }) {
                    self.owe_unmounts(name, &[id.to_string()], u64::MAX);
                }
                return Err(e);
            }
        };
        let entry = self
            .lookup(name)
            .ok_or_else(|| ServiceError::NotFound(name.into()))?;
        let mut rec = entry.value.clone();
        let Some(count) = rec.mounts.get_mut(id) else {
            tracing::debug!(
                volume = name,
                mount_id = id,
                "unmount of an unknown mount ID"
            );
            return Ok(());
        };
        *count -= 1;
        if *count == 0 {
            rec.mounts.remove(id);
            rec.dead_mounts.remove(id);
        }
        self.finish_unmount(guard, &entry, rec, &[id.to_string()])
            .await
    }

    /// Stores a record whose mount IDs were dropped, and releases the storage when none is left. `owing`
    /// are the mount IDs of Docker's Unmount, kept for later if the catalog cannot record their drop.
    async fn finish_unmount(
        &self,
        guard: VolumeGuard<'_>,
        entry: &Versioned<VolumeRecord>,
        rec: VolumeRecord,
        owing: &[String],
    ) -> Result<()> {
        let name = entry.value.name.as_str();
        if !rec.mounts.is_empty() || rec.mountpoint.is_none() {
            let pending = self.store_queued(rec, Expect::Version(entry.version));
            drop(guard);
            return self
                .settle(name, pending, Some((owing, entry.version + 1)))
                .await;
        }
        self.release_storage(entry, rec, owing).await
    }

    /// Releases the storage of a volume no mount is left on, recording each step; the caller holds the
    /// volume's lock. `owing` as for `finish_unmount`.
    async fn release_storage(
        &self,
        entry: &Versioned<VolumeRecord>,
        mut rec: VolumeRecord,
        owing: &[String],
    ) -> Result<()> {
        let name = entry.value.name.as_str();
        let backend = self.backend(rec.spec.kind())?.clone();
        rec.state = VolumeState::Detaching;
        let marked = match self
            .store(rec.clone(), Expect::Version(entry.version))
            .await
        {
            Ok(m) => m,
            Err(e) => {
                if matches!(e, ServiceError::Catalog { .. }) {
                    self.owe_unmounts(name, owing, entry.version + 1);
                }
                return Err(e);
            }
        };
        let detached = backend.detach(name, &rec.spec, rec.shipped.as_ref()).await;
        rec.state = VolumeState::Ready;
        match detached {
            Ok(shipped) => rec.shipped = shipped,
            Err(e) => {
                // Keep the storage attached but idle: the next Mount reuses it, and Remove or a restart
                // releases it. Keeping the ID would leave the volume "in use" forever. A backend may have
                // released its storage before it failed (ebs unmounts, then fails to ship): then nothing
                // is attached, and saying otherwise would read as storage lost under containers.
                if let Ok(table) = self.mounter.mount_table() {
                    if backend.is_attached(name, &rec.spec, &table) == Some(false) {
                        rec.mountpoint = None;
                    }
                }
                let released = rec.mountpoint.is_none();
                self.store(rec, Expect::Version(marked.version)).await?;
                // A fenced host's storage is released with its changes kept: its claim is over either way.
                if released && e.kind() == "fenced" {
                    self.give_back(name).await;
                }
                return Err(self.failed(name, e));
            }
        }
        rec.mountpoint = None;
        self.store(rec, Expect::Version(marked.version)).await?;
        self.give_back(name).await;
        self.healthy(name);
        tracing::info!(volume = name, "storage released");
        Ok(())
    }

    /// Deletes a volume's storage: all of it for a volume being removed (or a ready one), only what this
    /// host made for one still being created, whose data may belong to another host (an adopted ebs volume).
    async fn finish_leftover(
        backend: &Arc<dyn Backend>,
        name: &str,
        rec: &VolumeRecord,
    ) -> std::result::Result<(), BackendError> {
        if rec.state == VolumeState::Creating {
            backend.abandon(name, &rec.spec).await
        } else {
            backend.remove(name, &rec.spec).await
        }
    }

    fn visible(rec: &VolumeRecord) -> bool {
        !matches!(rec.state, VolumeState::Creating | VolumeState::Removing)
    }

    /// The current mountpoint, or `None` when the volume is not mounted. Answered from memory.
    pub fn path(&self, name: &str) -> Result<Option<PathBuf>> {
        spec::validate_name(name)?;
        let Some(entry) = self.lookup(name).filter(|e| Self::visible(&e.value)) else {
            // Defined by another host and never mounted here.
            self.cluster_only(name)?;
            return Ok(None);
        };
        Ok(entry.value.mountpoint.clone())
    }

    /// Everything Docker shows in `docker volume inspect`. Answered from memory.
    pub fn get(&self, name: &str) -> Result<VolumeInfo> {
        spec::validate_name(name)?;
        let Some(entry) = self.lookup(name).filter(|e| Self::visible(&e.value)) else {
            let def = self.cluster_only(name)?;
            return Ok(self.cluster_info(&def));
        };
        let rec = &entry.value;
        let mut status = Map::new();
        status.insert("backend".into(), json!(rec.spec.kind().as_str()));
        status.insert(
            "options".into(),
            json!(spec::redact(&rec.spec.to_options())),
        );
        status.insert("state".into(), json!(rec.state.as_str()));
        status.insert("active_mounts".into(), json!(rec.active_mounts()));
        status.insert("mount_ids".into(), json!(rec.mounts.len()));
        let (health, failure) = self.health_of(rec);
        status.insert("health".into(), json!(health));
        if let Some(f) = failure {
            status.insert("last_error".into(), json!(f));
        }
        status.extend(self.backend_status(rec));
        self.add_cluster_status(name, &mut status);
        Ok(VolumeInfo {
            name: rec.name.clone(),
            mountpoint: rec.mountpoint.clone(),
            created_at: rec.created_at,
            status,
        })
    }

    /// Everything known about one volume, for the operator. Answered from memory, like Get, and shows
    /// volumes in every state (a stuck create or remove is exactly what an operator looks for).
    pub fn report(&self, name: &str) -> Result<VolumeReport> {
        spec::validate_name(name)?;
        let Some(entry) = self.lookup(name) else {
            let def = self.cluster_only(name)?;
            return Ok(self.cluster_report(&def));
        };
        Ok(self.report_of(&entry))
    }

    /// Health comes from what Ferry already knows (the last backend failure and the state); nothing probes
    /// storage or a server for it.
    fn health_of(&self, rec: &VolumeRecord) -> (&'static str, Option<String>) {
        // A conflict the backend keeps durably outlives restarts and outranks the last failure, which
        // is usually the same conflict as seen by the last operation.
        if let Some(problem) = self
            .backends
            .get(&rec.spec.kind())
            .and_then(|b| b.problem(&rec.name))
        {
            return ("conflict", Some(problem));
        }
        if let Some(why) = self.import_conflicts.lock().recover().get(&rec.name) {
            return ("conflict", Some(why.clone()));
        }
        if self
            .cluster
            .as_ref()
            .is_some_and(|c| rec.mountpoint.is_some() && c.is_fenced(&rec.name))
        {
            return (
                "fenced",
                Some("this host lost its claim on the volume (its lease could not be renewed in time): writes fail, and what was written here is kept, never published; stop its containers here".into()),
            );
        }
        let failure = self.failures.lock().recover().get(&rec.name).cloned();
        let failure = failure.or_else(|| {
            self.storage_problems
                .lock()
                .recover()
                .get(&rec.name)
                .cloned()
        });
        // Storage attached again serves new containers, but those that held the lost one stay broken.
        let dead = rec.dead_mount_ids();
        let failure = failure.or_else(|| {
            (dead > 0).then(|| {
                format!(
                    "lost: {dead} container mount(s) have a dead connection to storage that was lost and attached again; restart those containers"
                )
            })
        });
        let health = match (&failure, rec.state) {
            (Some(_), _) => "error",
            (None, VolumeState::Ready) => "ok",
            (None, _) => "busy",
        };
        (health, failure)
    }

    /// `report` for every volume, in name order.
    pub fn reports(&self) -> Vec<VolumeReport> {
        let entries: Vec<_> = self.view.read().recover().values().cloned().collect();
        let mut out: Vec<VolumeReport> = entries.iter().map(|e| self.report_of(e)).collect();
        out.extend(
            self.cluster_only_definitions()
                .iter()
                .map(|d| self.cluster_report(d)),
        );
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn report_of(&self, entry: &Versioned<VolumeRecord>) -> VolumeReport {
        let rec = &entry.value;
        let (health, last_error) = self.health_of(rec);
        VolumeReport {
            name: rec.name.clone(),
            backend: rec.spec.kind().as_str().into(),
            state: rec.state.as_str().into(),
            health: health.into(),
            last_error,
            mountpoint: rec.mountpoint.clone(),
            active_mounts: rec.active_mounts(),
            mount_ids: rec.mounts.clone(),
            created_at: rec.created_at,
            options: spec::redact(&rec.spec.to_options()),
            catalog_version: entry.version,
            backend_status: self.backend_status(rec),
            cluster: self.cluster.as_ref().and_then(|c| c.info(&rec.name)),
        }
    }

    /// The backend's own facts, plus the newest snapshot the catalog records for backends that ship data.
    fn backend_status(&self, rec: &VolumeRecord) -> Map<String, Value> {
        let mut m = self
            .backends
            .get(&rec.spec.kind())
            .map(|b| b.status(&rec.name, &rec.spec))
            .unwrap_or_default();
        if let Some(s) = &rec.shipped {
            m.insert("snapshot".into(), json!(s.snapshot));
            m.insert("generation".into(), json!(s.generation));
        }
        m
    }

    /// Asks every configured backend whether it is usable now, all at once, each within `deadline`. For
    /// the operator only: it may wait on storage or a network, which Get/List/Path never do.
    pub async fn check_backends(&self, deadline: Duration) -> Vec<BackendReport> {
        let mut set = tokio::task::JoinSet::new();
        for (order, (kind, backend)) in self.backends.iter().enumerate() {
            let (kind, backend) = (*kind, backend.clone());
            let default = kind == self.defaults.backend;
            set.spawn(async move {
                let started = std::time::Instant::now();
                let (reachable, error, details) =
                    match tokio::time::timeout(deadline, backend.check()).await {
                        Ok(Ok(details)) => (true, None, details),
                        Ok(Err(e)) => (false, Some(e.to_string()), Map::new()),
                        Err(_) => (
                            false,
                            Some(format!(
                                "the {} backend did not answer within {} s",
                                kind.as_str(),
                                deadline.as_secs()
                            )),
                            Map::new(),
                        ),
                    };
                let report = BackendReport {
                    backend: kind.as_str().into(),
                    default,
                    reachable,
                    error,
                    details,
                    checked_in_ms: started.elapsed().as_millis() as u64,
                };
                (order, report)
            });
        }
        let mut out: Vec<(usize, BackendReport)> = Vec::new();
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok(r) => out.push(r),
                Err(e) => tracing::warn!(error = %e, "a backend check panicked"),
            }
        }
        out.sort_by_key(|(order, _)| *order);
        out.into_iter().map(|(_, r)| r).collect()
    }

    /// Every volume, in name order. Answered from memory.
    pub fn list(&self) -> Vec<VolumeSummary> {
        let mut out: Vec<VolumeSummary> = self
            .view
            .read()
            .recover()
            .values()
            .filter(|e| Self::visible(&e.value))
            .map(|e| VolumeSummary {
                name: e.value.name.clone(),
                mountpoint: e.value.mountpoint.clone(),
            })
            .collect();
        if self.cluster.is_some() {
            out.extend(
                self.cluster_only_definitions()
                    .into_iter()
                    .map(|d| VolumeSummary {
                        name: d.record.name,
                        mountpoint: None,
                    }),
            );
            out.sort_by(|a, b| a.name.cmp(&b.name));
        }
        out
    }

    /// Brings the catalog and the mount table into agreement: interrupted creates are rolled back,
    /// interrupted removes finished, surviving mounts adopted, lost ones redone and idle ones released.
    async fn reconcile(&self) -> Result<ReconcileReport> {
        let table = {
            let m = self.mounter.clone();
            tokio::task::spawn_blocking(move || m.mount_table())
                .await
                .map_err(|e| ServiceError::Internal(e.to_string()))?
                .map_err(|e: MountError| ServiceError::Internal(e.to_string()))?
        };
        let entries: Vec<_> = self.view.read().recover().values().cloned().collect();
        let mut report = ReconcileReport {
            volumes: entries.len(),
            ..Default::default()
        };
        for entry in entries {
            let name = entry.value.name.clone();
            if self.is_slow_to_reconcile(&entry.value, &table) {
                tracing::info!(volume = %name, state = entry.value.state.as_str(),
                    "an interrupted push or pull finishes in the background; the volume is busy until then");
                self.recovering.lock().recover().insert(name);
                report.deferred += 1;
                continue;
            }
            if let Err(e) = self.reconcile_one(&entry, &table, &mut report).await {
                report.failed += 1;
                tracing::error!(volume = %name, error = %e, "reconciliation failed; the volume is left as it was");
            }
        }
        Ok(report)
    }

    /// Whether reconciling the record may push or pull over the network: an attach or detach that was
    /// interrupted, or a lost attach to redo, on a backend that ships data.
    fn is_slow_to_reconcile(&self, rec: &VolumeRecord, table: &crate::mount::MountTable) -> bool {
        let Some(backend) = self.backends.get(&rec.spec.kind()) else {
            return false;
        };
        if !backend.ships_data() {
            return false;
        }
        match rec.state {
            VolumeState::Attaching | VolumeState::Detaching => true,
            VolumeState::Ready => {
                !rec.mounts.is_empty()
                    && backend.is_attached(&rec.name, &rec.spec, table) == Some(false)
            }
            VolumeState::Creating | VolumeState::Removing => false,
        }
    }

    async fn reconcile_one(
        &self,
        entry: &Versioned<VolumeRecord>,
        table: &crate::mount::MountTable,
        report: &mut ReconcileReport,
    ) -> Result<()> {
        let rec = &entry.value;
        let name = rec.name.as_str();
        let backend = self.backend(rec.spec.kind())?.clone();
        match rec.state {
            VolumeState::Creating | VolumeState::Removing => {
                if let Err(e) = Self::finish_leftover(&backend, name, rec).await {
                    if rec.state == VolumeState::Removing {
                        // Show the volume again so Docker sends Remove again, instead of hiding it until the
                        // next restart.
                        let mut back = rec.clone();
                        back.state = VolumeState::Ready;
                        self.store(back, Expect::Version(entry.version)).await?;
                    }
                    return Err(self.failed(name, e));
                }
                self.forget(name, entry.version).await?;
                if rec.state == VolumeState::Creating {
                    report.rolled_back += 1;
                    tracing::warn!(volume = name, "rolled back a create interrupted by a crash");
                } else {
                    report.removed += 1;
                    tracing::warn!(volume = name, "finished a remove interrupted by a crash");
                }
                return Ok(());
            }
            VolumeState::Ready | VolumeState::Attaching | VolumeState::Detaching => {}
        }
        let mut next = rec.clone();
        next.state = VolumeState::Ready;
        let attached = backend.is_attached(name, &rec.spec, table);
        // Containers that stopped while Ferry was down left their mount IDs behind (Docker does not retry
        // an Unmount); drop them when the kernel shows nothing holds the storage any more.
        if !rec.mounts.is_empty() && Self::provably_unheld(&backend, name, &rec.spec).await {
            tracing::warn!(
                volume = name,
                mount_ids = ?rec.mounts.keys().collect::<Vec<_>>(),
                "released mount IDs left by containers that stopped while Ferry was down: no mount namespace holds the volume's storage"
            );
            report.stale_ids_released += rec.mounts.len();
            next.mounts.clear();
        }
        if !next.mounts.is_empty() {
            // Containers may still hold this volume: keep it attached, redoing the attach if it was lost.
            let attached_now = backend
                .attach(name, &rec.spec, rec.shipped.as_ref())
                .await
                .map_err(Self::backend_error(name))?;
            let path = attached_now.path;
            next.shipped = attached_now.shipped;
            if attached != Some(false) {
                report.adopted += 1;
            } else {
                report.remounted += 1;
                tracing::warn!(
                    volume = name,
                    "storage was not attached after restart; attached it again"
                );
                if backend.loss_strands_mounts(&rec.spec) {
                    next.dead_mounts.extend(rec.mounts.keys().cloned());
                }
            }
            next.mountpoint = Some(path);
        } else {
            if attached == Some(true) || rec.mountpoint.is_some() || rec.state != VolumeState::Ready
            {
                next.shipped = backend
                    .detach(name, &rec.spec, rec.shipped.as_ref())
                    .await
                    .map_err(Self::backend_error(name))?;
                report.released += 1;
            }
            next.mountpoint = None;
        }
        if next != *rec {
            self.store(next, Expect::Version(entry.version)).await?;
        }
        Ok(())
    }

    /// Runs one call with a deadline. The call itself runs to completion in the background even when the
    /// deadline passes or the caller goes away, so no operation is ever left half-done by a cancellation.
    pub async fn with_deadline<T, F>(
        &self,
        op: &'static str,
        name: &str,
        deadline: Duration,
        fut: F,
    ) -> Result<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        let task = self.tasks.spawn(fut);
        match tokio::time::timeout(deadline, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(join)) => Err(ServiceError::Internal(format!("{op} task failed: {join}"))),
            Err(_) => Err(ServiceError::Timeout {
                op,
                name: name.to_string(),
                secs: deadline.as_secs(),
            }),
        }
    }

    /// Mounts for a Docker caller who waits at most `deadline`. Docker sends no Unmount for a Mount it
    /// considers failed, so a mount that completes after the caller gave up (deadline passed, connection
    /// closed) is undone at once; otherwise its mount ID would keep the volume "in use" for ever.
    pub async fn mount_for_caller(
        self: &Arc<Self>,
        name: &str,
        id: &str,
        deadline: Duration,
    ) -> Result<PathBuf> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let svc = self.clone();
        let (n, i) = (name.to_string(), id.to_string());
        self.tasks.spawn(async move {
            let result = svc.mount(&n, &i).await;
            if let Err(Ok(_)) = tx.send(result) {
                tracing::warn!(volume = %n, mount_id = %i, "the caller gave up before the mount finished; undoing it");
                if let Err(e) = svc.unmount(&n, &i).await {
                    tracing::error!(volume = %n, error = %e, "cannot undo an abandoned mount");
                }
            }
        });
        match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ServiceError::Internal(
                "mount task ended without a result".into(),
            )),
            Err(_) => Err(ServiceError::Timeout {
                op: "mount",
                name: name.to_string(),
                secs: deadline.as_secs(),
            }),
        }
    }

    /// Waits, up to `limit`, for operations that outlived their callers; used at shutdown.
    pub async fn finish_background_work(&self, limit: Duration) {
        self.tasks.close();
        if tokio::time::timeout(limit, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("operations still running at shutdown were abandoned");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalBackend;
    use crate::catalog::RedbCatalog;
    use crate::mount::{Call, RecordingMounter};

    /// Note for counting calls: creating a capped volume mounts and unmounts its image once, to measure the
    /// new filesystem's free space.
    struct Fixture {
        dir: tempfile::TempDir,
        mounter: Arc<RecordingMounter>,
    }

    impl Fixture {
        fn new() -> Self {
            Fixture {
                dir: tempfile::tempdir().unwrap(),
                mounter: Arc::new(RecordingMounter::default()),
            }
        }

        async fn start(&self) -> (Arc<VolumeService>, ReconcileReport) {
            let catalog =
                Arc::new(RedbCatalog::open(&self.dir.path().join("catalog.redb")).unwrap());
            let local = Arc::new(
                LocalBackend::new(self.dir.path().join("local"), self.mounter.clone()).unwrap(),
            );
            VolumeService::start(
                catalog,
                vec![local],
                self.mounter.clone(),
                SpecDefaults::default(),
            )
            .await
            .unwrap()
        }
    }

    fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn create_is_idempotent_and_names_conflicts() {
        let f = Fixture::new();
        let (svc, _) = f.start().await;
        svc.create("v", Some(&opts(&[("size", "1G")])))
            .await
            .unwrap();
        svc.create("v", Some(&opts(&[("size", "1GiB"), ("fs", "ext4")])))
            .await
            .unwrap();
        let err = svc
            .create("v", Some(&opts(&[("size", "2G")])))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("\"size\""), "{err}");
        assert_eq!(f.mounter.count(|c| matches!(c, Call::Format { .. })), 1);
        assert!(matches!(
            svc.create("../x", None).await,
            Err(ServiceError::InvalidSpec(_))
        ));
    }

    #[tokio::test]
    async fn mounts_are_counted_per_id() {
        let f = Fixture::new();
        let (svc, _) = f.start().await;
        svc.create("v", Some(&opts(&[("size", "64M")])))
            .await
            .unwrap();
        let p1 = svc.mount("v", "a").await.unwrap();
        let p2 = svc.mount("v", "a").await.unwrap();
        assert_eq!(p1, p2);
        assert_eq!(svc.path("v").unwrap(), Some(p1.clone()));
        // The container holds the volume, so Remove refuses.
        f.mounter
            .hold_elsewhere(&f.dir.path().join("local/v/disk.img"));
        assert!(matches!(
            svc.remove("v").await,
            Err(ServiceError::InUse { mounts: 2, .. })
        ));
        svc.unmount("v", "unknown").await.unwrap();
        svc.unmount("v", "a").await.unwrap();
        assert_eq!(
            f.mounter.count(|c| matches!(c, Call::Unmount { .. })),
            1,
            "docker cp's unmount must not release"
        );
        svc.unmount("v", "a").await.unwrap();
        assert_eq!(f.mounter.count(|c| matches!(c, Call::Mount { .. })), 2);
        assert_eq!(f.mounter.count(|c| matches!(c, Call::Unmount { .. })), 2);
        assert_eq!(svc.path("v").unwrap(), None);
        svc.remove("v").await.unwrap();
        assert!(matches!(svc.get("v"), Err(ServiceError::NotFound(_))));
    }

    #[tokio::test]
    async fn concurrent_mounts_prepare_and_release_once() {
        let f = Fixture::new();
        let (svc, _) = f.start().await;
        svc.create("v", Some(&opts(&[("size", "64M")])))
            .await
            .unwrap();
        let mounts: Vec<_> = (0..50)
            .map(|i| {
                let svc = svc.clone();
                tokio::spawn(async move { svc.mount("v", &format!("id{i}")).await })
            })
            .collect();
        for m in mounts {
            m.await.unwrap().unwrap();
        }
        assert_eq!(svc.get("v").unwrap().status["active_mounts"], 50);
        let unmounts: Vec<_> = (0..50)
            .map(|i| {
                let svc = svc.clone();
                tokio::spawn(async move { svc.unmount("v", &format!("id{i}")).await })
            })
            .collect();
        for u in unmounts {
            u.await.unwrap().unwrap();
        }
        assert_eq!(f.mounter.count(|c| matches!(c, Call::Mount { .. })), 2);
        assert_eq!(f.mounter.count(|c| matches!(c, Call::Unmount { .. })), 2);
        assert_eq!(svc.get("v").unwrap().status["active_mounts"], 0);
    }

    #[tokio::test]
    async fn failed_mount_leaves_no_trace() {
        let f = Fixture::new();
        let (svc, _) = f.start().await;
        svc.create("v", Some(&opts(&[("size", "64M")])))
            .await
            .unwrap();
        f.mounter.fail_next_mount();
        assert!(matches!(
            svc.mount("v", "a").await,
            Err(ServiceError::Backend { .. })
        ));
        let info = svc.get("v").unwrap();
        assert_eq!(info.status["active_mounts"], 0);
        assert_eq!(info.status["state"], "ready");
        assert_eq!(info.status["health"], "error");
        assert!(info.status["last_error"]
            .as_str()
            .unwrap()
            .contains("cannot mount"));
        svc.mount("v", "a").await.unwrap();
        assert_eq!(svc.get("v").unwrap().status["health"], "ok");
        assert!(svc.get("v").unwrap().status.get("last_error").is_none());
        svc.unmount("v", "a").await.unwrap();
        svc.remove("v").await.unwrap();
    }

    #[tokio::test]
    async fn restart_adopts_remounts_and_releases() {
        let f = Fixture::new();
        {
            let (svc, _) = f.start().await;
            for v in ["kept", "lost", "idle"] {
                svc.create(v, Some(&opts(&[("size", "64M")])))
                    .await
                    .unwrap();
            }
            svc.create("dir", None).await.unwrap();
            svc.mount("kept", "a").await.unwrap();
            svc.mount("dir", "b").await.unwrap();
        }
        // Containers still use "kept" and "dir".
        let local = f.dir.path().join("local");
        f.mounter.hold_elsewhere(&local.join("kept/disk.img"));
        f.mounter.hold_elsewhere(&local.join("dir/data"));
        // "idle" is mounted behind the catalog's back, as a crash between attach and commit leaves it.
        let idle_data = f.dir.path().join("local/idle/data");
        f.mounter
            .mount_image(
                &f.dir.path().join("local/idle/disk.img"),
                &idle_data,
                crate::spec::FsType::Ext4,
            )
            .unwrap();
        let (svc, report) = f.start().await;
        assert_eq!(report.adopted, 2, "{report:?}");
        assert_eq!(report.released, 1, "{report:?}");
        assert!(!f.mounter.mount_table().unwrap().is_mounted(&idle_data));
        assert!(svc.get("kept").unwrap().mountpoint.is_some());
        assert_eq!(svc.get("dir").unwrap().status["active_mounts"], 1);
        drop(svc);
        // After a reboot nothing is mounted: volumes with active IDs are attached again.
        f.mounter.forget_mounts();
        let (svc, report) = f.start().await;
        assert_eq!(report.remounted, 1, "{report:?}");
        svc.unmount("kept", "a").await.unwrap();
        svc.unmount("dir", "b").await.unwrap();
        assert_eq!(
            svc.list().iter().filter(|v| v.mountpoint.is_some()).count(),
            0
        );
        let _ = svc.mount("lost", "x").await.unwrap();
    }

    #[tokio::test]
    async fn stale_mount_ids_are_released_only_when_nothing_holds_the_storage() {
        let f = Fixture::new();
        let local = f.dir.path().join("local");
        let (svc, _) = f.start().await;
        svc.create("v", Some(&opts(&[("size", "64M")])))
            .await
            .unwrap();
        svc.create("d", None).await.unwrap();
        svc.mount("v", "a").await.unwrap();
        svc.mount("d", "b").await.unwrap();
        // While a container holds the storage, Remove refuses.
        f.mounter.hold_elsewhere(&local.join("v/disk.img"));
        f.mounter.hold_elsewhere(&local.join("d/data"));
        assert!(matches!(
            svc.remove("v").await,
            Err(ServiceError::InUse { mounts: 1, .. })
        ));
        drop(svc);
        // Restarted while still held: the IDs are kept.
        let (svc, report) = f.start().await;
        assert_eq!(report.stale_ids_released, 0, "{report:?}");
        assert_eq!(svc.get("v").unwrap().status["active_mounts"], 1);
        drop(svc);
        // The containers stopped while Ferry was down: their IDs go at start-up, and the storage with them.
        f.mounter.release_elsewhere(&local.join("v/disk.img"));
        let (svc, report) = f.start().await;
        assert_eq!(report.stale_ids_released, 1, "{report:?}");
        assert_eq!(svc.get("v").unwrap().status["active_mounts"], 0);
        assert_eq!(svc.get("v").unwrap().mountpoint, None);
        assert!(!f
            .mounter
            .mount_table()
            .unwrap()
            .is_mounted(&local.join("v/data")));
        assert_eq!(svc.get("d").unwrap().status["active_mounts"], 1);
        // ... and at Remove, once nothing holds the storage.
        assert!(svc.remove("d").await.is_err());
        f.mounter.release_elsewhere(&local.join("d/data"));
        svc.remove("d").await.unwrap();
        svc.remove("v").await.unwrap();
    }

    #[tokio::test]
    async fn release_refuses_while_held_unless_forced() {
        let f = Fixture::new();
        let image = f.dir.path().join("local/v/disk.img");
        let (svc, _) = f.start().await;
        svc.create("v", Some(&opts(&[("size", "64M")])))
            .await
            .unwrap();
        let mp = svc.mount("v", "a").await.unwrap();
        svc.mount("v", "b").await.unwrap();
        f.mounter.hold_elsewhere(&image);
        assert!(matches!(
            svc.release("v", Some("nope"), false).await,
            Err(ServiceError::UnknownMountId { .. })
        ));
        let err = svc.release("v", None, false).await.unwrap_err();
        assert!(matches!(err, ServiceError::Held { .. }), "{err}");
        assert!(err.to_string().contains("pid 4242 at /data"), "{err}");
        assert_eq!(svc.get("v").unwrap().status["active_mounts"], 2);
        let r = svc.release("v", Some("a"), true).await.unwrap();
        assert_eq!(r.released, ["a"]);
        assert!(!r.detached);
        assert_eq!(r.forced_past, ["pid 4242 at /data"]);
        f.mounter.release_elsewhere(&image);
        let r = svc.release("v", None, false).await.unwrap();
        assert_eq!(
            (r.released.as_slice(), r.detached),
            (&["b".to_string()][..], true)
        );
        assert!(!f.mounter.mount_table().unwrap().is_mounted(&mp));
        assert!(svc
            .release("v", None, false)
            .await
            .unwrap()
            .released
            .is_empty());
        svc.remove("v").await.unwrap();
    }

    /// The health pass judges from the mounter's table, not the host's: a capped volume's mount that
    /// vanished is found lost, once per loss, and a plain volume (nothing to attach) never is.
    #[tokio::test]
    async fn check_attachments_finds_storage_lost_under_containers() {
        let f = Fixture::new();
        let (svc, _) = f.start().await;
        svc.create("v", Some(&opts(&[("size", "64M")])))
            .await
            .unwrap();
        svc.create("plain", None).await.unwrap();
        svc.create("idle", Some(&opts(&[("size", "64M")])))
            .await
            .unwrap();
        let mp = svc.mount("v", "a").await.unwrap();
        svc.mount("plain", "a").await.unwrap();
        assert_eq!(svc.check_attachments().await, 0);
        assert_eq!(svc.get("v").unwrap().status["health"], "ok");

        // Someone unmounted the data path by hand while a container used it.
        f.mounter.lazy_unmount(&mp);
        assert_eq!(svc.check_attachments().await, 1);
        let status = svc.get("v").unwrap().status;
        assert_eq!(status["health"], "error");
        let error = status["last_error"].as_str().unwrap().to_string();
        assert!(error.contains(LOST_MARK), "{error}");
        // Still lost at the next pass, and still the same failure.
        assert_eq!(svc.check_attachments().await, 1);
        assert_eq!(svc.get("v").unwrap().status["last_error"], error.as_str());
        for other in ["plain", "idle"] {
            assert_eq!(svc.get(other).unwrap().status["health"], "ok", "{other}");
        }
    }

    /// A Mount of a volume whose storage was lost under its other containers attaches it again (a new loop
    /// mount of the image), rather than handing out the dead mountpoint; the health pass then finds it
    /// whole, and the last Unmount releases the new mount.
    #[tokio::test]
    async fn mount_attaches_lost_storage_again() {
        let f = Fixture::new();
        let (svc, _) = f.start().await;
        svc.create("v", Some(&opts(&[("size", "64M")])))
            .await
            .unwrap();
        let mounts = |f: &Fixture| f.mounter.count(|c| matches!(c, Call::Mount { .. }));
        let mp = svc.mount("v", "a").await.unwrap();
        let before = mounts(&f);
        // Mounted again for a second container while attached: nothing new is mounted.
        assert_eq!(svc.mount("v", "b").await.unwrap(), mp);
        assert_eq!(mounts(&f), before);
        svc.unmount("v", "b").await.unwrap();

        f.mounter.lazy_unmount(&mp);
        assert_eq!(svc.check_attachments().await, 1);
        assert_eq!(svc.mount("v", "b").await.unwrap(), mp);
        assert_eq!(mounts(&f), before + 1, "{:?}", f.mounter.calls());
        assert!(f.mounter.mount_table().unwrap().is_mounted(&mp));
        let status = svc.get("v").unwrap().status;
        assert_eq!(status["health"], "ok", "{status:?}");
        assert_eq!(status["active_mounts"], 2);
        assert_eq!(svc.check_attachments().await, 0);

        svc.unmount("v", "a").await.unwrap();
        svc.unmount("v", "b").await.unwrap();
        assert!(!f.mounter.mount_table().unwrap().is_mounted(&mp));
        assert_eq!(
            f.mounter.calls().last().cloned(),
            Some(Call::Unmount { target: mp })
        );
    }

    #[tokio::test]
    async fn an_image_still_in_use_elsewhere_is_shared_never_attached_twice() {
        let f = Fixture::new();
        let image = f.dir.path().join("local/v/disk.img");
        let (svc, _) = f.start().await;
        svc.create("v", Some(&opts(&[("size", "64M")])))
            .await
            .unwrap();
        let mp = svc.mount("v", "a").await.unwrap();
        assert_eq!(
            f.mounter.count(|c| matches!(c, Call::MountDevice { .. })),
            0
        );
        // Someone ran `umount -l` on the data path while a container keeps the filesystem.
        f.mounter.hold_elsewhere(&image);
        f.mounter.lazy_unmount(&mp);
        assert_eq!(svc.mount("v", "b").await.unwrap(), mp);
        assert_eq!(
            f.mounter.count(|c| matches!(c, Call::MountDevice { .. })),
            1,
            "{:?}",
            f.mounter.calls()
        );
        let attached = f.mounter.count(|c| matches!(c, Call::Mount { .. }));
        // The same at start-up.
        drop(svc);
        f.mounter.lazy_unmount(&mp);
        let (svc, report) = f.start().await;
        assert_eq!(report.remounted, 1, "{report:?}");
        assert_eq!(
            f.mounter.count(|c| matches!(c, Call::MountDevice { .. })),
            2
        );
        assert_eq!(
            f.mounter.count(|c| matches!(c, Call::Mount { .. })),
            attached,
            "no new loop device"
        );
        svc.unmount("v", "a").await.unwrap();
        svc.unmount("v", "b").await.unwrap();
    }

    #[tokio::test]
    async fn the_image_grows_until_its_filesystem_has_the_requested_room() {
        let f = Fixture::new();
        let (svc, _) = f.start().await;
        // Within the first guess: one mkfs.
        f.mounter.set_overhead(8 << 20);
        svc.create("small", Some(&opts(&[("size", "64MiB")])))
            .await
            .unwrap();
        assert_eq!(f.mounter.count(|c| matches!(c, Call::Format { .. })), 1);
        // An overhead beyond the guess: measured, and the image made larger.
        f.mounter.set_overhead(100 << 20);
        svc.create("big", Some(&opts(&[("size", "64MiB")])))
            .await
            .unwrap();
        assert_eq!(f.mounter.count(|c| matches!(c, Call::Format { .. })), 4);
        let len = std::fs::metadata(f.dir.path().join("local/big/disk.img"))
            .unwrap()
            .len();
        assert!(len - (100 << 20) >= 64 << 20, "{len}");
        assert_eq!(svc.get("big").unwrap().status["size_bytes"], 64 << 20);
        assert!(!f
            .mounter
            .mount_table()
            .unwrap()
            .is_mounted(&f.dir.path().join("local/big/data")));
    }

    #[tokio::test]
    async fn interrupted_create_is_rolled_back() {
        let f = Fixture::new();
        let catalog = Arc::new(RedbCatalog::open(&f.dir.path().join("catalog.redb")).unwrap());
        let rec = VolumeRecord {
            name: "half".into(),
            spec: VolumeSpec::from_options(None, &SpecDefaults::default()).unwrap(),
            created_at: 0,
            state: VolumeState::Creating,
            mounts: BTreeMap::new(),
            mountpoint: None,
            shipped: None,
            dead_mounts: Default::default(),
        };
        catalog.put(rec, Expect::Absent).await.unwrap();
        std::fs::create_dir_all(f.dir.path().join("local/half/data")).unwrap();
        drop(catalog);
        let (svc, report) = f.start().await;
        assert_eq!(report.rolled_back, 1);
        assert!(svc.list().is_empty());
        assert!(!f.dir.path().join("local/half").exists());
        svc.create("half", None).await.unwrap();
    }

    /// A catalog whose next put fails, to exercise recovery of the in-memory view.
    struct FlakyCatalog {
        inner: RedbCatalog,
        fail_next: std::sync::atomic::AtomicBool,
        /// When not zero, the put that brings it down to zero fails.
        fail_in: std::sync::atomic::AtomicUsize,
        /// How many of the next reads fail.
        fail_gets: std::sync::atomic::AtomicUsize,
    }

    impl FlakyCatalog {
        /// A service with the local backend over a `FlakyCatalog` that fails nothing yet.
        async fn service(f: &Fixture) -> (Arc<VolumeService>, Arc<FlakyCatalog>) {
            let catalog = Arc::new(FlakyCatalog {
                inner: RedbCatalog::open(&f.dir.path().join("catalog.redb")).unwrap(),
                fail_next: false.into(),
                fail_in: 0.into(),
                fail_gets: 0.into(),
            });
            let local =
                Arc::new(LocalBackend::new(f.dir.path().join("local"), f.mounter.clone()).unwrap());
            let (svc, _) = VolumeService::start(
                catalog.clone(),
                vec![local],
                f.mounter.clone(),
                SpecDefaults::default(),
            )
            .await
            .unwrap();
            (svc, catalog)
        }
    }

    #[async_trait::async_trait]
    impl Catalog for FlakyCatalog {
        async fn load(&self) -> Result<Vec<Versioned<VolumeRecord>>, CatalogError> {
            self.inner.load().await
        }
        async fn get(&self, name: &str) -> Result<Option<Versioned<VolumeRecord>>, CatalogError> {
            let failing = self.fail_gets.fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |n| n.checked_sub(1),
            );
            if failing.is_ok() {
                return Err(CatalogError::Storage("disk still on fire".into()));
            }
            self.inner.get(name).await
        }
        fn put(&self, record: VolumeRecord, expect: Expect) -> PendingWrite {
            let counted_down = self
                .fail_in
                .fetch_update(
                    std::sync::atomic::Ordering::SeqCst,
                    std::sync::atomic::Ordering::SeqCst,
                    |n| n.checked_sub(1),
                )
                .is_ok_and(|n| n == 1);
            if self
                .fail_next
                .swap(false, std::sync::atomic::Ordering::SeqCst)
                || counted_down
            {
                return Box::pin(async { Err(CatalogError::Storage("disk on fire".into())) });
            }
            self.inner.put(record, expect)
        }
        fn delete(&self, name: &str, version: u64) -> PendingWrite {
            self.inner.delete(name, version)
        }
    }

    #[tokio::test]
    async fn failed_queued_write_restores_the_durable_view() {
        let f = Fixture::new();
        let (svc, catalog) = FlakyCatalog::service(&f).await;
        svc.create("v", Some(&opts(&[("size", "64M")])))
            .await
            .unwrap();
        svc.mount("v", "a").await.unwrap();
        catalog
            .fail_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let err = svc.mount("v", "b").await.unwrap_err();
        assert!(err.to_string().contains("disk on fire"), "{err}");
        assert_eq!(svc.get("v").unwrap().status["active_mounts"], 1);
        svc.mount("v", "c").await.unwrap();
        assert_eq!(svc.get("v").unwrap().status["active_mounts"], 2);
        svc.unmount("v", "a").await.unwrap();
        svc.unmount("v", "c").await.unwrap();
        assert_eq!(f.mounter.count(|c| matches!(c, Call::Unmount { .. })), 2);
    }

    /// Docker never repeats an Unmount, so one whose write failed is recorded once the catalog works: by
    /// the next operation on the volume, or by the background pass, which releases the storage too.
    #[tokio::test]
    async fn an_unmount_the_catalog_could_not_record_is_recorded_later() {
        let f = Fixture::new();
        let (svc, catalog) = FlakyCatalog::service(&f).await;
        svc.create("v", Some(&opts(&[("size", "64M")])))
            .await
            .unwrap();
        svc.mount("v", "a").await.unwrap();
        catalog
            .fail_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let err = svc.unmount("v", "a").await.unwrap_err();
        assert!(err.to_string().contains("disk on fire"), "{err}");
        assert_eq!(svc.get("v").unwrap().status["active_mounts"], 1);
        assert_eq!(
            f.mounter.count(|c| matches!(c, Call::Unmount { .. })),
            1,
            "only create's measuring"
        );
        assert_eq!(svc.heal().await, 1);
        let v = svc.get("v").unwrap();
        assert_eq!(v.status["active_mounts"], 0);
        assert_eq!(v.status["state"], "ready");
        assert!(v.mountpoint.is_none());
        assert_eq!(
            f.mounter.count(|c| matches!(c, Call::Unmount { .. })),
            2,
            "released by the background pass"
        );
        assert_eq!(svc.heal().await, 0, "nothing left to do");

        // The next operation records it first when it comes before the background pass: a Mount keeps
        // the storage attached for itself, and the owed ID does not hold the volume afterwards.
        svc.mount("v", "b").await.unwrap();
        catalog
            .fail_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(svc.unmount("v", "b").await.is_err());
        svc.mount("v", "c").await.unwrap();
        let v = svc.get("v").unwrap();
        assert_eq!(v.status["active_mounts"], 1);
        assert_eq!(
            svc.report("v")
                .unwrap()
                .mount_ids
                .keys()
                .collect::<Vec<_>>(),
            ["c"]
        );
        svc.unmount("v", "c").await.unwrap();
        assert!(svc.get("v").unwrap().mountpoint.is_none());
        assert_eq!(f.mounter.count(|c| matches!(c, Call::Unmount { .. })), 3);
        // A restart finds nothing held.
        drop(svc);
        drop(catalog);
        let (svc, report) = f.start().await;
        assert_eq!(report.failed, 0);
        assert_eq!(svc.get("v").unwrap().status["active_mounts"], 0);
    }

    /// The whole chain on a real redb over a disk that fills: while full, every change fails naming the
    /// cause, an Unmount among them; once there is room the next calls work without a restart, and the
    /// failed Unmount is recorded and releases the storage.
    #[tokio::test]
    async fn a_full_disk_under_the_catalog_costs_no_restart_and_no_stuck_mount() {
        let f = Fixture::new();
        let disk = crate::catalog::FillableDisk::default();
        let local =
            Arc::new(LocalBackend::new(f.dir.path().join("local"), f.mounter.clone()).unwrap());
        let (svc, _) = VolumeService::start(
            Arc::new(disk.catalog()),
            vec![local],
            f.mounter.clone(),
            SpecDefaults::default(),
        )
        .await
        .unwrap();
        svc.create("v", Some(&opts(&[("size", "64M")])))
            .await
            .unwrap();
        svc.mount("v", "a").await.unwrap();
        disk.set_full(true);
        for err in [
            svc.unmount("v", "a").await.unwrap_err(),
            svc.create("w", None).await.unwrap_err(),
            svc.mount("v", "b").await.unwrap_err(),
            svc.remove("v").await.unwrap_err(),
        ] {
            let text = err.to_string();
            assert!(
                text.contains("No space left on device") && !text.contains("Previous I/O"),
                "{text}"
            );
        }
        assert_eq!(svc.heal().await, 0, "nothing can be set right while full");
        assert_eq!(svc.get("v").unwrap().status["active_mounts"], 1);
        disk.set_full(false);
        assert_eq!(svc.heal().await, 1);
        let v = svc.get("v").unwrap();
        assert_eq!(v.status["active_mounts"], 0);
        assert!(v.mountpoint.is_none());
        svc.create("w", None).await.unwrap();
        svc.mount("v", "b").await.unwrap();
        svc.unmount("v", "b").await.unwrap();
        svc.remove("v").await.unwrap();
        svc.remove("w").await.unwrap();
        assert!(svc.list().is_empty());
    }

    /// A release whose last write failed leaves the volume detaching; the next Mount or the background pass
    /// brings it back to ready instead of leaving it "busy".
    #[tokio::test]
    async fn a_volume_left_detaching_by_a_failed_write_is_set_right() {
        let f = Fixture::new();
        let (svc, catalog) = FlakyCatalog::service(&f).await;
        svc.create("v", Some(&opts(&[("size", "64M")])))
            .await
            .unwrap();
        svc.mount("v", "a").await.unwrap();
        // The marker write succeeds, the detach happens, the final write fails.
        catalog
            .fail_in
            .store(2, std::sync::atomic::Ordering::SeqCst);
        assert!(svc.unmount("v", "a").await.is_err());
        assert_eq!(svc.get("v").unwrap().status["state"], "detaching");
        assert_eq!(svc.get("v").unwrap().status["health"], "busy");
        assert_eq!(svc.heal().await, 1);
        let v = svc.get("v").unwrap();
        assert_eq!(v.status["state"], "ready");
        assert_eq!(v.status["health"], "ok");
        assert!(v.mountpoint.is_none());
        let p = svc.mount("v", "b").await.unwrap();
        assert_eq!(svc.path("v").unwrap(), Some(p));
        svc.unmount("v", "b").await.unwrap();
    }

    /// A mount of an image marked for a check runs the check first, and refuses to mount damage the check
    /// could not repair; health says why until the volume mounts cleanly.
    #[tokio::test]
    async fn a_marked_image_is_checked_before_it_is_mounted() {
        let f = Fixture::new();
        let (svc, _) = f.start().await;
        svc.create("v", Some(&opts(&[("size", "64M")])))
            .await
            .unwrap();
        svc.mount("v", "a").await.unwrap();
        svc.unmount("v", "a").await.unwrap();
        assert_eq!(
            f.mounter.count(|c| matches!(c, Call::Check { .. })),
            0,
            "nothing marked, nothing checked"
        );
        let marker = f.dir.path().join("local/v/check-needed");
        std::fs::write(&marker, "its ext4 filesystem has logged 1 error(s)").unwrap();
        assert_eq!(svc.check_storage().await, 1);
        let v = svc.get("v").unwrap();
        assert_eq!(v.status["health"], "error");
        assert!(
            v.status["last_error"]
                .as_str()
                .unwrap()
                .contains("needs a check (its ext4 filesystem has logged 1 error(s))"),
            "{:?}",
            v.status
        );
        f.mounter.set_check_verdict(crate::mount::FsCheck::Damaged {
            tool: "e2fsck",
            detail: "UNEXPECTED INCONSISTENCY; RUN fsck MANUALLY.".into(),
        });
        let err = svc.mount("v", "b").await.unwrap_err().to_string();
        assert!(
            err.contains("needs a repair (its ext4 filesystem has logged 1 error(s)) that e2fsck could not make")
                && err.contains("RUN fsck MANUALLY")
                && err.contains("was not mounted"),
            "{err}"
        );
        assert_eq!(
            f.mounter.count(|c| matches!(c, Call::Mount { .. })),
            2,
            "create's measuring and the first mount only"
        );
        assert!(marker.exists());
        assert_eq!(svc.get("v").unwrap().status["health"], "error");
        f.mounter
            .set_check_verdict(crate::mount::FsCheck::Repaired("fixed".into()));
        svc.mount("v", "b").await.unwrap();
        assert_eq!(f.mounter.count(|c| matches!(c, Call::Check { .. })), 2);
        assert!(!marker.exists());
        assert_eq!(svc.get("v").unwrap().status["health"], "ok");
        assert_eq!(svc.check_storage().await, 0);
        svc.unmount("v", "b").await.unwrap();
        svc.mount("v", "c").await.unwrap();
        assert_eq!(
            f.mounter.count(|c| matches!(c, Call::Check { .. })),
            2,
            "checked once, not at every mount"
        );
        svc.unmount("v", "c").await.unwrap();
    }

    #[tokio::test]
    async fn view_ahead_of_the_catalog_is_reloaded_before_the_next_change() {
        let f = Fixture::new();
        let (svc, catalog) = FlakyCatalog::service(&f).await;
        svc.create("v", Some(&opts(&[("size", "64M")])))
            .await
            .unwrap();
        svc.mount("v", "a").await.unwrap();
        // The write of mount "b" fails, and so does the reload meant to undo it in the view.
        catalog
            .fail_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
        catalog
            .fail_gets
            .store(1, std::sync::atomic::Ordering::SeqCst);
        assert!(svc.mount("v", "b").await.is_err());
        // While the catalog cannot be read, changes fail rather than chain on a write that never landed.
        catalog
            .fail_gets
            .store(1, std::sync::atomic::Ordering::SeqCst);
        let err = svc.mount("v", "c").await.unwrap_err();
        assert!(err.to_string().contains("disk still on fire"), "{err}");
        // Once it can be read, the durable record wins: only "a" and the new "c" hold the volume.
        svc.mount("v", "c").await.unwrap();
        let info = svc.get("v").unwrap();
        assert_eq!(info.status["active_mounts"], 2);
        svc.unmount("v", "a").await.unwrap();
        svc.unmount("v", "c").await.unwrap();
        assert!(svc.get("v").unwrap().mountpoint.is_none());
        assert_eq!(f.mounter.count(|c| matches!(c, Call::Unmount { .. })), 2);
    }

    #[tokio::test]
    async fn mount_abandoned_by_its_caller_is_undone() {
        let f = Fixture::new();
        let (svc, _) = f.start().await;
        svc.create("v", Some(&opts(&[("size", "64M")])))
            .await
            .unwrap();
        // Hold the volume's lock so the mount cannot finish within the caller's deadline.
        let guard = svc.lock("v").await;
        let err = svc
            .mount_for_caller("v", "late", Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(err, ServiceError::Timeout { .. }), "{err}");
        drop(guard);
        svc.finish_background_work(Duration::from_secs(10)).await;
        let info = svc.get("v").unwrap();
        assert_eq!(info.status["active_mounts"], 0);
        assert!(info.mountpoint.is_none());
        assert_eq!(f.mounter.count(|c| matches!(c, Call::Mount { .. })), 2);
        assert_eq!(f.mounter.count(|c| matches!(c, Call::Unmount { .. })), 2);
    }

    /// An ebs-kind backend that "ships" a new generation on every checkpoint and detach.
    #[derive(Default)]
    struct ShippingBackend {
        shipped: std::sync::atomic::AtomicU64,
    }

    impl ShippingBackend {
        fn next(&self) -> Option<crate::catalog::Shipped> {
            let g = self
                .shipped
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                + 1;
            Some(crate::catalog::Shipped {
                snapshot: format!("snap-{g}"),
                generation: g,
            })
        }
    }

    #[async_trait::async_trait]
    impl Backend for ShippingBackend {
        fn kind(&self) -> BackendKind {
            BackendKind::Ebs
        }
        fn preflight(&self, _: &str, _: &VolumeSpec) -> Result<(), BackendError> {
            Ok(())
        }
        async fn create(
            &self,
            _: &str,
            _: &VolumeSpec,
        ) -> Result<Option<crate::catalog::Shipped>, BackendError> {
            Ok(None)
        }
        async fn remove(&self, _: &str, _: &VolumeSpec) -> Result<(), BackendError> {
            Ok(())
        }
        async fn attach(
            &self,
            name: &str,
            _: &VolumeSpec,
            shipped: Option<&crate::catalog::Shipped>,
        ) -> Result<crate::backend::Attached, BackendError> {
            Ok(crate::backend::Attached {
                path: PathBuf::from("/x").join(name),
                shipped: shipped.cloned(),
            })
        }
        async fn detach(
            &self,
            _: &str,
            _: &VolumeSpec,
            _: Option<&crate::catalog::Shipped>,
        ) -> Result<Option<crate::catalog::Shipped>, BackendError> {
            Ok(self.next())
        }
        async fn checkpoint(
            &self,
            _: &str,
            _: &VolumeSpec,
            _: Option<&crate::catalog::Shipped>,
        ) -> Result<Option<crate::catalog::Shipped>, BackendError> {
            Ok(self.next())
        }
        fn is_attached(
            &self,
            _: &str,
            _: &VolumeSpec,
            _: &crate::mount::MountTable,
        ) -> Option<bool> {
            None
        }
        fn status(&self, _: &str, _: &VolumeSpec) -> Map<String, Value> {
            Map::new()
        }
        async fn check(&self) -> Result<Map<String, Value>, BackendError> {
            Ok(Map::new())
        }
    }

    #[tokio::test]
    async fn checkpoints_run_on_their_interval_and_never_move_the_newest_snapshot_back() {
        let f = Fixture::new();
        let catalog = Arc::new(RedbCatalog::open(&f.dir.path().join("catalog.redb")).unwrap());
        let defaults = SpecDefaults {
            ebs: Some(crate::spec::EbsDefaults::default()),
            ..SpecDefaults::default()
        };
        let (svc, _) = VolumeService::start(
            catalog,
            vec![Arc::new(ShippingBackend::default())],
            f.mounter.clone(),
            defaults,
        )
        .await
        .unwrap();
        let every = opts(&[("backend", "ebs"), ("size", "64MiB"), ("checkpoint", "1m")]);
        let never = opts(&[("backend", "ebs"), ("size", "64MiB")]);
        svc.create("timed", Some(&every)).await.unwrap();
        svc.create("plain", Some(&never)).await.unwrap();
        svc.mount("timed", "a").await.unwrap();
        svc.mount("plain", "b").await.unwrap();
        let generation = |name: &str| {
            svc.lookup(name)
                .and_then(|e| e.value.shipped.clone())
                .map(|s| s.generation)
        };
        // First seen now: not due for a minute.
        assert_eq!(svc.run_due_checkpoints().await, 0);
        let backdate = |name: &str| {
            svc.checkpoint_clock.lock().unwrap().insert(
                name.to_string(),
                std::time::Instant::now() - Duration::from_secs(61),
            );
        };
        backdate("timed");
        backdate("plain");
        assert_eq!(svc.run_due_checkpoints().await, 1);
        assert_eq!(generation("timed"), Some(1));
        assert_eq!(generation("plain"), None);
        assert_eq!(svc.run_due_checkpoints().await, 0, "just checkpointed");
        // The last unmount ships generation 2; a late report of generation 1 must not win.
        svc.unmount("timed", "a").await.unwrap();
        assert_eq!(generation("timed"), Some(2));
        svc.record_shipped(
            "timed",
            crate::catalog::Shipped {
                snapshot: "snap-1".into(),
                generation: 1,
            },
        )
        .await
        .unwrap();
        assert_eq!(generation("timed"), Some(2));
        // Unmounted volumes are not checkpointed.
        backdate("timed");
        assert_eq!(svc.run_due_checkpoints().await, 0);
    }

    /// A backend whose remove fails while `stuck` is set.
    struct StuckBackend {
        stuck: std::sync::atomic::AtomicBool,
    }

    impl StuckBackend {
        fn new() -> Arc<Self> {
            Arc::new(StuckBackend { stuck: true.into() })
        }
    }

    #[async_trait::async_trait]
    impl Backend for StuckBackend {
        fn kind(&self) -> BackendKind {
            BackendKind::Local
        }
        fn preflight(&self, _: &str, _: &VolumeSpec) -> Result<(), BackendError> {
            Ok(())
        }
        async fn create(
            &self,
            _: &str,
            _: &VolumeSpec,
        ) -> Result<Option<crate::catalog::Shipped>, BackendError> {
            Ok(None)
        }
        async fn remove(&self, _: &str, _: &VolumeSpec) -> Result<(), BackendError> {
            if !self.stuck.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(());
            }
            Err(BackendError::Internal(
                BackendKind::Local,
                "device busy".into(),
            ))
        }
        async fn attach(
            &self,
            name: &str,
            _: &VolumeSpec,
            _: Option<&crate::catalog::Shipped>,
        ) -> Result<crate::backend::Attached, BackendError> {
            Ok(crate::backend::Attached::at(PathBuf::from("/x").join(name)))
        }
        async fn detach(
            &self,
            _: &str,
            _: &VolumeSpec,
            _: Option<&crate::catalog::Shipped>,
        ) -> Result<Option<crate::catalog::Shipped>, BackendError> {
            Ok(None)
        }
        fn is_attached(
            &self,
            _: &str,
            _: &VolumeSpec,
            _: &crate::mount::MountTable,
        ) -> Option<bool> {
            None
        }
        fn status(&self, _: &str, _: &VolumeSpec) -> Map<String, Value> {
            Map::new()
        }
        async fn check(&self) -> Result<Map<String, Value>, BackendError> {
            Err(BackendError::Internal(
                BackendKind::Local,
                "device busy".into(),
            ))
        }
    }

    #[tokio::test]
    async fn remove_that_cannot_finish_at_start_up_shows_the_volume_again() {
        let f = Fixture::new();
        let catalog = Arc::new(RedbCatalog::open(&f.dir.path().join("catalog.redb")).unwrap());
        let rec = VolumeRecord {
            name: "half-gone".into(),
            spec: VolumeSpec::from_options(None, &SpecDefaults::default()).unwrap(),
            created_at: 0,
            state: VolumeState::Removing,
            mounts: BTreeMap::new(),
            mountpoint: None,
            shipped: None,
            dead_mounts: Default::default(),
        };
        catalog.put(rec, Expect::Absent).await.unwrap();
        let (svc, report) = VolumeService::start(
            catalog,
            vec![StuckBackend::new()],
            f.mounter.clone(),
            SpecDefaults::default(),
        )
        .await
        .unwrap();
        assert_eq!(report.failed, 1);
        let info = svc.get("half-gone").unwrap();
        assert_eq!(info.status["state"], "ready");
        assert_eq!(info.status["health"], "error");
        assert!(svc.remove("half-gone").await.is_err());
    }

    #[tokio::test]
    async fn create_whose_rollback_failed_at_start_up_can_be_created_again() {
        let f = Fixture::new();
        let catalog = Arc::new(RedbCatalog::open(&f.dir.path().join("catalog.redb")).unwrap());
        let rec = VolumeRecord {
            name: "half-made".into(),
            spec: VolumeSpec::from_options(None, &SpecDefaults::default()).unwrap(),
            created_at: 0,
            state: VolumeState::Creating,
            mounts: BTreeMap::new(),
            mountpoint: None,
            shipped: None,
            dead_mounts: Default::default(),
        };
        catalog.put(rec, Expect::Absent).await.unwrap();
        let backend = StuckBackend::new();
        let (svc, report) = VolumeService::start(
            catalog,
            vec![backend.clone()],
            f.mounter.clone(),
            SpecDefaults::default(),
        )
        .await
        .unwrap();
        assert_eq!(report.failed, 1);
        assert!(matches!(
            svc.get("half-made"),
            Err(ServiceError::NotFound(_))
        ));
        // While the leftover cannot be cleaned, Create says why instead of "busy".
        let err = svc.create("half-made", None).await.unwrap_err();
        assert!(err.to_string().contains("device busy"), "{err}");
        backend
            .stuck
            .store(false, std::sync::atomic::Ordering::SeqCst);
        svc.create("half-made", None).await.unwrap();
        assert_eq!(svc.get("half-made").unwrap().status["state"], "ready");
        assert!(svc.report("half-made").unwrap().created_at > 0);
    }
}

//! Cluster mode: one catalog of volumes in etcd for every host, one writer per volume with fencing.
//!
//! Keys under the configured prefix P:
//! - `P/v/NAME`: the volume's definition (its spec, creator, state and newest published generation), the
//!   record every host shows. Created only if absent, so a Create storm from many hosts makes it once.
//! - `P/o/NAME`: the owner of a single-writer volume while it is attached, bound to the owner's lease and
//!   created only if absent. Its create revision is the fencing token: every publish compares it, so a
//!   host that lost the key (its lease expired, an operator released it) can never publish again.
//! - `P/a/NAME/NODE`: NODE has the volume attached, bound to NODE's lease; Remove is refused while any exist.
//! - `P/h/NODE`: NODE is alive (bound to its lease), for `ferry hosts`.
//!
//! Each host keeps its own attachments (mount IDs, mountpoints) in its embedded catalog, which must survive
//! an etcd outage; etcd holds only what hosts share. Get and List answer from a cache fed by a watch.

pub mod etcd;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::catalog::{record, Shipped, VolumeRecord, VolumeState};
use crate::sync::Recover;
use etcd::{Cmp, EtcdClient, EtcdError, Event, Kv, Op, WatchMessage};

/// How long a Create, Mount or Remove waits on etcd before failing: well inside Docker's deadlines.
pub const OP_DEADLINE: Duration = Duration::from_secs(4);

/// How often a host rewrites its host key, so that every watch sees traffic and a watch that went silent
/// (its member hung) is noticed.
const HEARTBEAT: Duration = Duration::from_secs(3);

/// A watch that delivered nothing for this long is presumed dead and started again.
const WATCH_SILENCE: Duration = Duration::from_secs(10);

/// The `[cluster]` section, resolved.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    pub etcd: etcd::EtcdSettings,
    pub node: String,
    /// Without a trailing slash.
    pub prefix: String,
    pub lease_ttl: Duration,
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("the cluster catalog (etcd) cannot be reached: {0}; the volume was not changed. Check that etcd runs and that this host reaches it (`ferry hosts` shows this host's lease); Ferry reconnects by itself")]
    Unreachable(String),
    #[error("the cluster catalog (etcd) refused: {0}")]
    Refused(String),
    #[error("volume {name} is mounted on host {owner}; unmount it there first. If {owner} is dead, its claim lapses within {ttl_secs} s; if it is alive but cut off, `ferry release {name}` takes the volume from it (see docs/cluster.md for the risk)")]
    OwnedElsewhere {
        name: String,
        owner: String,
        ttl_secs: u64,
    },
    #[error("volume {name} is a local volume of host {node}: its data lives there only. Mount it on {node}, or create an nfs or ebs volume for data that moves between hosts")]
    LocalElsewhere { name: String, node: String },
    #[error(
        "volume {name} is mounted on host(s) {hosts}; unmount it everywhere before removing it"
    )]
    InUse { name: String, hosts: String },
    #[error("volume {name} is being {what} by host {node}; try again in a moment")]
    Busy {
        name: String,
        what: &'static str,
        node: String,
    },
    #[error("this host has no lease in the cluster (etcd cannot be reached or the lease lapsed), so it cannot own volume {0} now; Ferry keeps trying, try again shortly")]
    NoLease(String),
    #[error("volume {name} already exists in the cluster with a different {option}; use those options, or another name")]
    Conflict { name: String, option: &'static str },
    #[error("the cluster catalog is out of reach and this host's copy of it is not in sync, so it cannot tell whether volume {0} exists; try again once etcd is back")]
    NotInSync(String),
}

impl From<EtcdError> for ClusterError {
    fn from(e: EtcdError) -> Self {
        match e {
            EtcdError::Unavailable(m) => ClusterError::Unreachable(m),
            EtcdError::Rejected(m) | EtcdError::BadAnswer(m) => ClusterError::Refused(m),
        }
    }
}

/// A volume as the cluster defines it.
#[derive(Clone, Debug)]
pub struct Definition {
    /// The host that created it.
    pub node: String,
    /// The spec, creation time, state (`Creating`, `Ready` or `Removing`) and newest published generation;
    /// mounts and mountpoint are always empty here.
    pub record: VolumeRecord,
    pub mod_revision: i64,
    pub create_revision: i64,
}

#[derive(Serialize, Deserialize)]
struct StoredDefinition {
    node: String,
    record: serde_json::Value,
}

/// The owner of a single-writer volume.
#[derive(Clone, Debug, Serialize)]
pub struct Owner {
    pub node: String,
    pub lease: i64,
    /// The owner key's create revision.
    pub token: i64,
}

#[derive(Serialize, Deserialize)]
struct StoredOwner {
    node: String,
    #[serde(default)]
    lease: i64,
}

/// A host that holds a lease.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostEntry {
    pub node: String,
    pub started_at: u64,
    pub version: String,
    #[serde(default)]
    pub lease: i64,
}

#[derive(Default)]
struct Cache {
    volumes: BTreeMap<String, Definition>,
    owners: BTreeMap<String, Owner>,
    attached: BTreeMap<String, BTreeSet<String>>,
    hosts: BTreeMap<String, HostEntry>,
}

/// What `ferry hosts` shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostsReport {
    pub this_node: String,
    pub lease: String,
    pub in_sync: bool,
    pub hosts: Vec<HostReport>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostReport {
    pub node: String,
    /// "alive" while the host holds a lease.
    pub state: String,
    #[serde(default)]
    pub started_at: u64,
    #[serde(default)]
    pub version: String,
    pub owns: Vec<String>,
    pub attached: Vec<String>,
}

/// The cluster state of one volume, for `ferry inspect` and Docker's Status.
#[derive(Clone, Debug, Serialize, Deserialize, Default, PartialEq, Eq)]
pub struct VolumeClusterInfo {
    pub created_by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    pub attached_on: Vec<String>,
    /// False while this host's copy of the catalog may be behind.
    pub catalog_in_sync: bool,
}

#[derive(Clone, Copy, Debug)]
struct Lease {
    id: i64,
    /// When the last keep-alive that etcd answered was sent: etcd cannot expire the lease before this plus
    /// the TTL.
    renewed_at: Instant,
}

/// Called when this host must stop writing to the volumes it owns.
pub type FenceHook = Box<dyn Fn(&'static str) + Send + Sync>;

/// Called with names of volumes another host removed.
pub type RemovedHook = Box<dyn Fn(String) + Send + Sync>;

pub struct Cluster {
    client: EtcdClient,
    settings: ClusterSettings,
    cache: RwLock<Cache>,
    in_sync: AtomicBool,
    lease: Mutex<Option<Lease>>,
    /// Set once the fence deadline passed or the lease was lost: every volume owned until then stays
    /// fenced until its storage is released.
    fenced: Mutex<BTreeSet<String>>,
    /// The owner tokens this host holds.
    held: Mutex<BTreeMap<String, i64>>,
    on_fence: Mutex<Option<FenceHook>>,
    on_removed: Mutex<Option<RemovedHook>>,
    lease_file: PathBuf,
    /// Where the fence deadline is published for FUSE helpers (see `fuse::fence`).
    fence_file: PathBuf,
    started_at: u64,
    /// Wakes the lease task when a lease is needed at once.
    lease_wanted: tokio::sync::Notify,
    /// When the watch last delivered anything.
    watch_seen: Mutex<Instant>,
}

/// How long before the lease could expire on etcd's side this host stops writing.
fn fence_margin(ttl: Duration) -> Duration {
    (ttl / 4).max(Duration::from_millis(500))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether a volume of this spec has at most one writer in the cluster.
pub fn single_writer(spec: &crate::spec::VolumeSpec) -> bool {
    spec.kind() == crate::spec::BackendKind::Ebs || spec.single_writer_nfs()
}

async fn bounded<T>(
    fut: impl std::future::Future<Output = Result<T, ClusterError>>,
) -> Result<T, ClusterError> {
    match tokio::time::timeout(OP_DEADLINE, fut).await {
        Ok(r) => r,
        Err(_) => Err(ClusterError::Unreachable(format!(
            "no answer within {} s",
            OP_DEADLINE.as_secs()
        ))),
    }
}

impl Cluster {
    pub fn new(
        settings: ClusterSettings,
        state_dir: &std::path::Path,
    ) -> Result<Arc<Self>, String> {
        let client = EtcdClient::new(settings.etcd.clone())?;
        Ok(Arc::new(Cluster {
            client,
            settings,
            cache: RwLock::new(Cache::default()),
            in_sync: AtomicBool::new(false),
            lease: Mutex::new(None),
            fenced: Mutex::new(BTreeSet::new()),
            held: Mutex::new(BTreeMap::new()),
            on_fence: Mutex::new(None),
            on_removed: Mutex::new(None),
            lease_file: state_dir.join("cluster-lease"),
            fence_file: state_dir.join("cluster-fence-deadline"),
            started_at: now_secs(),
            lease_wanted: tokio::sync::Notify::new(),
            watch_seen: Mutex::new(Instant::now()),
        }))
    }

    /// The file holding the fence deadline, for FUSE helpers of volumes with one writer.
    pub fn fence_file(&self) -> &std::path::Path {
        &self.fence_file
    }

    /// Publishes the moment this host must stop writing unless the lease is renewed again: the last
    /// renewal plus the TTL less the fencing margin, on the monotonic clock helpers read too.
    fn publish_fence_deadline(&self, renewed_at: Instant) {
        let ttl = self.settings.lease_ttl;
        let left = (ttl.saturating_sub(fence_margin(ttl))).saturating_sub(renewed_at.elapsed());
        let deadline = crate::fuse::fence::monotonic_nanos() + left.as_nanos() as u64;
        if let Err(e) = crate::fuse::fence::write_deadline(&self.fence_file, deadline) {
            tracing::warn!(file = %self.fence_file.display(), error = %e, "cannot publish the fence deadline; helpers of single-writer nfs volumes will fence them");
        }
    }

    pub fn node(&self) -> &str {
        &self.settings.node
    }

    pub fn lease_ttl(&self) -> Duration {
        self.settings.lease_ttl
    }

    pub fn set_hooks(&self, fence: FenceHook, removed: RemovedHook) {
        *self.on_fence.lock().recover() = Some(fence);
        *self.on_removed.lock().recover() = Some(removed);
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}/{kind}/{name}", self.settings.prefix)
    }

    fn attach_key(&self, name: &str, node: &str) -> String {
        format!("{}/a/{name}/{node}", self.settings.prefix)
    }

    /// Whether the cache can be trusted as current: the watch runs, and etcd answered this host's lease
    /// keep-alives lately (a watch over a connection to a hung member would not notice it is stale).
    pub fn in_sync(&self) -> bool {
        if !self.in_sync.load(Ordering::Relaxed) {
            return false;
        }
        if self.watch_seen.lock().recover().elapsed() > WATCH_SILENCE {
            return false;
        }
        let limit = (self.settings.lease_ttl / 2).max(Duration::from_secs(2));
        match *self.lease.lock().recover() {
            Some(l) => l.renewed_at.elapsed() < limit,
            None => false,
        }
    }

    // ---- cache ----

    fn apply_put(&self, cache: &mut Cache, kv: &Kv) {
        let Some(rest) = kv.key.strip_prefix(&format!("{}/", self.settings.prefix)) else {
            return;
        };
        let Some((kind, name)) = rest.split_once('/') else {
            return;
        };
        match kind {
            "v" => match decode_definition(kv) {
                Ok(d) => {
                    cache.volumes.insert(name.to_string(), d);
                }
                Err(e) => {
                    tracing::error!(key = %kv.key, error = %e, "unreadable volume definition in the cluster catalog; ignored")
                }
            },
            "o" => {
                if let Ok(o) = serde_json::from_slice::<StoredOwner>(&kv.value) {
                    cache.owners.insert(
                        name.to_string(),
                        Owner {
                            node: o.node,
                            lease: if kv.lease != 0 { kv.lease } else { o.lease },
                            token: kv.create_revision,
                        },
                    );
                }
            }
            "a" => {
                if let Some((vol, node)) = name.rsplit_once('/') {
                    cache
                        .attached
                        .entry(vol.to_string())
                        .or_default()
                        .insert(node.to_string());
                }
            }
            "h" => {
                if let Ok(mut h) = serde_json::from_slice::<HostEntry>(&kv.value) {
                    h.lease = kv.lease;
                    cache.hosts.insert(name.to_string(), h);
                }
            }
            _ => {}
        }
    }

    /// Applies a delete; returns the name of a volume whose definition went away.
    fn apply_delete(&self, cache: &mut Cache, key: &str) -> Option<String> {
        let rest = key.strip_prefix(&format!("{}/", self.settings.prefix))?;
        let (kind, name) = rest.split_once('/')?;
        match kind {
            "v" => {
                cache.volumes.remove(name);
                return Some(name.to_string());
            }
            "o" => {
                cache.owners.remove(name);
            }
            "a" => {
                if let Some((vol, node)) = name.rsplit_once('/') {
                    if let Some(set) = cache.attached.get_mut(vol) {
                        set.remove(node);
                        if set.is_empty() {
                            cache.attached.remove(vol);
                        }
                    }
                }
            }
            "h" => {
                cache.hosts.remove(name);
            }
            _ => {}
        }
        None
    }

    /// Reads everything and replaces the cache; returns the revision to watch from.
    async fn resync(&self) -> Result<i64, EtcdError> {
        let (kvs, revision) = self
            .client
            .range_prefix(&format!("{}/", self.settings.prefix))
            .await?;
        let mut fresh = Cache::default();
        for kv in &kvs {
            self.apply_put(&mut fresh, kv);
        }
        let gone: Vec<String> = {
            let mut cache = self.cache.write().recover();
            let gone = cache
                .volumes
                .keys()
                .filter(|n| !fresh.volumes.contains_key(*n))
                .cloned()
                .collect();
            *cache = fresh;
            gone
        };
        self.in_sync.store(true, Ordering::Relaxed);
        for name in gone {
            self.removed(name);
        }
        Ok(revision)
    }

    fn removed(&self, name: String) {
        if let Some(hook) = self.on_removed.lock().recover().as_ref() {
            hook(name);
        }
    }

    /// Keeps the cache in step with etcd until `stop`: a full read, then a watch from the revision after
    /// it; any failure marks the cache stale and starts over after a pause.
    pub async fn run_watch(self: Arc<Self>, stop: CancellationToken) {
        let mut pause = Duration::from_millis(200);
        loop {
            let outcome = async {
                let revision = self.resync().await?;
                tracing::info!(revision, "cluster catalog in sync");
                let (tx, mut rx) = tokio::sync::mpsc::channel(64);
                let client_side = {
                    let me = self.clone();
                    let prefix = format!("{}/", self.settings.prefix);
                    tokio::spawn(async move { me.client.watch(&prefix, revision + 1, tx).await })
                };
                *self.watch_seen.lock().recover() = Instant::now();
                // Every host rewrites its host key every few seconds, so silence means a dead watch.
                while let Ok(Some(msg)) = tokio::time::timeout(WATCH_SILENCE, rx.recv()).await {
                    *self.watch_seen.lock().recover() = Instant::now();
                    match msg {
                        WatchMessage::Compacted => break,
                        WatchMessage::Events(events) => self.apply_events(events),
                    }
                }
                self.client.rotate();
                client_side.abort();
                let end: Result<(), EtcdError> = match client_side.await {
                    Ok(Err(e)) => Err(e),
                    _ => Err(EtcdError::Unavailable(
                        "the watch was compacted; reading everything again".into(),
                    )),
                };
                end
            };
            let err = tokio::select! {
                _ = stop.cancelled() => return,
                r = outcome => r,
            };
            if let Err(e) = err {
                if self.in_sync.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "lost the cluster catalog's watch; Get and List answer from the last known state until it is back");
                } else {
                    tracing::debug!(error = %e, "cluster catalog still out of reach");
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    fn apply_events(&self, events: Vec<Event>) {
        let mut gone = Vec::new();
        {
            let mut cache = self.cache.write().recover();
            for e in &events {
                match e {
                    Event::Put(kv) => self.apply_put(&mut cache, kv),
                    Event::Delete { key, .. } => {
                        if let Some(name) = self.apply_delete(&mut cache, key) {
                            gone.push(name);
                        }
                    }
                }
            }
        }
        for name in gone {
            self.removed(name);
        }
    }

    // ---- lease ----

    fn lease_id(&self) -> Option<i64> {
        self.lease.lock().recover().map(|l| l.id)
    }

    /// Keeps this host's lease alive until `stop`, and fences this host's volumes when it cannot: before
    /// etcd could expire the lease (a quarter of the TTL early), or at once when etcd says it is gone.
    pub async fn run_lease(self: Arc<Self>, stop: CancellationToken) {
        let ttl = self.settings.lease_ttl;
        let interval = (ttl / 5).max(Duration::from_millis(200));
        let margin = fence_margin(ttl);
        let mut last_beat = Instant::now();
        loop {
            let current = *self.lease.lock().recover();
            match current {
                None => {
                    if let Err(e) = self.acquire_lease().await {
                        tracing::debug!(error = %e, "cannot get a lease from etcd yet");
                    }
                }
                Some(lease) => {
                    let sent = Instant::now();
                    let answer = tokio::time::timeout(
                        (ttl / 4).max(Duration::from_millis(500)),
                        self.client.lease_keepalive(lease.id),
                    )
                    .await;
                    if !matches!(answer, Ok(Ok(_))) {
                        self.client.rotate();
                    }
                    let alive = matches!(&answer, Ok(Ok(t)) if *t > 0);
                    match answer {
                        Ok(Ok(t)) if t > 0 => {
                            let renewed = match self.lease.lock().recover().as_mut() {
                                Some(l) if l.id == lease.id => {
                                    l.renewed_at = sent;
                                    true
                                }
                                _ => false,
                            };
                            if renewed {
                                self.publish_fence_deadline(sent);
                            }
                        }
                        Ok(Ok(_)) => {
                            tracing::error!(
                                lease = lease.id,
                                "etcd says this host's lease expired: its volumes are fenced"
                            );
                            self.fence_all("the lease expired");
                            *self.lease.lock().recover() = None;
                            continue;
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "cannot renew the lease")
                        }
                        Err(_) => tracing::warn!("renewing the lease timed out"),
                    }
                    if last_beat.elapsed() >= HEARTBEAT && alive {
                        last_beat = Instant::now();
                        if let Err(e) = self.put_host_key(lease.id).await {
                            tracing::debug!(error = %e, "cannot refresh this host's key");
                        }
                    }
                    let renewed_at = self.lease.lock().recover().map(|l| l.renewed_at);
                    if let Some(at) = renewed_at {
                        if at.elapsed() + margin >= ttl {
                            self.fence_all("the lease could not be renewed in time");
                        }
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
                _ = self.lease_wanted.notified() => {}
            }
        }
    }

    /// Takes a lease: the one a previous run of this daemon left, if etcd still has it (so a restart keeps
    /// ownership of mounted volumes), or a new one; then announces this host.
    async fn acquire_lease(&self) -> Result<i64, ClusterError> {
        let sent = Instant::now();
        let old = std::fs::read_to_string(&self.lease_file)
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok());
        let mut id = None;
        if let Some(old) = old {
            if self.client.lease_keepalive(old).await? > 0 {
                tracing::info!(lease = old, "kept the lease of the previous run");
                id = Some(old);
            }
        }
        let id = match id {
            Some(id) => id,
            None => {
                let ttl = self.settings.lease_ttl.as_secs().max(2) as i64;
                let (id, _) = self.client.lease_grant(ttl).await?;
                crate::durable::write_atomic(&self.lease_file, id.to_string().as_bytes())
                    .map_err(|e| ClusterError::Refused(format!("cannot record the lease: {e}")))?;
                tracing::info!(lease = id, "took a new lease");
                id
            }
        };
        self.put_host_key(id).await?;
        *self.lease.lock().recover() = Some(Lease {
            id,
            renewed_at: sent,
        });
        self.publish_fence_deadline(sent);
        Ok(id)
    }

    async fn put_host_key(&self, lease: i64) -> Result<(), ClusterError> {
        let entry = HostEntry {
            node: self.settings.node.clone(),
            started_at: self.started_at,
            version: env!("CARGO_PKG_VERSION").into(),
            lease,
        };
        let key = self.key("h", &self.settings.node);
        let value = serde_json::to_vec(&entry).unwrap_or_default();
        let put = self.client.put(&key, &value, lease);
        tokio::time::timeout(Duration::from_secs(2), put)
            .await
            .map_err(|_| ClusterError::Unreachable("no answer within 2 s".into()))??;
        Ok(())
    }

    async fn need_lease(&self, name: &str) -> Result<i64, ClusterError> {
        if let Some(id) = self.lease_id() {
            return Ok(id);
        }
        match self.acquire_lease().await {
            Ok(id) => Ok(id),
            Err(ClusterError::Unreachable(m)) => Err(ClusterError::Unreachable(m)),
            Err(_) => Err(ClusterError::NoLease(name.to_string())),
        }
    }

    /// Fences every volume this host owns now.
    fn fence_all(&self, why: &'static str) {
        let held: Vec<String> = std::mem::take(&mut *self.held.lock().recover())
            .into_keys()
            .collect();
        if held.is_empty() {
            return;
        }
        tracing::error!(volumes = ?held, why, "fencing: this host stops writing to the volumes it owned");
        self.fenced.lock().recover().extend(held);
        if let Some(hook) = self.on_fence.lock().recover().as_ref() {
            hook(why);
        }
    }

    /// Volumes fenced and not yet released here.
    pub fn is_fenced(&self, name: &str) -> bool {
        self.fenced.lock().recover().contains(name)
    }

    pub fn fenced(&self) -> BTreeSet<String> {
        self.fenced.lock().recover().clone()
    }

    /// Fences one volume (another host took it while this one was down).
    pub fn mark_fenced(&self, name: &str) {
        self.held.lock().recover().remove(name);
        self.fenced.lock().recover().insert(name.to_string());
    }

    /// Ends fencing of a volume whose storage was released here.
    pub fn unfence(&self, name: &str) {
        self.fenced.lock().recover().remove(name);
    }

    /// Puts a definition this host read or wrote into the cache, unless the watch already applied a newer
    /// one: an answer can arrive after the watch event of a later change.
    fn cache_definition(&self, name: impl Into<String>, def: Definition) {
        let name = name.into();
        let mut cache = self.cache.write().recover();
        let newer = cache
            .volumes
            .get(&name)
            .is_none_or(|c| c.mod_revision <= def.mod_revision);
        if newer {
            cache.volumes.insert(name, def);
        }
    }

    // ---- reads ----

    pub fn definition(&self, name: &str) -> Option<Definition> {
        self.cache.read().recover().volumes.get(name).cloned()
    }

    pub fn definitions(&self) -> Vec<Definition> {
        self.cache
            .read()
            .recover()
            .volumes
            .values()
            .cloned()
            .collect()
    }

    /// Whether `node` holds a lease, as far as this host's copy of the catalog knows.
    pub fn host_alive(&self, node: &str) -> bool {
        self.cache.read().recover().hosts.contains_key(node)
    }

    /// Takes over a create that a host which no longer holds a lease left unfinished; `None` if the
    /// definition moved meanwhile.
    pub async fn take_over_creation(
        &self,
        def: &Definition,
    ) -> Result<Option<Definition>, ClusterError> {
        let mine = Definition {
            node: self.settings.node.clone(),
            ..def.clone()
        };
        let taken = self.update(&mine, &def.record).await?;
        // `update` compares the revision only; the new value names this host as the creator.
        Ok(taken.map(|d| Definition {
            node: self.settings.node.clone(),
            ..d
        }))
    }

    pub fn owner(&self, name: &str) -> Option<Owner> {
        self.cache.read().recover().owners.get(name).cloned()
    }

    pub fn info(&self, name: &str) -> Option<VolumeClusterInfo> {
        let cache = self.cache.read().recover();
        let def = cache.volumes.get(name)?;
        let owner = cache.owners.get(name);
        Some(VolumeClusterInfo {
            created_by: def.node.clone(),
            owner: owner.map(|o| o.node.clone()),
            token: owner.map(|o| o.token),
            generation: def.record.shipped.as_ref().map(|s| s.generation),
            attached_on: cache
                .attached
                .get(name)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default(),
            catalog_in_sync: self.in_sync(),
        })
    }

    pub fn hosts(&self) -> HostsReport {
        let cache = self.cache.read().recover();
        let mut nodes: BTreeSet<String> = cache.hosts.keys().cloned().collect();
        nodes.extend(cache.owners.values().map(|o| o.node.clone()));
        for set in cache.attached.values() {
            nodes.extend(set.iter().cloned());
        }
        let hosts = nodes
            .into_iter()
            .map(|node| {
                let h = cache.hosts.get(&node);
                HostReport {
                    state: if h.is_some() { "alive" } else { "no lease" }.into(),
                    started_at: h.map_or(0, |h| h.started_at),
                    version: h.map(|h| h.version.clone()).unwrap_or_default(),
                    owns: cache
                        .owners
                        .iter()
                        .filter(|(_, o)| o.node == node)
                        .map(|(n, _)| n.clone())
                        .collect(),
                    attached: cache
                        .attached
                        .iter()
                        .filter(|(_, s)| s.contains(&node))
                        .map(|(n, _)| n.clone())
                        .collect(),
                    node,
                }
            })
            .collect();
        let lease = match *self.lease.lock().recover() {
            Some(l) => format!(
                "{} (renewed {} ms ago, TTL {} s)",
                l.id,
                l.renewed_at.elapsed().as_millis(),
                self.settings.lease_ttl.as_secs()
            ),
            None => "none (etcd out of reach)".into(),
        };
        HostsReport {
            this_node: self.settings.node.clone(),
            lease,
            in_sync: self.in_sync(),
            hosts,
        }
    }

    /// The newest published generation of a volume the cluster knows.
    pub fn published(&self, name: &str) -> Option<Option<Shipped>> {
        self.cache
            .read()
            .recover()
            .volumes
            .get(name)
            .map(|d| d.record.shipped.clone())
    }

    /// Reads one definition from etcd (bounded), for a caller that cannot wait for the watch.
    pub async fn refresh_definition(&self, name: &str) -> Result<Option<Definition>, ClusterError> {
        bounded(self.fetch_definition(name)).await
    }

    async fn fetch_definition(&self, name: &str) -> Result<Option<Definition>, ClusterError> {
        let kv = self.client.get(&self.key("v", name)).await?;
        let def = kv
            .map(|kv| decode_definition(&kv))
            .transpose()
            .map_err(ClusterError::Refused)?;
        let mut cache = self.cache.write().recover();
        match &def {
            Some(d) => {
                // Never step the cache back behind what the watch already applied.
                let newer = cache
                    .volumes
                    .get(name)
                    .is_none_or(|c| c.mod_revision <= d.mod_revision);
                if newer {
                    cache.volumes.insert(name.to_string(), d.clone());
                }
            }
            None => {
                cache.volumes.remove(name);
            }
        }
        Ok(def)
    }

    // ---- writes ----

    /// Creates the definition if absent. Returns the definition that stands and whether this call made it.
    pub async fn define(&self, record: &VolumeRecord) -> Result<(Definition, bool), ClusterError> {
        bounded(async {
            let key = self.key("v", &record.name);
            let value = encode_definition(&self.settings.node, record)?;
            let r = self
                .client
                .txn(
                    &[Cmp::CreateRevision(key.clone(), 0)],
                    &[Op::Put {
                        key: key.clone(),
                        value: value.clone(),
                        lease: 0,
                    }],
                    &[Op::Get { key: key.clone() }],
                )
                .await?;
            let def = if r.succeeded {
                Definition {
                    node: self.settings.node.clone(),
                    record: record.clone(),
                    mod_revision: r.revision,
                    create_revision: r.revision,
                }
            } else {
                let kv = r
                    .results
                    .first()
                    .and_then(|o| o.kvs.first())
                    .ok_or_else(|| ClusterError::Refused("the definition vanished".into()))?;
                decode_definition(kv).map_err(ClusterError::Refused)?
            };
            self.cache_definition(record.name.clone(), def.clone());
            Ok((def, r.succeeded))
        })
        .await
    }

    /// Rewrites a definition if it is still at `def.mod_revision`; `None` if it moved.
    pub async fn update(
        &self,
        def: &Definition,
        record: &VolumeRecord,
    ) -> Result<Option<Definition>, ClusterError> {
        bounded(async {
            let key = self.key("v", &record.name);
            let value = encode_definition(&def.node, record)?;
            let r = self
                .client
                .txn(
                    &[Cmp::ModRevision(key.clone(), def.mod_revision)],
                    &[Op::Put {
                        key,
                        value,
                        lease: 0,
                    }],
                    &[],
                )
                .await?;
            if !r.succeeded {
                self.fetch_definition(&record.name).await?;
                return Ok(None);
            }
            let new = Definition {
                node: def.node.clone(),
                record: record.clone(),
                mod_revision: r.revision,
                create_revision: def.create_revision,
            };
            self.cache_definition(record.name.clone(), new.clone());
            Ok(Some(new))
        })
        .await
    }

    /// Deletes a definition at `mod_revision` (the last step of a Remove, or of a failed create).
    pub async fn undefine(&self, name: &str, mod_revision: i64) -> Result<bool, ClusterError> {
        bounded(async {
            let key = self.key("v", name);
            let r = self
                .client
                .txn(
                    &[Cmp::ModRevision(key.clone(), mod_revision)],
                    &[Op::Delete { key }],
                    &[],
                )
                .await?;
            if r.succeeded {
                self.cache.write().recover().volumes.remove(name);
            }
            Ok(r.succeeded)
        })
        .await
    }

    /// Marks this host as using the volume before its first Mount here attaches storage; for a
    /// single-writer volume, also takes ownership, refused while another host owns it. Returns the token.
    pub async fn claim(&self, name: &str, single: bool) -> Result<i64, ClusterError> {
        if self.is_fenced(name) {
            return Err(ClusterError::Refused(format!(
                "volume {name} is fenced on this host: unmount it from every container here first"
            )));
        }
        bounded(async {
            let lease = self.need_lease(name).await?;
            for _ in 0..4 {
                let def = match self.definition(name) {
                    Some(d) => d,
                    None => match self.fetch_definition(name).await? {
                        Some(d) => d,
                        None => {
                            return Err(ClusterError::Refused(format!(
                                "volume {name} is not in the cluster catalog"
                            )))
                        }
                    },
                };
                if def.record.state != VolumeState::Ready {
                    return Err(ClusterError::Busy {
                        name: name.into(),
                        what: if def.record.state == VolumeState::Removing {
                            "removed"
                        } else {
                            "created"
                        },
                        node: def.node.clone(),
                    });
                }
                let vkey = self.key("v", name);
                let okey = self.key("o", name);
                let owner = serde_json::to_vec(&StoredOwner {
                    node: self.settings.node.clone(),
                    lease,
                })
                .unwrap_or_default();
                let mut cmp = vec![Cmp::ModRevision(vkey.clone(), def.mod_revision)];
                let mut ops = vec![Op::Put {
                    key: self.attach_key(name, &self.settings.node),
                    value: b"{}".to_vec(),
                    lease,
                }];
                if single {
                    cmp.push(Cmp::CreateRevision(okey.clone(), 0));
                    ops.push(Op::Put {
                        key: okey.clone(),
                        value: owner,
                        lease,
                    });
                }
                let r = self
                    .client
                    .txn(
                        &cmp,
                        &ops,
                        &[Op::Get { key: vkey.clone() }, Op::Get { key: okey.clone() }],
                    )
                    .await?;
                if r.succeeded {
                    if single {
                        self.held
                            .lock()
                            .recover()
                            .insert(name.to_string(), r.revision);
                    }
                    return Ok(if single { r.revision } else { 0 });
                }
                let v = r.results.first().and_then(|o| o.kvs.first());
                let o = r.results.get(1).and_then(|o| o.kvs.first());
                let Some(v) = v else {
                    self.cache.write().recover().volumes.remove(name);
                    return Err(ClusterError::Refused(format!(
                        "volume {name} was removed from the cluster"
                    )));
                };
                let fresh = decode_definition(v).map_err(ClusterError::Refused)?;
                self.cache_definition(name.to_string(), fresh.clone());
                if let (true, Some(o)) = (single, o) {
                    let stored: StoredOwner = serde_json::from_slice(&o.value)
                        .map_err(|e| ClusterError::Refused(e.to_string()))?;
                    let ours = stored.node == self.settings.node && o.lease == lease;
                    if ours {
                        // Ours from before a restart that kept the lease: the same token stands.
                        self.client
                            .put(&self.attach_key(name, &self.settings.node), b"{}", lease)
                            .await?;
                        self.held
                            .lock()
                            .recover()
                            .insert(name.to_string(), o.create_revision);
                        return Ok(o.create_revision);
                    }
                    if fresh.mod_revision == def.mod_revision {
                        return Err(ClusterError::OwnedElsewhere {
                            name: name.into(),
                            owner: stored.node,
                            ttl_secs: self.settings.lease_ttl.as_secs(),
                        });
                    }
                }
                // The definition moved (a publish landed): try again on the fresh one.
            }
            Err(ClusterError::Refused(format!(
                "volume {name} keeps changing; try again"
            )))
        })
        .await
    }

    /// The token this host holds for a volume, if any.
    pub fn token(&self, name: &str) -> Option<i64> {
        self.held.lock().recover().get(name).copied()
    }

    /// Records `shipped` as the volume's newest generation, only if this host still holds the token.
    pub async fn publish(&self, name: &str, shipped: &Shipped) -> Result<(), PublishError> {
        if self.is_fenced(name) {
            return Err(PublishError::Refused(
                "this host was fenced (its lease could not be renewed in time)".into(),
            ));
        }
        // A volume attached before this daemon could claim it (etcd out of reach at start-up) is claimed
        // now; the generation check below makes sure nobody published in between.
        let token = match self.token(name) {
            Some(t) => t,
            None => self
                .claim(name, true)
                .await
                .map_err(|e| PublishError::Refused(e.to_string()))?,
        };
        // Set once a publishing transaction went out without an answer: it may have been applied.
        let sent = AtomicBool::new(false);
        let outcome = bounded(async {
            for _ in 0..4 {
                let def = match self.definition(name) {
                    Some(d) => d,
                    None => self
                        .fetch_definition(name)
                        .await?
                        .ok_or_else(|| ClusterError::Refused("the volume was removed".into()))?,
                };
                let published = def.record.shipped.as_ref().map_or(0, |s| s.generation);
                if published + 1 != shipped.generation {
                    return Err(ClusterError::Refused(format!(
                        "the cluster's newest generation is {published}, and this host's copy is not based on it"
                    )));
                }
                let mut record = def.record.clone();
                record.shipped = Some(shipped.clone());
                let vkey = self.key("v", name);
                let r = self
                    .client
                    .txn(
                        &[
                            Cmp::CreateRevision(self.key("o", name), token),
                            Cmp::ModRevision(vkey.clone(), def.mod_revision),
                        ],
                        &[Op::Put {
                            key: vkey.clone(),
                            value: encode_definition(&def.node, &record)?,
                            lease: 0,
                        }],
                        &[Op::Get {
                            key: self.key("o", name),
                        }],
                    )
                    .await
                    .inspect_err(|_| sent.store(true, Ordering::SeqCst))?;
                if r.succeeded {
                    self.cache_definition(
                        name.to_string(),
                        Definition {
                            record,
                            mod_revision: r.revision,
                            ..def
                        },
                    );
                    return Ok(());
                }
                let still_ours = r
                    .results
                    .first()
                    .and_then(|o| o.kvs.first())
                    .is_some_and(|o| o.create_revision == token);
                if !still_ours {
                    return Err(ClusterError::Refused(format!(
                        "the fencing token {token} is no longer valid: another host or an operator took the volume"
                    )));
                }
                self.fetch_definition(name).await?;
            }
            Err(ClusterError::Refused("the definition keeps changing".into()))
        })
        .await;
        match outcome {
            Ok(()) => Ok(()),
            Err(e @ ClusterError::Refused(_)) => {
                self.held.lock().recover().remove(name);
                Err(PublishError::Refused(e.to_string()))
            }
            Err(e) if !sent.load(Ordering::SeqCst) => Err(PublishError::Refused(e.to_string())),
            Err(e) => {
                // The transaction may have landed: the catalog tells, if it answers now.
                let named =
                    tokio::time::timeout(Duration::from_secs(2), self.fetch_definition(name))
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .flatten()
                        .and_then(|d| d.record.shipped)
                        .is_some_and(|s| s.snapshot == shipped.snapshot);
                if named {
                    return Ok(());
                }
                Err(PublishError::Unknown(e.to_string()))
            }
        }
    }

    /// Gives up this host's use of the volume after its storage was released here.
    pub async fn release(&self, name: &str) -> Result<(), ClusterError> {
        self.unfence(name);
        // Kept until etcd took the release, so a retry still knows which claim is ours to delete.
        let token = self.token(name);
        bounded(async {
            let mine = self.attach_key(name, &self.settings.node);
            match token {
                // Only our own claim is deleted, never a later owner's: one transaction, the owner key
                // only if its token is ours, the mount key whatever.
                Some(token) => {
                    let okey = self.key("o", name);
                    self.client
                        .txn(
                            &[Cmp::CreateRevision(okey.clone(), token)],
                            &[Op::Delete { key: okey }, Op::Delete { key: mine.clone() }],
                            &[Op::Delete { key: mine }],
                        )
                        .await?;
                }
                None => {
                    self.client
                        .txn(&[], &[Op::Delete { key: mine }], &[])
                        .await?;
                }
            }
            self.held.lock().recover().remove(name);
            Ok(())
        })
        .await
    }

    /// `ferry release` of a volume owned by another host that is cut off: deletes its claim, so another
    /// host can mount the volume. The old owner's token no longer matches, so it can never publish.
    pub async fn force_release(&self, name: &str) -> Result<Option<String>, ClusterError> {
        bounded(async {
            let okey = self.key("o", name);
            let (attached, _) = self
                .client
                .range_prefix(&format!("{}/a/{name}/", self.settings.prefix))
                .await?;
            let old = self.client.get(&okey).await?;
            let mut ops = vec![Op::Delete { key: okey }];
            ops.extend(attached.into_iter().map(|kv| Op::Delete { key: kv.key }));
            self.client.txn(&[], &ops, &[]).await?;
            Ok(old.and_then(|kv| {
                serde_json::from_slice::<StoredOwner>(&kv.value)
                    .ok()
                    .map(|o| o.node)
            }))
        })
        .await
    }

    /// The first step of a cluster-wide Remove: marks the definition as being removed, refused while any
    /// host owns or has the volume attached. Returns the marked definition.
    pub async fn begin_remove(&self, name: &str) -> Result<Definition, ClusterError> {
        bounded(async {
            let def = match self.fetch_definition(name).await? {
                Some(d) => d,
                None => {
                    return Err(ClusterError::Refused(format!(
                        "volume {name} is not in the cluster catalog"
                    )))
                }
            };
            if def.record.state == VolumeState::Creating && self.host_alive(&def.node) {
                return Err(ClusterError::Busy {
                    name: name.into(),
                    what: "created",
                    node: def.node.clone(),
                });
            }
            let vkey = self.key("v", name);
            let okey = self.key("o", name);
            let mut record = def.record.clone();
            record.state = VolumeState::Removing;
            let r = self
                .client
                .txn(
                    &[
                        Cmp::ModRevision(vkey.clone(), def.mod_revision),
                        Cmp::CreateRevision(okey.clone(), 0),
                    ],
                    &[Op::Put {
                        key: vkey.clone(),
                        value: encode_definition(&def.node, &record)?,
                        lease: 0,
                    }],
                    &[Op::Get { key: okey }],
                )
                .await?;
            if !r.succeeded {
                if let Some(o) = r.results.first().and_then(|o| o.kvs.first()) {
                    let owner = serde_json::from_slice::<StoredOwner>(&o.value)
                        .map(|o| o.node)
                        .unwrap_or_default();
                    return Err(ClusterError::InUse {
                        name: name.into(),
                        hosts: owner,
                    });
                }
                return Err(ClusterError::Refused(format!(
                    "volume {name} changed while it was being removed; try again"
                )));
            }
            let marked = Definition {
                record,
                mod_revision: r.revision,
                ..def.clone()
            };
            // A Mount that claimed before the mark holds an attachment key: it wins, the Remove stops.
            let (attached, _) = self
                .client
                .range_prefix(&format!("{}/a/{name}/", self.settings.prefix))
                .await?;
            if !attached.is_empty() {
                let hosts: Vec<String> = attached
                    .iter()
                    .filter_map(|kv| kv.key.rsplit('/').next().map(str::to_string))
                    .collect();
                let mut back = marked.record.clone();
                back.state = VolumeState::Ready;
                self.update(&marked, &back).await?;
                return Err(ClusterError::InUse {
                    name: name.into(),
                    hosts: hosts.join(", "),
                });
            }
            self.cache_definition(name.to_string(), marked.clone());
            Ok(marked)
        })
        .await
    }

    /// Imports this host's embedded catalog on joining: every volume the cluster lacks is defined; a name
    /// the cluster has with other options is reported, and left alone on both sides.
    pub async fn import(&self, records: &[VolumeRecord]) -> Vec<(String, String)> {
        let mut conflicts = Vec::new();
        for rec in records {
            if !matches!(
                rec.state,
                VolumeState::Ready | VolumeState::Attaching | VolumeState::Detaching
            ) {
                continue;
            }
            let mut def = rec.clone();
            def.mounts.clear();
            def.dead_mounts.clear();
            def.mountpoint = None;
            def.state = VolumeState::Ready;
            match self.define(&def).await {
                Ok((_, true)) => {
                    tracing::info!(volume = %rec.name, "imported into the cluster catalog")
                }
                Ok((existing, false)) => {
                    if let Some(option) = existing.record.spec.first_difference(&rec.spec) {
                        let why = format!(
                            "volume {} exists in the cluster (created by host {}) with a different {option}; this host's volume of that name is not imported and cannot be mounted until it is renamed or removed here",
                            rec.name, existing.node
                        );
                        tracing::error!(volume = %rec.name, "{why}");
                        conflicts.push((rec.name.clone(), why));
                    }
                }
                Err(e) => {
                    tracing::error!(volume = %rec.name, error = %e, "cannot import the volume into the cluster catalog now");
                    conflicts.push((rec.name.clone(), format!("not imported yet: {e}")));
                }
            }
        }
        conflicts
    }

    /// Waits until the cache is in sync (at start), at most `limit`.
    pub async fn wait_in_sync(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !self.in_sync() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    /// Hands the lease back at shutdown? No: a clean stop keeps it, so a restart within the TTL keeps
    /// the volumes mounted here owned. This only stops the keep-alives.
    pub fn lease_kept(&self) -> Option<i64> {
        self.lease_id()
    }
}

/// Why a snapshot was not published.
#[derive(Clone, Debug)]
pub enum PublishError {
    /// It certainly was not, and never will be: the snapshot may be deleted.
    Refused(String),
    /// The catalog could not be asked whether it took it: the snapshot must be kept.
    Unknown(String),
}

impl std::fmt::Display for PublishError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PublishError::Refused(m) | PublishError::Unknown(m) => f.write_str(m),
        }
    }
}

/// The publisher the ebs backend asks (see `backend::Publisher`).
pub struct ClusterPublisher(pub Arc<Cluster>);

#[async_trait::async_trait]
impl crate::backend::Publisher for ClusterPublisher {
    fn published(&self, name: &str) -> Option<Option<Shipped>> {
        self.0.published(name)
    }
    async fn publish(&self, name: &str, shipped: &Shipped) -> Result<(), PublishError> {
        self.0.publish(name, shipped).await
    }
}

fn encode_definition(node: &str, record: &VolumeRecord) -> Result<Vec<u8>, ClusterError> {
    let bytes = record::encode(record).map_err(|e| ClusterError::Refused(e.to_string()))?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| ClusterError::Refused(e.to_string()))?;
    serde_json::to_vec(&StoredDefinition {
        node: node.to_string(),
        record: value,
    })
    .map_err(|e| ClusterError::Refused(e.to_string()))
}

fn decode_definition(kv: &Kv) -> Result<Definition, String> {
    let stored: StoredDefinition = serde_json::from_slice(&kv.value).map_err(|e| e.to_string())?;
    let bytes = serde_json::to_vec(&stored.record).map_err(|e| e.to_string())?;
    let record = record::decode(&bytes)?;
    Ok(Definition {
        node: stored.node,
        record,
        mod_revision: kv.mod_revision,
        create_revision: kv.create_revision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{SpecDefaults, VolumeSpec};

    fn record(name: &str) -> VolumeRecord {
        let mut opts = BTreeMap::new();
        opts.insert("backend".to_string(), "local".to_string());
        VolumeRecord {
            name: name.into(),
            spec: VolumeSpec::from_options(Some(&opts), &SpecDefaults::default()).unwrap(),
            created_at: 7,
            state: VolumeState::Ready,
            mounts: BTreeMap::new(),
            mountpoint: None,
            shipped: Some(Shipped {
                snapshot: "snap-1".into(),
                generation: 3,
            }),
            dead_mounts: BTreeSet::new(),
        }
    }

    fn cluster(dir: &std::path::Path) -> Arc<Cluster> {
        Cluster::new(
            ClusterSettings {
                etcd: etcd::EtcdSettings {
                    endpoints: vec!["http://127.0.0.1:1".into()],
                    tls: None,
                    auth: None,
                    attempt_timeout: Duration::from_millis(100),
                },
                node: "host-a".into(),
                prefix: "/p".into(),
                lease_ttl: Duration::from_secs(4),
            },
            dir,
        )
        .unwrap()
    }

    fn kv(key: &str, value: &[u8], create: i64, lease: i64) -> Kv {
        Kv {
            key: key.into(),
            value: value.to_vec(),
            create_revision: create,
            mod_revision: create,
            version: 1,
            lease,
        }
    }

    #[test]
    fn the_cache_follows_puts_and_deletes_of_every_kind_of_key() {
        let dir = tempfile::tempdir().unwrap();
        let c = cluster(dir.path());
        let def = encode_definition("host-b", &record("v1")).unwrap();
        let removed = Arc::new(Mutex::new(Vec::new()));
        let seen = removed.clone();
        c.set_hooks(
            Box::new(|_| {}),
            Box::new(move |name| seen.lock().unwrap().push(name)),
        );
        c.apply_events(vec![
            Event::Put(kv("/p/v/v1", &def, 5, 0)),
            Event::Put(kv("/p/o/v1", br#"{"node":"host-b","lease":9}"#, 7, 9)),
            Event::Put(kv("/p/a/v1/host-b", b"{}", 7, 9)),
            Event::Put(kv(
                "/p/h/host-b",
                br#"{"node":"host-b","started_at":1,"version":"x"}"#,
                3,
                9,
            )),
            // Another cluster's keys under a longer prefix are not ours.
            Event::Put(kv("/px/v/v2", &def, 8, 0)),
        ]);
        assert_eq!(c.definition("v1").unwrap().node, "host-b");
        assert!(c.definition("v2").is_none());
        let info = c.info("v1").unwrap();
        assert_eq!(info.owner.as_deref(), Some("host-b"));
        assert_eq!(
            info.token,
            Some(7),
            "the owner key's create revision is the token"
        );
        assert_eq!(info.generation, Some(3));
        assert_eq!(info.attached_on, vec!["host-b".to_string()]);
        assert!(c.host_alive("host-b"));
        let hosts = c.hosts();
        assert_eq!(hosts.hosts.len(), 1);
        assert_eq!(hosts.hosts[0].owns, vec!["v1".to_string()]);
        assert_eq!(c.published("v1"), Some(record("v1").shipped));
        assert_eq!(c.published("nope"), None);

        c.apply_events(vec![
            Event::Delete {
                key: "/p/o/v1".into(),
                revision: 10,
            },
            Event::Delete {
                key: "/p/a/v1/host-b".into(),
                revision: 10,
            },
            Event::Delete {
                key: "/p/h/host-b".into(),
                revision: 10,
            },
        ]);
        let info = c.info("v1").unwrap();
        assert_eq!((info.owner, info.token), (None, None));
        assert!(info.attached_on.is_empty());
        assert!(!c.host_alive("host-b"));
        assert!(removed.lock().unwrap().is_empty());
        c.apply_events(vec![Event::Delete {
            key: "/p/v/v1".into(),
            revision: 11,
        }]);
        assert!(c.definition("v1").is_none());
        assert_eq!(*removed.lock().unwrap(), vec!["v1".to_string()]);
    }

    #[test]
    fn without_etcd_the_cache_is_not_in_sync_and_claims_fail_fast() {
        let dir = tempfile::tempdir().unwrap();
        let c = cluster(dir.path());
        assert!(!c.in_sync());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let started = Instant::now();
        let err = rt.block_on(c.claim("v1", true)).unwrap_err();
        assert!(started.elapsed() <= OP_DEADLINE + Duration::from_millis(500));
        assert!(matches!(err, ClusterError::Unreachable(_)), "{err}");
        // Publishing without a claim asks for one, which fails the same way: nothing is published.
        let shipped = Shipped {
            snapshot: "s".into(),
            generation: 1,
        };
        assert!(rt.block_on(c.publish("v1", &shipped)).is_err());
        c.mark_fenced("v1");
        assert!(c.is_fenced("v1"));
        let err = rt.block_on(c.publish("v1", &shipped)).unwrap_err();
        assert!(
            matches!(&err, PublishError::Refused(m) if m.contains("fenced")),
            "{err}"
        );
        c.unfence("v1");
        assert!(!c.is_fenced("v1"));
    }

    #[test]
    fn a_definition_round_trips_through_its_stored_form() {
        let rec = record("v1");
        let bytes = encode_definition("host-a", &rec).unwrap();
        let kv = Kv {
            key: "/p/v/v1".into(),
            value: bytes,
            create_revision: 4,
            mod_revision: 9,
            version: 2,
            lease: 0,
        };
        let d = decode_definition(&kv).unwrap();
        assert_eq!(d.node, "host-a");
        assert_eq!(d.record, rec);
        assert_eq!((d.create_revision, d.mod_revision), (4, 9));
    }
}

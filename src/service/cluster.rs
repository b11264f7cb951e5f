//! The service's side of cluster mode: what Create, Mount, Unmount and Remove do with the shared catalog,
//! and what Get and List show of volumes other hosts defined. This host's own attachments stay in its
//! embedded catalog; the cluster holds definitions, ownership and published generations.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map};

use super::{
    now_secs, Result, ServiceError, VolumeInfo, VolumeRecord, VolumeReport, VolumeService,
    VolumeState,
};
use crate::catalog::Expect;
use crate::cluster::{single_writer, Cluster, ClusterError, Definition};
use crate::spec::{self, BackendKind, VolumeSpec};
use crate::sync::Recover;

/// What a Mount claimed, to give back if the attach fails.
pub(super) struct Claimed;

impl VolumeService {
    /// Docker's Capabilities scope: "global" when every host sees the same volumes.
    pub fn scope(&self) -> &'static str {
        if self.cluster.is_some() {
            "global"
        } else {
            "local"
        }
    }

    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// Create in a cluster: the definition is made once for the whole cluster (only if absent); a host
    /// that finds it made elsewhere with the same options only records it, and one with other options is
    /// refused naming the option. The caller holds the volume's lock.
    pub(super) async fn create_in_cluster(
        &self,
        c: &Arc<Cluster>,
        name: &str,
        spec: VolumeSpec,
    ) -> Result<()> {
        if let Some(why) = self.import_conflicts.lock().recover().get(name) {
            return Err(ClusterError::Refused(why.clone()).into());
        }
        let proto = VolumeRecord {
            name: name.to_string(),
            spec: spec.clone(),
            created_at: now_secs(),
            state: VolumeState::Creating,
            mounts: Default::default(),
            mountpoint: None,
            shipped: None,
            dead_mounts: Default::default(),
        };
        let (mut def, made) = c.define(&proto).await?;
        if !made {
            if let Some(option) = def.record.spec.first_difference(&spec) {
                return Err(ClusterError::Conflict {
                    name: name.into(),
                    option,
                }
                .into());
            }
            // Another host's create still under way: wait for it a little, as Swarm creates on every node.
            let mut waited = Duration::ZERO;
            while def.record.state == VolumeState::Creating && def.node != c.node() {
                if c.in_sync() && !c.host_alive(&def.node) {
                    // Its creator lost its lease mid-create: the storage may be half made; finish it here.
                    match c.take_over_creation(&def).await? {
                        Some(d) => {
                            tracing::warn!(volume = name, from = %def.node, "took over a create its host left unfinished");
                            def = d;
                            break;
                        }
                        None => {
                            def = c.definition(name).unwrap_or(def);
                            continue;
                        }
                    }
                }
                if waited >= Duration::from_secs(10) {
                    return Err(ClusterError::Busy {
                        name: name.into(),
                        what: "created",
                        node: def.node.clone(),
                    }
                    .into());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                waited += Duration::from_millis(100);
                // The watch normally brings the change; once a second, ask etcd itself.
                if waited.as_millis().is_multiple_of(1000) {
                    if let Err(e) = c.refresh_definition(name).await {
                        tracing::debug!(volume = name, error = %e, "cannot read the definition");
                    }
                }
                if let Some(d) = c.definition(name) {
                    def = d;
                } else {
                    return Err(ClusterError::Refused(format!(
                        "volume {name} was removed by host {} while this host created it; try again",
                        def.node
                    ))
                    .into());
                }
            }
            match def.record.state {
                VolumeState::Removing => {
                    return Err(ClusterError::Busy {
                        name: name.into(),
                        what: "removed",
                        node: def.node.clone(),
                    }
                    .into())
                }
                VolumeState::Creating => {} // our own create, interrupted: finish it below
                _ => return self.import_locked(c, &def).await,
            }
        }
        // This host makes the storage; a failure undoes the definition so a retry starts clean.
        if let Err(e) = self.create_locked(name, spec).await {
            if let Err(u) = c.undefine(name, def.mod_revision).await {
                tracing::warn!(volume = name, error = %u, "cannot undo the cluster definition of a failed create");
            }
            return Err(e);
        }
        let mut ready = def.record.clone();
        ready.state = VolumeState::Ready;
        ready.shipped = self.lookup(name).and_then(|e| e.value.shipped.clone());
        if c.update(&def, &ready).await?.is_none() {
            tracing::warn!(
                volume = name,
                "the definition changed while this host created the volume"
            );
        }
        Ok(())
    }

    /// Records a volume another host defined in this host's catalog, so it can be mounted here. A local
    /// volume of another host is not recorded: its data is there. The caller holds the volume's lock.
    async fn import_locked(&self, c: &Arc<Cluster>, def: &Definition) -> Result<()> {
        let name = def.record.name.as_str();
        if self.lookup(name).is_some() {
            return Ok(());
        }
        if def.record.spec.kind() == BackendKind::Local && def.node != c.node() {
            return Ok(());
        }
        let backend = self.backend(def.record.spec.kind())?.clone();
        let shipped = backend
            .create(name, &def.record.spec)
            .await
            .map_err(|e| self.failed(name, e))?;
        let record = VolumeRecord {
            name: name.to_string(),
            spec: def.record.spec.clone(),
            created_at: def.record.created_at,
            state: VolumeState::Ready,
            mounts: Default::default(),
            mountpoint: None,
            shipped: def.record.shipped.clone().or(shipped),
            dead_mounts: Default::default(),
        };
        self.store(record, Expect::Absent).await?;
        tracing::info!(volume = name, created_by = %def.node, "recorded a volume of the cluster on this host");
        Ok(())
    }

    /// Before a Mount in a cluster: the volume must be defined, mountable here, and recorded here.
    pub(super) async fn prepare_cluster_mount(&self, c: &Arc<Cluster>, name: &str) -> Result<()> {
        if let Some(why) = self.import_conflicts.lock().recover().get(name) {
            return Err(ClusterError::Refused(why.clone()).into());
        }
        let def = match c.definition(name) {
            Some(d) => d,
            None if self.lookup(name).is_some() => {
                return Err(ClusterError::Refused(format!(
                    "volume {name} is in this host's catalog but not in the cluster's (another host removed it, or it was not imported yet); `ferry inspect {name}` says more"
                ))
                .into())
            }
            None if c.in_sync() => return Err(ServiceError::NotFound(name.into())),
            None => return Err(ClusterError::NotInSync(name.into()).into()),
        };
        if def.record.spec.kind() == BackendKind::Local && def.node != c.node() {
            return Err(ClusterError::LocalElsewhere {
                name: name.into(),
                node: def.node,
            }
            .into());
        }
        match def.record.state {
            VolumeState::Ready => {}
            VolumeState::Removing => {
                return Err(ClusterError::Busy {
                    name: name.into(),
                    what: "removed",
                    node: def.node,
                }
                .into())
            }
            _ => {
                if def.node != c.node() {
                    return Err(ClusterError::Busy {
                        name: name.into(),
                        what: "created",
                        node: def.node,
                    }
                    .into());
                }
            }
        }
        self.import_locked(c, &def).await
    }

    /// The first Mount of a volume on this host claims it in the cluster; a single writer's attach then
    /// starts from the newest generation the cluster published.
    pub(super) async fn claim_for_mount(
        &self,
        c: &Arc<Cluster>,
        rec: &mut VolumeRecord,
    ) -> Result<Claimed> {
        if rec.spec.kind() == BackendKind::Local {
            return Ok(Claimed);
        }
        c.claim(&rec.name, single_writer(&rec.spec)).await?;
        if let Some(published) = c.published(&rec.name) {
            if rec.spec.kind() == BackendKind::Ebs {
                rec.shipped = published;
            }
        }
        Ok(Claimed)
    }

    /// Gives back a claim whose attach failed.
    pub(super) async fn unclaim(&self, claimed: Option<&Claimed>, name: &str) {
        if claimed.is_some() {
            self.give_back(name).await;
        }
    }

    /// Gives back this host's claim on a volume whose storage it released; kept for `heal` if etcd cannot
    /// be reached now (until then the claim lapses with this host's lease at the latest).
    pub(super) async fn give_back(&self, name: &str) {
        let Some(c) = &self.cluster else {
            return;
        };
        if let Err(e) = c.release(name).await {
            tracing::warn!(volume = name, error = %e, "cannot give back the volume's claim in the cluster now; retrying later");
            self.owed_releases.lock().recover().insert(name.to_string());
        } else {
            self.owed_releases.lock().recover().remove(name);
        }
    }

    pub(super) async fn retry_cluster_releases(&self) -> usize {
        let Some(c) = &self.cluster else {
            return 0;
        };
        let owed: Vec<String> = self
            .owed_releases
            .lock()
            .recover()
            .iter()
            .cloned()
            .collect();
        let mut done = 0;
        for name in owed {
            let Some(_guard) = self.try_lock(&name) else {
                continue;
            };
            // Mounted again since: the claim is in use.
            if self
                .lookup(&name)
                .is_some_and(|e| e.value.mountpoint.is_some())
            {
                self.owed_releases.lock().recover().remove(&name);
                continue;
            }
            if c.release(&name).await.is_ok() {
                self.owed_releases.lock().recover().remove(&name);
                done += 1;
            }
        }
        done
    }

    /// Remove in a cluster: refused while any host has the volume; the definition is marked first, so no
    /// Mount can start meanwhile, and deleted last, once the data is gone. The caller holds the lock.
    pub(super) async fn remove_in_cluster(&self, c: &Arc<Cluster>, name: &str) -> Result<()> {
        let local = self.lookup(name);
        let def = match c.definition(name) {
            Some(d) => d,
            // Only in this host's catalog (an import refused as a conflict): a plain local remove.
            None if local.is_some() => return self.remove_locked(name).await,
            None if c.in_sync() => return Err(ServiceError::NotFound(name.into())),
            None => return Err(ClusterError::NotInSync(name.into()).into()),
        };
        if self.import_conflicts.lock().recover().contains_key(name) {
            // The name is another volume in the cluster: remove only this host's own one.
            self.import_conflicts.lock().recover().remove(name);
            return self.remove_locked(name).await;
        }
        if def.record.spec.kind() == BackendKind::Local && def.node != c.node() {
            return Err(ClusterError::LocalElsewhere {
                name: name.into(),
                node: def.node,
            }
            .into());
        }
        if let Some(e) = &local {
            let mounts = e.value.active_mounts();
            if mounts > 0 {
                // The local rules (mount IDs left by containers gone while Ferry was down) decide first.
                let backend = self.backend(e.value.spec.kind())?.clone();
                if !Self::provably_unheld(&backend, name, &e.value.spec).await {
                    return Err(ServiceError::InUse {
                        name: name.into(),
                        mounts,
                    });
                }
            }
        }
        let marked = c.begin_remove(name).await?;
        let removed = match &local {
            Some(_) => self.remove_locked(name).await,
            None => {
                let backend = self.backend(def.record.spec.kind())?.clone();
                backend
                    .remove(name, &def.record.spec)
                    .await
                    .map_err(|e| self.failed(name, e))
            }
        };
        if let Err(e) = removed {
            let mut back = marked.record.clone();
            back.state = VolumeState::Ready;
            if let Err(u) = c.update(&marked, &back).await {
                tracing::error!(volume = name, error = %u, "cannot mark the volume ready again after a failed remove");
            }
            return Err(e);
        }
        c.undefine(name, marked.mod_revision).await?;
        tracing::info!(volume = name, "volume removed from the cluster");
        Ok(())
    }

    /// A volume only the cluster knows, or why it cannot be shown.
    pub(super) fn cluster_only(&self, name: &str) -> Result<Definition> {
        let Some(c) = &self.cluster else {
            return Err(ServiceError::NotFound(name.into()));
        };
        match c.definition(name) {
            Some(d) if d.record.state == VolumeState::Ready => Ok(d),
            Some(_) => Err(ServiceError::NotFound(name.into())),
            None if c.in_sync() => Err(ServiceError::NotFound(name.into())),
            None => Err(ClusterError::NotInSync(name.into()).into()),
        }
    }

    /// Ready definitions this host has no record of.
    pub(super) fn cluster_only_definitions(&self) -> Vec<Definition> {
        let Some(c) = &self.cluster else {
            return Vec::new();
        };
        let view = self.view.read().recover();
        c.definitions()
            .into_iter()
            .filter(|d| d.record.state == VolumeState::Ready && !view.contains_key(&d.record.name))
            .collect()
    }

    pub(super) fn add_cluster_status(
        &self,
        name: &str,
        status: &mut Map<String, serde_json::Value>,
    ) {
        if let Some(info) = self.cluster.as_ref().and_then(|c| c.info(name)) {
            status.insert("cluster".into(), json!(info));
        } else if let Some(c) = &self.cluster {
            status.insert(
                "cluster".into(),
                json!({"catalog_in_sync": c.in_sync(), "defined": false}),
            );
        }
    }

    pub(super) fn cluster_info(&self, def: &Definition) -> VolumeInfo {
        let rec = &def.record;
        let mut status = Map::new();
        status.insert("backend".into(), json!(rec.spec.kind().as_str()));
        status.insert(
            "options".into(),
            json!(spec::redact(&rec.spec.to_options())),
        );
        status.insert("state".into(), json!("ready"));
        status.insert("active_mounts".into(), json!(0));
        status.insert("mount_ids".into(), json!(0));
        status.insert("health".into(), json!("ok"));
        if let Some(s) = &rec.shipped {
            status.insert("snapshot".into(), json!(s.snapshot));
            status.insert("generation".into(), json!(s.generation));
        }
        self.add_cluster_status(&rec.name, &mut status);
        VolumeInfo {
            name: rec.name.clone(),
            mountpoint: None,
            created_at: rec.created_at,
            status,
        }
    }

    pub(super) fn cluster_report(&self, def: &Definition) -> VolumeReport {
        let rec = &def.record;
        let mut backend_status = Map::new();
        if let Some(s) = &rec.shipped {
            backend_status.insert("snapshot".into(), json!(s.snapshot));
            backend_status.insert("generation".into(), json!(s.generation));
        }
        VolumeReport {
            name: rec.name.clone(),
            backend: rec.spec.kind().as_str().into(),
            state: "ready".into(),
            health: "ok".into(),
            last_error: None,
            mountpoint: None,
            active_mounts: 0,
            mount_ids: Default::default(),
            created_at: rec.created_at,
            options: spec::redact(&rec.spec.to_options()),
            catalog_version: 0,
            backend_status,
            cluster: self.cluster.as_ref().and_then(|c| c.info(&rec.name)),
        }
    }

    /// Before start-up reconciliation in a cluster: hooks for fencing and for volumes removed elsewhere,
    /// and every volume the catalog records as attached here claimed again, so that reconciliation (which
    /// may ship a volume whose containers went away) publishes as the owner. A volume another host took
    /// meanwhile is fenced here at once.
    pub(super) async fn claim_attached(self: &Arc<Self>) {
        let Some(c) = self.cluster.clone() else {
            return;
        };
        let weak = Arc::downgrade(self);
        let fence_weak = weak.clone();
        c.set_hooks(
            Box::new(move |why| {
                if let Some(svc) = fence_weak.upgrade() {
                    svc.fence_attached(why);
                }
            }),
            Box::new(move |name| {
                if let Some(svc) = weak.upgrade() {
                    let s = svc.clone();
                    svc.tasks
                        .spawn(async move { s.forget_removed(&name).await });
                }
            }),
        );
        if !c.wait_in_sync(Duration::from_secs(5)).await {
            tracing::warn!("the cluster catalog is not reachable at start-up; this host's volumes are imported and claimed once it is");
        }
        let attached: Vec<VolumeRecord> = self
            .view
            .read()
            .recover()
            .values()
            .filter(|e| e.value.mountpoint.is_some() && e.value.spec.kind() != BackendKind::Local)
            .map(|e| e.value.clone())
            .collect();
        for rec in attached {
            if c.definition(&rec.name).is_none() {
                continue; // imported (and claimed) after reconciliation
            }
            match c.claim(&rec.name, single_writer(&rec.spec)).await {
                Ok(_) => tracing::info!(volume = %rec.name, "claimed again a volume attached here"),
                Err(ClusterError::OwnedElsewhere { owner, .. }) => {
                    tracing::error!(volume = %rec.name, owner = %owner, "another host took the volume while this host was down; fencing it here");
                    c.mark_fenced(&rec.name);
                }
                Err(e) => {
                    tracing::warn!(volume = %rec.name, error = %e, "cannot claim a volume attached here yet; it is claimed when it next publishes")
                }
            }
        }
    }

    /// After start-up reconciliation in a cluster: this host's volumes are imported, claims of volumes no
    /// longer attached are given back, and fenced volumes still attached are fenced.
    pub(super) async fn join_cluster(self: &Arc<Self>) {
        let Some(c) = self.cluster.clone() else {
            return;
        };
        let records: Vec<VolumeRecord> = self
            .view
            .read()
            .recover()
            .values()
            .map(|e| e.value.clone())
            .collect();
        for (name, why) in c.import(&records).await {
            if why.starts_with("not imported yet") {
                continue;
            }
            self.import_conflicts.lock().recover().insert(name, why);
        }
        for rec in &records {
            if rec.mountpoint.is_none() && c.token(&rec.name).is_some() {
                self.give_back(&rec.name).await;
            }
            if rec.mountpoint.is_some()
                && rec.spec.kind() != BackendKind::Local
                && c.token(&rec.name).is_none()
                && !c.is_fenced(&rec.name)
                && !self
                    .import_conflicts
                    .lock()
                    .recover()
                    .contains_key(&rec.name)
            {
                if let Err(e) = c.claim(&rec.name, single_writer(&rec.spec)).await {
                    tracing::warn!(volume = %rec.name, error = %e, "cannot claim a volume attached here");
                    if matches!(e, ClusterError::OwnedElsewhere { .. }) {
                        c.mark_fenced(&rec.name);
                    }
                }
            }
        }
        self.fence_attached("another host owns the volume");
    }

    /// Stops writes to every fenced volume attached here.
    fn fence_attached(&self, why: &str) {
        let Some(c) = &self.cluster else {
            return;
        };
        let entries: Vec<_> = self.view.read().recover().values().cloned().collect();
        for e in entries {
            let rec = &e.value;
            if rec.mountpoint.is_none() || !c.is_fenced(&rec.name) {
                continue;
            }
            let Ok(backend) = self.backend(rec.spec.kind()) else {
                continue;
            };
            match backend.fence(&rec.name, &rec.spec) {
                Ok(()) => {
                    tracing::error!(volume = %rec.name, why, "fenced: writes to the volume now fail on this host")
                }
                Err(err) => {
                    tracing::error!(volume = %rec.name, error = %err, "cannot fence the volume; its next publish is refused all the same")
                }
            }
        }
    }

    /// Forgets a volume another host removed: its record here and what this host kept of it.
    async fn forget_removed(&self, name: &str) {
        let _guard = self.lock(name).await;
        let Some(c) = &self.cluster else {
            return;
        };
        if c.definition(name).is_some() {
            return; // made again meanwhile
        }
        let Some(entry) = self.lookup(name) else {
            return;
        };
        if self.import_conflicts.lock().recover().contains_key(name) {
            return; // this host's own volume of that name, never in the cluster
        }
        if entry.value.mountpoint.is_some() || entry.value.active_mounts() > 0 {
            tracing::error!(
                volume = name,
                "another host removed a volume still attached here; keeping it"
            );
            return;
        }
        if let Ok(backend) = self.backend(entry.value.spec.kind()) {
            if let Err(e) = backend.forget_local(name, &entry.value.spec).await {
                tracing::warn!(volume = name, error = %e, "cannot delete this host's copy of a volume removed elsewhere");
            }
        }
        if let Err(e) = self.forget(name, entry.version).await {
            tracing::warn!(volume = name, error = %e, "cannot forget a volume removed elsewhere");
        } else {
            tracing::info!(volume = name, "forgot a volume another host removed");
        }
    }

    /// `ferry release NAME` of a volume another host owns: takes it from that host (cut off but alive).
    pub async fn release_elsewhere(&self, name: &str) -> Result<Option<String>> {
        let Some(c) = &self.cluster else {
            return Ok(None);
        };
        spec::validate_name(name)?;
        let _guard = self.lock_synced(name).await?;
        if self
            .lookup(name)
            .is_some_and(|e| e.value.mountpoint.is_some())
        {
            return Ok(None);
        }
        let old = c.force_release(name).await?;
        tracing::warn!(volume = name, from = ?old, "the operator took the volume from its owner");
        Ok(old)
    }
}

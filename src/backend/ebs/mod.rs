//! The `ebs` backend: a volume's local copy is a sparse image file holding a filesystem, mounted through a
//! loop device; its data is shipped to EBS snapshots through the EBS direct APIs, so whichever host mounts
//! the volume next pulls the newest snapshot first.
//!
//! Layout per volume under the cache directory: `<name>/image` (the local copy), `<name>/blocks` (the hash
//! of every block as last shipped or pulled), `<name>/copy.json` (which snapshot and generation the local
//! copy is based on, whether it may hold unshipped changes, and any snapshot a push left unfinished) and
//! `<name>/mnt` (the mountpoint, unless a mount root is configured).
//!
//! Invariants: the catalog's snapshot only ever names a completed snapshot; a local copy is mounted only if
//! it is based on the newest completed snapshot in EBS; a push only starts from the newest completed
//! snapshot, so two hosts writing one volume are detected, never silently merged. It must not know about
//! Docker's protocol or the catalog: the service records what `attach` and `detach` return.
//!
//! This module does the backend's I/O: it gathers the facts (the local copy's record, the snapshots found
//! by tag, the mount table), asks `decide` what they mean, and acts on the answer. The local copies' files
//! and records are `copy`'s, moving blocks is `ship`'s, the format of the `ferry:mounted:HOST_ID` tags is
//! `mounted`'s.

pub mod blockmap;
pub mod client;
mod copy;
mod decide;
mod errors;
mod freeze;
mod mounted;
mod retain;
mod ship;

use std::fs::DirBuilder;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Map, Value};

use self::blockmap::BlockMap;
pub use self::client::{ClientSettings, EbsError, SnapState, SnapshotClient, SnapshotInfo};
use self::copy::{sized, Copies, LocalCopy, Paths};
use self::decide::{AttachFacts, AttachPlan, BaseCheck, DetachPlan, MissingCopy, PushPlan, Settle};
use self::errors::{blocking, ebs_err, internal};
pub use self::mounted::MOUNTED_STALE;
pub use self::retain::{Generation, Pruned};
pub use self::ship::Transfers;
use super::{release_mount, Attached, Backend, BackendError, Shipped, TransferTotals, WhenBusy};
use crate::mount::{Holder, MountTable, Mounter, Storage};
use crate::spec::{format_size, BackendKind, VolumeSpec};
use crate::sync::Recover;

/// Blocks in flight per push or pull unless configured.
pub const DEFAULT_CONCURRENCY: usize = 16;
/// Generations kept per volume unless configured.
pub const DEFAULT_KEEP: u64 = 3;
/// The tag value that keeps unrelated installations apart unless configured.
pub const DEFAULT_NAMESPACE: &str = "ferry";
/// How often a mounted volume's `ferry:mounted` tag is refreshed.
const MOUNTED_REFRESH: Duration = Duration::from_secs(30);
/// Where `set-aside` moves local copies, under the cache directory. Volume names start with a letter or
/// digit, so no volume's directory can be this one.
const RESCUE_DIR: &str = ".rescue";

/// The `[ebs]` section, validated.
#[derive(Clone, Debug)]
pub struct EbsSettings {
    pub region: String,
    pub endpoint_url: Option<String>,
    pub concurrency: usize,
    /// Where local copies live; `None` means `STATE_DIR/ebs`.
    pub cache_dir: Option<PathBuf>,
    pub namespace: String,
    pub default_size: Option<u64>,
    /// Generations kept per volume (see `retain`).
    pub keep: u64,
    /// The service's snapshots hold only their own blocks (moto): read whole chains, delete nothing.
    pub keep_chain: bool,
}

pub struct EbsBackend {
    inner: Arc<Inner>,
}

/// EBS's listing of a volume's snapshots, and the newest of them a push or pull may start from.
type History = (Vec<SnapshotInfo>, Option<SnapshotInfo>);

struct Inner {
    settings: EbsSettings,
    /// The local copies, their records and the conflicts recorded against them.
    copies: Copies,
    mounter: Arc<dyn Mounter>,
    client: SnapshotClient,
    host_id: String,
    transfers: Arc<Transfers>,
    /// One per volume: a checkpoint runs outside the service's volume lock (its upload may be long), so
    /// attach, detach and checkpoint of one volume take this to never ship from the same base twice.
    ship_locks: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Volumes mounted here -> the snapshot that carries this host's `ferry:mounted` tag, if any.
    mounted: std::sync::Mutex<std::collections::HashMap<String, Option<String>>>,
    /// For the `ferry:mounted` tag: host ids are unambiguous, hostnames are what people recognise.
    hostname: String,
    /// Cluster mode: the catalog that says which snapshot is the newest and who may publish one.
    publisher: std::sync::OnceLock<Arc<dyn super::Publisher>>,
    /// The kept generations of each volume, as last listed (for Status).
    generations: retain::Generations,
}

impl EbsBackend {
    /// `root` is the default cache directory (used unless the settings name one).
    pub async fn new(
        settings: EbsSettings,
        root: PathBuf,
        mount_root: Option<PathBuf>,
        mounter: Arc<dyn Mounter>,
        host_id: String,
    ) -> Result<Self, BackendError> {
        let root = settings.cache_dir.clone().unwrap_or(root);
        let (root, mount_root) = super::prepare_roots(root, mount_root)?;
        let client = SnapshotClient::new(&ClientSettings {
            region: settings.region.clone(),
            endpoint_url: settings.endpoint_url.clone(),
        })
        .await;
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let generations = retain::Generations::load(&root);
        let inner = Arc::new(Inner {
            settings,
            copies: Copies::new(root, mount_root),
            mounter,
            client,
            host_id,
            transfers: Arc::new(Transfers::default()),
            ship_locks: Default::default(),
            mounted: Default::default(),
            hostname: if hostname.is_empty() {
                "unknown".into()
            } else {
                hostname
            },
            publisher: std::sync::OnceLock::new(),
            generations,
        });
        tokio::spawn(refresh_mounted_tags(Arc::downgrade(&inner)));
        retain::spawn_resume(&inner);
        Ok(EbsBackend { inner })
    }

    /// Cluster mode: from now on the cluster catalog names each volume's newest snapshot, and a push is
    /// kept only if the catalog takes it (see `Publisher`).
    pub fn set_publisher(&self, publisher: Arc<dyn super::Publisher>) {
        let _ = self.inner.publisher.set(publisher);
    }
}

/// Refreshes the `ferry:mounted` tag of every volume mounted here until the backend is dropped.
async fn refresh_mounted_tags(inner: std::sync::Weak<Inner>) {
    let mut tick = tokio::time::interval(MOUNTED_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let names: Vec<String> = inner.mounted.lock().recover().keys().cloned().collect();
        for name in names {
            inner.tag_mounted(&name).await;
        }
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Inner {
    fn ship_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.ship_locks
            .lock()
            .recover()
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Writes this host's mounted tag, stamped now, on `snap`.
    async fn set_mounted_tag(&self, name: &str, snap: &str) -> Result<(), EbsError> {
        let value = mounted::tag_value(&self.host_id, &self.hostname, now_secs());
        let key = client::tags::mounted_key(&self.host_id);
        self.client.set_tag(name, snap, &key, &value).await
    }

    /// Deletes this host's mounted tag from `snap` (another host's, under its own key, stays).
    async fn clear_mounted_tag(&self, name: &str, snap: &str) -> Result<(), EbsError> {
        let key = client::tags::mounted_key(&self.host_id);
        self.client.delete_tag(name, snap, &key).await
    }

    /// Tags the snapshot the local copy is based on as mounted here (and untags the one tagged before,
    /// after a checkpoint moved the base). Failures are logged: the tag only informs other hosts' Remove.
    async fn tag_mounted(&self, name: &str) {
        let Ok(copy) = self.copies.load(name) else {
            return;
        };
        let before = match self.mounted.lock().recover().get(name) {
            Some(b) => b.clone(),
            None => return,
        };
        if let Some(snap) = &copy.snapshot {
            if let Err(e) = self.set_mounted_tag(name, snap).await {
                tracing::warn!(volume = name, error = %e, "cannot refresh the mounted tag");
                return;
            }
        }
        if before.is_some() && before != copy.snapshot {
            if let Some(old) = &before {
                if let Err(e) = self.clear_mounted_tag(name, old).await {
                    tracing::warn!(volume = name, error = %e, "cannot clear an old mounted tag");
                }
            }
        }
        if let Some(entry) = self.mounted.lock().recover().get_mut(name) {
            *entry = copy.snapshot.clone();
        }
    }

    /// Starts tagging the volume as mounted here.
    async fn start_mounted(&self, name: &str) {
        self.mounted
            .lock()
            .recover()
            .entry(name.to_string())
            .or_insert(None);
        self.tag_mounted(name).await;
    }

    /// Stops tagging the volume and clears its tag.
    async fn stop_mounted(&self, name: &str) {
        let tagged = self.mounted.lock().recover().remove(name).flatten();
        if let Some(snap) = tagged {
            if let Err(e) = self.clear_mounted_tag(name, &snap).await {
                tracing::warn!(volume = name, error = %e, "cannot clear the mounted tag; it goes stale by itself");
            }
        }
    }

    /// Moves the local copy to the rescue directory and leaves an empty one, so the next mount pulls the
    /// newest snapshot. Returns where the copy went.
    fn set_aside(&self, name: &str) -> Result<PathBuf, BackendError> {
        let p = self.paths(name);
        let target = self.exposed(name);
        if self.mounter.mount_table()?.is_mounted(&target) {
            return Err(BackendError::StillMounted { path: target });
        }
        if !p.dir.is_dir() {
            return Err(ebs_err(EbsError::Invalid {
                volume: name.into(),
                reason: format!(
                    "there is no local copy at {} to set aside; the next mount pulls the newest snapshot",
                    p.dir.display()
                ),
            }));
        }
        let rescue = self.copies.root().join(RESCUE_DIR);
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&rescue)
            .map_err(BackendError::io("create", &rescue))?;
        let stamp = now_secs();
        let mut to = rescue.join(format!("{name}.{stamp}"));
        let mut n = 1;
        while to.exists() {
            to = rescue.join(format!("{name}.{stamp}.{n}"));
            n += 1;
        }
        std::fs::rename(&p.dir, &to).map_err(BackendError::io("move aside", &p.dir))?;
        DirBuilder::new()
            .mode(0o700)
            .create(&p.dir)
            .map_err(BackendError::io("create", &p.dir))?;
        let root = self.copies.root();
        std::fs::File::open(root)
            .and_then(|d| d.sync_all())
            .map_err(BackendError::io("sync", root))?;
        self.copies.forget(name);
        tracing::warn!(volume = name, to = %to.display(), "the local copy was set aside; the next mount pulls the newest snapshot");
        Ok(to)
    }

    fn paths(&self, name: &str) -> Paths {
        self.copies.paths(name)
    }

    fn exposed(&self, name: &str) -> PathBuf {
        self.copies.exposed(name)
    }

    /// What moving blocks needs from this backend.
    fn shipper(&self) -> ship::Shipper<'_> {
        ship::Shipper {
            client: &self.client,
            namespace: &self.settings.namespace,
            concurrency: self.settings.concurrency,
            host_id: &self.host_id,
            transfers: &self.transfers,
            copies: &self.copies,
        }
    }

    /// The volume's snapshots, with the newest completed one; refuses while another host's push of a
    /// newer generation is in flight (see `decide::newest`).
    async fn history(
        &self,
        name: &str,
        own_pending: Option<&str>,
    ) -> Result<History, BackendError> {
        let list: Vec<SnapshotInfo> = self
            .client
            .find(&self.settings.namespace, Some(name))
            .await
            .map_err(ebs_err)?
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        // In a cluster, the catalog's word is the newest: a completed snapshot it does not name is a push
        // in flight or one a fenced host could not publish, and must never be read.
        if let Some(published) = self.publisher.get().and_then(|p| p.published(name)) {
            let newest = published.and_then(|s| {
                list.iter()
                    .find(|x| x.id == s.snapshot && x.state == SnapState::Completed)
                    .cloned()
            });
            return Ok((list, newest));
        }
        let newest = decide::newest(name, &list, own_pending).map_err(ebs_err)?;
        Ok((list, newest))
    }

    /// Settles a snapshot an interrupted push left behind: one EBS completed becomes the copy's base (its
    /// blocks are shipped; the block map is older, so the next push repeats some blocks, which is
    /// harmless), a sealed one still processing is waited for, and an unsealed one is deleted.
    async fn settle_pending(
        &self,
        name: &str,
        copy: &mut LocalCopy,
        list: &[SnapshotInfo],
    ) -> Result<(), BackendError> {
        let Some(id) = copy.pending.clone() else {
            return Ok(());
        };
        let found = list.iter().find(|s| s.id == id);
        let state = match found {
            Some(s) => Some(s.state),
            None => self.client.state(name, &id).await.map_err(ebs_err)?,
        };
        let state = if decide::wait_for_seal(copy.sealed, state) {
            ship::wait_completed(&self.client, name, &id).await?
        } else {
            state
        };
        let mut verdict = decide::settle(state, found);
        if let (Settle::Adopt { generation }, Some(p)) = (&verdict, self.publisher.get()) {
            // In a cluster a completed snapshot counts only once the catalog names it.
            let shipped = Shipped {
                snapshot: id.clone(),
                generation: *generation,
            };
            let named = p
                .published(name)
                .flatten()
                .is_some_and(|s| s.snapshot == id);
            if !named {
                match p.publish(name, &shipped).await {
                    Ok(()) => {}
                    Err(crate::cluster::PublishError::Refused(why)) => {
                        tracing::warn!(volume = name, snapshot = %id, reason = %why, "the cluster refused a push an interruption left; deleting it");
                        verdict = Settle::Delete;
                    }
                    Err(crate::cluster::PublishError::Unknown(why)) => {
                        return Err(ebs_err(EbsError::Invalid {
                            volume: name.into(),
                            reason: format!("cannot tell whether the cluster catalog took snapshot {id} ({why}); try again once etcd answers"),
                        }));
                    }
                }
            }
        }
        match verdict {
            Settle::Adopt { generation } => {
                copy.pending = None;
                copy.sealed = false;
                // It may have raced another host's push of the same generation, like any push.
                ship::resolve_twin(&self.shipper(), name, copy, &id, generation).await?;
                tracing::warn!(volume = name, snapshot = %id, generation,
                    "a push interrupted after its snapshot completed is taken as shipped");
                copy.snapshot = Some(id);
                copy.generation = generation;
            }
            Settle::Delete => {
                tracing::warn!(volume = name, snapshot = %id, "deleting a snapshot an interrupted push left unfinished");
                self.client.delete(name, &id).await.map_err(ebs_err)?;
            }
        }
        copy.pending = None;
        copy.sealed = false;
        self.copies.save(name, copy)
    }

    /// Mounts the volume's local copy, first pulling the newest snapshot or making a fresh filesystem
    /// when `decide::attach` says so.
    async fn attach(
        &self,
        name: &str,
        spec: &VolumeSpec,
        shipped: Option<&Shipped>,
    ) -> Result<Attached, BackendError> {
        let p = self.paths(name);
        let target = self.exposed(name);
        for path in [&p.image, &p.copy, &p.blocks] {
            super::refuse_links(self.copies.root(), path)?;
        }
        if !p.dir.is_dir() {
            let (_, newest) = self.history(name, None).await?;
            match decide::missing_copy(newest.as_ref()) {
                MissingCopy::Lost => {
                    return Err(ebs_err(EbsError::Invalid {
                        volume: name.into(),
                        reason: format!(
                            "the local copy {} is missing and EBS holds no snapshot of this volume: it was never \
                             shipped, so its data existed only there; restore that directory from a backup",
                            p.dir.display()
                        ),
                    }));
                }
                MissingCopy::Pull => {}
            }
            tracing::warn!(volume = name, dir = %p.dir.display(), "the local copy is missing; pulling the newest snapshot");
            DirBuilder::new()
                .mode(0o700)
                .create(&p.dir)
                .map_err(BackendError::io("create", &p.dir))?;
        }
        let mut copy = self.copies.load(name)?;
        let from_copy = |c: &LocalCopy| {
            c.snapshot.clone().map(|snapshot| Shipped {
                snapshot,
                generation: c.generation,
            })
        };
        // A mount left by an earlier run is adopted: the image is in use, and two mounts of one image
        // would corrupt it.
        if self.mounter.mount_table()?.is_mounted(&target) {
            self.start_mounted(name).await;
            return Ok(Attached {
                path: target,
                shipped: from_copy(&copy).or_else(|| shipped.cloned()),
            });
        }
        let (list, newest) = self.history(name, copy.pending.as_deref()).await?;
        self.settle_pending(name, &mut copy, &list).await?;
        self.saw_history(name, &list).await;
        let plan = decide::attach(
            name,
            &AttachFacts {
                copy: &copy,
                have_image: p.image.is_file(),
                have_blocks: p.blocks.is_file(),
                list: &list,
                newest: newest.as_ref(),
                shipped,
                keep_chain: self.settings.keep_chain,
            },
        )
        .map_err(ebs_err)?;
        // A pull is for a Mount: the snapshot it reads is tagged as mounted here while it is read (other
        // hosts' Remove refuses it, and their retention keeps it), instead of with one more call after.
        let early = match &plan {
            AttachPlan::Pull { newest, .. } | AttachPlan::Patch { newest, .. } => {
                Some(newest.snapshot.clone())
            }
            _ => None,
        };
        let tagged_at = std::time::Instant::now();
        let early_tag = async {
            let Some(snap) = &early else {
                return false;
            };
            match self.set_mounted_tag(name, snap).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(volume = name, error = %e, "cannot set the mounted tag; it is set again once mounted");
                    false
                }
            }
        };
        let prepare = async {
            Ok::<bool, BackendError>(match plan {
                AttachPlan::Current => {
                    tracing::info!(
                        volume = name,
                        generation = copy.generation,
                        dirty = copy.dirty,
                        "the local copy is current"
                    );
                    false
                }
                AttachPlan::CatalogAhead {
                    generation,
                    snapshot,
                    newest,
                } => {
                    return Err(ebs_err(EbsError::Invalid {
                        volume: name.into(),
                        reason: format!(
                            "this host's catalog records generation {generation} (snapshot {snapshot}) but EBS holds only up to \
                             generation {newest}: its snapshots were deleted (by a Remove on another host, or outside Ferry). \
                             Run `ferry ebs set-aside {name}` to move this host's copy aside (it prints where) and take what EBS holds now",
                        ),
                    }));
                }
                AttachPlan::Diverged {
                    newest,
                    snapshot,
                    base,
                } => {
                    let err = EbsError::Diverged {
                        volume: name.into(),
                        newest,
                        snapshot,
                        base,
                        image: p.image.display().to_string(),
                    };
                    return Err(self.copies.conflict(name, &mut copy, err));
                }
                AttachPlan::DeletedElsewhere { base, newest } => {
                    let err = EbsError::Invalid {
                        volume: name.into(),
                        reason: format!(
                            "the local copy is based on generation {base} but EBS holds only up to generation \
                             {newest}: its snapshots were deleted (by a Remove on another host, or outside Ferry). \
                             Run `ferry ebs set-aside {name}` to move this copy aside (it prints where) and start from EBS's data",
                        ),
                    };
                    return Err(self.copies.conflict(name, &mut copy, err));
                }
                AttachPlan::Pull { newest, blocks } => {
                    copy = self.pull_whole(name, spec, &p, &blocks, newest).await?;
                    false
                }
                AttachPlan::Patch { newest, blocks } => {
                    let listing = match self.listing(name, &blocks).await {
                        Ok(l) => Some(l),
                        // EBS refused to compare the two (its base was just deleted, or is of another
                        // lineage after all): the whole volume is pulled instead.
                        Err(BackendError::Ebs(e))
                            if e.kind() == "ebs_not_found"
                                || e.kind() == "ebs_invalid_request"
                                || e.kind() == "ebs_invalid" =>
                        {
                            tracing::warn!(volume = name, error = %e, "cannot list the blocks changed since the local copy's base; pulling the volume whole");
                            None
                        }
                        Err(e) => return Err(e),
                    };
                    let (b, size) = (p.blocks.clone(), sized(spec)?.0);
                    let old = match listing {
                        Some(_) => blocking(move || BlockMap::load(&b).map_err(internal)).await?,
                        None => None,
                    };
                    let old = old.filter(|m| BlockMap::count_for(size).is_ok_and(|c| c == m.len()));
                    match (listing, old) {
                        (Some(listing), Some(old)) => {
                            tracing::info!(
                                volume = name,
                                base = copy.generation,
                                newest = newest.generation,
                                blocks = listing.iter().map(|(_, b)| b.len()).sum::<usize>(),
                                "the local copy is an older generation; fetching only what changed since"
                            );
                            // Until the patch completes the image is based on nothing: an interruption makes
                            // the next Mount pull it whole rather than mount a mix of two generations.
                            copy = LocalCopy::default();
                            self.copies.save(name, &copy)?;
                            let b = p.blocks.clone();
                            blocking(move || match std::fs::remove_file(&b) {
                                Ok(()) => Ok(()),
                                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                                Err(e) => Err(BackendError::io("delete", &b)(e)),
                            })
                            .await?;
                            let map = ship::pull(
                                &self.shipper(),
                                name,
                                spec,
                                listing,
                                &p,
                                ship::PullInto::Image(old),
                            )
                            .await;
                            self.pulled_from(name, &blocks);
                            copy = self.pulled(name, &p, map?, newest).await?;
                        }
                        _ => {
                            let whole = match &blocks {
                                decide::Blocks::Changed { newest, .. } => {
                                    decide::Blocks::Newest(newest.clone())
                                }
                                _ => {
                                    return Err(BackendError::Internal(
                                        BackendKind::Ebs,
                                        "the local copy's block map is unreadable; set the copy aside (`ferry ebs set-aside`) to pull the volume whole".into(),
                                    ))
                                }
                            };
                            copy = self.pull_whole(name, spec, &p, &whole, newest).await?;
                        }
                    }
                    false
                }
                AttachPlan::Fresh => {
                    // A new volume: nothing shipped yet, so an empty filesystem it is.
                    let (size, fs) = sized(spec)?;
                    let image = p.image.clone();
                    let mounter = self.mounter.clone();
                    blocking(move || {
                        let tmp = image.with_extension("new");
                        let f = std::fs::OpenOptions::new()
                            .write(true)
                            .create(true)
                            .truncate(true)
                            .mode(0o600)
                            .custom_flags(libc::O_NOFOLLOW)
                            .open(&tmp)
                            .map_err(BackendError::io("create", &tmp))?;
                        f.set_len(size).map_err(BackendError::io("size", &tmp))?;
                        drop(f);
                        mounter.format(&tmp, fs)?;
                        std::fs::rename(&tmp, &image).map_err(BackendError::io("rename", &tmp))
                    })
                    .await?;
                    copy = LocalCopy::default();
                    true
                }
            })
        };
        let (prepared, early_tagged) = tokio::join!(prepare, early_tag);
        let fresh_fs = match prepared {
            Ok(f) => f,
            Err(e) => {
                if let (true, Some(snap)) = (early_tagged, &early) {
                    if let Err(e) = self.clear_mounted_tag(name, snap).await {
                        tracing::warn!(volume = name, error = %e, "cannot clear the mounted tag; it goes stale by itself");
                    }
                }
                return Err(e);
            }
        };
        // The early tag stands for the mount if it names the copy's base and is younger than a refresh.
        let tagged = early_tagged
            && early.is_some()
            && early == copy.snapshot
            && tagged_at.elapsed() < MOUNTED_REFRESH;
        // Dirty before the mount, so a crash while mounted never hides changes; a mount that fails
        // changed nothing, and puts the flag back.
        let was_dirty = copy.dirty;
        copy.dirty = true;
        self.copies.save(name, &copy)?;
        let (_, fs) = sized(spec)?;
        let (image, t, mounter, spec2) = (
            p.image.clone(),
            target.clone(),
            self.mounter.clone(),
            spec.clone(),
        );
        let exposed_root = self
            .copies
            .mount_root()
            .unwrap_or(self.copies.root())
            .to_path_buf();
        let mount = blocking(move || {
            DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&t)
                .map_err(BackendError::io("create", &t))?;
            // An existing mountpoint that is a link would have the volume mounted over its target.
            super::refuse_links(&exposed_root, &t)?;
            mounter.mount_image(&image, &t, fs)?;
            if fresh_fs {
                if let Err(e) = super::local::apply_ownership(&t, &spec2) {
                    let _ = mounter.unmount(&t);
                    return Err(e);
                }
            }
            Ok(())
        });
        // Otherwise the mounted tag (what other hosts' Remove and retention look for) is set while the
        // image mounts: in place before the Mount answers either way.
        let mounted = if tagged {
            self.mounted
                .lock()
                .recover()
                .insert(name.to_string(), copy.snapshot.clone());
            mount.await
        } else {
            let (mounted, ()) = tokio::join!(mount, self.start_mounted(name));
            mounted
        };
        if let Err(e) = mounted {
            self.stop_mounted(name).await;
            copy.dirty = was_dirty;
            if let Err(s) = self.copies.save(name, &copy) {
                tracing::error!(volume = name, error = %s, "cannot clear the changed flag after a failed mount");
            }
            return Err(e);
        }
        if copy.conflict.is_some() {
            self.copies.settled(name, &mut copy);
            self.copies.save(name, &copy)?;
        }
        Ok(Attached {
            path: target,
            shipped: from_copy(&copy).or_else(|| shipped.cloned()),
        })
    }

    /// Unmounts the volume and ships what its local copy may hold unshipped (see `decide::detach`).
    /// Unmounts the image and ships what changed. Also says whether a new generation was shipped, after
    /// which retention is due (see `Backend::detach`, which runs it once the Unmount has answered).
    async fn detach(
        &self,
        name: &str,
        spec: &VolumeSpec,
        shipped: Option<&Shipped>,
    ) -> Result<(Option<Shipped>, bool), BackendError> {
        let target = self.exposed(name);
        let found = if self.paths(name).dir.is_dir() {
            Some(self.copies.load(name)?)
        } else {
            None
        };
        let plan = decide::detach(found.as_ref());
        let mounter = self.mounter.clone();
        let t = target.clone();
        let unmount = blocking(move || release_mount(mounter.as_ref(), &t, WhenBusy::Refuse));
        // A push starts from EBS's listing of the volume's snapshots: it is asked for while the
        // filesystem is unmounted, not after (one call's latency off every Unmount that ships).
        let (unmounted, history) = match (&plan, &found) {
            (DetachPlan::Push, Some(copy)) => {
                let (u, h) = tokio::join!(unmount, self.history(name, copy.pending.as_deref()));
                (u, Some(h))
            }
            _ => (unmount.await, None),
        };
        unmounted?;
        let t = std::time::Instant::now();
        self.wait_until_unheld(name).await?;
        tracing::debug!(
            volume = name,
            unheld_ms = t.elapsed().as_millis() as u64,
            "unmounted"
        );
        let ship = async {
            match (plan, found, history) {
                (DetachPlan::Push, Some(mut copy), Some(history)) => {
                    let before = copy.generation;
                    self.push(name, spec, &mut copy, history?).await?;
                    let pushed = copy.generation != before;
                    Ok(Some((copy, pushed)))
                }
                (DetachPlan::Clean, Some(copy), _) => Ok(Some((copy, false))),
                // No local copy here: the catalog's record stands.
                _ => Ok::<_, BackendError>(None),
            }
        };
        // Clearing the mounted tag is one more call: it goes out beside the push, not before it.
        let ((), shipping) = tokio::join!(self.stop_mounted(name), ship);
        let Some((copy, pushed)) = shipping? else {
            return Ok((shipped.cloned(), false));
        };
        let now = copy
            .snapshot
            .clone()
            .map(|snapshot| Shipped {
                snapshot,
                generation: copy.generation,
            })
            .or_else(|| shipped.cloned());
        Ok((now, pushed))
    }

    /// Retention after an Unmount's push, under the volume's ship lock: the local copy and the catalog's
    /// record (`shipped`, as the Unmount was given it) name what must stay.
    async fn retain_after_unmount(&self, name: &str, shipped: Option<&Shipped>) {
        if !self.paths(name).dir.is_dir() {
            return;
        }
        match self.copies.load(name) {
            Ok(copy) => self.retain_quietly(name, &copy, shipped).await,
            Err(e) => {
                tracing::warn!(volume = name, error = %e, "cannot delete old snapshots now; the next push, `ferry prune` or a restart tries again")
            }
        }
    }

    /// Ships what changed in an unmounted image since its base snapshot (`history`: EBS's listing of the
    /// volume's snapshots), as the next generation.
    async fn push(
        &self,
        name: &str,
        spec: &VolumeSpec,
        copy: &mut LocalCopy,
        history: History,
    ) -> Result<(), BackendError> {
        let p = self.paths(name);
        self.check_base(name, copy, history).await?;
        let (image, blocks) = (p.image.clone(), p.blocks.clone());
        // The scan feeds the upload as it finds changed blocks, instead of hashing the whole image first.
        let mut feed = ship::Feed::spawn(self.settings.concurrency, move |sink| {
            let old = BlockMap::load(&blocks)
                .map_err(internal)?
                .unwrap_or_else(|| BlockMap::zeros(0));
            let found = |c: blockmap::Changed| sink.send(c.into());
            BlockMap::scan_changes(&image, &old, blockmap::hash_threads(), &found).map_err(internal)
        });
        // Whether anything changed is known at the first changed block; the snapshot starts only then.
        let first = feed.first().await;
        let generation = match decide::push(copy, first.as_slice()) {
            PushPlan::Unchanged => {
                // No block at all may also mean a scan that failed at once.
                feed.finish().await?;
                tracing::info!(
                    volume = name,
                    generation = copy.generation,
                    "nothing changed; no snapshot"
                );
                copy.dirty = false;
                return self.copies.save(name, copy);
            }
            PushPlan::Ship { generation } => generation,
        };
        let (id, now) = ship::push(&self.shipper(), name, spec, copy, generation, feed).await?;
        self.publish(name, copy, &id, generation).await?;
        // The snapshot is complete: it is the newest. Record that first, still dirty, so a crash before
        // the block map is saved only makes the next push repeat blocks.
        *copy = LocalCopy {
            snapshot: Some(id),
            generation,
            dirty: true,
            ..LocalCopy::default()
        };
        self.copies.save(name, copy)?;
        let blocks = p.blocks.clone();
        blocking(move || now.save(&blocks).map_err(internal)).await?;
        copy.dirty = false;
        self.copies.settled(name, copy);
        self.copies.save(name, copy)
    }

    /// Ships what changed in a mounted volume: the filesystem is frozen only while the changed blocks
    /// are found and copied aside to a spool file, and thawed before anything is uploaded.
    async fn checkpoint(
        &self,
        name: &str,
        spec: &VolumeSpec,
        shipped: Option<&Shipped>,
    ) -> Result<Option<Shipped>, BackendError> {
        let p = self.paths(name);
        let target = self.exposed(name);
        let mut copy = self.copies.load(name)?;
        let current = |c: &LocalCopy| {
            c.snapshot
                .clone()
                .map(|snapshot| Shipped {
                    snapshot,
                    generation: c.generation,
                })
                .or_else(|| shipped.cloned())
        };
        if !self.mounter.mount_table()?.is_mounted(&target) {
            return Ok(current(&copy));
        }
        let history = self.history(name, copy.pending.as_deref()).await?;
        self.check_base(name, &mut copy, history).await?;
        let spool = p.dir.join("spool");
        let (image, blocks, t, s) = (
            p.image.clone(),
            p.blocks.clone(),
            target.clone(),
            spool.clone(),
        );
        let (now, changed, frozen_for) = blocking(move || {
            let started = std::time::Instant::now();
            let frozen = freeze::Frozen::freeze(&t)?;
            let now = BlockMap::scan(&image).map_err(internal)?;
            let old = BlockMap::load(&blocks)
                .map_err(internal)?
                .unwrap_or_else(|| BlockMap::zeros(now.len()));
            let changed = old.changed(&now);
            copy_aside(&image, &s, &changed)?;
            drop(frozen);
            Ok((now, changed, started.elapsed()))
        })
        .await?;
        tracing::info!(
            volume = name,
            blocks = changed.len(),
            frozen_ms = frozen_for.as_millis() as u64,
            "checkpoint: changed blocks copied aside"
        );
        let generation = match decide::push(&copy, &changed) {
            PushPlan::Unchanged => return Ok(current(&copy)),
            PushPlan::Ship { generation } => generation,
        };
        let feed = ship::spooled(&spool, changed, now, self.settings.concurrency);
        let (id, now) =
            ship::push(&self.shipper(), name, spec, &mut copy, generation, feed).await?;
        self.publish(name, &mut copy, &id, generation).await?;
        // Still mounted, so still dirty: what changed after the freeze ships next time.
        copy = LocalCopy {
            snapshot: Some(id),
            generation,
            dirty: true,
            ..LocalCopy::default()
        };
        self.copies.save(name, &copy)?;
        let blocks = p.blocks.clone();
        blocking(move || {
            now.save(&blocks).map_err(internal)?;
            std::fs::remove_file(&spool).map_err(BackendError::io("remove", &spool))
        })
        .await?;
        self.retain_quietly(name, &copy, shipped).await;
        Ok(current(&copy))
    }

    /// Cluster mode: a complete snapshot becomes the newest only if the catalog takes it from this host;
    /// if not, it is deleted, and the local copy keeps its changes on its old base (reported as diverged
    /// by the next Mount, kept for the operator), so nothing a fenced host made is ever read.
    async fn publish(
        &self,
        name: &str,
        copy: &mut LocalCopy,
        id: &str,
        generation: u64,
    ) -> Result<(), BackendError> {
        let Some(p) = self.publisher.get() else {
            return Ok(());
        };
        let shipped = Shipped {
            snapshot: id.to_string(),
            generation,
        };
        let reason = match p.publish(name, &shipped).await {
            Ok(()) => return Ok(()),
            Err(crate::cluster::PublishError::Unknown(why)) => {
                // It may be the newest already: kept as this copy's pending push, settled (published,
                // or deleted if the catalog refuses it) by the next Mount or Unmount.
                copy.pending = Some(id.to_string());
                copy.sealed = true;
                copy.dirty = true;
                self.copies.save(name, copy)?;
                return Err(ebs_err(EbsError::Invalid {
                    volume: name.to_string(),
                    reason: format!(
                        "cannot tell whether the cluster catalog took snapshot {id} as generation {generation} ({why}); it is kept, and the next mount or unmount settles it"
                    ),
                }));
            }
            Err(crate::cluster::PublishError::Refused(why)) => why,
        };
        tracing::error!(volume = name, snapshot = id, generation, reason = %reason, "the cluster refused this host's snapshot; deleting it and keeping the local changes");
        if let Err(e) = self.client.delete(name, id).await {
            tracing::error!(volume = name, snapshot = id, error = %e, "cannot delete the refused snapshot; it is never read, since the catalog does not name it");
        }
        // The copy stays dirty on its old base: the conflict recorded against it is what `ferry ls` and
        // `ferry inspect` show until the operator sets it aside.
        copy.dirty = true;
        let image = self.paths(name).image.display().to_string();
        Err(self.copies.conflict(
            name,
            copy,
            EbsError::Fenced {
                volume: name.to_string(),
                reason,
                image,
            },
        ))
    }

    /// Retention after a push: a failure is logged, never the push's failure (the data is shipped), and
    /// the next push, `ferry prune` or a restart finishes it.
    async fn retain_quietly(&self, name: &str, copy: &LocalCopy, shipped: Option<&Shipped>) {
        if let Err(e) = self.retain(name, copy, shipped).await {
            tracing::warn!(volume = name, error = %e, "cannot delete old snapshots now; the next push, `ferry prune` or a restart tries again");
        }
    }

    /// Pulls `blocks` into a new image that replaces the local copy's, and records the copy as based on
    /// `newest`.
    async fn pull_whole(
        &self,
        name: &str,
        spec: &VolumeSpec,
        p: &Paths,
        blocks: &decide::Blocks,
        newest: Shipped,
    ) -> Result<LocalCopy, BackendError> {
        let listing = self.listing(name, blocks).await?;
        let map = ship::pull(&self.shipper(), name, spec, listing, p, ship::PullInto::New).await;
        self.pulled_from(name, blocks);
        self.pulled(name, p, map?, newest).await
    }

    /// Lists what a pull reads. On EBS, the snapshot it reads from is first tagged as being pulled by
    /// this host, so another host's retention leaves it alone until the pull is done.
    async fn listing(
        &self,
        name: &str,
        blocks: &decide::Blocks,
    ) -> Result<ship::Listing, BackendError> {
        let reading = match blocks {
            decide::Blocks::Newest(n) | decide::Blocks::Changed { newest: n, .. } => Some(&n.id),
            decide::Blocks::Chain(_) => None,
        };
        let tag = async {
            if let Some(id) = reading {
                let key = format!("{}{}", client::tags::PULLING, self.host_id);
                if let Err(e) = self
                    .client
                    .set_tag(name, id, &key, &now_secs().to_string())
                    .await
                {
                    tracing::warn!(volume = name, snapshot = %id, error = %e, "cannot tag the snapshot as being pulled");
                }
            }
        };
        let shipper = self.shipper();
        let (_, listed) = tokio::join!(tag, ship::list(&shipper, name, blocks));
        listed.map_err(ebs_err)
    }

    /// Clears this host's pulling tag (in the background: nothing waits for it, and a tag left behind
    /// goes stale by itself).
    fn pulled_from(&self, name: &str, blocks: &decide::Blocks) {
        let id = match blocks {
            decide::Blocks::Newest(n) | decide::Blocks::Changed { newest: n, .. } => n.id.clone(),
            decide::Blocks::Chain(_) => return,
        };
        let (client, key, name) = (
            self.client.clone(),
            format!("{}{}", client::tags::PULLING, self.host_id),
            name.to_string(),
        );
        tokio::spawn(async move {
            if let Err(e) = client.delete_tag(&name, &id, &key).await {
                tracing::debug!(volume = name, error = %e, "cannot clear the pulling tag");
            }
        });
    }

    /// Records a completed pull: the image's block map, then the copy as based on `newest`.
    async fn pulled(
        &self,
        name: &str,
        p: &Paths,
        map: BlockMap,
        newest: Shipped,
    ) -> Result<LocalCopy, BackendError> {
        let m = p.blocks.clone();
        blocking(move || map.save(&m).map_err(internal)).await?;
        let copy = LocalCopy {
            snapshot: Some(newest.snapshot),
            generation: newest.generation,
            ..LocalCopy::default()
        };
        self.copies.save(name, &copy)?;
        Ok(copy)
    }

    /// Waits (a few seconds at most) until no other mount namespace has the image's filesystem mounted:
    /// while one does, the filesystem lives on and may still write to the image, so a push now could
    /// ship blocks that change under it. Most such copies are fleeting (a namespace made while the volume
    /// was mounted, about to be torn down); one that stays is logged and the push goes on, as Docker has
    /// already unmounted every container.
    async fn wait_until_unheld(&self, name: &str) -> Result<(), BackendError> {
        let image = self.paths(name).image;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (mounter, img) = (self.mounter.clone(), image.clone());
            let held = blocking(move || {
                mounter
                    .holders(Storage::Image(&img))
                    .map_err(BackendError::from)
            })
            .await?;
            if held.is_empty() {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                tracing::warn!(volume = name, holders = ?held.iter().map(ToString::to_string).collect::<Vec<_>>(), "the image is still mounted in another mount namespace; shipping it all the same");
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Refuses to ship unless the copy's base is still the newest completed snapshot in EBS, after
    /// settling what an interrupted push left.
    async fn check_base(
        &self,
        name: &str,
        copy: &mut LocalCopy,
        (list, newest): History,
    ) -> Result<(), BackendError> {
        let p = self.paths(name);
        self.settle_pending(name, copy, &list).await?;
        let err = match decide::base(copy, newest.as_ref()) {
            BaseCheck::Newest => return Ok(()),
            BaseCheck::DeletedElsewhere { base, newest } => EbsError::Invalid {
                volume: name.into(),
                reason: format!(
                    "the local copy is based on generation {base} but EBS holds only up to generation \
                     {newest}: its snapshots were deleted (by a Remove on another host, or outside Ferry); \
                     nothing was shipped. Run `ferry ebs set-aside {name}` to move this copy aside (it prints where)",
                ),
            },
            BaseCheck::Diverged {
                newest,
                snapshot,
                base,
            } => EbsError::Diverged {
                volume: name.into(),
                newest,
                snapshot,
                base,
                image: p.image.display().to_string(),
            },
        };
        Err(self.copies.conflict(name, copy, err))
    }

    async fn create(&self, name: &str, spec: &VolumeSpec) -> Result<Option<Shipped>, BackendError> {
        let (_, newest) = self.history(name, None).await?;
        if let Some(n) = &newest {
            decide::contradiction(name, n, spec).map_err(ebs_err)?;
        }
        let dir = self.paths(name).dir;
        DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(BackendError::io("create", &dir))?;
        Ok(newest.map(|n| Shipped {
            snapshot: n.id,
            generation: n.generation,
        }))
    }

    fn remove_local(&self, name: &str) -> Result<(), BackendError> {
        let target = self.exposed(name);
        release_mount(self.mounter.as_ref(), &target, WhenBusy::Refuse)?;
        if self.copies.mount_root().is_some() {
            match std::fs::remove_dir(&target) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(BackendError::io("remove the mountpoint", &target)(e)),
            }
        }
        let dir = self.paths(name).dir;
        self.mounted.lock().recover().remove(name);
        self.copies.forget(name);
        self.generations.forget(name);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BackendError::io("delete", &dir)(e)),
        }
    }
}

/// Copies the given blocks of `image`, in order, into a fresh `spool` file.
fn copy_aside(image: &Path, spool: &Path, changed: &[u64]) -> Result<(), BackendError> {
    use std::os::unix::fs::FileExt;
    let src = std::fs::File::open(image).map_err(BackendError::io("open", image))?;
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(spool)
        .map_err(BackendError::io("create", spool))?;
    let mut buf = vec![0u8; blockmap::BLOCK_SIZE as usize];
    for (k, index) in changed.iter().enumerate() {
        src.read_exact_at(&mut buf, index * blockmap::BLOCK_SIZE)
            .map_err(BackendError::io("read", image))?;
        dst.write_all_at(&buf, k as u64 * blockmap::BLOCK_SIZE)
            .map_err(BackendError::io("write", spool))?;
    }
    Ok(())
}

#[async_trait]
impl Backend for EbsBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Ebs
    }

    fn preflight(&self, name: &str, spec: &VolumeSpec) -> Result<(), BackendError> {
        let dir = self.inner.paths(name).dir;
        if std::fs::symlink_metadata(&dir).is_ok() {
            return Err(BackendError::Orphan { path: dir });
        }
        // The local copy is one file of the volume's size, made at the first Mount, and every push a
        // snapshot of that size: refuse now what EBS or that filesystem could never hold.
        match spec.size() {
            Some(size) => {
                super::check_ebs_size(size)?;
                super::check_image_fits(self.inner.copies.root(), size, |s| s)
            }
            None => Ok(()),
        }
    }

    async fn create(&self, name: &str, spec: &VolumeSpec) -> Result<Option<Shipped>, BackendError> {
        self.inner.create(name, spec).await
    }

    /// Deletes only this host's local copy: the snapshots may be another host's volume being adopted.
    async fn abandon(&self, name: &str, _spec: &VolumeSpec) -> Result<(), BackendError> {
        let inner = self.inner.clone();
        let name = name.to_string();
        blocking(move || inner.remove_local(&name)).await
    }

    async fn forget_local(&self, name: &str, _spec: &VolumeSpec) -> Result<(), BackendError> {
        let inner = self.inner.clone();
        let name = name.to_string();
        blocking(move || inner.remove_local(&name)).await
    }

    fn fence(&self, name: &str, _spec: &VolumeSpec) -> Result<(), BackendError> {
        let target = self.inner.exposed(name);
        if !self.inner.mounter.mount_table()?.is_mounted(&target) {
            return Ok(());
        }
        freeze::shut_down(&target)
    }

    async fn remove(&self, name: &str, _spec: &VolumeSpec) -> Result<(), BackendError> {
        let inner = &self.inner;
        // Under the ship lock: the retention pass an Unmount left running deletes snapshots and writes
        // into the volume's directory, both of which this removes.
        let lock = inner.ship_lock(name);
        let _shipping = lock.lock().await;
        let snapshots = inner
            .client
            .find(&inner.settings.namespace, Some(name))
            .await
            .map_err(ebs_err)?;
        // Without a shared catalog, the tag is how this host learns that another one still uses the data
        // it is about to delete.
        if let Some(e) = mounted::elsewhere(&snapshots, &inner.host_id, now_secs()) {
            return Err(e);
        }
        // Unmount first: snapshots are deleted only once nothing here can ship more of them.
        let (i, n) = (inner.clone(), name.to_string());
        blocking(move || release_mount(i.mounter.as_ref(), &i.exposed(&n), WhenBusy::Refuse))
            .await?;
        for (_, s) in &snapshots {
            inner.client.delete(name, &s.id).await.map_err(ebs_err)?;
        }
        tracing::info!(
            volume = name,
            snapshots = snapshots.len(),
            "deleted the volume's snapshots"
        );
        let (i, n) = (inner.clone(), name.to_string());
        blocking(move || i.remove_local(&n)).await
    }

    async fn attach(
        &self,
        name: &str,
        spec: &VolumeSpec,
        shipped: Option<&Shipped>,
    ) -> Result<Attached, BackendError> {
        let lock = self.inner.ship_lock(name);
        let _shipping = lock.lock().await;
        self.inner.attach(name, spec, shipped).await
    }

    async fn detach(
        &self,
        name: &str,
        spec: &VolumeSpec,
        shipped: Option<&Shipped>,
    ) -> Result<Option<Shipped>, BackendError> {
        let lock = self.inner.ship_lock(name);
        let shipping = lock.clone().lock_owned().await;
        let (now, pushed) = self.inner.detach(name, spec, shipped).await?;
        if pushed {
            // Deleting old generations is not what the Unmount waits for: it runs right after, still
            // under the ship lock, so the next Mount or Unmount of the volume here starts once it is done.
            let (inner, name, record) = (self.inner.clone(), name.to_string(), shipped.cloned());
            tokio::spawn(async move {
                let _shipping = shipping;
                inner.retain_after_unmount(&name, record.as_ref()).await;
            });
        }
        Ok(now)
    }

    async fn checkpoint(
        &self,
        name: &str,
        spec: &VolumeSpec,
        shipped: Option<&Shipped>,
    ) -> Result<Option<Shipped>, BackendError> {
        let lock = self.inner.ship_lock(name);
        let _shipping = lock.lock().await;
        self.inner.checkpoint(name, spec, shipped).await
    }

    fn is_attached(&self, name: &str, _spec: &VolumeSpec, table: &MountTable) -> Option<bool> {
        Some(table.is_mounted(&self.inner.exposed(name)))
    }

    /// The local copy is a loop-mounted image, as a capped local volume's: a container still holds the
    /// volume exactly where that image's filesystem is mounted in its namespace.
    fn holders(&self, name: &str, _spec: &VolumeSpec) -> Option<Result<Vec<Holder>, BackendError>> {
        let image = self.inner.paths(name).image;
        Some(
            self.inner
                .mounter
                .holders(Storage::Image(&image))
                .map_err(BackendError::from),
        )
    }

    fn status(&self, name: &str, spec: &VolumeSpec) -> Map<String, Value> {
        let mut m = Map::new();
        if let Ok((size, fs)) = sized(spec) {
            m.insert("size".into(), json!(format_size(size)));
            m.insert("size_bytes".into(), json!(size));
            m.insert("fs".into(), json!(fs.as_str()));
        }
        m.insert("image".into(), json!(self.inner.paths(name).image));
        m.insert("namespace".into(), json!(self.inner.settings.namespace));
        m.insert("region".into(), json!(self.inner.settings.region));
        if let Some(kept) = self.inner.generations.get(name) {
            m.insert("generations".into(), json!(kept));
        }
        m
    }

    async fn check(&self) -> Result<Map<String, Value>, BackendError> {
        let inner = &self.inner;
        let all = inner
            .client
            .find(&inner.settings.namespace, None)
            .await
            .map_err(ebs_err)?;
        let mut m = Map::new();
        m.insert("region".into(), json!(inner.settings.region));
        if let Some(url) = &inner.settings.endpoint_url {
            m.insert("endpoint_url".into(), json!(url));
        }
        m.insert("namespace".into(), json!(inner.settings.namespace));
        m.insert("snapshots".into(), json!(all.len()));
        Ok(m)
    }

    fn problem(&self, name: &str) -> Option<String> {
        self.inner.copies.problem(name)
    }

    async fn set_aside(&self, name: &str, _spec: &VolumeSpec) -> Result<PathBuf, BackendError> {
        // Under the ship lock: no checkpoint may be reading the image being moved.
        let lock = self.inner.ship_lock(name);
        let _shipping = lock.lock().await;
        let (inner, n) = (self.inner.clone(), name.to_string());
        blocking(move || inner.set_aside(&n)).await
    }

    async fn prune(
        &self,
        name: &str,
        _spec: &VolumeSpec,
        shipped: Option<&Shipped>,
    ) -> Result<Value, BackendError> {
        // Under the ship lock: a push of this host's must not start from a snapshot being deleted.
        let lock = self.inner.ship_lock(name);
        let _shipping = lock.lock().await;
        let copy = self.inner.copies.load(name)?;
        let pruned = self.inner.retain(name, &copy, shipped).await?;
        serde_json::to_value(pruned).map_err(internal)
    }

    fn ships_data(&self) -> bool {
        true
    }

    fn transfers(&self) -> Option<TransferTotals> {
        let t = &self.inner.transfers;
        Some(TransferTotals {
            blocks_shipped: t.blocks_shipped.load(Ordering::Relaxed),
            bytes_shipped: t.bytes_shipped.load(Ordering::Relaxed),
            blocks_pulled: t.blocks_pulled.load(Ordering::Relaxed),
            bytes_pulled: t.bytes_pulled.load(Ordering::Relaxed),
        })
    }
}

//! Bounded history: once a push completed (and on `ferry prune`), a volume's snapshots older than its newest
//! `[ebs] keep` generations are deleted, so storage and the cost of a Mount stop growing with the volume's
//! age. Which ones is `decide::retire`'s answer; this module lists, records its intent and deletes.
//!
//! Safe on EBS only, where a child snapshot keeps the blocks it read through a deleted parent; with
//! `[ebs] keep_chain` (moto) nothing is ever deleted. A crash mid-retention is finished after restart:
//! the ids to delete go to `<name>/retiring` before the first delete, and start-up deletes whichever of
//! them a fresh listing still finds deletable. It also keeps the list of kept generations that `ferry
//! inspect` shows (`<name>/generations.json`, and in memory).
//!
//! It must not touch the local copy's image, block map or `copy.json`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::client::{SnapState, SnapshotInfo};
use super::copy::LocalCopy;
use super::errors::{blocking, internal};
use super::{decide, now_secs, Inner};
use crate::backend::{BackendError, Shipped};
use crate::sync::Recover;

/// The intent file, under the volume's directory.
const RETIRING: &str = "retiring";
/// The kept generations, under the volume's directory.
const GENERATIONS: &str = "generations.json";
/// How long after start-up an interrupted retention is finished: long enough for cluster mode to name
/// each volume's newest snapshot first.
const RESUME_AFTER: Duration = Duration::from_secs(3);

/// DeleteSnapshot calls in flight at once.
const DELETES_IN_FLIGHT: usize = 4;

type Deleted = Result<Result<String, super::client::EbsError>, tokio::task::JoinError>;

fn collect(r: Option<Deleted>, done: &mut Vec<String>, failed: &mut Option<BackendError>) {
    match r {
        Some(Ok(Ok(id))) => done.push(id),
        Some(Ok(Err(e))) => {
            failed.get_or_insert(super::errors::ebs_err(e));
        }
        Some(Err(e)) => {
            failed.get_or_insert(internal(e));
        }
        None => {}
    }
}

/// One kept generation, as `ferry inspect` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    pub generation: u64,
    pub snapshot: String,
    /// When its push started, in seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<u64>,
    /// The bytes this generation changed (its own blocks), where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_bytes: Option<u64>,
}

/// What one retention pass did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pruned {
    pub volume: String,
    pub keep: u64,
    /// The completed generations left, newest first.
    pub kept: Vec<Generation>,
    /// The snapshots deleted by this pass.
    pub deleted: Vec<String>,
    /// Why nothing was deleted, when retention does not apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// `<name>/retiring`: what a retention pass set out to delete, and what it was told to keep.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Retiring {
    protect: Vec<String>,
    delete: Vec<String>,
}

/// The kept generations of every volume with a local copy, as last listed.
#[derive(Default)]
pub(super) struct Generations(std::sync::Mutex<HashMap<String, Vec<Generation>>>);

impl Generations {
    /// Reads every volume's `generations.json` under `root` (at start, so Status answers from memory).
    pub(super) fn load(root: &std::path::Path) -> Generations {
        let mut all = HashMap::new();
        if let Ok(dirs) = std::fs::read_dir(root) {
            for dir in dirs.flatten() {
                let name = dir.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                let read = std::fs::read(dir.path().join(GENERATIONS))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Vec<Generation>>(&b).ok());
                if let Some(g) = read {
                    all.insert(name, g);
                }
            }
        }
        Generations(std::sync::Mutex::new(all))
    }

    pub(super) fn get(&self, name: &str) -> Option<Vec<Generation>> {
        self.0.lock().recover().get(name).cloned()
    }

    pub(super) fn forget(&self, name: &str) {
        self.0.lock().recover().remove(name);
    }
}

/// The completed generations in `list`, newest first, leaving out `gone`.
fn kept(list: &[SnapshotInfo], gone: &[String]) -> Vec<Generation> {
    let mut out: Vec<Generation> = list
        .iter()
        .filter(|s| s.state == SnapState::Completed && !gone.contains(&s.id))
        .map(|s| Generation {
            generation: s.generation,
            snapshot: s.id.clone(),
            started: s.started,
            changed_bytes: s.blocks.map(|b| b * super::blockmap::BLOCK_SIZE),
        })
        .collect();
    out.sort_by(|a, b| (b.generation, &b.snapshot).cmp(&(a.generation, &a.snapshot)));
    out
}

impl Inner {
    /// Deletes the volume's snapshots that retention no longer keeps (see `decide::retire`). `copy` and
    /// `shipped` (the catalog's record) name snapshots that must stay whatever their age. A failure to
    /// delete is returned; what was deleted before it stays deleted, and the intent file makes the next
    /// pass (or start-up) finish the job.
    pub(super) async fn retain(
        &self,
        name: &str,
        copy: &LocalCopy,
        shipped: Option<&Shipped>,
    ) -> Result<Pruned, BackendError> {
        let keep = self.settings.keep;
        let (list, newest) = self.history(name, copy.pending.as_deref()).await?;
        let mut out = Pruned {
            volume: name.to_string(),
            keep,
            kept: kept(&list, &[]),
            deleted: Vec::new(),
            note: None,
        };
        if self.settings.keep_chain {
            out.note = Some(
                "[ebs] keep_chain is set: this service's snapshots hold only their own blocks, so every \
                 generation is needed and none is deleted"
                    .into(),
            );
            self.record_generations(name, out.kept.clone()).await;
            return Ok(out);
        }
        let Some(newest) = newest else {
            out.note = Some("nothing was shipped yet".into());
            return Ok(out);
        };
        let protect: Vec<String> = [
            copy.snapshot.clone(),
            copy.pending.clone(),
            shipped.map(|s| s.snapshot.clone()),
        ]
        .into_iter()
        .flatten()
        .collect();
        let refs: Vec<&str> = protect.iter().map(String::as_str).collect();
        let victims: Vec<String> = decide::retire(&list, &newest, keep, &refs, now_secs())
            .into_iter()
            .map(|s| s.id)
            .collect();
        if victims.is_empty() {
            // An intent left by an interrupted pass is covered by this one's listing.
            self.retired(name).await?;
        } else {
            let intent = Retiring {
                protect: protect.clone(),
                delete: victims.clone(),
            };
            let path = self.paths(name).dir.join(RETIRING);
            let bytes = serde_json::to_vec(&intent).map_err(internal)?;
            blocking(move || {
                crate::durable::write_atomic(&path, &bytes)
                    .map_err(|e| BackendError::io(e.op, &e.path)(e.source))
            })
            .await?;
            out.deleted = self.delete_all(name, &victims).await?;
            self.retired(name).await?;
            tracing::info!(
                volume = name,
                keep,
                deleted = out.deleted.len(),
                newest = newest.generation,
                "deleted snapshots older than the generations kept"
            );
        }
        out.kept = kept(&list, &out.deleted);
        self.record_generations(name, out.kept.clone()).await;
        Ok(out)
    }

    /// Deletes the snapshots, a few at a time, oldest first; returns the ids deleted, or the first
    /// failure once the deletions in flight are done.
    async fn delete_all(&self, name: &str, ids: &[String]) -> Result<Vec<String>, BackendError> {
        let mut set = tokio::task::JoinSet::new();
        let mut done = Vec::with_capacity(ids.len());
        let mut failed = None;
        for id in ids {
            if set.len() >= DELETES_IN_FLIGHT {
                collect(set.join_next().await, &mut done, &mut failed);
            }
            let (client, volume, id) = (self.client.clone(), name.to_string(), id.clone());
            set.spawn(async move { client.delete(&volume, &id).await.map(|()| id) });
        }
        while let Some(r) = set.join_next().await {
            collect(Some(r), &mut done, &mut failed);
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }

    /// Removes the intent file once every deletion it named is done.
    async fn retired(&self, name: &str) -> Result<(), BackendError> {
        let path = self.paths(name).dir.join(RETIRING);
        blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BackendError::io("remove", &path)(e)),
        })
        .await
    }

    /// Keeps the kept generations for Status, in memory and in `generations.json`.
    async fn record_generations(&self, name: &str, kept: Vec<Generation>) {
        let dir = self.paths(name).dir;
        if !dir.is_dir() {
            return;
        }
        self.generations
            .0
            .lock()
            .recover()
            .insert(name.to_string(), kept.clone());
        let path = dir.join(GENERATIONS);
        let written = blocking(move || {
            let bytes = serde_json::to_vec_pretty(&kept).map_err(internal)?;
            crate::durable::write_atomic(&path, &bytes)
                .map_err(|e| BackendError::io(e.op, &e.path)(e.source))
        })
        .await;
        if let Err(e) = written {
            tracing::warn!(volume = name, error = %e, "cannot record the kept generations");
        }
    }

    /// Records the kept generations from a listing made for another reason (a Mount).
    pub(super) async fn saw_history(&self, name: &str, list: &[SnapshotInfo]) {
        self.record_generations(name, kept(list, &[])).await;
    }

    /// Finishes every retention a crash interrupted: deletes whichever of the snapshots it named a fresh
    /// listing still finds deletable, keeping what it was told to keep.
    async fn resume_one(&self, name: &str) -> Result<usize, BackendError> {
        let path = self.paths(name).dir.join(RETIRING);
        let p = path.clone();
        let intent: Retiring = blocking(move || {
            let bytes = std::fs::read(&p).map_err(BackendError::io("read", &p))?;
            serde_json::from_slice(&bytes).map_err(internal)
        })
        .await?;
        let lock = self.ship_lock(name);
        let _shipping = lock.lock().await;
        let copy = self.copies.load(name)?;
        let (list, newest) = self.history(name, copy.pending.as_deref()).await?;
        let mut protect = intent.protect.clone();
        protect.extend(copy.snapshot.clone());
        protect.extend(copy.pending.clone());
        let refs: Vec<&str> = protect.iter().map(String::as_str).collect();
        let still: Vec<String> = match &newest {
            Some(n) if !self.settings.keep_chain => {
                decide::retire(&list, n, self.settings.keep, &refs, now_secs())
                    .into_iter()
                    .map(|s| s.id)
                    .filter(|id| intent.delete.contains(id))
                    .collect()
            }
            _ => Vec::new(),
        };
        let deleted = self.delete_all(name, &still).await?;
        self.retired(name).await?;
        self.record_generations(name, kept(&list, &deleted)).await;
        Ok(deleted.len())
    }
}

/// At start-up: finishes the retentions a crash interrupted, once cluster mode had time to load.
async fn resume(inner: std::sync::Weak<Inner>) {
    tokio::time::sleep(RESUME_AFTER).await;
    let Some(inner) = inner.upgrade() else {
        return;
    };
    let root = inner.copies.root().to_path_buf();
    let names: Vec<String> = match std::fs::read_dir(&root) {
        Ok(dirs) => dirs
            .flatten()
            .filter(|d| d.path().join(RETIRING).is_file())
            .map(|d| d.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect(),
        Err(_) => return,
    };
    for name in names {
        match inner.resume_one(&name).await {
            Ok(n) => {
                tracing::info!(volume = %name, deleted = n, "finished a retention interrupted by a restart")
            }
            Err(e) => {
                tracing::warn!(volume = %name, error = %e, "cannot finish an interrupted retention yet; the next push or `ferry prune` does")
            }
        }
    }
}

/// Starts `resume` in the background; it holds the backend only weakly, so a dropped backend ends it.
pub(super) fn spawn_resume(inner: &Arc<Inner>) {
    tokio::spawn(resume(Arc::downgrade(inner)));
}

//! Moving blocks: pushing the changed blocks of an image as a new snapshot, and pulling a snapshot chain
//! into a fresh image. Both keep `concurrency` blocks in flight and count what they move.
//!
//! A pull writes a new file beside the image and renames it into place only when every block arrived and
//! passed its checksum, so a crash or an error mid-pull never leaves a half-pulled image that looks whole.

use std::collections::HashMap;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::blockmap::{zero_block_digest, BlockHash, BlockMap, BLOCK_SIZE};
use super::client::{tags, EbsError, SnapState, SnapshotInfo};
use super::{blocking, data_options, ebs_err, internal, sized, Inner, LocalCopy, Paths};
use crate::backend::BackendError;
use crate::spec::VolumeSpec;

/// How often a long pull or push reports its progress in the log.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// The snapshots whose blocks make up `newest`, newest first, following each one's parent tag.
pub(super) fn chain(
    name: &str,
    list: &[SnapshotInfo],
    newest: &SnapshotInfo,
) -> Result<Vec<SnapshotInfo>, BackendError> {
    let by_id: HashMap<&str, &SnapshotInfo> = list
        .iter()
        .filter(|s| s.state == SnapState::Completed)
        .map(|s| (s.id.as_str(), s))
        .collect();
    let mut out = vec![newest.clone()];
    let mut at = newest;
    while let Some(parent) = &at.parent {
        let Some(p) = by_id.get(parent.as_str()) else {
            return Err(ebs_err(EbsError::Invalid {
                volume: name.into(),
                reason: format!(
                    "snapshot {} (generation {}) builds on {parent}, which is missing or not completed; \
                     the volume's history was deleted in part outside Ferry",
                    at.id, at.generation
                ),
            }));
        };
        // Generations strictly decrease along the chain, so a tag loop cannot spin forever.
        if p.generation >= at.generation {
            return Err(ebs_err(EbsError::Invalid {
                volume: name.into(),
                reason: format!("snapshot {parent} is tagged as its own descendant"),
            }));
        }
        out.push((*p).clone());
        at = p;
    }
    Ok(out)
}

/// Pulls the chain into `image.pull`, verifying every block, then renames it over the image. Returns the
/// hash of every block as pulled.
pub(super) async fn pull(
    inner: &Inner,
    name: &str,
    spec: &VolumeSpec,
    chain: &[SnapshotInfo],
    p: &Paths,
) -> Result<BlockMap, BackendError> {
    let (size, _) = sized(spec)?;
    let count = BlockMap::count_for(size).map_err(internal)?;
    let tmp = p.image.with_extension("pull");
    let file = {
        let tmp = tmp.clone();
        blocking(move || {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)
                .map_err(BackendError::io("create", &tmp))?;
            f.set_len(size).map_err(BackendError::io("size", &tmp))?;
            Ok(Arc::new(f))
        })
        .await?
    };
    let started = Instant::now();
    let mut filled = vec![false; count as usize];
    let mut map = BlockMap::zeros(count);
    let mut pulled = 0u64;
    let mut last_report = Instant::now();
    let concurrency = inner.settings.concurrency.max(1);
    // `net` bounds the requests in flight (the configured concurrency); `held` bounds the blocks
    // requested or received but not yet written, so checking and writing a block happens after its
    // request's slot went to the next block, and memory stays at 2 x concurrency blocks.
    let net = Arc::new(Semaphore::new(concurrency));
    let held = Arc::new(Semaphore::new(2 * concurrency));
    // Newest first: a block the newest snapshot lists is the one to keep, and older snapshots fill only
    // the blocks no newer one listed (real EBS lists inherited blocks too; moto lists only a snapshot's own).
    for snap in chain {
        let blocks = inner
            .client
            .list_blocks(name, &snap.id)
            .await
            .map_err(ebs_err)?;
        let mut set: JoinSet<Result<(u64, BlockHash), BackendError>> = JoinSet::new();
        for b in blocks {
            let Some(slot) = filled.get_mut(b.index as usize) else {
                continue;
            };
            if *slot {
                continue;
            }
            *slot = true;
            let hold = held.clone().acquire_owned().await.map_err(internal)?;
            let (client, volume, id, net) = (
                inner.client.clone(),
                name.to_string(),
                snap.id.clone(),
                net.clone(),
            );
            let (out, path) = (file.clone(), tmp.clone());
            set.spawn(async move {
                let _hold = hold;
                let fetched = {
                    let _slot = net.acquire_owned().await.map_err(internal)?;
                    client
                        .fetch_block(&volume, &id, &b)
                        .await
                        .map_err(ebs_err)?
                };
                let (data, digest) = fetched.verify().map_err(ebs_err)?;
                let hash = write_block(&out, &path, b.index, &data, digest)?;
                Ok((b.index, hash))
            });
            while let Some(done) = set.try_join_next() {
                let (index, hash) = done.map_err(internal)??;
                map.set(index, hash);
                pulled += 1;
                if pulled.is_multiple_of(WRITEBACK_EVERY) {
                    start_writeback(&file);
                }
            }
            if last_report.elapsed() >= PROGRESS_EVERY {
                last_report = Instant::now();
                tracing::info!(volume = name, blocks = pulled, mib = pulled / 2, "pulling");
            }
        }
        while let Some(done) = set.join_next().await {
            let (index, hash) = done.map_err(internal)??;
            map.set(index, hash);
            pulled += 1;
        }
    }
    inner
        .transfers
        .blocks_pulled
        .fetch_add(pulled, Ordering::Relaxed);
    inner
        .transfers
        .bytes_pulled
        .fetch_add(pulled * BLOCK_SIZE, Ordering::Relaxed);
    let (image, t) = (p.image.clone(), tmp.clone());
    blocking(move || {
        file.sync_all().map_err(BackendError::io("sync", &t))?;
        std::fs::rename(&t, &image).map_err(BackendError::io("rename", &t))
    })
    .await?;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        volume = name,
        snapshots = chain.len(),
        blocks = pulled,
        seconds = format!("{secs:.2}"),
        "pulled the newest snapshot"
    );
    Ok(map)
}

/// Blocks pulled between two starts of writeback: 64 MiB.
const WRITEBACK_EVERY: u64 = 128;

/// Starts writing the pulled image's dirty pages to disk without waiting, so the fsync that makes the
/// pull durable at the end has little left to do. Errors do not matter here: that fsync reports them.
fn start_writeback(file: &Arc<std::fs::File>) {
    use std::os::unix::io::AsRawFd;
    let file = file.clone();
    tokio::task::spawn_blocking(move || {
        // SAFETY: the descriptor is open for as long as `file` lives, which is past this call; the
        // call only reads its arguments.
        unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    });
}

/// Writes one pulled block (all-zero blocks stay holes) and returns its hash for the block map.
fn write_block(
    file: &std::fs::File,
    path: &std::path::Path,
    index: u64,
    data: &[u8],
    digest: [u8; 32],
) -> Result<BlockHash, BackendError> {
    if data.iter().all(|b| *b == 0) {
        return Ok(None);
    }
    // A 512 KiB pwrite into the page cache takes tens of microseconds; not worth a thread hop.
    file.write_all_at(data, index * BLOCK_SIZE)
        .map_err(BackendError::io("write", path))?;
    Ok(Some(digest))
}

/// Where the blocks of a push are read from: block `indices[k]` of the volume is at byte `offsets[k]` of
/// `path` (the image itself, or a checkpoint's spool file).
pub(super) struct BlockSource<'a> {
    pub path: &'a std::path::Path,
    pub indices: &'a [u64],
    pub offsets: &'a [u64],
    /// The scan's hashes of the blocks as they are now, so no block is hashed twice.
    pub now: &'a BlockMap,
}

/// Ships the changed blocks as a snapshot of `generation` on top of the copy's base, and returns its id
/// once EBS reports it completed.
pub(super) async fn push(
    inner: &Inner,
    name: &str,
    spec: &VolumeSpec,
    copy: &mut LocalCopy,
    generation: u64,
    src: BlockSource<'_>,
) -> Result<String, BackendError> {
    let (changed, source, offsets) = (src.indices, src.path, src.offsets);
    let zero = zero_block_digest();
    debug_assert_eq!(changed.len(), offsets.len());
    let (size, _) = sized(spec)?;
    let options = serde_json::to_string(&data_options(spec)).map_err(internal)?;
    let tag_list = [
        (tags::NAMESPACE, inner.settings.namespace.clone()),
        (tags::VOLUME, name.to_string()),
        (tags::GENERATION, generation.to_string()),
        (tags::PARENT, copy.snapshot.clone().unwrap_or_default()),
        (tags::HOST, inner.host_id.clone()),
        (tags::OPTIONS, options),
    ];
    let token = client_token(&inner.host_id, name, generation);
    let id = inner
        .client
        .start_snapshot(name, size, copy.snapshot.as_deref(), &tag_list, &token)
        .await
        .map_err(ebs_err)?;
    copy.pending = Some(id.clone());
    copy.sealed = false;
    inner.save_copy(name, copy)?;
    let started = Instant::now();
    let concurrency = inner.settings.concurrency.max(1);
    let image = std::fs::File::open(source).map_err(BackendError::io("open", source))?;
    // One thread reads the blocks ahead, in order, into a queue as deep as the concurrency, so a request
    // slot that frees finds its block already in memory.
    let (tx, mut rx) =
        tokio::sync::mpsc::channel::<Result<(u64, Bytes), BackendError>>(concurrency);
    let (indices, offs, path) = (changed.to_vec(), offsets.to_vec(), source.to_path_buf());
    // The reader ends by itself: at the last block, at a read error, or when the push stops and drops
    // the queue.
    tokio::task::spawn_blocking(move || {
        for (index, offset) in indices.into_iter().zip(offs) {
            let mut buf = vec![0u8; BLOCK_SIZE as usize];
            let read = image
                .read_exact_at(&mut buf, offset)
                .map(|()| (index, Bytes::from(buf)))
                .map_err(BackendError::io("read", &path));
            let failed = read.is_err();
            // A closed queue means the push stopped: nothing more to read.
            if tx.blocking_send(read).is_err() || failed {
                return;
            }
        }
    });
    let sem = Arc::new(Semaphore::new(concurrency));
    let mut set: JoinSet<Result<(), BackendError>> = JoinSet::new();
    let mut shipped = 0u64;
    let mut last_report = Instant::now();
    while let Some(read) = rx.recv().await {
        let (index, data) = read?;
        let permit = sem.clone().acquire_owned().await.map_err(internal)?;
        let digest = src.now.get(index).unwrap_or(zero);
        let (client, volume, snap) = (inner.client.clone(), name.to_string(), id.clone());
        set.spawn(async move {
            let _permit = permit;
            client
                .put_block(&volume, &snap, index, data, &digest)
                .await
                .map_err(ebs_err)
        });
        while let Some(done) = set.try_join_next() {
            done.map_err(internal)??;
            shipped += 1;
        }
        if last_report.elapsed() >= PROGRESS_EVERY {
            last_report = Instant::now();
            tracing::info!(
                volume = name,
                blocks = shipped,
                of = changed.len(),
                "shipping"
            );
        }
    }
    while let Some(done) = set.join_next().await {
        done.map_err(internal)??;
        shipped += 1;
    }
    if shipped != changed.len() as u64 {
        // Only a reader that died without saying why gets here; completing would be refused anyway.
        return Err(internal(format!(
            "read {shipped} of the {} changed blocks of {}",
            changed.len(),
            source.display()
        )));
    }
    inner
        .transfers
        .blocks_shipped
        .fetch_add(shipped, Ordering::Relaxed);
    inner
        .transfers
        .bytes_shipped
        .fetch_add(shipped * BLOCK_SIZE, Ordering::Relaxed);
    let done = inner
        .client
        .complete(name, &id, changed.len() as u64)
        .await
        .map_err(ebs_err)?;
    copy.sealed = true;
    inner.save_copy(name, copy)?;
    if !done {
        match inner.wait_completed(name, &id).await? {
            Some(SnapState::Completed) => {}
            Some(SnapState::Pending) => {
                return Err(ebs_err(EbsError::Pending {
                    volume: name.into(),
                    snapshot: id,
                    generation,
                    host: inner.host_id.clone(),
                }))
            }
            _ => {
                return Err(ebs_err(EbsError::Api {
                    op: "CompleteSnapshot",
                    volume: name.into(),
                    what: format!("EBS reported snapshot {id} as failed after it was sealed"),
                    kind: "ebs_snapshot_failed",
                }))
            }
        }
    }
    resolve_twin(inner, name, copy, &id, generation).await?;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        volume = name,
        snapshot = %id,
        generation,
        blocks = shipped,
        seconds = format!("{secs:.2}"),
        "shipped a snapshot"
    );
    Ok(id)
}

/// Settles a race for one generation between hosts that share no catalog: two pushes may start from the
/// same base at once, and both complete. The snapshot with the lexically smaller id wins; every host applies
/// the same rule to the same listing, so exactly one survives. The loser deletes its own snapshot and keeps
/// its data locally as a recorded conflict. A smaller rival still pending is waited for (up to `SEAL_WAIT`),
/// since it may complete; one that never does makes this push lose, which keeps data, never two histories.
pub(super) async fn resolve_twin(
    inner: &Inner,
    name: &str,
    copy: &mut LocalCopy,
    id: &str,
    generation: u64,
) -> Result<(), BackendError> {
    let deadline = Instant::now() + super::SEAL_WAIT;
    loop {
        let list = inner
            .client
            .find(&inner.settings.namespace, Some(name))
            .await
            .map_err(ebs_err)?;
        let rival = list
            .into_iter()
            .map(|(_, s)| s)
            .filter(|s| {
                s.generation == generation && s.state != SnapState::Failed && s.id.as_str() < id
            })
            .min_by(|a, b| a.id.cmp(&b.id));
        let Some(rival) = rival else {
            return Ok(());
        };
        if rival.state == SnapState::Pending && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        }
        tracing::warn!(volume = name, ours = id, theirs = %rival.id, generation,
            "another host shipped the same generation at once and won; deleting this host's snapshot");
        inner.client.delete(name, id).await.map_err(ebs_err)?;
        copy.pending = None;
        copy.sealed = false;
        let host = if rival.host.is_empty() {
            "unknown"
        } else {
            rival.host.as_str()
        };
        let err = EbsError::Raced {
            volume: name.into(),
            generation,
            winner: format!("host {host} (snapshot {})", rival.id),
            image: inner.paths(name).image.display().to_string(),
        };
        return Err(inner.conflict(name, copy, err));
    }
}

/// A token unique to this attempt (StartSnapshot treats a repeated token as a retry of the same start).
fn client_token(host: &str, name: &str, generation: u64) -> String {
    use sha2::{Digest, Sha256};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let digest = Sha256::digest(format!("{host}/{name}/{generation}/{nanos}"));
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, generation: u64, parent: Option<&str>, state: SnapState) -> SnapshotInfo {
        SnapshotInfo {
            id: id.into(),
            state,
            generation,
            parent: parent.map(str::to_string),
            host: "h".into(),
            options: Default::default(),
            mounted: None,
        }
    }

    #[test]
    fn the_chain_follows_parents_and_refuses_holes_and_loops() {
        let list = vec![
            snap("a", 1, None, SnapState::Completed),
            snap("b", 2, Some("a"), SnapState::Completed),
            snap("c", 3, Some("b"), SnapState::Completed),
            // Another host's rejected branch and a crashed push: never part of c's chain.
            snap("x", 3, Some("b"), SnapState::Failed),
            snap("p", 4, Some("c"), SnapState::Pending),
        ];
        let ids: Vec<String> = chain("v", &list, &list[2])
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(ids, ["c", "b", "a"]);

        let holed = vec![
            snap("a", 1, None, SnapState::Completed),
            snap("c", 3, Some("b"), SnapState::Completed),
        ];
        let err = chain("v", &holed, &holed[1]).unwrap_err().to_string();
        assert!(
            err.contains("builds on b") && err.contains("missing"),
            "{err}"
        );
        // A parent that is not completed is a hole too.
        let pending_parent = vec![
            snap("a", 1, None, SnapState::Pending),
            snap("b", 2, Some("a"), SnapState::Completed),
        ];
        assert!(chain("v", &pending_parent, &pending_parent[1]).is_err());

        let looped = vec![
            snap("a", 2, Some("b"), SnapState::Completed),
            snap("b", 3, Some("a"), SnapState::Completed),
        ];
        let err = chain("v", &looped, &looped[1]).unwrap_err().to_string();
        assert!(err.contains("its own descendant"), "{err}");
    }
}

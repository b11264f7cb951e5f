//! Moving blocks: pushing the changed blocks of an image as a new snapshot, and pulling a snapshot (whole,
//! or the blocks changed since an older one) into a fresh image or the local copy. Both keep `concurrency` blocks in flight and count what they move (`Transfers`). A
//! push also waits for EBS to complete its sealed snapshot and settles a race for its generation with
//! another host. What it needs from the backend comes in a `Shipper`; which chain to pull and which
//! generation to push is decided before (see `decide`).
//!
//! A pull writes a new file beside the image and renames it into place only when every block arrived and
//! passed its checksum, so a crash or an error mid-pull never leaves a half-pulled image that looks whole.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::blockmap::{zero_block_digest, BlockHash, BlockMap, Changed, BLOCK_SIZE};
use super::client::{tags, BlockRef, EbsError, SnapState, SnapshotClient};
use super::copy::{sized, Copies, LocalCopy, Paths};
use super::decide::{data_options, Blocks};
use super::errors::{blocking, ebs_err, internal};
use crate::backend::BackendError;
use crate::spec::VolumeSpec;

/// How often a long pull or push reports its progress in the log.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How long a push waits for EBS to report a sealed snapshot completed.
const SEAL_WAIT: Duration = Duration::from_secs(60);

/// Bytes and blocks moved, for metrics.
#[derive(Debug, Default)]
pub struct Transfers {
    pub blocks_shipped: AtomicU64,
    pub bytes_shipped: AtomicU64,
    pub blocks_pulled: AtomicU64,
    pub bytes_pulled: AtomicU64,
}

/// What moving blocks needs from the backend: the AWS client, the settings that shape a transfer, the
/// counters, and the local copies whose records a push keeps up to date.
pub(super) struct Shipper<'a> {
    pub client: &'a SnapshotClient,
    pub namespace: &'a str,
    /// Blocks in flight per push or pull.
    pub concurrency: usize,
    pub host_id: &'a str,
    pub transfers: &'a Transfers,
    pub copies: &'a Copies,
}

/// Where a pull writes.
pub(super) enum PullInto {
    /// A new image, which replaces the local copy's once complete.
    New,
    /// The local copy's image itself, whose blocks are these (the caller has marked the copy as based on
    /// nothing until the pull completes, so an interrupted patch is pulled whole next time).
    Image(BlockMap),
}

/// The blocks a pull reads, each with the snapshot it is read from.
pub(super) type Listing = Vec<(String, Vec<BlockRef>)>;

/// Lists what a pull reads: every block of the newest snapshot, the blocks changed since a base, or
/// (`[ebs] keep_chain`) each block from the newest snapshot of the chain that lists it.
pub(super) async fn list(
    shipper: &Shipper<'_>,
    name: &str,
    blocks: &Blocks,
) -> Result<Listing, EbsError> {
    Ok(match blocks {
        Blocks::Newest(n) => vec![(n.id.clone(), shipper.client.list_blocks(name, &n.id).await?)],
        Blocks::Changed { base, newest } => vec![(
            newest.id.clone(),
            shipper
                .client
                .list_changed_blocks(name, base, &newest.id)
                .await?,
        )],
        Blocks::Chain(chain) => {
            // Newest first: a block the newest snapshot lists is the one to keep, and older snapshots
            // fill only the blocks no newer one listed.
            let mut seen = std::collections::HashSet::new();
            let mut out = Vec::with_capacity(chain.len());
            for snap in chain {
                let mut own = shipper.client.list_blocks(name, &snap.id).await?;
                own.retain(|b| seen.insert(b.index));
                out.push((snap.id.clone(), own));
            }
            out
        }
    })
}

/// Pulls the listed blocks into `image.pull` (or into the image itself, see `PullInto`), verifying
/// every block, then renames it over the image. Returns the hash of every block as pulled.
pub(super) async fn pull(
    shipper: &Shipper<'_>,
    name: &str,
    spec: &VolumeSpec,
    listing: Listing,
    p: &Paths,
    into: PullInto,
) -> Result<BlockMap, BackendError> {
    let (size, _) = sized(spec)?;
    let count = BlockMap::count_for(size).map_err(internal)?;
    let (in_place, start) = match into {
        PullInto::New => (false, BlockMap::zeros(count)),
        PullInto::Image(map) => (true, map),
    };
    let tmp = if in_place {
        p.image.clone()
    } else {
        p.image.with_extension("pull")
    };
    let file = {
        let tmp = tmp.clone();
        blocking(move || {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(!in_place)
                .truncate(!in_place)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)
                .map_err(BackendError::io("open", &tmp))?;
            if !in_place {
                f.set_len(size).map_err(BackendError::io("size", &tmp))?;
            }
            Ok(Arc::new(f))
        })
        .await?
    };
    let direct = open_direct(&tmp).await;
    let buffers = Buffers::default();
    let started = Instant::now();
    let snapshots = listing.len();
    let mut map = start;
    let mut pulled = 0u64;
    let mut last_report = Instant::now();
    let concurrency = shipper.concurrency.max(1);
    // `net` bounds the requests in flight (the configured concurrency); `held` bounds the blocks
    // requested or received but not yet written, so checking and writing a block happens after its
    // request's slot went to the next block, and memory stays at 2 x concurrency blocks.
    let net = Arc::new(Semaphore::new(concurrency));
    let held = Arc::new(Semaphore::new(2 * concurrency));
    for (snap_id, blocks) in listing {
        let mut set: JoinSet<Result<(u64, BlockHash), BackendError>> = JoinSet::new();
        for b in blocks {
            if b.index >= count {
                continue;
            }
            let hold = held.clone().acquire_owned().await.map_err(internal)?;
            let (client, volume, id, net) = (
                shipper.client.clone(),
                name.to_string(),
                snap_id.clone(),
                net.clone(),
            );
            let (out, path) = (Target::new(&file, &direct), tmp.clone());
            let buffers = buffers.clone();
            set.spawn(async move {
                let _hold = hold;
                let mut buf = buffers.take();
                let fetched = {
                    let _slot = net.acquire_owned().await.map_err(internal)?;
                    client
                        .fetch_block(&volume, &id, &b, buf.block())
                        .await
                        .map_err(ebs_err)?
                };
                let digest = fetched.verify().map_err(ebs_err)?;
                // A write may wait for the disk (see `open_direct`): never on the runtime's workers.
                let (buf, hash) = blocking(move || {
                    let hash = write_block(&out, &path, b.index, &mut buf, digest, in_place)?;
                    Ok((buf, hash))
                })
                .await?;
                buffers.give(buf);
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
    shipper
        .transfers
        .blocks_pulled
        .fetch_add(pulled, Ordering::Relaxed);
    shipper
        .transfers
        .bytes_pulled
        .fetch_add(pulled * BLOCK_SIZE, Ordering::Relaxed);
    let (image, t) = (p.image.clone(), tmp.clone());
    blocking(move || {
        file.sync_all().map_err(BackendError::io("sync", &t))?;
        if in_place {
            return Ok(());
        }
        std::fs::rename(&t, &image).map_err(BackendError::io("rename", &t))
    })
    .await?;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        volume = name,
        snapshots,
        blocks = pulled,
        seconds = format!("{secs:.2}"),
        patched = in_place,
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

/// Bytes a buffer for direct I/O is aligned to: the largest logical block size of a disk.
const DIRECT_ALIGN: usize = 4096;

/// Opens the pull's file a second time for direct I/O, or says it cannot (a filesystem without it).
/// Pulled blocks go to the disk without passing through the page cache: filling fresh page-cache pages
/// was most of a pull's CPU (on this project's machines, 1.3 CPU-seconds per GiB written), each write
/// held the inode lock that the other writers spun on, and the image is read through a loop device that
/// caches what it reads anyway.
async fn open_direct(path: &std::path::Path) -> Option<Arc<std::fs::File>> {
    let p = path.to_path_buf();
    let opened = tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_NOFOLLOW)
            .open(&p)
    })
    .await;
    match opened {
        Ok(Ok(f)) => Some(Arc::new(f)),
        Ok(Err(e)) => {
            tracing::debug!(path = %path.display(), error = %e, "no direct I/O for the pull; writing through the page cache");
            None
        }
        Err(_) => None,
    }
}

/// Where one block is written: the direct descriptor when there is one, the ordinary one otherwise.
struct Target {
    file: Arc<std::fs::File>,
    direct: Option<Arc<std::fs::File>>,
}

impl Target {
    fn new(file: &Arc<std::fs::File>, direct: &Option<Arc<std::fs::File>>) -> Target {
        Target {
            file: file.clone(),
            direct: direct.clone(),
        }
    }
}

/// One block's worth of memory aligned for direct I/O (a `Vec` a little larger than a block, used from
/// its first aligned byte on).
struct BlockBuf {
    mem: Vec<u8>,
}

impl BlockBuf {
    fn new() -> BlockBuf {
        BlockBuf {
            mem: vec![0u8; BLOCK_SIZE as usize + DIRECT_ALIGN],
        }
    }

    fn block(&mut self) -> &mut [u8] {
        let skip = self.mem.as_ptr().align_offset(DIRECT_ALIGN);
        &mut self.mem[skip..skip + BLOCK_SIZE as usize]
    }
}

/// Block buffers handed back after their block was written, for the next blocks: at most 2 x
/// concurrency are in use at once, and a fresh 512 KiB buffer costs zeroing it and faulting it in.
#[derive(Clone, Default)]
struct Buffers(Arc<std::sync::Mutex<Vec<BlockBuf>>>);

impl Buffers {
    fn take(&self) -> BlockBuf {
        let reused = self.0.lock().ok().and_then(|mut free| free.pop());
        reused.unwrap_or_else(BlockBuf::new)
    }

    fn give(&self, buf: BlockBuf) {
        if let Ok(mut free) = self.0.lock() {
            free.push(buf);
        }
    }
}

/// Writes one verified block (all-zero blocks stay holes in a new image) and returns its hash for the
/// block map.
fn write_block(
    to: &Target,
    path: &std::path::Path,
    index: u64,
    buf: &mut BlockBuf,
    digest: [u8; 32],
    in_place: bool,
) -> Result<BlockHash, BackendError> {
    // The digest already says whether the block is all zeros: no need to look at every byte.
    let zero = digest == zero_block_digest();
    if zero && !in_place {
        // In a new image a zero block is a hole already; in the copy being patched it may hold data.
        return Ok(None);
    }
    let data = buf.block();
    let at = index * BLOCK_SIZE;
    let direct = match &to.direct {
        Some(d) => d.write_all_at(data, at),
        None => Err(std::io::Error::from(std::io::ErrorKind::Unsupported)),
    };
    // EINVAL: this file or disk wants another alignment after all; the page cache takes any.
    if let Err(e) = direct {
        if to.direct.is_some() && e.raw_os_error() != Some(libc::EINVAL) {
            return Err(BackendError::io("write", path)(e));
        }
        to.file
            .write_all_at(data, at)
            .map_err(BackendError::io("write", path))?;
    }
    Ok((!zero).then_some(digest))
}

/// One block to ship: its index in the volume, its bytes and their SHA-256.
pub(super) struct Block {
    pub index: u64,
    pub data: Bytes,
    pub digest: [u8; 32],
}

impl From<Changed> for Block {
    fn from(c: Changed) -> Block {
        Block {
            index: c.index,
            digest: c.hash.unwrap_or_else(zero_block_digest),
            data: Bytes::from(c.data),
        }
    }
}

/// Where a producer puts the blocks of a push; it counts them, so that the push can tell EBS exactly
/// how many blocks it wrote.
pub(super) struct Sink {
    tx: tokio::sync::mpsc::Sender<Block>,
    sent: Arc<AtomicU64>,
}

impl Sink {
    /// Queues a block, waiting while the queue is full; false once the push has stopped taking blocks.
    pub fn send(&self, block: Block) -> bool {
        if self.tx.blocking_send(block).is_err() {
            return false;
        }
        self.sent.fetch_add(1, Ordering::Relaxed);
        true
    }
}

/// The blocks of a push, as a producer on the blocking pool finds them (a scan of the image, or a read
/// of a spool file), in a queue as deep as the concurrency so a request slot that frees finds its next
/// block already in memory. The producer's result says how the queue ended: complete, or with an error.
pub(super) struct Feed<T> {
    rx: tokio::sync::mpsc::Receiver<Block>,
    first: Option<Block>,
    sent: Arc<AtomicU64>,
    producer: tokio::task::JoinHandle<Result<T, BackendError>>,
}

impl<T: Send + 'static> Feed<T> {
    /// Runs `produce` on the blocking pool; it ends by itself once it returns, or once the push drops the
    /// feed (its `send` then answers false).
    pub fn spawn(
        depth: usize,
        produce: impl FnOnce(&Sink) -> Result<T, BackendError> + Send + 'static,
    ) -> Feed<T> {
        let (tx, rx) = tokio::sync::mpsc::channel(depth.max(1));
        let sent = Arc::new(AtomicU64::new(0));
        let sink = Sink {
            tx,
            sent: sent.clone(),
        };
        let producer = tokio::task::spawn_blocking(move || produce(&sink));
        Feed {
            rx,
            first: None,
            sent,
            producer,
        }
    }

    /// Waits for the first block and returns its index: `None` means the producer found nothing to ship
    /// (or failed: `finish` says which).
    pub async fn first(&mut self) -> Option<u64> {
        if self.first.is_none() {
            self.first = self.rx.recv().await;
        }
        self.first.as_ref().map(|b| b.index)
    }

    async fn next(&mut self) -> Option<Block> {
        match self.first.take() {
            Some(b) => Some(b),
            None => self.rx.recv().await,
        }
    }

    /// Waits for the producer to end; returns how many blocks it queued and what it returned.
    pub async fn finish(self) -> Result<(u64, T), BackendError> {
        let Feed {
            rx, sent, producer, ..
        } = self;
        // A producer still sending gets "stopped" instead of waiting for room forever.
        drop(rx);
        let out = producer.await.map_err(internal)??;
        Ok((sent.load(Ordering::Relaxed), out))
    }
}

/// A feed of blocks already copied aside: block `indices[k]` of the volume is at byte `k * BLOCK_SIZE` of
/// the spool file at `path`, and `now` holds their hashes (from the scan that found them changed, so no
/// block is hashed twice). The producer hands `now` back at the end.
pub(super) fn spooled(
    path: &std::path::Path,
    indices: Vec<u64>,
    now: BlockMap,
    depth: usize,
) -> Feed<BlockMap> {
    let path = path.to_path_buf();
    Feed::spawn(depth, move |sink| {
        let spool = std::fs::File::open(&path).map_err(BackendError::io("open", &path))?;
        for (k, index) in indices.into_iter().enumerate() {
            let mut buf = vec![0u8; BLOCK_SIZE as usize];
            spool
                .read_exact_at(&mut buf, k as u64 * BLOCK_SIZE)
                .map_err(BackendError::io("read", &path))?;
            let block = Block {
                index,
                data: Bytes::from(buf),
                digest: now.get(index).unwrap_or_else(zero_block_digest),
            };
            if !sink.send(block) {
                return Err(internal("the push stopped taking blocks"));
            }
        }
        Ok(now)
    })
}

/// Ships the blocks of `feed` as a snapshot of `generation` on top of the copy's base, and returns its id
/// once EBS reports it completed, with what the feed's producer returned. The snapshot is started only
/// once the feed has a first block, which the caller has waited for to decide that there is something
/// to ship.
pub(super) async fn push<T: Send + 'static>(
    shipper: &Shipper<'_>,
    name: &str,
    spec: &VolumeSpec,
    copy: &mut LocalCopy,
    generation: u64,
    mut feed: Feed<T>,
) -> Result<(String, T), BackendError> {
    let (size, _) = sized(spec)?;
    let options = serde_json::to_string(&data_options(spec)).map_err(internal)?;
    let tag_list = [
        (tags::NAMESPACE, shipper.namespace.to_string()),
        (tags::VOLUME, name.to_string()),
        (tags::GENERATION, generation.to_string()),
        (tags::PARENT, copy.snapshot.clone().unwrap_or_default()),
        (tags::HOST, shipper.host_id.to_string()),
        (tags::OPTIONS, options),
    ];
    let token = client_token(shipper.host_id, name, generation);
    let id = shipper
        .client
        .start_snapshot(name, size, copy.snapshot.as_deref(), &tag_list, &token)
        .await
        .map_err(ebs_err)?;
    copy.pending = Some(id.clone());
    copy.sealed = false;
    shipper.copies.save(name, copy)?;
    let started = Instant::now();
    let concurrency = shipper.concurrency.max(1);
    let sem = Arc::new(Semaphore::new(concurrency));
    let mut set: JoinSet<Result<(), BackendError>> = JoinSet::new();
    let mut shipped = 0u64;
    let mut last_report = Instant::now();
    while let Some(block) = feed.next().await {
        let permit = sem.clone().acquire_owned().await.map_err(internal)?;
        let (client, volume, snap) = (shipper.client.clone(), name.to_string(), id.clone());
        set.spawn(async move {
            let _permit = permit;
            client
                .put_block(&volume, &snap, block.index, block.data, &block.digest)
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
                found = feed.sent.load(Ordering::Relaxed),
                "shipping"
            );
        }
    }
    while let Some(done) = set.join_next().await {
        done.map_err(internal)??;
        shipped += 1;
    }
    // The queue is closed: the producer has finished, and says whether the blocks it queued are all
    // there are (a scan or read that failed midway must not complete a snapshot that lacks blocks).
    let (queued, out) = feed.finish().await?;
    if shipped != queued {
        return Err(internal(format!(
            "shipped {shipped} of the {queued} changed blocks of volume {name}"
        )));
    }
    shipper
        .transfers
        .blocks_shipped
        .fetch_add(shipped, Ordering::Relaxed);
    shipper
        .transfers
        .bytes_shipped
        .fetch_add(shipped * BLOCK_SIZE, Ordering::Relaxed);
    let done = shipper
        .client
        .complete(name, &id, shipped)
        .await
        .map_err(ebs_err)?;
    copy.sealed = true;
    shipper.copies.save(name, copy)?;
    // How much this generation changed, for `ferry inspect`: known only now that the scan is done. In
    // the background, as it informs and nothing waits for it.
    {
        let (client, volume, snap) = (shipper.client.clone(), name.to_string(), id.clone());
        tokio::spawn(async move {
            if let Err(e) = client
                .set_tag(&volume, &snap, tags::BLOCKS, &shipped.to_string())
                .await
            {
                tracing::debug!(volume, error = %e, "cannot tag the snapshot's block count");
            }
        });
    }
    if !done {
        match wait_completed(shipper.client, name, &id).await? {
            Some(SnapState::Completed) => {}
            Some(SnapState::Pending) => {
                return Err(ebs_err(EbsError::Pending {
                    volume: name.into(),
                    snapshot: id,
                    generation,
                    host: shipper.host_id.to_string(),
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
    resolve_twin(shipper, name, copy, &id, generation).await?;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        volume = name,
        snapshot = %id,
        generation,
        blocks = shipped,
        seconds = format!("{secs:.2}"),
        "shipped a snapshot"
    );
    Ok((id, out))
}

/// Waits, up to `SEAL_WAIT`, for EBS to finish processing a sealed snapshot, and returns its state then.
pub(super) async fn wait_completed(
    client: &SnapshotClient,
    name: &str,
    id: &str,
) -> Result<Option<SnapState>, BackendError> {
    let deadline = tokio::time::Instant::now() + SEAL_WAIT;
    let mut pause = Duration::from_millis(200);
    loop {
        let state = client.state(name, id).await.map_err(ebs_err)?;
        if state != Some(SnapState::Pending) || tokio::time::Instant::now() >= deadline {
            return Ok(state);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// Settles a race for one generation between hosts that share no catalog: two pushes may start from the
/// same base at once, and both complete. The snapshot with the lexically smaller id wins; every host applies
/// the same rule to the same listing, so exactly one survives. The loser deletes its own snapshot and keeps
/// its data locally as a recorded conflict. A smaller rival still pending is waited for (up to `SEAL_WAIT`),
/// since it may complete; one that never does makes this push lose, which keeps data, never two histories.
pub(super) async fn resolve_twin(
    shipper: &Shipper<'_>,
    name: &str,
    copy: &mut LocalCopy,
    id: &str,
    generation: u64,
) -> Result<(), BackendError> {
    let deadline = Instant::now() + SEAL_WAIT;
    loop {
        let list = shipper
            .client
            .find(shipper.namespace, Some(name))
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
        shipper.client.delete(name, id).await.map_err(ebs_err)?;
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
            image: shipper.copies.paths(name).image.display().to_string(),
        };
        return Err(shipper.copies.conflict(name, copy, err));
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

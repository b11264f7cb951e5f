//! `BlockMap`: what each 512 KiB block of a volume's image held when it was last shipped, as a SHA-256
//! per block, and the scan that finds which blocks changed since.
//!
//! It owns the block arithmetic, the hashing and the on-disk form of a map. It must not talk to EBS or to
//! the catalog: the backend decides what to ship and when a map becomes "as shipped".
//!
//! A block that holds only zeros, whether a hole in the sparse image or written zeros, is `None`: EBS
//! reads a block that no snapshot in the chain wrote as zeros, so such a block never needs shipping for
//! its own sake. A block that held data when shipped and holds zeros now (a file deleted and discarded)
//! does change, and is shipped as a block of zeros.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use sha2::{Digest, Sha256};

/// The EBS direct APIs move data in blocks of exactly this many bytes.
pub const BLOCK_SIZE: u64 = 512 * 1024;

/// A block's content hash; `None` stands for all zeros.
pub type BlockHash = Option<[u8; 32]>;

/// Identifies the on-disk form, so a future change of it is recognised instead of misread.
const MAGIC: &[u8; 8] = b"FERRYBM1";
const HEADER_LEN: usize = 8 + 8 + 8;
const RECORD_LEN: usize = 1 + 32;

#[derive(Debug, thiserror::Error)]
pub enum BlockMapError {
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a block map Ferry can read ({reason})")]
    Corrupt { path: PathBuf, reason: String },
    #[error("the image size {size} is not a whole number of {BLOCK_SIZE}-byte blocks")]
    PartialBlock { size: u64 },
    #[error("the scan was stopped: nothing takes its blocks any more")]
    Stopped,
}

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> BlockMapError + 'a {
    move |source| BlockMapError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The hash of every block of an image of a fixed size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockMap {
    blocks: Vec<BlockHash>,
}

/// The SHA-256 of a block of zeros: the checksum EBS expects when a block that held data is shipped
/// as zeros.
pub fn zero_block_digest() -> [u8; 32] {
    static ZERO: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| Sha256::digest(vec![0u8; BLOCK_SIZE as usize]).into())
}

/// The hash of one block's bytes, `None` if they are all zero.
pub fn hash_block(data: &[u8]) -> BlockHash {
    if data.iter().all(|b| *b == 0) {
        None
    } else {
        Some(Sha256::digest(data).into())
    }
}

impl BlockMap {
    /// A map of `count` blocks that all read as zeros: a volume nothing was ever shipped for.
    pub fn zeros(count: u64) -> Self {
        BlockMap {
            blocks: vec![None; count as usize],
        }
    }

    /// The number of blocks an image of `size` bytes has, refusing a size that ends inside a block.
    pub fn count_for(size: u64) -> Result<u64, BlockMapError> {
        if !size.is_multiple_of(BLOCK_SIZE) {
            return Err(BlockMapError::PartialBlock { size });
        }
        Ok(size / BLOCK_SIZE)
    }

    pub fn len(&self) -> u64 {
        self.blocks.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    pub fn get(&self, index: u64) -> BlockHash {
        self.blocks.get(index as usize).copied().flatten()
    }

    /// Records what block `index` holds now (after shipping or pulling it).
    pub fn set(&mut self, index: u64, hash: BlockHash) {
        if let Some(slot) = self.blocks.get_mut(index as usize) {
            *slot = hash;
        }
    }

    /// How many blocks hold data.
    pub fn data_blocks(&self) -> u64 {
        self.blocks.iter().filter(|b| b.is_some()).count() as u64
    }

    /// Hashes every block of the image at `path`, reading only the blocks that the filesystem says hold
    /// data (SEEK_DATA/SEEK_HOLE), so a mostly empty 20 GiB image costs what its data costs.
    pub fn scan(path: &Path) -> Result<BlockMap, BlockMapError> {
        scan_image(path, None, hash_threads())
    }

    /// Scans the image at `path` like `scan`, and hands every block whose hash differs from `old` to
    /// `found` as soon as it is known, so that shipping can start while the rest of the image is still
    /// being read. `found` is called from `threads` threads at once, in no particular order; it returns
    /// false when whoever takes the blocks has gone away, which stops the scan with `Stopped`. Blocks
    /// that held data in `old` and are holes now come last, as zeros.
    pub fn scan_changes(
        path: &Path,
        old: &BlockMap,
        threads: usize,
        found: &(dyn Fn(Changed) -> bool + Sync),
    ) -> Result<BlockMap, BlockMapError> {
        scan_image(path, Some((old, found)), threads)
    }

    /// The blocks whose content differs between `self` (as shipped) and `now`, in ascending order. Maps
    /// of different lengths compare as if the shorter one ended in zeros.
    pub fn changed(&self, now: &BlockMap) -> Vec<u64> {
        let len = self.blocks.len().max(now.blocks.len()) as u64;
        (0..len).filter(|&i| self.get(i) != now.get(i)).collect()
    }

    /// Writes the map to `path` atomically and durably: a temporary file, fsynced, renamed over the old
    /// one, and the directory fsynced, so a crash leaves either the old map or the new one.
    pub fn save(&self, path: &Path) -> Result<(), BlockMapError> {
        let mut bytes = Vec::with_capacity(HEADER_LEN + self.blocks.len() * RECORD_LEN + 32);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&BLOCK_SIZE.to_le_bytes());
        bytes.extend_from_slice(&(self.blocks.len() as u64).to_le_bytes());
        for block in &self.blocks {
            match block {
                None => bytes.extend_from_slice(&[0u8; RECORD_LEN]),
                Some(h) => {
                    bytes.push(1);
                    bytes.extend_from_slice(h);
                }
            }
        }
        let digest = Sha256::digest(&bytes);
        bytes.extend_from_slice(&digest);

        crate::durable::write_atomic(path, &bytes).map_err(|e| io_err(e.op, &e.path)(e.source))
    }

    /// Reads a map written by `save`. A missing file is `Ok(None)`; a damaged one is `Corrupt`, never a
    /// map with wrong hashes, because a wrong hash would skip a changed block.
    pub fn load(path: &Path) -> Result<Option<BlockMap>, BlockMapError> {
        let mut bytes = Vec::new();
        match File::open(path) {
            Ok(mut f) => f.read_to_end(&mut bytes).map_err(io_err("read", path))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("open", path)(e)),
        };
        let corrupt = |reason: &str| BlockMapError::Corrupt {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        if bytes.len() < HEADER_LEN + 32 || &bytes[..8] != MAGIC {
            return Err(corrupt("no block map header"));
        }
        let (body, digest) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(body).as_slice() != digest {
            return Err(corrupt("checksum mismatch"));
        }
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&body[at..at + 8]);
            u64::from_le_bytes(w)
        };
        if word(8) != BLOCK_SIZE {
            return Err(corrupt("another block size"));
        }
        let count = word(16);
        let records = &body[HEADER_LEN..];
        if records.len() as u64 != count.saturating_mul(RECORD_LEN as u64) {
            return Err(corrupt("length does not match the block count"));
        }
        let blocks = records
            .chunks_exact(RECORD_LEN)
            .map(|r| match r[0] {
                0 => Ok(None),
                1 => {
                    let mut h = [0u8; 32];
                    h.copy_from_slice(&r[1..]);
                    Ok(Some(h))
                }
                _ => Err(corrupt("bad block record")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(BlockMap { blocks }))
    }
}

/// A block that `scan_changes` found changed: its index, its bytes as they are now (zeros for a hole) and
/// their hash (`None` for zeros).
pub struct Changed {
    pub index: u64,
    pub data: Vec<u8>,
    pub hash: BlockHash,
}

/// Threads a scan hashes on: SHA-256 of the blocks is most of a scan's time, so one per core, up to 4
/// (past that, reading the image is the limit).
pub fn hash_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// Data blocks a scanning thread takes at a time: 4 MiB, so each thread reads long runs in order.
const RUN: usize = 8;

type Report<'a> = (&'a BlockMap, &'a (dyn Fn(Changed) -> bool + Sync));

fn scan_image(
    path: &Path,
    report: Option<Report<'_>>,
    threads: usize,
) -> Result<BlockMap, BlockMapError> {
    let file = File::open(path).map_err(io_err("open", path))?;
    let size = file.metadata().map_err(io_err("stat", path))?.len();
    let count = BlockMap::count_for(size)?;
    let data = data_blocks(&file, size).map_err(io_err("seek in", path))?;
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let share = || hash_share(&file, path, &data, &next, &stop, report);
    let threads = threads.clamp(1, data.len().div_ceil(RUN).max(1));
    let shares: Vec<_> = std::thread::scope(|s| {
        let others: Vec<_> = (1..threads).map(|_| s.spawn(share)).collect();
        let mine = share();
        let mut all = vec![mine];
        for t in others {
            all.push(t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
        all
    });
    let mut map = BlockMap::zeros(count);
    for share in shares {
        for (index, hash) in share? {
            map.set(index, hash);
        }
    }
    if let Some((old, found)) = report {
        // A block that held data and is a hole now was never read above: it ships as zeros.
        for index in old.changed(&map) {
            if data.binary_search(&index).is_ok() {
                continue;
            }
            if index >= count {
                return Err(BlockMapError::Io {
                    op: "read",
                    path: path.to_path_buf(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("block {index} changed but is past the end of the image"),
                    ),
                });
            }
            let zeros = Changed {
                index,
                data: vec![0u8; BLOCK_SIZE as usize],
                hash: None,
            };
            if !found(zeros) {
                return Err(BlockMapError::Stopped);
            }
        }
    }
    Ok(map)
}

/// One scanning thread: takes runs of data blocks until none are left, hashes them, and reports those
/// that differ from the old map. Returns the hash of every block it read.
fn hash_share(
    file: &File,
    path: &Path,
    data: &[u64],
    next: &AtomicUsize,
    stop: &AtomicBool,
    report: Option<Report<'_>>,
) -> Result<Vec<(u64, BlockHash)>, BlockMapError> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    loop {
        // Another thread failed or was told to stop: the scan's result is that thread's.
        if stop.load(Ordering::Relaxed) {
            return Ok(out);
        }
        let at = next.fetch_add(RUN, Ordering::Relaxed);
        let Some(run) = data.get(at..(at + RUN).min(data.len())) else {
            return Ok(out);
        };
        for &index in run {
            let read = file
                .read_exact_at(&mut buf, index * BLOCK_SIZE)
                .map_err(io_err("read", path));
            if let Err(e) = read {
                stop.store(true, Ordering::Relaxed);
                return Err(e);
            }
            let hash = hash_block(&buf);
            out.push((index, hash));
            let Some((old, found)) = report else {
                continue;
            };
            if old.get(index) == hash {
                continue;
            }
            let data = std::mem::replace(&mut buf, vec![0u8; BLOCK_SIZE as usize]);
            if !found(Changed { index, data, hash }) {
                stop.store(true, Ordering::Relaxed);
                return Err(BlockMapError::Stopped);
            }
        }
    }
}

/// The indices of the blocks of `file` (of `size` bytes) that contain at least one byte of data according
/// to SEEK_DATA/SEEK_HOLE, ascending. A filesystem without hole reporting says "all data", which is slower
/// but still right.
fn data_blocks(file: &File, size: u64) -> std::io::Result<Vec<u64>> {
    let fd = file.as_raw_fd();
    let mut out: Vec<u64> = Vec::new();
    let mut at: i64 = 0;
    let end = size as i64;
    while at < end {
        let start = match lseek(fd, at, Whence::SeekData) {
            Ok(s) => s,
            // ENXIO: no data at or after `at`.
            Err(Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let stop = match lseek(fd, start, Whence::SeekHole) {
            Ok(s) => s.min(end),
            Err(e) => return Err(e.into()),
        };
        let first = start as u64 / BLOCK_SIZE;
        let last = (stop as u64).div_ceil(BLOCK_SIZE);
        for index in first..last {
            if out.last() != Some(&index) {
                out.push(index);
            }
        }
        at = stop;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn image(blocks: u64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        File::create(&path)
            .unwrap()
            .set_len(blocks * BLOCK_SIZE)
            .unwrap();
        (dir, path)
    }

    fn write_at(path: &Path, offset: u64, data: &[u8]) {
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(data, offset).unwrap();
    }

    /// The map computed the slow way: read every block.
    fn naive(path: &Path) -> BlockMap {
        let data = std::fs::read(path).unwrap();
        BlockMap {
            blocks: data.chunks(BLOCK_SIZE as usize).map(hash_block).collect(),
        }
    }

    #[test]
    fn an_empty_sparse_image_has_no_data_blocks() {
        let (_d, path) = image(64);
        let map = BlockMap::scan(&path).unwrap();
        assert_eq!(map.len(), 64);
        assert_eq!(map.data_blocks(), 0);
        assert_eq!(map, BlockMap::zeros(64));
    }

    #[test]
    fn writes_mark_exactly_the_blocks_they_touch() {
        let (_d, path) = image(16);
        let shipped = BlockMap::scan(&path).unwrap();
        write_at(&path, 3 * BLOCK_SIZE + 10, b"x");
        // Straddles the boundary between blocks 7 and 8.
        write_at(&path, 8 * BLOCK_SIZE - 2, b"abcd");
        write_at(&path, 15 * BLOCK_SIZE + BLOCK_SIZE - 1, b"z");
        let now = BlockMap::scan(&path).unwrap();
        assert_eq!(shipped.changed(&now), vec![3, 7, 8, 15]);
        assert_eq!(now, naive(&path));
        // Nothing changed since: nothing to ship.
        assert!(now.changed(&BlockMap::scan(&path).unwrap()).is_empty());
    }

    #[test]
    fn written_zeros_are_no_data_but_zeroing_shipped_data_is_a_change() {
        let (_d, path) = image(4);
        write_at(&path, 0, &vec![0u8; BLOCK_SIZE as usize]);
        write_at(&path, BLOCK_SIZE, b"data");
        let shipped = BlockMap::scan(&path).unwrap();
        assert_eq!(
            shipped.get(0),
            None,
            "a block of written zeros reads like a hole"
        );
        assert!(shipped.get(1).is_some());
        write_at(&path, BLOCK_SIZE, &[0u8; 4]);
        let now = BlockMap::scan(&path).unwrap();
        assert_eq!(shipped.changed(&now), vec![1]);
    }

    #[test]
    fn an_image_that_ends_inside_a_block_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        File::create(&path)
            .unwrap()
            .set_len(BLOCK_SIZE + 1)
            .unwrap();
        assert!(matches!(
            BlockMap::scan(&path),
            Err(BlockMapError::PartialBlock { .. })
        ));
    }

    #[test]
    fn a_saved_map_loads_back_and_damage_is_detected() {
        let (d, path) = image(8);
        write_at(&path, 5 * BLOCK_SIZE, b"five");
        let map = BlockMap::scan(&path).unwrap();
        let saved = d.path().join("blocks");
        assert!(BlockMap::load(&saved).unwrap().is_none());
        map.save(&saved).unwrap();
        assert_eq!(BlockMap::load(&saved).unwrap(), Some(map.clone()));
        assert!(!saved.with_extension("tmp").exists());

        let mut bytes = std::fs::read(&saved).unwrap();
        let flip = HEADER_LEN + 5 * RECORD_LEN + 7;
        bytes[flip] ^= 1;
        std::fs::write(&saved, &bytes).unwrap();
        let err = BlockMap::load(&saved).unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");

        std::fs::write(&saved, b"FERRYBM1short").unwrap();
        assert!(matches!(
            BlockMap::load(&saved),
            Err(BlockMapError::Corrupt { .. })
        ));
    }

    #[test]
    fn maps_of_different_lengths_compare_with_zeros() {
        let mut short = BlockMap::zeros(2);
        short.set(1, Some([1; 32]));
        let mut long = BlockMap::zeros(4);
        long.set(1, Some([1; 32]));
        long.set(3, Some([3; 32]));
        assert_eq!(short.changed(&long), vec![3]);
        assert_eq!(long.changed(&short), vec![3]);
    }

    /// Runs `scan_changes` and returns the map with what it reported, in index order.
    fn changes(
        path: &Path,
        old: &BlockMap,
        threads: usize,
    ) -> (BlockMap, Vec<(u64, Vec<u8>, BlockHash)>) {
        let found = std::sync::Mutex::new(Vec::new());
        let report = |c: Changed| {
            found.lock().unwrap().push((c.index, c.data, c.hash));
            true
        };
        let map = BlockMap::scan_changes(path, old, threads, &report).unwrap();
        let mut found = found.into_inner().unwrap();
        found.sort_by_key(|f| f.0);
        (map, found)
    }

    #[test]
    fn scan_changes_reports_exactly_the_changed_blocks_with_their_bytes() {
        let (_d, path) = image(40);
        for i in [0u64, 3, 9, 17, 30, 39] {
            write_at(&path, i * BLOCK_SIZE + 5, &[i as u8 + 1; 100]);
        }
        let old = BlockMap::scan(&path).unwrap();
        // Changed: 3 rewritten, 9 zeroed by writes, 17 punched to a hole, 25 new; 0, 30, 39 unchanged.
        write_at(&path, 3 * BLOCK_SIZE + 5, b"new");
        write_at(&path, 9 * BLOCK_SIZE, &vec![0u8; BLOCK_SIZE as usize]);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        nix::fcntl::fallocate(
            f.as_raw_fd(),
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            (17 * BLOCK_SIZE) as i64,
            BLOCK_SIZE as i64,
        )
        .unwrap();
        write_at(&path, 25 * BLOCK_SIZE + BLOCK_SIZE - 1, b"z");
        let data = std::fs::read(&path).unwrap();
        for threads in [1, 2, 5] {
            let (now, found) = changes(&path, &old, threads);
            assert_eq!(now, naive(&path), "{threads} threads");
            let indices: Vec<u64> = found.iter().map(|f| f.0).collect();
            assert_eq!(indices, old.changed(&now), "{threads} threads");
            assert_eq!(indices, vec![3, 9, 17, 25]);
            for (index, bytes, hash) in &found {
                let at = (*index * BLOCK_SIZE) as usize;
                assert_eq!(
                    &bytes[..],
                    &data[at..at + BLOCK_SIZE as usize],
                    "block {index}"
                );
                assert_eq!(*hash, hash_block(bytes), "block {index}");
            }
        }
        // Against a map of nothing (never shipped): every data block, and nothing else.
        let (now, found) = changes(&path, &BlockMap::zeros(0), 2);
        let indices: Vec<u64> = found.iter().map(|f| f.0).collect();
        assert_eq!(indices, vec![0, 3, 25, 30, 39]);
        assert_eq!(now.data_blocks(), 5);
    }

    #[test]
    fn scan_changes_stops_when_nothing_takes_its_blocks() {
        let (_d, path) = image(64);
        for i in 0..64 {
            write_at(&path, i * BLOCK_SIZE, b"data");
        }
        let taken = std::sync::atomic::AtomicUsize::new(0);
        let report = |_c: Changed| taken.fetch_add(1, Ordering::Relaxed) < 3;
        let err = BlockMap::scan_changes(&path, &BlockMap::zeros(64), 2, &report).unwrap_err();
        assert!(matches!(err, BlockMapError::Stopped), "{err}");
        assert!(taken.load(Ordering::Relaxed) < 64);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Whatever is written where, the hole-skipping scan agrees with reading every block.
        #[test]
        fn the_scan_agrees_with_reading_every_block(
            writes in proptest::collection::vec((0u64..8 * BLOCK_SIZE, 1usize..70_000, any::<u8>()), 0..12)
        ) {
            let (_d, path) = image(8);
            for (offset, len, byte) in writes {
                let len = len.min((8 * BLOCK_SIZE - offset) as usize);
                write_at(&path, offset, &vec![byte; len]);
            }
            prop_assert_eq!(BlockMap::scan(&path).unwrap(), naive(&path));
        }
    }
}

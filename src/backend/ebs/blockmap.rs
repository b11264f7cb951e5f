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
//!
//! Only blocks that hold data are stored, in memory and on disk: volumes are sparse images of up to 64 TiB
//! (128 Mi blocks), and a map, its scan, its comparison and its file must cost what the data costs, not
//! what the size costs. Nothing here may allocate or loop per block of the volume (reading a version 1
//! file, which has a record per block, loops over them once but still keeps only the data blocks).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::ops::Range;
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

/// Identifies the on-disk form, so a change of it is recognised instead of misread. `save` writes
/// version 2 (only the blocks holding data); `load` also reads version 1 (a record for every block),
/// which older Ferry left on hosts that still hold local copies.
const MAGIC: &[u8; 8] = b"FERRYBM2";
const MAGIC_V1: &[u8; 8] = b"FERRYBM1";
/// Magic, block size, block count, record count.
const HEADER_LEN: u64 = 8 + 8 + 8 + 8;
/// Block index, hash.
const RECORD_LEN: u64 = 8 + 32;
/// Magic, block size, block count.
const HEADER_LEN_V1: u64 = 8 + 8 + 8;
/// A flag (0: zeros, 1: data), the hash (zeros when the flag is 0).
const RECORD_LEN_V1: u64 = 1 + 32;
/// The SHA-256 of everything before it ends every file.
const DIGEST_LEN: u64 = 32;

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
    /// Blocks in the image, data or not.
    count: u64,
    /// The blocks that hold data, by index; every key is below `count`. A block missing here is zeros.
    data: BTreeMap<u64, [u8; 32]>,
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
            count,
            data: BTreeMap::new(),
        }
    }

    /// The number of blocks an image of `size` bytes has, refusing a size that ends inside a block.
    pub fn count_for(size: u64) -> Result<u64, BlockMapError> {
        if !size.is_multiple_of(BLOCK_SIZE) {
            return Err(BlockMapError::PartialBlock { size });
        }
        Ok(size / BLOCK_SIZE)
    }

    /// The number of blocks of the volume, whether they hold data or not.
    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn get(&self, index: u64) -> BlockHash {
        self.data.get(&index).copied()
    }

    /// Records what block `index` holds now (after shipping or pulling it). An index beyond the volume
    /// is ignored, so the map never claims data the image cannot have.
    pub fn set(&mut self, index: u64, hash: BlockHash) {
        if index >= self.count {
            return;
        }
        match hash {
            Some(h) => self.data.insert(index, h),
            None => self.data.remove(&index),
        };
    }

    /// How many blocks hold data.
    pub fn data_blocks(&self) -> u64 {
        self.data.len() as u64
    }

    /// The blocks that hold data and their hashes, in ascending order of index.
    pub fn data(&self) -> impl Iterator<Item = (u64, &[u8; 32])> + '_ {
        self.data.iter().map(|(index, hash)| (*index, hash))
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
        // A merge of the two ascending lists of data blocks: a block in neither is zeros in both, so
        // only blocks in either list can differ.
        let mut out = Vec::new();
        let (mut old, mut new) = (self.data().peekable(), now.data().peekable());
        loop {
            let index = match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some(&(i, _)), None) => {
                    old.next();
                    i
                }
                (None, Some(&(j, _))) => {
                    new.next();
                    j
                }
                (Some(&(i, a)), Some(&(j, b))) => match i.cmp(&j) {
                    std::cmp::Ordering::Less => {
                        old.next();
                        i
                    }
                    std::cmp::Ordering::Greater => {
                        new.next();
                        j
                    }
                    std::cmp::Ordering::Equal => {
                        old.next();
                        new.next();
                        if a == b {
                            continue;
                        }
                        i
                    }
                },
            };
            out.push(index);
        }
        out
    }

    /// Writes the map to `path` atomically and durably: a temporary file, fsynced, renamed over the old
    /// one, and the directory fsynced, so a crash leaves either the old map or the new one.
    pub fn save(&self, path: &Path) -> Result<(), BlockMapError> {
        let records = self.data.len() as u64;
        let mut bytes =
            Vec::with_capacity((HEADER_LEN + records * RECORD_LEN + DIGEST_LEN) as usize);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&BLOCK_SIZE.to_le_bytes());
        bytes.extend_from_slice(&self.count.to_le_bytes());
        bytes.extend_from_slice(&records.to_le_bytes());
        for (index, hash) in self.data() {
            bytes.extend_from_slice(&index.to_le_bytes());
            bytes.extend_from_slice(hash);
        }
        let digest = Sha256::digest(&bytes);
        bytes.extend_from_slice(&digest);

        crate::durable::write_atomic(path, &bytes).map_err(|e| io_err(e.op, &e.path)(e.source))
    }

    /// Reads a map written by `save` (or by an older Ferry). A missing file is `Ok(None)`; a damaged one
    /// is `Corrupt`, never a map with wrong hashes, because a wrong hash would skip a changed block.
    ///
    /// The checksum is verified first, reading the file once without keeping it, and only then are the
    /// records parsed in a second pass: memory stays proportional to the data blocks even for an old map
    /// that has a record for every block, and no unverified byte is ever interpreted.
    pub fn load(path: &Path) -> Result<Option<BlockMap>, BlockMapError> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("open", path)(e)),
        };
        let len = file.metadata().map_err(io_err("stat", path))?.len();
        if len < HEADER_LEN_V1 + DIGEST_LEN {
            return Err(corrupt(path, "no block map header"));
        }
        let mut magic = [0u8; 8];
        file.read_exact_at(&mut magic, 0)
            .map_err(io_err("read", path))?;
        let v1 = match &magic {
            m if m == MAGIC => false,
            m if m == MAGIC_V1 => true,
            _ => return Err(corrupt(path, "no block map header")),
        };
        let body = len - DIGEST_LEN;
        let mut hasher = Sha256::new();
        std::io::copy(&mut (&file).take(body), &mut hasher).map_err(io_err("read", path))?;
        let mut digest = [0u8; DIGEST_LEN as usize];
        file.read_exact_at(&mut digest, body)
            .map_err(io_err("read", path))?;
        if hasher.finalize().as_slice() != digest {
            return Err(corrupt(path, "checksum mismatch"));
        }

        (&file).rewind().map_err(io_err("read", path))?;
        let mut input = Records {
            input: BufReader::with_capacity(64 << 10, (&file).take(body)),
            path,
        };
        input.bytes::<8>()?; // the magic, checked above
        if input.word()? != BLOCK_SIZE {
            return Err(corrupt(path, "another block size"));
        }
        let count = input.word()?;
        let mut map = BlockMap::zeros(count);
        if v1 {
            let expected = count
                .checked_mul(RECORD_LEN_V1)
                .and_then(|r| r.checked_add(HEADER_LEN_V1));
            if expected != Some(body) {
                return Err(corrupt(path, "length does not match the block count"));
            }
            for index in 0..count {
                let record = input.bytes::<{ RECORD_LEN_V1 as usize }>()?;
                match record[0] {
                    0 => {}
                    1 => {
                        let mut hash = [0u8; 32];
                        hash.copy_from_slice(&record[1..]);
                        map.data.insert(index, hash);
                    }
                    _ => return Err(corrupt(path, "bad block record")),
                }
            }
        } else {
            let records = input.word()?;
            let expected = records
                .checked_mul(RECORD_LEN)
                .and_then(|r| r.checked_add(HEADER_LEN));
            if expected != Some(body) {
                return Err(corrupt(path, "length does not match the record count"));
            }
            let mut previous: Option<u64> = None;
            for _ in 0..records {
                let index = input.word()?;
                let hash = input.bytes::<32>()?;
                if index >= count {
                    return Err(corrupt(path, "a record lies beyond the block count"));
                }
                // Strictly ascending, so no block can have two hashes to choose from.
                if previous.is_some_and(|p| index <= p) {
                    return Err(corrupt(path, "records out of order"));
                }
                previous = Some(index);
                map.data.insert(index, hash);
            }
        }
        Ok(Some(map))
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

/// The indices of the blocks of `file` (of `size` bytes) that hold data, ascending: 8 bytes per data
/// block, nothing per hole.
fn data_blocks(file: &File, size: u64) -> std::io::Result<Vec<u64>> {
    DataBlocks::new(file, size).collect()
}

fn corrupt(path: &Path, reason: &str) -> BlockMapError {
    BlockMapError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The fields of a map file whose checksum was verified, read in order.
struct Records<'a, R> {
    input: R,
    path: &'a Path,
}

impl<R: Read> Records<'_, R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], BlockMapError> {
        let mut buf = [0u8; N];
        // The length was checked against the header, so running short means the file changed while
        // being read: as untrustworthy as damage.
        self.input
            .read_exact(&mut buf)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    corrupt(self.path, "shorter than its header says")
                }
                _ => io_err("read", self.path)(e),
            })?;
        Ok(buf)
    }

    fn word(&mut self) -> Result<u64, BlockMapError> {
        Ok(u64::from_le_bytes(self.bytes::<8>()?))
    }
}

/// The indices of the blocks of a file that hold at least one byte of data according to
/// SEEK_DATA/SEEK_HOLE, ascending, found one run of data at a time so that nothing is held per block. A
/// filesystem without hole reporting says "all data", which is slower but still right.
struct DataBlocks<'a> {
    file: &'a File,
    /// Where the next SEEK_DATA starts; `end` once the data is exhausted or a seek failed.
    at: u64,
    end: u64,
    /// The blocks of the current run of data not yet yielded.
    run: Range<u64>,
}

impl<'a> DataBlocks<'a> {
    fn new(file: &'a File, size: u64) -> Self {
        DataBlocks {
            file,
            at: 0,
            end: size,
            run: 0..0,
        }
    }

    /// The next run of data at or after `at`, as the range of blocks it touches.
    fn next_run(&mut self) -> std::io::Result<Option<Range<u64>>> {
        let fd = self.file.as_raw_fd();
        let start = match lseek(fd, self.at as i64, Whence::SeekData) {
            Ok(s) => s as u64,
            // ENXIO: no data at or after `at`.
            Err(Errno::ENXIO) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        // Data past the size seen at the start (a file that grew) is not part of this image.
        if start >= self.end {
            return Ok(None);
        }
        let stop = (lseek(fd, start as i64, Whence::SeekHole)? as u64).min(self.end);
        self.at = stop;
        Ok(Some(start / BLOCK_SIZE..stop.div_ceil(BLOCK_SIZE)))
    }
}

impl Iterator for DataBlocks<'_> {
    type Item = std::io::Result<u64>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(index) = self.run.next() {
                return Some(Ok(index));
            }
            if self.at >= self.end {
                return None;
            }
            match self.next_run() {
                // A run that begins in the block where the previous one ended shares that block, which
                // was yielded already: `run.end` is one past it.
                Ok(Some(run)) => self.run = run.start.max(self.run.end)..run.end,
                Ok(None) => {
                    self.at = self.end;
                    return None;
                }
                Err(e) => {
                    self.at = self.end;
                    return Some(Err(e));
                }
            }
        }
    }
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
        let mut map = BlockMap::zeros(data.len() as u64 / BLOCK_SIZE);
        for (index, block) in data.chunks(BLOCK_SIZE as usize).enumerate() {
            map.set(index as u64, hash_block(block));
        }
        map
    }

    /// A map file with a valid checksum around `body`, as if a careful writer had made it.
    fn sealed(mut body: Vec<u8>) -> Vec<u8> {
        let digest = Sha256::digest(&body);
        body.extend_from_slice(&digest);
        body
    }

    /// A version 2 file of `count` blocks holding exactly these records, in this order.
    fn v2_file(count: u64, records: &[(u64, [u8; 32])]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(b"FERRYBM2");
        body.extend_from_slice(&BLOCK_SIZE.to_le_bytes());
        body.extend_from_slice(&count.to_le_bytes());
        body.extend_from_slice(&(records.len() as u64).to_le_bytes());
        for (index, hash) in records {
            body.extend_from_slice(&index.to_le_bytes());
            body.extend_from_slice(hash);
        }
        sealed(body)
    }

    /// A version 1 file, as Ferry wrote them before maps became sparse: a flag and a hash for every
    /// block of the volume.
    fn v1_file(blocks: &[BlockHash]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(b"FERRYBM1");
        body.extend_from_slice(&BLOCK_SIZE.to_le_bytes());
        body.extend_from_slice(&(blocks.len() as u64).to_le_bytes());
        for block in blocks {
            match block {
                None => body.extend_from_slice(&[0u8; 33]),
                Some(h) => {
                    body.push(1);
                    body.extend_from_slice(h);
                }
            }
        }
        sealed(body)
    }

    fn load_bytes(bytes: &[u8]) -> Result<Option<BlockMap>, BlockMapError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blocks");
        std::fs::write(&path, bytes).unwrap();
        BlockMap::load(&path)
    }

    fn corrupt_reason(bytes: &[u8]) -> String {
        match load_bytes(bytes) {
            Err(BlockMapError::Corrupt { reason, .. }) => reason,
            other => panic!("expected Corrupt, got {other:?}"),
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
        // Only block 5 holds data: its record is the first, and this byte is inside its hash.
        assert_eq!(bytes.len() as u64, HEADER_LEN + RECORD_LEN + DIGEST_LEN);
        let flip = (HEADER_LEN + 8 + 7) as usize;
        bytes[flip] ^= 1;
        std::fs::write(&saved, &bytes).unwrap();
        let err = BlockMap::load(&saved).unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");

        for short in [&b"FERRYBM1short"[..], b"FERRYBM2short", b""] {
            std::fs::write(&saved, short).unwrap();
            assert!(matches!(
                BlockMap::load(&saved),
                Err(BlockMapError::Corrupt { .. })
            ));
        }
    }

    #[test]
    fn a_map_of_the_largest_volume_costs_what_its_data_costs() {
        // 64 TiB: a map with an entry per block would take gigabytes here, and this test would not end.
        let count = (64u64 << 40) / BLOCK_SIZE;
        let mut map = BlockMap::zeros(count);
        for (k, index) in [0, 7, count / 2, count - 1].into_iter().enumerate() {
            map.set(index, Some([k as u8 + 1; 32]));
        }
        map.set(count, Some([9; 32]));
        assert_eq!(map.len(), count);
        assert_eq!(
            map.data_blocks(),
            4,
            "an index beyond the volume is ignored"
        );
        assert_eq!(
            map.changed(&BlockMap::zeros(count)),
            vec![0, 7, count / 2, count - 1]
        );

        let dir = tempfile::tempdir().unwrap();
        let saved = dir.path().join("blocks");
        map.save(&saved).unwrap();
        assert_eq!(
            std::fs::metadata(&saved).unwrap().len(),
            HEADER_LEN + 4 * RECORD_LEN + DIGEST_LEN
        );
        let loaded = BlockMap::load(&saved).unwrap().unwrap();
        assert_eq!(loaded, map);
        assert_eq!(loaded.get(count / 2), Some([3; 32]));

        // Setting a block to zeros forgets it.
        map.set(7, None);
        assert_eq!(map.data_blocks(), 3);
        assert_eq!(loaded.changed(&map), vec![7]);
    }

    #[test]
    fn a_map_saved_by_an_older_ferry_loads() {
        let blocks = [None, Some([1; 32]), None, None, Some([4; 32]), None];
        let map = load_bytes(&v1_file(&blocks)).unwrap().unwrap();
        assert_eq!(map.len(), 6);
        assert_eq!(map.data_blocks(), 2);
        for (index, block) in blocks.iter().enumerate() {
            assert_eq!(map.get(index as u64), *block);
        }
        // An old map of no data blocks, and of no blocks at all.
        assert_eq!(
            load_bytes(&v1_file(&[None; 3])).unwrap(),
            Some(BlockMap::zeros(3))
        );
        assert_eq!(load_bytes(&v1_file(&[])).unwrap(), Some(BlockMap::zeros(0)));

        // Damage to an old map is refused like damage to a new one.
        let mut bytes = v1_file(&blocks);
        bytes[(HEADER_LEN_V1 + RECORD_LEN_V1 + 3) as usize] ^= 1;
        assert_eq!(corrupt_reason(&bytes), "checksum mismatch");
        let mut body = v1_file(&blocks);
        body.truncate(body.len() - 32);
        body[HEADER_LEN_V1 as usize] = 2;
        assert_eq!(corrupt_reason(&sealed(body)), "bad block record");
        let mut body = v1_file(&blocks);
        body.truncate(body.len() - 32 - 33);
        assert!(corrupt_reason(&sealed(body)).contains("length"));
    }

    #[test]
    fn records_must_ascend_inside_the_volume() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        assert_eq!(
            load_bytes(&v2_file(8, &[(3, a), (7, b)]))
                .unwrap()
                .unwrap()
                .changed(&BlockMap::zeros(8)),
            vec![3, 7]
        );
        assert_eq!(
            corrupt_reason(&v2_file(8, &[(5, a), (3, b)])),
            "records out of order"
        );
        assert_eq!(
            corrupt_reason(&v2_file(8, &[(3, a), (3, b)])),
            "records out of order"
        );
        assert_eq!(
            corrupt_reason(&v2_file(8, &[(3, a), (8, b)])),
            "a record lies beyond the block count"
        );
        assert_eq!(
            corrupt_reason(&v2_file(0, &[(0, a)])),
            "a record lies beyond the block count"
        );
        // A record count that disagrees with the length.
        let mut body = v2_file(8, &[(3, a)]);
        body.truncate(body.len() - 32);
        body[24] = 2;
        assert!(corrupt_reason(&sealed(body)).contains("length"));
        // Another block size.
        let mut body = v2_file(8, &[(3, a)]);
        body.truncate(body.len() - 32);
        body[8] ^= 1;
        assert_eq!(corrupt_reason(&sealed(body)), "another block size");
        // A magic Ferry does not know.
        let mut bytes = v2_file(8, &[(3, a)]);
        bytes[7] = b'9';
        assert_eq!(corrupt_reason(&bytes), "no block map header");
    }

    #[test]
    fn a_large_sparse_image_is_scanned_by_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        let count = (256u64 << 30) / BLOCK_SIZE;
        File::create(&path)
            .unwrap()
            .set_len(count * BLOCK_SIZE)
            .unwrap();
        write_at(&path, 10 * BLOCK_SIZE, b"a");
        write_at(&path, (count - 1) * BLOCK_SIZE - 1, b"bc");
        let map = BlockMap::scan(&path).unwrap();
        assert_eq!(map.len(), count);
        assert_eq!(
            map.data().map(|(i, _)| i).collect::<Vec<_>>(),
            vec![10, count - 2, count - 1]
        );
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

    /// A map of `count` blocks from (index, hash byte) pairs; a zero byte stands for zeros.
    fn sparse(count: u64, blocks: &[(u64, u8)]) -> BlockMap {
        let mut map = BlockMap::zeros(count);
        for (index, byte) in blocks {
            map.set(*index, (*byte != 0).then_some([*byte; 32]));
        }
        map
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
        /// The merge finds exactly the blocks that differ when every block is compared.
        #[test]
        fn changed_agrees_with_comparing_every_block(
            old_len in 0u64..40,
            old in proptest::collection::vec((0u64..45, 0u8..4), 0..30),
            now_len in 0u64..40,
            now in proptest::collection::vec((0u64..45, 0u8..4), 0..30),
        ) {
            // Indices past a map's length are dropped by `set`, as they would be in real use.
            let (old, now) = (sparse(old_len, &old), sparse(now_len, &now));
            let every: Vec<u64> = (0..old_len.max(now_len)).filter(|&i| old.get(i) != now.get(i)).collect();
            prop_assert_eq!(old.changed(&now), every);
        }

        /// Whatever map it is, it loads back equal.
        #[test]
        fn every_map_loads_back_equal(count in 0u64..40, blocks in proptest::collection::vec((0u64..45, 0u8..4), 0..30)) {
            let map = sparse(count, &blocks);
            let dir = tempfile::tempdir().unwrap();
            let saved = dir.path().join("blocks");
            map.save(&saved).unwrap();
            prop_assert_eq!(BlockMap::load(&saved).unwrap(), Some(map));
        }

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

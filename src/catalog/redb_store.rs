//! The embedded, single-host catalog: a `redb` database in the state directory.
//!
//! redb commits are crash-safe (copy-on-write with a checksummed commit slot), so a `kill -9` at any instant
//! leaves either the old or the new state. Writes from concurrent requests are coalesced by one writer
//! thread into a single transaction (group commit): each caller still waits for its own durable commit, but
//! thirty-two callers pay for about one fsync instead of thirty-two.
//!
//! After one I/O error (a full or read-only filesystem) redb answers every later call with "Previous I/O
//! error occurred" until the handle is dropped and the file opened again, which also repairs it. So a
//! failure of the file closes the handle, and the next call opens it again: the catalog works as soon as
//! its cause is gone, and meanwhile every caller is told that cause, not redb's "previous error".

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, RwLock};

use async_trait::async_trait;
use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::{Catalog, CatalogError, Expect, PendingWrite, Versioned, VolumeRecord};
use crate::sync::Recover;

/// Volume name -> 8-byte little-endian version followed by the JSON record.
const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");

/// How many queued writes one transaction takes at most, so one commit never grows without bound.
const MAX_BATCH: usize = 512;

fn storage(e: impl std::fmt::Display) -> CatalogError {
    CatalogError::Storage(e.to_string())
}

/// A failure inside a transaction: of the file itself, after which the handle must be reopened, or any
/// other (a conflict, a damaged record).
enum DbError {
    /// The words of the I/O error; empty for redb's "previous I/O error", whose cause was seen before.
    File(String),
    Catalog(CatalogError),
}

/// Sorts redb's errors into failures of the file and the rest.
fn db(e: impl Into<redb::Error>) -> DbError {
    match e.into() {
        redb::Error::Io(io) => DbError::File(io.to_string()),
        // A poisoned lock inside redb means a thread panicked mid-transaction: a fresh handle is the way
        // out of that too.
        redb::Error::PreviousIo | redb::Error::LockPoisoned(_) => DbError::File(String::new()),
        other => DbError::Catalog(storage(other)),
    }
}

impl From<CatalogError> for DbError {
    fn from(e: CatalogError) -> Self {
        DbError::Catalog(e)
    }
}

/// Opens (or creates) the database; a parameter so tests can put a failing storage under it.
type Opener = Box<dyn Fn() -> Result<Database, DbError> + Send + Sync>;

/// The open handle, or none after a failure of the file until the next call opens it again.
struct Handle {
    db: Option<Database>,
    /// Counts openings, so a failure seen on an old handle never closes a newer one.
    generation: u64,
}

/// The database file and its handle, shared by the writer thread and readers.
struct Store {
    path: PathBuf,
    open: Opener,
    handle: RwLock<Handle>,
    /// The I/O error that closed the handle, told to callers until an opening succeeds.
    cause: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().recover()
}

impl Store {
    fn unavailable(&self, cause: String) -> CatalogError {
        CatalogError::Unavailable {
            path: self.path.clone(),
            cause,
        }
    }

    /// The cause to tell: the new words if there are any, else the remembered ones.
    fn cause_of(&self, words: String) -> String {
        if !words.is_empty() {
            return words;
        }
        lock(&self.cause)
            .clone()
            .unwrap_or_else(|| "an earlier I/O error".into())
    }

    /// Opens the handle if a failure closed it. Under the handle's write lock, so no transaction is running
    /// on an old handle while the file is reopened (redb locks the file against a second handle).
    fn ensure_open(&self) -> Result<(), CatalogError> {
        if self.handle.read().recover().db.is_some() {
            return Ok(());
        }
        let mut h = self.handle.write().recover();
        if h.db.is_some() {
            return Ok(());
        }
        match (self.open)() {
            Ok(db) => {
                h.db = Some(db);
                h.generation += 1;
                if let Some(cause) = lock(&self.cause).take() {
                    tracing::info!(catalog = %self.path.display(), previous_error = %cause, "catalog opened again after a storage failure");
                }
                Ok(())
            }
            Err(DbError::File(words)) => Err(self.unavailable(self.cause_of(words))),
            Err(DbError::Catalog(e)) => Err(e),
        }
    }

    /// Closes the handle of `generation` after a failure of its file, so the next call opens it again.
    fn close(&self, generation: u64, words: String) -> CatalogError {
        let cause = self.cause_of(words);
        let mut h = self.handle.write().recover();
        if h.generation == generation && h.db.is_some() {
            // Dropping the handle releases redb's lock on the file; redb marks the file for repair, which
            // the next opening performs.
            h.db = None;
            *lock(&self.cause) = Some(cause.clone());
            tracing::error!(catalog = %self.path.display(), error = %cause, "the catalog file failed; it is opened again on the next call");
        }
        self.unavailable(cause)
    }

    /// Runs `f` on the open handle, opening it first if needed; a failure of the file closes it.
    fn with<T>(&self, f: impl FnOnce(&Database) -> Result<T, DbError>) -> Result<T, CatalogError> {
        self.ensure_open()?;
        let h = self.handle.read().recover();
        let generation = h.generation;
        let Some(database) = h.db.as_ref() else {
            // Another caller's failure closed it in between; its cause is ours.
            drop(h);
            return Err(self.unavailable(self.cause_of(String::new())));
        };
        match f(database) {
            Ok(v) => Ok(v),
            Err(DbError::Catalog(e)) => Err(e),
            Err(DbError::File(words)) => {
                drop(h);
                Err(self.close(generation, words))
            }
        }
    }
}

enum Write {
    Put {
        /// Boxed: a record is far larger than a delete, and writes queue by the hundred.
        record: Box<VolumeRecord>,
        expect: Expect,
        reply: oneshot::Sender<Result<u64, CatalogError>>,
    },
    Delete {
        name: String,
        version: u64,
        reply: oneshot::Sender<Result<u64, CatalogError>>,
    },
}

impl Write {
    fn reply(self, r: Result<u64, CatalogError>) {
        let tx = match self {
            Write::Put { reply, .. } | Write::Delete { reply, .. } => reply,
        };
        // The caller may have gone away (its request was cancelled); the write stands regardless.
        let _ = tx.send(r);
    }
}

/// The embedded catalog.
pub struct RedbCatalog {
    store: Arc<Store>,
    /// `None` only while dropping.
    writes: Option<mpsc::Sender<Write>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for RedbCatalog {
    fn drop(&mut self) {
        // Closing the channel ends the writer after its last batch; joining it releases the file lock, so
        // the catalog can be reopened at once.
        self.writes.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

fn decode(name: &str, bytes: &[u8]) -> Result<Versioned<VolumeRecord>, CatalogError> {
    let corrupt = |reason: String| CatalogError::Corrupt {
        name: name.to_string(),
        reason,
    };
    if bytes.len() < 8 {
        return Err(corrupt("record too short".into()));
    }
    let (ver, json) = bytes.split_at(8);
    let version = u64::from_le_bytes(ver.try_into().map_err(|_| corrupt("bad version".into()))?);
    let value = super::record::decode(json).map_err(corrupt)?;
    Ok(Versioned { value, version })
}

fn stored_version(table: &redb::Table<&str, &[u8]>, name: &str) -> Result<Option<u64>, DbError> {
    let Some(guard) = table.get(name).map_err(db)? else {
        return Ok(None);
    };
    let bytes = guard.value();
    if bytes.len() < 8 {
        return Err(DbError::Catalog(CatalogError::Corrupt {
            name: name.into(),
            reason: "record too short".into(),
        }));
    }
    let mut rev = [0u8; 8];
    rev.copy_from_slice(&bytes[..8]);
    Ok(Some(u64::from_le_bytes(rev)))
}

/// Makes sure the table exists, so readers never see "table does not exist".
fn prepare(database: Database) -> Result<Database, DbError> {
    let txn = database.begin_write().map_err(db)?;
    txn.open_table(VOLUMES).map_err(db)?;
    txn.commit().map_err(db)?;
    Ok(database)
}

/// Opens or creates the catalog file, readable by root only.
fn open_file(path: &Path) -> Result<Database, DbError> {
    let database = Database::builder()
        // The service keeps its own in-memory view; a small page cache keeps the resident size low.
        .set_cache_size(4 << 20)
        .create(path)
        .map_err(db)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| DbError::File(e.to_string()))?;
    prepare(database)
}

impl RedbCatalog {
    /// Opens or creates the catalog file, readable by root only.
    pub fn open(path: &Path) -> Result<Self, CatalogError> {
        let file = path.to_path_buf();
        Self::open_with(path, Box::new(move || open_file(&file)))
    }

    fn open_with(path: &Path, open: Opener) -> Result<Self, CatalogError> {
        let store = Arc::new(Store {
            path: path.to_path_buf(),
            open,
            handle: RwLock::new(Handle {
                db: None,
                generation: 0,
            }),
            cause: Mutex::new(None),
        });
        store.ensure_open().map_err(|e| {
            let detail = match e {
                CatalogError::Unavailable { cause, .. } => cause,
                CatalogError::Storage(detail) => detail,
                other => other.to_string(),
            };
            storage(format!("cannot open {}: {detail}", path.display()))
        })?;
        let (tx, rx) = mpsc::channel::<Write>();
        let writer_store = store.clone();
        let writer = std::thread::Builder::new()
            .name("ferry-catalog".into())
            .spawn(move || writer_loop(&writer_store, rx))
            .map_err(storage)?;
        Ok(RedbCatalog {
            store,
            writes: Some(tx),
            writer: Some(writer),
        })
    }

    /// Queues a write now and returns a future for its outcome.
    fn submit(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<u64, CatalogError>>) -> Write,
    ) -> PendingWrite {
        let (reply, rx) = oneshot::channel();
        let sent = match &self.writes {
            Some(tx) => tx.send(make(reply)).is_ok(),
            None => false,
        };
        Box::pin(async move {
            if !sent {
                return Err(storage("catalog writer has stopped"));
            }
            rx.await
                .map_err(|_| storage("catalog writer has stopped"))?
        })
    }
}

fn writer_loop(store: &Store, rx: mpsc::Receiver<Write>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        // A batch whose commit failed is not tried again: its writes may or may not be durable (a failed
        // fsync), and the callers reload what is.
        match store.with(|database| apply_batch(database, &batch)) {
            Ok(results) => {
                for (w, r) in batch.into_iter().zip(results) {
                    w.reply(r);
                }
            }
            Err(e) => {
                for w in batch {
                    w.reply(Err(e.clone()));
                }
            }
        }
    }
}

/// Applies every write whose condition holds in one transaction; a failed condition fails only its write.
fn apply_batch(
    database: &Database,
    batch: &[Write],
) -> Result<Vec<Result<u64, CatalogError>>, DbError> {
    let txn = database.begin_write().map_err(db)?;
    let mut results = Vec::with_capacity(batch.len());
    {
        let mut volumes = txn.open_table(VOLUMES).map_err(db)?;
        for w in batch {
            let (name, expect) = match w {
                Write::Put { record, expect, .. } => (record.name.as_str(), *expect),
                Write::Delete { name, version, .. } => (name.as_str(), Expect::Version(*version)),
            };
            let found = stored_version(&volumes, name)?;
            let holds = match expect {
                Expect::Absent => found.is_none(),
                Expect::Version(v) => found == Some(v),
            };
            if !holds {
                results.push(Err(CatalogError::Conflict {
                    name: name.to_string(),
                    expected: expect,
                    found,
                }));
                continue;
            }
            let version = expect.next_version();
            match w {
                Write::Put { record, .. } => {
                    let mut bytes = version.to_le_bytes().to_vec();
                    bytes.extend(super::record::encode(record).map_err(storage)?);
                    volumes.insert(name, bytes.as_slice()).map_err(db)?;
                }
                Write::Delete { .. } => {
                    volumes.remove(name).map_err(db)?;
                }
            }
            results.push(Ok(version));
        }
    }
    txn.commit().map_err(db)?;
    Ok(results)
}

#[async_trait]
impl Catalog for RedbCatalog {
    async fn load(&self) -> Result<Vec<Versioned<VolumeRecord>>, CatalogError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            store.with(|database| {
                let txn = database.begin_read().map_err(db)?;
                let table = txn.open_table(VOLUMES).map_err(db)?;
                let mut out = Vec::new();
                for item in table.iter().map_err(db)? {
                    let (k, v) = item.map_err(db)?;
                    out.push(decode(k.value(), v.value())?);
                }
                Ok(out)
            })
        })
        .await
        .map_err(storage)?
    }

    async fn get(&self, name: &str) -> Result<Option<Versioned<VolumeRecord>>, CatalogError> {
        let store = self.store.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || {
            store.with(|database| {
                let txn = database.begin_read().map_err(db)?;
                let table = txn.open_table(VOLUMES).map_err(db)?;
                let found = table.get(name.as_str()).map_err(db)?;
                Ok(found.map(|g| decode(&name, g.value())).transpose()?)
            })
        })
        .await
        .map_err(storage)?
    }

    fn put(&self, record: VolumeRecord, expect: Expect) -> PendingWrite {
        self.submit(|reply| Write::Put {
            record: Box::new(record),
            expect,
            reply,
        })
    }

    fn delete(&self, name: &str, version: u64) -> PendingWrite {
        let name = name.to_string();
        self.submit(|reply| Write::Delete {
            name,
            version,
            reply,
        })
    }
}

/// A disk for tests that fills up on demand, under a real redb.
#[cfg(test)]
pub(crate) mod test_disk {
    use super::*;

    /// Storage in memory that fails every write with ENOSPC while `full` is set, as a full filesystem does;
    /// each opening of the catalog gets a new backend over the same bytes, as a reopened file would.
    #[derive(Debug, Clone, Default)]
    pub(crate) struct FillableDisk {
        bytes: Arc<Mutex<Vec<u8>>>,
        full: Arc<std::sync::atomic::AtomicBool>,
    }

    impl FillableDisk {
        fn check(&self) -> std::io::Result<()> {
            if self.full.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
            Ok(())
        }

        pub(crate) fn set_full(&self, full: bool) {
            self.full.store(full, std::sync::atomic::Ordering::SeqCst);
        }

        pub(crate) fn catalog(&self) -> RedbCatalog {
            let disk = self.clone();
            RedbCatalog::open_with(
                Path::new("/test/catalog.redb"),
                Box::new(move || {
                    prepare(
                        Database::builder()
                            .create_with_backend(disk.clone())
                            .map_err(db)?,
                    )
                }),
            )
            .unwrap()
        }
    }

    impl redb::StorageBackend for FillableDisk {
        fn len(&self) -> std::io::Result<u64> {
            Ok(lock(&self.bytes).len() as u64)
        }

        fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
            let bytes = lock(&self.bytes);
            let start = offset as usize;
            Ok(bytes[start..start + len].to_vec())
        }

        fn set_len(&self, len: u64) -> std::io::Result<()> {
            let mut bytes = lock(&self.bytes);
            if len as usize > bytes.len() {
                self.check()?;
            }
            bytes.resize(len as usize, 0);
            Ok(())
        }

        fn sync_data(&self, _eventual: bool) -> std::io::Result<()> {
            Ok(())
        }

        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.check()?;
            let mut bytes = lock(&self.bytes);
            let start = offset as usize;
            bytes[start..start + data.len()].copy_from_slice(data);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_disk::FillableDisk;
    use super::*;
    use crate::catalog::VolumeState;
    use crate::spec::{SpecDefaults, VolumeSpec};

    fn record(name: &str) -> VolumeRecord {
        VolumeRecord {
            name: name.into(),
            spec: VolumeSpec::from_options(None, &SpecDefaults::default()).unwrap(),
            created_at: 1,
            state: VolumeState::Ready,
            mounts: Default::default(),
            mountpoint: None,
            shipped: None,
            dead_mounts: Default::default(),
        }
    }

    #[tokio::test]
    async fn compare_and_swap_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.redb");
        let cat = RedbCatalog::open(&path).unwrap();
        let r1 = cat.put(record("a"), Expect::Absent).await.unwrap();
        assert_eq!(r1, 1);
        assert!(matches!(
            cat.put(record("a"), Expect::Absent).await,
            Err(CatalogError::Conflict { found: Some(1), .. })
        ));
        let mut changed = record("a");
        changed.mounts.insert("id".into(), 2);
        // Writes queued back to back chain on the versions they will store.
        let first = cat.put(record("a"), Expect::Version(r1));
        let second = cat.put(changed.clone(), Expect::Version(r1 + 1));
        assert_eq!(first.await.unwrap(), 2);
        let r2 = second.await.unwrap();
        assert_eq!(r2, 3);
        assert_eq!(cat.get("a").await.unwrap().unwrap().value, changed);
        assert!(cat.put(record("a"), Expect::Version(r1)).await.is_err());
        assert!(cat.delete("a", r1).await.is_err());
        cat.put(record("b"), Expect::Absent).await.unwrap();
        drop(cat);
        let cat = RedbCatalog::open(&path).unwrap();
        let all = cat.load().await.unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].value, changed);
        assert_eq!(all[0].version, r2);
        assert!(cat.get("zzz").await.unwrap().is_none());
        cat.delete("a", r2).await.unwrap();
        assert_eq!(cat.load().await.unwrap().len(), 1);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    /// One full disk must not poison the catalog: every write while it is full names the real cause (not
    /// redb's "Previous I/O error"), and once there is room the next write works without a restart, with
    /// everything written before still there.
    #[tokio::test]
    async fn a_full_disk_fails_writes_with_its_cause_until_there_is_room_again() {
        let disk = FillableDisk::default();
        let cat = disk.catalog();
        cat.put(record("a"), Expect::Absent).await.unwrap();
        disk.set_full(true);
        for attempt in 0..3 {
            let err = cat.put(record("b"), Expect::Absent).await.unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(err, CatalogError::Unavailable { .. })
                    && text.contains("No space left on device")
                    && !text.contains("Previous I/O"),
                "attempt {attempt}: {text}"
            );
        }
        disk.set_full(false);
        assert_eq!(cat.put(record("b"), Expect::Absent).await.unwrap(), 1);
        let names: Vec<_> = cat
            .load()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.value.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
        let a = cat.get("a").await.unwrap().unwrap();
        cat.put(record("a"), Expect::Version(a.version))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn concurrent_writes_are_all_durable() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Arc::new(RedbCatalog::open(&dir.path().join("c.redb")).unwrap());
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let cat = cat.clone();
                tokio::spawn(async move { cat.put(record(&format!("v{i}")), Expect::Absent).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(cat.load().await.unwrap().len(), 64);
    }
}

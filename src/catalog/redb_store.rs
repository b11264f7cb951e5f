//! The embedded, single-host catalog: a `redb` database in the state directory.
//!
//! redb commits are crash-safe (copy-on-write with a checksummed commit slot), so a `kill -9` at any instant
//! leaves either the old or the new state. Writes from concurrent requests are coalesced by one writer
//! thread into a single transaction (group commit): each caller still waits for its own durable commit, but
//! thirty-two callers pay for about one fsync instead of thirty-two.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::{Catalog, CatalogError, Expect, PendingWrite, Versioned, VolumeRecord};

/// Volume name -> 8-byte little-endian version followed by the JSON record.
const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");

/// How many queued writes one transaction takes at most, so one commit never grows without bound.
const MAX_BATCH: usize = 512;

fn storage(e: impl std::fmt::Display) -> CatalogError {
    CatalogError::Storage(e.to_string())
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
    db: Arc<Database>,
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
    let value: VolumeRecord = serde_json::from_slice(json).map_err(|e| corrupt(e.to_string()))?;
    Ok(Versioned { value, version })
}

fn stored_version(
    table: &redb::Table<&str, &[u8]>,
    name: &str,
) -> Result<Option<u64>, CatalogError> {
    let Some(guard) = table.get(name).map_err(storage)? else {
        return Ok(None);
    };
    let bytes = guard.value();
    if bytes.len() < 8 {
        return Err(CatalogError::Corrupt {
            name: name.into(),
            reason: "record too short".into(),
        });
    }
    let mut rev = [0u8; 8];
    rev.copy_from_slice(&bytes[..8]);
    Ok(Some(u64::from_le_bytes(rev)))
}

impl RedbCatalog {
    /// Opens or creates the catalog file, readable by root only.
    pub fn open(path: &Path) -> Result<Self, CatalogError> {
        let db = Database::builder()
            // The service keeps its own in-memory view; a small page cache keeps the resident size low.
            .set_cache_size(4 << 20)
            .create(path)
            .map_err(|e| storage(format!("cannot open {}: {e}", path.display())))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(storage)?;
        let db = Arc::new(db);
        {
            // Make sure both tables exist so readers never see "table does not exist".
            let txn = db.begin_write().map_err(storage)?;
            txn.open_table(VOLUMES).map_err(storage)?;
            txn.commit().map_err(storage)?;
        }
        let (tx, rx) = mpsc::channel::<Write>();
        let writer_db = db.clone();
        let writer = std::thread::Builder::new()
            .name("ferry-catalog".into())
            .spawn(move || writer_loop(&writer_db, rx))
            .map_err(storage)?;
        Ok(RedbCatalog {
            db,
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

fn writer_loop(db: &Database, rx: mpsc::Receiver<Write>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        match apply_batch(db, &batch) {
            Ok(results) => {
                for (w, r) in batch.into_iter().zip(results) {
                    w.reply(r);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for w in batch {
                    w.reply(Err(CatalogError::Storage(msg.clone())));
                }
            }
        }
    }
}

/// Applies every write whose condition holds in one transaction; a failed condition fails only its write.
fn apply_batch(
    db: &Database,
    batch: &[Write],
) -> Result<Vec<Result<u64, CatalogError>>, CatalogError> {
    let txn = db.begin_write().map_err(storage)?;
    let mut results = Vec::with_capacity(batch.len());
    {
        let mut volumes = txn.open_table(VOLUMES).map_err(storage)?;
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
                    serde_json::to_writer(&mut bytes, record).map_err(storage)?;
                    volumes.insert(name, bytes.as_slice()).map_err(storage)?;
                }
                Write::Delete { .. } => {
                    volumes.remove(name).map_err(storage)?;
                }
            }
            results.push(Ok(version));
        }
    }
    txn.commit().map_err(storage)?;
    Ok(results)
}

#[async_trait]
impl Catalog for RedbCatalog {
    async fn load(&self) -> Result<Vec<Versioned<VolumeRecord>>, CatalogError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(storage)?;
            let table = txn.open_table(VOLUMES).map_err(storage)?;
            let mut out = Vec::new();
            for item in table.iter().map_err(storage)? {
                let (k, v) = item.map_err(storage)?;
                out.push(decode(k.value(), v.value())?);
            }
            Ok(out)
        })
        .await
        .map_err(storage)?
    }

    async fn get(&self, name: &str) -> Result<Option<Versioned<VolumeRecord>>, CatalogError> {
        let db = self.db.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(storage)?;
            let table = txn.open_table(VOLUMES).map_err(storage)?;
            let found = table.get(name.as_str()).map_err(storage)?;
            found.map(|g| decode(&name, g.value())).transpose()
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

#[cfg(test)]
mod tests {
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

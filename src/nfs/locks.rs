//! `NfsLocks`: the FUSE adapter's `LockStore` over the server's lock manager (`nlm`), so a lock taken
//! through one host's mount holds against every other client of the export; and the clean-up after a FUSE
//! helper that died holding locks.
//!
//! Owners: NLM names a lock owner by the caller name, an owner handle and a "pid" (svid). The caller name is
//! one per helper instance (`ferry:HOST:VOLUME:INSTANCE`); the owner handle is the kernel's 64-bit lock owner;
//! the svid is the pid of the owner's first locking process, kept for all its later calls, because servers
//! such as Linux knfsd tell owners apart by the svid alone.
//!
//! A helper that dies holding locks cannot release them, and nothing tells the server (locks are taken
//! non-monitored: see `nlm`). So before its first LOCK for a (file, owner) pair the store appends that pair
//! to a journal on this host's disk; the daemon, when it sees the helper exit (or finds a journal left by a
//! helper that died while the daemon was down), sends UNLOCK for every pair with the dead instance's caller
//! name (`release_journal`). FREE_ALL would be simpler, but NFS-Ganesha (unless told to use caller names)
//! applies it to every lock of the calling address: every other volume and helper on this host would lose
//! its locks. The journal shrinks back to its header whenever the helper holds no locks.
//!
//! It must not wait for a lock (the adapter polls) or decide what happens without a lock manager (the
//! adapter's `Locking` does).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;

use super::nlm::{
    NlmClient, NlmConfig, NlmError, NlmLock, NLM4_DENIED_GRACE_PERIOD, NLM4_STALE_FH,
};
use crate::fuse::locks::{
    Conflict, LockError, LockKind, LockRequest, LockResult, LockStore, TO_EOF,
};
use crate::fuse::FileHandle;
use crate::sync::Recover;

/// A `LockStore` on the server's lock manager.
#[derive(Debug)]
pub struct NfsLocks {
    nlm: NlmClient,
    caller: String,
    journal: PathBuf,
    /// (file, owner) pairs that may hold locks on the server, with the owner's svid.
    pairs: Mutex<HashMap<(FileHandle, u64), i32>>,
}

/// The first line of a journal: the caller name its locks were taken as.
const CALLER: &str = "caller ";
/// Every other line: `lock FH OWNER SVID` (hex, hex, decimal).
const LOCK: &str = "lock ";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// NLM's length for `start..=end`: 0 is "to the end of the file".
fn nlm_len(start: u64, end: u64) -> u64 {
    if end >= TO_EOF {
        0
    } else {
        end - start + 1
    }
}

fn lock_error(e: NlmError) -> LockError {
    let errno = match &e {
        NlmError::Absent { .. } => {
            return LockError::new(
                libc::ENOLCK,
                format!(
                    "{e}; locks are refused rather than kept on one host only: enable the server's lock \
                     manager, or set [nfs] locks = \"local\" (see docs/nfs.md, \"Locks\")"
                ),
            )
        }
        NlmError::TimedOut { .. } => libc::EIO,
        NlmError::Refused {
            stat: NLM4_STALE_FH,
            ..
        } => libc::ESTALE,
        NlmError::Refused { stat: 6, .. } => libc::EROFS,
        NlmError::Refused { .. } | NlmError::Io { .. } => libc::ENOLCK,
    };
    LockError::new(errno, e.to_string())
}

impl NfsLocks {
    /// A store whose locks are taken as `caller` (at most `nlm::MAX_CALLER_NAME` bytes) and journalled in
    /// `journal` (created now, replacing any file there).
    pub fn new(config: NlmConfig, caller: String, journal: PathBuf) -> std::io::Result<Self> {
        let store = Self {
            nlm: NlmClient::new(config),
            caller,
            journal,
            pairs: Mutex::new(HashMap::new()),
        };
        store.reset_journal()?;
        Ok(store)
    }

    /// A name for one helper instance, unique on this host: the time and the daemon's pid.
    pub fn instance_id() -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("{nanos:x}.{:x}", std::process::id())
    }

    /// The NLM caller name of a helper instance.
    pub fn caller_name(host: &str, volume: &str, instance: &str) -> String {
        let name = format!("ferry:{host}:{volume}:{instance}");
        // Volume names are short; cut at a character boundary all the same.
        let mut cut = name.len().min(super::nlm::MAX_CALLER_NAME);
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name[..cut].to_string()
    }

    fn reset_journal(&self) -> std::io::Result<()> {
        std::fs::write(&self.journal, format!("{CALLER}{}\n", self.caller))
    }

    fn nlm_lock(&self, file: &FileHandle, owner: u64, svid: i32, start: u64, end: u64) -> NlmLock {
        NlmLock {
            caller_name: self.caller.clone(),
            fh: file.0.to_vec(),
            oh: owner.to_be_bytes().to_vec(),
            svid,
            offset: start,
            len: nlm_len(start, end),
        }
    }

    /// The svid of a pair: its own, the owner's on another file, or the asking process's pid.
    fn svid(&self, file: &FileHandle, lock: &LockRequest) -> i32 {
        let pairs = self.pairs.lock().recover();
        if let Some(s) = pairs.get(&(file.clone(), lock.owner)) {
            return *s;
        }
        pairs
            .iter()
            .find(|((_, o), _)| *o == lock.owner)
            .map(|(_, s)| *s)
            .unwrap_or(lock.pid as i32)
    }

    /// Records the pair in memory and in the journal before its first LOCK is sent.
    fn journal_pair(&self, file: &FileHandle, owner: u64, svid: i32) -> LockResult<()> {
        let mut pairs = self.pairs.lock().recover();
        if pairs.contains_key(&(file.clone(), owner)) {
            return Ok(());
        }
        let line = format!("{LOCK}{} {owner:016x} {svid}\n", hex(&file.0));
        std::fs::OpenOptions::new()
            .append(true)
            .open(&self.journal)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .map_err(|e| {
                LockError::new(
                    libc::ENOLCK,
                    format!(
                        "cannot record the lock in {} (needed to release it if this helper dies): {e}",
                        self.journal.display()
                    ),
                )
            })?;
        pairs.insert((file.clone(), owner), svid);
        Ok(())
    }
}

#[async_trait]
impl LockStore for NfsLocks {
    async fn test(&self, file: &FileHandle, lock: &LockRequest) -> LockResult<Option<Conflict>> {
        let svid = self.svid(file, lock);
        let nlm = self.nlm_lock(file, lock.owner, svid, lock.start, lock.end);
        let holder = self
            .nlm
            .test(&nlm, lock.kind == LockKind::Write)
            .await
            .map_err(lock_error)?;
        Ok(holder.map(|h| Conflict {
            kind: if h.exclusive {
                LockKind::Write
            } else {
                LockKind::Read
            },
            start: h.offset.min(TO_EOF),
            end: if h.len == 0 {
                TO_EOF
            } else {
                h.offset.saturating_add(h.len - 1).min(TO_EOF)
            },
            pid: u32::try_from(h.svid).unwrap_or(0),
        }))
    }

    async fn try_lock(&self, file: &FileHandle, lock: &LockRequest) -> LockResult<bool> {
        let svid = self.svid(file, lock);
        self.journal_pair(file, lock.owner, svid)?;
        let nlm = self.nlm_lock(file, lock.owner, svid, lock.start, lock.end);
        match self.nlm.lock(&nlm, lock.kind == LockKind::Write).await {
            Ok(granted) => Ok(granted),
            // A server just restarted takes only reclaims for a while: as good as a conflict, try later.
            Err(NlmError::Refused {
                stat: NLM4_DENIED_GRACE_PERIOD,
                ..
            }) => Ok(false),
            Err(e) => Err(lock_error(e)),
        }
    }

    async fn unlock(&self, file: &FileHandle, owner: u64, start: u64, end: u64) -> LockResult<()> {
        let svid = {
            let pairs = self.pairs.lock().recover();
            match pairs.get(&(file.clone(), owner)) {
                Some(s) => *s,
                // Never locked through this store: nothing of it to release.
                None => return Ok(()),
            }
        };
        let nlm = self.nlm_lock(file, owner, svid, start, end);
        self.nlm.unlock(&nlm).await.map_err(lock_error)
    }

    async fn unlock_owner(&self, file: &FileHandle, owner: u64) -> LockResult<()> {
        self.unlock(file, owner, 0, TO_EOF).await?;
        let mut pairs = self.pairs.lock().recover();
        pairs.remove(&(file.clone(), owner));
        if pairs.is_empty() {
            // Nothing held any more: the journal need not list released pairs.
            if let Err(e) = self.reset_journal() {
                tracing::warn!(journal = %self.journal.display(), error = %e, "cannot shorten the lock journal");
            }
        }
        Ok(())
    }
}

/// Releases on the server every lock a journal lists, as the dead helper that wrote it, and removes the
/// journal once all are released. Returns how many (file, owner) pairs it released. Call it only when the
/// helper that wrote `journal` is gone.
pub async fn release_journal(journal: &Path, config: NlmConfig) -> Result<usize, String> {
    let text = match std::fs::read_to_string(journal) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => {
            return Err(format!(
                "cannot read the lock journal {}: {e}",
                journal.display()
            ))
        }
    };
    let mut lines = text.lines();
    let Some(caller) = lines.next().and_then(|l| l.strip_prefix(CALLER)) else {
        // A journal cut before its header was written holds no locks.
        let _ = std::fs::remove_file(journal);
        return Ok(0);
    };
    let nlm = NlmClient::new(config);
    let mut released = 0;
    for line in lines {
        let mut words = line.strip_prefix(LOCK).unwrap_or_default().split(' ');
        let parsed = (|| {
            let fh = unhex(words.next()?)?;
            let owner = u64::from_str_radix(words.next()?, 16).ok()?;
            let svid = words.next()?.parse::<i32>().ok()?;
            Some((fh, owner, svid))
        })();
        // A line cut short by the helper's death was never followed by its LOCK.
        let Some((fh, owner, svid)) = parsed else {
            continue;
        };
        let lock = NlmLock {
            caller_name: caller.to_string(),
            fh,
            oh: owner.to_be_bytes().to_vec(),
            svid,
            offset: 0,
            len: 0,
        };
        match nlm.unlock(&lock).await {
            Ok(()) => released += 1,
            // The file is gone, and its locks with it.
            Err(NlmError::Refused {
                stat: NLM4_STALE_FH,
                ..
            }) => released += 1,
            Err(e) => return Err(format!("cannot release a dead helper's lock: {e}")),
        }
    }
    match std::fs::remove_file(journal) {
        // Another clean-up (the daemon's reaper and its Unmount may both run) got there first.
        Ok(()) => Ok(released),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(released),
        Err(e) => Err(format!(
            "cannot remove the lock journal {}: {e}",
            journal.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_and_hex_round_trip() {
        assert_eq!(nlm_len(0, TO_EOF), 0);
        assert_eq!(nlm_len(10, 19), 10);
        assert_eq!(
            unhex(&hex(&[0, 1, 0xab, 0xff])).unwrap(),
            vec![0, 1, 0xab, 0xff]
        );
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn caller_names_are_unique_per_instance_and_bounded() {
        let a = NfsLocks::caller_name("h", "v", &NfsLocks::instance_id());
        std::thread::sleep(std::time::Duration::from_millis(1));
        let b = NfsLocks::caller_name("h", "v", &NfsLocks::instance_id());
        assert_ne!(a, b);
        assert!(a.starts_with("ferry:h:v:"));
        let long = NfsLocks::caller_name(&"é".repeat(900), "v", "1");
        assert!(long.len() <= super::super::nlm::MAX_CALLER_NAME);
    }

    #[tokio::test]
    async fn a_journal_without_locks_is_removed_without_calling_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locks");
        std::fs::write(&path, "caller ferry:h:v:1\nlock 0a0b 000000000000000").unwrap();
        // The only lock line is cut short, so no server is needed (port 1 would refuse).
        let config = NlmConfig {
            server: std::net::Ipv4Addr::LOCALHOST.into(),
            port: Some(1),
            timeout: std::time::Duration::from_secs(1),
            uid: 0,
            gid: 0,
        };
        assert_eq!(release_journal(&path, config.clone()).await, Ok(0));
        assert!(!path.exists());
        assert_eq!(release_journal(&path, config).await, Ok(0));
    }
}

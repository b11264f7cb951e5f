//! The local copies on this host: where each volume's files are (`Paths`, and where it is exposed), the
//! record of what its copy is based on (`LocalCopy`, `copy.json`, written atomically and durably), the
//! conflicts recorded against copies (kept in memory too, so Status answers without reading files), and
//! the size and filesystem of a volume's image.
//!
//! It must not talk to EBS, mount anything, or decide what a record means (see `decide`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::client::EbsError;
use super::errors::{ebs_err, internal};
use crate::backend::BackendError;
use crate::spec::{BackendSpec, FsType, VolumeSpec};
use crate::sync::Recover;

/// What the local copy of one volume is based on; `copy.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct LocalCopy {
    /// The snapshot the image was pulled from or last shipped as; `None` before the first push.
    pub snapshot: Option<String>,
    pub generation: u64,
    /// Set before the image is mounted and cleared once everything is shipped: the image may hold
    /// changes no snapshot has.
    pub dirty: bool,
    /// A snapshot a push started and has not recorded as done; the next push or mount settles it.
    pub pending: Option<String>,
    /// Whether `pending` was sealed (CompleteSnapshot accepted): EBS may still be processing such a
    /// snapshot, so it is waited for (up to a minute) and adopted once completed; one still pending after
    /// the wait is deleted like an unsealed one.
    #[serde(default)]
    pub sealed: bool,
    /// Why this copy cannot be shipped or mounted (changes on an old base, a lost race for a generation),
    /// kept until the copy is set aside or ships; shown as the volume's health after any restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict: Option<String>,
}

/// The files of one volume's local copy.
pub(super) struct Paths {
    pub dir: PathBuf,
    pub image: PathBuf,
    pub blocks: PathBuf,
    pub copy: PathBuf,
}

/// The cache directory holding every local copy, and the conflicts recorded against them.
pub(super) struct Copies {
    root: PathBuf,
    mount_root: Option<PathBuf>,
    /// The `conflict` of every local copy, loaded at start and kept in step with `copy.json`, so Status
    /// answers from memory.
    conflicts: Mutex<HashMap<String, String>>,
}

impl Copies {
    /// `root` and `mount_root` are resolved already (see `backend::prepare_roots`). Reads the `conflict`
    /// of every local copy into memory.
    pub(super) fn new(root: PathBuf, mount_root: Option<PathBuf>) -> Self {
        let copies = Copies {
            root,
            mount_root,
            conflicts: Default::default(),
        };
        copies.load_conflicts();
        copies
    }

    /// The cache directory.
    pub(super) fn root(&self) -> &Path {
        &self.root
    }

    /// Where volumes are exposed, if not under their own directory.
    pub(super) fn mount_root(&self) -> Option<&Path> {
        self.mount_root.as_deref()
    }

    pub(super) fn paths(&self, name: &str) -> Paths {
        let dir = self.root.join(name);
        Paths {
            image: dir.join("image"),
            blocks: dir.join("blocks"),
            copy: dir.join("copy.json"),
            dir,
        }
    }

    /// Where the volume's image is mounted.
    pub(super) fn exposed(&self, name: &str) -> PathBuf {
        match &self.mount_root {
            Some(m) => m.join(name),
            None => self.root.join(name).join("mnt"),
        }
    }

    /// The copy's record; the default (nothing shipped, nothing changed) if there is none.
    pub(super) fn load(&self, name: &str) -> Result<LocalCopy, BackendError> {
        let path = self.paths(name).copy;
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                ebs_err(EbsError::Invalid {
                    volume: name.into(),
                    reason: format!(
                        "{} is unreadable ({e}); run `ferry ebs set-aside {name}` to move the local copy \
                         aside (it prints where) and pull the newest snapshot at the next mount",
                        path.display()
                    ),
                })
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LocalCopy::default()),
            Err(e) => Err(BackendError::io("read", &path)(e)),
        }
    }

    /// Writes `copy.json` atomically and durably.
    pub(super) fn save(&self, name: &str, copy: &LocalCopy) -> Result<(), BackendError> {
        let bytes = serde_json::to_vec_pretty(copy).map_err(internal)?;
        crate::durable::write_atomic(&self.paths(name).copy, &bytes)
            .map_err(|e| BackendError::io(e.op, &e.path)(e.source))
    }

    fn load_conflicts(&self) {
        let Ok(dirs) = std::fs::read_dir(&self.root) else {
            return;
        };
        let mut found = self.conflicts.lock().recover();
        for dir in dirs.flatten() {
            let name = dir.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            if let Ok(LocalCopy {
                conflict: Some(c), ..
            }) = self.load(&name)
            {
                found.insert(name, c);
            }
        }
    }

    /// Records durably (and in memory) why this copy cannot ship, and returns the error that says so.
    pub(super) fn conflict(&self, name: &str, copy: &mut LocalCopy, err: EbsError) -> BackendError {
        let text = err.to_string();
        copy.conflict = Some(text.clone());
        if let Err(e) = self.save(name, copy) {
            tracing::error!(volume = name, error = %e, "cannot record the conflict in the local copy's record");
        }
        self.conflicts
            .lock()
            .recover()
            .insert(name.to_string(), text);
        ebs_err(err)
    }

    /// Forgets a conflict once the copy mounted or shipped from the newest base (the caller saves `copy`).
    pub(super) fn settled(&self, name: &str, copy: &mut LocalCopy) {
        copy.conflict = None;
        self.forget(name);
    }

    /// Forgets the in-memory conflict of a copy that was set aside or deleted.
    pub(super) fn forget(&self, name: &str) {
        self.conflicts.lock().recover().remove(name);
    }

    /// The conflict recorded against the volume's copy, if any.
    pub(super) fn problem(&self, name: &str) -> Option<String> {
        self.conflicts.lock().recover().get(name).cloned()
    }
}

/// The image's size and filesystem.
pub(super) fn sized(spec: &VolumeSpec) -> Result<(u64, FsType), BackendError> {
    match spec.backend {
        BackendSpec::Ebs { size, fs, .. } => Ok((size, fs)),
        _ => Err(internal("a volume of another backend was routed to ebs")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_record_without_a_conflict_reads_as_before() {
        let old = r#"{"snapshot":"snap-1","generation":3,"dirty":false,"pending":null}"#;
        let copy: LocalCopy = serde_json::from_str(old).unwrap();
        assert_eq!(copy.conflict, None);
        assert!(!serde_json::to_string(&copy).unwrap().contains("conflict"));
    }
}

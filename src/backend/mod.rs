//! Backends: where a volume's data lives. Each prepares and releases storage and says where the data is
//! reachable; none knows Docker's protocol, and none is asked anything on the Get/List/Path path except
//! `is_attached` and `status`, which answer from memory and a mount-table snapshot.

pub mod ebs;
mod limits;
mod local;
pub mod nfs;

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde_json::{Map, Value};

pub use crate::catalog::Shipped;
use crate::doctor::human_bytes;
use crate::mount::{Holder, MountError, MountTable, Mounter};
use crate::spec::{BackendKind, VolumeSpec};

pub use ebs::EbsBackend;
pub use local::LocalBackend;
pub use nfs::NfsBackend;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} already exists but no volume record owns it; move it away or pick another volume name")]
    Orphan { path: PathBuf },
    #[error("the data of this volume is missing at {path}; restore it from a backup or remove the volume")]
    Missing { path: PathBuf },
    #[error("{path} is still mounted; stop whatever uses it and try again")]
    StillMounted { path: PathBuf },
    #[error("the {0} backend failed: {1}")]
    Internal(BackendKind, String),
    /// Boxed: NFS errors carry the endpoint and path, and every result of the service would grow with them.
    #[error(transparent)]
    Nfs(Box<crate::nfs::NfsError>),
    /// Boxed like `Nfs`: EBS errors carry the volume, snapshot and AWS's words.
    #[error(transparent)]
    Ebs(Box<ebs::EbsError>),
    #[error("the volume is still mounted on host {host}, whose marker was refreshed {age_secs} s ago; unmount it there first. A host that stops refreshing its marker for {stale_secs} s no longer counts")]
    MountedElsewhere {
        host: String,
        age_secs: u64,
        stale_secs: u64,
    },
    #[error("subdir {subdir:?} cannot be used: {reason}; subdir must name an existing directory of the export")]
    NoSuchSubdir { subdir: String, reason: String },
    #[error("cannot serve volume {volume} through FUSE: {reason}")]
    Helper { volume: String, reason: String },
    #[error("{op} applies only to ebs volumes, and this one uses the {backend} backend")]
    Unsupported {
        op: &'static str,
        backend: BackendKind,
    },
    #[error("size={size} does not fit on the filesystem that holds this volume's image ({dir}): its largest file is {largest_file}, so the largest size it can hold is {max}; choose a smaller size, or move the directory to a filesystem with larger files (such as xfs, or ext4 with 4 KiB blocks)")]
    TooLarge {
        size: String,
        max: String,
        largest_file: String,
        dir: PathBuf,
    },
    #[error("size={size} is more than an EBS snapshot can hold: EBS takes volumes of at most {max}; choose size={max} or less, or spread the data over several volumes")]
    EbsTooLarge { size: String, max: String },
    /// Sizes in bytes.
    #[error("cannot promise {}: its image needs up to {} on the filesystem of {path}, the capped volumes already there can still grow by {}, and only {} is free. Free space there, choose a smaller size, or set overcommit = true in the [local] section of the configuration to allow caps beyond the free space (a full disk then fails writes inside capped volumes)", crate::spec::format_size(*.size), human_bytes(*.needed), human_bytes(*.others), human_bytes(*.free))]
    Overcommit {
        size: u64,
        needed: u64,
        others: u64,
        free: u64,
        path: PathBuf,
    },
    /// Boxed like `Nfs`: it carries the image, the reason and the tool's words.
    #[error(transparent)]
    Damaged(Box<DamagedImage>),
    #[error("the filesystem of {path} is full ({what}): volumes and Ferry's catalog cannot be written; free space on it")]
    Full { path: PathBuf, what: String },
    #[error("the attached storage was lost while {mounts} container mount(s) used it (for nfs: its FUSE helper exited); those containers get I/O errors until restarted, and the next mount attaches the volume again")]
    Lost { mounts: u64 },
}

/// A volume image whose filesystem the repair check before mounting could not repair by itself.
#[derive(Debug, thiserror::Error)]
#[error("the {fs} filesystem in {image} needs a repair ({reason}) that {tool} could not make without help: {detail}. It was not mounted: stop every container using the volume, copy the image somewhere safe and repair it by hand (`e2fsck -f IMAGE`; for xfs `xfs_repair IMAGE`, after mounting and unmounting it once if it asks for its log to be replayed), then mount again")]
pub struct DamagedImage {
    pub fs: &'static str,
    pub image: PathBuf,
    /// Why it was checked.
    pub reason: String,
    pub tool: &'static str,
    /// The tool's last words.
    pub detail: String,
}

impl BackendError {
    /// A stable, low-cardinality name of the failure, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendError::Mount(_) => "mount",
            BackendError::Io { .. } => "io",
            BackendError::Orphan { .. } => "orphan",
            BackendError::Missing { .. } => "missing",
            BackendError::StillMounted { .. } => "still_mounted",
            BackendError::Internal(..) => "internal",
            BackendError::Nfs(e) => e.kind(),
            BackendError::Ebs(e) => e.kind(),
            BackendError::MountedElsewhere { .. } => "mounted_elsewhere",
            BackendError::NoSuchSubdir { .. } => "no_such_subdir",
            BackendError::Helper { .. } => "helper",
            BackendError::Lost { .. } => "lost",
            BackendError::TooLarge { .. } | BackendError::EbsTooLarge { .. } => "too_large",
            BackendError::Unsupported { .. } => "unsupported",
            BackendError::Overcommit { .. } => "overcommit",
            BackendError::Damaged(_) => "damaged",
            BackendError::Full { .. } => "full",
        }
    }

    pub fn io<'a>(
        op: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(std::io::Error) -> BackendError + 'a {
        move |source| BackendError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Creates a backend's root directory (and the mount root, if any) root-only, and returns both resolved:
/// the mount table names resolved paths, and comparing against anything else (a symlink, a relative path)
/// would make a mounted volume look unmounted and get it mounted a second time.
pub(crate) fn prepare_roots(
    root: PathBuf,
    mount_root: Option<PathBuf>,
) -> Result<(PathBuf, Option<PathBuf>), BackendError> {
    use std::os::unix::fs::DirBuilderExt;
    for dir in std::iter::once(&root).chain(mount_root.as_ref()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(BackendError::io("create", dir))?;
    }
    let root = std::fs::canonicalize(&root).map_err(BackendError::io("resolve", &root))?;
    let mount_root = match mount_root {
        Some(m) => Some(std::fs::canonicalize(&m).map_err(BackendError::io("resolve", &m))?),
        None => None,
    };
    Ok((root, mount_root))
}

/// Runs blocking work (filesystem calls, mkfs, mount, image I/O) off the async threads; a panic in it
/// becomes the backend's internal error rather than taking the daemon down.
pub(crate) async fn blocking<T: Send + 'static>(
    kind: BackendKind,
    f: impl FnOnce() -> Result<T, BackendError> + Send + 'static,
) -> Result<T, BackendError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BackendError::Internal(kind, e.to_string()))?
}

/// Refuses an image of `image_len(size)` bytes that the filesystem holding `dir` cannot hold as one file,
/// naming the largest size it can. A filesystem that cannot be asked lets the create go on; sizing the
/// image then reports whatever it has to.
pub(crate) fn check_image_fits(
    dir: &Path,
    size: u64,
    image_len: impl Fn(u64) -> u64,
) -> Result<(), BackendError> {
    match limits::largest_file_if_smaller(dir, image_len(size)) {
        Ok(None) => Ok(()),
        Ok(Some(largest)) => Err(BackendError::TooLarge {
            size: crate::spec::format_size(size),
            max: crate::spec::format_size(limits::largest_size(largest, image_len)),
            largest_file: crate::spec::format_size(largest),
            dir: dir.to_path_buf(),
        }),
        Err(e) => {
            tracing::debug!(dir = %dir.display(), error = %e, "cannot probe the largest file size");
            Ok(())
        }
    }
}

/// Refuses an ebs volume of `size` bytes that no EBS snapshot could hold, naming the largest one can: a
/// create that went ahead would fail only at the first push, after the volume had been used.
pub(crate) fn check_ebs_size(size: u64) -> Result<(), BackendError> {
    if size <= limits::EBS_MAX_SIZE {
        return Ok(());
    }
    Err(BackendError::EbsTooLarge {
        size: crate::spec::format_size(size),
        max: crate::spec::format_size(limits::EBS_MAX_SIZE),
    })
}

/// Refuses `path` if it, or any directory between `root` and it, is a symbolic link. `root` itself was
/// resolved once at start-up; below it everything is Ferry's own making, so a link there was planted.
/// Paths outside `root` are not checked. A component that does not exist yet is fine: Ferry creates it.
pub(crate) fn refuse_links(root: &Path, path: &Path) -> Result<(), BackendError> {
    let Ok(rel) = path.strip_prefix(root) else {
        return Ok(());
    };
    let mut at = root.to_path_buf();
    for part in rel.components() {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(MountError::PlantedLink { path: at }.into());
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(BackendError::io("inspect", &at)(e)),
        }
    }
    Ok(())
}

/// What `release_mount` does with a mount that a process still uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WhenBusy {
    /// Fail: what lies below must not be deleted or shipped while anything can still write to it.
    Refuse,
    /// Detach it lazily (`umount -l`), so the unmount succeeds; processes that use it keep it until they
    /// let go. For storage that stays intact after the unmount, such as an NFS export.
    Detach,
}

/// Unmounts whatever is mounted at `target` and reads the table again: a mount still there (another one
/// stacked under it) is `StillMounted`, so no caller goes on to delete or ship storage that is in use.
/// Succeeds at once if nothing is mounted there.
pub(crate) fn release_mount(
    mounter: &dyn Mounter,
    target: &Path,
    busy: WhenBusy,
) -> Result<(), BackendError> {
    if !mounter.mount_table()?.is_mounted(target) {
        return Ok(());
    }
    match mounter.unmount(target) {
        Ok(()) => {}
        Err(MountError::Unmount {
            errno: nix::errno::Errno::EBUSY,
            ..
        }) if busy == WhenBusy::Detach => {
            tracing::warn!(target = %target.display(), "mount busy; detaching it lazily");
            mounter.detach(target)?;
        }
        Err(e) => return Err(e.into()),
    }
    if mounter.mount_table()?.is_mounted(target) {
        return Err(BackendError::StillMounted {
            path: target.to_path_buf(),
        });
    }
    Ok(())
}

/// What `attach` made reachable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    /// Where the data is.
    pub path: PathBuf,
    /// The newest snapshot the attached data corresponds to, for backends that ship data; the catalog
    /// records it.
    pub shipped: Option<Shipped>,
}

impl Attached {
    /// Data that is reachable in place and never shipped anywhere.
    pub fn at(path: PathBuf) -> Self {
        Attached {
            path,
            shipped: None,
        }
    }
}

/// Cluster mode's say over what a backend that ships data may publish (see `crate::cluster`). Without a
/// cluster there is none, and the backend's own records (snapshot tags) decide.
#[async_trait]
pub trait Publisher: Send + Sync {
    /// The generation the cluster catalog names as the volume's newest, which is the only one a Mount may
    /// start from: `None` when the cluster does not know the volume, `Some(None)` when nothing was
    /// published yet.
    fn published(&self, name: &str) -> Option<Option<Shipped>>;
    /// Makes a complete snapshot the volume's newest, if this host still owns the volume. On `Refused`
    /// the caller must delete the snapshot; on `Unknown` (etcd did not answer whether it took it) keep it.
    async fn publish(
        &self,
        name: &str,
        shipped: &Shipped,
    ) -> Result<(), crate::cluster::PublishError>;
}

/// Storage for volumes. Every method is idempotent, because a crash can interrupt any of them and start-up
/// reconciliation runs them again.
#[async_trait]
pub trait Backend: Send + Sync {
    fn kind(&self) -> BackendKind;
    /// Cheap checks before a create is recorded, such as refusing storage that exists without a record.
    fn preflight(&self, name: &str, spec: &VolumeSpec) -> Result<(), BackendError>;
    /// Provisions the volume's storage. A backend that finds the volume already shipped by another host
    /// (ebs) adopts it and returns its newest snapshot.
    async fn create(&self, name: &str, spec: &VolumeSpec) -> Result<Option<Shipped>, BackendError>;
    /// Deletes the volume's storage and data; succeeds if there is nothing left to delete.
    async fn remove(&self, name: &str, spec: &VolumeSpec) -> Result<(), BackendError>;
    /// Undoes a create that did not finish: deletes what this host provisioned, never data that other
    /// hosts may share (an adopted ebs volume's snapshots).
    async fn abandon(&self, name: &str, spec: &VolumeSpec) -> Result<(), BackendError> {
        self.remove(name, spec).await
    }
    /// Forgets what this host keeps of a volume that another host removed (ebs: the local copy), never
    /// shared data, which the removing host deleted and which a new volume of the same name may own now.
    async fn forget_local(&self, _name: &str, _spec: &VolumeSpec) -> Result<(), BackendError> {
        Ok(())
    }
    /// Cluster mode: stops writes to the attached volume at once, because this host may have lost its
    /// ownership. Backends whose volumes have one writer per cluster implement it.
    fn fence(&self, _name: &str, _spec: &VolumeSpec) -> Result<(), BackendError> {
        Ok(())
    }
    /// Makes the data reachable and returns where; called by the first active mount. `shipped` is the
    /// newest snapshot the catalog knows of; a backend that ships data must not attach anything older.
    async fn attach(
        &self,
        name: &str,
        spec: &VolumeSpec,
        shipped: Option<&Shipped>,
    ) -> Result<Attached, BackendError>;
    /// Releases what `attach` set up; called when the last mount goes away. A backend that ships data
    /// ships what changed and returns the snapshot that is now newest.
    async fn detach(
        &self,
        name: &str,
        spec: &VolumeSpec,
        shipped: Option<&Shipped>,
    ) -> Result<Option<Shipped>, BackendError>;
    /// Ships what changed while the volume stays attached (ebs `checkpoint`); returns the snapshot that
    /// is now newest. Backends that ship nothing have nothing to do.
    async fn checkpoint(
        &self,
        _name: &str,
        _spec: &VolumeSpec,
        shipped: Option<&Shipped>,
    ) -> Result<Option<Shipped>, BackendError> {
        Ok(shipped.cloned())
    }
    /// Whether what `attach` sets up is in place right now, judged only from the given mount table; `None`
    /// when the volume has nothing to attach (its data is always reachable).
    fn is_attached(&self, name: &str, spec: &VolumeSpec, table: &MountTable) -> Option<bool>;
    /// Whether containers that held the volume when its attachment was lost stay broken after it is
    /// attached again: true for a FUSE mount whose helper died (their mounts answer ENOTCONN until they
    /// restart); false where their mounts still reach the data (a kernel mount removed on the host only).
    fn loss_strands_mounts(&self, _spec: &VolumeSpec) -> bool {
        false
    }
    /// Where the volume's storage is still mounted in mount namespaces other than Ferry's own (containers
    /// that hold it), from the kernel's mount tables; an empty list proves nothing holds it. `None` when
    /// the backend cannot tell, so only an operator can say its mount IDs are stale. It reads `/proc`:
    /// call it off the async threads.
    fn holders(
        &self,
        _name: &str,
        _spec: &VolumeSpec,
    ) -> Option<Result<Vec<Holder>, BackendError>> {
        None
    }
    /// Backend facts for `Status`, known without any I/O.
    fn status(&self, name: &str, spec: &VolumeSpec) -> Map<String, Value>;
    /// Whether the backend's storage (a directory, a server, a cloud API) can be used right now, with facts
    /// such as free space. It may do I/O, so it serves the operator's `ferry status`, never Get/List/Path;
    /// the caller bounds it with a deadline.
    async fn check(&self) -> Result<Map<String, Value>, BackendError>;
    /// Looks at local storage once per health pass (free space against what sparse images promise), so
    /// `status` can report it from memory. It may do local I/O: call it off the async threads.
    fn survey(&self) {}
    /// A problem of the volume's storage found on this host (a filesystem that logged errors, a full
    /// filesystem under a sparse image, a repair check still pending), shown as health; `None` when all is
    /// well or the backend cannot tell. It may do local I/O (sysfs, statvfs, a superblock), never network
    /// I/O: call it off the async threads.
    fn storage_problem(
        &self,
        _name: &str,
        _spec: &VolumeSpec,
        _table: &MountTable,
    ) -> Option<String> {
        None
    }
    /// Data moved to and from remote storage since start, for backends that ship data.
    fn transfers(&self) -> Option<TransferTotals> {
        None
    }
    /// A lasting problem of this host's copy of the volume that only an operator resolves (an ebs copy in
    /// conflict with newer data), durable across restarts and answered from memory; shown as health.
    fn problem(&self, _name: &str) -> Option<String> {
        None
    }
    /// Moves this host's copy of the volume to a rescue directory, so the next attach takes the shared
    /// data (ebs); returns where the copy went. The volume must not be attached.
    async fn set_aside(&self, _name: &str, _spec: &VolumeSpec) -> Result<PathBuf, BackendError> {
        Err(BackendError::Unsupported {
            op: "set-aside",
            backend: self.kind(),
        })
    }
    /// Applies the volume's snapshot retention now (ebs `[ebs] keep`) and says what it kept and deleted.
    async fn prune(
        &self,
        _name: &str,
        _spec: &VolumeSpec,
        _shipped: Option<&Shipped>,
    ) -> Result<Value, BackendError> {
        Err(BackendError::Unsupported {
            op: "prune",
            backend: self.kind(),
        })
    }
    /// Whether attach and detach may move data over a network for long (ebs pulls and pushes): start-up
    /// then finishes an interrupted one in the background instead of keeping the socket closed.
    fn ships_data(&self) -> bool {
        false
    }
}

/// Totals of data a backend shipped away and pulled back, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransferTotals {
    pub blocks_shipped: u64,
    pub bytes_shipped: u64,
    pub blocks_pulled: u64,
    pub bytes_pulled: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mount::{Call, RecordingMounter};

    #[test]
    fn release_mount_unmounts_and_checks_again() {
        let m = RecordingMounter::default();
        let target = Path::new("/mnt/v");
        // Nothing mounted: nothing to do.
        release_mount(&m, target, WhenBusy::Refuse).unwrap();
        assert!(m.calls().is_empty());

        m.mount_elsewhere(target, "ext4");
        release_mount(&m, target, WhenBusy::Refuse).unwrap();
        assert_eq!(
            m.calls(),
            [Call::Unmount {
                target: target.into()
            }]
        );
        assert!(!m.mount_table().unwrap().is_mounted(target));

        // Two mounts stacked on one path: the one below is still there, and must not be deleted through.
        m.mount_elsewhere(target, "ext4");
        m.mount_elsewhere(target, "ext4");
        assert!(matches!(
            release_mount(&m, target, WhenBusy::Detach),
            Err(BackendError::StillMounted { path }) if path == target
        ));
    }

    #[test]
    fn ebs_refuses_sizes_beyond_what_a_snapshot_holds() {
        let err = check_ebs_size(65 << 40).unwrap_err();
        assert_eq!(err.kind(), "too_large");
        let text = err.to_string();
        assert!(
            text.contains("size=65TiB") && text.contains("at most 64TiB"),
            "{text}"
        );
        check_ebs_size(64 << 40).unwrap();
        check_ebs_size(16 << 20).unwrap();
        // Whatever a volume's options may ask for, the EBS rule is the one that decides: the largest size
        // they accept for an ebs volume must pass it, or Create would refuse what the options promise.
        let defaults = crate::spec::SpecDefaults {
            ebs: Some(Default::default()),
            ..Default::default()
        };
        let opts = [("backend", "ebs"), ("size", "64TiB")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into();
        let spec = VolumeSpec::from_options(Some(&opts), &defaults).unwrap();
        check_ebs_size(spec.size().unwrap()).unwrap();
    }

    #[test]
    fn a_busy_mount_is_refused_or_detached() {
        let m = RecordingMounter::default();
        let target = Path::new("/mnt/v");
        m.mount_elsewhere(target, "nfs");
        m.busy_unmounts(1);
        assert!(matches!(
            release_mount(&m, target, WhenBusy::Refuse),
            Err(BackendError::Mount(MountError::Unmount {
                errno: nix::errno::Errno::EBUSY,
                ..
            }))
        ));
        assert!(m.mount_table().unwrap().is_mounted(target));

        m.busy_unmounts(1);
        release_mount(&m, target, WhenBusy::Detach).unwrap();
        assert_eq!(
            m.calls(),
            [Call::Detach {
                target: target.into()
            }]
        );
        assert!(!m.mount_table().unwrap().is_mounted(target));
    }
}

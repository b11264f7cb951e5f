//! The `local` backend: a directory per volume under the state directory, or, with `size`, a sparse image
//! file holding its own filesystem on a loop device, so the kernel enforces the cap.
//!
//! Layout: `<root>/<name>/data` holds a plain volume's files and `<root>/<name>/disk.img` a capped volume's
//! image. What Docker is given is the volume's exposed path: by default `data` itself (the image is mounted
//! there), or, with a `mount_root` (a managed plugin's propagated mount), `<mount_root>/<name>`, onto which
//! the image is mounted or the data directory bind-mounted. Names were validated by `spec`, so joining
//! them is safe.

use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use nix::unistd::{chown, Gid, Uid};
use serde_json::{json, Map, Value};

use super::{Attached, Backend, BackendError, Shipped};
use crate::mount::{Holder, MountTable, Mounter, Storage};
use crate::spec::{format_size, BackendKind, FsType, VolumeSpec};

/// The directory mode of a volume's root when the user gave none (that of Docker's own local volumes).
const DEFAULT_MODE: u32 = 0o755;

/// How many times a new image is formatted before its filesystem is accepted with less room than asked;
/// the first guess fits as a rule, and one correction always has so far.
const SIZING_ATTEMPTS: usize = 4;

/// A first guess at the image size whose filesystem leaves `size` bytes free, from measurements of
/// mkfs.ext4 1.47 and mkfs.xfs 6.x: ext4 keeps 3-23% (journal, inode tables, reserved blocks; most on small
/// images), xfs at least a 64 MiB log. `make_filesystem` corrects a guess that falls short.
fn first_image_len(size: u64, fs: FsType) -> u64 {
    let fixed: u64 = match fs {
        FsType::Ext4 => 16 << 20,
        FsType::Xfs => 96 << 20,
    };
    size.saturating_add(size / 32).saturating_add(fixed)
}

pub struct LocalBackend {
    root: PathBuf,
    mount_root: Option<PathBuf>,
    mounter: Arc<dyn Mounter>,
}

struct Paths {
    dir: PathBuf,
    data: PathBuf,
    image: PathBuf,
}

fn sized(spec: &VolumeSpec) -> Option<(u64, FsType)> {
    Some((spec.size?, spec.fs.unwrap_or(FsType::Ext4)))
}

/// Applies the requested owner and mode to a volume's root directory.
pub(super) fn apply_ownership(path: &Path, spec: &VolumeSpec) -> Result<(), BackendError> {
    if spec.uid.is_some() || spec.gid.is_some() {
        chown(
            path,
            spec.uid.map(Uid::from_raw),
            spec.gid.map(Gid::from_raw),
        )
        .map_err(|e| BackendError::Io {
            op: "change the owner of",
            path: path.to_path_buf(),
            source: e.into(),
        })?;
    }
    let mode = spec.mode.unwrap_or(DEFAULT_MODE);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(BackendError::io("change the mode of", path))
}

impl LocalBackend {
    /// `root` is where volume directories go; it is created (root-only) if missing.
    pub fn new(root: PathBuf, mounter: Arc<dyn Mounter>) -> Result<Self, BackendError> {
        Self::with_mount_root(root, None, mounter)
    }

    /// Like `new`, but volumes are exposed to Docker under `mount_root` (created if missing).
    pub fn with_mount_root(
        root: PathBuf,
        mount_root: Option<PathBuf>,
        mounter: Arc<dyn Mounter>,
    ) -> Result<Self, BackendError> {
        let (root, mount_root) = super::prepare_roots(root, mount_root)?;
        Ok(LocalBackend {
            root,
            mount_root,
            mounter,
        })
    }

    /// Where Docker finds the volume's data while it is attached.
    fn exposed(&self, name: &str) -> PathBuf {
        match &self.mount_root {
            Some(m) => m.join(name),
            None => self.paths(name).data,
        }
    }

    /// Whether attaching mounts anything: a capped volume always does, a plain one only under a mount root.
    fn mounts_something(&self, spec: &VolumeSpec) -> bool {
        sized(spec).is_some() || self.mount_root.is_some()
    }

    fn paths(&self, name: &str) -> Paths {
        let dir = self.root.join(name);
        Paths {
            data: dir.join("data"),
            image: dir.join("disk.img"),
            dir,
        }
    }

    fn create_blocking(&self, name: &str, spec: &VolumeSpec) -> Result<(), BackendError> {
        let p = self.paths(name);
        match DirBuilder::new().mode(0o700).create(&p.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(BackendError::Orphan { path: p.dir });
            }
            Err(e) => return Err(BackendError::io("create", &p.dir)(e)),
        }
        DirBuilder::new()
            .mode(0o700)
            .create(&p.data)
            .map_err(BackendError::io("create", &p.data))?;
        let Some((size, fs)) = sized(spec) else {
            return apply_ownership(&p.data, spec);
        };
        let image = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p.image)
            .map_err(BackendError::io("create", &p.image))?;
        drop(image);
        self.make_filesystem(&p, size, fs, spec)
    }

    /// Makes the image's filesystem so that `size` bytes are free in it (what `df` shows as available):
    /// the image is larger than `size` by the filesystem's own overhead (journal or log, inode tables,
    /// reserved blocks), which depends on the filesystem, its version and the size, so it is measured on
    /// the new filesystem and the image grown until it fits. The image is sparse: the extra costs no disk
    /// until written. The root gets the requested owner and mode while mounted.
    fn make_filesystem(
        &self,
        p: &Paths,
        size: u64,
        fs: FsType,
        spec: &VolumeSpec,
    ) -> Result<(), BackendError> {
        let mut len = first_image_len(size, fs);
        for attempt in 1..=SIZING_ATTEMPTS {
            OpenOptions::new()
                .write(true)
                .open(&p.image)
                .and_then(|f| f.set_len(len))
                .map_err(BackendError::io("size", &p.image))?;
            self.mounter.format(&p.image, fs)?;
            self.mounter.mount_image(&p.image, &p.data, fs)?;
            let measured = self.mounter.available_bytes(&p.data);
            let short = match &measured {
                Ok(available) => size.saturating_sub(*available),
                Err(_) => 0,
            };
            if short == 0 || attempt == SIZING_ATTEMPTS {
                let applied = measured
                    .map_err(BackendError::from)
                    .and_then(|_| apply_ownership(&p.data, spec));
                self.mounter.unmount(&p.data)?;
                applied?;
                if short > 0 {
                    tracing::warn!(image = %p.image.display(), short, "the new filesystem has less room than asked for");
                }
                return Ok(());
            }
            self.mounter.unmount(&p.data)?;
            // The overhead grows a little with the image, hence the margin.
            len += short + short / 8 + (1 << 20);
        }
        Ok(())
    }

    fn remove_blocking(&self, name: &str) -> Result<(), BackendError> {
        let p = self.paths(name);
        for target in [self.exposed(name), p.data.clone()] {
            if self.mounter.mount_table()?.is_mounted(&target) {
                self.mounter.unmount(&target)?;
                // Never recurse into a filesystem that is still mounted: that would delete its contents.
                if self.mounter.mount_table()?.is_mounted(&target) {
                    return Err(BackendError::StillMounted { path: target });
                }
            }
        }
        if self.mount_root.is_some() {
            remove_empty_dir(&self.exposed(name))?;
        }
        match std::fs::remove_dir_all(&p.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BackendError::io("delete", &p.dir)(e)),
        }
    }

    fn attach_blocking(&self, name: &str, spec: &VolumeSpec) -> Result<PathBuf, BackendError> {
        let p = self.paths(name);
        // Docker is handed `data` (or a mount of it): a link planted there would give a container, or the
        // mount below, some other part of the host.
        let storage = if sized(spec).is_some() {
            &p.image
        } else {
            &p.data
        };
        super::refuse_links(&self.root, storage)?;
        if !p.data.is_dir() {
            return Err(BackendError::Missing { path: p.data });
        }
        let target = self.exposed(name);
        if !self.mounts_something(spec) {
            super::refuse_links(&self.root, &p.data)?;
            return Ok(target);
        }
        if let Some(mount_root) = &self.mount_root {
            DirBuilder::new()
                .mode(0o755)
                .create(&target)
                .or_else(|e| {
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(BackendError::io("create", &target))?;
            // An existing "mountpoint" that is a link would have the volume mounted over its target.
            super::refuse_links(mount_root, &target)?;
        } else {
            super::refuse_links(&self.root, &target)?;
        }
        // A mount left by an earlier run is adopted, never stacked: two mounts of one image would
        // corrupt it.
        if self.mounter.mount_table()?.is_mounted(&target) {
            return Ok(target);
        }
        match sized(spec) {
            Some((_, fs)) => {
                if !p.image.is_file() {
                    return Err(BackendError::Missing { path: p.image });
                }
                self.mounter.mount_image(&p.image, &target, fs)?;
            }
            None => self.mounter.bind(&p.data, &target)?,
        }
        Ok(target)
    }

    fn detach_blocking(&self, name: &str) -> Result<(), BackendError> {
        let target = self.exposed(name);
        self.mounter.unmount(&target)?;
        if self.mount_root.is_some() {
            // The storage is released either way; a leftover empty directory is harmless.
            if let Err(e) = remove_empty_dir(&target) {
                tracing::warn!(error = %e, "cannot remove an empty mountpoint");
            }
        }
        Ok(())
    }
}

/// Removes a mountpoint directory that Ferry made; a missing one is fine.
fn remove_empty_dir(path: &Path) -> Result<(), BackendError> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(crate::mount::MountError::PlantedLink {
            path: path.to_path_buf(),
        }
        .into());
    }
    match std::fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(BackendError::io("remove the mountpoint", path)(e)),
    }
}

/// Runs blocking filesystem work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BackendError> + Send + 'static,
) -> Result<T, BackendError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BackendError::Internal(BackendKind::Local, e.to_string()))?
}

#[async_trait]
impl Backend for LocalBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Local
    }

    fn preflight(&self, name: &str, spec: &VolumeSpec) -> Result<(), BackendError> {
        let dir = self.paths(name).dir;
        if std::fs::symlink_metadata(&dir).is_ok() {
            return Err(BackendError::Orphan { path: dir });
        }
        match sized(spec) {
            Some((size, fs)) => {
                super::check_image_fits(&self.root, size, |s| first_image_len(s, fs))
            }
            None => Ok(()),
        }
    }

    async fn create(&self, name: &str, spec: &VolumeSpec) -> Result<Option<Shipped>, BackendError> {
        let this = self.clone_handle();
        let (name, spec) = (name.to_string(), spec.clone());
        blocking(move || this.create_blocking(&name, &spec)).await?;
        Ok(None)
    }

    async fn remove(&self, name: &str, _spec: &VolumeSpec) -> Result<(), BackendError> {
        let this = self.clone_handle();
        let name = name.to_string();
        blocking(move || this.remove_blocking(&name)).await
    }

    async fn attach(
        &self,
        name: &str,
        spec: &VolumeSpec,
        _shipped: Option<&Shipped>,
    ) -> Result<Attached, BackendError> {
        let this = self.clone_handle();
        let (name, spec) = (name.to_string(), spec.clone());
        blocking(move || this.attach_blocking(&name, &spec))
            .await
            .map(Attached::at)
    }

    async fn detach(
        &self,
        name: &str,
        spec: &VolumeSpec,
        _shipped: Option<&Shipped>,
    ) -> Result<Option<Shipped>, BackendError> {
        if !self.mounts_something(spec) {
            return Ok(None);
        }
        let this = self.clone_handle();
        let name = name.to_string();
        blocking(move || this.detach_blocking(&name)).await?;
        Ok(None)
    }

    fn is_attached(&self, name: &str, spec: &VolumeSpec, table: &MountTable) -> Option<bool> {
        self.mounts_something(spec)
            .then(|| table.is_mounted(&self.exposed(name)))
    }

    /// A capped volume is held wherever a loop device bound to its image is mounted; a plain one wherever
    /// its data directory is bind-mounted (Docker bind-mounts it into each container that uses it).
    fn holders(&self, name: &str, spec: &VolumeSpec) -> Option<Result<Vec<Holder>, BackendError>> {
        let p = self.paths(name);
        let storage = match sized(spec) {
            Some(_) => Storage::Image(&p.image),
            None => Storage::Directory(&p.data),
        };
        Some(self.mounter.holders(storage).map_err(BackendError::from))
    }

    fn status(&self, name: &str, spec: &VolumeSpec) -> Map<String, Value> {
        let mut m = Map::new();
        match sized(spec) {
            Some((size, fs)) => {
                m.insert("size".into(), json!(format_size(size)));
                m.insert("size_bytes".into(), json!(size));
                m.insert("fs".into(), json!(fs.as_str()));
                m.insert("image".into(), json!(self.paths(name).image));
            }
            None => {
                m.insert("size".into(), json!("unlimited"));
            }
        }
        m
    }

    async fn check(&self) -> Result<Map<String, Value>, BackendError> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            let io = |e: nix::Error| BackendError::Io {
                op: "check",
                path: root.clone(),
                source: std::io::Error::from(e),
            };
            // A read-only or full filesystem under the state directory is what breaks local volumes.
            nix::unistd::access(&root, nix::unistd::AccessFlags::W_OK).map_err(io)?;
            let st = nix::sys::statvfs::statvfs(&root).map_err(io)?;
            let frag = st.fragment_size();
            let mut m = Map::new();
            m.insert("path".into(), json!(root));
            m.insert("total_bytes".into(), json!(st.blocks() * frag));
            m.insert("free_bytes".into(), json!(st.blocks_available() * frag));
            Ok(m)
        })
        .await
        .map_err(|e| BackendError::Internal(BackendKind::Local, e.to_string()))?
    }
}

impl LocalBackend {
    fn clone_handle(&self) -> LocalBackend {
        LocalBackend {
            root: self.root.clone(),
            mount_root: self.mount_root.clone(),
            mounter: self.mounter.clone(),
        }
    }
}

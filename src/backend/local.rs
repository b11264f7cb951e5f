//! The `local` backend: a directory per volume under the state directory, or, with `size`, a sparse image
//! file holding its own filesystem on a loop device, so the kernel enforces the cap.
//!
//! Layout: `<root>/<name>/data` is what containers see (a plain directory, or the image's mountpoint) and
//! `<root>/<name>/disk.img` is the image. Names were validated by `spec`, so joining them is safe.

use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use nix::unistd::{chown, Gid, Uid};
use serde_json::{json, Map, Value};

use super::{Backend, BackendError};
use crate::mount::{MountTable, Mounter};
use crate::spec::{format_size, BackendKind, FsType, VolumeSpec};

/// The directory mode of a volume's root when the user gave none (that of Docker's own local volumes).
const DEFAULT_MODE: u32 = 0o755;

pub struct LocalBackend {
    root: PathBuf,
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
fn apply_ownership(path: &Path, spec: &VolumeSpec) -> Result<(), BackendError> {
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
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(BackendError::io("create", &root))?;
        Ok(LocalBackend { root, mounter })
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
        // A sparse file: the cap costs no disk until data is written.
        image
            .set_len(size)
            .map_err(BackendError::io("size", &p.image))?;
        drop(image);
        self.mounter.format(&p.image, fs)?;
        if spec.uid.is_some() || spec.gid.is_some() || spec.mode.is_some() {
            self.mounter.mount_image(&p.image, &p.data, fs)?;
            let applied = apply_ownership(&p.data, spec);
            self.mounter.unmount(&p.data)?;
            applied?;
        }
        Ok(())
    }

    fn remove_blocking(&self, name: &str) -> Result<(), BackendError> {
        let p = self.paths(name);
        if self.mounter.mount_table()?.is_mounted(&p.data) {
            self.mounter.unmount(&p.data)?;
            // Never recurse into a filesystem that is still mounted: that would delete its contents.
            if self.mounter.mount_table()?.is_mounted(&p.data) {
                return Err(BackendError::StillMounted { path: p.data });
            }
        }
        match std::fs::remove_dir_all(&p.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BackendError::io("delete", &p.dir)(e)),
        }
    }

    fn attach_blocking(&self, name: &str, spec: &VolumeSpec) -> Result<PathBuf, BackendError> {
        let p = self.paths(name);
        if !p.data.is_dir() {
            return Err(BackendError::Missing { path: p.data });
        }
        if let Some((_, fs)) = sized(spec) {
            if !p.image.is_file() {
                return Err(BackendError::Missing { path: p.image });
            }
            // A mount left by an earlier run is adopted, never stacked: two mounts of one image would
            // corrupt it.
            if !self.mounter.mount_table()?.is_mounted(&p.data) {
                self.mounter.mount_image(&p.image, &p.data, fs)?;
            }
        }
        Ok(p.data)
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

    async fn create(&self, name: &str, spec: &VolumeSpec) -> Result<(), BackendError> {
        let this = self.clone_handle();
        let (name, spec) = (name.to_string(), spec.clone());
        blocking(move || this.create_blocking(&name, &spec)).await
    }

    async fn remove(&self, name: &str, _spec: &VolumeSpec) -> Result<(), BackendError> {
        let this = self.clone_handle();
        let name = name.to_string();
        blocking(move || this.remove_blocking(&name)).await
    }

    async fn attach(&self, name: &str, spec: &VolumeSpec) -> Result<PathBuf, BackendError> {
        let this = self.clone_handle();
        let (name, spec) = (name.to_string(), spec.clone());
        blocking(move || this.attach_blocking(&name, &spec)).await
    }

    async fn detach(&self, name: &str, spec: &VolumeSpec) -> Result<(), BackendError> {
        if sized(spec).is_none() {
            return Ok(());
        }
        let mounter = self.mounter.clone();
        let data = self.paths(name).data;
        blocking(move || Ok(mounter.unmount(&data)?)).await
    }

    fn is_attached(&self, name: &str, spec: &VolumeSpec, table: &MountTable) -> Option<bool> {
        sized(spec).map(|_| table.is_mounted(&self.paths(name).data))
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
}

impl LocalBackend {
    fn clone_handle(&self) -> LocalBackend {
        LocalBackend {
            root: self.root.clone(),
            mounter: self.mounter.clone(),
        }
    }
}

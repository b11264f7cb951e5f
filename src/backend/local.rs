//! The `local` backend: a directory per volume under the state directory, or, with `size`, a sparse image
//! file holding its own filesystem on a loop device, so the kernel enforces the cap.
//!
//! Layout: `<root>/<name>/data` holds a plain volume's files and `<root>/<name>/disk.img` a capped volume's
//! image. What Docker is given is the volume's exposed path: by default `data` itself (the image is mounted
//! there), or, with a `mount_root` (a managed plugin's propagated mount), `<mount_root>/<name>`, onto which
//! the image is mounted or the data directory bind-mounted. Names were validated by `spec`, so joining
//! them is safe.
//!
//! Images are sparse, so their caps are promises on the state filesystem's free space: a create that would
//! promise more than is free is refused (unless `[local] overcommit`), `preallocate` reserves the space for
//! real, and a filesystem that logged errors (or whose host filesystem filled under it) is marked with
//! `<root>/<name>/check-needed` and checked before it is mounted again.

use std::collections::HashMap;
use std::fs::{DirBuilder, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use nix::unistd::{chown, Gid, Uid};
use serde_json::{json, Map, Value};

use super::{Attached, Backend, BackendError, Shipped};
use crate::doctor::human_bytes;
use crate::mount::{FsCheck, Holder, MountTable, Mounter, Storage};
use crate::spec::{format_size, BackendKind, FsType, VolumeSpec};
use crate::sync::Recover;

/// The directory mode of a volume's root when the user gave none (that of Docker's own local volumes).
const DEFAULT_MODE: u32 = 0o755;

/// Less free space than this on the state filesystem counts as full: the catalog and sparse images can no
/// longer be counted on to grow.
const MIN_FREE: u64 = 1 << 20;

/// The file that marks a volume's image for a repair check before its next mount; it holds the reason.
const CHECK_MARKER: &str = "check-needed";

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
    /// Whether caps may add up to more than the state filesystem has free (`[local] overcommit`).
    overcommit: bool,
    /// Held while a capped volume is created, so two creates never count the same free space.
    creating: Arc<Mutex<()>>,
    /// What the last look at the state filesystem found, when the caps promise more than it has free; for
    /// Status, which must not do I/O.
    overcommitted: Arc<Mutex<Option<String>>>,
    /// Volumes whose filesystem must be checked before the next mount, in case the marker file could not
    /// be written (a full disk).
    to_check: Arc<Mutex<HashMap<String, String>>>,
}

struct Paths {
    dir: PathBuf,
    data: PathBuf,
    image: PathBuf,
    marker: PathBuf,
}

/// The state filesystem's free space, and how much more of it the capped volumes' images could take.
struct Room {
    free: u64,
    total: u64,
    growth: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().recover()
}

/// Whether every byte of the image is allocated on the host, so writes in it cannot fail for lack of room.
fn fully_allocated(image: &Path) -> bool {
    std::fs::metadata(image).is_ok_and(|m| m.blocks() * 512 >= m.len())
}

/// Allocates every block of the image on the host (fallocate), keeping what it holds.
fn reserve(image: &Path) -> Result<(), BackendError> {
    let file = OpenOptions::new()
        .write(true)
        .open(image)
        .map_err(BackendError::io("reserve space for", image))?;
    let len = file
        .metadata()
        .map_err(BackendError::io("reserve space for", image))?
        .len();
    let len = libc::off_t::try_from(len).map_err(|_| BackendError::Io {
        op: "reserve space for",
        path: image.to_path_buf(),
        source: std::io::Error::from_raw_os_error(libc::EFBIG),
    })?;
    nix::fcntl::fallocate(
        file.as_raw_fd(),
        nix::fcntl::FallocateFlags::empty(),
        0,
        len,
    )
    .map_err(|e| BackendError::Io {
        op: "reserve space for",
        path: image.to_path_buf(),
        source: e.into(),
    })
}

fn sized(spec: &VolumeSpec) -> Option<(u64, FsType)> {
    spec.image()
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
            overcommit: false,
            creating: Arc::default(),
            overcommitted: Arc::default(),
            to_check: Arc::default(),
        })
    }

    /// Lets the caps of capped volumes add up to more than the state filesystem has free; Status then warns.
    pub fn allow_overcommit(mut self, allow: bool) -> Self {
        self.overcommit = allow;
        self
    }

    /// Free space on the state filesystem and what the capped images could still take of it: each image's
    /// length less the blocks it already has.
    fn room(&self) -> Result<Room, BackendError> {
        let st = nix::sys::statvfs::statvfs(&self.root).map_err(|e| BackendError::Io {
            op: "check",
            path: self.root.clone(),
            source: e.into(),
        })?;
        let frag = st.fragment_size();
        let mut growth = 0u64;
        let entries =
            std::fs::read_dir(&self.root).map_err(BackendError::io("check", &self.root))?;
        for entry in entries.flatten() {
            // Plain volumes have no image, and half-made ones may not yet.
            let Ok(meta) = std::fs::metadata(entry.path().join("disk.img")) else {
                continue;
            };
            growth = growth.saturating_add(meta.len().saturating_sub(meta.blocks() * 512));
        }
        Ok(Room {
            free: st.blocks_available() * frag,
            total: st.blocks() * frag,
            growth,
        })
    }

    /// Refuses a new capped volume whose image, with what the others could still take, would not fit in
    /// the free space, unless overcommit is allowed.
    fn check_room(&self, name: &str, size: u64, fs: FsType) -> Result<(), BackendError> {
        let needed = first_image_len(size, fs);
        let room = self.room()?;
        if room.growth.saturating_add(needed) <= room.free {
            return Ok(());
        }
        if self.overcommit {
            tracing::warn!(
                volume = name,
                needed,
                others = room.growth,
                free = room.free,
                "the caps of capped volumes now add up to more than the state filesystem has free (overcommit = true)"
            );
            return Ok(());
        }
        Err(BackendError::Overcommit {
            size,
            needed,
            others: room.growth,
            free: room.free,
            path: self.root.clone(),
        })
    }

    /// Looks at the state filesystem again, so Status can warn from memory when the caps promise more than
    /// it has free.
    fn survey_blocking(&self) {
        let warning = match self.room() {
            Ok(room) if room.growth > room.free => Some(format!(
                "the capped volumes on this host can still grow by {} but the filesystem of {} has {} free{}: when it fills, writes inside them fail and can be lost; free space there, or recreate volumes with -o preallocate=true",
                human_bytes(room.growth),
                self.root.display(),
                human_bytes(room.free),
                if self.overcommit { " (overcommit = true allows it)" } else { "" }
            )),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(error = %e, "cannot look at the state filesystem");
                return;
            }
        };
        *lock(&self.overcommitted) = warning;
    }

    /// Why the volume's filesystem must be checked before it is mounted, if it must: a marker left by a
    /// health check, or errors its own superblock records.
    fn pending_check(&self, name: &str, p: &Paths, fs: FsType) -> Option<String> {
        if let Some(why) = lock(&self.to_check).get(name) {
            return Some(why.clone());
        }
        if let Ok(why) = std::fs::read_to_string(&p.marker) {
            let why = why.trim();
            // A full disk may have left the marker without its reason.
            return Some(if why.is_empty() {
                "a health check found a problem".into()
            } else {
                why.to_string()
            });
        }
        let recorded = match fs {
            FsType::Ext4 => crate::mount::ext4_needs_check(&p.image),
            FsType::Xfs => crate::mount::xfs_needs_repair(&p.image)
                .map(|flag| flag.then(|| "its superblock carries the needs-repair flag".into())),
        };
        recorded.unwrap_or_else(|e| {
            tracing::debug!(image = %p.image.display(), error = %e, "cannot read the superblock");
            None
        })
    }

    /// Marks the volume's image for a check before its next mount: in memory at once, and in a marker file
    /// so the mark survives a restart. A full disk may refuse the file; the mark in memory stands.
    fn mark_for_check(&self, name: &str, p: &Paths, why: &str) {
        lock(&self.to_check)
            .entry(name.to_string())
            .or_insert_with(|| why.to_string());
        if p.marker.exists() {
            return;
        }
        tracing::error!(
            volume = name,
            reason = why,
            "the volume's filesystem will be checked before its next mount"
        );
        // The name alone marks it; the reason is a courtesy that a full disk may not have room for.
        match OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&p.marker)
        {
            Ok(mut f) => {
                use std::io::Write;
                let _ = f.write_all(why.as_bytes());
            }
            Err(e) => {
                tracing::warn!(marker = %p.marker.display(), error = %e, "cannot write the check marker; the mark is kept in memory until the next mount")
            }
        }
    }

    /// Runs the repair check on an unmounted image that is marked for one; refuses to mount it damaged.
    fn check_before_mount(&self, name: &str, p: &Paths, fs: FsType) -> Result<(), BackendError> {
        let Some(why) = self.pending_check(name, p, fs) else {
            return Ok(());
        };
        tracing::warn!(volume = name, reason = %why, "checking the volume's filesystem before mounting it");
        if fs == FsType::Xfs {
            // `xfs_repair -n` cannot judge a filesystem whose log still holds changes, as a shutdown
            // leaves it; mounting replays the log, as any mount would, and a log that cannot be replayed
            // leaves the judgement to the check.
            match self.mounter.mount_image(&p.image, &p.data, fs) {
                Ok(()) => self.mounter.unmount(&p.data)?,
                Err(e) => {
                    tracing::warn!(volume = name, error = %e, "cannot mount the image to replay its log; checking it as it is")
                }
            }
        }
        match self.mounter.check_filesystem(&p.image, fs)? {
            FsCheck::Clean => {
                tracing::info!(volume = name, "the filesystem check found nothing wrong")
            }
            FsCheck::Repaired(words) => {
                tracing::warn!(volume = name, check = %words, "the filesystem check repaired the volume")
            }
            FsCheck::Damaged { tool, detail } => {
                return Err(BackendError::Damaged(Box::new(super::DamagedImage {
                    fs: fs.as_str(),
                    image: p.image.clone(),
                    reason: why,
                    tool,
                    detail,
                })))
            }
        }
        lock(&self.to_check).remove(name);
        match std::fs::remove_file(&p.marker) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // The filesystem passed; a marker left behind only costs another check at the next mount.
            Err(e) => {
                tracing::warn!(marker = %p.marker.display(), error = %e, "cannot remove the check marker; the next mount checks again")
            }
        }
        Ok(())
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
            marker: dir.join(CHECK_MARKER),
            dir,
        }
    }

    fn create_blocking(&self, name: &str, spec: &VolumeSpec) -> Result<(), BackendError> {
        let p = self.paths(name);
        let creating = self.creating.clone();
        let _creating = sized(spec).map(|_| lock(&creating));
        if let Some((size, fs)) = sized(spec) {
            self.check_room(name, size, fs)?;
        }
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
        self.make_filesystem(&p, size, fs, spec)?;
        if spec.preallocate() {
            reserve(&p.image)?;
        }
        // Status warns at once, not at the next health pass, when this create overcommitted.
        self.survey_blocking();
        Ok(())
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
            // Never recurse into a filesystem that is still mounted: that would delete its contents.
            super::release_mount(self.mounter.as_ref(), &target, super::WhenBusy::Refuse)?;
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
                // A filesystem still in use elsewhere (a container's namespace) cannot be checked, and is
                // shared as it is.
                if self.mounter.bound_loops(&p.image)?.is_empty() {
                    self.check_before_mount(name, &p, fs)?;
                    if spec.preallocate() {
                        // Something may have punched holes in it (fstrim through the loop device): allocate
                        // them again. The volume works without, so a failure only warns.
                        if let Err(e) = reserve(&p.image) {
                            tracing::warn!(volume = name, error = %e, "cannot keep the preallocated volume's space reserved");
                        }
                    }
                }
                self.mounter.mount_image(&p.image, &target, fs)?;
            }
            None => self.mounter.bind(&p.data, &target)?,
        }
        Ok(target)
    }

    /// What is wrong with the storage of an attached capped volume right now: errors its filesystem
    /// logged, an xfs that shut down, or a full state filesystem under its sparse image. `source` is the
    /// mount's device, such as `/dev/loop3`.
    fn live_problems(&self, p: &Paths, fs: FsType, target: &Path, source: &str) -> Vec<String> {
        let mut found = Vec::new();
        match fs {
            FsType::Ext4 => {
                if let Some(n) = crate::mount::ext4_errors_logged(source).filter(|n| *n > 0) {
                    found.push(format!("its ext4 filesystem has logged {n} error(s)"));
                }
            }
            FsType::Xfs => {
                // A shut-down xfs answers every call with EIO, stat of its root included.
                if let Err(e) = std::fs::metadata(target) {
                    if e.raw_os_error() == Some(libc::EIO) {
                        found.push("its xfs filesystem has shut down after an error".into());
                    }
                }
            }
        }
        if let Some(full) = self.full_under(p) {
            found.push(full);
        }
        found
    }

    /// Whether the state filesystem is full under a sparse image, whose writes then fail and are lost.
    fn full_under(&self, p: &Paths) -> Option<String> {
        let full = nix::sys::statvfs::statvfs(&self.root)
            .is_ok_and(|st| st.blocks_available() * st.fragment_size() < MIN_FREE);
        (full && !fully_allocated(&p.image)).then(|| {
            format!(
                "the filesystem holding its image ({}) is full, so writes inside the volume can fail and be lost",
                self.root.display()
            )
        })
    }

    fn detach_blocking(&self, name: &str, spec: &VolumeSpec) -> Result<(), BackendError> {
        let target = self.exposed(name);
        // Unmounting writes back what the filesystem still holds; if the state filesystem filled or the
        // volume's filesystem logged errors since the last health pass, the next mount must check it.
        let sized = sized(spec).map(|(_, fs)| (self.paths(name), fs));
        if let Some((p, fs)) = &sized {
            let table = self.mounter.mount_table().unwrap_or_default();
            if let Some(entry) = table.find(&target) {
                let found = self.live_problems(p, *fs, &target, &entry.source);
                if !found.is_empty() {
                    self.mark_for_check(name, p, &found.join("; "));
                }
            }
        }
        self.mounter.unmount(&target)?;
        if let Some((p, _)) = &sized {
            if let Some(full) = self.full_under(p) {
                self.mark_for_check(name, p, &full);
            }
        }
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
    super::blocking(BackendKind::Local, f).await
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
        let (name, spec) = (name.to_string(), spec.clone());
        blocking(move || this.detach_blocking(&name, &spec)).await?;
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
                if !spec.preallocate() {
                    if let Some(w) = lock(&self.overcommitted).as_ref() {
                        m.insert("warning".into(), json!(w));
                    }
                }
            }
            None => {
                m.insert("size".into(), json!("unlimited"));
            }
        }
        m
    }

    async fn check(&self) -> Result<Map<String, Value>, BackendError> {
        let this = self.clone_handle();
        tokio::task::spawn_blocking(move || {
            let root = &this.root;
            // A read-only or full filesystem under the state directory is what breaks local volumes.
            nix::unistd::access(root, nix::unistd::AccessFlags::W_OK).map_err(|e| {
                BackendError::Io {
                    op: "check",
                    path: root.clone(),
                    source: std::io::Error::from(e),
                }
            })?;
            let room = this.room()?;
            if room.free < MIN_FREE {
                return Err(BackendError::Full {
                    path: root.clone(),
                    what: format!(
                        "{} free of {}",
                        human_bytes(room.free),
                        human_bytes(room.total)
                    ),
                });
            }
            let st = nix::sys::statvfs::statvfs(root).map_err(|e| BackendError::Io {
                op: "check",
                path: root.clone(),
                source: e.into(),
            })?;
            // Some filesystems (btrfs) report no inode counts at all; only a count of zero left is full.
            if st.files() > 0 && st.files_available() == 0 {
                return Err(BackendError::Full {
                    path: root.clone(),
                    what: "no inodes free".into(),
                });
            }
            this.survey_blocking();
            let mut m = Map::new();
            m.insert("path".into(), json!(root));
            m.insert("total_bytes".into(), json!(room.total));
            m.insert("free_bytes".into(), json!(room.free));
            m.insert("capped_growth_bytes".into(), json!(room.growth));
            if let Some(w) = lock(&this.overcommitted).as_ref() {
                m.insert("warning".into(), json!(w));
            }
            Ok(m)
        })
        .await
        .map_err(|e| BackendError::Internal(BackendKind::Local, e.to_string()))?
    }

    fn survey(&self) {
        self.survey_blocking();
    }

    /// For an attached capped volume: errors its filesystem logged (ext4's count in sysfs), an xfs that
    /// shut down, or a full state filesystem under a sparse image; each also marks the image for a check
    /// before its next mount. For any capped volume: a check still pending from such a mark.
    fn storage_problem(&self, name: &str, spec: &VolumeSpec, table: &MountTable) -> Option<String> {
        let (_, fs) = sized(spec)?;
        let p = self.paths(name);
        let target = self.exposed(name);
        let Some(entry) = table.find(&target) else {
            let why = self.pending_check(name, &p, fs)?;
            return Some(format!(
                "its filesystem needs a check ({why}); the next mount runs it"
            ));
        };
        let found = self.live_problems(&p, fs, &target, &entry.source);
        if found.is_empty() {
            let why = self.pending_check(name, &p, fs)?;
            return Some(format!(
                "its filesystem needs a check ({why}); stop the containers using it, and the next mount runs it"
            ));
        }
        let why = found.join("; ");
        self.mark_for_check(name, &p, &why);
        Some(format!(
            "{why}; stop the containers using it, and the next mount checks and repairs its filesystem"
        ))
    }
}

impl LocalBackend {
    fn clone_handle(&self) -> LocalBackend {
        LocalBackend {
            root: self.root.clone(),
            mount_root: self.mount_root.clone(),
            mounter: self.mounter.clone(),
            overcommit: self.overcommit,
            creating: self.creating.clone(),
            overcommitted: self.overcommitted.clone(),
            to_check: self.to_check.clone(),
        }
    }
}

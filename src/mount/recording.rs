//! A `Mounter` double for unit tests: it records each call and keeps an in-memory mount table.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{FsCheck, Holder, MountEntry, MountError, MountTable, Mounter, Storage};
use crate::spec::FsType;
use crate::sync::Recover;

/// Records calls as strings such as `mount /img /target ext4`, and can be told to fail the next mount.
/// It models loop devices (one per image, bound while the image is mounted here or held elsewhere),
/// other mount namespaces holding storage (`hold_elsewhere`), and filesystem overhead (`set_overhead`).
#[derive(Debug, Default)]
pub struct RecordingMounter {
    pub calls: Mutex<Vec<String>>,
    /// (target, fs, the image mounted there, if any)
    mounted: Mutex<Vec<(PathBuf, FsType, Option<PathBuf>)>>,
    fail_next_mount: Mutex<bool>,
    /// Images and directories another mount namespace holds.
    held: Mutex<Vec<PathBuf>>,
    /// Bytes of an image its filesystem keeps for itself.
    overhead: Mutex<u64>,
    /// What the next repair checks find; `None` finds nothing wrong.
    check_verdict: Mutex<Option<FsCheck>>,
}

/// The one loop device the double pretends to bind.
pub const RECORDED_LOOP: &str = "/dev/loop-test";

impl RecordingMounter {
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().recover().clone()
    }

    pub fn count(&self, prefix: &str) -> usize {
        self.calls()
            .iter()
            .filter(|c| c.starts_with(prefix))
            .count()
    }

    pub fn fail_next_mount(&self) {
        *self.fail_next_mount.lock().recover() = true;
    }

    /// Pretends a process in another mount namespace keeps `path` (an image or a directory) mounted, as a
    /// running container does; `release_elsewhere` ends it.
    pub fn hold_elsewhere(&self, path: &Path) {
        lock(&self.held).push(path.to_path_buf());
    }

    pub fn release_elsewhere(&self, path: &Path) {
        lock(&self.held).retain(|p| p != path);
    }

    /// Removes the mount at `target` from this namespace only, as `umount -l` does while another namespace
    /// still holds the filesystem.
    pub fn lazy_unmount(&self, target: &Path) {
        lock(&self.mounted).retain(|(t, _, _)| t != target);
    }

    /// How many bytes of every image its filesystem keeps for itself.
    pub fn set_overhead(&self, bytes: u64) {
        *lock(&self.overhead) = bytes;
    }

    /// What repair checks find from now on.
    pub fn set_check_verdict(&self, verdict: FsCheck) {
        *lock(&self.check_verdict) = Some(verdict);
    }

    /// Forgets every mount, as a reboot would.
    pub fn forget_mounts(&self) {
        self.mounted.lock().recover().clear();
    }

    fn record(&self, call: String) {
        self.calls.lock().recover().push(call);
    }
}

impl Mounter for RecordingMounter {
    fn format(&self, image: &Path, fs: FsType) -> Result<(), MountError> {
        self.record(format!("format {} {}", image.display(), fs.as_str()));
        Ok(())
    }

    fn bound_loops(&self, image: &Path) -> Result<Vec<PathBuf>, MountError> {
        let mounted = lock(&self.mounted)
            .iter()
            .any(|(_, _, i)| i.as_deref() == Some(image));
        let held = lock(&self.held).iter().any(|p| p == image);
        Ok(if mounted || held {
            vec![PathBuf::from(RECORDED_LOOP)]
        } else {
            Vec::new()
        })
    }

    fn mount_device(&self, device: &Path, target: &Path, fs: FsType) -> Result<(), MountError> {
        self.record(format!(
            "mount-device {} {} {}",
            device.display(),
            target.display(),
            fs.as_str()
        ));
        lock(&self.mounted).push((target.to_path_buf(), fs, None));
        Ok(())
    }

    fn available_bytes(&self, target: &Path) -> Result<u64, MountError> {
        let image = lock(&self.mounted)
            .iter()
            .rev()
            .find(|(t, _, _)| t == target)
            .and_then(|(_, _, i)| i.clone());
        let Some(image) = image else {
            return Ok(u64::MAX);
        };
        let len = std::fs::metadata(&image)?.len();
        Ok(len.saturating_sub(*lock(&self.overhead)))
    }

    fn holders(&self, storage: Storage<'_>) -> Result<Vec<Holder>, MountError> {
        let path = match storage {
            Storage::Image(p) | Storage::Directory(p) => p,
        };
        Ok(lock(&self.held)
            .iter()
            .filter(|p| p.as_path() == path)
            .map(|_| Holder {
                pid: 4242,
                mount_point: PathBuf::from("/data"),
            })
            .collect())
    }

    fn attach_and_mount(&self, image: &Path, target: &Path, fs: FsType) -> Result<(), MountError> {
        if std::mem::take(&mut *self.fail_next_mount.lock().recover()) {
            return Err(MountError::Mount {
                device: image.display().to_string(),
                target: target.to_path_buf(),
                errno: nix::errno::Errno::EIO,
            });
        }
        if !image.exists() {
            return Err(MountError::Io(std::io::Error::from(
                std::io::ErrorKind::NotFound,
            )));
        }
        self.record(format!(
            "mount {} {} {}",
            image.display(),
            target.display(),
            fs.as_str()
        ));
        self.mounted
            .lock()
            .recover()
            .push((target.to_path_buf(), fs, Some(image.to_path_buf())));
        Ok(())
    }

    fn bind(&self, source: &Path, target: &Path) -> Result<(), MountError> {
        self.record(format!("bind {} {}", source.display(), target.display()));
        self.mounted
            .lock()
            .recover()
            .push((target.to_path_buf(), FsType::Ext4, None));
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<(), MountError> {
        let mut m = self.mounted.lock().recover();
        if let Some(i) = m.iter().rposition(|(t, _, _)| t == target) {
            m.remove(i);
            self.record(format!("unmount {}", target.display()));
        }
        Ok(())
    }

    fn check_filesystem(&self, image: &Path, fs: FsType) -> Result<FsCheck, MountError> {
        self.record(format!("check {} {}", image.display(), fs.as_str()));
        Ok(lock(&self.check_verdict).clone().unwrap_or(FsCheck::Clean))
    }

    fn mount_table(&self) -> Result<MountTable, MountError> {
        let m = self.mounted.lock().recover();
        Ok(MountTable::from_entries(
            m.iter()
                .map(|(t, fs, _)| MountEntry {
                    mount_point: t.clone(),
                    fstype: fs.as_str().to_string(),
                    source: RECORDED_LOOP.into(),
                    ..MountEntry::default()
                })
                .collect(),
        ))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().recover()
}

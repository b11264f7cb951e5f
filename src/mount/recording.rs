//! A `Mounter` double for unit tests: it records each call and keeps an in-memory mount table.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{MountEntry, MountError, MountTable, Mounter};
use crate::spec::FsType;

/// Records calls as strings such as `mount /img /target ext4`, and can be told to fail the next mount.
#[derive(Debug, Default)]
pub struct RecordingMounter {
    pub calls: Mutex<Vec<String>>,
    mounted: Mutex<Vec<(PathBuf, FsType)>>,
    fail_next_mount: Mutex<bool>,
}

impl RecordingMounter {
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn count(&self, prefix: &str) -> usize {
        self.calls()
            .iter()
            .filter(|c| c.starts_with(prefix))
            .count()
    }

    pub fn fail_next_mount(&self) {
        *self
            .fail_next_mount
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = true;
    }

    /// Forgets every mount, as a reboot would.
    pub fn forget_mounts(&self) {
        self.mounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    fn record(&self, call: String) {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(call);
    }
}

impl Mounter for RecordingMounter {
    fn format(&self, image: &Path, fs: FsType) -> Result<(), MountError> {
        self.record(format!("format {} {}", image.display(), fs.as_str()));
        Ok(())
    }

    fn mount_image(&self, image: &Path, target: &Path, fs: FsType) -> Result<(), MountError> {
        if std::mem::take(
            &mut *self
                .fail_next_mount
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        ) {
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
            .unwrap_or_else(|p| p.into_inner())
            .push((target.to_path_buf(), fs));
        Ok(())
    }

    fn bind(&self, source: &Path, target: &Path) -> Result<(), MountError> {
        self.record(format!("bind {} {}", source.display(), target.display()));
        self.mounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((target.to_path_buf(), FsType::Ext4));
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<(), MountError> {
        let mut m = self.mounted.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = m.iter().rposition(|(t, _)| t == target) {
            m.remove(i);
            self.record(format!("unmount {}", target.display()));
        }
        Ok(())
    }

    fn mount_table(&self) -> Result<MountTable, MountError> {
        let m = self.mounted.lock().unwrap_or_else(|p| p.into_inner());
        Ok(MountTable::from_entries(
            m.iter()
                .map(|(t, fs)| MountEntry {
                    mount_point: t.clone(),
                    fstype: fs.as_str().to_string(),
                    source: "/dev/loop-test".into(),
                })
                .collect(),
        ))
    }
}

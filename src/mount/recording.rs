//! A `Mounter` double for unit tests: it records each call and keeps an in-memory mount table.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{FsCheck, Holder, MountArgs, MountEntry, MountError, MountTable, Mounter, Storage};
use crate::spec::FsType;
use crate::sync::Recover;

/// One call that changed something, as the double recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Format {
        image: PathBuf,
        fs: FsType,
    },
    /// An image attached to a new loop device and mounted (`attach_and_mount`).
    Mount {
        image: PathBuf,
        target: PathBuf,
        fs: FsType,
    },
    /// A loop device already bound to an image mounted again (`mount_device`).
    MountDevice {
        device: PathBuf,
        target: PathBuf,
        fs: FsType,
    },
    /// Any other filesystem, such as kernel NFS (`mount_fs`).
    MountFs {
        source: String,
        fstype: &'static str,
        data: String,
        target: PathBuf,
    },
    Bind {
        source: PathBuf,
        target: PathBuf,
    },
    /// Recorded only when something was mounted at `target`.
    Unmount {
        target: PathBuf,
    },
    /// A lazy unmount (`detach`); recorded only when something was mounted at `target`.
    Detach {
        target: PathBuf,
    },
    Check {
        image: PathBuf,
        fs: FsType,
    },
}

/// One mount in the double's table.
#[derive(Debug)]
struct Mounted {
    target: PathBuf,
    fstype: String,
    /// The image mounted there, if any.
    image: Option<PathBuf>,
}

/// Records every call that changes something as a `Call`, and can be told to fail the next mount or find
/// the next unmount busy. It models loop devices (one per image, bound while the image is mounted here or
/// held elsewhere), other mount namespaces holding storage (`hold_elsewhere`), and filesystem overhead
/// (`set_overhead`).
#[derive(Debug, Default)]
pub struct RecordingMounter {
    calls: Mutex<Vec<Call>>,
    mounted: Mutex<Vec<Mounted>>,
    fail_next_mount: Mutex<bool>,
    /// How many of the next unmounts fail with EBUSY, as they do while a process uses the mount.
    busy_unmounts: Mutex<usize>,
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
    pub fn calls(&self) -> Vec<Call> {
        lock(&self.calls).clone()
    }

    /// How many recorded calls `which` picks, such as `|c| matches!(c, Call::Unmount { .. })`.
    pub fn count(&self, which: impl Fn(&Call) -> bool) -> usize {
        lock(&self.calls).iter().filter(|c| which(c)).count()
    }

    pub fn fail_next_mount(&self) {
        *lock(&self.fail_next_mount) = true;
    }

    /// Makes the next `n` unmounts fail with EBUSY and leave the mount in place.
    pub fn busy_unmounts(&self, n: usize) {
        *lock(&self.busy_unmounts) = n;
    }

    /// Mounts something at `target` behind Ferry's back, as an earlier run or an operator would.
    pub fn mount_elsewhere(&self, target: &Path, fstype: &str) {
        lock(&self.mounted).push(Mounted {
            target: target.to_path_buf(),
            fstype: fstype.to_string(),
            image: None,
        });
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
        lock(&self.mounted).retain(|m| m.target != target);
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
        lock(&self.mounted).clear();
    }

    fn record(&self, call: Call) {
        lock(&self.calls).push(call);
    }

    fn push(&self, target: &Path, fstype: &str, image: Option<&Path>) {
        lock(&self.mounted).push(Mounted {
            target: target.to_path_buf(),
            fstype: fstype.to_string(),
            image: image.map(Path::to_path_buf),
        });
    }

    /// Takes the topmost mount at `target` away; whether there was one.
    fn pop(&self, target: &Path) -> bool {
        let mut m = lock(&self.mounted);
        match m.iter().rposition(|e| e.target == target) {
            Some(i) => {
                m.remove(i);
                true
            }
            None => false,
        }
    }
}

impl Mounter for RecordingMounter {
    fn format(&self, image: &Path, fs: FsType) -> Result<(), MountError> {
        self.record(Call::Format {
            image: image.to_path_buf(),
            fs,
        });
        Ok(())
    }

    fn bound_loops(&self, image: &Path) -> Result<Vec<PathBuf>, MountError> {
        let mounted = lock(&self.mounted)
            .iter()
            .any(|m| m.image.as_deref() == Some(image));
        let held = lock(&self.held).iter().any(|p| p == image);
        Ok(if mounted || held {
            vec![PathBuf::from(RECORDED_LOOP)]
        } else {
            Vec::new()
        })
    }

    fn mount_device(&self, device: &Path, target: &Path, fs: FsType) -> Result<(), MountError> {
        self.record(Call::MountDevice {
            device: device.to_path_buf(),
            target: target.to_path_buf(),
            fs,
        });
        self.push(target, fs.as_str(), None);
        Ok(())
    }

    fn available_bytes(&self, target: &Path) -> Result<u64, MountError> {
        let image = lock(&self.mounted)
            .iter()
            .rev()
            .find(|m| m.target == target)
            .and_then(|m| m.image.clone());
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
        if std::mem::take(&mut *lock(&self.fail_next_mount)) {
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
        self.record(Call::Mount {
            image: image.to_path_buf(),
            target: target.to_path_buf(),
            fs,
        });
        self.push(target, fs.as_str(), Some(image));
        Ok(())
    }

    fn mount_fs(&self, args: &MountArgs, target: &Path) -> Result<(), MountError> {
        if std::mem::take(&mut *lock(&self.fail_next_mount)) {
            return Err(MountError::Mount {
                device: args.source.clone(),
                target: target.to_path_buf(),
                errno: nix::errno::Errno::EIO,
            });
        }
        self.record(Call::MountFs {
            source: args.source.clone(),
            fstype: args.fstype,
            data: args.data.clone(),
            target: target.to_path_buf(),
        });
        self.push(target, args.fstype, None);
        Ok(())
    }

    fn bind(&self, source: &Path, target: &Path) -> Result<(), MountError> {
        self.record(Call::Bind {
            source: source.to_path_buf(),
            target: target.to_path_buf(),
        });
        // A bind mount shows the fstype of the filesystem it comes from; the double's is ext4.
        self.push(target, FsType::Ext4.as_str(), None);
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<(), MountError> {
        let mounted = lock(&self.mounted).iter().any(|m| m.target == target);
        if mounted {
            let mut busy = lock(&self.busy_unmounts);
            if *busy > 0 {
                *busy -= 1;
                return Err(MountError::Unmount {
                    target: target.to_path_buf(),
                    errno: nix::errno::Errno::EBUSY,
                });
            }
        }
        if self.pop(target) {
            self.record(Call::Unmount {
                target: target.to_path_buf(),
            });
        }
        Ok(())
    }

    fn detach(&self, target: &Path) -> Result<(), MountError> {
        if self.pop(target) {
            self.record(Call::Detach {
                target: target.to_path_buf(),
            });
        }
        Ok(())
    }

    fn check_filesystem(&self, image: &Path, fs: FsType) -> Result<FsCheck, MountError> {
        self.record(Call::Check {
            image: image.to_path_buf(),
            fs,
        });
        Ok(lock(&self.check_verdict).clone().unwrap_or(FsCheck::Clean))
    }

    fn mount_table(&self) -> Result<MountTable, MountError> {
        let m = lock(&self.mounted);
        Ok(MountTable::from_entries(
            m.iter()
                .map(|m| MountEntry {
                    mount_point: m.target.clone(),
                    fstype: m.fstype.clone(),
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

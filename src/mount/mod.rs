//! Mounting: mount(2)/umount2(2), loop devices, making filesystems, and reading `/proc/self/mountinfo`.
//!
//! Backends decide what to mount; this module performs it, through the `Mounter` trait so that the logic
//! above it can be unit-tested with `RecordingMounter` without root. Nothing outside this module calls
//! mount(2) or umount2(2) or reads the mount table itself: the service and every backend hold a mounter,
//! and the FUSE helper process, which has none, uses `SystemMounter` directly. Everything here blocks: call
//! it from `spawn_blocking`. No shell is ever involved: external tools run with argument vectors.

mod fsck;
mod holders;
mod loopdev;
mod mountinfo;
mod recording;

use std::path::{Path, PathBuf};
use std::process::Command;

use nix::errno::Errno;
use nix::mount::{umount2, MntFlags, MsFlags};

use crate::spec::FsType;

pub use fsck::{ext4_errors_logged, ext4_needs_check, xfs_needs_repair, FsCheck};
pub use holders::{Holder, Storage};
pub use loopdev::probe_free as probe_free_loop_device;
pub use mountinfo::{MountEntry, MountTable};
pub use recording::{Call, RecordingMounter};

/// What mount(2) gets for a filesystem that is neither an image nor a bind mount, such as kernel NFS: every
/// option spelled out by the caller, nothing left to a mount helper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountArgs {
    pub source: String,
    pub fstype: &'static str,
    pub flags: MsFlags,
    pub data: String,
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot read the mount table: {0}")]
    MountTable(std::io::Error),
    #[error("{tool} was not found; install it (Debian: apt-get install {package})")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
    },
    #[error("{tool} failed on {path}: {detail}")]
    Tool {
        tool: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("cannot set up a loop device for {path}: {errno}")]
    Loop { path: PathBuf, errno: Errno },
    #[error("cannot mount {device} on {target}: {errno}")]
    Mount {
        device: String,
        target: PathBuf,
        errno: Errno,
    },
    #[error("{image} is still attached to {device} (its filesystem is mounted elsewhere, such as in a container's mount namespace), and mounting that device failed: {errno}; stop the containers that use the volume (`losetup -j {image}` names the device) and try again")]
    SharedLoop {
        image: PathBuf,
        device: PathBuf,
        errno: Errno,
    },
    #[error("{image} is attached to several loop devices ({devices}), so more than one filesystem may be writing to it; stop every container that uses the volume, unmount them all, check the image with `e2fsck -f` (or `xfs_repair -n`) and mount it again")]
    ManyLoops { image: PathBuf, devices: String },
    #[error("cannot tell whether a container still holds the volume: Ferry runs in a PID namespace of its own (such as the managed plugin's) and cannot see the host's processes; stop the containers using it, then `ferry release --force` releases on your word")]
    PartialView,
    #[error("cannot unmount {target}: {errno}{}", if *.errno == Errno::EBUSY { " (a process still uses it)" } else { "" })]
    Unmount { target: PathBuf, errno: Errno },
    /// A path inside Ferry's own directories is a symbolic link: Ferry never makes one there, so someone
    /// planted it, and following it would mount or attach something else.
    #[error("{path} is a symbolic link, which Ferry never makes inside its own directories, so it was refused rather than followed; check who made it, remove it (`rm {path}` removes the link, not its target) and try again")]
    PlantedLink { path: PathBuf },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// An open directory (or file) reached without following a link in the last component of its path, to
/// mount on or bind from through `/proc/self/fd`, so that a link swapped in after any check is never
/// followed either: the kernel mounts exactly what was opened.
struct Pinned {
    fd: std::os::fd::OwnedFd,
}

impl Pinned {
    fn open(path: &Path) -> Result<Self, MountError> {
        use std::os::fd::FromRawFd;
        let flags = nix::fcntl::OFlag::O_PATH
            | nix::fcntl::OFlag::O_NOFOLLOW
            | nix::fcntl::OFlag::O_CLOEXEC;
        match nix::fcntl::open(path, flags, nix::sys::stat::Mode::empty()) {
            Ok(raw) => {
                let pinned = Pinned {
                    // SAFETY: `open` returned a new descriptor that nothing else owns.
                    fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) },
                };
                let st = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&pinned.fd))
                    .map_err(std::io::Error::from)?;
                if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
                    return Err(MountError::PlantedLink {
                        path: path.to_path_buf(),
                    });
                }
                Ok(pinned)
            }
            Err(errno) => Err(std::io::Error::from(errno).into()),
        }
    }

    fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&self.fd)
        ))
    }
}

/// Performs mounts. Implemented by `SystemMounter` (the real kernel) and `RecordingMounter` (tests).
pub trait Mounter: Send + Sync {
    /// Makes a filesystem of type `fs` in the image file, destroying what it held.
    fn format(&self, image: &Path, fs: FsType) -> Result<(), MountError>;
    /// Mounts the filesystem in the image on `target`, keeping one filesystem instance per image: when a
    /// loop device is still bound to the image (its filesystem outlived Ferry's mount in another mount
    /// namespace, after a lazy unmount for example), that device is mounted, and the kernel shares the
    /// superblock already in use; otherwise the image is attached to a new loop device. A second loop device
    /// on one image would be a second filesystem writing the same blocks.
    fn mount_image(&self, image: &Path, target: &Path, fs: FsType) -> Result<(), MountError> {
        let bound = self.bound_loops(image)?;
        match bound.as_slice() {
            [] => self.attach_and_mount(image, target, fs),
            [device] => {
                tracing::warn!(
                    image = %image.display(),
                    device = %device.display(),
                    "the image is still attached to a loop device, so its filesystem is mounted somewhere else (a container's mount namespace, after a lazy unmount); mounting that device to share the one filesystem"
                );
                self.mount_device(device, target, fs).map_err(|e| match e {
                    MountError::Mount { errno, .. } => MountError::SharedLoop {
                        image: image.to_path_buf(),
                        device: device.clone(),
                        errno,
                    },
                    other => other,
                })
            }
            many => Err(MountError::ManyLoops {
                image: image.to_path_buf(),
                devices: many
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }
    /// The loop devices bound to this image file (matched by device and inode, not by name).
    fn bound_loops(&self, image: &Path) -> Result<Vec<PathBuf>, MountError>;
    /// Attaches the image to a new loop device and mounts it on `target`. The loop device detaches itself
    /// when the filesystem is unmounted everywhere. Only `mount_image` calls this, after making sure no
    /// device is bound to the image yet.
    fn attach_and_mount(&self, image: &Path, target: &Path, fs: FsType) -> Result<(), MountError>;
    /// Mounts an existing block device holding a filesystem of type `fs` on `target`.
    fn mount_device(&self, device: &Path, target: &Path, fs: FsType) -> Result<(), MountError>;
    /// The bytes an unprivileged user can still write to the filesystem mounted at `target` (what `df`
    /// shows as available).
    fn available_bytes(&self, target: &Path) -> Result<u64, MountError>;
    /// Where the storage is mounted in mount namespaces other than Ferry's own: containers (or any other
    /// process) that still hold it. Copies of Ferry's own mount that propagation made (the same peer group)
    /// do not count.
    fn holders(&self, storage: Storage<'_>) -> Result<Vec<Holder>, MountError>;
    /// Bind-mounts the directory `source` on `target`.
    fn bind(&self, source: &Path, target: &Path) -> Result<(), MountError>;
    /// Mounts the filesystem `args` describes (kernel NFS) on `target`.
    fn mount_fs(&self, args: &MountArgs, target: &Path) -> Result<(), MountError>;
    /// Unmounts `target`; succeeds if nothing is mounted there. Fails with `Unmount` and EBUSY while a
    /// process uses it.
    fn unmount(&self, target: &Path) -> Result<(), MountError>;
    /// Detaches the mount at `target` from this namespace at once, even while it is busy (`umount -l`):
    /// processes that use it keep it until they let go. Succeeds if nothing is mounted there.
    fn detach(&self, target: &Path) -> Result<(), MountError>;
    /// Checks the filesystem in an unmounted image before it is mounted, repairing what is safe to repair
    /// unattended: `e2fsck -p -f` for ext4; `xfs_repair -n`, which repairs nothing, for xfs.
    fn check_filesystem(&self, image: &Path, fs: FsType) -> Result<FsCheck, MountError>;
    /// The current mount table of this process's mount namespace.
    fn mount_table(&self) -> Result<MountTable, MountError>;
}

/// The real kernel.
#[derive(Debug, Default)]
pub struct SystemMounter;

/// umount2(2) of `target`, never following a link at the mountpoint: what is mounted there is the link's
/// business. Nothing mounted there (EINVAL) or no such path (ENOENT) is success.
fn umount(target: &Path, flags: MntFlags) -> Result<(), MountError> {
    match umount2(target, flags | MntFlags::UMOUNT_NOFOLLOW) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
        Err(errno) => Err(MountError::Unmount {
            target: target.to_path_buf(),
            errno,
        }),
    }
}

/// Finds an administration tool in the usual system directories, whatever PATH a service manager gave us.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(PathBuf::from)
        .collect();
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// Deletes the `lost+found` directory mkfs.ext4 puts in the root, so a new volume starts empty (programs
/// such as postgres' initdb refuse a data directory that is not). e2fsck makes it again when it needs it.
/// debugfs works on the unmounted image and exits 0 even when a command fails, so its complaints on stderr
/// (anything past its version banner) are the failure.
fn remove_lost_found(image: &Path) -> Result<(), MountError> {
    let tool = "debugfs";
    let path = find_tool(tool).ok_or(MountError::ToolMissing {
        tool,
        package: "e2fsprogs",
    })?;
    let out = Command::new(path)
        .args(["-w", "-R", "rmdir lost+found"])
        .arg(image)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs "))
        .collect();
    if !out.status.success() || !complaints.is_empty() {
        return Err(MountError::Tool {
            tool,
            path: image.to_path_buf(),
            detail: format!(
                "cannot remove lost+found: {} ({})",
                complaints.join("; "),
                out.status
            ),
        });
    }
    Ok(())
}

impl Mounter for SystemMounter {
    fn format(&self, image: &Path, fs: FsType) -> Result<(), MountError> {
        let (tool, package, args): (&'static str, &'static str, &[&str]) = match fs {
            // -m 0: no blocks reserved for root, so the cap is the same for every user in the container.
            FsType::Ext4 => (
                "mkfs.ext4",
                "e2fsprogs",
                &["-q", "-F", "-m", "0", "-E", "nodiscard"],
            ),
            FsType::Xfs => ("mkfs.xfs", "xfsprogs", &["-q", "-f", "-K"]),
        };
        let path = find_tool(tool).ok_or(MountError::ToolMissing { tool, package })?;
        let out = Command::new(path).args(args).arg(image).output()?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(MountError::Tool {
                tool,
                path: image.to_path_buf(),
                detail: format!("{} ({})", stderr.trim(), out.status),
            });
        }
        if matches!(fs, FsType::Ext4) {
            remove_lost_found(image)?;
        }
        Ok(())
    }

    fn bound_loops(&self, image: &Path) -> Result<Vec<PathBuf>, MountError> {
        Ok(loopdev::bound_to(image)?
            .into_iter()
            .map(|l| l.path)
            .collect())
    }

    fn mount_device(&self, device: &Path, target: &Path, fs: FsType) -> Result<(), MountError> {
        let pinned = Pinned::open(target)?;
        nix::mount::mount(
            Some(device),
            &pinned.proc_path(),
            Some(fs.as_str()),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|errno| MountError::Mount {
            device: device.display().to_string(),
            target: target.to_path_buf(),
            errno,
        })
    }

    fn available_bytes(&self, target: &Path) -> Result<u64, MountError> {
        let st = nix::sys::statvfs::statvfs(target).map_err(std::io::Error::from)?;
        Ok(st.blocks_available() * st.fragment_size())
    }

    fn holders(&self, storage: Storage<'_>) -> Result<Vec<Holder>, MountError> {
        holders::find(storage)
    }

    fn attach_and_mount(&self, image: &Path, target: &Path, fs: FsType) -> Result<(), MountError> {
        let pinned = Pinned::open(target)?;
        let device = loopdev::attach(image)?;
        let res = nix::mount::mount(
            Some(device.path()),
            &pinned.proc_path(),
            Some(fs.as_str()),
            MsFlags::empty(),
            None::<&str>,
        );
        // Dropping `device` closes our descriptor: after a successful mount the mount keeps the device;
        // after a failed one autoclear releases it.
        res.map_err(|errno| MountError::Mount {
            device: format!("{} ({})", device.path().display(), image.display()),
            target: target.to_path_buf(),
            errno,
        })
    }

    fn bind(&self, source: &Path, target: &Path) -> Result<(), MountError> {
        let (from, onto) = (Pinned::open(source)?, Pinned::open(target)?);
        nix::mount::mount(
            Some(&from.proc_path()),
            &onto.proc_path(),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|errno| MountError::Mount {
            device: source.display().to_string(),
            target: target.to_path_buf(),
            errno,
        })
    }

    fn mount_fs(&self, args: &MountArgs, target: &Path) -> Result<(), MountError> {
        let pinned = Pinned::open(target)?;
        nix::mount::mount(
            Some(args.source.as_str()),
            &pinned.proc_path(),
            Some(args.fstype),
            args.flags,
            Some(args.data.as_str()),
        )
        .map_err(|errno| MountError::Mount {
            device: args.source.clone(),
            target: target.to_path_buf(),
            errno,
        })
    }

    fn unmount(&self, target: &Path) -> Result<(), MountError> {
        umount(target, MntFlags::empty())
    }

    fn detach(&self, target: &Path) -> Result<(), MountError> {
        umount(target, MntFlags::MNT_DETACH)
    }

    fn mount_table(&self) -> Result<MountTable, MountError> {
        MountTable::read_self()
    }

    fn check_filesystem(&self, image: &Path, fs: FsType) -> Result<FsCheck, MountError> {
        fsck::check(image, fs)
    }
}

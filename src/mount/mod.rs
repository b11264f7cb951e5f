//! Mounting: mount(2)/umount2(2), loop devices, making filesystems, and reading `/proc/self/mountinfo`.
//!
//! Backends decide what to mount; this module performs it, through the `Mounter` trait so that the logic
//! above it can be unit-tested with `RecordingMounter` without root. Everything here blocks: call it from
//! `spawn_blocking`. No shell is ever involved: external tools run with argument vectors.

mod loopdev;
mod mountinfo;
mod recording;

use std::path::{Path, PathBuf};
use std::process::Command;

use nix::errno::Errno;
use nix::mount::{umount2, MntFlags, MsFlags};

use crate::spec::FsType;

pub use loopdev::probe_free as probe_free_loop_device;
pub use mountinfo::{MountEntry, MountTable};
pub use recording::RecordingMounter;

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
    #[error("cannot unmount {target}: {errno}{}", if *.errno == Errno::EBUSY { " (a process still uses it)" } else { "" })]
    Unmount { target: PathBuf, errno: Errno },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Performs mounts. Implemented by `SystemMounter` (the real kernel) and `RecordingMounter` (tests).
pub trait Mounter: Send + Sync {
    /// Makes a filesystem of type `fs` in the image file, destroying what it held.
    fn format(&self, image: &Path, fs: FsType) -> Result<(), MountError>;
    /// Attaches the image to a free loop device and mounts it on `target`. The loop device detaches itself
    /// when the filesystem is unmounted.
    fn mount_image(&self, image: &Path, target: &Path, fs: FsType) -> Result<(), MountError>;
    /// Bind-mounts the directory `source` on `target`.
    fn bind(&self, source: &Path, target: &Path) -> Result<(), MountError>;
    /// Unmounts `target`; succeeds if nothing is mounted there.
    fn unmount(&self, target: &Path) -> Result<(), MountError>;
    /// The current mount table of this process's mount namespace.
    fn mount_table(&self) -> Result<MountTable, MountError>;
}

/// The real kernel.
#[derive(Debug, Default)]
pub struct SystemMounter;

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
        Ok(())
    }

    fn mount_image(&self, image: &Path, target: &Path, fs: FsType) -> Result<(), MountError> {
        let device = loopdev::attach(image)?;
        let res = nix::mount::mount(
            Some(device.path()),
            target,
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
        nix::mount::mount(
            Some(source),
            target,
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

    fn unmount(&self, target: &Path) -> Result<(), MountError> {
        match umount2(target, MntFlags::empty()) {
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
            Err(errno) => Err(MountError::Unmount {
                target: target.to_path_buf(),
                errno,
            }),
        }
    }

    fn mount_table(&self) -> Result<MountTable, MountError> {
        MountTable::read_self()
    }
}

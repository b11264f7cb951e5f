//! Freezing a mounted filesystem (FIFREEZE) so its image on disk is consistent while a checkpoint copies
//! the changed blocks aside. Thawing is tied to a guard, so no error path can leave a filesystem frozen
//! (a frozen filesystem blocks every writer in the containers).

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::backend::BackendError;

// FIFREEZE and FITHAW from <linux/fs.h>: _IOWR('X', 119, int) and _IOWR('X', 120, int).
nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);

/// A frozen filesystem; dropping it thaws it.
pub(super) struct Frozen {
    dir: File,
}

impl Frozen {
    /// Freezes the filesystem mounted at `mountpoint`; on return, everything written before is on the
    /// block device (here, in the image file).
    pub(super) fn freeze(mountpoint: &Path) -> Result<Frozen, BackendError> {
        let dir = File::open(mountpoint).map_err(BackendError::io("open", mountpoint))?;
        let mut arg: libc::c_int = 0;
        // SAFETY: FIFREEZE takes an int argument it does not use; `dir` is an open descriptor of the
        // filesystem's mountpoint and outlives the call.
        unsafe { fifreeze(dir.as_raw_fd(), &mut arg) }.map_err(|e| BackendError::Io {
            op: "freeze the filesystem at",
            path: mountpoint.to_path_buf(),
            source: e.into(),
        })?;
        Ok(Frozen { dir })
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let mut arg: libc::c_int = 0;
        // SAFETY: as for FIFREEZE; the descriptor is still open.
        if let Err(e) = unsafe { fithaw(self.dir.as_raw_fd(), &mut arg) } {
            tracing::error!(error = %e, "cannot thaw a frozen filesystem; writers in containers are blocked until `fsfreeze -u` on its mountpoint");
        }
    }
}

// FS_IOC_SHUTDOWN from <linux/fs.h>: _IOR('X', 125, __u32). The kernel reads the flags through the pointer
// although the number says "read"; ext4 and xfs implement it.
nix::ioctl_read!(fs_shutdown, b'X', 125, u32);
/// FS_GOING_FLAGS_LOGFLUSH: commit the journal, then refuse everything.
const GOING_LOGFLUSH: u32 = 1;

/// Cluster fencing: makes every later write to the filesystem at `mountpoint` fail at once (EIO), after
/// committing its journal so what was written before stays consistent in the image. Unlike a read-only
/// remount it cannot be refused because files are open for writing. Only unmounting ends it.
pub(super) fn shut_down(mountpoint: &Path) -> Result<(), BackendError> {
    let dir = File::open(mountpoint).map_err(BackendError::io("open", mountpoint))?;
    let mut flags: u32 = GOING_LOGFLUSH;
    // SAFETY: FS_IOC_SHUTDOWN reads one u32 through the pointer, which points at a live local; `dir` is an
    // open descriptor of the filesystem's mountpoint and outlives the call.
    unsafe { fs_shutdown(dir.as_raw_fd(), &mut flags) }.map_err(|e| BackendError::Io {
        op: "shut down (fence) the filesystem at",
        path: mountpoint.to_path_buf(),
        source: e.into(),
    })?;
    Ok(())
}

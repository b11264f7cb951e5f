//! The largest file a filesystem can hold, found by asking it: an image larger than that fails only when
//! it is sized (ext4 with 4 KiB blocks stops at 16 TiB, with 1 KiB blocks at 16 GiB), so Create checks
//! first and names the maximum instead of leaving the user a "File too large" at Mount. Likewise the
//! largest volume an EBS snapshot holds, which is fixed by the EBS direct APIs rather than asked.
//!
//! The probe is an unnamed file (`O_TMPFILE`) in the directory that will hold the image, truncated to the
//! length asked: truncation allocates nothing, and the unnamed file vanishes when closed, even if Ferry
//! dies in between. Blocking, but a handful of syscalls.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::errno::Errno;

/// The largest ebs volume: StartSnapshot takes a VolumeSize of at most 65536 GiB. (Block indices, an i32
/// in the direct APIs, would allow far more: 64 TiB is 2^27 blocks of 512 KiB.)
pub const EBS_MAX_SIZE: u64 = 65536 << 30;

/// Whether a file of `len` bytes fits, from an open probe file.
fn fits(probe: &File, len: u64) -> std::io::Result<bool> {
    match probe.set_len(len) {
        Ok(()) => Ok(true),
        Err(e)
            if matches!(
                Errno::from_raw(e.raw_os_error().unwrap_or(0)),
                Errno::EFBIG | Errno::EINVAL
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// `None` when a file of `len` bytes fits in a file of the filesystem holding `dir`; otherwise the
/// largest length that fits. `Err` when the filesystem cannot be asked (no `O_TMPFILE` support, read-only,
/// no inodes left): the caller then proceeds and lets the real operation report.
pub fn largest_file_if_smaller(dir: &Path, len: u64) -> std::io::Result<Option<u64>> {
    let probe = OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(dir)?;
    if fits(&probe, len)? {
        return Ok(None);
    }
    // The limit is a property of the filesystem, so a bisection over lengths finds it exactly.
    let (mut ok, mut too_big) = (0u64, len);
    while too_big - ok > 1 {
        let mid = ok + (too_big - ok) / 2;
        if fits(&probe, mid)? {
            ok = mid;
        } else {
            too_big = mid;
        }
    }
    Ok(Some(ok))
}

/// The largest `size` whose image (of `image_len(size)` bytes) fits in `largest_file`, rounded down to
/// a whole GiB (or MiB below one GiB) so the error names a size the user can type.
pub fn largest_size(largest_file: u64, image_len: impl Fn(u64) -> u64) -> u64 {
    // image_len grows monotonically with size, so bisect again, on sizes.
    let (mut ok, mut too_big) = (0u64, largest_file.saturating_add(1));
    while too_big - ok > 1 {
        let mid = ok + (too_big - ok) / 2;
        if image_len(mid) <= largest_file {
            ok = mid;
        } else {
            too_big = mid;
        }
    }
    let unit = if ok >= 1 << 30 { 1 << 30 } else { 1 << 20 };
    ok / unit * unit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn largest_size_inverts_the_image_length() {
        let len = |s: u64| s + s / 32 + (16 << 20);
        let max = largest_size(16 << 40, len);
        assert!(len(max) <= 16 << 40);
        assert!(len(max + (1 << 30)) > 16 << 40);
        assert_eq!(max % (1 << 30), 0);
        assert_eq!(largest_size(100 << 20, |s| s), 100 << 20);
    }

    #[test]
    fn a_small_file_fits_anywhere() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(largest_file_if_smaller(dir.path(), 1 << 30).unwrap(), None);
        // Nothing is left behind: the probe had no name.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}

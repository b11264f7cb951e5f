//! Loop devices through ioctls: claim a free device from `/dev/loop-control` and bind it to an image with
//! LOOP_CONFIGURE and autoclear, so unmounting the filesystem is all it takes to release the device; and
//! find the devices already bound to an image (by the backing file's device and inode, which the kernel
//! reports through LOOP_GET_STATUS64), so an image is never bound twice.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

use super::MountError;

const LOOP_CTL_GET_FREE: u16 = 0x4C82;
const LOOP_CONFIGURE: u16 = 0x4C0A;
const LOOP_GET_STATUS64: u16 = 0x4C05;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LOOP_MAJOR: u64 = 7;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

// The kernel reads these structs by layout alone (include/uapi/linux/loop.h): a field added or widened here
// by mistake would configure the device from garbage, so their sizes are pinned to the kernel's.
const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);
const _: () = assert!(std::mem::offset_of!(LoopConfig, info) == 8);

nix::ioctl_none_bad!(loop_ctl_get_free, LOOP_CTL_GET_FREE);
nix::ioctl_write_ptr_bad!(loop_configure, LOOP_CONFIGURE, LoopConfig);
nix::ioctl_read_bad!(loop_get_status64, LOOP_GET_STATUS64, LoopInfo64);

/// An open, configured loop device. Dropping it closes our descriptor; with autoclear the kernel then
/// releases the device as soon as nothing (no mount) holds it.
pub struct LoopDevice {
    _file: File,
    path: PathBuf,
}

impl LoopDevice {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn open_device(n: u32) -> std::io::Result<File> {
    open_device_with(n, true)
}

fn open_device_with(n: u32, write: bool) -> std::io::Result<File> {
    let path = PathBuf::from(format!("/dev/loop{n}"));
    match OpenOptions::new().read(true).write(write).open(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Some minimal /dev setups (containers) do not create nodes for new loop devices.
            let dev = makedev(LOOP_MAJOR, u64::from(n));
            mknod(&path, SFlag::S_IFBLK, Mode::from_bits_truncate(0o660), dev)?;
            OpenOptions::new().read(true).write(write).open(&path)
        }
        other => other,
    }
}

/// Asks the kernel for a free loop device without binding anything, to tell an operator whether capped
/// volumes can work here. Returns the device's path.
pub fn probe_free() -> std::io::Result<PathBuf> {
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    // SAFETY: the descriptor is an open /dev/loop-control; the ioctl takes no argument.
    let n = unsafe { loop_ctl_get_free(control.as_raw_fd()) }.map_err(std::io::Error::from)?;
    Ok(PathBuf::from(format!("/dev/loop{n}")))
}

/// Binds `image` to a free loop device.
pub fn attach(image: &Path) -> Result<LoopDevice, MountError> {
    let err = |errno: Errno| MountError::Loop {
        path: image.to_path_buf(),
        errno,
    };
    // Never through a link: the image is Ferry's own file, and a link in its place was planted.
    let backing = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(image)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => MountError::PlantedLink {
                path: image.to_path_buf(),
            },
            _ => e.into(),
        })?;
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .map_err(|e| err(Errno::from_raw(e.raw_os_error().unwrap_or(libc::ENODEV))))?;
    // Another process may claim the device between GET_FREE and CONFIGURE; that shows as EBUSY, so retry.
    for _ in 0..16 {
        // SAFETY: the descriptor is an open /dev/loop-control; the ioctl takes no argument.
        let n = unsafe { loop_ctl_get_free(control.as_raw_fd()) }.map_err(err)?;
        let n = u32::try_from(n).map_err(|_| err(Errno::EINVAL))?;
        let dev = open_device(n)
            .map_err(|e| err(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))))?;
        let mut name = [0u8; 64];
        let raw = image.as_os_str().as_encoded_bytes();
        let len = raw.len().min(63);
        name[..len].copy_from_slice(&raw[..len]);
        let config = LoopConfig {
            fd: u32::try_from(backing.as_raw_fd()).map_err(|_| err(Errno::EBADF))?,
            block_size: 0,
            info: LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: LO_FLAGS_AUTOCLEAR,
                lo_file_name: name,
                lo_crypt_name: [0; 64],
                lo_encrypt_key: [0; 32],
                lo_init: [0; 2],
            },
            reserved: [0; 8],
        };
        // SAFETY: `dev` is an open loop device and `config` is a properly laid out, initialised
        // struct loop_config that outlives the call.
        match unsafe { loop_configure(dev.as_raw_fd(), &config) } {
            Ok(_) => {
                return Ok(LoopDevice {
                    _file: dev,
                    path: PathBuf::from(format!("/dev/loop{n}")),
                })
            }
            Err(Errno::EBUSY) => continue,
            Err(e) => return Err(err(e)),
        }
    }
    Err(err(Errno::EBUSY))
}

/// A loop device bound to some file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundLoop {
    /// `/dev/loopN`.
    pub path: PathBuf,
    /// The block device's number as mountinfo shows it, (major, minor).
    pub device: (u64, u64),
}

/// Every loop device whose backing file is `image` itself (the same device and inode, whatever path it
/// was bound under). Devices that vanish or unbind while we look are skipped.
pub fn bound_to(image: &Path) -> Result<Vec<BoundLoop>, MountError> {
    let st = nix::sys::stat::lstat(image).map_err(|errno| MountError::Loop {
        path: image.to_path_buf(),
        errno,
    })?;
    let entries = match std::fs::read_dir("/sys/block") {
        Ok(e) => e,
        // No sysfs (a minimal container): no loop device can be found, and none can be made either.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(MountError::Io(e)),
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|s| s.strip_prefix("loop"))
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // Only a bound device has the `loop` attribute directory; skip the rest without opening them.
        if !entry.path().join("loop").is_dir() {
            continue;
        }
        let Ok(dev) = open_device_with(n, false) else {
            continue;
        };
        let mut info = std::mem::MaybeUninit::<LoopInfo64>::zeroed();
        // SAFETY: `dev` is an open loop device and `info` points to writable memory the size of struct
        // loop_info64, which the kernel fills in; zeroed memory is a valid LoopInfo64 (integers and arrays).
        if unsafe { loop_get_status64(dev.as_raw_fd(), info.as_mut_ptr()) }.is_err() {
            continue; // unbound since we looked (ENXIO)
        }
        // SAFETY: zero-initialised above, and every bit pattern is a valid LoopInfo64.
        let info = unsafe { info.assume_init() };
        if info.lo_device != st.st_dev || info.lo_inode != st.st_ino {
            continue;
        }
        let Some(device) = std::fs::read_to_string(entry.path().join("dev"))
            .ok()
            .and_then(|t| {
                let (major, minor) = t.trim().split_once(':')?;
                Some((major.parse().ok()?, minor.parse().ok()?))
            })
        else {
            continue;
        };
        found.push(BoundLoop {
            path: PathBuf::from(format!("/dev/loop{n}")),
            device,
        });
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(found)
}

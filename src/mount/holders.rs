//! Who still holds a volume's storage: the mounts of it in every mount namespace on the host other than
//! Ferry's own, found in `/proc/PID/mountinfo` of one process per namespace. A container keeps its own copy
//! of a volume's mount in its namespace for as long as it runs, whatever happens to Ferry's mount, so an
//! empty answer proves that no container (nor anything else) holds the storage.
//!
//! It reads `/proc` only; it never enters a namespace or changes a mount.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{loopdev, MountError, MountTable};

/// What to look for.
#[derive(Clone, Copy, Debug)]
pub enum Storage<'a> {
    /// A filesystem image: held wherever a loop device bound to it is mounted.
    Image(&'a Path),
    /// A plain directory: held wherever it, or a directory inside it, is bind-mounted.
    Directory(&'a Path),
}

/// One mount of the storage in another mount namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// One process in that namespace.
    pub pid: u32,
    /// Where the storage is mounted, as that namespace sees it.
    pub mount_point: PathBuf,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} at {}", self.pid, self.mount_point.display())
    }
}

/// The storage as mountinfo shows it: the filesystem's devices, and the directory inside it.
struct Wanted {
    devices: Vec<(u64, u64)>,
    /// A mount holds the storage when its root is this directory or one inside it.
    root: PathBuf,
}

impl Wanted {
    fn matches(&self, e: &super::MountEntry) -> bool {
        self.devices.contains(&e.device) && e.root.starts_with(&self.root)
    }
}

fn namespace_of(pid: &str) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()
}

/// Where the directory `dir` is on its filesystem, from the mount in `table` that contains it.
fn directory_root(dir: &Path, table: &MountTable) -> Result<Wanted, MountError> {
    let meta = std::fs::metadata(dir)?;
    let dev = meta.dev();
    let device = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    // The deepest mount of that device containing the directory: its root plus the rest of the path.
    let root = table
        .entries()
        .iter()
        .filter(|e| e.device == device && dir.starts_with(&e.mount_point))
        .max_by_key(|e| e.mount_point.as_os_str().len())
        .and_then(|e| {
            let rest = dir.strip_prefix(&e.mount_point).ok()?;
            Some(e.root.join(rest))
        })
        .unwrap_or_else(|| dir.to_path_buf());
    Ok(Wanted {
        devices: vec![device],
        root,
    })
}

/// Every mount of `storage` in the other mount namespaces of the host.
pub fn find(storage: Storage<'_>) -> Result<Vec<Holder>, MountError> {
    let own = MountTable::read_self()?;
    let wanted = match storage {
        Storage::Image(image) => Wanted {
            // Without a bound loop device, nothing anywhere can have the image's filesystem mounted.
            devices: match loopdev::bound_to(image) {
                Ok(l) => l.into_iter().map(|l| l.device).collect(),
                Err(_) if !image.exists() => Vec::new(),
                Err(e) => return Err(e),
            },
            root: PathBuf::from("/"),
        },
        Storage::Directory(dir) => directory_root(dir, &own)?,
    };
    if wanted.devices.is_empty() {
        return Ok(Vec::new());
    }
    // Copies of Ferry's own mounts that propagation made elsewhere go away with Ferry's mount, so they hold
    // nothing: peers (the host's view of a managed plugin's mount) and, at the very same path, slaves (the
    // private namespaces of system services). A container's copy is neither: Docker makes volume mounts
    // private, and puts them at the container's own path.
    let own_mounts: Vec<&super::MountEntry> =
        own.entries().iter().filter(|e| wanted.matches(e)).collect();
    let own_groups: HashSet<u64> = own_mounts.iter().filter_map(|e| e.shared).collect();
    let propagated = |e: &super::MountEntry| {
        e.shared.is_some_and(|g| own_groups.contains(&g))
            || e.master.is_some_and(|g| {
                own_groups.contains(&g) && own_mounts.iter().any(|o| o.mount_point == e.mount_point)
            })
    };
    let own_ns = namespace_of("self");
    let mut seen: HashSet<PathBuf> = own_ns.into_iter().collect();
    let mut holders = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // Processes come and go while we look; one that is gone holds nothing.
        let Some(ns) = namespace_of(&pid.to_string()) else {
            continue;
        };
        if !seen.insert(ns) {
            continue;
        }
        let Ok(table) =
            MountTable::read(&Path::new("/proc").join(pid.to_string()).join("mountinfo"))
        else {
            continue;
        };
        holders.extend(
            table
                .entries()
                .iter()
                .filter(|e| wanted.matches(e))
                .filter(|e| !propagated(e))
                .map(|e| Holder {
                    pid,
                    mount_point: e.mount_point.clone(),
                }),
        );
    }
    Ok(holders)
}

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

/// Whether `/proc` (at `proc`) shows every process of the host. In a PID namespace of its own (the managed
/// plugin, a daemon inside a container) it shows only that namespace's processes, and a scan that finds
/// no holder there proves nothing. kthreadd, PID 2, exists only in the host's PID namespace.
fn sees_every_process(proc: &Path) -> bool {
    std::fs::read_to_string(proc.join("2/comm")).is_ok_and(|c| c.trim() == "kthreadd")
}

/// Every mount of `storage` in the other mount namespaces of the host.
pub fn find(storage: Storage<'_>) -> Result<Vec<Holder>, MountError> {
    if !sees_every_process(Path::new("/proc")) {
        return Err(MountError::PartialView);
    }
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
    // One process per mount namespace other than ours; processes come and go while we look, and one that is
    // gone holds nothing.
    let mut seen: HashSet<PathBuf> = namespace_of("self").into_iter().collect();
    let mut others = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Some(ns) = namespace_of(&pid.to_string()) else {
            continue;
        };
        if !seen.insert(ns) {
            continue;
        }
        if let Ok(table) =
            MountTable::read(&Path::new("/proc").join(pid.to_string()).join("mountinfo"))
        {
            others.push((pid, table));
        }
    }
    Ok(holders_among(&wanted, &own, &others))
}

/// The mounts of `wanted` in the other namespaces' tables that are not copies of Ferry's own (`own`).
fn holders_among(wanted: &Wanted, own: &MountTable, others: &[(u32, MountTable)]) -> Vec<Holder> {
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
    others
        .iter()
        .flat_map(|(pid, table)| {
            table
                .entries()
                .iter()
                .filter(|e| wanted.matches(e))
                .filter(|e| !propagated(e))
                .map(|e| Holder {
                    pid: *pid,
                    mount_point: e.mount_point.clone(),
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ferry's namespace: a capped volume's ext4 on loop3 (peer group 50), and the host filesystem that
    /// holds plain volumes' directories.
    const OWN: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
98 22 7:3 / /var/lib/ferry/local/v/data rw,relatime shared:50 - ext4 /dev/loop3 rw
";

    fn table(text: &str) -> MountTable {
        MountTable::parse(text)
    }

    #[test]
    fn only_the_host_pid_namespace_sees_every_process() {
        assert!(
            sees_every_process(Path::new("/proc")),
            "tests run on the host"
        );
        let fake = tempfile::tempdir().unwrap();
        std::fs::create_dir(fake.path().join("2")).unwrap();
        std::fs::write(fake.path().join("2/comm"), "sleep\n").unwrap();
        assert!(!sees_every_process(fake.path()));
        std::fs::write(fake.path().join("2/comm"), "kthreadd\n").unwrap();
        assert!(sees_every_process(fake.path()));
    }

    #[test]
    fn containers_hold_and_propagated_copies_do_not() {
        let image = Wanted {
            devices: vec![(7, 3)],
            root: PathBuf::from("/"),
        };
        let others = vec![
            // A system service's private namespace: a slave copy at the same path.
            (
                10,
                table("30 29 7:3 / /var/lib/ferry/local/v/data rw master:50 - ext4 /dev/loop3 rw\n"),
            ),
            // The host's view of a managed plugin's mount: a peer.
            (
                11,
                table("31 29 7:3 / /var/lib/docker/plugins/x/propagated-mount/v rw shared:50 - ext4 /dev/loop3 rw\n"),
            ),
            // A container: a private mount at its own path.
            (12, table("40 39 7:3 / /data rw,relatime - ext4 /dev/loop3 rw\n")),
            // A container made with rslave propagation: a slave, but at its own path.
            (13, table("41 39 7:3 / /srv rw master:50 - ext4 /dev/loop3 rw\n")),
            // Another volume.
            (14, table("42 39 7:4 / /data rw - ext4 /dev/loop4 rw\n")),
        ];
        let found = holders_among(&image, &table(OWN), &others);
        let pids: Vec<u32> = found.iter().map(|h| h.pid).collect();
        assert_eq!(pids, [12, 13]);
        assert_eq!(found[0].to_string(), "pid 12 at /data");
    }

    #[test]
    fn a_plain_directory_is_held_where_it_or_a_directory_inside_is_bound() {
        let dir = Wanted {
            devices: vec![(254, 0)],
            root: PathBuf::from("/var/lib/ferry/local/p/data"),
        };
        let others = vec![
            // Every namespace has the host filesystem somewhere; that is not the volume.
            (20, table("50 1 254:0 / / rw - ext4 /dev/vda rw\n")),
            (
                21,
                table("51 50 254:0 /var/lib/ferry/local/p/data /data rw - ext4 /dev/vda rw\n"),
            ),
            (
                22,
                table("52 50 254:0 /var/lib/ferry/local/p/data/sub /x rw - ext4 /dev/vda rw\n"),
            ),
            // A sibling volume whose name starts the same.
            (
                23,
                table("53 50 254:0 /var/lib/ferry/local/p/data2 /y rw - ext4 /dev/vda rw\n"),
            ),
        ];
        let pids: Vec<u32> = holders_among(&dir, &table(OWN), &others)
            .iter()
            .map(|h| h.pid)
            .collect();
        assert_eq!(pids, [21, 22]);
    }

    #[test]
    fn the_root_of_a_directory_comes_from_the_mount_that_holds_it() {
        let own = table(
            "22 1 254:0 / / rw - ext4 /dev/vda rw\n60 22 254:0 /srv/state /var/lib/ferry rw - ext4 /dev/vda rw\n",
        );
        let dir = tempfile::tempdir().unwrap();
        let w = directory_root(dir.path(), &own).unwrap();
        assert_eq!(w.devices.len(), 1);
        // A temporary directory is under `/`, or under a mount of its own; either way its root is a path
        // of its filesystem ending in the directory's own name.
        assert!(
            w.root.ends_with(dir.path().file_name().unwrap()),
            "{:?}",
            w.root
        );
    }
}

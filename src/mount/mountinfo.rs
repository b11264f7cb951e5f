//! Parsing `/proc/self/mountinfo`, the kernel's own word on what is mounted where.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use super::MountError;

/// One line of mountinfo.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
    /// The device of the mounted filesystem (`st_dev` of files in it), as (major, minor).
    pub device: (u64, u64),
    /// Which directory of that filesystem is mounted here: `/` for a whole filesystem, the source
    /// directory's path inside its filesystem for a bind mount.
    pub root: PathBuf,
    /// The peer group this mount shares propagation with (`shared:N`), if any.
    pub shared: Option<u64>,
    /// The peer group this mount receives propagation from (`master:N`), if any.
    pub master: Option<u64>,
}

/// A snapshot of the mount table.
#[derive(Clone, Debug, Default)]
pub struct MountTable {
    entries: Vec<MountEntry>,
}

/// Undoes the kernel's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

impl MountTable {
    pub fn read_self() -> Result<Self, MountError> {
        Self::read(Path::new("/proc/self/mountinfo"))
    }

    /// Reads a mountinfo file, such as `/proc/PID/mountinfo` of a process in another mount namespace.
    pub fn read(path: &Path) -> Result<Self, MountError> {
        let text = std::fs::read_to_string(path).map_err(MountError::MountTable)?;
        Ok(Self::parse(&text))
    }

    /// Parses mountinfo text; malformed lines are skipped rather than trusted.
    pub fn parse(text: &str) -> Self {
        let entries = text
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                // Optional fields end at the "-" separator; fstype and source follow it.
                let sep = fields.iter().position(|f| *f == "-")?;
                if sep < 6 || fields.len() < sep + 3 {
                    return None;
                }
                let (major, minor) = fields[2].split_once(':')?;
                let tag = |name: &str| {
                    fields[6..sep]
                        .iter()
                        .find_map(|f| f.strip_prefix(name)?.parse().ok())
                };
                let (shared, master) = (tag("shared:"), tag("master:"));
                Some(MountEntry {
                    mount_point: PathBuf::from(OsString::from_vec(unescape(fields[4]))),
                    fstype: fields[sep + 1].to_string(),
                    source: String::from_utf8_lossy(&unescape(fields[sep + 2])).into_owned(),
                    device: (major.parse().ok()?, minor.parse().ok()?),
                    root: PathBuf::from(OsString::from_vec(unescape(fields[3]))),
                    shared,
                    master,
                })
            })
            .collect();
        MountTable { entries }
    }

    pub fn from_entries(entries: Vec<MountEntry>) -> Self {
        MountTable { entries }
    }

    /// The topmost mount on exactly this path, if any.
    pub fn find(&self, path: &Path) -> Option<&MountEntry> {
        self.entries.iter().rev().find(|e| e.mount_point == path)
    }

    pub fn is_mounted(&self, path: &Path) -> bool {
        self.find(path).is_some()
    }

    pub fn entries(&self) -> &[MountEntry] {
        &self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
98 22 7:3 / /var/lib/ferry/local/volumes/v1/data rw,relatime shared:50 - ext4 /dev/loop3 rw
99 22 7:4 / /var/lib/ferry/local/volumes/with\\040space/data rw - xfs /dev/loop4 rw,attr2
100 22 0:55 / /mnt/x rw master:3 unbindable - fuse.ferry ferry rw
garbage line
";

    #[test]
    fn parses_mountinfo() {
        let t = MountTable::parse(SAMPLE);
        assert_eq!(t.entries().len(), 4);
        let e = t
            .find(Path::new("/var/lib/ferry/local/volumes/v1/data"))
            .unwrap();
        assert_eq!(e.fstype, "ext4");
        assert_eq!(e.source, "/dev/loop3");
        assert_eq!(e.device, (7, 3));
        assert_eq!(e.root, Path::new("/"));
        assert_eq!(e.shared, Some(50));
        let x = t.find(Path::new("/mnt/x")).unwrap();
        assert_eq!((x.device, x.shared, x.master), ((0, 55), None, Some(3)));
        assert!(t.is_mounted(Path::new("/var/lib/ferry/local/volumes/with space/data")));
        assert_eq!(t.find(Path::new("/mnt/x")).unwrap().fstype, "fuse.ferry");
        assert!(!t.is_mounted(Path::new("/var/lib/ferry")));
    }

    #[test]
    fn reads_real_table() {
        let t = MountTable::read_self().unwrap();
        assert!(t.is_mounted(Path::new("/")));
    }
}

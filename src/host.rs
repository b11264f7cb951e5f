//! This host's identity as other hosts see it: in nfs "mounted elsewhere" markers and in ebs tags.
//!
//! A host is its `id`, a random 64-bit value made once and kept in the state directory (`STATE/host-id`);
//! the hostname rides along only so people can tell hosts apart. Hostnames are not identities: cloned
//! machines and containers often share one, and two Ferry daemons on one machine (separate state
//! directories) are two hosts. `/etc/machine-id` is not used for the same reason: clones share it, and
//! every daemon on a machine would share it. This module reads files only; it never talks to the network.

use std::fmt;
use std::io::{self, Read};
use std::path::Path;

/// The name of the file in the state directory that keeps this host's id.
pub const ID_FILE: &str = "host-id";

/// A Ferry host: its stable `id` (16 lowercase hex digits for ids Ferry made) and, for humans, its name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostId {
    /// The hostname when the id was read (`/proc/sys/kernel/hostname`); may be shared with other hosts.
    pub name: String,
    /// The identity: equal ids are one host, different ids are different hosts, whatever the names.
    pub id: String,
}

impl HostId {
    /// This host: the id from `STATE_DIR/host-id` (made the first time, written crash-safely) and the
    /// current hostname.
    pub fn load(state_dir: &Path) -> io::Result<HostId> {
        Ok(HostId {
            name: hostname(),
            id: load_id(&state_dir.join(ID_FILE))?,
        })
    }

    /// Whether `other` is this very host (same id; names are not compared).
    pub fn is(&self, other: &HostId) -> bool {
        self.id == other.id
    }
}

/// `node-1 (host id 0123456789abcdef)`; an empty name (an old marker without one) shows the id alone.
impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name.is_empty() {
            write!(f, "host id {}", self.id)
        } else {
            write!(f, "{} (host id {})", self.name, self.id)
        }
    }
}

/// The kernel's hostname, trimmed and at most 255 characters; `unknown` when it cannot be read.
pub fn hostname() -> String {
    let name: String = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .chars()
        .take(255)
        .collect();
    if name.is_empty() {
        "unknown".into()
    } else {
        name
    }
}

/// Reads the id kept at `path`, making a random one the first time (written atomically and durably, so a
/// crash never leaves a half-written id that would make this host someone else).
fn load_id(path: &Path) -> io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(s) if s.trim().len() >= 8 => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut raw = [0u8; 8];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
    let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    crate::durable::write_atomic(path, format!("{id}\n").as_bytes())?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = HostId::load(dir.path()).unwrap();
        assert_eq!(a.id.len(), 16);
        assert!(a.id.chars().all(|c| c.is_ascii_hexdigit()));
        let b = HostId::load(dir.path()).unwrap();
        assert_eq!(a, b);
        let other = tempfile::tempdir().unwrap();
        let c = HostId::load(other.path()).unwrap();
        // Same machine, same hostname, separate state: another host.
        assert_eq!(a.name, c.name);
        assert!(!a.is(&c));
    }

    #[test]
    fn display_names_the_host_and_its_id() {
        let h = HostId {
            name: "node-1".into(),
            id: "0123abcd0123abcd".into(),
        };
        assert_eq!(h.to_string(), "node-1 (host id 0123abcd0123abcd)");
        let bare = HostId {
            name: String::new(),
            id: "0123abcd".into(),
        };
        assert_eq!(bare.to_string(), "host id 0123abcd");
    }
}

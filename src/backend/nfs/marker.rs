//! Host markers: each host that has a volume mounted keeps a small file in the export, at
//! `.ferry/mounts/<volume directory>/<host id>`, and refreshes it regularly. Remove on any host refuses
//! while a fresh marker of another host exists. A host that died stops refreshing, and its marker is
//! ignored once it is older than `STALE_AFTER` by the server's clock, so a crash never blocks a volume
//! forever. Times are the server's own (file modification times), never compared with a local clock.

use std::time::{Duration, SystemTime};

use crate::host::HostId;
use crate::nfs::{NfsClient, NfsError};

/// Where markers live, at the top of the export.
pub const AREA: &str = ".ferry";
/// How often a mounting host rewrites its marker.
pub const REFRESH_EVERY: Duration = Duration::from_secs(10);
/// How old a marker may be before it no longer counts: several missed refreshes.
pub const STALE_AFTER: Duration = Duration::from_secs(60);

/// The directory of a volume's markers: its path in the export, with `/` and `%` escaped so that every
/// volume directory maps to one file name.
pub fn dir_for(volume_dir: &str) -> String {
    let key: String = volume_dir
        .chars()
        .map(|c| match c {
            '%' => "%25".to_string(),
            '/' => "%2F".to_string(),
            c => c.to_string(),
        })
        .collect();
    format!("{AREA}/mounts/{key}")
}

/// A marker's content: which host, for people reading the export and for the refusal message. The file's
/// name is the host's id; the content repeats it with the hostname, which only people need.
pub fn content(host: &HostId, volume: &str) -> String {
    format!(
        "ferry-marker 1\nhost_id={}\nhostname={}\nvolume={volume}\n",
        host.id, host.name
    )
}

/// The host a marker file names. The file name is the id and decides; the hostname comes from the
/// content, and is empty when the content is not a marker of ours or has none (such a marker still
/// counts, by its id).
pub fn holder_of(file_name: &str, content: &[u8]) -> HostId {
    let name = std::str::from_utf8(content)
        .ok()
        .filter(|t| t.starts_with("ferry-marker "))
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("hostname=")))
        .map(|h| h.chars().filter(|c| !c.is_control()).take(255).collect())
        .unwrap_or_default();
    HostId {
        name,
        id: file_name.to_string(),
    }
}

/// Whether a marker last written at `written` still counts at server time `now`. A marker from the
/// future (clock steps on the server) counts: refusing a Remove is the safe side.
pub fn is_fresh(written: SystemTime, now: SystemTime) -> bool {
    match now.duration_since(written) {
        Ok(age) => age <= STALE_AFTER,
        Err(_) => true,
    }
}

/// Another host that still has a volume mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub host: HostId,
    pub age: Duration,
}

/// Makes the marker directory of a volume.
async fn ensure_dirs(client: &NfsClient, dir: &str) -> Result<(), NfsError> {
    client.ensure_dir(AREA, 0, 0, 0o755).await?;
    client
        .ensure_dir(&format!("{AREA}/mounts"), 0, 0, 0o755)
        .await?;
    client.ensure_dir(dir, 0, 0, 0o755).await?;
    Ok(())
}

/// Writes (or refreshes) this host's marker for a volume directory.
pub async fn write(
    client: &NfsClient,
    volume_dir: &str,
    host_id: &str,
    body: &str,
) -> Result<(), NfsError> {
    let dir = dir_for(volume_dir);
    ensure_dirs(client, &dir).await?;
    client
        .write_file(&format!("{dir}/{host_id}"), body.as_bytes())
        .await
}

/// Deletes this host's marker.
pub async fn remove(client: &NfsClient, volume_dir: &str, host_id: &str) -> Result<(), NfsError> {
    client
        .remove_file(&format!("{}/{host_id}", dir_for(volume_dir)))
        .await
        .map(|_| ())
}

/// The server's current time: the modification time of a file this host has just written.
async fn server_now(client: &NfsClient, host_id: &str) -> Result<SystemTime, NfsError> {
    client.ensure_dir(AREA, 0, 0, 0o755).await?;
    client
        .ensure_dir(&format!("{AREA}/clock"), 0, 0, 0o755)
        .await?;
    let probe = format!("{AREA}/clock/{host_id}");
    client.write_file(&probe, b"clock probe\n").await?;
    Ok(client.getattr(&probe).await?.mtime)
}

/// Other hosts whose markers for the volume directory are fresh.
pub async fn holders(
    client: &NfsClient,
    volume_dir: &str,
    host_id: &str,
) -> Result<Vec<Holder>, NfsError> {
    let dir = dir_for(volume_dir);
    let names = match client.readdir(&dir).await {
        Ok(names) => names,
        Err(e) if e.is_not_found() => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let others: Vec<String> = names.into_iter().filter(|n| n != host_id).collect();
    if others.is_empty() {
        return Ok(Vec::new());
    }
    let now = server_now(client, host_id).await?;
    let mut out = Vec::new();
    for other in others {
        let path = format!("{dir}/{other}");
        let attrs = match client.getattr(&path).await {
            Ok(a) => a,
            // Removed meanwhile: that host unmounted.
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e),
        };
        if !is_fresh(attrs.mtime, now) {
            continue;
        }
        let body = client.read_file(&path).await.unwrap_or_default();
        out.push(Holder {
            host: holder_of(&other, &body),
            age: now.duration_since(attrs.mtime).unwrap_or_default(),
        });
    }
    Ok(out)
}

/// Deletes a volume directory's whole marker area (after Remove).
pub async fn forget(client: &NfsClient, volume_dir: &str) -> Result<(), NfsError> {
    client.remove_tree(&dir_for(volume_dir)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_directories_are_one_name_per_volume_directory() {
        assert_eq!(dir_for("db"), ".ferry/mounts/db");
        assert_eq!(dir_for("projects/a"), ".ferry/mounts/projects%2Fa");
        assert_eq!(dir_for("50%/a"), ".ferry/mounts/50%25%2Fa");
        assert_ne!(dir_for("a%2Fb"), dir_for("a/b"));
    }

    #[test]
    fn content_round_trip() {
        let me = HostId {
            name: "node-1".into(),
            id: "0123abcd0123abcd".into(),
        };
        let c = content(&me, "db");
        assert_eq!(holder_of("0123abcd0123abcd", c.as_bytes()), me);
        // The file name decides who holds it, whatever the content claims.
        assert_eq!(
            holder_of("ffff0000ffff0000", c.as_bytes()).id,
            "ffff0000ffff0000"
        );
        let bare = holder_of("0123abcd", b"something else");
        assert_eq!((bare.name.as_str(), bare.id.as_str()), ("", "0123abcd"));
    }

    #[test]
    fn markers_of_earlier_versions_are_read() {
        // Written by Ferry before `HostId`: same layout, possibly without a hostname line.
        let old = b"ferry-marker 1\nhost_id=a1b2c3d4e5f60718\nhostname=node-1\nvolume=db\n";
        let h = holder_of("a1b2c3d4e5f60718", old);
        assert_eq!(h.to_string(), "node-1 (host id a1b2c3d4e5f60718)");
        let nameless = holder_of("a1b2c3d4e5f60718", b"ferry-marker 1\nvolume=db\n");
        assert_eq!(nameless.to_string(), "host id a1b2c3d4e5f60718");
    }

    #[test]
    fn freshness_by_server_time() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert!(is_fresh(t, t + Duration::from_secs(5)));
        assert!(is_fresh(t, t + STALE_AFTER));
        assert!(!is_fresh(t, t + STALE_AFTER + Duration::from_secs(1)));
        assert!(is_fresh(t + Duration::from_secs(30), t));
    }
}

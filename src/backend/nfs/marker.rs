//! Host markers: each host that has a volume mounted keeps a small file in the export, at
//! `.ferry/mounts/<volume directory>/<host id>`, and refreshes it regularly. Remove on any host refuses
//! while a fresh marker of another host exists. A host that died stops refreshing, and its marker is
//! ignored once it is older than `STALE_AFTER` by the server's clock, so a crash never blocks a volume
//! forever. Times are the server's own (file modification times), never compared with a local clock.

use std::time::{Duration, SystemTime};

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

/// A marker's content: which host, for people reading the export and for the refusal message.
pub fn content(host_id: &str, hostname: &str, volume: &str) -> String {
    format!("ferry-marker 1\nhost_id={host_id}\nhostname={hostname}\nvolume={volume}\n")
}

/// The host name a marker names, if it is one of ours.
pub fn hostname_in(content: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(content).ok()?;
    if !text.starts_with("ferry-marker ") {
        return None;
    }
    text.lines()
        .find_map(|l| l.strip_prefix("hostname="))
        .map(|h| h.chars().take(255).collect())
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
    pub host_id: String,
    pub hostname: Option<String>,
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
        let hostname = client
            .read_file(&path)
            .await
            .ok()
            .and_then(|c| hostname_in(&c));
        out.push(Holder {
            host_id: other,
            hostname,
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
        let c = content("0123abcd", "node-1", "db");
        assert_eq!(hostname_in(c.as_bytes()).as_deref(), Some("node-1"));
        assert_eq!(hostname_in(b"something else"), None);
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

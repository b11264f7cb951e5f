//! The `ferry:mounted:HOST_ID` tags: the value a host writes on the snapshot its mounted copy is based
//! on, and what the tags found on a volume's snapshots say about another host still using it, which is
//! how a Remove learns it without a shared catalog.
//!
//! Pure: the time comes in as seconds since the epoch. Writing, refreshing and clearing the tag is the
//! backend's (`mod.rs`), which knows what is mounted here.

use std::time::Duration;

use super::client::SnapshotInfo;
use crate::backend::BackendError;

/// A `ferry:mounted` tag older than this no longer counts: its host stopped (crashed, or lost AWS).
/// Four refreshes, so one or two failed CreateTags calls never make a mounted volume look idle.
pub const MOUNTED_STALE: Duration = Duration::from_secs(120);

/// The value of a `ferry:mounted` tag: when, and which host (by id and by name).
pub(super) fn tag_value(host_id: &str, hostname: &str, at: u64) -> String {
    format!("{at} {host_id} {hostname}")
}

/// (written at, host id, hostname) of a `ferry:mounted` tag; `None` if it is not one Ferry wrote.
fn parse(value: &str) -> Option<(u64, &str, &str)> {
    let mut parts = value.splitn(3, ' ');
    let at = parts.next()?.parse().ok()?;
    let id = parts.next().filter(|s| !s.is_empty())?;
    Some((at, id, parts.next().unwrap_or("")))
}

/// Whether a `ferry:mounted` tag still counts at `now`: a host has the volume mounted on that snapshot.
pub(super) fn fresh(value: &str, now: u64) -> bool {
    parse(value).is_some_and(|(at, _, _)| now.saturating_sub(at) < MOUNTED_STALE.as_secs())
}

/// The freshest `ferry:mounted` tag of another host than `host_id` on any of the volume's snapshots, as
/// the error that refuses a Remove; `None` if no other host tagged it within `MOUNTED_STALE` of `now`.
pub(super) fn elsewhere(
    snapshots: &[(String, SnapshotInfo)],
    host_id: &str,
    now: u64,
) -> Option<BackendError> {
    snapshots
        .iter()
        .flat_map(|(_, s)| s.mounted.iter().filter_map(|m| parse(m)))
        .filter(|(_, id, _)| *id != host_id)
        .filter(|(at, _, _)| now.saturating_sub(*at) < MOUNTED_STALE.as_secs())
        .max_by_key(|(at, _, _)| *at)
        .map(|(at, id, hostname)| BackendError::MountedElsewhere {
            host: format!("{hostname} [ferry host id {id}]"),
            age_secs: now.saturating_sub(at),
            stale_secs: MOUNTED_STALE.as_secs(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ebs::client::SnapState;

    #[test]
    fn mounted_tags_round_trip_and_refuse_garbage() {
        let tag = tag_value("0123abcd", "node 1", 1_700_000_000);
        assert_eq!(parse(&tag), Some((1_700_000_000, "0123abcd", "node 1")));
        assert_eq!(parse("soon 0123abcd node"), None);
        assert_eq!(parse("12"), None);
        assert_eq!(parse(""), None);
    }

    fn tagged(id: &str, mounted: Option<String>) -> (String, SnapshotInfo) {
        let mounted: Vec<String> = mounted.into_iter().collect();
        let info = SnapshotInfo {
            id: id.into(),
            state: SnapState::Completed,
            generation: 1,
            parent: None,
            host: "h".into(),
            options: Default::default(),
            mounted,
            started: None,
            blocks: None,
            pulling: None,
        };
        (id.into(), info)
    }

    #[test]
    fn only_another_hosts_fresh_tag_refuses_a_remove() {
        let now = 1_700_000_000;
        let stale = MOUNTED_STALE.as_secs();
        let here = |at| Some(tag_value("me", "this", at));
        let there = |at| Some(tag_value("them", "node 2", at));
        let holder = |snaps: &[(String, SnapshotInfo)]| match elsewhere(snaps, "me", now) {
            Some(BackendError::MountedElsewhere { host, age_secs, .. }) => Some((host, age_secs)),
            Some(other) => panic!("{other}"),
            None => None,
        };
        assert_eq!(holder(&[]), None);
        assert_eq!(holder(&[tagged("a", None)]), None);
        // This host's own tag never refuses its own Remove.
        assert_eq!(holder(&[tagged("a", here(now))]), None);
        // A tag Ferry did not write is not evidence.
        assert_eq!(holder(&[tagged("a", Some("garbage".into()))]), None);
        assert_eq!(
            holder(&[tagged("a", there(now - 5))]),
            Some(("node 2 [ferry host id them]".into(), 5))
        );
        // Stale from MOUNTED_STALE on: the host stopped refreshing it.
        assert_eq!(holder(&[tagged("a", there(now - stale))]), None);
        assert_eq!(
            holder(&[tagged("a", there(now - stale + 1))]),
            Some(("node 2 [ferry host id them]".into(), stale - 1))
        );
        // The freshest tag is reported, on whichever snapshot it is.
        assert_eq!(
            holder(&[
                tagged("a", there(now - 60)),
                tagged("b", there(now - 2)),
                tagged("c", here(now))
            ]),
            Some(("node 2 [ferry host id them]".into(), 2))
        );
        // A clock behind the tag's counts it as just written.
        assert_eq!(
            holder(&[tagged("a", there(now + 30))]),
            Some(("node 2 [ferry host id them]".into(), 0))
        );
    }
}

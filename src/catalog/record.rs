//! The catalog's on-disk form of a volume record, kept apart from the in-memory `VolumeRecord` so that
//! the types the code works with can change without changing what is on disk, and a record written by one
//! release is read by the next.
//!
//! Format 1 is the JSON every release so far has written: the spec as a flat object of options (absent
//! options `null` or left out), with no format key; from now on records carry `"v":1`. A record with a
//! format this release does not know is refused, never guessed at. The fixtures in the tests are records
//! exactly as earlier releases wrote them; they must keep decoding.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Shipped, VolumeRecord, VolumeState};
use crate::spec::{BackendKind, BackendSpec, Cap, FsType, VolumeSpec};

/// The newest format this release reads and the one it writes.
pub const FORMAT: u32 = 1;

/// Format 1 of a record.
#[derive(Serialize, Deserialize)]
struct StoredRecord {
    /// Absent in records written before formats were numbered, which are format 1.
    #[serde(rename = "v", default = "format_one")]
    format: u32,
    name: String,
    spec: StoredSpec,
    created_at: u64,
    state: VolumeState,
    mounts: BTreeMap<String, u32>,
    mountpoint: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    shipped: Option<StoredShipped>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    dead_mounts: BTreeSet<String>,
}

fn format_one() -> u32 {
    1
}

/// Format 1 of a spec: every option of every backend, flat.
#[derive(Serialize, Deserialize)]
struct StoredSpec {
    backend: BackendKind,
    size: Option<u64>,
    fs: Option<FsType>,
    uid: Option<u32>,
    gid: Option<u32>,
    mode: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    server: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    export: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subdir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    checkpoint: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    preallocate: bool,
    /// nfs `access=single`; absent for shared volumes, so their records keep the earlier bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct StoredShipped {
    snapshot: String,
    generation: u64,
}

/// The bytes of `record` in the current format.
pub fn encode(record: &VolumeRecord) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&StoredRecord::from(record))
}

/// A record from its stored bytes; the error says why they are not a record this release can use.
pub fn decode(bytes: &[u8]) -> Result<VolumeRecord, String> {
    // The format is read first, so a newer record is named as such instead of failing on a field.
    #[derive(Deserialize)]
    struct Format {
        #[serde(rename = "v", default = "format_one")]
        format: u32,
    }
    let Format { format } = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if format != FORMAT {
        return Err(format!(
            "record format {format} is not known to this release (it reads format {FORMAT}); it was written by a newer Ferry: upgrade this host"
        ));
    }
    let stored: StoredRecord = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    stored.try_into()
}

impl From<&VolumeRecord> for StoredRecord {
    fn from(r: &VolumeRecord) -> Self {
        let spec = &r.spec;
        let (server, export, subdir) = match spec.nfs() {
            Some((server, export, subdir)) => (
                Some(server.to_string()),
                Some(export.to_string()),
                subdir.map(str::to_string),
            ),
            None => (None, None, None),
        };
        StoredRecord {
            format: FORMAT,
            name: r.name.clone(),
            spec: StoredSpec {
                backend: spec.kind(),
                size: spec.size(),
                fs: spec.fs(),
                uid: spec.uid,
                gid: spec.gid,
                mode: spec.mode,
                server,
                export,
                subdir,
                checkpoint: spec.checkpoint(),
                preallocate: spec.preallocate(),
                access: spec.single_writer_nfs().then(|| "single".to_string()),
            },
            created_at: r.created_at,
            state: r.state,
            mounts: r.mounts.clone(),
            mountpoint: r.mountpoint.clone(),
            shipped: r.shipped.as_ref().map(|s| StoredShipped {
                snapshot: s.snapshot.clone(),
                generation: s.generation,
            }),
            dead_mounts: r.dead_mounts.clone(),
        }
    }
}

impl TryFrom<StoredRecord> for VolumeRecord {
    type Error = String;

    fn try_from(r: StoredRecord) -> Result<Self, String> {
        let s = r.spec;
        let backend = match (s.backend, s.size, s.server, s.export) {
            (BackendKind::Local, None, ..) => BackendSpec::Local { cap: None },
            (BackendKind::Local, Some(size), ..) => BackendSpec::Local {
                cap: Some(Cap {
                    size,
                    fs: s.fs.unwrap_or(FsType::Ext4),
                    preallocate: s.preallocate,
                }),
            },
            (BackendKind::Nfs, _, Some(server), Some(export)) => BackendSpec::Nfs {
                server,
                export,
                subdir: s.subdir,
                single: s.access.as_deref() == Some("single"),
            },
            (BackendKind::Nfs, ..) => {
                return Err("an nfs volume without its server and export".into())
            }
            (BackendKind::Ebs, Some(size), ..) => BackendSpec::Ebs {
                size,
                fs: s.fs.unwrap_or(FsType::Ext4),
                checkpoint: s.checkpoint,
            },
            (BackendKind::Ebs, None, ..) => return Err("an ebs volume without a size".into()),
        };
        Ok(VolumeRecord {
            name: r.name,
            spec: VolumeSpec {
                uid: s.uid,
                gid: s.gid,
                mode: s.mode,
                backend,
            },
            created_at: r.created_at,
            state: r.state,
            mounts: r.mounts,
            mountpoint: r.mountpoint,
            shipped: r.shipped.map(|s| Shipped {
                snapshot: s.snapshot,
                generation: s.generation,
            }),
            dead_mounts: r.dead_mounts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records byte for byte as the release before this module wrote them (no format key).
    const WRITTEN_BEFORE: &[&str] = &[
        r#"{"name":"plain","spec":{"backend":"local","size":null,"fs":null,"uid":null,"gid":null,"mode":null},"created_at":1765000000,"state":"ready","mounts":{},"mountpoint":null}"#,
        r#"{"name":"capped","spec":{"backend":"local","size":33554432,"fs":"xfs","uid":1000,"gid":1000,"mode":488,"preallocate":true},"created_at":1765000001,"state":"ready","mounts":{"abc":2},"mountpoint":"/var/lib/ferry/mounts/capped"}"#,
        r#"{"name":"share","spec":{"backend":"nfs","size":null,"fs":null,"uid":33,"gid":null,"mode":null,"server":"10.0.0.5","export":"/srv/nfs","subdir":"projects/a"},"created_at":1765000002,"state":"attaching","mounts":{"m1":1},"mountpoint":null,"dead_mounts":["m1"]}"#,
        r#"{"name":"db","spec":{"backend":"ebs","size":1073741824,"fs":"ext4","uid":null,"gid":null,"mode":null,"checkpoint":300},"created_at":1765000003,"state":"detaching","mounts":{},"mountpoint":null,"shipped":{"snapshot":"snap-0123","generation":7}}"#,
    ];

    fn expected() -> Vec<VolumeRecord> {
        let record = |name: &str, spec: VolumeSpec, created_at, state| VolumeRecord {
            name: name.into(),
            spec,
            created_at,
            state,
            mounts: BTreeMap::new(),
            mountpoint: None,
            shipped: None,
            dead_mounts: BTreeSet::new(),
        };
        let plain = record(
            "plain",
            VolumeSpec {
                uid: None,
                gid: None,
                mode: None,
                backend: BackendSpec::Local { cap: None },
            },
            1765000000,
            VolumeState::Ready,
        );
        let mut capped = record(
            "capped",
            VolumeSpec {
                uid: Some(1000),
                gid: Some(1000),
                mode: Some(0o750),
                backend: BackendSpec::Local {
                    cap: Some(Cap {
                        size: 32 << 20,
                        fs: FsType::Xfs,
                        preallocate: true,
                    }),
                },
            },
            1765000001,
            VolumeState::Ready,
        );
        capped.mounts.insert("abc".into(), 2);
        capped.mountpoint = Some("/var/lib/ferry/mounts/capped".into());
        let mut share = record(
            "share",
            VolumeSpec {
                uid: Some(33),
                gid: None,
                mode: None,
                backend: BackendSpec::Nfs {
                    server: "10.0.0.5".into(),
                    export: "/srv/nfs".into(),
                    subdir: Some("projects/a".into()),
                    single: false,
                },
            },
            1765000002,
            VolumeState::Attaching,
        );
        share.mounts.insert("m1".into(), 1);
        share.dead_mounts.insert("m1".into());
        let mut db = record(
            "db",
            VolumeSpec {
                uid: None,
                gid: None,
                mode: None,
                backend: BackendSpec::Ebs {
                    size: 1 << 30,
                    fs: FsType::Ext4,
                    checkpoint: Some(300),
                },
            },
            1765000003,
            VolumeState::Detaching,
        );
        db.shipped = Some(Shipped {
            snapshot: "snap-0123".into(),
            generation: 7,
        });
        vec![plain, capped, share, db]
    }

    #[test]
    fn records_written_by_the_previous_release_are_read() {
        for (bytes, want) in WRITTEN_BEFORE.iter().zip(expected()) {
            assert_eq!(decode(bytes.as_bytes()).unwrap(), want, "{bytes}");
        }
    }

    #[test]
    fn records_are_written_as_before_plus_the_format() {
        for (bytes, record) in WRITTEN_BEFORE.iter().zip(expected()) {
            let written = String::from_utf8(encode(&record).unwrap()).unwrap();
            assert_eq!(written, format!("{{\"v\":1,{}", &bytes[1..]));
            assert_eq!(decode(written.as_bytes()).unwrap(), record);
        }
    }

    #[test]
    fn unknown_formats_and_broken_records_are_refused_with_the_reason() {
        let newer = WRITTEN_BEFORE[0].replacen('{', "{\"v\":2,", 1);
        let err = decode(newer.as_bytes()).unwrap_err();
        assert!(err.contains("format 2") && err.contains("upgrade"), "{err}");
        let ebs = r#"{"name":"db","spec":{"backend":"ebs","size":null,"fs":null,"uid":null,"gid":null,"mode":null},"created_at":1,"state":"ready","mounts":{},"mountpoint":null}"#;
        assert_eq!(
            decode(ebs.as_bytes()).unwrap_err(),
            "an ebs volume without a size"
        );
        let nfs = r#"{"name":"s","spec":{"backend":"nfs","size":null,"fs":null,"uid":null,"gid":null,"mode":null},"created_at":1,"state":"ready","mounts":{},"mountpoint":null}"#;
        assert!(decode(nfs.as_bytes()).unwrap_err().contains("server"));
        assert!(decode(b"{").is_err());
    }
}

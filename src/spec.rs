//! `VolumeSpec`: the typed, validated form of a volume's name and options.
//!
//! Everything Docker sends is untrusted. This module is the door: a name or an option that passes here is
//! safe to build a path from and meaningful to every backend. It must not touch the filesystem or know about
//! HTTP.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest volume name accepted, in bytes (a file name on every Linux filesystem).
pub const MAX_NAME_LEN: usize = 255;

/// Every option key a volume accepts, in the order error messages list them.
pub const OPTION_KEYS: &[&str] = &["backend", "size", "fs", "uid", "gid", "mode"];

/// The smallest `size` accepted: smaller images cannot hold a journal and useful data.
pub const MIN_SIZE: u64 = 16 << 20;
/// xfs refuses to make filesystems smaller than 300 MiB.
pub const MIN_XFS_SIZE: u64 = 300 << 20;
/// The largest `size` accepted; images are sparse, so this bounds mistakes, not disk use.
pub const MAX_SIZE: u64 = 64 << 40;

/// Why a name or an option was refused. Messages never echo values of unknown keys, which may be secrets.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("volume name is empty; use letters, digits, '_', '.' or '-', starting with a letter or digit")]
    EmptyName,
    #[error("volume name is {0} bytes long; the limit is {MAX_NAME_LEN}")]
    NameTooLong(usize),
    #[error(
        "invalid volume name {0:?}: use only letters, digits, '_', '.' or '-', starting with a letter or digit"
    )]
    BadName(String),
    #[error("unknown option {key:?}; valid options are: {}", OPTION_KEYS.join(", "))]
    UnknownOption { key: String },
    #[error("invalid value {value:?} for option {key:?}: {expected}")]
    BadValue {
        key: &'static str,
        value: String,
        expected: String,
    },
    #[error(
        "option \"fs\" needs option \"size\": only size-capped volumes have their own filesystem"
    )]
    FsWithoutSize,
}

/// Which backend stores a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Local,
}

impl BackendKind {
    /// Every backend this build knows, for error messages.
    pub const ALL: &'static [BackendKind] = &[BackendKind::Local];

    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Local => "local",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|b| b.as_str() == s)
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The filesystem made inside a size-capped volume image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ext4" => Some(FsType::Ext4),
            "xfs" => Some(FsType::Xfs),
            _ => None,
        }
    }
}

/// Defaults that fill in options a user left out; they come from the configuration.
#[derive(Clone, Debug)]
pub struct SpecDefaults {
    pub backend: BackendKind,
    pub fs: FsType,
}

impl Default for SpecDefaults {
    fn default() -> Self {
        SpecDefaults {
            backend: BackendKind::Local,
            fs: FsType::Ext4,
        }
    }
}

/// A volume's options after validation and normalisation: two specs are equal exactly when they ask for the
/// same volume, whatever spelling the user chose (`10G` and `10GiB`, `0755` and `755`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub backend: BackendKind,
    /// Size cap in bytes; `None` means an uncapped directory.
    pub size: Option<u64>,
    /// Set exactly when `size` is.
    pub fs: Option<FsType>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mode: Option<u32>,
}

/// Checks a volume name before any path is built from it.
pub fn validate_name(name: &str) -> Result<(), SpecError> {
    let bytes = name.as_bytes();
    let Some(first) = bytes.first() else {
        return Err(SpecError::EmptyName);
    };
    if bytes.len() > MAX_NAME_LEN {
        return Err(SpecError::NameTooLong(bytes.len()));
    }
    let tail_ok = bytes[1..]
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !first.is_ascii_alphanumeric() || !tail_ok {
        return Err(SpecError::BadName(name.chars().take(80).collect()));
    }
    Ok(())
}

fn bad(key: &'static str, value: &str, expected: &str) -> SpecError {
    SpecError::BadValue {
        key,
        value: value.chars().take(64).collect(),
        expected: expected.to_string(),
    }
}

/// Parses a size such as `512MiB`, `10G`, `1.5g` or `1048576`. Like Docker's own `--size` options, every
/// unit is binary: `G`, `GB` and `GiB` all mean 2^30 bytes.
pub fn parse_size(value: &str) -> Option<u64> {
    let v = value.trim();
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return None,
    };
    if num.is_empty() || num.matches('.').count() > 1 {
        return None;
    }
    let bytes = if num.contains('.') {
        let f: f64 = num.parse().ok()?;
        let b = f * (1u64 << shift) as f64;
        if !b.is_finite() || b > u64::MAX as f64 {
            return None;
        }
        b as u64
    } else {
        num.parse::<u64>().ok()?.checked_mul(1u64 << shift)?
    };
    Some(bytes)
}

/// Formats a byte count in the largest binary unit that divides it, so it parses back to the same number.
pub fn format_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes}B")
}

fn parse_id(key: &'static str, value: &str) -> Result<u32, SpecError> {
    value
        .trim()
        .parse::<u32>()
        .map_err(|_| bad(key, value, "expected a numeric id from 0 to 4294967295"))
}

impl VolumeSpec {
    /// Validates Docker's `Opts` (which may be absent) into a spec. Unknown keys and bad values are refused
    /// with an error naming the key.
    pub fn from_options(
        opts: Option<&BTreeMap<String, String>>,
        defaults: &SpecDefaults,
    ) -> Result<Self, SpecError> {
        let empty = BTreeMap::new();
        let opts = opts.unwrap_or(&empty);
        if let Some(key) = opts.keys().find(|k| !OPTION_KEYS.contains(&k.as_str())) {
            return Err(SpecError::UnknownOption {
                key: key.chars().take(64).collect(),
            });
        }
        let backend = match opts.get("backend") {
            None => defaults.backend,
            Some(v) => BackendKind::parse(v.trim()).ok_or_else(|| {
                let valid: Vec<_> = BackendKind::ALL.iter().map(|b| b.as_str()).collect();
                bad(
                    "backend",
                    v,
                    &format!("valid backends are: {}", valid.join(", ")),
                )
            })?,
        };
        let size = match opts.get("size") {
            None => None,
            Some(v) => {
                let bytes = parse_size(v)
                    .ok_or_else(|| bad("size", v, "expected a size such as 512MiB, 10G or 1TiB"))?;
                if !(MIN_SIZE..=MAX_SIZE).contains(&bytes) {
                    return Err(bad(
                        "size",
                        v,
                        &format!(
                            "must be between {} and {}",
                            format_size(MIN_SIZE),
                            format_size(MAX_SIZE)
                        ),
                    ));
                }
                Some(bytes)
            }
        };
        let fs = match (opts.get("fs"), size) {
            (Some(_), None) => return Err(SpecError::FsWithoutSize),
            (Some(v), Some(_)) => Some(
                FsType::parse(v.trim())
                    .ok_or_else(|| bad("fs", v, "valid filesystems are: ext4, xfs"))?,
            ),
            (None, Some(_)) => Some(defaults.fs),
            (None, None) => None,
        };
        if let (Some(FsType::Xfs), Some(bytes)) = (fs, size) {
            if bytes < MIN_XFS_SIZE {
                return Err(bad(
                    "size",
                    &format_size(bytes),
                    "xfs needs at least 300MiB; choose a larger size or fs=ext4",
                ));
            }
        }
        let uid = opts.get("uid").map(|v| parse_id("uid", v)).transpose()?;
        let gid = opts.get("gid").map(|v| parse_id("gid", v)).transpose()?;
        let mode = match opts.get("mode") {
            None => None,
            Some(v) => {
                let t = v.trim();
                let t = t.strip_prefix("0o").unwrap_or(t);
                let m = u32::from_str_radix(t, 8)
                    .ok()
                    .filter(|m| *m <= 0o7777 && !t.is_empty())
                    .ok_or_else(|| {
                        bad(
                            "mode",
                            v,
                            "expected an octal mode from 0 to 7777, such as 0755",
                        )
                    })?;
                Some(m)
            }
        };
        Ok(VolumeSpec {
            backend,
            size,
            fs,
            uid,
            gid,
            mode,
        })
    }

    /// The spec as canonical option strings, for display in `Status`.
    pub fn to_options(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        out.insert("backend".into(), self.backend.as_str().into());
        if let Some(s) = self.size {
            out.insert("size".into(), format_size(s));
        }
        if let Some(fs) = self.fs {
            out.insert("fs".into(), fs.as_str().into());
        }
        if let Some(u) = self.uid {
            out.insert("uid".into(), u.to_string());
        }
        if let Some(g) = self.gid {
            out.insert("gid".into(), g.to_string());
        }
        if let Some(m) = self.mode {
            out.insert("mode".into(), format!("{m:04o}"));
        }
        out
    }

    /// The first option whose value differs between two specs, for the error on a conflicting Create.
    pub fn first_difference(&self, other: &VolumeSpec) -> Option<&'static str> {
        if self.backend != other.backend {
            return Some("backend");
        }
        if self.size != other.size {
            return Some("size");
        }
        if self.fs != other.fs {
            return Some("fs");
        }
        if self.uid != other.uid {
            return Some("uid");
        }
        if self.gid != other.gid {
            return Some("gid");
        }
        if self.mode != other.mode {
            return Some("mode");
        }
        None
    }
}

/// True for option keys whose values must never be shown (passwords, tokens, keys).
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["pass", "secret", "token", "key", "credential", "auth"]
        .iter()
        .any(|s| k.contains(s))
}

/// Replaces the values of secret-looking keys, for Status and logs.
pub fn redact(opts: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    opts.iter()
        .map(|(k, v)| {
            let v = if is_secret_key(k) {
                "<redacted>".to_string()
            } else {
                v.clone()
            };
            (k.clone(), v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn spec(pairs: &[(&str, &str)]) -> Result<VolumeSpec, SpecError> {
        VolumeSpec::from_options(Some(&opts(pairs)), &SpecDefaults::default())
    }

    #[test]
    fn names() {
        let ok = [
            "a",
            "A1",
            "data_1.backup-2",
            &"f".repeat(64),
            &"x".repeat(255),
        ];
        for n in ok {
            assert_eq!(validate_name(n), Ok(()), "{n}");
        }
        let anon = "3f1c2b7a9e0d4c5b6a7f8e9d0c1b2a3f4e5d6c7b8a9f0e1d2c3b4a5f6e7d8c9b";
        assert_eq!(validate_name(anon), Ok(()));
        assert_eq!(validate_name(""), Err(SpecError::EmptyName));
        assert_eq!(
            validate_name(&"x".repeat(256)),
            Err(SpecError::NameTooLong(256))
        );
        for n in [
            "..", ".", "a/b", "/etc", "a b", "a\0b", "-a", "_a", ".hidden", "a\nb", "ü", "a\tb",
            "a:b",
        ] {
            assert!(
                matches!(validate_name(n), Err(SpecError::BadName(_))),
                "{n:?}"
            );
        }
    }

    #[test]
    fn sizes() {
        let table = [
            ("512MiB", Some(512 << 20)),
            ("10G", Some(10 << 30)),
            ("10g", Some(10 << 30)),
            ("10GB", Some(10 << 30)),
            ("1.5G", Some(3 << 29)),
            ("1048576", Some(1 << 20)),
            ("64k", Some(64 << 10)),
            ("2TiB", Some(2 << 40)),
            (" 20M ", Some(20 << 20)),
            ("", None),
            ("G", None),
            ("10X", None),
            ("1.2.3G", None),
            ("-1G", None),
            ("99999999999999999999", None),
            ("100000000000T", None),
        ];
        for (input, want) in table {
            assert_eq!(parse_size(input), want, "{input:?}");
        }
        for b in [MIN_SIZE, 10 << 30, 3 << 29, 12345] {
            assert_eq!(parse_size(&format_size(b)), Some(b));
        }
    }

    #[test]
    fn options_normalise() {
        let a = spec(&[("size", "10G"), ("mode", "0755")]).unwrap();
        let b = spec(&[
            ("size", "10GiB"),
            ("mode", "755"),
            ("fs", "ext4"),
            ("backend", "local"),
        ])
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.fs, Some(FsType::Ext4));
        let none = VolumeSpec::from_options(None, &SpecDefaults::default()).unwrap();
        assert_eq!(none.backend, BackendKind::Local);
        assert_eq!(none.size, None);
        assert_eq!(none.fs, None);
        assert_eq!(
            spec(&[("uid", "1000"), ("gid", "0")]).unwrap().uid,
            Some(1000)
        );
        let back =
            VolumeSpec::from_options(Some(&a.to_options()), &SpecDefaults::default()).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn options_refused() {
        let err = spec(&[("password", "hunter2")]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("\"password\"") && msg.contains("backend, size, fs, uid, gid, mode"),
            "{msg}"
        );
        assert!(!msg.contains("hunter2"));
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("backend", "nfs9")], "backend"),
            (&[("size", "lots")], "size"),
            (&[("size", "1M")], "size"),
            (&[("size", "100T")], "size"),
            (&[("size", "100M"), ("fs", "xfs")], "size"),
            (&[("size", "1G"), ("fs", "btrfs")], "fs"),
            (&[("uid", "-1")], "uid"),
            (&[("uid", "root")], "uid"),
            (&[("gid", "4294967296")], "gid"),
            (&[("mode", "0999")], "mode"),
            (&[("mode", "17777")], "mode"),
            (&[("mode", "")], "mode"),
        ];
        for (pairs, key) in cases {
            match spec(pairs) {
                Err(SpecError::BadValue { key: k, .. }) => assert_eq!(k, *key, "{pairs:?}"),
                other => panic!("{pairs:?}: {other:?}"),
            }
        }
        assert_eq!(spec(&[("fs", "xfs")]), Err(SpecError::FsWithoutSize));
    }

    #[test]
    fn difference_names_the_option() {
        let a = spec(&[("size", "1G")]).unwrap();
        let b = spec(&[("size", "2G")]).unwrap();
        assert_eq!(a.first_difference(&b), Some("size"));
        let c = spec(&[("size", "1G"), ("uid", "5")]).unwrap();
        assert_eq!(a.first_difference(&c), Some("uid"));
        assert_eq!(a.first_difference(&a.clone()), None);
    }

    #[test]
    fn redaction() {
        let r = redact(&opts(&[
            ("password", "x"),
            ("AwsSecretKey", "y"),
            ("size", "1G"),
        ]));
        assert_eq!(r["password"], "<redacted>");
        assert_eq!(r["AwsSecretKey"], "<redacted>");
        assert_eq!(r["size"], "1G");
    }
}

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
pub const OPTION_KEYS: &[&str] = &[
    "backend",
    "size",
    "fs",
    "uid",
    "gid",
    "mode",
    "server",
    "export",
    "subdir",
    "checkpoint",
    "preallocate",
    "access",
];

/// The options each backend accepts besides `backend`; the rest are refused with a message naming them.
const LOCAL_KEYS: &[&str] = &["size", "fs", "uid", "gid", "mode", "preallocate"];
const NFS_KEYS: &[&str] = &["uid", "gid", "mode", "server", "export", "subdir", "access"];
const EBS_KEYS: &[&str] = &["size", "fs", "uid", "gid", "mode", "checkpoint"];

/// ebs images are shipped in blocks of this many bytes, so their sizes are rounded up to a multiple of it.
pub const EBS_BLOCK: u64 = 512 * 1024;
/// The shortest `checkpoint` interval: each checkpoint freezes the filesystem briefly and starts a snapshot.
pub const MIN_CHECKPOINT_SECS: u64 = 60;

/// The longest `subdir` accepted, in bytes.
pub const MAX_SUBDIR_LEN: usize = 1024;

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
    #[error("option \"preallocate\" needs option \"size\": only a size-capped volume has an image whose space can be reserved")]
    PreallocateWithoutSize,
    #[error("option {key:?} does not apply to the {backend} backend; its options are: {}", backend_keys(*backend).join(", "))]
    NotForBackend {
        key: &'static str,
        backend: BackendKind,
    },
    #[error("the nfs backend is not configured on this plugin: its administrator must add an [nfs] section with server and export to the configuration file")]
    NfsNotConfigured,
    #[error("the ebs backend is not configured on this plugin: its administrator must add an [ebs] section (region) to the configuration file")]
    EbsNotConfigured,
    #[error("ebs volumes need option \"size\" (such as -o size=20GiB), or a default_size in the plugin's [ebs] section")]
    EbsSizeRequired,
    #[error("nfs server {server} export {export:?} is not allowed by this plugin; allowed: {allowed}. Its administrator can add it to allowed_servers in the [nfs] section")]
    NfsNotAllowed {
        server: String,
        export: String,
        allowed: String,
    },
}

fn backend_keys(backend: BackendKind) -> &'static [&'static str] {
    match backend {
        BackendKind::Local => LOCAL_KEYS,
        BackendKind::Nfs => NFS_KEYS,
        BackendKind::Ebs => EBS_KEYS,
    }
}

/// Which backend stores a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Local,
    Nfs,
    Ebs,
}

impl BackendKind {
    /// Every backend this build knows, for error messages.
    pub const ALL: &'static [BackendKind] =
        &[BackendKind::Local, BackendKind::Nfs, BackendKind::Ebs];

    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Local => "local",
            BackendKind::Nfs => "nfs",
            BackendKind::Ebs => "ebs",
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
    /// The configured NFS server, if the nfs backend is configured.
    pub nfs: Option<NfsDefaults>,
    /// Set when the ebs backend is configured.
    pub ebs: Option<EbsDefaults>,
}

/// What the `[ebs]` section fills in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EbsDefaults {
    /// The size of ebs volumes created without `-o size=`.
    pub default_size: Option<u64>,
}

impl Default for SpecDefaults {
    fn default() -> Self {
        SpecDefaults {
            backend: BackendKind::Local,
            fs: FsType::Ext4,
            nfs: None,
            ebs: None,
        }
    }
}

/// Where nfs volumes go unless they name another allowed server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NfsDefaults {
    /// An IP address, in canonical form.
    pub server: String,
    /// An absolute export path.
    pub export: String,
    /// Servers (any export) or server:export pairs that volume options may name besides the default.
    pub allowed: Vec<AllowedServer>,
}

/// One `allowed_servers` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedServer {
    pub server: String,
    /// `None` allows every export of the server.
    pub export: Option<String>,
}

impl AllowedServer {
    /// Parses `IP` or `IP:/export`; the IP is returned in canonical form.
    pub fn parse(s: &str) -> Option<Self> {
        let (server, export) = match s.find(":/") {
            // An IPv6 address holds colons but never ":/".
            Some(i) => (&s[..i], Some(&s[i + 1..])),
            None => (s, None),
        };
        let server = canonical_ip(server)?;
        let export = match export {
            Some(e) => Some(canonical_export(e)?),
            None => None,
        };
        Some(AllowedServer { server, export })
    }
}

impl fmt::Display for AllowedServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.export {
            Some(e) => write!(f, "{}:{e}", self.server),
            None => write!(f, "{} (any export)", self.server),
        }
    }
}

impl NfsDefaults {
    fn allows(&self, server: &str, export: &str) -> bool {
        (server == self.server && export == self.export)
            || self
                .allowed
                .iter()
                .any(|a| a.server == server && a.export.as_deref().is_none_or(|e| e == export))
    }
}

/// An IP address in canonical form; host names are refused, since the NFS client needs an address and a
/// name could be made to resolve anywhere.
pub fn canonical_ip(s: &str) -> Option<String> {
    s.trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .ok()
        .map(|ip| ip.to_string())
}

/// An export path: absolute, no `.` or `..` or empty components, no trailing slash (except `/`).
pub fn canonical_export(s: &str) -> Option<String> {
    let s = s.trim();
    if !s.starts_with('/') || s.len() > MAX_SUBDIR_LEN || s.contains('\0') {
        return None;
    }
    let parts: Vec<&str> = s.split('/').filter(|p| !p.is_empty()).collect();
    if parts.iter().any(|p| *p == "." || *p == "..") {
        return None;
    }
    Some(format!("/{}", parts.join("/")))
}

/// A path inside an export: relative, components of at most 255 bytes, no `.` or `..`, no control
/// characters; returned without leading, trailing or doubled slashes.
pub fn canonical_subdir(s: &str) -> Option<String> {
    if s.len() > MAX_SUBDIR_LEN || s.starts_with('/') {
        return None;
    }
    let parts: Vec<&str> = s.split('/').filter(|p| !p.is_empty()).collect();
    let ok = !parts.is_empty()
        && parts.iter().all(|p| {
            *p != "." && *p != ".." && p.len() <= 255 && !p.chars().any(|c| c.is_control())
        })
        // The .ferry area at the top of the export belongs to Ferry's markers.
        && parts[0] != ".ferry";
    ok.then(|| parts.join("/"))
}

/// A volume's options after validation and normalisation: two specs are equal exactly when they ask for the
/// same volume, whatever spelling the user chose (`10G` and `10GiB`, `0755` and `755`). What each backend
/// needs is in its own variant of [`BackendSpec`], so a spec that passed the door cannot lack it (an ebs
/// volume always has a size; an nfs volume always names its server and export).
///
/// Not serialized: the catalog stores its own versioned form (`catalog::record`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeSpec {
    /// Owner and mode of the volume's root directory, for every backend.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mode: Option<u32>,
    pub backend: BackendSpec,
}

/// The options of one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendSpec {
    /// A directory, or with `cap` a filesystem image on a loop device.
    Local { cap: Option<Cap> },
    Nfs {
        /// The server's IP address, resolved from the configuration at create time so that a volume keeps
        /// pointing at its data when the configured default changes.
        server: String,
        /// The export path, resolved like `server`.
        export: String,
        /// An existing directory of the export to adopt instead of one named after the volume; never
        /// deleted by Remove.
        subdir: Option<String>,
        /// `access=single`: in cluster mode, one host at a time may mount it, fenced like an ebs volume.
        single: bool,
    },
    Ebs {
        /// Bytes, a multiple of [`EBS_BLOCK`].
        size: u64,
        fs: FsType,
        /// Seconds between checkpoints while mounted; `None` ships only when the last mount goes away.
        checkpoint: Option<u64>,
    },
}

/// A local volume's size cap: its own filesystem of `size` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap {
    pub size: u64,
    pub fs: FsType,
    /// The image's whole size is allocated on the host at create (fallocate), so a full host filesystem
    /// can never fail writes inside the volume.
    pub preallocate: bool,
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

/// A uid or gid. 4294967295 is (uid_t)-1, which chown(2) takes as "leave unchanged", so it could be
/// recorded but never applied. Signs are refused: `+5` is not how anyone writes an id on purpose.
fn parse_id(key: &'static str, value: &str) -> Result<u32, SpecError> {
    let t = value.trim();
    t.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| t.parse::<u32>().ok())
        .flatten()
        .filter(|id| *id != u32::MAX)
        .ok_or_else(|| bad(key, value, "expected a numeric id from 0 to 4294967294"))
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
        if let Some(key) = OPTION_KEYS.iter().find(|k| {
            **k != "backend" && opts.contains_key(**k) && !backend_keys(backend).contains(k)
        }) {
            return Err(SpecError::NotForBackend { key, backend });
        }
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
        let size = if backend == BackendKind::Ebs {
            let ebs = defaults.ebs.as_ref().ok_or(SpecError::EbsNotConfigured)?;
            let bytes = size
                .or(ebs.default_size)
                .ok_or(SpecError::EbsSizeRequired)?;
            Some(bytes.div_ceil(EBS_BLOCK) * EBS_BLOCK)
        } else {
            size
        };
        let checkpoint = match opts.get("checkpoint") {
            None => None,
            Some(v) => {
                let secs = humantime::parse_duration(v.trim())
                    .map(|d| d.as_secs())
                    .map_err(|_| bad("checkpoint", v, "expected an interval such as 5m or 1h"))?;
                if secs < MIN_CHECKPOINT_SECS {
                    return Err(bad(
                        "checkpoint",
                        v,
                        &format!("must be at least {MIN_CHECKPOINT_SECS}s"),
                    ));
                }
                Some(secs)
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
        let preallocate = match opts.get("preallocate").map(|v| v.trim()) {
            None | Some("false") => false,
            Some("true") => true,
            Some(v) => return Err(bad("preallocate", v, "expected true or false")),
        };
        if preallocate && size.is_none() {
            return Err(SpecError::PreallocateWithoutSize);
        }
        let uid = opts.get("uid").map(|v| parse_id("uid", v)).transpose()?;
        let gid = opts.get("gid").map(|v| parse_id("gid", v)).transpose()?;
        let mode = match opts.get("mode") {
            None => None,
            Some(v) => {
                let t = v.trim();
                let t = t.strip_prefix("0o").unwrap_or(t);
                // from_str_radix alone would take a sign.
                let m = u32::from_str_radix(t, 8)
                    .ok()
                    .filter(|m| *m <= 0o7777 && !t.is_empty())
                    .filter(|_| t.bytes().all(|b| (b'0'..=b'7').contains(&b)))
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
        let (server, export, subdir) = if backend == BackendKind::Nfs {
            let nfs = defaults.nfs.as_ref().ok_or(SpecError::NfsNotConfigured)?;
            let server = match opts.get("server") {
                None => nfs.server.clone(),
                Some(v) => canonical_ip(v).ok_or_else(|| {
                    bad(
                        "server",
                        v,
                        "expected the IP address of an NFS server, such as 10.0.0.5",
                    )
                })?,
            };
            let export = match opts.get("export") {
                // Another server without an export means the default export path on that server.
                None => nfs.export.clone(),
                Some(v) => canonical_export(v).ok_or_else(|| {
                    bad(
                        "export",
                        v,
                        "expected an absolute export path such as /srv/nfs, without . or ..",
                    )
                })?,
            };
            if !nfs.allows(&server, &export) {
                let mut allowed = vec![format!("{}:{}", nfs.server, nfs.export)];
                allowed.extend(nfs.allowed.iter().map(|a| a.to_string()));
                return Err(SpecError::NfsNotAllowed {
                    server,
                    export,
                    allowed: allowed.join(", "),
                });
            }
            let subdir = match opts.get("subdir") {
                None => None,
                Some(v) => Some(canonical_subdir(v).ok_or_else(|| {
                    bad(
                        "subdir",
                        v,
                        "expected a relative path inside the export, such as projects/data, without . or .. or a leading /",
                    )
                })?),
            };
            (Some(server), Some(export), subdir)
        } else {
            (None, None, None)
        };
        let single = match opts.get("access").map(String::as_str) {
            None | Some("shared") => false,
            Some("single") => true,
            Some(v) => return Err(bad(
                "access",
                v,
                "expected shared (every host may mount it at once) or single (one host at a time)",
            )),
        };
        let backend = match (backend, size, fs, server, export) {
            (BackendKind::Local, None, _, _, _) => BackendSpec::Local { cap: None },
            (BackendKind::Local, Some(size), fs, _, _) => BackendSpec::Local {
                cap: Some(Cap {
                    size,
                    fs: fs.unwrap_or(defaults.fs),
                    preallocate,
                }),
            },
            (BackendKind::Nfs, _, _, Some(server), Some(export)) => BackendSpec::Nfs {
                server,
                export,
                subdir,
                single,
            },
            (BackendKind::Ebs, Some(size), fs, _, _) => BackendSpec::Ebs {
                size,
                fs: fs.unwrap_or(defaults.fs),
                checkpoint,
            },
            // Each branch above filled what its backend needs: an ebs size (given or default, else
            // EbsSizeRequired) and an nfs server and export (given or configured, else NfsNotConfigured).
            (kind, ..) => {
                return Err(bad(
                    "backend",
                    kind.as_str(),
                    "its required options could not be resolved",
                ))
            }
        };
        Ok(VolumeSpec {
            uid,
            gid,
            mode,
            backend,
        })
    }

    /// Which backend stores the volume.
    pub fn kind(&self) -> BackendKind {
        match self.backend {
            BackendSpec::Local { .. } => BackendKind::Local,
            BackendSpec::Nfs { .. } => BackendKind::Nfs,
            BackendSpec::Ebs { .. } => BackendKind::Ebs,
        }
    }

    /// The size and filesystem of the volume's own image: a capped local volume's or an ebs volume's.
    pub fn image(&self) -> Option<(u64, FsType)> {
        match &self.backend {
            BackendSpec::Local { cap: Some(c) } => Some((c.size, c.fs)),
            BackendSpec::Ebs { size, fs, .. } => Some((*size, *fs)),
            _ => None,
        }
    }

    /// The size cap in bytes; `None` for an uncapped directory.
    pub fn size(&self) -> Option<u64> {
        self.image().map(|(size, _)| size)
    }

    /// The filesystem inside the volume's image, if it has one.
    pub fn fs(&self) -> Option<FsType> {
        self.image().map(|(_, fs)| fs)
    }

    /// ebs: seconds between checkpoints while mounted.
    pub fn checkpoint(&self) -> Option<u64> {
        match self.backend {
            BackendSpec::Ebs { checkpoint, .. } => checkpoint,
            _ => None,
        }
    }

    /// local, capped: whether the image is allocated in full at create.
    pub fn preallocate(&self) -> bool {
        matches!(
            self.backend,
            BackendSpec::Local {
                cap: Some(Cap {
                    preallocate: true,
                    ..
                })
            }
        )
    }

    /// nfs with `access=single`.
    pub fn single_writer_nfs(&self) -> bool {
        matches!(self.backend, BackendSpec::Nfs { single: true, .. })
    }

    /// nfs: server, export and subdir.
    pub fn nfs(&self) -> Option<(&str, &str, Option<&str>)> {
        match &self.backend {
            BackendSpec::Nfs {
                server,
                export,
                subdir,
                ..
            } => Some((server, export, subdir.as_deref())),
            _ => None,
        }
    }

    /// The spec as canonical option strings, for display in `Status`.
    pub fn to_options(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        out.insert("backend".into(), self.kind().as_str().into());
        if let Some((size, fs)) = self.image() {
            out.insert("size".into(), format_size(size));
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
        if let Some(c) = self.checkpoint() {
            out.insert(
                "checkpoint".into(),
                humantime::format_duration(std::time::Duration::from_secs(c)).to_string(),
            );
        }
        if self.preallocate() {
            out.insert("preallocate".into(), "true".into());
        }
        if let Some((server, export, subdir)) = self.nfs() {
            out.insert("server".into(), server.into());
            out.insert("export".into(), export.into());
            if let Some(subdir) = subdir {
                out.insert("subdir".into(), subdir.into());
            }
            if self.single_writer_nfs() {
                out.insert("access".into(), "single".into());
            }
        }
        out
    }

    /// The first option whose value differs between two specs, for the error on a conflicting Create.
    pub fn first_difference(&self, other: &VolumeSpec) -> Option<&'static str> {
        if self.kind() != other.kind() {
            return Some("backend");
        }
        // The canonical options name every field of both specs, in the order error messages list keys.
        let (mine, theirs) = (self.to_options(), other.to_options());
        OPTION_KEYS
            .iter()
            .copied()
            .find(|key| mine.get(*key) != theirs.get(*key))
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
        assert_eq!(a.fs(), Some(FsType::Ext4));
        let none = VolumeSpec::from_options(None, &SpecDefaults::default()).unwrap();
        assert_eq!(none.kind(), BackendKind::Local);
        assert_eq!(none.size(), None);
        assert_eq!(none.fs(), None);
        assert_eq!(
            spec(&[("uid", "1000"), ("gid", "0")]).unwrap().uid,
            Some(1000)
        );
        let back =
            VolumeSpec::from_options(Some(&a.to_options()), &SpecDefaults::default()).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn preallocate_is_for_capped_local_volumes_only() {
        let v = spec(&[("size", "1G"), ("preallocate", "true")]).unwrap();
        assert!(v.preallocate());
        assert_eq!(v.to_options()["preallocate"], "true");
        let back =
            VolumeSpec::from_options(Some(&v.to_options()), &SpecDefaults::default()).unwrap();
        assert_eq!(back, v);
        let plain = spec(&[("size", "1G"), ("preallocate", "false")]).unwrap();
        assert!(!plain.preallocate() && !plain.to_options().contains_key("preallocate"));
        assert_eq!(v.first_difference(&plain), Some("preallocate"));
        assert_eq!(
            spec(&[("preallocate", "true")]),
            Err(SpecError::PreallocateWithoutSize)
        );
        assert!(matches!(
            spec(&[("size", "1G"), ("preallocate", "yes please")]),
            Err(SpecError::BadValue {
                key: "preallocate",
                ..
            })
        ));
        let ebs = VolumeSpec::from_options(
            Some(&opts(&[
                ("backend", "ebs"),
                ("size", "1G"),
                ("preallocate", "true"),
            ])),
            &SpecDefaults {
                ebs: Some(EbsDefaults::default()),
                ..SpecDefaults::default()
            },
        );
        assert_eq!(
            ebs,
            Err(SpecError::NotForBackend {
                key: "preallocate",
                backend: BackendKind::Ebs
            })
        );
    }

    #[test]
    fn options_refused() {
        let err = spec(&[("password", "hunter2")]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("\"password\"")
                && msg.contains("backend, size, fs, uid, gid, mode, server, export, subdir"),
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
            (&[("uid", "+5")], "uid"),
            (&[("uid", "4294967295")], "uid"),
            (&[("gid", "4294967295")], "gid"),
            (&[("gid", "+0")], "gid"),
            (&[("uid", " 5 6")], "uid"),
            (&[("mode", "+755")], "mode"),
            (&[("mode", "-755")], "mode"),
            (&[("mode", "0o+755")], "mode"),
            (&[("size", "+1G")], "size"),
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
        // The largest id chown(2) can apply, and the way ids are usually written, still pass.
        let edge = spec(&[("uid", "4294967294"), ("gid", " 0 "), ("mode", "0o2775")]).unwrap();
        assert_eq!(
            (edge.uid, edge.gid, edge.mode),
            (Some(u32::MAX - 1), Some(0), Some(0o2775))
        );
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

    fn nfs_defaults() -> SpecDefaults {
        SpecDefaults {
            nfs: Some(NfsDefaults {
                server: "10.0.0.5".into(),
                export: "/srv/nfs".into(),
                allowed: vec![
                    AllowedServer::parse("10.0.0.6").unwrap(),
                    AllowedServer::parse("10.0.0.7:/data/").unwrap(),
                ],
            }),
            ..SpecDefaults::default()
        }
    }

    fn nfs(pairs: &[(&str, &str)]) -> Result<VolumeSpec, SpecError> {
        let mut all = opts(pairs);
        all.insert("backend".into(), "nfs".into());
        VolumeSpec::from_options(Some(&all), &nfs_defaults())
    }

    #[test]
    fn nfs_options_resolve_the_configured_server() {
        let plain = nfs(&[]).unwrap();
        assert_eq!(plain.nfs(), Some(("10.0.0.5", "/srv/nfs", None)));
        // Spelling does not matter, so a repeated create is idempotent.
        let other = nfs(&[("server", " 10.0.0.6"), ("export", "/srv//nfs/")]).unwrap();
        assert_eq!(other.nfs().unwrap().1, "/srv/nfs");
        assert_eq!(
            nfs(&[("server", "10.0.0.7"), ("export", "/data")])
                .unwrap()
                .nfs()
                .map(|n| n.0),
            Some("10.0.0.7")
        );
        let adopted = nfs(&[("subdir", "projects//a/"), ("uid", "33")]).unwrap();
        assert_eq!(adopted.nfs().unwrap().2, Some("projects/a"));
        let back = VolumeSpec::from_options(Some(&adopted.to_options()), &nfs_defaults()).unwrap();
        assert_eq!(back, adopted);
        assert_eq!(plain.first_difference(&other), Some("server"));
        assert_eq!(plain.first_difference(&adopted), Some("uid"));
    }

    fn ebs(pairs: &[(&str, &str)], default_size: Option<u64>) -> Result<VolumeSpec, SpecError> {
        let mut all = vec![("backend", "ebs")];
        all.extend_from_slice(pairs);
        let defaults = SpecDefaults {
            ebs: Some(EbsDefaults { default_size }),
            ..SpecDefaults::default()
        };
        VolumeSpec::from_options(Some(&opts(&all)), &defaults)
    }

    #[test]
    fn ebs_options() {
        let v = ebs(&[("size", "50000001"), ("checkpoint", "5m")], None).unwrap();
        // Rounded up to whole 512 KiB blocks; ext4 unless asked otherwise.
        assert_eq!(
            v.size(),
            Some(50_000_001u64.div_ceil(EBS_BLOCK) * EBS_BLOCK)
        );
        assert_eq!(v.fs(), Some(FsType::Ext4));
        assert_eq!(v.checkpoint(), Some(300));
        assert_eq!(v.to_options()["checkpoint"], "5m");
        let back = VolumeSpec::from_options(
            Some(&v.to_options()),
            &SpecDefaults {
                ebs: Some(EbsDefaults::default()),
                ..SpecDefaults::default()
            },
        )
        .unwrap();
        assert_eq!(back, v);
        assert_eq!(
            ebs(&[], Some(1 << 30)).unwrap().size(),
            Some(1 << 30),
            "default_size"
        );
        assert_eq!(ebs(&[], None), Err(SpecError::EbsSizeRequired));
        assert_eq!(
            VolumeSpec::from_options(
                Some(&opts(&[("backend", "ebs"), ("size", "1G")])),
                &SpecDefaults::default()
            ),
            Err(SpecError::EbsNotConfigured)
        );
        for bad in ["30s", "soon", "-5m", ""] {
            assert!(
                matches!(
                    ebs(&[("size", "1G"), ("checkpoint", bad)], None),
                    Err(SpecError::BadValue {
                        key: "checkpoint",
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
        assert_eq!(
            ebs(&[("size", "1G"), ("subdir", "x")], None),
            Err(SpecError::NotForBackend {
                key: "subdir",
                backend: BackendKind::Ebs
            })
        );
        assert_eq!(
            spec(&[("checkpoint", "5m")]),
            Err(SpecError::NotForBackend {
                key: "checkpoint",
                backend: BackendKind::Local
            })
        );
    }

    #[test]
    fn nfs_options_refused() {
        let not_allowed = nfs(&[("server", "10.9.9.9")]).unwrap_err().to_string();
        assert!(
            not_allowed.contains("10.9.9.9") && not_allowed.contains("allowed_servers"),
            "{not_allowed}"
        );
        // An allowed server:export pair allows only that export.
        assert!(matches!(
            nfs(&[("server", "10.0.0.7"), ("export", "/other")]),
            Err(SpecError::NfsNotAllowed { .. })
        ));
        for (key, value) in [
            ("server", "nfs.example.com"),
            ("server", ""),
            ("export", "relative"),
            ("export", "/a/../b"),
            ("subdir", "/abs"),
            ("subdir", "a/../b"),
            ("subdir", ".ferry/mounts"),
            ("subdir", ""),
            ("subdir", "a\nb"),
        ] {
            match nfs(&[(key, value)]) {
                Err(SpecError::BadValue { key: k, .. }) => assert_eq!(k, key, "{value:?}"),
                other => panic!("{key}={value:?}: {other:?}"),
            }
        }
        assert_eq!(
            nfs(&[("size", "1G")]),
            Err(SpecError::NotForBackend {
                key: "size",
                backend: BackendKind::Nfs
            })
        );
        assert_eq!(
            spec(&[("server", "10.0.0.5")]),
            Err(SpecError::NotForBackend {
                key: "server",
                backend: BackendKind::Local
            })
        );
        let unconfigured =
            VolumeSpec::from_options(Some(&opts(&[("backend", "nfs")])), &SpecDefaults::default());
        assert_eq!(unconfigured, Err(SpecError::NfsNotConfigured));
        assert_eq!(
            AllowedServer::parse("fe80::1:/x")
                .unwrap()
                .export
                .as_deref(),
            Some("/x")
        );
        assert_eq!(AllowedServer::parse("::1").unwrap().export, None);
        assert!(AllowedServer::parse("host:/x").is_none());
    }
}

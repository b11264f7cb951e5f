//! Configuration: command-line flags and `FERRY_*` variables (parsed by the binary), an optional TOML file,
//! and the embedded defaults, merged in that order of precedence into one typed `ServeConfig`. Nothing
//! below this module sees clap types.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::backend::ebs::EbsSettings;
use crate::backend::nfs::{DataPath, LockMode, NfsSettings};
use crate::listener::ListenerSettings;
use crate::nfs::NfsClientConfig;
use crate::spec::{
    canonical_export, parse_size, AllowedServer, BackendKind, EbsDefaults, FsType, NfsDefaults,
    SpecDefaults, MAX_SIZE, MIN_SIZE,
};

pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/ferry.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ferry";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `reason` is words, not the `io::Error`: as a `source` it would be printed twice by `{:#}`.
    #[error("cannot read the configuration file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("invalid configuration file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration file {path}: {key} = {value:?} is not valid; {hint}")]
    Value {
        path: PathBuf,
        key: &'static str,
        value: String,
        hint: String,
    },
}

/// What the command line (or its environment variables) gave; `None` where the user said nothing.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub mount_root: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub admin_socket: Option<PathBuf>,
}

/// Everything `ferry serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    /// Where volumes are exposed to Docker; `None` exposes each volume at its data path.
    pub mount_root: Option<PathBuf>,
    pub defaults: SpecDefaults,
    /// Where to serve Prometheus metrics; `None` (the default) serves none.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The operator CLI's socket (root-only); `STATE_DIR/admin.sock` unless configured.
    pub admin_socket: PathBuf,
    /// The nfs backend's settings; `None` leaves the backend off.
    pub nfs: Option<NfsSettings>,
    /// The ebs backend's settings; `None` leaves the backend off.
    pub ebs: Option<EbsSettings>,
    /// Connection caps, timeouts and the plugin socket's users, for all three listeners.
    pub listeners: ListenerSettings,
    /// Whether the caps of capped local volumes may add up to more than the state filesystem has free.
    pub local_overcommit: bool,
    /// Present only in cluster mode.
    pub cluster: Option<ClusterConfig>,
}

/// The `[cluster]` section. Files (TLS, password) are read when the daemon starts, not here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub etcd: Vec<String>,
    pub node: String,
    pub prefix: String,
    pub lease_ttl: std::time::Duration,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
}

/// Defaults of the `[cluster]` section.
pub const CLUSTER_DEFAULT_PREFIX: &str = "/ferry";
pub const CLUSTER_DEFAULT_LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(10);

/// The TOML file. Unknown keys are errors, so a typo never silently falls back to a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    socket: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    /// Where volumes are mounted for Docker (a managed plugin's PropagatedMount).
    mount_root: Option<PathBuf>,
    /// The operator CLI's socket.
    admin_socket: Option<PathBuf>,
    /// The backend of volumes created without `-o backend=`.
    default_backend: Option<String>,
    #[serde(default)]
    local: LocalSection,
    #[serde(default)]
    metrics: MetricsSection,
    #[serde(default)]
    listeners: ListenersSection,
    /// Present only where the nfs backend is wanted.
    nfs: Option<NfsSection>,
    /// Present only where the ebs backend is wanted.
    ebs: Option<EbsSection>,
    /// Present only in cluster mode.
    cluster: Option<ClusterSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterSection {
    etcd: Option<Vec<String>>,
    node: Option<String>,
    prefix: Option<String>,
    lease_ttl: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    user: Option<String>,
    password_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EbsSection {
    region: Option<String>,
    endpoint_url: Option<String>,
    concurrency: Option<usize>,
    cache_dir: Option<PathBuf>,
    namespace: Option<String>,
    default_size: Option<String>,
    keep: Option<u64>,
    keep_chain: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NfsSection {
    server: Option<String>,
    export: Option<String>,
    nfs_port: Option<u16>,
    mount_port: Option<u16>,
    uid: Option<u32>,
    gid: Option<u32>,
    allowed_servers: Option<Vec<String>>,
    data_path: Option<String>,
    timeout: Option<String>,
    attr_cache: Option<String>,
    connections: Option<usize>,
    locks: Option<String>,
    nlm_port: Option<u16>,
}

/// Blocks in flight per push or pull unless `[ebs] concurrency` says otherwise.
pub const EBS_DEFAULT_CONCURRENCY: usize = crate::backend::ebs::DEFAULT_CONCURRENCY;

/// Defaults of the `[nfs]` section.
pub const NFS_DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
pub const NFS_DEFAULT_ATTR_CACHE: std::time::Duration = std::time::Duration::from_secs(1);
pub const NFS_DEFAULT_CONNECTIONS: usize = 8;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsSection {
    /// An address such as "127.0.0.1:9464"; unset turns the endpoint off.
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenersSection {
    idle_timeout: Option<String>,
    request_timeout: Option<String>,
    plugin_connections: Option<usize>,
    admin_connections: Option<usize>,
    metrics_connections: Option<usize>,
    docker_uids: Option<Vec<u32>>,
}

/// The most connections a listener may be configured for; the open-file limit may allow fewer.
pub const MAX_LISTENER_CONNECTIONS: usize = 65_536;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalSection {
    /// The filesystem of size-capped volumes created without `-o fs=`.
    default_fs: Option<String>,
    /// Allow caps beyond the free space of the state filesystem.
    overcommit: Option<bool>,
}

impl ServeConfig {
    /// Merges flags, the file they name (if any) and the embedded defaults.
    pub fn load(over: &Overrides) -> Result<Self, ConfigError> {
        let file = match &over.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let path = over.config.clone().unwrap_or_default();
        let mut defaults = SpecDefaults::default();
        if let Some(b) = &file.default_backend {
            defaults.backend = BackendKind::parse(b).ok_or_else(|| ConfigError::Value {
                path: path.clone(),
                key: "default_backend",
                value: b.clone(),
                hint: format!(
                    "valid backends are: {}",
                    BackendKind::ALL
                        .iter()
                        .map(|b| b.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?;
        }
        if let Some(fs) = &file.local.default_fs {
            defaults.fs = FsType::parse(fs).ok_or_else(|| ConfigError::Value {
                path: path.clone(),
                key: "local.default_fs",
                value: fs.clone(),
                hint: "valid filesystems are: ext4, xfs".into(),
            })?;
        }
        let metrics_listen = match &file.metrics.listen {
            None => None,
            Some(a) => Some(a.parse().map_err(|_| ConfigError::Value {
                path: path.clone(),
                key: "metrics.listen",
                value: a.clone(),
                hint: "expected an IP address and port such as 127.0.0.1:9464".into(),
            })?),
        };
        let nfs = match file.nfs {
            None => None,
            Some(section) => Some(nfs_settings(section, &path)?),
        };
        if let Some(n) = &nfs {
            defaults.nfs = Some(NfsDefaults {
                server: n.client.server.to_string(),
                export: n.client.export.clone(),
                allowed: n.allowed_servers.clone(),
            });
        }
        let ebs = match file.ebs {
            None => None,
            Some(section) => Some(ebs_settings(section, &path)?),
        };
        if let Some(e) = &ebs {
            defaults.ebs = Some(EbsDefaults {
                default_size: e.default_size,
            });
        }
        if defaults.backend == BackendKind::Ebs && ebs.is_none() {
            return Err(ConfigError::Value {
                path: path.clone(),
                key: "default_backend",
                value: "ebs".into(),
                hint: "the ebs backend needs an [ebs] section with region".into(),
            });
        }
        if defaults.backend == BackendKind::Nfs && nfs.is_none() {
            return Err(ConfigError::Value {
                path: path.clone(),
                key: "default_backend",
                value: "nfs".into(),
                hint: "the nfs backend needs an [nfs] section with server and export".into(),
            });
        }
        let listeners = listener_settings(file.listeners, &path)?;
        let cluster = match file.cluster {
            None => None,
            Some(section) => Some(cluster_settings(section, &path)?),
        };
        let state_dir = over
            .state_dir
            .clone()
            .or(file.state_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        Ok(ServeConfig {
            socket: over
                .socket
                .clone()
                .or(file.socket)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
            admin_socket: over
                .admin_socket
                .clone()
                .or(file.admin_socket)
                .unwrap_or_else(|| default_admin_socket(&state_dir)),
            state_dir,
            mount_root: over.mount_root.clone().or(file.mount_root),
            defaults,
            metrics_listen,
            nfs,
            ebs,
            listeners,
            local_overcommit: file.local.overcommit.unwrap_or(false),
            cluster,
        })
    }
}

/// Validates the `[listeners]` section.
fn listener_settings(l: ListenersSection, path: &Path) -> Result<ListenerSettings, ConfigError> {
    let bad = |key: &'static str, value: String, hint: &str| ConfigError::Value {
        path: path.to_path_buf(),
        key,
        value,
        hint: hint.to_string(),
    };
    let defaults = ListenerSettings::default();
    let duration = |key: &'static str, v: Option<String>, default| match v {
        None => Ok(default),
        Some(t) => humantime::parse_duration(t.trim())
            .ok()
            .filter(|d| *d >= std::time::Duration::from_millis(100))
            .ok_or_else(|| {
                bad(
                    key,
                    t.clone(),
                    "expected a duration of at least 100ms, such as 120s or 2m",
                )
            }),
    };
    let count = |key: &'static str, v: Option<usize>, default| match v {
        None => Ok(default),
        Some(n) if (1..=MAX_LISTENER_CONNECTIONS).contains(&n) => Ok(n),
        Some(n) => Err(bad(
            key,
            n.to_string(),
            &format!("expected 1 to {MAX_LISTENER_CONNECTIONS}"),
        )),
    };
    Ok(ListenerSettings {
        idle_timeout: duration(
            "listeners.idle_timeout",
            l.idle_timeout,
            defaults.idle_timeout,
        )?,
        request_timeout: duration(
            "listeners.request_timeout",
            l.request_timeout,
            defaults.request_timeout,
        )?,
        plugin_connections: count(
            "listeners.plugin_connections",
            l.plugin_connections,
            defaults.plugin_connections,
        )?,
        admin_connections: count(
            "listeners.admin_connections",
            l.admin_connections,
            defaults.admin_connections,
        )?,
        metrics_connections: count(
            "listeners.metrics_connections",
            l.metrics_connections,
            defaults.metrics_connections,
        )?,
        docker_uids: l.docker_uids.unwrap_or_default(),
    })
}

/// Validates the `[ebs]` section. Credentials are deliberately not part of it: they come from the AWS
/// chain only, so they never sit in a file Ferry reads or shows.
fn ebs_settings(e: EbsSection, path: &Path) -> Result<EbsSettings, ConfigError> {
    let bad = |key: &'static str, value: String, hint: &str| ConfigError::Value {
        path: path.to_path_buf(),
        key,
        value,
        hint: hint.to_string(),
    };
    let region = e
        .region
        .or_else(|| std::env::var("AWS_REGION").ok())
        .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty())
        .ok_or_else(|| {
            bad(
                "ebs.region",
                String::new(),
                "set it to the AWS region of the snapshots, such as eu-west-1 (or set AWS_REGION)",
            )
        })?;
    if !region
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(bad(
            "ebs.region",
            region,
            "expected a region such as eu-west-1",
        ));
    }
    let endpoint_url = match e.endpoint_url {
        None => None,
        Some(u) => {
            let t = u.trim();
            if !(t.starts_with("http://") || t.starts_with("https://"))
                || t.contains(char::is_whitespace)
            {
                return Err(bad(
                    "ebs.endpoint_url",
                    u.clone(),
                    "expected a URL such as https://ebs.example.com or http://127.0.0.1:5000",
                ));
            }
            Some(t.trim_end_matches('/').to_string())
        }
    };
    let concurrency = e.concurrency.unwrap_or(EBS_DEFAULT_CONCURRENCY);
    if !(1..=256).contains(&concurrency) {
        return Err(bad(
            "ebs.concurrency",
            concurrency.to_string(),
            "expected 1 to 256",
        ));
    }
    let namespace = e
        .namespace
        .unwrap_or_else(|| crate::backend::ebs::DEFAULT_NAMESPACE.to_string());
    if namespace.is_empty()
        || namespace.len() > 128
        || !namespace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c))
    {
        return Err(bad(
            "ebs.namespace",
            namespace,
            "expected 1 to 128 letters, digits or - _ . : /",
        ));
    }
    let default_size = match e.default_size {
        None => None,
        Some(s) => Some(
            parse_size(&s)
                .filter(|b| (MIN_SIZE..=MAX_SIZE).contains(b))
                .ok_or_else(|| {
                    bad(
                        "ebs.default_size",
                        s.clone(),
                        "expected a size such as 20GiB, at least 16MiB",
                    )
                })?,
        ),
    };
    let keep = e.keep.unwrap_or(crate::backend::ebs::DEFAULT_KEEP);
    if !(1..=10_000).contains(&keep) {
        return Err(bad(
            "ebs.keep",
            keep.to_string(),
            "expected 1 to 10000 generations",
        ));
    }
    Ok(EbsSettings {
        region,
        endpoint_url,
        concurrency,
        cache_dir: e.cache_dir,
        namespace,
        default_size,
        keep,
        keep_chain: e.keep_chain.unwrap_or(false),
    })
}

/// Validates the `[nfs]` section.
fn nfs_settings(n: NfsSection, path: &Path) -> Result<NfsSettings, ConfigError> {
    let bad = |key: &'static str, value: String, hint: &str| ConfigError::Value {
        path: path.to_path_buf(),
        key,
        value,
        hint: hint.to_string(),
    };
    let server = n.server.ok_or_else(|| {
        bad(
            "nfs.server",
            String::new(),
            "set it to the NFS server's IP address",
        )
    })?;
    let server = server.trim().parse().map_err(|_| {
        bad(
            "nfs.server",
            server.clone(),
            "expected an IP address such as 10.0.0.5",
        )
    })?;
    let export = n.export.ok_or_else(|| {
        bad(
            "nfs.export",
            String::new(),
            "set it to the export path, such as /srv/nfs",
        )
    })?;
    let export = canonical_export(&export).ok_or_else(|| {
        bad(
            "nfs.export",
            export.clone(),
            "expected an absolute path without . or ..",
        )
    })?;
    let allowed_servers = n
        .allowed_servers
        .unwrap_or_default()
        .into_iter()
        .map(|a| {
            AllowedServer::parse(&a).ok_or_else(|| {
                bad(
                    "nfs.allowed_servers",
                    a.clone(),
                    "expected entries such as \"10.0.0.6\" or \"10.0.0.6:/export\"",
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let data_path = match n.data_path {
        None => DataPath::Auto,
        Some(d) => DataPath::parse(d.trim()).ok_or_else(|| {
            bad(
                "nfs.data_path",
                d.clone(),
                "valid values are: auto, kernel, fuse",
            )
        })?,
    };
    let duration = |key: &'static str, v: Option<String>, default| match v {
        None => Ok(default),
        Some(t) => humantime::parse_duration(t.trim())
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| bad(key, t.clone(), "expected a duration such as 10s or 500ms")),
    };
    let timeout = duration("nfs.timeout", n.timeout, NFS_DEFAULT_TIMEOUT)?;
    let attr_cache = match n.attr_cache.as_deref().map(str::trim) {
        // Zero is meaningful here: no caching at all.
        Some("0") | Some("0s") => std::time::Duration::ZERO,
        _ => duration("nfs.attr_cache", n.attr_cache, NFS_DEFAULT_ATTR_CACHE)?,
    };
    let connections = n.connections.unwrap_or(NFS_DEFAULT_CONNECTIONS);
    if !(1..=64).contains(&connections) {
        return Err(bad(
            "nfs.connections",
            connections.to_string(),
            "expected 1 to 64",
        ));
    }
    let locks = match n.locks {
        None => LockMode::Nlm,
        Some(l) => LockMode::parse(l.trim())
            .ok_or_else(|| bad("nfs.locks", l.clone(), "valid values are: nlm, local"))?,
    };
    Ok(NfsSettings {
        locks,
        nlm_port: n.nlm_port,
        client: NfsClientConfig {
            nfs_port: n.nfs_port,
            mount_port: n.mount_port,
            uid: n.uid.unwrap_or(0),
            gid: n.gid.unwrap_or(0),
            timeout,
            connections,
            ..NfsClientConfig::new(server, export)
        },
        allowed_servers,
        data_path,
        attr_cache,
    })
}

/// Where the admin socket is when nothing names it: inside the state directory, whose mode 0700 already
/// keeps it root-only, and which a managed plugin shares with the host through its bind mount.
pub fn default_admin_socket(state_dir: &Path) -> PathBuf {
    state_dir.join(ADMIN_SOCKET_NAME)
}

/// The admin socket's file name inside the state directory.
pub const ADMIN_SOCKET_NAME: &str = "admin.sock";

fn cluster_settings(c: ClusterSection, path: &Path) -> Result<ClusterConfig, ConfigError> {
    let bad = |key: &'static str, value: String, hint: &str| ConfigError::Value {
        path: path.to_path_buf(),
        key,
        value,
        hint: hint.to_string(),
    };
    let etcd = c.etcd.unwrap_or_default();
    crate::cluster::etcd::check_endpoints(&etcd)
        .map_err(|e| bad("cluster.etcd", format!("{etcd:?}"), &e))?;
    let node = match c.node {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default(),
    };
    let node_ok = !node.is_empty()
        && node.len() <= 63
        && node
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'));
    if !node_ok {
        return Err(bad(
            "cluster.node",
            node,
            "expected 1 to 63 letters, digits or - _ . (unique per host; the default is the host name)",
        ));
    }
    let prefix = c
        .prefix
        .unwrap_or_else(|| CLUSTER_DEFAULT_PREFIX.to_string());
    let trimmed = prefix.trim_end_matches('/').to_string();
    if !trimmed.starts_with('/') || trimmed.len() < 2 || trimmed.chars().any(|ch| ch.is_control()) {
        return Err(bad(
            "cluster.prefix",
            prefix,
            "expected a key prefix starting with / such as /ferry",
        ));
    }
    let lease_ttl = match c.lease_ttl {
        None => CLUSTER_DEFAULT_LEASE_TTL,
        Some(t) => humantime::parse_duration(&t)
            .ok()
            .filter(|d| d.as_secs() >= 2 && d.as_secs() <= 600 && d.subsec_nanos() == 0)
            .ok_or_else(|| {
                bad(
                    "cluster.lease_ttl",
                    t.clone(),
                    "expected whole seconds from 2s to 10m, such as \"10s\"",
                )
            })?,
    };
    if c.cert.is_some() != c.key.is_some() {
        return Err(bad(
            "cluster.cert",
            format!("{:?}", c.cert),
            "cluster.cert and cluster.key go together (a client certificate and its key)",
        ));
    }
    if c.user.is_some() != c.password_file.is_some() {
        return Err(bad(
            "cluster.user",
            c.user.clone().unwrap_or_default(),
            "cluster.user and cluster.password_file go together",
        ));
    }
    Ok(ClusterConfig {
        etcd,
        node,
        prefix: trimmed,
        lease_ttl,
        ca: c.ca,
        cert: c.cert,
        key: c.key,
        user: c.user,
        password_file: c.password_file,
    })
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.to_path_buf(),
        reason: match e.kind() {
            std::io::ErrorKind::NotFound => "it does not exist; fix the path, or drop --config / FERRY_CONFIG to run on the embedded defaults".into(),
            std::io::ErrorKind::PermissionDenied => "permission denied; run as root (as ferry serve does) or make the file readable".into(),
            _ => e.to_string(),
        },
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// One key of the TOML file, as the configuration reference documents it.
#[derive(Debug, Clone, Copy)]
pub struct ConfigKey {
    /// The key as written in the file; `section.key` for keys inside a `[section]`.
    pub key: &'static str,
    /// The value used when neither a flag nor the file sets the key (Markdown).
    pub default: &'static str,
    /// What the key does, and the flag and variable that override it (Markdown, one line).
    pub meaning: &'static str,
    /// A valid TOML value for the key; tests set every key to it and load the result.
    pub example: &'static str,
}

/// Every key the configuration file accepts. Unit tests check this list against the parser (no key missing,
/// none extra), the examples against `ServeConfig::load` and the defaults against the embedded ones;
/// `tests/socket/docs.rs` checks that docs/configuration.md shows `reference_markdown()`.
pub const REFERENCE: &[ConfigKey] = &[
    ConfigKey {
        key: "socket",
        default: "`/run/docker/plugins/ferry.sock`",
        meaning: "Unix socket Docker connects to (mode 0600); its file name without `.sock` is the driver \
                  name. Flag `--socket`, variable `FERRY_SOCKET`",
        example: "\"/run/docker/plugins/ferry.sock\"",
    },
    ConfigKey {
        key: "state_dir",
        default: "`/var/lib/ferry`",
        meaning: "the catalog (`catalog.redb`), local volumes (`local/NAME/`) and the admin socket; created \
                  with mode 0700; keep it on persistent storage and back it up. Flag `--state-dir`, variable \
                  `FERRY_STATE_DIR`",
        example: "\"/srv/ferry\"",
    },
    ConfigKey {
        key: "mount_root",
        default: "none",
        meaning: "if set, volumes are mounted (images) or bind-mounted (directories) at `mount_root/NAME` \
                  and Docker is given that path; a managed plugin sets it to its PropagatedMount. Unset, \
                  Docker is given each volume's data path. Flag `--mount-root`, variable `FERRY_MOUNT_ROOT`",
        example: "\"/mnt/volumes\"",
    },
    ConfigKey {
        key: "admin_socket",
        default: "`STATE_DIR/admin.sock`",
        meaning: "Unix socket of the operator commands (`ferry ls`, `ferry inspect`, `ferry status`, \
                  `ferry doctor`); root-only. Flag `--admin-socket`, variable `FERRY_ADMIN_SOCKET`",
        example: "\"/run/ferry/admin.sock\"",
    },
    ConfigKey {
        key: "default_backend",
        default: "`local`",
        meaning: "backend of volumes created without `-o backend=`; valid: `local`, `nfs` (needs `[nfs]`), `ebs` (needs `[ebs]`)",
        example: "\"local\"",
    },
    ConfigKey {
        key: "local.default_fs",
        default: "`ext4`",
        meaning: "filesystem of size-capped volumes created without `-o fs=`: `ext4` or `xfs`",
        example: "\"xfs\"",
    },
    ConfigKey {
        key: "local.overcommit",
        default: "`false`",
        meaning: "whether the caps (`-o size=`) of capped local volumes may add up to more than the state \
                  filesystem has free. Images are sparse, so a cap is a promise on free space; by default a \
                  create that would promise more (what each image can still grow by, plus the new one) is \
                  refused. `true` allows it and warns in each volume's Status and in `ferry status`: when \
                  the disk fills, writes inside capped volumes fail. `-o preallocate=true` reserves a \
                  volume's space for real",
        example: "true",
    },
    ConfigKey {
        key: "metrics.listen",
        default: "none (off)",
        meaning: "address of the Prometheus endpoint `GET /metrics`: `ferry_calls_total` and \
                  `ferry_call_duration_seconds` by method and outcome (`ok`, `refused`, `error`), \
                  `ferry_backend_errors_total` by backend and kind, `ferry_volumes` by backend, \
                  `ferry_active_mounts`, `ferry_attached_volumes`, and for ebs \
                  `ferry_{shipped,pulled}_{bytes,blocks}_total`. Plain HTTP without authentication: bind \
                  it to loopback or a trusted network",
        example: "\"127.0.0.1:9464\"",
    },
    ConfigKey {
        key: "listeners.idle_timeout",
        default: "`2m`",
        meaning: "how long a connection to any of Ferry's listeners (plugin socket, admin socket, metrics) may \
                  sit unused before Ferry closes it; keep it above Docker's own keep-alive (dockerd closes \
                  idle plugin connections after 30 s, Go's HTTP client after 90 s), so Ferry never closes a \
                  connection Docker is about to reuse",
        example: "\"2m\"",
    },
    ConfigKey {
        key: "listeners.request_timeout",
        default: "`10s`",
        meaning: "how long a request's headers and body may take to arrive, counted from its first byte, \
                  and how long its client may take to read the answer; a connection that is slower is \
                  dropped. Calls themselves are bounded by Docker's deadlines, not by this",
        example: "\"10s\"",
    },
    ConfigKey {
        key: "listeners.plugin_connections",
        default: "`512`",
        meaning: "connections the plugin socket keeps at once; past it the longest-idle one is closed to \
                  admit a new one (a call in progress is never cut). Lowered at start-up, with a warning, \
                  if the open-file limit (`LimitNOFILE`) cannot hold it; 1 to 65536",
        example: "512",
    },
    ConfigKey {
        key: "listeners.admin_connections",
        default: "`32`",
        meaning: "the same for the admin socket; never more than an eighth of the open-file limit (less \
                  256 kept for volumes and backends)",
        example: "32",
    },
    ConfigKey {
        key: "listeners.metrics_connections",
        default: "`32`",
        meaning: "the same for the metrics endpoint, so clients holding TCP connections to it can never use \
                  up the descriptors the plugin socket needs",
        example: "32",
    },
    ConfigKey {
        key: "listeners.docker_uids",
        default: "`[]`",
        meaning: "users, besides root and Ferry's own, whose processes may use the plugin socket (checked \
                  with SO_PEERCRED whatever the socket's mode): the user a rootless dockerd runs as. \
                  Connections from anyone else are closed unanswered",
        example: "[1000]",
    },
    ConfigKey {
        key: "nfs.server",
        default: "none (required with `[nfs]`)",
        meaning: "IP address of the NFS server (NFSv3 over TCP) of volumes created with `-o backend=nfs`; \
                  the `[nfs]` section turns the nfs backend on",
        example: "\"127.0.0.1\"",
    },
    ConfigKey {
        key: "nfs.export",
        default: "none (required with `[nfs]`)",
        meaning: "the export path on that server; each volume is a directory of it, named after the volume \
                  (or `-o subdir=`)",
        example: "\"/export\"",
    },
    ConfigKey {
        key: "nfs.nfs_port",
        default: "none (ask the portmapper)",
        meaning: "the server's NFS port; with `mount_port` also set the portmapper is never asked",
        example: "12049",
    },
    ConfigKey {
        key: "nfs.mount_port",
        default: "none (ask the portmapper)",
        meaning: "the server's MOUNT port",
        example: "12050",
    },
    ConfigKey {
        key: "nfs.uid",
        default: "`0`",
        meaning: "AUTH_UNIX user id of every call to the server (the export must not squash it if volumes \
                  are to get the owners `-o uid=` asks for)",
        example: "0",
    },
    ConfigKey {
        key: "nfs.gid",
        default: "`0`",
        meaning: "AUTH_UNIX group id of every call",
        example: "0",
    },
    ConfigKey {
        key: "nfs.allowed_servers",
        default: "`[]`",
        meaning: "other servers (`\"IP\"`, any export) or exports (`\"IP:/path\"`) that `-o server=` and \
                  `-o export=` may name; nothing else can be reached through volume options",
        example: "[\"10.0.0.6\", \"10.0.0.7:/data\"]",
    },
    ConfigKey {
        key: "nfs.data_path",
        default: "`auto`",
        meaning: "how containers reach the data: `kernel` (an NFS mount), `fuse` (Ferry's own client in a \
                  helper process per mount), `auto` (kernel where `/proc/filesystems` lists nfs, else fuse)",
        example: "\"fuse\"",
    },
    ConfigKey {
        key: "nfs.timeout",
        default: "`10s`",
        meaning: "how long any operation waits on the server before it fails: Create and Mount with an \
                  error naming the server, a system call in a container with EIO (within this plus 0.25 s, \
                  however many calls it needs)",
        example: "\"10s\"",
    },
    ConfigKey {
        key: "nfs.attr_cache",
        default: "`1s`",
        meaning: "how long the FUSE data path caches attributes and names for `stat` and lookups, so other \
                  hosts' changes show up there within it; `0` caches nothing. Data is close-to-open \
                  consistent whatever it says (docs/nfs.md)",
        example: "\"1s\"",
    },
    ConfigKey {
        key: "nfs.connections",
        default: "`8`",
        meaning: "connections to the server per FUSE mount (and for control operations): requests in flight \
                  at once; 1 to 64. Each mount's FUSE helper serves them on one thread per two cores (at \
                  least one; docs/benchmarks.md says why not more)",
        example: "8",
    },
    ConfigKey {
        key: "nfs.locks",
        default: "`nlm`",
        meaning: "where `fcntl` locks on FUSE mounts are kept: `nlm` takes them on the server's lock manager \
                  (NLM 4), so they hold across hosts, and fails them with ENOLCK if the server has none; \
                  `local` keeps them on this host only, where they do not protect data from other hosts \
                  (docs/nfs.md, \"Locks\")",
        example: "\"nlm\"",
    },
    ConfigKey {
        key: "nfs.nlm_port",
        default: "none (ask the portmapper)",
        meaning: "the TCP port of the server's lock manager (NLM 4)",
        example: "4045",
    },
    ConfigKey {
        key: "ebs.region",
        default: "`AWS_REGION` (required with `[ebs]`)",
        meaning: "AWS region of the snapshots of volumes created with `-o backend=ebs`; the `[ebs]` section \
                  turns the ebs backend on. Credentials come only from the AWS chain (environment, profile, \
                  instance role), never from this file or volume options",
        example: "\"us-east-1\"",
    },
    ConfigKey {
        key: "ebs.endpoint_url",
        default: "none (AWS's endpoints of the region)",
        meaning: "URL of an EBS- and EC2-compatible endpoint, for tests (moto) and compatible services",
        example: "\"http://127.0.0.1:5000\"",
    },
    ConfigKey {
        key: "ebs.concurrency",
        default: "`16`",
        meaning: "512 KiB blocks in flight per push or pull; 1 to 256",
        example: "16",
    },
    ConfigKey {
        key: "ebs.cache_dir",
        default: "`STATE_DIR/ebs`",
        meaning: "where local copies (sparse images), block maps and `copy.json` of ebs volumes live; \
                  needs room for the data of every ebs volume used on this host",
        example: "\"/var/cache/ferry-ebs\"",
    },
    ConfigKey {
        key: "ebs.namespace",
        default: "`ferry`",
        meaning: "value of the `ferry:namespace` tag on every snapshot; hosts find each other's volumes only \
                  within one namespace, so unrelated installations in one account never meet",
        example: "\"prod\"",
    },
    ConfigKey {
        key: "ebs.default_size",
        default: "none (`-o size=` required)",
        meaning: "size of ebs volumes created without `-o size=`, such as `20GiB`",
        example: "\"20GiB\"",
    },
    ConfigKey {
        key: "ebs.keep",
        default: "`3`",
        meaning: "generations (snapshots) kept per ebs volume: after a push completes, older snapshots are \
                  deleted, never the newest, one a pull or push in progress reads or a mounted copy is based \
                  on; a host whose copy is more than `keep` generations behind pulls the volume whole \
                  (docs/ebs.md). Ignored with `keep_chain`",
        example: "3",
    },
    ConfigKey {
        key: "ebs.keep_chain",
        default: "`false`",
        meaning: "`true` for services whose snapshots hold only the blocks written to them (moto): a pull \
                  reads the whole chain of snapshots, changed blocks are found from the chain, and no snapshot \
                  is ever deleted by retention. Real EBS needs `false`",
        example: "true",
    },
    ConfigKey {
        key: "cluster.etcd",
        default: "none (required with `[cluster]`)",
        meaning: "cluster mode: the client URLs of the etcd members (`http://` or `https://`); every host of \
                  the cluster lists the same etcd cluster. Without `[cluster]` the embedded catalog serves \
                  this host alone (docs/cluster.md)",
        example: "[\"https://10.0.0.1:2379\", \"https://10.0.0.2:2379\", \"https://10.0.0.3:2379\"]",
    },
    ConfigKey {
        key: "cluster.node",
        default: "the host name",
        meaning: "this host's name in the cluster, unique per host: errors name the host that owns a volume \
                  by it, and `ferry hosts` lists it",
        example: "\"host-a\"",
    },
    ConfigKey {
        key: "cluster.prefix",
        default: "`/ferry`",
        meaning: "the etcd key prefix of this cluster's catalog; clusters sharing one etcd use different \
                  prefixes",
        example: "\"/ferry-prod\"",
    },
    ConfigKey {
        key: "cluster.lease_ttl",
        default: "`10s`",
        meaning: "how long a host's claims outlive it: a dead host's volumes can be mounted elsewhere after \
                  this; a host that cannot renew its lease stops writes to its volumes a quarter of it before",
        example: "\"10s\"",
    },
    ConfigKey {
        key: "cluster.ca",
        default: "none",
        meaning: "PEM file of the CA that signed etcd's server certificates, for `https://` endpoints",
        example: "\"/etc/ferry/etcd-ca.pem\"",
    },
    ConfigKey {
        key: "cluster.cert",
        default: "none",
        meaning: "PEM client certificate for etcd (with `cluster.key`), when etcd checks clients",
        example: "\"/etc/ferry/etcd-client.pem\"",
    },
    ConfigKey {
        key: "cluster.key",
        default: "none",
        meaning: "PEM private key of `cluster.cert`; keep it readable by root only",
        example: "\"/etc/ferry/etcd-client-key.pem\"",
    },
    ConfigKey {
        key: "cluster.user",
        default: "none",
        meaning: "etcd user name (etcd's own authentication), with `cluster.password_file`",
        example: "\"ferry\"",
    },
    ConfigKey {
        key: "cluster.password_file",
        default: "none",
        meaning: "file holding the etcd user's password (one line); never logged or shown. Keep it readable \
                  by root only",
        example: "\"/etc/ferry/etcd-password\"",
    },
];

/// The configuration reference as a Markdown table, one row per key of `REFERENCE`.
pub fn reference_markdown() -> String {
    // A `|` inside a cell would end it early.
    let cell = |s: &str| s.replace('|', "\\|");
    let mut out = String::from("| key | default | example | meaning |\n|---|---|---|---|\n");
    for k in REFERENCE {
        out.push_str(&format!(
            "| `{}` | {} | `{}` | {} |\n",
            k.key,
            cell(k.default),
            cell(k.example),
            cell(k.meaning)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_file(text: &str) -> (tempfile::TempDir, Overrides) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.toml");
        std::fs::write(&path, text).unwrap();
        let over = Overrides {
            config: Some(path),
            ..Default::default()
        };
        (dir, over)
    }

    #[test]
    fn embedded_defaults() {
        let c = ServeConfig::load(&Overrides::default()).unwrap();
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(c.defaults.backend, BackendKind::Local);
        assert_eq!(c.defaults.fs, FsType::Ext4);
        assert_eq!(
            c.admin_socket,
            PathBuf::from(DEFAULT_STATE_DIR).join("admin.sock")
        );
    }

    #[test]
    fn file_then_flags() {
        let (_d, mut over) = with_file(
            "state_dir = \"/srv/ferry\"\nsocket = \"/tmp/f.sock\"\n[local]\ndefault_fs = \"xfs\"\n",
        );
        let c = ServeConfig::load(&over).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/srv/ferry"));
        assert_eq!(c.defaults.fs, FsType::Xfs);
        over.socket = Some("/run/x.sock".into());
        assert_eq!(
            ServeConfig::load(&over).unwrap().socket,
            PathBuf::from("/run/x.sock")
        );
    }

    #[test]
    fn bad_files_are_refused() {
        let (_d, over) = with_file("stat_dir = \"/x\"\n");
        assert!(ServeConfig::load(&over)
            .unwrap_err()
            .to_string()
            .contains("stat_dir"));
        let (_d, over) = with_file("default_backend = \"tape\"\n");
        let err = ServeConfig::load(&over).unwrap_err().to_string();
        assert!(
            err.contains("default_backend") && err.contains("local"),
            "{err}"
        );
        let (_d, over) = with_file("[metrics]\nlisten = \"localhost\"\n");
        assert!(ServeConfig::load(&over)
            .unwrap_err()
            .to_string()
            .contains("metrics.listen"));
        let (_d, over) = with_file("[local]\ndefault_fs = \"fat\"\n");
        assert!(ServeConfig::load(&over).is_err());
        let missing = Overrides {
            config: Some("/nonexistent/ferry.toml".into()),
            ..Default::default()
        };
        assert!(matches!(
            ServeConfig::load(&missing),
            Err(ConfigError::Read { .. })
        ));
    }

    #[test]
    fn ebs_section() {
        let (_d, over) = with_file(
            "default_backend = \"ebs\"\n[ebs]\nregion = \"eu-west-1\"\nconcurrency = 4\ndefault_size = \"2GiB\"\n",
        );
        let c = ServeConfig::load(&over).unwrap();
        let e = c.ebs.unwrap();
        assert_eq!((e.region.as_str(), e.concurrency), ("eu-west-1", 4));
        assert_eq!(e.namespace, "ferry");
        assert_eq!((e.keep, e.keep_chain), (3, false));
        assert_eq!(c.defaults.ebs.unwrap().default_size, Some(2 << 30));
        let (_d, over) = with_file("[ebs]\nregion = \"eu-west-1\"\nkeep = 1\nkeep_chain = true\n");
        let e = ServeConfig::load(&over).unwrap().ebs.unwrap();
        assert_eq!((e.keep, e.keep_chain), (1, true));
        for (text, key) in [
            ("[ebs]\nregion = \"EU West\"\n", "ebs.region"),
            ("[ebs]\nregion = \"eu-west-1\"\nkeep = 0\n", "ebs.keep"),
            (
                "[ebs]\nregion = \"eu-west-1\"\nconcurrency = 0\n",
                "ebs.concurrency",
            ),
            (
                "[ebs]\nregion = \"eu-west-1\"\nnamespace = \"a b\"\n",
                "ebs.namespace",
            ),
            (
                "[ebs]\nregion = \"eu-west-1\"\nendpoint_url = \"ftp://x\"\n",
                "ebs.endpoint_url",
            ),
            (
                "[ebs]\nregion = \"eu-west-1\"\ndefault_size = \"1K\"\n",
                "ebs.default_size",
            ),
            ("default_backend = \"ebs\"\n", "default_backend"),
        ] {
            let (_d, over) = with_file(text);
            let err = ServeConfig::load(&over).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    /// The fields serde accepts in the table at `path` ("" for the top level), learnt from the parser
    /// itself: an unknown key there makes `deny_unknown_fields` list the expected ones.
    fn accepted_fields(path: &str) -> Vec<String> {
        let probe = "zz_not_a_key";
        let text = if path.is_empty() {
            format!("{probe} = 1\n")
        } else {
            format!("[{path}]\n{probe} = 1\n")
        };
        let err = toml::from_str::<FileConfig>(&text).unwrap_err().to_string();
        let marker = format!("unknown field `{probe}`, ");
        let rest = err
            .split_once(&marker)
            .unwrap_or_else(|| panic!("no unknown-field error for [{path}]: {err}"))
            .1;
        let line = rest.lines().next().unwrap_or("");
        if line.starts_with("there are no fields") {
            return Vec::new();
        }
        // serde writes "expected `a`", "expected `a` or `b`" or "expected one of `a`, `b`, `c`".
        line.split('`')
            .skip(1)
            .step_by(2)
            .map(String::from)
            .collect()
    }

    /// Whether the field at `path` is a table with fields of its own (a section) rather than a value.
    fn is_section(path: &str) -> bool {
        let err = toml::from_str::<FileConfig>(&format!("[{path}]\nzz_not_a_key = 1\n"))
            .unwrap_err()
            .to_string();
        err.contains("unknown field `zz_not_a_key`")
    }

    /// Every key path the parser accepts, sections expanded.
    fn parser_keys(path: &str, out: &mut Vec<String>) {
        for field in accepted_fields(path) {
            let full = if path.is_empty() {
                field
            } else {
                format!("{path}.{field}")
            };
            if is_section(&full) {
                parser_keys(&full, out);
            } else {
                out.push(full);
            }
        }
    }

    #[test]
    fn reference_lists_exactly_the_keys_the_parser_accepts() {
        let mut parsed = Vec::new();
        parser_keys("", &mut parsed);
        parsed.sort();
        let mut documented: Vec<String> = REFERENCE.iter().map(|k| k.key.to_string()).collect();
        documented.sort();
        assert!(
            parsed.len() >= 7,
            "the probe found too few keys: {parsed:?}"
        );
        assert_eq!(
            parsed, documented,
            "config::REFERENCE must list every key of the configuration file, and only those"
        );
    }

    #[test]
    fn every_reference_example_loads() {
        // Top-level keys first: after a [section] header every key belongs to that section.
        let mut text = String::new();
        let mut sections: std::collections::BTreeMap<&str, String> = Default::default();
        for k in REFERENCE {
            match k.key.split_once('.') {
                None => text.push_str(&format!("{} = {}\n", k.key, k.example)),
                Some((section, key)) => sections
                    .entry(section)
                    .or_default()
                    .push_str(&format!("{key} = {}\n", k.example)),
            }
        }
        for (section, body) in sections {
            text.push_str(&format!("[{section}]\n{body}"));
        }
        let (_d, over) = with_file(&text);
        let c = ServeConfig::load(&over).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(c.state_dir, PathBuf::from("/srv/ferry"));
        assert_eq!(c.defaults.fs, FsType::Xfs);
        assert!(c.metrics_listen.is_some());
    }

    #[test]
    fn reference_defaults_are_the_embedded_ones() {
        let c = ServeConfig::load(&Overrides::default()).unwrap();
        // The [nfs] defaults apply once the section names its two required keys.
        let (_d, over) = with_file("[nfs]\nserver = \"10.0.0.5\"\nexport = \"/x\"\n");
        let nfs = ServeConfig::load(&over).unwrap().nfs.unwrap();
        let (_d2, over) = with_file("[ebs]\nregion = \"eu-west-1\"\n");
        let ebs = ServeConfig::load(&over).unwrap().ebs.unwrap();
        let code = |s: &str| format!("`{s}`");
        for k in REFERENCE {
            let expected = match k.key {
                "socket" => code(&c.socket.display().to_string()),
                "state_dir" => code(&c.state_dir.display().to_string()),
                "mount_root" => {
                    assert!(c.mount_root.is_none());
                    "none".into()
                }
                "admin_socket" => code(
                    &default_admin_socket(Path::new("STATE_DIR"))
                        .display()
                        .to_string(),
                ),
                "default_backend" => code(c.defaults.backend.as_str()),
                "local.default_fs" => code(c.defaults.fs.as_str()),
                "local.overcommit" => code(&c.local_overcommit.to_string()),
                "metrics.listen" => {
                    assert!(c.metrics_listen.is_none());
                    "none (off)".into()
                }
                "listeners.idle_timeout" => {
                    code(&humantime::format_duration(c.listeners.idle_timeout).to_string())
                }
                "listeners.request_timeout" => {
                    code(&humantime::format_duration(c.listeners.request_timeout).to_string())
                }
                "listeners.plugin_connections" => code(&c.listeners.plugin_connections.to_string()),
                "listeners.admin_connections" => code(&c.listeners.admin_connections.to_string()),
                "listeners.metrics_connections" => {
                    code(&c.listeners.metrics_connections.to_string())
                }
                "listeners.docker_uids" => {
                    assert!(c.listeners.docker_uids.is_empty());
                    "`[]`".into()
                }
                "nfs.server" | "nfs.export" => {
                    assert!(c.nfs.is_none());
                    "none (required with `[nfs]`)".into()
                }
                "nfs.nfs_port" | "nfs.mount_port" => {
                    assert_eq!(nfs.client.nfs_port.or(nfs.client.mount_port), None);
                    "none (ask the portmapper)".into()
                }
                "nfs.uid" => code(&nfs.client.uid.to_string()),
                "nfs.gid" => code(&nfs.client.gid.to_string()),
                "nfs.allowed_servers" => {
                    assert!(nfs.allowed_servers.is_empty());
                    "`[]`".into()
                }
                "nfs.data_path" => code(nfs.data_path.as_str()),
                "nfs.timeout" => code(&humantime::format_duration(nfs.client.timeout).to_string()),
                "nfs.attr_cache" => code(&humantime::format_duration(nfs.attr_cache).to_string()),
                "nfs.connections" => code(&nfs.client.connections.to_string()),
                "nfs.locks" => code(nfs.locks.as_str()),
                "nfs.nlm_port" => {
                    assert_eq!(nfs.nlm_port, None);
                    "none (ask the portmapper)".into()
                }
                "ebs.region" => {
                    assert!(c.ebs.is_none());
                    "`AWS_REGION` (required with `[ebs]`)".into()
                }
                "ebs.endpoint_url" => {
                    assert!(ebs.endpoint_url.is_none());
                    "none (AWS's endpoints of the region)".into()
                }
                "ebs.concurrency" => code(&ebs.concurrency.to_string()),
                "ebs.cache_dir" => {
                    assert!(ebs.cache_dir.is_none());
                    "`STATE_DIR/ebs`".into()
                }
                "ebs.namespace" => code(&ebs.namespace),
                "ebs.default_size" => {
                    assert!(ebs.default_size.is_none());
                    "none (`-o size=` required)".into()
                }
                "ebs.keep" => code(&ebs.keep.to_string()),
                "ebs.keep_chain" => code(&ebs.keep_chain.to_string()),
                "cluster.etcd" => {
                    assert!(c.cluster.is_none());
                    "none (required with `[cluster]`)".into()
                }
                "cluster.node" => "the host name".into(),
                "cluster.prefix" => code(CLUSTER_DEFAULT_PREFIX),
                "cluster.lease_ttl" => {
                    code(&humantime::format_duration(CLUSTER_DEFAULT_LEASE_TTL).to_string())
                }
                "cluster.ca"
                | "cluster.cert"
                | "cluster.key"
                | "cluster.user"
                | "cluster.password_file" => "none".into(),
                other => panic!("add a check of the documented default of {other:?} here"),
            };
            assert_eq!(k.default, expected, "documented default of {}", k.key);
        }
    }

    #[test]
    fn reference_markdown_is_one_row_per_key() {
        let md = reference_markdown();
        let rows: Vec<_> = md.lines().collect();
        assert_eq!(rows.len(), REFERENCE.len() + 2, "{md}");
        for (row, k) in rows[2..].iter().zip(REFERENCE) {
            assert!(row.starts_with(&format!("| `{}` |", k.key)), "{row}");
            // Four cells: five unescaped bars.
            assert_eq!(row.replace("\\|", "").matches('|').count(), 5, "{row}");
        }
    }

    #[test]
    fn listeners_section() {
        let (_d, over) = with_file(
            "[listeners]\nidle_timeout = \"1s\"\nrequest_timeout = \"500ms\"\nplugin_connections = 8\n\
             docker_uids = [1000, 1001]\n",
        );
        let l = ServeConfig::load(&over).unwrap().listeners;
        assert_eq!(l.idle_timeout, std::time::Duration::from_secs(1));
        assert_eq!(l.request_timeout, std::time::Duration::from_millis(500));
        assert_eq!(l.plugin_connections, 8);
        assert_eq!(
            l.admin_connections,
            crate::listener::DEFAULT_ADMIN_CONNECTIONS
        );
        assert_eq!(l.docker_uids, vec![1000, 1001]);
        // The default outlives the keep-alive of every client Docker uses (30 s and 90 s).
        assert!(ListenerSettings::default().idle_timeout > std::time::Duration::from_secs(90));
        for (text, key) in [
            ("idle_timeout = \"0\"", "listeners.idle_timeout"),
            ("idle_timeout = \"soon\"", "listeners.idle_timeout"),
            ("request_timeout = \"10ms\"", "listeners.request_timeout"),
            ("plugin_connections = 0", "listeners.plugin_connections"),
            (
                "metrics_connections = 1000000",
                "listeners.metrics_connections",
            ),
        ] {
            let (_d, over) = with_file(&format!("[listeners]\n{text}\n"));
            let err = ServeConfig::load(&over).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
        let (_d, over) = with_file("[listeners]\ndocker_uids = [-1]\n");
        assert!(ServeConfig::load(&over).is_err());
    }

    #[test]
    fn nfs_section() {
        let (_d, over) = with_file(
            "default_backend = \"nfs\"\n[nfs]\nserver = \"127.0.0.1\"\nexport = \"/export/\"\n\
             nfs_port = 12049\nmount_port = 12050\ntimeout = \"2s\"\nattr_cache = \"0\"\n\
             allowed_servers = [\"10.0.0.6\"]\n",
        );
        let c = ServeConfig::load(&over).unwrap();
        let n = c.nfs.unwrap();
        assert_eq!(n.client.export, "/export");
        assert_eq!(n.client.timeout, std::time::Duration::from_secs(2));
        assert_eq!(n.attr_cache, std::time::Duration::ZERO);
        assert_eq!(c.defaults.backend, BackendKind::Nfs);
        let d = c.defaults.nfs.unwrap();
        assert_eq!(d.server, "127.0.0.1");
        assert_eq!(d.allowed.len(), 1);
        for (text, key) in [
            ("[nfs]\nexport = \"/x\"\n", "nfs.server"),
            (
                "[nfs]\nserver = \"nfs.example\"\nexport = \"/x\"\n",
                "nfs.server",
            ),
            ("[nfs]\nserver = \"10.0.0.5\"\n", "nfs.export"),
            (
                "[nfs]\nserver = \"10.0.0.5\"\nexport = \"/x\"\ndata_path = \"nfs4\"\n",
                "nfs.data_path",
            ),
            (
                "[nfs]\nserver = \"10.0.0.5\"\nexport = \"/x\"\ntimeout = \"soon\"\n",
                "nfs.timeout",
            ),
            (
                "[nfs]\nserver = \"10.0.0.5\"\nexport = \"/x\"\nallowed_servers = [\"h:/x\"]\n",
                "nfs.allowed_servers",
            ),
            (
                "[nfs]\nserver = \"10.0.0.5\"\nexport = \"/x\"\nconnections = 0\n",
                "nfs.connections",
            ),
            ("default_backend = \"nfs\"\n", "default_backend"),
        ] {
            let (_d, over) = with_file(text);
            let err = ServeConfig::load(&over).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }
}

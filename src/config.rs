//! Configuration: command-line flags and `FERRY_*` variables (parsed by the binary), an optional TOML file,
//! and the embedded defaults, merged in that order of precedence into one typed `ServeConfig`. Nothing
//! below this module sees clap types.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::spec::{BackendKind, FsType, SpecDefaults};

pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/ferry.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ferry";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
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
}

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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsSection {
    /// An address such as "127.0.0.1:9464"; unset turns the endpoint off.
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalSection {
    /// The filesystem of size-capped volumes created without `-o fs=`.
    default_fs: Option<String>,
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
        })
    }
}

/// Where the admin socket is when nothing names it: inside the state directory, whose mode 0700 already
/// keeps it root-only, and which a managed plugin shares with the host through its bind mount.
pub fn default_admin_socket(state_dir: &Path) -> PathBuf {
    state_dir.join(ADMIN_SOCKET_NAME)
}

/// The admin socket's file name inside the state directory.
pub const ADMIN_SOCKET_NAME: &str = "admin.sock";

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
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
}

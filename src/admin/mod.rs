//! The operator's admin socket: a small JSON API over HTTP on a root-only Unix socket, served by `ferry
//! serve` beside Docker's socket, and the client the `ferry ls|inspect|status|doctor|checkpoint|release|ebs`
//! commands use. It exposes what `VolumeService` knows. Docker stays the only one to create, mount or remove
//! volumes; the operator's actions ship a volume's changes now (`checkpoint`), drop mount IDs Docker will
//! never unmount (`release`) and set a conflicting ebs copy aside (`ebs set-aside`).

pub mod client;
pub mod server;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::service::{BackendReport, ReconcileReport};

pub use client::{AdminClient, ClientError};
pub use server::{serve, AdminContext, SetAside};

/// The daemon as `ferry status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub version: String,
    pub pid: u32,
    /// Seconds since the Unix epoch.
    pub started_at: u64,
    pub uptime_secs: u64,
    pub socket: PathBuf,
    pub admin_socket: PathBuf,
    pub state_dir: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_root: Option<PathBuf>,
    pub default_backend: String,
    pub volumes: u64,
    pub attached_volumes: u64,
    pub active_mounts: u64,
    /// What start-up reconciliation did.
    pub reconcile: ReconcileReport,
    pub backends: Vec<BackendReport>,
}

/// The body of every error answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

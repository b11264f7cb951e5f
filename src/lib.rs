//! Ferry: a Docker volume plugin that routes each volume to a backend.
//!
//! - `admin`: the operator's API on a root-only socket (what the service knows, plus the `checkpoint`,
//!   `release` and `ebs set-aside` actions), and its client for the CLI.
//! - `cli`: the operator commands (`ls`, `inspect`, `status`, `doctor`, `checkpoint`, `release`,
//!   `ebs set-aside`): tables and `--json`.
//! - `config`: flags, environment and the TOML file merged into one typed configuration.
//! - `daemon`: `ferry serve`, which wires the parts together and owns start-up and shutdown order.
//! - `doctor`: the host checks behind `ferry doctor`.
//! - `durable`: small state files replaced atomically and durably (temporary file, fsync, rename, fsync).
//! - `host`: this host's identity (`HostId`: a stable id kept in the state directory, and the hostname).
//! - `listener`: the HTTP serving shared by the plugin, admin and metrics listeners: sockets bound with no
//!   window for other users, peer checks, connection caps, idle and request timeouts, graceful stop.
//! - `plugin`: Docker's volume-plugin protocol (wire types, routing, the HTTP server on the Unix socket).
//! - `service`: `VolumeService`, the protocol-agnostic core (locks, mount counts, reconciliation).
//! - `spec`: validation of volume names and options into a `VolumeSpec`.
//! - `sync`: std locks recovered from poisoning, one way everywhere.
//! - `catalog`: the persistent record of volumes, behind a compare-and-swap trait.
//! - `backend`: the `Backend` trait and the `local`, `nfs` and `ebs` backends (ebs: block maps, the EBS direct
//!   APIs client, shipping and checkpoints).
//! - `nfs`: an NFSv3 client for control operations on an export (pooled, with deadlines).
//! - `metrics`: Prometheus counters, histograms and gauges, and their optional HTTP endpoint.
//! - `notify`: systemd readiness notification.
//! - `fuse`: a `FileStore` (NFSv3-shaped remote filesystem) served as a FUSE mount, with an in-memory store for tests.
//! - `mount`: mount(2), loop devices, mkfs and the mount table, with a recording double for tests.

// What the house style already demands, held by the compiler: every unsafe block explains itself, and
// production code never unwraps (tests may).
#![deny(clippy::undocumented_unsafe_blocks)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod backend;
pub mod catalog;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod durable;
pub mod fuse;
pub mod host;
pub mod listener;
pub mod metrics;
pub mod mount;
pub mod nfs;
pub mod notify;
pub mod plugin;
pub mod service;
pub mod spec;
pub mod sync;

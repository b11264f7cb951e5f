//! Tier "root": the real daemon on a temporary socket and state directory, with real mounts, loop devices,
//! FUSE and other users' credentials: the protocol, restarts and kill -9, the local backend, full disks,
//! listeners under abuse, the admin CLI, metrics and the systemd installation. Needs root and /dev/fuse
//! (see tests/common/tier.rs for what happens without them).

#[path = "../common/mod.rs"]
mod common;
#[allow(dead_code)]
#[macro_use]
#[path = "../common/tier.rs"]
mod tier;

mod admin;
mod full_disk;
mod fuse_memory;
mod listeners;
mod local_backend;
mod metrics;
mod protocol;
mod restart;
mod systemd;

tier_gate!("root", [Need::Root, Need::Device("/dev/fuse")], None);

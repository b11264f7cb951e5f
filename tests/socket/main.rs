//! Tier "socket": everything that needs no root, no devices and no installed peer, so a plain `cargo test`
//! as any user runs it (with the unit tests): Docker's protocol in process behind a real socket, the
//! property test of the service against a model, the strict EBS emulator, the listener's spare descriptor,
//! and the documentation checked against the code.

#[path = "../common/mod.rs"]
mod common;
#[path = "../common/ebs_strict.rs"]
mod ebs_strict;

mod docs;
mod ebs_emulator;
mod listener_fd_spare;
mod model;
mod plugin_socket;

use std::path::Path;
use std::sync::Arc;

use ferry::backend::LocalBackend;
use ferry::catalog::RedbCatalog;
use ferry::mount::RecordingMounter;
use ferry::service::VolumeService;
use ferry::spec::SpecDefaults;

/// The real service, catalog and local backend on `dir`, with `mounter` standing in for mount(2); on an
/// existing `dir` it starts as `ferry serve` does after a restart.
async fn start_service(dir: &Path, mounter: &Arc<RecordingMounter>) -> Arc<VolumeService> {
    let catalog = Arc::new(RedbCatalog::open(&dir.join("catalog.redb")).unwrap());
    let local = Arc::new(LocalBackend::new(dir.join("local"), mounter.clone()).unwrap());
    VolumeService::start(
        catalog,
        vec![local],
        mounter.clone(),
        SpecDefaults::default(),
    )
    .await
    .unwrap()
    .0
}

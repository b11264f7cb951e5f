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

//! moto (an independent implementation of the EBS direct APIs and EC2) as a test peer, started through
//! `scripts/moto-server` on a free loopback port. moto is required, not optional: a machine that cannot
//! install it fails the tests that need it with the reason, instead of skipping them.
//!
//! Include it with `#[path = "common/moto.rs"] mod moto;`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The secret access key of the dummy credentials; tests check that it never shows anywhere.
pub const TEST_SECRET: &str = "ferry-test-secret-never-shown";

/// Dummy credentials through the standard AWS chain, and nothing from this machine's own AWS setup: what
/// every Ferry daemon of the EBS tests gets in its environment.
pub const TEST_AWS_ENV: [(&str, &str); 5] = [
    ("AWS_ACCESS_KEY_ID", "AKIDFERRYTEST"),
    ("AWS_SECRET_ACCESS_KEY", TEST_SECRET),
    ("AWS_CONFIG_FILE", "/nonexistent"),
    ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

pub struct Moto {
    pub port: u16,
    /// The address it listens on.
    pub host: String,
    dir: tempfile::TempDir,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/moto-server")
}

fn free_port(host: &str) -> u16 {
    std::net::TcpListener::bind((host, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Moto {
    pub fn start() -> Moto {
        Moto::start_on("127.0.0.1")
    }

    /// Starts on `host` instead of loopback, such as a test network's gateway (tests/common/cluster.rs),
    /// which daemons in other network namespaces can reach.
    pub fn start_on(host: &str) -> Moto {
        let dir = tempfile::Builder::new()
            .prefix("ferry-moto")
            .tempdir()
            .unwrap();
        // A port another test takes between our probe and moto's bind makes start fail; try a few.
        for _ in 0..5 {
            let port = free_port(host);
            let out = Command::new(script())
                .args(["start", &port.to_string()])
                .arg(dir.path())
                .arg(host)
                .output()
                .expect("run scripts/moto-server");
            if out.status.success() {
                return Moto {
                    port,
                    host: host.to_string(),
                    dir,
                };
            }
            eprintln!(
                "scripts/moto-server start failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        panic!(
            "moto did not start; run `scripts/moto-server install` (it needs PyPI) and see {}",
            dir.path().join("moto.log").display()
        );
    }

    /// The `[ebs]` lines a daemon on moto needs besides its endpoint: moto's snapshots hold only their own
    /// blocks, so Ferry must read whole chains and never delete history (`keep_chain`).
    pub const EBS_LINES: &'static str = "keep_chain = true\n";

    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    /// Where its pid and log are.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("moto.log")).unwrap_or_default()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

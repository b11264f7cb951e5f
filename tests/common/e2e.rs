//! What every end-to-end test through dockerd shares: one lock, so tests that register plugins, start
//! second dockerds or load images never run at once (in one binary or across binaries), and unique run
//! ids for the names and labels of what a run creates.
//!
//! Include it with `#[path = "common/e2e.rs"] mod e2e;` (it depends on nothing else in tests/common).

use std::fs::File;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Held by every dockerd test while it runs.
pub const E2E_LOCK_FILE: &str = "/tmp/ferry-e2e-docker.lock";

/// Holds `E2E_LOCK_FILE` exclusively until dropped (flock locks belong to the open file, so threads of one
/// process exclude each other too).
pub fn lock_docker_tests() -> Flock<File> {
    let mut file =
        File::create(E2E_LOCK_FILE).unwrap_or_else(|e| panic!("cannot open {E2E_LOCK_FILE}: {e}"));
    loop {
        match Flock::lock(file, FlockArg::LockExclusive) {
            Ok(lock) => return lock,
            Err((f, Errno::EINTR)) => file = f,
            Err((_, e)) => panic!("cannot lock {E2E_LOCK_FILE}: {e}"),
        }
    }
}

/// `<pid>-<random hex>`, unique per call and run.
pub fn run_id() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let random = nanos
        .wrapping_mul(2_654_435_761)
        .wrapping_add(n.wrapping_mul(40_503))
        & 0xff_ffff;
    format!("{}-{random:06x}", std::process::id())
}

//! The gate of a test tier that needs more than a build: root, devices, installed peers, a dockerd. Each
//! such tier is one test binary whose `main.rs` declares its needs with [`tier_gate!`], which runs [`gate`]
//! before libtest starts (from `.init_array`, the only hook a libtest binary has), so the whole tier is
//! judged once:
//! - everything it needs is here: the tests run;
//! - something is missing and `FERRY_TEST_TIERS=all` (scripts/test sets it): the binary fails at once with
//!   what is missing and how to get it, so CI can never pass on tests that did not run;
//! - something is missing otherwise (a developer's plain `cargo test`): one line says the tier was skipped
//!   and why, and the binary exits successfully without running or counting any of its tests.

use std::os::unix::net::UnixStream;
use std::path::Path;

/// Something a tier cannot run without.
pub enum Need {
    /// Mounting, loop devices, other users' credentials.
    Root,
    /// A character device, e.g. /dev/fuse.
    Device(&'static str),
    /// A program on PATH (or in /usr/sbin, /sbin), and the package that has it.
    Program(&'static str, &'static str),
    /// dockerd answering on /var/run/docker.sock.
    Dockerd,
}

impl Need {
    /// Why it is missing and what to do, or `None` when it is here.
    fn missing(&self) -> Option<String> {
        match self {
            Need::Root => (!nix::unistd::geteuid().is_root())
                .then(|| "it needs root (run `sudo -E cargo test` or scripts/test)".to_string()),
            Need::Device(path) => (!Path::new(path).exists())
                .then(|| format!("{path} is missing (load its module, e.g. `modprobe fuse`)")),
            Need::Program(name, package) => {
                let found = std::env::var_os("PATH")
                    .into_iter()
                    .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                    .chain(["/usr/sbin".into(), "/sbin".into()])
                    .any(|dir| dir.join(name).is_file());
                (!found).then(|| format!("{name} is not installed (scripts/deps installs {package})"))
            }
            Need::Dockerd => UnixStream::connect("/var/run/docker.sock").err().map(|e| {
                format!("dockerd does not answer on /var/run/docker.sock ({e}); start it, or set FERRY_SKIP_DOCKER=1 to skip this tier")
            }),
        }
    }
}

/// Runs the tier, skips it with one line, or fails it, as the module documentation says. `skip_var`
/// names a variable that, set to 1, skips the tier explicitly even under scripts/test.
pub fn gate(tier: &str, needs: &[Need], skip_var: Option<&str>) {
    if let Some(var) = skip_var {
        if std::env::var(var).as_deref() == Ok("1") {
            eprintln!("tier {tier}: skipped because {var}=1");
            std::process::exit(0);
        }
    }
    let missing: Vec<String> = needs.iter().filter_map(Need::missing).collect();
    if missing.is_empty() {
        return;
    }
    let why = missing.join("; ");
    if std::env::var("FERRY_TEST_TIERS").as_deref() == Ok("all") {
        eprintln!("tier {tier}: cannot run: {why}");
        std::process::exit(101);
    }
    eprintln!(
        "tier {tier}: skipped, not run: {why} (scripts/test runs every tier and fails instead)"
    );
    std::process::exit(0);
}

/// Declares the tier's gate: `tier_gate!("root", [Need::Root], None)` in a tier's `main.rs`, after
/// `mod tier;`.
macro_rules! tier_gate {
    ($tier:literal, [$($need:expr),* $(,)?], $skip:expr) => {
        // Runs before libtest's main: the only place a libtest binary can judge its tier once.
        #[used]
        #[link_section = ".init_array"]
        static GATE: extern "C" fn() = {
            extern "C" fn gate() {
                #[allow(unused_imports)]
                use crate::tier::Need;
                crate::tier::gate($tier, &[$($need),*], $skip);
            }
            gate
        };
    };
}

//! A real NFS-Ganesha for tests: one server per `Ganesha`, started by `scripts/nfs-server` on free
//! loopback ports in its own temporary directory, stopped (even when frozen) when dropped. The one
//! harness every NFS test uses, from the client tests to the dockerd tests.
//!
//! Ganesha and rpcbind must be installed (`scripts/deps`); without them tests fail.

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferry::nfs::{NfsClient, NfsClientConfig};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// ganesha.nfsd and rpcbind live in /usr/sbin, which a non-login PATH may lack.
const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub struct Ganesha {
    /// The server's own directory: its config, pid file, log and the `export` directory.
    pub dir: tempfile::TempDir,
    pub nfs_port: u16,
    pub mount_port: u16,
    /// The lock manager's (NLM 4) TCP port; None for a server started without one.
    pub nlm_port: Option<u16>,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/nfs-server")
}

fn installed(cmd: &str) -> bool {
    std::env::split_paths(SYSTEM_PATH).any(|p| p.join(cmd).is_file())
}

/// Three ports that were free a moment ago (the script refuses ports in use, and the caller retries).
fn free_ports() -> (u16, u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpListener::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
        c.local_addr().unwrap().port(),
    )
}

fn run_script(
    dir: &Path,
    nfs_port: u16,
    mount_port: u16,
    nlm_port: Option<u16>,
    action: &str,
) -> bool {
    let out = Command::new(script())
        .arg(action)
        .arg(dir)
        .env("NFS_PORT", nfs_port.to_string())
        .env("MOUNT_PORT", mount_port.to_string())
        .env(
            "NLM_PORT",
            nlm_port.map_or_else(|| "off".to_string(), |p| p.to_string()),
        )
        .env("PATH", SYSTEM_PATH)
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!(
            "scripts/nfs-server {action} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.status.success()
}

impl Ganesha {
    /// Starts a server with a lock manager (NLM 4 on a port of its own).
    pub fn start() -> Ganesha {
        Self::start_with(true)
    }

    /// Starts a server without a lock manager.
    pub fn start_without_nlm() -> Ganesha {
        Self::start_with(false)
    }

    fn start_with(nlm: bool) -> Ganesha {
        if !installed("ganesha.nfsd") || !installed("rpcbind") {
            panic!("ganesha.nfsd or rpcbind is missing: run scripts/deps as root");
        }
        let dir = tempfile::Builder::new()
            .prefix("ferry-nfs")
            .tempdir()
            .unwrap();
        for _ in 0..3 {
            let (nfs_port, mount_port, nlm_port) = free_ports();
            let nlm_port = nlm.then_some(nlm_port);
            if run_script(dir.path(), nfs_port, mount_port, nlm_port, "start") {
                return Ganesha {
                    dir,
                    nfs_port,
                    mount_port,
                    nlm_port,
                };
            }
        }
        panic!("scripts/nfs-server start failed three times; see the output above");
    }

    /// The exported directory on this machine's disk.
    pub fn export(&self) -> PathBuf {
        self.dir.path().join("export")
    }

    pub fn pid(&self) -> Pid {
        let text = std::fs::read_to_string(self.dir.path().join("ganesha.pid")).unwrap();
        Pid::from_raw(text.trim().parse().unwrap())
    }

    /// Freezes the server (SIGSTOP) and waits until every thread has stopped: delivery is asynchronous,
    /// and a thread still running could answer one more call.
    pub fn freeze(&self) {
        kill(self.pid(), Signal::SIGSTOP).unwrap();
        self.wait_until_frozen();
    }

    fn wait_until_frozen(&self) {
        let tasks = format!("/proc/{}/task", self.pid());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let all_stopped = std::fs::read_dir(&tasks).unwrap().all(|task| {
                let stat =
                    std::fs::read_to_string(task.unwrap().path().join("stat")).unwrap_or_default();
                // The state follows the parenthesised command name.
                stat.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('T'))
            });
            if all_stopped {
                return;
            }
            assert!(Instant::now() < deadline, "ganesha did not stop within 5 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn thaw(&self) {
        kill(self.pid(), Signal::SIGCONT).unwrap();
    }

    /// Runs `scripts/nfs-server ACTION` for this server; whether it succeeded.
    pub fn run_script(&self, action: &str) -> bool {
        run_script(
            self.dir.path(),
            self.nfs_port,
            self.mount_port,
            self.nlm_port,
            action,
        )
    }

    /// Stops the server, as a crash or a maintenance would.
    pub fn stop(&self) {
        assert!(self.run_script("stop"));
    }

    /// Starts it again on the same ports and export. Retried: ganesha exits with "Cannot register NFS V3
    /// on TCP" when another test's server registers with rpcbind at the same moment.
    pub fn restart(&self) {
        for attempt in 1..=5 {
            if self.run_script("start") {
                return;
            }
            eprintln!("restart attempt {attempt} failed; trying again");
            std::thread::sleep(Duration::from_millis(300));
        }
        panic!("scripts/nfs-server start failed five times on the same ports");
    }

    /// A client configuration for this server, with a 5 s deadline.
    pub fn config(&self) -> NfsClientConfig {
        let mut config = NfsClientConfig::new(LOCALHOST, "/export");
        config.nfs_port = Some(self.nfs_port);
        config.mount_port = Some(self.mount_port);
        config.timeout = Duration::from_secs(5);
        config
    }

    pub fn client(&self) -> NfsClient {
        NfsClient::new(self.config())
    }

    /// An `[nfs]` configuration section for Ferry pointing at this server. Its lock manager is named by
    /// port: every test server registers one with the machine's single rpcbind, so asking it could name
    /// another test's server. A server without one gets a port where nothing listens.
    pub fn config_section(&self, timeout: &str) -> String {
        let nlm_port = self.nlm_port.unwrap_or_else(|| free_ports().2);
        format!(
            "[nfs]\nserver = \"127.0.0.1\"\nexport = \"/export\"\nnfs_port = {}\nmount_port = {}\n\
             nlm_port = {nlm_port}\ntimeout = \"{timeout}\"\ndata_path = \"fuse\"\n",
            self.nfs_port, self.mount_port
        )
    }
}

impl Drop for Ganesha {
    fn drop(&mut self) {
        // A frozen server would not exit on the script's SIGTERM.
        let _ = kill(self.pid(), Signal::SIGCONT);
        self.run_script("stop");
    }
}

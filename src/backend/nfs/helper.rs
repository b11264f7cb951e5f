//! FUSE helper processes, the daemon's side: each FUSE mount of an nfs volume is served by its own
//! `ferry nfs-mount` process in its own session, so restarting or upgrading the plugin leaves containers'
//! mounts working. The helper reports "ready" (or why it failed) on its standard output, then serves until
//! its mount is unmounted. Its pid is kept in a file so a restarted daemon can find and stop it.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;

/// Everything a helper needs, passed as JSON on its command line (nothing in it is secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HelperSpec {
    pub volume: String,
    pub server: String,
    pub export: String,
    pub nfs_port: Option<u16>,
    pub mount_port: Option<u16>,
    pub uid: u32,
    pub gid: u32,
    pub timeout_ms: u64,
    pub attr_cache_ms: u64,
    pub connections: usize,
    /// The volume's directory inside the export.
    pub dir: String,
    pub mountpoint: PathBuf,
    /// Written by the helper once it serves, removed when it exits.
    pub pid_file: PathBuf,
    /// Where the helper logs once it has reported ready.
    pub log_file: PathBuf,
    /// This host's marker for the volume, refreshed while the mount lives.
    pub host_id: String,
    pub marker: String,
}

/// What the first line of a helper's output means.
pub const READY: &str = "ready";

#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("cannot start the FUSE helper {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
    #[error("the FUSE helper exited without saying why; see {log}")]
    Silent { log: PathBuf },
    #[error("the FUSE helper did not report within {secs} s (nfs server {server} unreachable?); see {log}")]
    Timeout {
        secs: u64,
        server: String,
        log: PathBuf,
    },
}

/// Starts a helper for `spec` and waits until it serves or fails, at most `deadline`.
pub async fn start(
    binary: &Path,
    spec: &HelperSpec,
    deadline: Duration,
) -> Result<(), HelperError> {
    let json = serde_json::to_string(spec).map_err(|e| HelperError::Failed(e.to_string()))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log_file)
        .map_err(|source| HelperError::Spawn {
            binary: spec.log_file.clone(),
            source,
        })?;
    let mut cmd = tokio::process::Command::new(binary);
    cmd.arg("nfs-mount")
        .arg("--spec")
        .arg(&json)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .kill_on_drop(false);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent; it runs in the child
    // between fork and exec. A session of its own keeps the helper out of the daemon's process group, so
    // signals aimed at the daemon (a terminal's Ctrl-C, a service manager stopping it) spare the mount.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().map_err(|source| HelperError::Spawn {
        binary: binary.to_path_buf(),
        source,
    })?;
    let Some(stdout) = child.stdout.take() else {
        return Err(HelperError::Failed(
            "the FUSE helper has no output pipe".into(),
        ));
    };
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let first = tokio::time::timeout(deadline, lines.next_line()).await;
    // Reap the helper whenever it exits, so it never lingers as a zombie of a long-running daemon.
    let reap = |mut child: tokio::process::Child| {
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
    };
    match first {
        Ok(Ok(Some(line))) if line == READY => {
            reap(child);
            Ok(())
        }
        Ok(Ok(Some(line))) => {
            let _ = child.wait().await;
            Err(HelperError::Failed(
                line.strip_prefix("error: ").unwrap_or(&line).to_string(),
            ))
        }
        Ok(_) => {
            let _ = child.wait().await;
            Err(HelperError::Silent {
                log: spec.log_file.clone(),
            })
        }
        Err(_) => {
            let _ = child.start_kill();
            reap(child);
            Err(HelperError::Timeout {
                secs: deadline.as_secs(),
                server: spec.server.clone(),
                log: spec.log_file.clone(),
            })
        }
    }
}

/// The pid in a helper's pid file, if that process is still a helper for `volume` (pids are reused).
pub fn running(pid_file: &Path, volume: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let is_helper = args.iter().any(|a| *a == b"nfs-mount")
        && args.iter().any(|a| {
            std::str::from_utf8(a)
                .ok()
                .and_then(|s| serde_json::from_str::<HelperSpec>(s).ok())
                .is_some_and(|s| s.volume == volume)
        });
    is_helper.then_some(pid)
}

/// Waits for the helper of `volume` to exit (it does once its mount is gone), then makes sure: SIGTERM,
/// and SIGKILL as the last resort. Returns whether it had to signal.
pub async fn stop(pid_file: &Path, volume: &str, grace: Duration) -> bool {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let step = Duration::from_millis(20);
    let wait_gone = |limit: Duration| async move {
        let mut waited = Duration::ZERO;
        while running(pid_file, volume).is_some() && waited < limit {
            tokio::time::sleep(step).await;
            waited += step;
        }
        running(pid_file, volume).is_none()
    };
    if wait_gone(grace).await {
        remove_pid_file(pid_file);
        return false;
    }
    if let Some(pid) = running(pid_file, volume) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    if !wait_gone(Duration::from_secs(2)).await {
        if let Some(pid) = running(pid_file, volume) {
            tracing::warn!(volume, pid, "the FUSE helper ignored SIGTERM; killing it");
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        wait_gone(Duration::from_secs(2)).await;
    }
    remove_pid_file(pid_file);
    true
}

fn remove_pid_file(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove the helper's pid file");
        }
    }
}

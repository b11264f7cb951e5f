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
    /// The server, export and how to talk to them; flattened, so the JSON keeps the shape it had when
    /// these were fields of their own (a daemon may start a newer binary as its helper after an upgrade).
    #[serde(flatten)]
    pub client: crate::nfs::NfsClientConfig,
    pub attr_cache_ms: u64,
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
    /// Where `fcntl` locks go.
    #[serde(default)]
    pub locks: super::LockMode,
    #[serde(default)]
    pub nlm_port: Option<u16>,
    /// The NLM caller name of this helper instance, and the journal of the locks it may hold, from which
    /// the daemon releases them if the helper dies (see `nfs::locks`).
    #[serde(default)]
    pub lock_caller: String,
    #[serde(default)]
    pub lock_journal: PathBuf,
    /// Cluster mode, a volume with one writer (`access=single`): the daemon's fence deadline file. The
    /// helper refuses every write once the deadline in it passes (see `fuse::fence`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence_file: Option<PathBuf>,
}

impl HelperSpec {
    /// How to reach the server's lock manager, when locks go there.
    pub fn nlm_config(&self) -> Option<crate::nfs::NlmConfig> {
        if self.locks != super::LockMode::Nlm {
            return None;
        }
        Some(crate::nfs::NlmConfig {
            server: self.client.server,
            port: self.nlm_port,
            timeout: self.client.timeout,
            uid: self.client.uid,
            gid: self.client.gid,
        })
    }
}

/// The file name of a lock journal: `nlm-INSTANCE.journal` in the volume's directory of the state.
pub fn lock_journal_name(instance: &str) -> String {
    format!("nlm-{instance}.journal")
}

/// Releases on the server the locks of every helper journal in `volume_root`. Call only when no helper
/// of the volume runs: a journal there belongs to a helper that died holding locks.
pub async fn release_leftover_locks(volume_root: &Path, config: Option<crate::nfs::NlmConfig>) {
    let Some(config) = config else { return };
    let Ok(entries) = std::fs::read_dir(volume_root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("nlm-") && name.ends_with(".journal") {
            release_journal(&entry.path(), config.clone()).await;
        }
    }
}

async fn release_journal(journal: &Path, config: crate::nfs::NlmConfig) {
    match crate::nfs::release_journal(journal, config).await {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(journal = %journal.display(), released = n, "released the locks of a FUSE helper that died")
        }
        Err(e) => {
            tracing::warn!(journal = %journal.display(), error = %e, "cannot release the locks of a FUSE helper that died; they stay until the server restarts or the journal is released at the next mount")
        }
    }
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
    // Reap the helper whenever it exits, so it never lingers as a zombie of a long-running daemon; then
    // release the server-side locks it may have died holding (none after a clean exit: the journal is empty).
    let nlm = spec.nlm_config();
    let journal = spec.lock_journal.clone();
    let reap = move |mut child: tokio::process::Child| {
        tokio::spawn(async move {
            let _ = child.wait().await;
            if let Some(config) = nlm {
                release_journal(&journal, config).await;
            }
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
                server: spec.client.server.to_string(),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The spec as the daemon wrote it before the connection settings became one type: a helper started
    /// from a newer binary after an upgrade must still read it, and the JSON keeps that shape.
    const EARLIER_SPEC: &str = r#"{"volume":"v","server":"10.0.0.5","export":"/srv","nfs_port":2049,
        "mount_port":null,"uid":1,"gid":2,"timeout_ms":1500,"attr_cache_ms":1000,"connections":4,
        "dir":"v","mountpoint":"/m/v","pid_file":"/s/v/helper.pid","log_file":"/s/v/helper.log",
        "host_id":"h1","marker":"x","locks":"nlm","nlm_port":null,"lock_caller":"c",
        "lock_journal":"/s/v/nlm-i.journal"}"#;

    #[test]
    fn the_spec_keeps_its_json_shape() {
        let spec: HelperSpec = serde_json::from_str(EARLIER_SPEC).unwrap();
        let c = &spec.client;
        assert_eq!(c.server.to_string(), "10.0.0.5");
        assert_eq!(c.export, "/srv");
        assert_eq!((c.nfs_port, c.mount_port), (Some(2049), None));
        assert_eq!((c.uid, c.gid, c.connections), (1, 2, 4));
        assert_eq!(c.timeout, Duration::from_millis(1500));
        assert!(!c.privileged_port);
        let nlm = spec.nlm_config().unwrap();
        assert_eq!((nlm.uid, nlm.gid, nlm.timeout), (1, 2, c.timeout));

        let written = serde_json::to_value(&spec).unwrap();
        let earlier: serde_json::Value = serde_json::from_str(EARLIER_SPEC).unwrap();
        for (key, value) in earlier.as_object().unwrap() {
            assert_eq!(&written[key], value, "{key}");
        }
    }
}

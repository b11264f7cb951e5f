//! FUSE helper processes, the helper's side: `ferry nfs-mount --spec JSON` connects to the server, mounts
//! the volume's directory with FUSE, writes this host's marker, says "ready" on its standard output and
//! then serves until the mount is unmounted (or SIGTERM unmounts it). It refreshes the marker while it
//! serves and removes it on the way out. It never talks to the daemon, so the daemon can restart freely.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::helper::{HelperSpec, READY};
use super::marker;
use crate::fuse::fence::{self, Fence};
use crate::fuse::locks::{LocalLocks, Locking};
use crate::fuse::{self, MountOptions};
use crate::mount::{Mounter, SystemMounter};
use crate::nfs::{NfsClient, NfsLocks, NfsStore};

/// The daemon fences a volume at once with SIGUSR1 (its lease is lost).
async fn fence_on_signal(fence: Fence) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
        return;
    };
    if usr1.recv().await.is_some() {
        tracing::error!("fenced by the daemon: this volume no longer accepts writes here");
        fence.fence();
    }
}

/// Runs a helper to the end. Errors before "ready" are reported on standard output, where the daemon
/// reads them; later ones go to the log.
pub async fn run(spec: HelperSpec) -> Result<(), String> {
    let client = NfsClient::new(spec.client.clone());

    let store = NfsStore::open(&client, &spec.dir)
        .await
        .map_err(|e| e.to_string())?;
    let locks = match spec.nlm_config() {
        Some(nlm) => {
            let locks = NfsLocks::new(nlm, spec.lock_caller.clone(), spec.lock_journal.clone())
                .map_err(|e| {
                    format!(
                        "cannot create the lock journal {}: {e}",
                        spec.lock_journal.display()
                    )
                })?;
            Locking::Store(Arc::new(locks))
        }
        // `locks = "local"`: kept in this helper, so they hold between this host's containers only.
        None => Locking::Store(Arc::new(LocalLocks::default())),
    };
    let store: Arc<dyn crate::fuse::store::FileStore> = Arc::new(store);
    // One writer per cluster: the store refuses every change once this host may have lost its claim.
    let store = match &spec.fence_file {
        Some(file) => {
            let fence = Fence::default();
            tokio::spawn(fence::watch_deadline(fence.clone(), file.clone()));
            tokio::spawn(fence_on_signal(fence.clone()));
            Arc::new(fence::FencedStore::new(store, fence))
                as Arc<dyn crate::fuse::store::FileStore>
        }
        None => store,
    };
    let mut mount = fuse::mount(
        store,
        &spec.mountpoint,
        MountOptions {
            attr_ttl: Duration::from_millis(spec.attr_cache_ms),
            // Containers run as any user; the kernel checks modes (default_permissions).
            allow_other: true,
            fsname: format!("ferry-nfs:{}", spec.volume),
            subtype: "ferry-nfs".into(),
            locks,
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    // From here on every failure must undo the mount before reporting.
    let setup = async {
        marker::write(&client, &spec.dir, &spec.host_id, &spec.marker)
            .await
            .map_err(|e| format!("cannot write this host's marker: {e}"))?;
        write_pid_file(&spec)
            .map_err(|e| format!("cannot write the pid file {}: {e}", spec.pid_file.display()))
    };
    if let Err(e) = setup.await {
        let _ = mount.unmount().await;
        return Err(e);
    }
    report(READY);
    tracing::info!(volume = %spec.volume, mountpoint = %spec.mountpoint.display(), "serving");

    // Stopped before the marker is removed; a refresh under way finishes first, so none can write the
    // marker again after its removal.
    let stop_refresh = CancellationToken::new();
    let refresher = {
        let client = client.clone();
        let spec = spec.clone();
        let stop = stop_refresh.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(marker::REFRESH_EVERY);
            tick.tick().await;
            loop {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if let Err(e) = marker::write(&client, &spec.dir, &spec.host_id, &spec.marker).await
                {
                    tracing::warn!(error = %e, "cannot refresh this host's marker");
                }
            }
        })
    };
    let term = async {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut t), Ok(mut i)) => {
                tokio::select! {
                    _ = t.recv() => {}
                    _ = i.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        res = mount.wait() => {
            if let Err(e) = res {
                tracing::warn!(error = %e, "the FUSE session ended with an error");
            }
            tracing::info!("unmounted; exiting");
        }
        () = term => {
            tracing::info!("signalled; unmounting");
            if let Err(e) = mount.unmount().await {
                // Busy: detach it lazily, so the helper can still exit; users see the data until they close it.
                tracing::warn!(error = %e, "unmount failed; detaching lazily");
                // This process has no mounter of its own; the real one is the only one a FUSE mount has.
                if let Err(e) = SystemMounter.detach(&spec.mountpoint) {
                    tracing::warn!(error = %e, "cannot detach the mount");
                }
                let _ = mount.wait().await;
            }
        }
    }
    stop_refresh.cancel();
    // Against a working server a refresh takes milliseconds; against an unreachable one each of its calls
    // waits the client's timeout, and the removal below fails just as well. A refresh still running after
    // one timeout is cut off, so it cannot write the marker again after the removal.
    let mut refresher = refresher;
    let grace = spec.client.timeout;
    if tokio::time::timeout(grace, &mut refresher).await.is_err() {
        tracing::warn!("the marker refresh did not finish in time; cut off");
        refresher.abort();
    }
    if let Err(e) = marker::remove(&client, &spec.dir, &spec.host_id).await {
        tracing::warn!(error = %e, "cannot remove this host's marker; it goes stale");
    }
    let _ = std::fs::remove_file(&spec.pid_file);
    Ok(())
}

/// glibc's mmap threshold for the helper: well above the 1 MiB buffers of every FUSE WRITE and READ. Its own
/// ceiling is 32 MiB on 64-bit (larger values are refused), and what is bigger still is rare here.
#[cfg(target_env = "gnu")]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// How much free memory glibc keeps at the top of a heap before giving it back to the kernel: room for the
/// buffers of a full window of writes in flight (`fuse::write_behind`) and of readahead.
#[cfg(target_env = "gnu")]
const TRIM_THRESHOLD: libc::c_int = 128 << 20;

/// Tunes the allocator for the helper's data path. Call before the runtime starts, so the buffers of the
/// first requests already follow it.
///
/// Every FUSE WRITE and READ moves 1 MiB through several freshly allocated buffers (the session's copy of the
/// request, which the store then writes from, and the NFS client's encoding). With glibc's defaults each of
/// those is an mmap of its own, or is given back to the kernel when freed: the kernel zeroes every page
/// again on the next use and unmaps it on free, which perf showed as a fifth of the helper's CPU while
/// writing. Above these thresholds the buffers come from the heap and are reused. The price is up to
/// `TRIM_THRESHOLD` of freed memory kept per arena, bounded by the writes and reads in flight.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only sets allocator parameters, under glibc's own arena lock; no pointers involved.
        let ok = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        };
        if !ok {
            tracing::warn!(
                "cannot raise the allocator's mmap and trim thresholds; writes cost more CPU"
            );
        }
    }
}

/// How many runtime workers the helper runs on a machine where it may use `cores` CPUs: one for every
/// two, at least one.
///
/// The helper's work per request is a few system calls; the rest of each request's CPU is spent by the
/// application that made it, the kernel's FUSE and TCP paths and (on the same host, as in the tests) the
/// server, so the helper itself keeps at most about half the cores busy. Workers beyond that cost more than
/// they bring: each new task wakes an idle worker to steal it, and on a machine with as many busy threads
/// as cores every wake-up is a context switch. Measured with fio on 2 cores (4 KiB random reads, 4 jobs
/// against 1, docs/benchmarks.md): 4 workers spent 42–44 µs of helper CPU per read at 4 jobs and reached
/// 2.4–2.8 times one job's rate, 1 worker 28–36 µs and 2.8–3.3 times; 2 workers fell between.
pub fn worker_threads(cores: usize) -> usize {
    (cores / 2).max(1)
}

/// Tells the daemon how the start went: one line on standard output, which is then pointed at /dev/null
/// so a daemon that goes away later cannot break the helper with SIGPIPE.
pub fn report(line: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 1);
    }
}

fn write_pid_file(spec: &HelperSpec) -> std::io::Result<()> {
    // Durable too: after a power loss, the daemon finds the helper it must stop by this file.
    crate::durable::write_atomic(
        &spec.pid_file,
        format!("{}\n", std::process::id()).as_bytes(),
    )
    .map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::worker_threads;

    #[test]
    fn the_helper_runs_a_worker_for_every_two_cores() {
        assert_eq!(worker_threads(1), 1);
        assert_eq!(worker_threads(2), 1);
        assert_eq!(worker_threads(3), 1);
        assert_eq!(worker_threads(8), 4);
        assert_eq!(worker_threads(0), 1);
    }
}

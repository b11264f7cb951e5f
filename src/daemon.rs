//! `ferry serve`: puts the pieces together in the order correctness needs: state directory, catalog,
//! reconciliation with the mount table, and only then the socket, so Docker never talks to a plugin that
//! has not yet loaded its state. Shutdown stops every listener accepting, closes idle and half-received
//! connections, finishes calls in flight, removes the sockets and leaves every mount in place: containers
//! may still be using them.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, LocalBackend};
use crate::catalog::RedbCatalog;
use crate::config::ServeConfig;
use crate::listener::{ConnectionCaps, Peers};
use crate::mount::{Mounter, SystemMounter};
use crate::plugin;
use crate::service::VolumeService;

/// Creates the state directory root-only, or restricts an existing one, and returns it resolved: every
/// path below is built from that one resolution. A state directory given as a symbolic link is followed
/// once, and its target is restricted only when it is Ferry's own (it holds a catalog) or empty: a link to
/// a directory of something else (`/etc`, a home) is refused rather than chmod'ed.
fn prepare_state_dir(given: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let is_link = std::fs::symlink_metadata(given)
        .map(|m| m.file_type().is_symlink())
        .unwrap_or(false);
    if !is_link {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(given)
            .with_context(|| format!("cannot create the state directory {}", given.display()))?;
    }
    let state = std::fs::canonicalize(given)
        .with_context(|| format!("cannot resolve the state directory {}", given.display()))?;
    if is_link {
        let ferrys = state.join("catalog.redb").exists()
            || std::fs::read_dir(&state)
                .with_context(|| format!("cannot read the state directory {}", state.display()))?
                .next()
                .is_none();
        if !ferrys {
            anyhow::bail!(
                "the state directory {} is a link to {}, which holds files but no Ferry catalog; Ferry \
                 would restrict it to root (mode 0700) and keep its volumes there, so it refuses a directory \
                 that is not its own: point --state-dir (or FERRY_STATE_DIR) at an empty directory or at \
                 Ferry's existing state directory",
                given.display(),
                state.display()
            );
        }
    }
    // The catalog may name volumes and options: keep it from other users even if the directory existed.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict the state directory {}", state.display()))?;
    Ok(state)
}

/// Runs the plugin until SIGTERM or SIGINT.
pub async fn run(config: ServeConfig) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let started_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let state = &prepare_state_dir(&config.state_dir)?;

    // Refuse early if another plugin answers on the socket, before touching any state.
    if config.socket.exists() && std::os::unix::net::UnixStream::connect(&config.socket).is_ok() {
        anyhow::bail!(crate::listener::SocketError::InUse(config.socket.clone()));
    }
    let caps = connection_caps(&config);

    let catalog = Arc::new(
        RedbCatalog::open(&state.join("catalog.redb")).context("cannot open the catalog")?,
    );
    let mounter: Arc<dyn Mounter> = Arc::new(SystemMounter);
    let local: Arc<dyn Backend> = Arc::new(
        LocalBackend::with_mount_root(
            state.join("local"),
            config.mount_root.clone(),
            mounter.clone(),
        )?
        .allow_overcommit(config.local_overcommit),
    );
    let mut backends = vec![local];
    // One identity for every backend that tells other hosts who holds a volume.
    let host = crate::host::HostId::load(state)
        .context("cannot read or make this host's id (STATE_DIR/host-id)")?;
    // Cluster mode: the shared catalog's cache and this host's lease run from before start-up
    // reconciliation, which imports this host's volumes and claims the ones attached here.
    let cluster_stop = CancellationToken::new();
    let cluster = match &config.cluster {
        Some(c) => {
            let cluster = crate::cluster::Cluster::new(cluster_settings(c)?, state)
                .map_err(|e| anyhow::anyhow!("invalid [cluster] configuration: {e}"))?;
            tokio::spawn(cluster.clone().run_watch(cluster_stop.clone()));
            tokio::spawn(cluster.clone().run_lease(cluster_stop.clone()));
            tracing::info!(node = %c.node, etcd = ?c.etcd, prefix = %c.prefix, "cluster mode");
            Some(cluster)
        }
        None => None,
    };
    if let Some(settings) = &config.nfs {
        let binary = std::env::current_exe()
            .context("cannot find the ferry binary to run FUSE helpers from")?;
        let nfs = crate::backend::NfsBackend::new(
            settings.clone(),
            state.join("nfs"),
            config.mount_root.clone(),
            host.clone(),
            binary,
            mounter.clone(),
        )?;
        if let Some(c) = &cluster {
            nfs.set_fence_file(c.fence_file().to_path_buf());
        }
        backends.push(Arc::new(nfs));
    }
    if let Some(settings) = &config.ebs {
        let ebs = crate::backend::EbsBackend::new(
            settings.clone(),
            state.join("ebs"),
            config.mount_root.clone(),
            mounter.clone(),
            host.id.clone(),
        )
        .await?;
        if let Some(c) = &cluster {
            ebs.set_publisher(Arc::new(crate::cluster::ClusterPublisher(c.clone())));
        }
        backends.push(Arc::new(ebs));
    }
    let (service, report) =
        VolumeService::start_in(catalog, backends, mounter, config.defaults.clone(), cluster)
            .await
            .context("start-up reconciliation failed")?;
    tracing::info!(
        volumes = report.volumes,
        adopted = report.adopted,
        remounted = report.remounted,
        released = report.released,
        rolled_back = report.rolled_back,
        removed = report.removed,
        failed = report.failed,
        deferred = report.deferred,
        "state reconciled"
    );

    let limits = &config.listeners;
    // Caught before any socket exists: a stop that comes while they are bound is acted on, not fatal.
    // (Until here SIGTERM kills the process, which start-up reconciliation is made to survive.)
    let signals = catch_stop_signals();
    // Cancelled by SIGTERM or SIGINT: every listener then stops and drains.
    let stop = CancellationToken::new();
    let metrics = match config.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot serve metrics on {addr}"))?;
            tracing::info!(listen = %addr, "metrics endpoint serving");
            let scraped = service.clone();
            Some(tokio::spawn(crate::metrics::serve(
                listener,
                Arc::new(move || scraped.metrics().render(&scraped.gauges())),
                limits.limits(caps.metrics),
                stop.clone(),
            )))
        }
        None => None,
    };
    // The admin socket comes first, so an operator can look at a daemon that Docker has not reached yet.
    let admin_listener = crate::listener::bind_unix_socket(&config.admin_socket).context(
        "cannot serve the admin socket (set admin_socket in the configuration to move it)",
    )?;
    let admin_bound = identity(&config.admin_socket);
    let admin = tokio::spawn(crate::admin::serve(
        admin_listener,
        Arc::new(crate::admin::AdminContext {
            service: service.clone(),
            started,
            started_at,
            socket: config.socket.clone(),
            admin_socket: config.admin_socket.clone(),
            state_dir: state.clone(),
            mount_root: config.mount_root.clone(),
            reconcile: report.clone(),
        }),
        limits.limits(caps.admin),
        stop.clone(),
    ));
    // Stopped with everything else; each finishes the pass it is in.
    let watcher = tokio::spawn(watch_attachments(service.clone(), stop.clone()));
    let checkpointer = tokio::spawn(run_checkpoints(service.clone(), stop.clone()));
    let listener = crate::listener::bind_unix_socket(&config.socket)?;
    let bound = identity(&config.socket);
    tracing::info!(socket = %config.socket.display(), state_dir = %state.display(), "ferry is serving");
    // Only now, with state reconciled and the socket answering, may systemd start dockerd after us.
    crate::notify::notify("READY=1\nSTATUS=serving");
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown_signal(signals).await;
            crate::notify::notify("STOPPING=1");
            stop.cancel();
        }
    });
    plugin::serve(
        listener,
        service,
        limits.limits(caps.plugin),
        plugin_peers(&limits.docker_uids),
        stop,
    )
    .await;
    // Both were stopped with the plugin socket and drain within seconds.
    let _ = admin.await;
    if let Some(metrics) = metrics {
        let _ = metrics.await;
    }
    // They were told to stop with the plugin socket and had its drain to finish their pass. A pass that
    // takes longer still (a checkpoint shipping to a slow remote) is dropped when the process exits, as
    // `abort()` dropped it before: every operation is made to survive being cut off by a crash.
    for (task, what) in [(watcher, "health checks"), (checkpointer, "checkpoints")] {
        if tokio::time::timeout(BACKGROUND_STOP_GRACE, task)
            .await
            .is_err()
        {
            tracing::warn!(
                task = what,
                "a background pass did not finish in time; abandoned"
            );
        }
    }
    // The lease is not revoked: a restart within its TTL keeps the volumes attached here owned.
    cluster_stop.cancel();
    remove_if_ours(&config.socket, bound);
    remove_if_ours(&config.admin_socket, admin_bound);
    tracing::info!("stopped; mounts in use were left in place");
    Ok(())
}

/// Reads what `[cluster]` names (TLS files, the password) into the client's settings; every failure names
/// the file and the key.
fn cluster_settings(
    c: &crate::config::ClusterConfig,
) -> anyhow::Result<crate::cluster::ClusterSettings> {
    let tls = if c.ca.is_some() || c.cert.is_some() {
        Some(Arc::new(tls_config(c)?))
    } else {
        None
    };
    let auth = match (&c.user, &c.password_file) {
        (Some(user), Some(file)) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read cluster.password_file {}", file.display()))?;
            let password = text.lines().next().unwrap_or("").to_string();
            if password.is_empty() {
                anyhow::bail!("cluster.password_file {} is empty", file.display());
            }
            Some((user.clone(), password))
        }
        _ => None,
    };
    Ok(crate::cluster::ClusterSettings {
        etcd: crate::cluster::etcd::EtcdSettings {
            endpoints: c.etcd.clone(),
            tls,
            auth,
            attempt_timeout: std::time::Duration::from_millis(1500),
        },
        node: c.node.clone(),
        prefix: c.prefix.clone(),
        lease_ttl: c.lease_ttl,
    })
}

fn tls_config(c: &crate::config::ClusterConfig) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS set-up for etcd")?;
    let mut roots = rustls::RootCertStore::empty();
    let Some(ca) = &c.ca else {
        anyhow::bail!(
            "cluster.cert needs cluster.ca: the CA that signed etcd's server certificate"
        );
    };
    for cert in CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("cannot read cluster.ca {}", ca.display()))?
    {
        let cert =
            cert.with_context(|| format!("cluster.ca {} holds a bad certificate", ca.display()))?;
        roots.add(cert).with_context(|| {
            format!("cluster.ca {} holds an unusable certificate", ca.display())
        })?;
    }
    let builder = builder.with_root_certificates(roots);
    Ok(match (&c.cert, &c.key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("cannot read cluster.cert {}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| {
                    format!("cluster.cert {} holds a bad certificate", cert.display())
                })?;
            let key = PrivateKeyDer::from_pem_file(key).with_context(|| {
                format!(
                    "cannot read a private key from cluster.key {}",
                    key.display()
                )
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .context("cluster.cert and cluster.key do not go together")?
        }
        _ => builder.with_no_client_auth(),
    })
}

/// Raises the open-file limit as far as allowed and fits the configured connection caps into it, so the
/// listeners together can never exhaust it; says so when the plugin socket gets fewer than configured.
fn connection_caps(config: &ServeConfig) -> ConnectionCaps {
    let fd_limit = crate::listener::raise_fd_limit();
    let l = &config.listeners;
    let wanted = ConnectionCaps {
        plugin: l.plugin_connections,
        admin: l.admin_connections,
        metrics: l.metrics_connections,
    };
    let caps = crate::listener::fit_to_fd_limit(fd_limit, wanted);
    if caps != wanted {
        tracing::warn!(
            fd_limit,
            plugin = caps.plugin,
            admin = caps.admin,
            metrics = caps.metrics,
            "the open-file limit is too low for the configured connection caps; using lower ones (raise LimitNOFILE)"
        );
    }
    tracing::debug!(fd_limit, ?caps, "connection caps");
    caps
}

/// Who may use the plugin socket: root, Ferry's own user and the configured Docker users.
fn plugin_peers(docker_uids: &[u32]) -> Peers {
    let mut uids = vec![0, nix::unistd::geteuid().as_raw()];
    uids.extend_from_slice(docker_uids);
    uids.sort_unstable();
    uids.dedup();
    Peers::Uids(uids)
}

/// How often attached volumes are checked for storage that died under their containers, volumes' storage
/// for damage, and what failed catalog writes left behind.
const ATTACHMENT_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// How long shutdown waits, after the plugin socket has drained, for a background pass to finish. The
/// drain (at most `LONG_DEADLINE` and a little) and this fit inside the service manager's stop timeout
/// (`TimeoutStopSec=130s` in packaging/ferry.service).
const BACKGROUND_STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits for the next tick of `tick`, or returns false once `stop` is cancelled. A pass under way is never
/// cut short: the token is looked at only between passes.
async fn next_pass(tick: &mut tokio::time::Interval, stop: &CancellationToken) -> bool {
    tokio::select! {
        biased;
        () = stop.cancelled() => false,
        _ = tick.tick() => true,
    }
}

/// Runs `heal`, `check_attachments` and `check_storage` until `stop` is cancelled.
async fn watch_attachments(service: Arc<VolumeService>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(ATTACHMENT_CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while next_pass(&mut tick, &stop).await {
        service.heal().await;
        service.check_attachments().await;
        service.check_storage().await;
    }
}

/// How often volumes with a `checkpoint` interval are looked at; intervals are at least a minute.
const CHECKPOINT_TICK: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs `run_due_checkpoints` until `stop` is cancelled.
async fn run_checkpoints(service: Arc<VolumeService>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(CHECKPOINT_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while next_pass(&mut tick, &stop).await {
        service.run_due_checkpoints().await;
    }
}

/// Which file a path names now, so that a socket is removed only if it is still the one we bound: another
/// daemon may have replaced the path by the time we stop, and its socket is not ours to remove.
fn identity(path: &std::path::Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .map(|m| (m.dev(), m.ino()))
        .ok()
}

fn remove_if_ours(path: &std::path::Path, bound: Option<(u64, u64)>) {
    let current = identity(path);
    if current.is_some() && current == bound {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!(socket = %path.display(), error = %e, "cannot remove the socket");
        }
    } else if current.is_some() {
        tracing::warn!(socket = %path.display(), "the socket path now belongs to another process; left it");
    }
}

/// Catches SIGTERM and SIGINT from now on; `None` if the handlers cannot be installed.
fn catch_stop_signals() -> Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)> {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => Some((term, int)),
        _ => {
            tracing::error!("cannot install signal handlers; stop the plugin with SIGKILL");
            None
        }
    }
}

/// Returns when SIGTERM or SIGINT arrives (or, without handlers, never).
async fn shutdown_signal(
    signals: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
) {
    let Some((mut term, mut int)) = signals else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn background_loops_stop_between_passes_once_cancelled() {
        let stop = CancellationToken::new();
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(1));
        assert!(next_pass(&mut tick, &stop).await);
        stop.cancel();
        // Cancellation wins even over a tick that is already due.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        assert!(!next_pass(&mut tick, &stop).await);
    }
}

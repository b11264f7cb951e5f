//! The nfs backend: each volume is a directory of an NFS export, so every host that reaches the server sees
//! the same data. Control operations (make the directory with its owner and mode, remove it, free space)
//! go through `NfsClient`, each call under the configured deadline. The data path is a kernel NFS mount
//! where the kernel has an NFS client, otherwise a FUSE filesystem served by a helper process per mount.
//! While a volume is mounted, the host keeps a marker in the export so that Remove on another host is
//! refused. Status is answered from memory: free space is what the last check saw. Kernel mounts, unmounts
//! and mount-table reads go through the backend's `Mounter`; FUSE mounts are made by the helper process.

pub mod helper;
pub mod kernel;
pub mod marker;
pub mod serve;

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde_json::{json, Map, Value};

use super::{release_mount, Attached, Backend, BackendError, Shipped, WhenBusy};
use crate::host::HostId;
use crate::mount::{MountError, MountTable, Mounter};
use crate::nfs::{FileKind, FsStat, NfsClient, NfsClientConfig, NfsError};
use crate::spec::{AllowedServer, BackendKind, VolumeSpec};
use crate::sync::Recover;

/// How data reaches containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    /// The kernel's NFS client where the kernel has one, FUSE otherwise.
    Auto,
    Kernel,
    Fuse,
}

impl DataPath {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(DataPath::Auto),
            "kernel" => Some(DataPath::Kernel),
            "fuse" => Some(DataPath::Fuse),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DataPath::Auto => "auto",
            DataPath::Kernel => "kernel",
            DataPath::Fuse => "fuse",
        }
    }
}

/// Where `fcntl` locks taken through FUSE mounts are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LockMode {
    /// On the server's lock manager (NLM 4); ENOLCK where it has none.
    #[default]
    Nlm,
    /// In the FUSE helper: they hold on this host only.
    Local,
}

impl LockMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "nlm" => Some(LockMode::Nlm),
            "local" => Some(LockMode::Local),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::Nlm => "nlm",
            LockMode::Local => "local",
        }
    }
}

/// The `[nfs]` section of the configuration, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct NfsSettings {
    /// The default server and export, and how every client talks to its server: ports, the AUTH_UNIX
    /// identity of every call, how long any operation may wait on the server, and the connections per
    /// server and export (in the daemon, and in each FUSE helper). A volume on another allowed server or
    /// export keeps all but those two.
    pub client: NfsClientConfig,
    pub allowed_servers: Vec<AllowedServer>,
    pub data_path: DataPath,
    /// How long FUSE may cache attributes and names.
    pub attr_cache: Duration,
    /// Where `fcntl` locks on FUSE mounts are kept.
    pub locks: LockMode,
    /// The lock manager's TCP port; None asks the portmapper.
    pub nlm_port: Option<u16>,
}

/// Grace for a helper to exit on its own once its mount is gone.
const HELPER_GRACE: Duration = Duration::from_secs(3);

pub struct NfsBackend {
    settings: NfsSettings,
    /// `<state>/nfs`: per volume, the helper's pid file and log, and the mountpoint without a mount root.
    root: PathBuf,
    mount_root: Option<PathBuf>,
    /// Names this host's markers in exports; stable across restarts.
    host: HostId,
    /// The `ferry` binary, run as `ferry nfs-mount` for each FUSE mount.
    helper_binary: PathBuf,
    kernel: bool,
    mounter: Arc<dyn Mounter>,
    clients: Mutex<HashMap<(String, String), NfsClient>>,
    /// What the last successful FSSTAT of each export said, and when; Status shows it without waiting.
    free_space: Mutex<HashMap<(String, String), (FsStat, SystemTime)>>,
    /// Cluster mode: the daemon's fence deadline file, handed to the helpers of `access=single` volumes.
    fence_file: std::sync::OnceLock<PathBuf>,
}

fn nfs_err(e: NfsError) -> BackendError {
    BackendError::Nfs(Box::new(e))
}

impl NfsBackend {
    /// `root` (created root-only if missing) holds per-volume helper files; `host` names this host's
    /// markers in exports and must be stable across restarts.
    pub fn new(
        settings: NfsSettings,
        root: PathBuf,
        mount_root: Option<PathBuf>,
        host: HostId,
        helper_binary: PathBuf,
        mounter: Arc<dyn Mounter>,
    ) -> Result<Self, BackendError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(BackendError::io("create", &root))?;
        let root = std::fs::canonicalize(&root).map_err(BackendError::io("resolve", &root))?;
        let kernel = match settings.data_path {
            DataPath::Kernel => true,
            DataPath::Fuse => false,
            DataPath::Auto => {
                kernel::available(&std::fs::read_to_string("/proc/filesystems").unwrap_or_default())
            }
        };
        tracing::info!(
            server = %settings.client.server,
            export = %settings.client.export,
            data_path = if kernel { "kernel" } else { "fuse" },
            "nfs backend configured"
        );
        Ok(NfsBackend {
            settings,
            root,
            mount_root,
            host,
            helper_binary,
            kernel,
            mounter,
            clients: Mutex::new(HashMap::new()),
            free_space: Mutex::new(HashMap::new()),
            fence_file: std::sync::OnceLock::new(),
        })
    }

    fn target(spec: &VolumeSpec, settings: &NfsSettings) -> (String, String) {
        match spec.nfs() {
            Some((server, export, _)) => (server.to_string(), export.to_string()),
            // Only nfs specs are routed here; the configured export is the one answer that cannot harm.
            None => (
                settings.client.server.to_string(),
                settings.client.export.clone(),
            ),
        }
    }

    fn client_for(&self, server: &str, export: &str) -> Result<NfsClient, BackendError> {
        let key = (server.to_string(), export.to_string());
        let mut clients = self.clients.lock().recover();
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let client = NfsClient::new(self.client_config(server, export)?);
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// The configured way of talking to a server, for `server` (an IP address, as specs hold it) and
    /// `export`.
    fn client_config(&self, server: &str, export: &str) -> Result<NfsClientConfig, BackendError> {
        let server: IpAddr = server.parse().map_err(|_| {
            BackendError::Internal(BackendKind::Nfs, format!("{server} is not an IP address"))
        })?;
        Ok(NfsClientConfig {
            server,
            export: export.to_string(),
            ..self.settings.client.clone()
        })
    }

    fn client(&self, spec: &VolumeSpec) -> Result<NfsClient, BackendError> {
        let (server, export) = Self::target(spec, &self.settings);
        self.client_for(&server, &export)
    }

    /// The volume's directory inside the export.
    fn dir(name: &str, spec: &VolumeSpec) -> String {
        spec.nfs()
            .and_then(|(_, _, subdir)| subdir)
            .unwrap_or(name)
            .to_string()
    }

    fn volume_root(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn mountpoint(&self, name: &str) -> PathBuf {
        match &self.mount_root {
            Some(m) => m.join(name),
            None => self.volume_root(name).join("data"),
        }
    }

    /// Cluster mode: the helpers of volumes with one writer stop writes once the deadline in `file`
    /// passes (see `fuse::fence`).
    pub fn set_fence_file(&self, file: PathBuf) {
        let _ = self.fence_file.set(file);
    }

    fn pid_file(&self, name: &str) -> PathBuf {
        self.volume_root(name).join("helper.pid")
    }

    async fn note_free_space(&self, client: &NfsClient, spec: &VolumeSpec) {
        if let Ok(stat) = client.fsstat().await {
            self.free_space.lock().recover().insert(
                Self::target(spec, &self.settings),
                (stat, SystemTime::now()),
            );
        }
    }

    fn helper_spec(
        &self,
        name: &str,
        spec: &VolumeSpec,
    ) -> Result<helper::HelperSpec, BackendError> {
        let (server, export) = Self::target(spec, &self.settings);
        let instance = crate::nfs::NfsLocks::instance_id();
        Ok(helper::HelperSpec {
            volume: name.to_string(),
            client: self.client_config(&server, &export)?,
            attr_cache_ms: self.settings.attr_cache.as_millis() as u64,
            dir: Self::dir(name, spec),
            mountpoint: self.mountpoint(name),
            pid_file: self.pid_file(name),
            log_file: self.volume_root(name).join("helper.log"),
            host_id: self.host.id.clone(),
            marker: marker::content(&self.host, name),
            locks: self.settings.locks,
            nlm_port: self.settings.nlm_port,
            lock_caller: crate::nfs::NfsLocks::caller_name(&self.host.name, name, &instance),
            lock_journal: self
                .volume_root(name)
                .join(helper::lock_journal_name(&instance)),
            fence_file: spec
                .single_writer_nfs()
                .then(|| self.fence_file.get().cloned())
                .flatten(),
        })
    }

    /// Unmounts whatever is at the mountpoint, lazily if it is busy: Unmount must always succeed.
    async fn unmount(&self, target: &Path) -> Result<(), BackendError> {
        let (mounter, target) = (self.mounter.clone(), target.to_path_buf());
        super::blocking(BackendKind::Nfs, move || {
            release_mount(mounter.as_ref(), &target, WhenBusy::Detach)
        })
        .await
    }

    /// Whether the mount at `target` answers: a FUSE mount whose helper died answers ENOTCONN.
    async fn mount_alive(target: &Path) -> bool {
        let target = target.to_path_buf();
        let check = tokio::task::spawn_blocking(move || std::fs::metadata(&target));
        match tokio::time::timeout(Duration::from_secs(2), check).await {
            Ok(Ok(Err(e))) => e.raw_os_error() != Some(libc::ENOTCONN),
            // A slow answer is a live helper waiting on its server: not dead.
            _ => true,
        }
    }

    async fn attach_fuse(&self, name: &str, spec: &VolumeSpec) -> Result<PathBuf, BackendError> {
        let target = self.mountpoint(name);
        if self.mounter.mount_table()?.is_mounted(&target) {
            let helper_alive = helper::running(&self.pid_file(name), name).is_some();
            if helper_alive && Self::mount_alive(&target).await {
                return Ok(target);
            }
            tracing::warn!(
                volume = name,
                "the FUSE mount lost its helper; mounting it again"
            );
            self.unmount(&target).await?;
            helper::stop(&self.pid_file(name), name, Duration::ZERO).await;
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(self.volume_root(name))
            .map_err(BackendError::io("create", &self.volume_root(name)))?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&target)
            .map_err(BackendError::io("create", &target))?;
        // An existing mountpoint that is a link would have the FUSE filesystem mounted over its target.
        super::refuse_links(self.mount_root.as_ref().unwrap_or(&self.root), &target)?;
        // Connecting, looking the directory up and mounting each wait on the server at most `timeout`.
        let deadline = self.settings.client.timeout * 2 + Duration::from_secs(5);
        let helper_spec = self.helper_spec(name, spec)?;
        // No helper of this volume runs now: locks left by one that died go before new ones are taken.
        helper::release_leftover_locks(&self.volume_root(name), helper_spec.nlm_config()).await;
        helper::start(&self.helper_binary, &helper_spec, deadline)
            .await
            .map_err(|e| BackendError::Helper {
                volume: name.to_string(),
                reason: e.to_string(),
            })?;
        Ok(target)
    }

    async fn attach_kernel(&self, name: &str, spec: &VolumeSpec) -> Result<PathBuf, BackendError> {
        let target = self.mountpoint(name);
        if self.mounter.mount_table()?.is_mounted(&target) {
            return Ok(target);
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&target)
            .map_err(BackendError::io("create", &target))?;
        super::refuse_links(self.mount_root.as_ref().unwrap_or(&self.root), &target)?;
        let (server, export) = Self::target(spec, &self.settings);
        let args = kernel::mount_args(
            &server,
            &export,
            &Self::dir(name, spec),
            self.settings.client.nfs_port,
            self.settings.client.mount_port,
            self.settings.client.timeout,
        );
        let (mounter, t) = (self.mounter.clone(), target.clone());
        super::blocking(BackendKind::Nfs, move || {
            mounter.mount_fs(&args, &t).map_err(|e| match e {
                // Named by server and export, as users wrote them, not by the directory inside.
                MountError::Mount { target, errno, .. } => MountError::Mount {
                    device: format!("{server}:{export}"),
                    target,
                    errno,
                },
                other => other,
            })?;
            Ok(())
        })
        .await?;
        let client = self.client(spec)?;
        let body = marker::content(&self.host, name);
        marker::write(&client, &Self::dir(name, spec), &self.host.id, &body)
            .await
            .map_err(nfs_err)?;
        Ok(target)
    }
}

#[async_trait]
impl Backend for NfsBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Nfs
    }

    fn preflight(&self, _name: &str, spec: &VolumeSpec) -> Result<(), BackendError> {
        // A kernel mount cannot be fenced: its writes would reach the server after the claim is lost.
        if self.kernel && spec.single_writer_nfs() {
            return Err(BackendError::Unsupported {
                op: "access=single (one writer per cluster)",
                backend: BackendKind::Nfs,
            });
        }
        Ok(())
    }

    fn fence(&self, name: &str, spec: &VolumeSpec) -> Result<(), BackendError> {
        if !spec.single_writer_nfs() {
            return Ok(());
        }
        if let Some(pid) = helper::running(&self.pid_file(name), name) {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGUSR1,
            )
            .map_err(|e| BackendError::Helper {
                volume: name.to_string(),
                reason: format!("cannot signal the helper to fence the volume: {e}"),
            })?;
        }
        Ok(())
    }

    async fn create(&self, name: &str, spec: &VolumeSpec) -> Result<Option<Shipped>, BackendError> {
        let client = self.client(spec)?;
        let dir = Self::dir(name, spec);
        let given = spec.uid.is_some() || spec.gid.is_some() || spec.mode.is_some();
        match client.getattr(&dir).await {
            Ok(attrs) => {
                if attrs.kind != FileKind::Directory {
                    return Err(nfs_err(NfsError::NotADirectory {
                        at: client.endpoint().clone(),
                        path: dir.as_str().into(),
                    }));
                }
                // An existing directory (another host's create, or adopted data) keeps the owner and mode
                // its containers gave it, unless the options ask for others.
                if given {
                    client
                        .ensure_dir(
                            &dir,
                            spec.uid.unwrap_or(attrs.uid),
                            spec.gid.unwrap_or(attrs.gid),
                            spec.mode.unwrap_or(attrs.mode),
                        )
                        .await
                        .map_err(nfs_err)?;
                }
            }
            Err(e)
                if e.is_not_found()
                    && spec.nfs().is_some_and(|(_, _, subdir)| subdir.is_some()) =>
            {
                return Err(BackendError::NoSuchSubdir {
                    subdir: dir,
                    reason: e.to_string(),
                })
            }
            Err(e) if e.is_not_found() => {
                client
                    .ensure_dir(
                        &dir,
                        spec.uid.unwrap_or(0),
                        spec.gid.unwrap_or(0),
                        spec.mode.unwrap_or(0o755),
                    )
                    .await
                    .map_err(nfs_err)?;
            }
            Err(e) => return Err(nfs_err(e)),
        }
        self.note_free_space(&client, spec).await;
        Ok(None)
    }

    /// A create that did not finish leaves the server's directory alone: another host may already share
    /// it (or the user's data is in it, with `subdir`), and an empty one left behind is adopted by the next
    /// create.
    async fn abandon(&self, name: &str, _spec: &VolumeSpec) -> Result<(), BackendError> {
        let local = self.volume_root(name);
        match std::fs::remove_dir_all(&local) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BackendError::io("remove", &local)(e)),
        }
    }

    async fn remove(&self, name: &str, spec: &VolumeSpec) -> Result<(), BackendError> {
        let client = self.client(spec)?;
        let dir = Self::dir(name, spec);
        let holders = marker::holders(&client, &dir, &self.host.id)
            .await
            .map_err(nfs_err)?;
        if let Some(h) = holders.first() {
            // A shared hostname is the ambiguous case: say outright that the holder is not this host.
            let host = if h.host.name == self.host.name {
                format!(
                    "{} (this host has the same name but is host id {})",
                    h.host, self.host.id
                )
            } else {
                h.host.to_string()
            };
            return Err(BackendError::MountedElsewhere {
                host,
                age_secs: h.age.as_secs(),
                stale_secs: marker::STALE_AFTER.as_secs(),
            });
        }
        if spec.nfs().is_none_or(|(_, _, subdir)| subdir.is_none()) {
            client.remove_tree(&dir).await.map_err(nfs_err)?;
        }
        marker::forget(&client, &dir).await.map_err(nfs_err)?;
        let local = self.volume_root(name);
        match std::fs::remove_dir_all(&local) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(BackendError::io("remove", &local)(e)),
        }
        Ok(())
    }

    async fn attach(
        &self,
        name: &str,
        spec: &VolumeSpec,
        _shipped: Option<&Shipped>,
    ) -> Result<Attached, BackendError> {
        let path = if self.kernel {
            self.attach_kernel(name, spec).await?
        } else {
            self.attach_fuse(name, spec).await?
        };
        Ok(Attached::at(path))
    }

    async fn detach(
        &self,
        name: &str,
        spec: &VolumeSpec,
        _shipped: Option<&Shipped>,
    ) -> Result<Option<Shipped>, BackendError> {
        self.unmount(&self.mountpoint(name)).await?;
        if !self.kernel {
            // The helper exits once its mount is gone and removes its marker on the way out.
            let signalled = helper::stop(&self.pid_file(name), name, HELPER_GRACE).await;
            // A helper that was not this daemon's child (the daemon restarted) is released here.
            helper::release_leftover_locks(
                &self.volume_root(name),
                self.helper_spec(name, spec)
                    .ok()
                    .and_then(|h| h.nlm_config()),
            )
            .await;
            if !signalled {
                return Ok(None);
            }
        }
        // The helper could not remove the marker (or there is none, on the kernel path): do it here, but an
        // unreachable server must not fail the Unmount; the marker then goes stale on its own.
        if let Ok(client) = self.client(spec) {
            if let Err(e) = marker::remove(&client, &Self::dir(name, spec), &self.host.id).await {
                tracing::warn!(volume = name, error = %e, "cannot remove this host's marker; it goes stale");
            }
        }
        Ok(None)
    }

    fn is_attached(&self, name: &str, _spec: &VolumeSpec, table: &MountTable) -> Option<bool> {
        let mounted = table.is_mounted(&self.mountpoint(name));
        // A FUSE mount whose helper died is still in the table but answers only ENOTCONN.
        Some(mounted && (self.kernel || helper::running(&self.pid_file(name), name).is_some()))
    }

    /// A new FUSE mount is a new connection; the dead one stays in the old containers' namespaces.
    fn loss_strands_mounts(&self, _spec: &VolumeSpec) -> bool {
        !self.kernel
    }

    fn status(&self, name: &str, spec: &VolumeSpec) -> Map<String, Value> {
        let (server, export) = Self::target(spec, &self.settings);
        let mut m = Map::new();
        m.insert("server".into(), json!(server));
        m.insert("export".into(), json!(export));
        m.insert("path".into(), json!(Self::dir(name, spec)));
        m.insert(
            "data_path".into(),
            json!(if self.kernel { "kernel" } else { "fuse" }),
        );
        if let Some((stat, when)) = self.free_space.lock().recover().get(&(server, export)) {
            m.insert("export_avail_bytes".into(), json!(stat.avail_bytes));
            m.insert("export_total_bytes".into(), json!(stat.total_bytes));
            m.insert(
                "export_space_checked".into(),
                json!(humantime::format_rfc3339_seconds(*when).to_string()),
            );
        }
        m
    }

    async fn check(&self) -> Result<Map<String, Value>, BackendError> {
        let server = self.settings.client.server.to_string();
        let export = self.settings.client.export.clone();
        let client = self.client_for(&server, &export)?;
        let stat = client.fsstat().await.map_err(nfs_err)?;
        self.free_space
            .lock()
            .recover()
            .insert((server.clone(), export.clone()), (stat, SystemTime::now()));
        let mut m = Map::new();
        m.insert("server".into(), json!(server));
        m.insert("export".into(), json!(export));
        m.insert("free_bytes".into(), json!(stat.avail_bytes));
        m.insert("total_bytes".into(), json!(stat.total_bytes));
        m.insert(
            "data_path".into(),
            json!(if self.kernel { "kernel" } else { "fuse" }),
        );
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mount::{Call, RecordingMounter};

    /// A backend on the kernel data path whose server is unreachable (a closed port on this host), with
    /// the recording mounter.
    fn kernel_backend(dir: &Path, mounter: Arc<RecordingMounter>) -> NfsBackend {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let settings = NfsSettings {
            client: NfsClientConfig {
                nfs_port: Some(closed),
                mount_port: Some(closed),
                timeout: Duration::from_millis(200),
                connections: 1,
                ..NfsClientConfig::new("127.0.0.1".parse().unwrap(), "/srv")
            },
            allowed_servers: Vec::new(),
            data_path: DataPath::Kernel,
            attr_cache: Duration::from_secs(1),
            locks: LockMode::Local,
            nlm_port: None,
        };
        let host = HostId {
            name: "test".into(),
            id: "h1".into(),
        };
        NfsBackend::new(
            settings,
            dir.join("nfs"),
            Some(dir.join("mnt")),
            host,
            PathBuf::from("/nonexistent/ferry"),
            mounter,
        )
        .unwrap()
    }

    /// A volume on the configured server and export.
    fn spec() -> VolumeSpec {
        VolumeSpec {
            uid: None,
            gid: None,
            mode: None,
            backend: crate::spec::BackendSpec::Nfs {
                server: "127.0.0.1".into(),
                export: "/srv".into(),
                subdir: None,
                single: false,
            },
        }
    }

    #[tokio::test]
    async fn kernel_mounts_go_through_the_mounter() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("mnt")).unwrap();
        let m = Arc::new(RecordingMounter::default());
        let b = kernel_backend(dir.path(), m.clone());
        let target = dir.path().join("mnt/v");
        // The mount is made; the marker cannot be written to an unreachable server, so attach fails.
        assert!(b.attach("v", &spec(), None).await.is_err());
        let expected = kernel::mount_args(
            "127.0.0.1",
            "/srv",
            "v",
            b.settings.client.nfs_port,
            b.settings.client.mount_port,
            b.settings.client.timeout,
        );
        assert_eq!(
            m.calls(),
            [Call::MountFs {
                source: expected.source,
                fstype: "nfs",
                data: expected.data,
                target: target.clone(),
            }]
        );
        // A mount already in the table is adopted, not stacked.
        b.attach("v", &spec(), None).await.unwrap();
        assert_eq!(m.calls().len(), 1);
        assert_eq!(
            b.is_attached("v", &spec(), &m.mount_table().unwrap()),
            Some(true)
        );
    }

    #[tokio::test]
    async fn a_busy_mount_is_detached_lazily() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(RecordingMounter::default());
        let b = kernel_backend(dir.path(), m.clone());
        let target = dir.path().join("mnt/v");
        m.mount_elsewhere(&target, "nfs");
        m.busy_unmounts(1);
        // The marker cannot be removed from an unreachable server; Unmount succeeds all the same.
        b.detach("v", &spec(), None).await.unwrap();
        assert_eq!(
            m.calls(),
            [Call::Detach {
                target: target.clone()
            }]
        );
        assert!(!m.mount_table().unwrap().is_mounted(&target));
        // Nothing mounted: nothing to do.
        b.detach("v", &spec(), None).await.unwrap();
        assert_eq!(m.calls().len(), 1);
    }
}

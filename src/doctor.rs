//! `ferry doctor`: checks that this host can run Ferry, one finding per check, each failure with how to fix
//! it. It looks at the host only (kernel, devices, tools, directories); the CLI adds what the running daemon
//! says about its backends. It changes nothing on the host.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::ServeConfig;
use crate::mount::find_tool;

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    /// Ferry runs, but a feature (a backend, an option) will not work.
    Warn,
    /// Ferry cannot run, or cannot serve its default backend.
    Fail,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        }
    }
}

/// One finding.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub check: String,
    pub verdict: Verdict,
    pub detail: String,
    /// What to do about a warning or failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    pub fn ok(check: &str, detail: impl Into<String>) -> Self {
        Check {
            check: check.into(),
            verdict: Verdict::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    pub fn bad(check: &str, verdict: Verdict, detail: impl Into<String>, fix: &str) -> Self {
        Check {
            check: check.into(),
            verdict,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// The bit of CAP_SYS_ADMIN in the capability masks of /proc/PID/status.
const CAP_SYS_ADMIN: u32 = 21;

/// The fix for a check that this user has no right to make: the host may well be fine.
pub const RUN_AS_ROOT: &str = "run `ferry doctor` as root (for example `sudo ferry doctor`): this user may not look, and ferry serve runs as root anyway";

/// Whether an error means "this user may not", rather than a problem of the host.
fn denied(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::PermissionDenied || e.raw_os_error() == Some(libc::EPERM)
}

/// A check this user could not make: a warning that says which permission was missing, never a guess at a
/// host problem such as a read-only filesystem.
fn not_checked(check: &str, what: String) -> Check {
    Check::bad(
        check,
        Verdict::Warn,
        format!(
            "not checked: {what} (permission denied to uid {}, not root)",
            nix::unistd::geteuid()
        ),
        RUN_AS_ROOT,
    )
}

/// Every host check, in the order an operator would fix them.
pub fn host_checks(config: &ServeConfig) -> Vec<Check> {
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let proc_status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    vec![
        privileges(nix::unistd::geteuid().is_root(), &proc_status),
        kernel_fs(
            &filesystems,
            "ext4",
            Verdict::Fail,
            "size-capped volumes (the default fs)",
        ),
        kernel_fs(
            &filesystems,
            "xfs",
            Verdict::Warn,
            "size-capped volumes with -o fs=xfs",
        ),
        kernel_fs(
            &filesystems,
            "fuse",
            Verdict::Warn,
            "FUSE mounts (the NFS data path on hosts without a kernel NFS client)",
        ),
        fuse_device(),
        loop_configure(&std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default()),
        loop_devices(),
        tool(
            "mkfs.ext4",
            "e2fsprogs",
            Verdict::Fail,
            "size-capped ext4 volumes",
        ),
        tool(
            "mkfs.xfs",
            "xfsprogs",
            Verdict::Warn,
            "size-capped xfs volumes",
        ),
        state_dir(&config.state_dir),
        socket_dir(&config.socket),
    ]
}

/// Checks each configured server directly, so `ferry doctor` tells whether the host reaches them even while
/// the daemon is down. Each check waits at most the backend's own timeout.
pub async fn server_checks(config: &ServeConfig) -> Vec<Check> {
    let mut out = Vec::new();
    if let Some(nfs) = &config.nfs {
        let name = format!("nfs server {}:{}", nfs.client.server, nfs.client.export);
        let client = crate::nfs::NfsClient::new(crate::nfs::NfsClientConfig {
            connections: 1,
            ..nfs.client.clone()
        });
        out.push(match client.fsstat().await {
            Ok(stat) => Check::ok(
                &name,
                format!(
                    "answers; {} available of {}",
                    human_bytes(stat.avail_bytes),
                    human_bytes(stat.total_bytes)
                ),
            ),
            Err(e) => Check::bad(
                &name,
                if config.defaults.backend == crate::spec::BackendKind::Nfs {
                    Verdict::Fail
                } else {
                    Verdict::Warn
                },
                e.to_string(),
                "check the [nfs] server, export and ports, the network, and the server's export list",
            ),
        });
    }
    if let Some(ebs) = &config.ebs {
        let name = match &ebs.endpoint_url {
            Some(url) => format!("ebs endpoint {url}"),
            None => format!("ebs region {}", ebs.region),
        };
        let client =
            crate::backend::ebs::SnapshotClient::new(&crate::backend::ebs::ClientSettings {
                region: ebs.region.clone(),
                endpoint_url: ebs.endpoint_url.clone(),
            })
            .await;
        out.push(match client.find(&ebs.namespace, None).await {
            Ok(found) => Check::ok(
                &name,
                format!(
                    "answers; {} snapshots in namespace {}",
                    found.len(),
                    ebs.namespace
                ),
            ),
            Err(e) => Check::bad(
                &name,
                if config.defaults.backend == crate::spec::BackendKind::Ebs {
                    Verdict::Fail
                } else {
                    Verdict::Warn
                },
                e.to_string(),
                "check the network, [ebs] region and endpoint_url, and the AWS credentials (environment, profile or instance role) with ec2:DescribeSnapshots",
            ),
        });
    }
    out
}

fn privileges(root: bool, proc_status: &str) -> Check {
    let cap = proc_status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .map(|mask| mask & (1 << CAP_SYS_ADMIN) != 0);
    match (root, cap) {
        (true, Some(true)) => Check::ok("privileges", "root with CAP_SYS_ADMIN"),
        (true, _) => Check::bad(
            "privileges",
            Verdict::Fail,
            "root, but without CAP_SYS_ADMIN",
            "run Ferry with CAP_SYS_ADMIN (a container needs --cap-add SYS_ADMIN; the managed plugin asks for it)",
        ),
        (false, _) => Check::bad(
            "privileges",
            Verdict::Fail,
            format!("not running as root (uid {})", nix::unistd::geteuid()),
            "run ferry as root: it mounts filesystems and sets up loop devices; run `ferry doctor` as root too, or the checks that need root cannot look",
        ),
    }
}

/// Whether the kernel knows a filesystem now. A module may still load on first mount, so a missing entry
/// says how to load it rather than assuming it cannot work.
fn kernel_fs(filesystems: &str, fs: &str, missing: Verdict, needed_for: &str) -> Check {
    let name = format!("kernel: {fs}");
    if filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some(fs))
    {
        Check::ok(&name, format!("{fs} is available"))
    } else {
        Check::bad(
            &name,
            missing,
            format!("{fs} is not in /proc/filesystems; needed for {needed_for}"),
            &format!("load it with `modprobe {fs}` (or install a kernel that has it)"),
        )
    }
}

fn fuse_device() -> Check {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(_) => Check::ok("/dev/fuse", "opens read-write"),
        Err(e) => Check::bad(
            "/dev/fuse",
            Verdict::Warn,
            format!("cannot open /dev/fuse: {e}; needed for FUSE mounts"),
            "`modprobe fuse`; in a container pass --device /dev/fuse (the managed plugin asks for it)",
        ),
    }
}

/// Capped volumes attach their image with `LOOP_CONFIGURE` (one ioctl, autoclear set atomically), which
/// Linux has had since 5.8; an older kernel fails every capped Mount with "inappropriate ioctl".
fn loop_configure(release: &str) -> Check {
    const CHECK: &str = "kernel: LOOP_CONFIGURE";
    let release = release.trim();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().ok());
    match (numbers.next().flatten(), numbers.next().flatten()) {
        (Some(major), Some(minor)) if (major, minor) >= (5, 8) => {
            Check::ok(CHECK, format!("kernel {release} has it (5.8 or newer)"))
        }
        (Some(_), Some(_)) => Check::bad(
            CHECK,
            Verdict::Fail,
            format!("kernel {release} is older than 5.8 and lacks LOOP_CONFIGURE; size-capped local volumes and ebs volumes cannot be mounted"),
            "run Ferry on Linux 5.8 or newer",
        ),
        _ => not_checked(CHECK, format!("cannot tell the kernel version from {release:?}")),
    }
}

fn loop_devices() -> Check {
    match crate::mount::probe_free_loop_device() {
        Ok(dev) => Check::ok(
            "loop devices",
            format!("/dev/loop-control answers; {} is free", dev.display()),
        ),
        Err(e) if denied(&e) => not_checked(
            "loop devices",
            "cannot open /dev/loop-control to ask for a free loop device".into(),
        ),
        Err(e) => Check::bad(
            "loop devices",
            Verdict::Fail,
            format!("cannot get a free loop device from /dev/loop-control: {e}; size-capped volumes need one"),
            "`modprobe loop`; in a container pass --device /dev/loop-control and bind-mount /dev (the managed plugin does)",
        ),
    }
}

fn tool(name: &'static str, package: &str, missing: Verdict, needed_for: &str) -> Check {
    match find_tool(name) {
        Some(path) => Check::ok(name, format!("found at {}", path.display())),
        None => Check::bad(
            name,
            missing,
            format!("{name} was not found; needed for {needed_for}"),
            &format!("install it (Debian: apt-get install {package})"),
        ),
    }
}

fn state_dir(dir: &Path) -> Check {
    const NAME: &str = "state directory";
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return match dir.ancestors().skip(1).find(|a| a.exists()) {
                Some(parent) => match writable(parent) {
                    Ok(()) => Check::ok(
                        NAME,
                        format!(
                            "{} does not exist yet; ferry serve creates it (mode 0700)",
                            dir.display()
                        ),
                    ),
                    Err(e) => unwritable(
                        NAME,
                        format!(
                            "{} does not exist, and its parent {}",
                            dir.display(),
                            parent.display()
                        ),
                        e,
                    ),
                },
                None => Check::bad(
                    NAME,
                    Verdict::Fail,
                    format!("{} does not exist and cannot be created", dir.display()),
                    "create it (mode 0700) on persistent storage, or set state_dir / --state-dir",
                ),
            }
        }
        Err(e) if denied(&e) => {
            return not_checked(NAME, format!("cannot look at {}", dir.display()))
        }
        Err(e) => {
            return Check::bad(
                NAME,
                Verdict::Fail,
                format!("cannot read {}: {e}", dir.display()),
                "fix its permissions, or set state_dir / --state-dir to another directory",
            )
        }
    };
    if !meta.is_dir() {
        return Check::bad(
            NAME,
            Verdict::Fail,
            format!("{} is not a directory", dir.display()),
            "move it away, or set state_dir / --state-dir to a directory",
        );
    }
    if let Err(e) = writable(dir) {
        return unwritable(NAME, dir.display().to_string(), e);
    }
    let free = nix::sys::statvfs::statvfs(dir)
        .map(|s| s.blocks_available() * s.fragment_size())
        .ok();
    let mode = meta.permissions().mode() & 0o777;
    let mut detail = format!("{} is writable", dir.display());
    if let Some(free) = free {
        detail.push_str(&format!(", {} free", human_bytes(free)));
    }
    if mode & 0o077 != 0 {
        return Check::bad(
            NAME,
            Verdict::Warn,
            format!("{detail}; mode {mode:o} lets other users read it"),
            "ferry serve restricts it to 0700 at start; or run chmod 0700 on it now",
        );
    }
    Check::ok(NAME, detail)
}

fn socket_dir(socket: &Path) -> Check {
    const NAME: &str = "plugin socket";
    match socket.parent() {
        Some(dir) if dir.is_dir() => Check::ok(
            NAME,
            format!(
                "{} exists; Docker looks for the driver there",
                dir.display()
            ),
        ),
        Some(dir) => Check::ok(
            NAME,
            format!(
                "{} does not exist yet; ferry serve creates it",
                dir.display()
            ),
        ),
        None => Check::bad(
            NAME,
            Verdict::Fail,
            format!("{} has no directory", socket.display()),
            "set socket / --socket to an absolute path such as /run/docker/plugins/ferry.sock",
        ),
    }
}

fn writable(dir: &Path) -> nix::Result<()> {
    nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK)
}

/// A state directory (or the parent it would be made in) that cannot be written, by the kernel's reason:
/// only EROFS is a read-only filesystem; EACCES as another user is this user's lack of rights.
fn unwritable(name: &str, what: String, errno: nix::errno::Errno) -> Check {
    use nix::errno::Errno;
    match errno {
        Errno::EROFS => Check::bad(
            name,
            Verdict::Fail,
            format!("{what} is on a read-only filesystem"),
            "remount its filesystem read-write, or set state_dir / --state-dir elsewhere",
        ),
        Errno::EACCES | Errno::EPERM if !nix::unistd::geteuid().is_root() => {
            not_checked(name, format!("{what} is not writable by this user"))
        }
        e => Check::bad(
            name,
            Verdict::Fail,
            format!("{what} is not writable: {}", e.desc()),
            "fix its permissions (ferry serve needs to write there as root), or set state_dir / --state-dir elsewhere",
        ),
    }
}

/// Bytes in binary units with one decimal, for people.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_read_from_the_status_mask() {
        let with = "Name:\tferry\nCapEff:\t000001ffffffffff\n";
        let without = "CapEff:\t0000000000000000\n";
        assert_eq!(privileges(true, with).verdict, Verdict::Ok);
        assert_eq!(privileges(true, without).verdict, Verdict::Fail);
        let c = privileges(false, with);
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(c.fix.unwrap().contains("root"));
    }

    #[test]
    fn kernel_filesystems_are_matched_by_name() {
        let fs = "nodev\tsysfs\n\text4\nnodev\tfuse\n";
        assert_eq!(
            kernel_fs(fs, "ext4", Verdict::Fail, "x").verdict,
            Verdict::Ok
        );
        assert_eq!(
            kernel_fs(fs, "fuse", Verdict::Warn, "x").verdict,
            Verdict::Ok
        );
        let xfs = kernel_fs(fs, "xfs", Verdict::Warn, "x");
        assert_eq!(xfs.verdict, Verdict::Warn);
        assert!(xfs.fix.unwrap().contains("modprobe xfs"));
    }

    #[test]
    fn state_directory_findings() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("a/b");
        assert_eq!(state_dir(&missing).verdict, Verdict::Ok);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(state_dir(dir.path()).verdict, Verdict::Warn);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(state_dir(dir.path()).verdict, Verdict::Ok);
        let file = dir.path().join("f");
        std::fs::write(&file, b"").unwrap();
        assert_eq!(state_dir(&file).verdict, Verdict::Fail);
    }

    #[test]
    fn loop_configure_needs_linux_5_8() {
        assert_eq!(loop_configure("6.1.0-28-amd64\n").verdict, Verdict::Ok);
        assert_eq!(loop_configure("5.8.0").verdict, Verdict::Ok);
        assert_eq!(loop_configure("5.10.0-rt").verdict, Verdict::Ok);
        let old = loop_configure("5.4.0-150-generic");
        assert_eq!(old.verdict, Verdict::Fail);
        assert!(old.detail.contains("older than 5.8"), "{}", old.detail);
        assert_eq!(loop_configure("4.19.0").verdict, Verdict::Fail);
        assert_ne!(loop_configure("").verdict, Verdict::Ok);
        assert_ne!(loop_configure("garbage").verdict, Verdict::Ok);
    }

    #[test]
    fn bytes_for_people() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(64 << 30), "64.0 GiB");
    }
}

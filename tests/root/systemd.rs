//! The legacy-daemon installation: scripts/install, the systemd unit (checked by `systemd-analyze verify`)
//! and readiness notification over NOTIFY_SOCKET.

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::Daemon;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn install_writes_a_unit_that_systemd_accepts() {
    let root = tempfile::tempdir().unwrap();
    let out = Command::new(repo().join("scripts/install"))
        .args(["--root"])
        .arg(root.path())
        .arg("--binary")
        .arg(common::ferry_bin())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = root.path().join("usr/local/bin/ferry");
    assert_eq!(
        std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let config = root.path().join("etc/ferry/ferry.toml");
    assert_eq!(
        std::fs::metadata(&config).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let unit_path = root.path().join("etc/systemd/system/ferry.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    for line in [
        "Type=notify",
        "Before=docker.service",
        "ExecStart=/usr/local/bin/ferry serve --config /etc/ferry/ferry.toml",
        "KillMode=process",
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "missing {line:?} in\n{unit}"
        );
    }
    // The installed default configuration is valid: the daemon starts on it.
    std::fs::write(&config, b"changed").unwrap();
    let again = Command::new(repo().join("scripts/install"))
        .arg("--root")
        .arg(root.path())
        .arg("--binary")
        .arg(common::ferry_bin())
        .output()
        .unwrap();
    assert!(again.status.success());
    assert_eq!(
        std::fs::read(&config).unwrap(),
        b"changed",
        "an existing config must be kept"
    );

    // systemd-analyze checks that the ExecStart binary exists, so verify a copy pointing at the real one.
    let verify_dir = tempfile::tempdir().unwrap();
    let checked = verify_dir.path().join("ferry.service");
    std::fs::write(
        &checked,
        unit.replace("/usr/local/bin/ferry", common::ferry_bin()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&checked)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    let ours: Vec<_> = stderr
        .lines()
        .filter(|l| l.contains("ferry.service"))
        .collect();
    assert!(ours.is_empty(), "systemd-analyze complained:\n{stderr}");
}

#[test]
fn packaged_config_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let config = repo().join("packaging/ferry.toml");
    let mut d = Daemon::start_in(
        dir.path(),
        &dir.path().join("f.sock"),
        &[("FERRY_CONFIG", config.to_str().unwrap())],
    );
    d.ok("/VolumeDriver.List", "{}");
    assert!(d.terminate().success());
}

#[test]
fn readiness_is_notified_after_the_socket_answers() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let socket = dir.path().join("f.sock");
    let mut d = Daemon::start_in(
        dir.path(),
        &socket,
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
    );
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("no READY=1 from ferry");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    // Ready means answering: the socket exists and serves calls.
    d.ok("/VolumeDriver.List", "{}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let n = notify.recv(&mut buf).expect("no STOPPING=1 from ferry");
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(d.terminate_wait().success());

    // An abstract-namespace NOTIFY_SOCKET ("@name") works too.
    use std::os::linux::net::SocketAddrExt;
    let name = format!("ferry-test-notify-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let abstract_sock = UnixDatagram::bind_addr(&addr).unwrap();
    abstract_sock
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let _d2 = Daemon::start_in(
        dir.path(),
        &dir.path().join("g.sock"),
        &[("NOTIFY_SOCKET", &format!("@{name}"))],
    );
    let n = abstract_sock
        .recv(&mut buf)
        .expect("no READY=1 on the abstract socket");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
}

//! The nfs backend through the real daemon against a real NFS-Ganesha: volumes as directories of the
//! export, the FUSE data path in helper processes, two daemons standing in for two hosts, an unreachable
//! server, and a plugin killed while a volume is mounted.

use crate::common;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::ganesha::Ganesha;
use common::Daemon;

/// A daemon whose configuration points the nfs backend at `g`.
fn daemon(g: &Ganesha, name: &str, timeout: &str) -> (tempfile::TempDir, Daemon) {
    let tmp = tempfile::Builder::new()
        .prefix(&format!("ferry-nfs-{name}"))
        .tempdir()
        .unwrap();
    let config = tmp.path().join("ferry.toml");
    std::fs::write(&config, g.config_section(timeout)).unwrap();
    let d = Daemon::start_in(
        tmp.path(),
        &tmp.path().join("ferry.sock"),
        &[("FERRY_CONFIG", config.to_str().unwrap())],
    );
    (tmp, d)
}

fn nfs_create(d: &Daemon, name: &str, extra: &str) {
    let opts = if extra.is_empty() {
        r#"{"backend":"nfs"}"#.to_string()
    } else {
        format!(r#"{{"backend":"nfs",{extra}}}"#)
    };
    d.create(name, &opts);
}

fn helper_pid(d: &Daemon, volume: &str) -> Option<i32> {
    std::fs::read_to_string(d.state.join("nfs").join(volume).join("helper.pid"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn volume_is_a_directory_of_the_export() {
    let g = Ganesha::start();
    let (_t, d) = daemon(&g, "life", "5s");
    nfs_create(&d, "v1", r#""uid":"1000","gid":"1001","mode":"0750""#);
    let dir = g.export().join("v1");
    let meta = std::fs::metadata(&dir).unwrap();
    assert!(meta.is_dir());
    assert_eq!((meta.uid(), meta.gid()), (1000, 1001));
    assert_eq!(meta.permissions().mode() & 0o7777, 0o750);
    // Idempotent; a conflicting create names the option.
    nfs_create(&d, "v1", r#""uid":"1000","gid":"1001","mode":"0750""#);
    let err = d.err(
        "/VolumeDriver.Create",
        r#"{"Name":"v1","Opts":{"backend":"nfs","uid":"1000","gid":"1001","mode":"0700"}}"#,
    );
    assert!(err.contains("mode"), "{err}");

    let status = d.get("v1")["Status"].clone();
    assert_eq!(status["backend"], "nfs");
    assert_eq!(status["server"], "127.0.0.1");
    assert_eq!(status["export"], "/export");
    assert_eq!(status["path"], "v1");
    assert_eq!(status["data_path"], "fuse");
    assert!(status["export_avail_bytes"].as_u64().is_some(), "{status}");

    let mnt = d.mount("v1", "c1");
    assert!(common::is_mounted(&mnt));
    std::fs::write(mnt.join("hello"), b"through fuse").unwrap();
    assert_eq!(std::fs::read(dir.join("hello")).unwrap(), b"through fuse");
    std::fs::write(dir.join("direct"), b"on the server").unwrap();
    assert_eq!(std::fs::read(mnt.join("direct")).unwrap(), b"on the server");
    let pid = helper_pid(&d, "v1").expect("a helper serves the mount");
    assert!(alive(pid));
    // This host's marker is in the export while the volume is mounted.
    let markers = g.export().join(".ferry/mounts/v1");
    assert_eq!(std::fs::read_dir(&markers).unwrap().count(), 1);

    d.unmount("v1", "c1");
    assert!(!common::is_mounted(&mnt));
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        assert!(Instant::now() < deadline, "the helper did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::read_dir(&markers).unwrap().count(), 0);

    d.remove("v1");
    assert!(!dir.exists());
    assert!(!markers.exists());
}

#[test]
fn subdir_adopts_existing_data_and_is_never_deleted() {
    let g = Ganesha::start();
    let (_t, d) = daemon(&g, "subdir", "5s");
    let data = g.export().join("projects/app");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("existing"), b"old data").unwrap();
    let err = d.err(
        "/VolumeDriver.Create",
        r#"{"Name":"nope","Opts":{"backend":"nfs","subdir":"projects/missing"}}"#,
    );
    assert!(
        err.contains("subdir") && err.contains("projects/missing"),
        "{err}"
    );
    nfs_create(&d, "adopted", r#""subdir":"projects/app""#);
    let mnt = d.mount("adopted", "c1");
    assert_eq!(std::fs::read(mnt.join("existing")).unwrap(), b"old data");
    d.unmount("adopted", "c1");
    d.remove("adopted");
    assert_eq!(std::fs::read(data.join("existing")).unwrap(), b"old data");
    // Options cannot point the plugin anywhere else.
    let err = d.err(
        "/VolumeDriver.Create",
        r#"{"Name":"evil","Opts":{"backend":"nfs","server":"10.1.2.3"}}"#,
    );
    assert!(
        err.contains("10.1.2.3") && err.contains("allowed_servers"),
        "{err}"
    );
    let err = d.err(
        "/VolumeDriver.Create",
        r#"{"Name":"evil","Opts":{"backend":"nfs","subdir":"../etc"}}"#,
    );
    assert!(err.contains("subdir"), "{err}");
}

#[test]
fn two_hosts_share_data_and_remove_waits_for_both() {
    let g = Ganesha::start();
    let (_ta, a) = daemon(&g, "host-a", "5s");
    let (_tb, b) = daemon(&g, "host-b", "5s");
    nfs_create(&a, "shared", "");
    nfs_create(&b, "shared", "");
    let ma = a.mount("shared", "ca");
    let mb = b.mount("shared", "cb");
    std::fs::write(ma.join("from-a"), b"written on host a").unwrap();
    let mut f = std::fs::File::open(mb.join("from-a")).unwrap();
    let mut text = String::new();
    f.read_to_string(&mut text).unwrap();
    assert_eq!(text, "written on host a");
    std::fs::write(mb.join("from-b"), b"written on host b").unwrap();
    assert_eq!(
        std::fs::read(ma.join("from-b")).unwrap(),
        b"written on host b"
    );

    b.unmount("shared", "cb");
    // Host a still has it mounted: host b must not delete the data under it.
    let err = b.err("/VolumeDriver.Remove", r#"{"Name":"shared"}"#);
    assert!(err.contains("still mounted on host"), "{err}");
    // Both daemons run on this machine under one hostname: the message must tell them apart by id.
    let id_a = std::fs::read_to_string(a.state.join("host-id")).unwrap();
    let id_b = std::fs::read_to_string(b.state.join("host-id")).unwrap();
    assert_ne!(id_a.trim(), id_b.trim());
    assert!(
        err.contains(&format!("(host id {})", id_a.trim()))
            && err.contains(&format!(
                "this host has the same name but is host id {}",
                id_b.trim()
            )),
        "{err}"
    );
    assert!(g.export().join("shared/from-a").exists());
    a.unmount("shared", "ca");
    b.remove("shared");
    assert!(!g.export().join("shared").exists());
    // Host a's record remains until it is removed there too; its data is gone, as on any shared store.
    a.remove("shared");
}

#[test]
fn an_unreachable_server_fails_fast_and_recovers() {
    let g = Ganesha::start();
    let (_t, d) = daemon(&g, "outage", "2s");
    nfs_create(&d, "v", "");
    nfs_create(&d, "idle", "");
    let mnt = d.mount("v", "c1");
    std::fs::write(mnt.join("f"), b"before").unwrap();

    g.freeze();
    // A file operation in the container fails with EIO after the timeout instead of hanging.
    let started = Instant::now();
    let err = std::fs::File::create(mnt.join("new-during-outage"))
        .and_then(|mut f| f.write_all(b"x"))
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(took < Duration::from_secs(8), "took {took:?}");
    // Get and List answer at once; Create and Mount fail within the timeout, naming the server.
    let started = Instant::now();
    d.get("v");
    d.ok("/VolumeDriver.List", "{}");
    assert!(started.elapsed() < Duration::from_millis(500));
    let started = Instant::now();
    let err = d.err(
        "/VolumeDriver.Create",
        r#"{"Name":"late","Opts":{"backend":"nfs"}}"#,
    );
    assert!(err.contains("127.0.0.1"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(8));
    let started = Instant::now();
    let err = d.err("/VolumeDriver.Mount", r#"{"Name":"idle","ID":"c2"}"#);
    assert!(err.contains("127.0.0.1"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(12));

    g.thaw();
    // Work resumes once the server is back.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::fs::write(mnt.join("after"), b"after") {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < deadline, "still failing: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"before");
    assert_eq!(std::fs::read(g.export().join("v/after")).unwrap(), b"after");

    // Unmount succeeds even while the server is down.
    g.freeze();
    let started = Instant::now();
    d.unmount("v", "c1");
    assert!(!common::is_mounted(&mnt));
    assert!(started.elapsed() < Duration::from_secs(12));
    g.thaw();
}

#[test]
fn plugin_crash_leaves_the_mount_working_and_restart_adopts_it() {
    let g = Ganesha::start();
    let (_t, mut d) = daemon(&g, "crash", "5s");
    nfs_create(&d, "v", "");
    let mnt = d.mount("v", "c1");
    std::fs::write(mnt.join("before"), b"1").unwrap();
    let pid = helper_pid(&d, "v").unwrap();
    d.kill9();
    // The container's mount does not depend on the plugin process.
    std::fs::write(mnt.join("during"), b"2").unwrap();
    assert_eq!(std::fs::read(g.export().join("v/during")).unwrap(), b"2");
    let config = d.dir.join("ferry.toml");
    d.spawn(&[("FERRY_CONFIG", config.to_str().unwrap())]);
    assert!(d.log_text().contains("adopted=1"), "{}", d.log_text());
    assert_eq!(
        helper_pid(&d, "v"),
        Some(pid),
        "the same helper still serves"
    );
    assert!(alive(pid));
    assert_eq!(d.get("v")["Status"]["active_mounts"], 1);
    std::fs::write(mnt.join("after"), b"3").unwrap();
    d.unmount("v", "c1");
    assert!(!common::is_mounted(&mnt));
    d.remove("v");
}

#[test]
fn a_killed_helper_is_replaced_by_the_next_mount_and_by_a_restart() {
    let g = Ganesha::start();
    let (_t, mut d) = daemon(&g, "helper", "5s");
    nfs_create(&d, "v", "");
    let mnt = d.mount("v", "c1");
    let pid = helper_pid(&d, "v").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // The dead mount answers ENOTCONN; the next container's Mount, with the plugin still running, gets
    // a working mount with a new helper at the same place.
    let err = std::fs::metadata(mnt.join("x")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    // The daemon notices on its own (it checks every 5 s) and says so in the volume's Status.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let status = d.get("v")["Status"].clone();
        if status["health"] == "error" || Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(status["health"], "error", "{status}");
    let last_error = status["last_error"].as_str().unwrap_or_default();
    assert!(last_error.contains("FUSE helper exited"), "{status}");
    assert_eq!(d.mount("v", "c2"), mnt);
    // c1's container still holds the dead mount: the new helper does not make the volume healthy.
    let status = d.get("v")["Status"].clone();
    assert_eq!(status["health"], "error", "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .unwrap_or_default()
            .starts_with("lost: 1 container mount(s) have a dead connection"),
        "{status}"
    );
    std::fs::write(mnt.join("second"), b"container").unwrap();
    assert_eq!(
        std::fs::read(g.export().join("v/second")).unwrap(),
        b"container"
    );
    let second = helper_pid(&d, "v").unwrap();
    assert_ne!(second, pid);

    // Killed again; this time a restart of the plugin mounts it again for the containers it knows.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    d.kill9();
    let config = d.dir.join("ferry.toml");
    d.spawn(&[("FERRY_CONFIG", config.to_str().unwrap())]);
    std::fs::write(mnt.join("works"), b"again").unwrap();
    assert!(![Some(pid), Some(second)].contains(&helper_pid(&d, "v")));
    // Both containers were on the helper that died: the restart's new one serves neither.
    let status = d.get("v")["Status"].clone();
    assert!(
        status["last_error"]
            .as_str()
            .unwrap_or_default()
            .starts_with("lost: 2 container mount(s)"),
        "{status}"
    );
    d.unmount("v", "c1");
    d.unmount("v", "c2");
    d.remove("v");
}

/// A process in its own mount namespace, holding its copy of the mounts as a container does; killed on drop.
struct Container(std::process::Child);

impl Container {
    fn start() -> Container {
        let child = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sleep", "600"])
            .spawn()
            .unwrap();
        let mine = std::fs::read_link("/proc/self/ns/mnt").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_link(format!("/proc/{}/ns/mnt", child.id())).ok() == Some(mine.clone())
        {
            assert!(
                Instant::now() < deadline,
                "unshare did not make a namespace"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Container(child)
    }

    /// `stat PATH` inside the namespace: Ok, or the error as stat prints it.
    fn stat(&self, path: &Path) -> Result<(), String> {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--target={}", self.0.id()))
            .arg("--mount")
            .arg("stat")
            .arg(path)
            .output()
            .unwrap();
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn containers_left_on_a_dead_helper_keep_health_broken_until_they_unmount() {
    let g = Ganesha::start();
    let (_t, d) = daemon(&g, "stranded", "5s");
    nfs_create(&d, "v", "");
    let mnt = d.mount("v", "old");
    std::fs::write(mnt.join("first"), b"1").unwrap();
    let old = Container::start();
    assert_eq!(old.stat(&mnt.join("first")), Ok(()));
    let pid = helper_pid(&d, "v").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));

    // A new container's Mount gets a new helper; the old container keeps the dead connection.
    assert_eq!(d.mount("v", "new"), mnt);
    std::fs::write(mnt.join("second"), b"2").unwrap();
    let err = old.stat(&mnt.join("second")).unwrap_err();
    assert!(err.contains("Transport endpoint is not connected"), "{err}");
    let status = d.get("v")["Status"].clone();
    assert_eq!(status["health"], "error", "{status}");
    assert_eq!(
        status["last_error"],
        "lost: 1 container mount(s) have a dead connection to storage that was lost and attached \
         again; restart those containers",
        "{status}"
    );
    // Another Mount and Unmount of the new ID change nothing for the old one.
    d.mount("v", "new");
    d.unmount("v", "new");
    assert_eq!(d.get("v")["Status"]["health"], "error");

    // The old container stops: Docker unmounts its ID, and nothing broken is left.
    drop(old);
    d.unmount("v", "old");
    let status = d.get("v")["Status"].clone();
    assert_eq!(status["health"], "ok", "{status}");
    assert_eq!(std::fs::read(mnt.join("first")).unwrap(), b"1");
    d.unmount("v", "new");
    d.remove("v");
}

#[test]
fn unmount_succeeds_while_a_process_holds_the_mount() {
    let g = Ganesha::start();
    let (_t, d) = daemon(&g, "busy", "5s");
    nfs_create(&d, "v", "");
    let mnt = d.mount("v", "c1");
    let mut held = std::fs::File::create(mnt.join("open")).unwrap();
    held.write_all(b"held").unwrap();
    d.unmount("v", "c1");
    assert!(!common::is_mounted(&mnt));
    drop(held);
    d.remove("v");
    let _ = PathBuf::new();
}

#[test]
fn a_server_restart_mid_use_fails_operations_then_resumes() {
    let g = Ganesha::start();
    let (_t, d) = daemon(&g, "restart", "3s");
    nfs_create(&d, "v", "");
    let mnt = d.mount("v", "c1");
    std::fs::write(mnt.join("kept"), b"before the restart").unwrap();
    let mut open = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(mnt.join("log"))
        .unwrap();
    open.write_all(b"one\n").unwrap();
    open.sync_all().unwrap();

    g.stop();
    let started = Instant::now();
    let err = std::fs::write(mnt.join("during"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(started.elapsed() < Duration::from_secs(6));
    let err = open.write_all(b"two\n").and_then(|()| open.sync_all());
    assert!(err.is_err(), "a sync against a stopped server must fail");

    g.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match std::fs::read(mnt.join("kept")) {
            Ok(data) => {
                assert_eq!(data, b"before the restart");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "still failing: {e}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // The file opened before the outage is usable again, through the same descriptor.
    open.write_all(b"three\n").unwrap();
    open.sync_all().unwrap();
    let log = std::fs::read_to_string(g.export().join("v/log")).unwrap();
    assert!(
        log.starts_with("one\n") && log.ends_with("three\n"),
        "{log:?}"
    );
    drop(open);
    d.unmount("v", "c1");
    d.remove("v");
}

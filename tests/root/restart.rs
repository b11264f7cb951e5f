//! Crash safety: `kill -9` with volumes mounted, restart, and everything is intact and releasable.

use crate::common;

use common::{is_mounted, Daemon, NamespaceHolder};

fn mount_count(path: &std::path::Path) -> usize {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| std::path::Path::new(p) == path)
        .count()
}

#[test]
fn kill9_with_mounted_volumes_then_restart() {
    let mut d = Daemon::start();
    d.create("capped", r#"{"size":"32M"}"#);
    d.create("dir", r#"{"mode":"0700"}"#);
    d.create("idle", r#"{"size":"32M","fs":"ext4"}"#);
    let capped = d.mount("capped", "c1");
    let _ = d.mount("capped", "c1");
    let _ = d.mount("capped", "c2");
    let dir = d.mount("dir", "c3");
    let idle = d.mount("idle", "c4");
    std::fs::write(capped.join("data.bin"), vec![7u8; 1 << 20]).unwrap();
    std::fs::write(dir.join("note"), b"hello").unwrap();
    std::fs::write(idle.join("kept"), b"idle data").unwrap();
    d.unmount("idle", "c4");
    let created = d.get("capped")["CreatedAt"].clone();
    // The containers using "capped" and "dir" keep running through the crash.
    let containers = NamespaceHolder::start();
    containers.bind(&dir, &d.dir.join("container-dir"));

    d.kill9();
    assert!(
        is_mounted(&capped),
        "a crash of the plugin leaves mounts in place"
    );
    d.spawn(&[]);

    let log = d.log_text();
    assert!(log.contains("state reconciled"), "{log}");
    let names: Vec<_> = d.ok("/VolumeDriver.List", "{}")["Volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["Name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["capped", "dir", "idle"]);
    let v = d.get("capped");
    assert_eq!(v["CreatedAt"], created);
    assert_eq!(v["Status"]["active_mounts"], 3);
    assert_eq!(v["Mountpoint"], capped.to_str().unwrap());
    assert_eq!(
        mount_count(&capped),
        1,
        "the surviving mount is adopted, not stacked"
    );
    assert_eq!(
        std::fs::read(capped.join("data.bin")).unwrap(),
        vec![7u8; 1 << 20]
    );
    assert_eq!(std::fs::read(dir.join("note")).unwrap(), b"hello");
    containers.stop();

    // The same IDs release the volume; the last one unmounts it.
    d.unmount("capped", "c1");
    d.unmount("capped", "c2");
    assert!(is_mounted(&capped));
    d.unmount("capped", "c1");
    assert!(!is_mounted(&capped));
    d.unmount("dir", "c3");
    assert_eq!(d.get("dir")["Status"]["active_mounts"], 0);

    // Data of an idle volume survived too.
    let p = d.mount("idle", "c5");
    assert_eq!(std::fs::read(p.join("kept")).unwrap(), b"idle data");
    d.unmount("idle", "c5");
    for n in ["capped", "dir", "idle"] {
        d.remove(n);
    }
}

#[test]
fn lost_mount_is_restored_at_start() {
    // Ferry's own mount is gone (unmounted by hand while Ferry was down) but a container still has the
    // volume in its mount namespace: the restarted plugin mounts the container's filesystem again, sharing
    // it (one loop device, one ext4), and never mounts the image a second time.
    let mut d = Daemon::start();
    d.create("v", r#"{"size":"64M"}"#);
    let mp = d.mount("v", "c1");
    std::fs::write(mp.join("f"), b"x").unwrap();
    let container = NamespaceHolder::start();
    d.kill9();
    nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH).unwrap();
    assert!(!is_mounted(&mp));
    d.spawn(&[]);
    assert!(is_mounted(&mp), "{}", d.log_text());
    assert!(d.log_text().contains("attached it again"));
    assert!(
        d.log_text().contains("mounting that device"),
        "{}",
        d.log_text()
    );
    assert_eq!(std::fs::read(mp.join("f")).unwrap(), b"x");
    // Both sides write, and each sees the other's data: one filesystem.
    let in_container = container.path(&mp);
    for (path, byte) in [
        (in_container.join("from-container"), 1u8),
        (mp.join("from-host"), 2),
    ] {
        let mut f = std::fs::File::create(path).unwrap();
        std::io::Write::write_all(&mut f, &vec![byte; 4 << 20]).unwrap();
        f.sync_all().unwrap();
    }
    assert_eq!(
        std::fs::read(mp.join("from-container")).unwrap(),
        vec![1u8; 4 << 20]
    );
    assert_eq!(
        std::fs::read(in_container.join("from-host")).unwrap(),
        vec![2u8; 4 << 20]
    );
    d.unmount("v", "c1");
    assert!(!is_mounted(&mp));
    container.stop();
    let image = d.state.join("local/v/disk.img");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let out = std::process::Command::new("losetup")
            .arg("-j")
            .arg(&image)
            .output()
            .unwrap();
        if out.stdout.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the loop device stays"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let fsck = std::process::Command::new("e2fsck")
        .arg("-fn")
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    d.remove("v");
}

/// A container that stopped while the plugin was down never gets its Unmount: at start-up nothing holds
/// the volume any more, so its mount ID is released (and said so in the log), and the volume can be
/// removed.
#[test]
fn mount_ids_of_containers_gone_while_down_are_released_at_start() {
    let mut d = Daemon::start();
    d.create("capped", r#"{"size":"32M"}"#);
    d.create("dir", "null");
    let capped = d.mount("capped", "c1");
    let dir = d.mount("dir", "c2");
    let container = NamespaceHolder::start();
    container.bind(&dir, &d.dir.join("container-dir"));
    d.kill9();
    container.stop();
    // What this test means by "gone" includes other tests' namespaces that copied the volumes' mounts.
    for mp in [&capped, &dir] {
        common::wait_until_no_other_namespace_mounts(mp, std::time::Duration::from_secs(120));
    }
    d.spawn(&[]);
    let log = d.log_text();
    assert_eq!(
        log.matches("released mount IDs left by containers").count(),
        2,
        "{log}"
    );
    assert!(!is_mounted(&capped));
    for n in ["capped", "dir"] {
        assert_eq!(d.get(n)["Status"]["active_mounts"], 0, "{n}");
        d.remove(n);
    }
}

#[test]
fn leaked_mount_without_ids_is_released_at_start() {
    // As after a crash between attaching storage and recording the mount: mounted, but no ID holds it.
    let mut d = Daemon::start();
    d.create("v", r#"{"size":"32M"}"#);
    let mp = d.mount("v", "c1");
    d.unmount("v", "c1");
    d.kill9();
    let image = d.state.join("local/v/disk.img");
    let out = std::process::Command::new("mount")
        .arg("-o")
        .arg("loop")
        .arg(&image)
        .arg(&mp)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(&mp));
    d.spawn(&[]);
    assert!(!is_mounted(&mp), "{}", d.log_text());
    d.remove("v");
}

#[test]
fn state_dir_behind_a_symlink_is_never_mounted_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let mut d = Daemon::start_in(&link, &tmp.path().join("f.sock"), &[]);
    d.create("v", r#"{"size":"32M"}"#);
    let mp = d.mount("v", "a");
    assert_eq!(
        mp,
        real.join("state/local/v/data"),
        "Docker is given the resolved path"
    );
    let container = NamespaceHolder::start();
    assert!(d.terminate().success());
    d.spawn(&[]);
    assert_eq!(mount_count(&mp), 1, "{}", d.log_text());
    container.stop();
    d.unmount("v", "a");
    assert_eq!(mount_count(&mp), 0);
    d.remove("v");
    assert!(!real.join("state/local/v").exists());
}

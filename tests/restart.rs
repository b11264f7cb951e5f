//! Crash safety: `kill -9` with volumes mounted, restart, and everything is intact and releasable.

mod common;

use common::{is_mounted, Daemon};

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
    // As after a reboot: the catalog says a container holds the volume, but nothing is mounted.
    let mut d = Daemon::start();
    d.create("v", r#"{"size":"32M"}"#);
    let mp = d.mount("v", "c1");
    std::fs::write(mp.join("f"), b"x").unwrap();
    d.kill9();
    nix::mount::umount2(&mp, nix::mount::MntFlags::empty()).unwrap();
    assert!(!is_mounted(&mp));
    d.spawn(&[]);
    assert!(is_mounted(&mp));
    assert_eq!(std::fs::read(mp.join("f")).unwrap(), b"x");
    assert!(d.log_text().contains("attached it again"));
    d.unmount("v", "c1");
    assert!(!is_mounted(&mp));
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
    assert!(d.terminate().success());
    d.spawn(&[]);
    assert_eq!(mount_count(&mp), 1, "{}", d.log_text());
    d.unmount("v", "a");
    assert_eq!(mount_count(&mp), 0);
    d.remove("v");
    assert!(!real.join("state/local/v").exists());
}

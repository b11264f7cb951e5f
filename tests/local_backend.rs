//! The local backend through real loop mounts: the size cap, filesystems, ownership and removal.

mod common;

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::{is_mounted, unmount_under, Daemon, NamespaceHolder};

fn fstype(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .filter(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|p| std::path::Path::new(p) == path)
        })
        .filter_map(|l| l.split(" - ").nth(1))
        .filter_map(|rest| rest.split(' ').next())
        .next_back()
        .unwrap()
        .to_string()
}

#[test]
fn size_cap_is_enforced_by_the_kernel() {
    let d = Daemon::start();
    d.create("capped", r#"{"size":"32MiB"}"#);
    let mp = d.mount("capped", "c1");
    assert_eq!(fstype(&mp), "ext4");
    // `size` is what is free on the new volume; the image is larger by the filesystem's own overhead.
    let st = nix::sys::statvfs::statvfs(&mp).unwrap();
    let available = st.blocks_available() * st.fragment_size();
    assert!(available >= 32 << 20, "available {available}");
    // The image is sparse: the cap costs no disk until written.
    let image = d.state.join("local/capped/disk.img");
    let meta = std::fs::metadata(&image).unwrap();
    assert!(
        (32 << 20..=64 << 20).contains(&meta.len()),
        "image size {}",
        meta.len()
    );
    assert!(
        meta.blocks() * 512 < 16 << 20,
        "image not sparse: {} blocks",
        meta.blocks()
    );

    let mut f = std::fs::File::create(mp.join("fill")).unwrap();
    let chunk = vec![1u8; 1 << 20];
    let mut written = 0u64;
    let err = loop {
        match f.write_all(&chunk).and_then(|_| f.sync_data()) {
            Ok(()) => written += 1 << 20,
            Err(e) => break e,
        }
        assert!(written <= meta.len(), "wrote past the cap");
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert!(err.to_string().contains("No space left on device"));
    drop(f);
    d.unmount("capped", "c1");
    d.remove("capped");
    assert!(!image.exists());
    assert!(!d.state.join("local/capped").exists());
}

#[test]
fn xfs_volume() {
    let d = Daemon::start();
    d.create(
        "x",
        r#"{"size":"300M","fs":"xfs","uid":"4321","mode":"0770"}"#,
    );
    let mp = d.mount("x", "c1");
    assert_eq!(fstype(&mp), "xfs");
    let meta = std::fs::metadata(&mp).unwrap();
    assert_eq!(meta.uid(), 4321);
    assert_eq!(meta.permissions().mode() & 0o7777, 0o770);
    assert_eq!(d.get("x")["Status"]["fs"], "xfs");
    d.unmount("x", "c1");
    d.remove("x");
}

#[test]
fn ownership_and_mode() {
    let d = Daemon::start();
    d.create("dir", r#"{"uid":"1234","gid":"2345","mode":"0750"}"#);
    d.create(
        "capped",
        r#"{"size":"32M","uid":"1234","gid":"2345","mode":"2770"}"#,
    );
    d.create("default", "null");
    let dir = d.mount("dir", "a");
    let capped = d.mount("capped", "b");
    let default = d.mount("default", "c");
    assert!(is_mounted(&capped));
    for (path, mode) in [(&dir, 0o750), (&capped, 0o2770)] {
        let meta = std::fs::metadata(path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (1234, 2345), "{}", path.display());
        assert_eq!(
            meta.permissions().mode() & 0o7777,
            mode,
            "{}",
            path.display()
        );
    }
    let meta = std::fs::metadata(&default).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.permissions().mode() & 0o7777),
        (0, 0, 0o755)
    );
    // Ownership is set once at create; a user's later chown survives remounts.
    nix::unistd::chown(&capped, Some(nix::unistd::Uid::from_raw(77)), None).unwrap();
    d.unmount("capped", "b");
    let capped = d.mount("capped", "b2");
    assert_eq!(std::fs::metadata(&capped).unwrap().uid(), 77);
    d.unmount("capped", "b2");
    d.unmount("dir", "a");
    d.unmount("default", "c");
}

#[test]
fn remove_deletes_data_and_name_can_be_reused() {
    let d = Daemon::start();
    d.create("r", r#"{"size":"32M"}"#);
    let mp = d.mount("r", "a");
    std::fs::write(mp.join("secret"), b"old").unwrap();
    d.unmount("r", "a");
    d.remove("r");
    d.create("r", r#"{"size":"32M"}"#);
    let mp = d.mount("r", "a");
    assert!(!mp.join("secret").exists());
    d.unmount("r", "a");
}

#[test]
fn mount_root_exposes_volumes_elsewhere() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("propagated");
    let root_s = root.to_str().unwrap().to_string();
    let mut d = Daemon::start_in(
        tmp.path(),
        &tmp.path().join("f.sock"),
        &[("FERRY_MOUNT_ROOT", &root_s)],
    );
    d.create("plain", "null");
    d.create("capped", r#"{"size":"32M"}"#);
    let plain = d.mount("plain", "a");
    let capped = d.mount("capped", "b");
    assert_eq!(plain, root.join("plain"));
    assert_eq!(capped, root.join("capped"));
    assert!(is_mounted(&plain) && is_mounted(&capped));
    std::fs::write(plain.join("f"), b"through the bind mount").unwrap();
    assert_eq!(
        std::fs::read(d.state.join("local/plain/data/f")).unwrap(),
        b"through the bind mount"
    );
    assert_eq!(fstype(&capped), "ext4");
    // Containers keep both volumes across the plugin's crash, so the restarted plugin keeps their mounts.
    let containers = NamespaceHolder::start();
    d.kill9();
    d.spawn(&[("FERRY_MOUNT_ROOT", &root_s)]);
    assert_eq!(d.get("plain")["Mountpoint"], plain.to_str().unwrap());
    assert_eq!(d.get("capped")["Status"]["active_mounts"], 1);
    containers.stop();
    d.unmount("plain", "a");
    d.unmount("capped", "b");
    assert!(!is_mounted(&plain) && !is_mounted(&capped));
    assert!(
        !plain.exists(),
        "the mountpoint directory is removed with the mount"
    );
    let again = d.mount("plain", "c");
    assert_eq!(
        std::fs::read(again.join("f")).unwrap(),
        b"through the bind mount"
    );
    d.unmount("plain", "c");
    d.remove("plain");
    d.remove("capped");
    unmount_under(&root);
}

#[test]
fn existing_data_without_a_record_is_never_touched() {
    let mut d = Daemon::start();
    let orphan = d.state.join("local/orphan/data");
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::write(orphan.join("precious"), b"keep me").unwrap();
    let err = d.err("/VolumeDriver.Create", r#"{"Name":"orphan","Opts":null}"#);
    assert!(err.contains("no volume record owns it"), "{err}");
    d.kill9();
    d.spawn(&[]);
    assert_eq!(std::fs::read(orphan.join("precious")).unwrap(), b"keep me");
    assert!(d
        .err("/VolumeDriver.Get", r#"{"Name":"orphan"}"#)
        .contains("does not exist"));
}

/// A capped volume's mount taken away by hand under a running container is noticed (health in Status)
/// and put back by the next container's Mount.
#[test]
fn a_mount_removed_by_hand_shows_in_health_and_the_next_mount_restores_it() {
    let d = Daemon::start();
    d.create("lost", r#"{"size":"32MiB"}"#);
    let mp = d.mount("lost", "c1");
    std::fs::write(mp.join("kept"), b"data").unwrap();
    nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH).unwrap();
    assert!(!is_mounted(&mp));

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        let status = d.get("lost")["Status"].clone();
        if status["health"] == "error" || std::time::Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(status["health"], "error", "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("attached storage was lost while 1 container mount(s)"),
        "{status}"
    );

    assert_eq!(d.mount("lost", "c2"), mp);
    assert!(is_mounted(&mp));
    assert_eq!(std::fs::read(mp.join("kept")).unwrap(), b"data");
    assert_eq!(d.get("lost")["Status"]["health"], "ok");
    d.unmount("lost", "c1");
    d.unmount("lost", "c2");
    assert!(!is_mounted(&mp));
    d.remove("lost");
    unmount_under(&d.state);
}

/// The root of a new volume is empty (no `lost+found`: programs such as postgres' initdb refuse a data
/// directory that is not), and `size` is what `df` shows available on it, for both filesystems.
#[test]
fn a_new_capped_volume_is_empty_and_has_the_requested_room() {
    let d = Daemon::start();
    for (name, fs, size) in [("e", "ext4", 64u64 << 20), ("x", "xfs", 300 << 20)] {
        d.create(
            name,
            &format!(r#"{{"size":"{}MiB","fs":"{fs}"}}"#, size >> 20),
        );
        let mp = d.mount(name, "c1");
        assert_eq!(fstype(&mp), fs);
        let entries: Vec<_> = std::fs::read_dir(&mp)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(entries.is_empty(), "{fs}: the root holds {entries:?}");
        let st = nix::sys::statvfs::statvfs(&mp).unwrap();
        let available = st.blocks_available() * st.fragment_size();
        assert!(
            available >= size,
            "{fs}: {available} bytes available, {size} asked for"
        );
        // Status keeps saying what was asked for.
        assert_eq!(d.get(name)["Status"]["size_bytes"], size, "{fs}");
        d.unmount(name, "c1");
        if fs == "ext4" {
            let image = d.state.join(format!("local/{name}/disk.img"));
            let out = std::process::Command::new("e2fsck")
                .arg("-fn")
                .arg(&image)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        d.remove(name);
    }
}

/// Loop devices bound to `image`, as `losetup -j` lists them.
fn loops_of(image: &std::path::Path) -> Vec<String> {
    let out = std::process::Command::new("losetup")
        .arg("-j")
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split(':').next().unwrap_or_default().to_string())
        .collect()
}

/// Writes `len` bytes of `byte` and syncs them.
fn write_synced(path: &std::path::Path, byte: u8, len: usize) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&vec![byte; len]).unwrap();
    f.sync_all().unwrap();
}

/// Someone unmounts a capped volume's host-side mount by hand (`umount -l`) while a container (here a
/// process in a mount namespace of its own) keeps using it. The next Mount must share the filesystem the
/// container still has, not attach the image to a second loop device and mount a second ext4 on it: then
/// both sides see each other's writes, and the image is clean afterwards.
#[test]
fn a_volume_unmounted_by_hand_is_shared_never_mounted_twice() {
    let d = Daemon::start();
    d.create("shared", r#"{"size":"64MiB"}"#);
    let mp = d.mount("shared", "c1");
    let image = d.state.join("local/shared/disk.img");
    let container = NamespaceHolder::start();
    nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH).unwrap();
    assert!(!is_mounted(&mp));
    assert_eq!(loops_of(&image).len(), 1, "the container keeps the device");

    assert_eq!(d.mount("shared", "c2"), mp);
    assert!(is_mounted(&mp));
    assert_eq!(
        loops_of(&image).len(),
        1,
        "a second loop device on one image: {:?}\n{}",
        loops_of(&image),
        d.log_text()
    );
    write_synced(&container.path(&mp).join("from-container"), 0xc1, 8 << 20);
    write_synced(&mp.join("from-host"), 0x42, 8 << 20);
    // One filesystem: each side sees what the other wrote.
    assert_eq!(
        std::fs::read(container.path(&mp).join("from-host")).unwrap(),
        vec![0x42; 8 << 20]
    );
    assert_eq!(
        std::fs::read(mp.join("from-container")).unwrap(),
        vec![0xc1; 8 << 20]
    );

    d.unmount("shared", "c1");
    d.unmount("shared", "c2");
    container.stop();
    // The last mount gone, autoclear frees the device.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !loops_of(&image).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            loops_of(&image)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = std::process::Command::new("e2fsck")
        .arg("-fn")
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "e2fsck found damage:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mp = d.mount("shared", "c3");
    assert_eq!(
        std::fs::read(mp.join("from-container")).unwrap(),
        vec![0xc1; 8 << 20]
    );
    assert_eq!(
        std::fs::read(mp.join("from-host")).unwrap(),
        vec![0x42; 8 << 20]
    );
    d.unmount("shared", "c3");
    d.remove("shared");
}

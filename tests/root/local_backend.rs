//! The local backend through real loop mounts: the size cap, filesystems, ownership and removal.

use crate::common;

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

/// Links planted where Ferry keeps its own files are refused with an error naming them, and their targets
/// are neither mounted over, attached nor changed.
#[test]
fn planted_links_are_refused_and_their_targets_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let victim = tmp.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("precious"), b"keep me").unwrap();
    let victim_image = tmp.path().join("victim.img");
    std::fs::write(&victim_image, vec![7u8; 1 << 20]).unwrap();
    let untouched = |what: &str| {
        assert!(!is_mounted(&victim), "{what}: the victim was mounted over");
        assert_eq!(
            std::fs::read(victim.join("precious")).unwrap(),
            b"keep me",
            "{what}"
        );
        assert_eq!(
            std::fs::read(&victim_image).unwrap(),
            vec![7u8; 1 << 20],
            "{what}"
        );
        assert!(
            loops_of(&victim_image).is_empty(),
            "{what}: the victim image was attached"
        );
    };
    let plant = |link: &std::path::Path, target: &std::path::Path| {
        if link.is_dir() && !link.is_symlink() {
            std::fs::remove_dir_all(link).unwrap();
        } else if link.exists() || link.is_symlink() {
            std::fs::remove_file(link).unwrap();
        }
        std::os::unix::fs::symlink(target, link).unwrap();
    };

    // Without a mount root: Docker is handed local/NAME/data, and a capped volume is mounted there.
    let d = Daemon::start_in(tmp.path(), &tmp.path().join("a.sock"), &[]);
    d.create("plain", "null");
    plant(&d.state.join("local/plain/data"), &victim);
    let err = d.err("/VolumeDriver.Mount", r#"{"Name":"plain","ID":"a"}"#);
    assert!(err.contains("local/plain/data is a symbolic link"), "{err}");
    untouched("plain data");

    d.create("capped", r#"{"size":"32MiB"}"#);
    plant(&d.state.join("local/capped/disk.img"), &victim_image);
    let err = d.err("/VolumeDriver.Mount", r#"{"Name":"capped","ID":"a"}"#);
    assert!(
        err.contains("local/capped/disk.img is a symbolic link"),
        "{err}"
    );
    untouched("capped image");

    d.create("capped2", r#"{"size":"32MiB"}"#);
    plant(&d.state.join("local/capped2/data"), &victim);
    let err = d.err("/VolumeDriver.Mount", r#"{"Name":"capped2","ID":"a"}"#);
    assert!(
        err.contains("local/capped2/data is a symbolic link"),
        "{err}"
    );
    untouched("capped mountpoint");
    drop(d);

    // With a mount root: a link in place of the volume's mountpoint.
    let root = tmp.path().join("propagated");
    let root_s = root.to_str().unwrap().to_string();
    let d = Daemon::start_in(
        tmp.path(),
        &tmp.path().join("b.sock"),
        &[("FERRY_MOUNT_ROOT", &root_s)],
    );
    for (name, opts) in [("rooted", "null"), ("rooted-capped", r#"{"size":"32MiB"}"#)] {
        d.create(name, opts);
        plant(&root.join(name), &victim);
        let err = d.err(
            "/VolumeDriver.Mount",
            &format!(r#"{{"Name":"{name}","ID":"a"}}"#),
        );
        assert!(
            err.contains(&format!("propagated/{name} is a symbolic link")),
            "{err}"
        );
        untouched(name);
        // Remove refuses the link too, and works once it is gone; the target stays as it was.
        let err = d.err("/VolumeDriver.Remove", &format!(r#"{{"Name":"{name}"}}"#));
        assert!(err.contains("is a symbolic link"), "{err}");
        untouched(name);
        std::fs::remove_file(root.join(name)).unwrap();
        d.remove(name);
        untouched(name);
    }
    drop(d);
    unmount_under(&root);
}

/// A state directory given as a link is followed once; its target is restricted only when it is Ferry's.
#[test]
fn a_linked_state_dir_is_restricted_only_when_it_is_ferrys() {
    let tmp = tempfile::tempdir().unwrap();
    let foreign = tmp.path().join("etc-like");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("passwd"), b"root:x:0:0").unwrap();
    std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o755)).unwrap();
    let link = tmp.path().join("state-link");
    std::os::unix::fs::symlink(&foreign, &link).unwrap();
    let out = std::process::Command::new(common::ferry_bin())
        .args(["serve", "--socket"])
        .arg(tmp.path().join("x.sock"))
        .arg("--state-dir")
        .arg(&link)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("holds files but no Ferry catalog"),
        "{stderr}"
    );
    let mode = std::fs::metadata(&foreign).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o755, "the link's target was chmod'ed");
    assert!(!foreign.join("catalog.redb").exists());

    // An empty target becomes Ferry's, and stays usable through the link after a restart.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&empty, &link).unwrap();
    let mut d = Daemon::start_in_state(tmp.path(), &tmp.path().join("y.sock"), &link);
    d.create("v", "null");
    assert_eq!(
        std::fs::metadata(&empty).unwrap().permissions().mode() & 0o7777,
        0o700
    );
    d.kill9();
    d.spawn(&[]);
    assert_eq!(d.get("v")["Name"], "v");
}

/// A size the state filesystem cannot hold as one file is refused at Create, naming the largest it can
/// hold, instead of failing with "File too large" later. ext4 with 1 KiB blocks stops at 4 TiB per file.
/// An ebs volume's local copy is such a file too, in the same state directory here.
#[test]
fn a_size_beyond_the_largest_file_is_refused_at_create() {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("statefs.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let run = |cmd: &str, args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(cmd).args(args).output().unwrap();
        assert!(out.status.success(), "{cmd}: {out:?}");
    };
    run(
        "mkfs.ext4",
        &[
            "-q".as_ref(),
            "-F".as_ref(),
            "-b".as_ref(),
            "1024".as_ref(),
            image.as_os_str(),
        ],
    );
    let fs = tmp.path().join("statefs");
    std::fs::create_dir(&fs).unwrap();
    run(
        "mount",
        &[
            "-o".as_ref(),
            "loop".as_ref(),
            image.as_os_str(),
            fs.as_os_str(),
        ],
    );
    // Nothing answers at the EBS endpoint: the refusals below come before EBS is asked anything.
    let config = tmp.path().join("ferry.toml");
    std::fs::write(
        &config,
        "[ebs]\nregion = \"us-east-1\"\nendpoint_url = \"http://127.0.0.1:9\"\n",
    )
    .unwrap();
    let env = [
        ("FERRY_CONFIG", config.to_str().unwrap()),
        ("AWS_ACCESS_KEY_ID", "AKIDFERRYTEST"),
        ("AWS_SECRET_ACCESS_KEY", "not-a-secret"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    let d = Daemon::start_in(&fs, &tmp.path().join("f.sock"), &env);
    let err = d.err(
        "/VolumeDriver.Create",
        r#"{"Name":"huge","Opts":{"size":"5TiB"}}"#,
    );
    assert!(err.contains("size=5TiB does not fit"), "{err}");
    let max = err
        .split("the largest size it can hold is ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_else(|| panic!("{err}"));
    let max_gib: u64 = max.strip_suffix("GiB").unwrap().parse().unwrap();
    assert!((3 << 10..4 << 10).contains(&max_gib), "{err}");
    assert!(!d.state.join("local/huge").exists());
    assert!(d
        .err("/VolumeDriver.Get", r#"{"Name":"huge"}"#)
        .contains("does not exist"));
    let err = d.err(
        "/VolumeDriver.Create",
        r#"{"Name":"huge-ebs","Opts":{"backend":"ebs","size":"5TiB"}}"#,
    );
    assert!(err.contains("size=5TiB does not fit"), "{err}");
    // The ebs image is exactly the size (no overhead on top), so its largest is at least the local one's.
    let ebs_max = err
        .split("the largest size it can hold is ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .and_then(|max| max.strip_suffix("GiB"))
        .and_then(|gib| gib.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("{err}"));
    assert!((max_gib..4 << 10).contains(&ebs_max), "{err}");
    assert!(!d.state.join("ebs/huge-ebs").exists());
    // Beyond what any volume may have, whatever the filesystem: the option names the largest.
    let err = d.err(
        "/VolumeDriver.Create",
        r#"{"Name":"huge-ebs","Opts":{"backend":"ebs","size":"100TiB"}}"#,
    );
    assert!(err.contains("must be between 16MiB and 64TiB"), "{err}");
    // Sizes the filesystem can hold still work there.
    d.create("fits", r#"{"size":"32MiB"}"#);
    let mp = d.mount("fits", "a");
    std::fs::write(mp.join("f"), b"x").unwrap();
    d.unmount("fits", "a");
    d.remove("fits");
    drop(d);
    run("umount", &[fs.as_os_str()]);
}

//! One nfs volume used from two hosts: two FUSE mounts of one volume directory on a real NFS-Ganesha, each
//! with its own NFS client, as two Ferry daemons on two machines have. Checks what crosses from one host
//! to the other: data after close-to-open, special files, the group of setgid directories; and that a
//! system call against a hung server fails within the deadline. Needs root, /dev/fuse and ganesha.

use crate::nfs_support;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::{Duration, Instant};

use nfs_support::{as_user, Host};

/// The default `attr_cache` of an nfs volume.
const ATTR_CACHE: Duration = Duration::from_secs(1);

#[test]
fn a_longer_rewrite_on_one_host_is_read_whole_on_the_other_every_time() {
    let server = nfs_support::server();
    let a = Host::mount(&server, "vol", Duration::from_secs(10), ATTR_CACHE);
    let b = Host::mount(&server, "vol", Duration::from_secs(10), ATTR_CACHE);
    let mut torn = Vec::new();
    for round in 0..200 {
        // Longer each round, so a reader that kept the previous size would cut it short.
        let content = format!("round {round}: {}\n", "x".repeat(round)).into_bytes();
        // Host b knows the file's current (shorter) size: cached for `attr_cache`.
        if round > 0 {
            fs::metadata(b.path("shared.txt")).unwrap();
        }
        fs::write(a.path("shared.txt"), &content).unwrap();
        let read = fs::read(b.path("shared.txt")).unwrap();
        if read != content {
            torn.push((round, read.len(), content.len()));
        }
    }
    assert!(
        torn.is_empty(),
        "{} of 200 reads on host b differ from what host a wrote and closed (round, read, written): {:?}",
        torn.len(),
        &torn[..torn.len().min(10)]
    );
}

#[test]
fn a_rewrite_of_the_same_length_is_seen_by_an_open_that_follows_the_close() {
    let server = nfs_support::server();
    let a = Host::mount(&server, "vol", Duration::from_secs(10), ATTR_CACHE);
    let b = Host::mount(&server, "vol", Duration::from_secs(10), ATTR_CACHE);
    for round in 0..50u32 {
        // Same length every time: only the data moves, so only dropping cached pages shows it.
        let content = format!("{round:08}").repeat(512).into_bytes();
        fs::write(a.path("same.bin"), &content).unwrap();
        let mut f = fs::File::open(b.path("same.bin")).unwrap();
        let mut read = Vec::new();
        f.read_to_end(&mut read).unwrap();
        assert!(read == content, "round {round}: host b read stale data");
    }
}

#[test]
fn fifos_devices_and_sockets_made_on_one_host_have_their_type_on_the_other() {
    let server = nfs_support::server();
    let a = Host::mount(&server, "vol", Duration::from_secs(10), ATTR_CACHE);
    let b = Host::mount(&server, "vol", Duration::from_secs(10), ATTR_CACHE);
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    nix::unistd::mkfifo(&a.path("fifo"), Mode::from_bits_truncate(0o640)).expect("mkfifo");
    mknod(
        &a.path("null"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(1, 3),
    )
    .expect("mknod of a character device");
    mknod(
        &a.path("disk"),
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o660),
        makedev(7, 200),
    )
    .expect("mknod of a block device");
    let listener = std::os::unix::net::UnixListener::bind(a.path("sock")).expect("bind");

    // The FIFO works as one on host a: the kernel joins the two ends, the store never sees the data.
    let fifo = a.path("fifo");
    let writer = std::thread::spawn(move || {
        let mut w = fs::OpenOptions::new().write(true).open(fifo).unwrap();
        w.write_all(b"through the pipe").unwrap();
    });
    let mut got = String::new();
    fs::File::open(a.path("fifo"))
        .unwrap()
        .read_to_string(&mut got)
        .unwrap();
    writer.join().unwrap();
    assert_eq!(got, "through the pipe");
    // And the socket accepts a connection through its name.
    let mut client = std::os::unix::net::UnixStream::connect(a.path("sock")).expect("connect");
    client.write_all(b"hi").unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    let mut buf = [0u8; 2];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hi");

    let export = server.export().join("vol");
    for root in [b.dir.path(), export.as_path()] {
        let meta = |name: &str| fs::symlink_metadata(root.join(name)).unwrap();
        let where_ = root.display();
        assert!(meta("fifo").file_type().is_fifo(), "{where_}: fifo");
        assert_eq!(meta("fifo").permissions().mode() & 0o7777, 0o640);
        assert!(meta("sock").file_type().is_socket(), "{where_}: socket");
        let null = meta("null");
        assert!(null.file_type().is_char_device(), "{where_}: char device");
        assert_eq!(null.rdev(), makedev(1, 3), "{where_}: char device number");
        let disk = meta("disk");
        assert!(disk.file_type().is_block_device(), "{where_}: block device");
        assert_eq!(
            disk.rdev(),
            makedev(7, 200),
            "{where_}: block device number"
        );
        assert_eq!(disk.len(), 0);
    }
    // Listed with their types too (readdir's d_type).
    let mut kinds: Vec<(String, bool, bool)> = fs::read_dir(b.dir.path())
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            (
                e.file_name().into_string().unwrap(),
                t.is_file(),
                t.is_fifo() || t.is_socket() || t.is_char_device() || t.is_block_device(),
            )
        })
        .collect();
    kinds.sort();
    for (name, regular, special) in kinds {
        assert!(!regular && special, "{name} is listed as a regular file");
    }
    // Made on the server, seen on host b with its type.
    mknod(
        &export.join("zero"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(1, 5),
    )
    .unwrap();
    let zero = fs::symlink_metadata(b.path("zero")).unwrap();
    assert!(zero.file_type().is_char_device());
    assert_eq!(zero.rdev(), makedev(1, 5));
}

#[test]
fn a_setgid_directory_passes_its_group_and_the_bit_on_seen_from_both_hosts() {
    let server = nfs_support::server();
    let a = Host::mount(&server, "vol", Duration::from_secs(10), ATTR_CACHE);
    let b = Host::mount(&server, "vol", Duration::from_secs(10), ATTR_CACHE);
    fs::create_dir(a.path("team")).unwrap();
    nix::unistd::chown(
        &a.path("team"),
        None,
        Some(nix::unistd::Gid::from_raw(1000)),
    )
    .unwrap();
    fs::set_permissions(a.path("team"), fs::Permissions::from_mode(0o2777)).unwrap();

    // Made by a user whose group is 2000, on host a.
    as_user(1500, 2000, || {
        fs::write(a.path("team/report"), b"q3").unwrap();
        fs::create_dir(a.path("team/sub")).unwrap();
        fs::create_dir(a.path("team/sub/deeper")).unwrap();
        nix::unistd::mkfifo(
            &a.path("team/pipe"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        std::os::unix::fs::symlink("report", a.path("team/link")).unwrap();
    });
    // And by root, with O_EXCL, on host b.
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(b.path("team/by-root"))
        .unwrap();

    let export = server.export().join("vol");
    for root in [a.dir.path(), b.dir.path(), export.as_path()] {
        let meta = |name: &str| fs::symlink_metadata(root.join(name)).unwrap();
        let where_ = root.display();
        for name in ["team/report", "team/pipe", "team/link", "team/by-root"] {
            let m = meta(name);
            assert_eq!(
                m.gid(),
                1000,
                "{where_}: {name} takes the directory's group"
            );
        }
        assert_eq!(meta("team/report").uid(), 1500, "{where_}: the owner stays");
        assert_eq!(
            meta("team/report").mode() & 0o2000,
            0,
            "{where_}: files do not get the bit"
        );
        for name in ["team/sub", "team/sub/deeper"] {
            let m = meta(name);
            assert_eq!(m.gid(), 1000, "{where_}: {name} takes the group");
            assert_eq!(
                m.mode() & 0o2000,
                0o2000,
                "{where_}: {name} inherits setgid"
            );
        }
    }
    // Outside a setgid directory the caller's group still applies.
    as_user(1500, 2000, || fs::write(a.path("plain"), b"x").unwrap());
    assert_eq!(fs::metadata(b.path("plain")).unwrap().gid(), 2000);
}

/// Runs `touch` on `path` and returns whether it failed and how long it took.
fn touch(path: &std::path::Path) -> (bool, Duration) {
    let started = Instant::now();
    let out = Command::new("touch").arg(path).output().unwrap();
    let took = started.elapsed();
    println!(
        "touch {} -> {:?} after {took:?}: {}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    (!out.status.success(), took)
}

#[test]
fn touch_against_a_hung_server_fails_within_the_timeout_and_a_half_second() {
    let server = nfs_support::server();
    let timeout = Duration::from_secs(3);
    let a = Host::mount(&server, "vol", timeout, ATTR_CACHE);
    fs::write(a.path("existing"), b"old").unwrap();
    // Known to the kernel, with its attributes cached: touch goes straight to open and utimensat.
    fs::metadata(a.path("existing")).unwrap();

    for name in ["existing", "new-file"] {
        server.freeze();
        let (failed, took) = touch(&a.path(name));
        server.thaw();
        assert!(failed, "touch {name} on a hung server succeeded");
        assert!(
            took < timeout + Duration::from_millis(500),
            "touch {name} took {took:?} with a {timeout:?} timeout"
        );
        // An answered call ends the client's suspicion, so the next round starts from a trusted server.
        assert_eq!(fs::read(a.path("existing")).unwrap(), b"old");
    }
    let (failed, _) = touch(&a.path("new-file"));
    assert!(!failed, "touch works again once the server answers");
    assert!(server.export().join("vol/new-file").exists());
}

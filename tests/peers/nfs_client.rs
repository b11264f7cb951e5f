//! `NfsClient` against a real NFS-Ganesha, one server per test (started by `scripts/nfs-server` on free
//! loopback ports in its own temporary directory), checked through the export directory on disk.
//!
//! Ganesha and rpcbind must be installed (`scripts/deps`); without them these tests fail.

use crate::nfs_support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use ferry::nfs::{ExclusiveCreate, FileKind, NfsClient, NfsClientConfig, NfsError};

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_dir_is_idempotent_and_applies_owner_and_mode() {
    let server = nfs_support::server();
    let client = server.client();
    let on_disk = server.export().join("vol1");

    client.ensure_dir("vol1", 1234, 2345, 0o750).await.unwrap();
    let meta = std::fs::metadata(&on_disk).unwrap();
    assert!(meta.is_dir());
    assert_eq!((meta.uid(), meta.gid()), (1234, 2345));
    assert_eq!(mode_of(&on_disk), 0o750);

    // Again, with other attributes: the directory stays, the attributes follow the latest call.
    std::fs::write(on_disk.join("data"), b"kept").unwrap();
    client.ensure_dir("vol1", 4321, 5432, 0o2770).await.unwrap();
    let meta = std::fs::metadata(&on_disk).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (4321, 5432));
    assert_eq!(mode_of(&on_disk), 0o2770);
    assert_eq!(std::fs::read(on_disk.join("data")).unwrap(), b"kept");

    let attrs = client.getattr("vol1").await.unwrap();
    assert_eq!(attrs.kind, FileKind::Directory);
    assert_eq!((attrs.uid, attrs.gid, attrs.mode), (4321, 5432, 0o2770));

    // Nested, once the parent exists.
    client.ensure_dir("vol1/sub", 0, 0, 0o700).await.unwrap();
    assert_eq!(mode_of(&on_disk.join("sub")), 0o700);

    // A missing parent is an error in words that names the server, the export and the path.
    let err = client
        .ensure_dir("nope/vol", 0, 0, 0o755)
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("127.0.0.1") && text.contains("/export") && text.contains("\"nope\""),
        "{text}"
    );
    assert!(text.contains("no such file or directory"), "{text}");

    // A file in the way is not a directory.
    std::fs::write(server.export().join("file"), b"x").unwrap();
    let err = client.ensure_dir("file", 0, 0, 0o755).await.unwrap_err();
    assert!(matches!(err, NfsError::NotADirectory { .. }), "{err}");

    // Paths that could leave the export never reach the server.
    for bad in ["../escape", "/etc", "a//b", "vol1/../.."] {
        let err = client.ensure_dir(bad, 0, 0, 0o755).await.unwrap_err();
        assert!(matches!(err, NfsError::InvalidPath { .. }), "{bad}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_hosts_racing_to_create_one_directory_all_succeed() {
    let server = nfs_support::server();
    // Separate clients, like separate hosts, plus one shared client whose pool is smaller than the race.
    let shared = server.client();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let client = if i % 2 == 0 {
            server.client()
        } else {
            shared.clone()
        };
        tasks.push(tokio::spawn(async move {
            client.ensure_dir("raced", 1000, 1000, 0o770).await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let meta = std::fs::metadata(server.export().join("raced")).unwrap();
    assert!(meta.is_dir());
    assert_eq!((meta.uid(), meta.gid()), (1000, 1000));
    assert_eq!(mode_of(&server.export().join("raced")), 0o770);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_tree_removes_a_nested_tree_made_on_disk() {
    let server = nfs_support::server();
    let client = server.client();
    let root = server.export().join("vol");
    let outside = server.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("target"), b"must survive").unwrap();

    std::fs::create_dir_all(root.join("a/b/c/d")).unwrap();
    std::fs::create_dir_all(root.join("empty")).unwrap();
    std::fs::write(root.join("top"), b"1").unwrap();
    std::fs::write(root.join("a/b/c/d/deep"), b"2").unwrap();
    std::os::unix::fs::symlink(outside.join("target"), root.join("link-to-file")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("a/link-to-dir")).unwrap();
    std::os::unix::fs::symlink("nowhere", root.join("a/b/dangling")).unwrap();
    // Not UTF-8: removal must work on bytes, not on lossily converted names.
    std::fs::write(
        root.join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"bad\xffname")),
        b"3",
    )
    .unwrap();
    // Enough entries with long names that listing takes several READDIR pages.
    let many = root.join("many");
    std::fs::create_dir(&many).unwrap();
    for i in 0..3000 {
        std::fs::write(
            many.join(format!("entry-with-a-rather-long-name-{i:05}")),
            b"",
        )
        .unwrap();
    }
    let unreadable = root.join("a/locked");
    std::fs::create_dir(&unreadable).unwrap();
    std::fs::write(unreadable.join("f"), b"").unwrap();
    std::fs::set_permissions(&unreadable, std::fs::Permissions::from_mode(0o000)).unwrap();

    let names = client.readdir("vol/many").await.unwrap();
    assert_eq!(names.len(), 3000);
    let mut top = client.readdir("vol").await.unwrap();
    top.sort();
    assert_eq!(
        top,
        [
            "a",
            "bad\u{fffd}name",
            "empty",
            "link-to-file",
            "many",
            "top"
        ]
    );

    client.remove_tree("vol").await.unwrap();
    assert!(!root.exists(), "{} still exists", root.display());
    assert_eq!(
        std::fs::read(outside.join("target")).unwrap(),
        b"must survive"
    );
    assert_eq!(std::fs::read_dir(server.export()).unwrap().count(), 0);

    // Already gone, or never there: done.
    client.remove_tree("vol").await.unwrap();
    client.remove_tree("never/was").await.unwrap();
    // A single file is a tree too.
    std::fs::write(server.export().join("lone"), b"x").unwrap();
    client.remove_tree("lone").await.unwrap();
    assert!(!server.export().join("lone").exists());

    let err = client.remove_tree("").await.unwrap_err();
    assert!(matches!(err, NfsError::RemoveRoot { .. }), "{err}");
    let err = client.remove_tree("..").await.unwrap_err();
    assert!(matches!(err, NfsError::InvalidPath { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsstat_reports_the_exported_file_system() {
    let server = nfs_support::server();
    let stat = server.client().fsstat().await.unwrap();
    let local = nix::sys::statvfs::statvfs(&server.export()).unwrap();
    let total = local.blocks() * local.fragment_size();
    assert!(stat.total_bytes > 0);
    assert!(stat.free_bytes <= stat.total_bytes);
    assert!(stat.avail_bytes <= stat.free_bytes);
    assert!(stat.total_files > 0 && stat.free_files <= stat.total_files);
    // Same file system as the export directory on disk (free space moves, the size does not).
    assert_eq!(stat.total_bytes, total, "{stat:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_of_sixteen_exclusive_creates_wins() {
    let server = nfs_support::server();
    let client = server.client();
    client.ensure_dir(".ferry", 0, 0, 0o755).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..16u8 {
        // Half on their own client (their own connections), half sharing one pool.
        let client = if i % 2 == 0 {
            server.client()
        } else {
            client.clone()
        };
        tasks.push(tokio::spawn(async move {
            let verifier = [i, 1, 2, 3, 4, 5, 6, 7];
            (
                verifier,
                client.create_exclusive(".ferry", "lock", verifier).await,
            )
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        let (verifier, outcome) = task.await.unwrap();
        match outcome.unwrap() {
            ExclusiveCreate::Created(handle) => winners.push((verifier, handle)),
            ExclusiveCreate::AlreadyExists => {}
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let (verifier, handle) = winners.pop().unwrap();
    // The winner repeating its call (a lost reply) is told it created the same file; anyone else is not.
    assert_eq!(
        client
            .create_exclusive(".ferry", "lock", verifier)
            .await
            .unwrap(),
        ExclusiveCreate::Created(handle)
    );
    assert_eq!(
        client
            .create_exclusive(".ferry", "lock", [9; 8])
            .await
            .unwrap(),
        ExclusiveCreate::AlreadyExists
    );
    let lock = server.export().join(".ferry/lock");
    assert!(lock.is_file());
    assert_eq!(mode_of(&lock), 0o644);
    assert!(matches!(
        client.create_exclusive(".ferry", "../x", [0; 8]).await,
        Err(NfsError::InvalidPath { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_files_round_trip() {
    let server = nfs_support::server();
    let client = server.client();
    client.ensure_dir(".ferry", 0, 0, 0o755).await.unwrap();

    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    client.write_file(".ferry/host-a", &big).await.unwrap();
    assert_eq!(
        std::fs::read(server.export().join(".ferry/host-a")).unwrap(),
        big
    );
    assert_eq!(client.read_file(".ferry/host-a").await.unwrap(), big);

    // Rewriting with less leaves exactly the new content.
    client
        .write_file(".ferry/host-a", b"alive 42\n")
        .await
        .unwrap();
    assert_eq!(
        client.read_file(".ferry/host-a").await.unwrap(),
        b"alive 42\n"
    );
    assert_eq!(
        std::fs::read(server.export().join(".ferry/host-a")).unwrap(),
        b"alive 42\n"
    );
    // Written on disk behind the server's back: seen at once (the export has no attribute cache).
    std::fs::write(server.export().join(".ferry/host-b"), b"from disk").unwrap();
    assert_eq!(
        client.read_file(".ferry/host-b").await.unwrap(),
        b"from disk"
    );
    client.write_file(".ferry/empty", b"").await.unwrap();
    assert_eq!(client.read_file(".ferry/empty").await.unwrap(), b"");

    let attrs = client.getattr(".ferry/host-a").await.unwrap();
    assert_eq!(
        (attrs.kind, attrs.size, attrs.mode),
        (FileKind::File, 9, 0o644)
    );
    assert!(client.lookup_path(".ferry/host-a").await.is_ok());

    let err = client.read_file(".ferry").await.unwrap_err();
    assert!(matches!(err, NfsError::NotAFile { .. }), "{err}");
    let err = client.read_file(".ferry/missing").await.unwrap_err();
    assert!(err.is_not_found(), "{err}");

    assert!(client.remove_file(".ferry/host-a").await.unwrap());
    assert!(!client.remove_file(".ferry/host-a").await.unwrap());
    assert!(!server.export().join(".ferry/host-a").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_export_path_is_reported_in_words() {
    let server = nfs_support::server();
    let mut config = server.config();
    config.export = "/not-exported".into();
    let err = NfsClient::new(config).fsstat().await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, NfsError::Connect { .. }), "{text}");
    assert!(
        text.contains("127.0.0.1")
            && text.contains("/not-exported")
            && text.contains("check the export path"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_fail_within_the_deadline_and_recover_when_the_server_returns() {
    let server = nfs_support::server();
    let timeout = Duration::from_secs(1);
    let margin = Duration::from_millis(500);
    let mut config = server.config();
    config.timeout = timeout;
    config.connections = 2;
    let client = NfsClient::new(config);
    client.ensure_dir("before", 0, 0, 0o755).await.unwrap();
    // Two idle connections in the pool, so the failures below hit pooled ones as well as new ones.
    let (a, b) = tokio::join!(client.fsstat(), client.getattr("before"));
    a.unwrap();
    b.unwrap();

    // A frozen server accepts connections (the kernel does that) but never answers.
    server.freeze();
    for round in 0..3 {
        let started = Instant::now();
        let err = client.fsstat().await.unwrap_err();
        let took = started.elapsed();
        eprintln!("frozen server, call {round}: failed after {took:?}: {err}");
        assert!(matches!(err, NfsError::Timeout { .. }), "{err}");
        assert!(err.is_unreachable());
        if round == 0 {
            assert!(took >= timeout && took < timeout + margin, "took {took:?}");
        } else {
            // Once a call has timed out, the next ones only probe (a quarter of the deadline here).
            assert!(took < timeout, "took {took:?}");
        }
        let text = err.to_string();
        assert!(
            text.contains("nfs server 127.0.0.1") && text.contains("/export"),
            "{text}"
        );
    }
    // A fresh client against the frozen server: connecting and mounting are under the deadline too.
    let started = Instant::now();
    let err = NfsClient::new(NfsClientConfig {
        timeout,
        ..server.config()
    })
    .ensure_dir("x", 0, 0, 0o755)
    .await
    .unwrap_err();
    assert!(matches!(err, NfsError::Timeout { .. }), "{err}");
    assert!(
        started.elapsed() < timeout + margin,
        "took {:?}",
        started.elapsed()
    );

    server.thaw();
    let started = Instant::now();
    client.ensure_dir("thawed", 0, 0, 0o755).await.unwrap();
    eprintln!("after SIGCONT: first call took {:?}", started.elapsed());
    assert!(server.export().join("thawed").is_dir());

    // A stopped server refuses connections: that fails at once, naming the server.
    assert!(server.run_script("stop"));
    let started = Instant::now();
    let err = client.getattr("thawed").await.unwrap_err();
    let took = started.elapsed();
    eprintln!("stopped server: failed after {took:?}: {err}");
    assert!(matches!(err, NfsError::Connect { .. }), "{err}");
    assert!(err.to_string().contains("connection refused"), "{err}");
    assert!(err.to_string().contains("nfs server 127.0.0.1"), "{err}");
    assert!(took < timeout + margin, "took {took:?}");

    // Restarted on the same ports: the next call reconnects by itself. The start is retried: ganesha
    // exits with "Cannot register NFS V3 on TCP" when another test's server registers with rpcbind at
    // the same moment.
    let mut restarted = false;
    for _ in 0..5 {
        restarted = server.run_script("start");
        if restarted {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(restarted, "restart failed five times");
    let started = Instant::now();
    let attrs = client.getattr("thawed").await.unwrap();
    eprintln!("restarted server: first call took {:?}", started.elapsed());
    assert_eq!(attrs.kind, FileKind::Directory);
    client.remove_tree("thawed").await.unwrap();
    assert!(!server.export().join("thawed").exists());
}

//! `HandleOps` (the NFSv3 data procedures on file handles) against a real NFS-Ganesha, one server per
//! test, checked through the export directory on disk.

use crate::nfs_support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry::nfs::{
    CreateHow, FileHandle, FileKind, HandleOps, NfsClient, NfsError, SetAttrs, SetTime, Stability,
};
use nfs3_client::nfs3_types::nfs3::nfsstat3;
use nfs_support::pattern;

const MIB: usize = 1 << 20;

fn ops(server: &nfs_support::Server, connections: usize) -> HandleOps {
    let mut config = server.config();
    config.connections = connections;
    NfsClient::new(config).handle_ops()
}

fn owner(mode: u32, uid: u32, gid: u32) -> SetAttrs {
    SetAttrs::owner_and_mode(mode, uid, gid)
}

/// Writes `total` bytes of `pattern(.., seed)` in `chunk`-byte WRITEs with `in_flight` calls at once;
/// returns the time it took, commit included for UNSTABLE writes.
async fn write_file(
    ops: &HandleOps,
    fh: &FileHandle,
    total: usize,
    chunk: usize,
    in_flight: usize,
    stable: Stability,
    seed: u64,
) -> Duration {
    let data = Arc::new(pattern(0, total, seed));
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..in_flight {
        let (ops, fh, data, next) = (ops.clone(), fh.clone(), data.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut offset = i * chunk;
                if offset >= data.len() {
                    return;
                }
                let end = (offset + chunk).min(data.len());
                // The server may take less than it is given: write the rest.
                while offset < end {
                    let w = ops
                        .write(&fh, offset as u64, &data[offset..end], stable)
                        .await
                        .unwrap();
                    assert!(w.count > 0);
                    offset += w.count as usize;
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    if stable == Stability::Unstable {
        ops.commit(fh).await.unwrap();
    }
    started.elapsed()
}

/// Reads `total` bytes in `chunk`-byte READs with `in_flight` calls at once and checks them against
/// `pattern(.., seed)`; returns the time the reads took.
async fn read_and_verify(
    ops: &HandleOps,
    fh: &FileHandle,
    total: usize,
    chunk: usize,
    in_flight: usize,
    seed: u64,
) -> Duration {
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..in_flight {
        let (ops, fh, next) = (ops.clone(), fh.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let offset = i * chunk;
                if offset >= total {
                    return got;
                }
                let (data, eof) = ops.read(&fh, offset as u64, chunk as u32).await.unwrap();
                assert_eq!(data.len(), chunk.min(total - offset), "at {offset}");
                assert_eq!(eof, offset + chunk >= total, "at {offset}");
                got.push((offset, data));
            }
        }));
    }
    let mut chunks = Vec::new();
    for w in workers {
        chunks.extend(w.await.unwrap());
    }
    let took = started.elapsed();
    for (offset, data) in chunks {
        assert!(
            data[..] == pattern(offset as u64, data.len(), seed)[..],
            "wrong bytes in the chunk at {offset}"
        );
    }
    took
}

fn mib_per_s(bytes: usize, took: Duration) -> f64 {
    bytes as f64 / MIB as f64 / took.as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsinfo_allows_one_mib_transfers() {
    let server = nfs_support::server();
    let ops = ops(&server, 2);
    let info = ops.fsinfo().await.unwrap();
    eprintln!("fsinfo: {info:?}");
    assert!(
        info.rtmax >= MIB as u32 && info.wtmax >= MIB as u32,
        "{info:?}"
    );
    assert!(info.rtpref > 0 && info.wtpref > 0 && info.maxfilesize > 0);
    assert!(info.supports_hard_links && info.supports_symlinks);

    // One READ and one WRITE of exactly 1 MiB each.
    let root = ops.root().await.unwrap();
    let (fh, _) = ops
        .create(&root, b"one", CreateHow::Guarded, &owner(0o644, 0, 0))
        .await
        .unwrap();
    let data = pattern(0, MIB, 1);
    let w = ops.write(&fh, 0, &data, Stability::FileSync).await.unwrap();
    assert_eq!(w.count as usize, MIB);
    assert_eq!(w.committed, Stability::FileSync);
    let (back, eof) = ops.read(&fh, 0, MIB as u32).await.unwrap();
    assert!(eof);
    assert!(back[..] == data[..]);
    // Past the end: nothing, and the end.
    let (none, eof) = ops.read(&fh, 2 * MIB as u64, 4096).await.unwrap();
    assert!(none.is_empty() && eof);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_mib_round_trip_with_one_and_eight_calls_in_flight() {
    let server = nfs_support::server();
    let total = 64 * MIB;
    for (in_flight, stable, seed) in [
        (1, Stability::Unstable, 11),
        (8, Stability::Unstable, 12),
        (8, Stability::FileSync, 13),
    ] {
        let ops = ops(&server, in_flight);
        let root = ops.root().await.unwrap();
        let name = format!("big-{in_flight}-{stable:?}");
        let (fh, _) = ops
            .create(
                &root,
                name.as_bytes(),
                CreateHow::Guarded,
                &owner(0o644, 0, 0),
            )
            .await
            .unwrap();
        let wrote = write_file(&ops, &fh, total, MIB, in_flight, stable, seed).await;
        assert_eq!(ops.getattr(&fh).await.unwrap().size, total as u64);
        // On disk, byte for byte.
        let on_disk = std::fs::read(server.export().join(&name)).unwrap();
        assert!(on_disk == pattern(0, total, seed), "{name} differs on disk");
        drop(on_disk);
        let read = read_and_verify(&ops, &fh, total, MIB, in_flight, seed).await;
        eprintln!(
            "64 MiB, 1 MiB calls, {in_flight} in flight, {stable:?}: write {:.0} MiB/s ({wrote:.2?}), read {:.0} MiB/s ({read:.2?})",
            mib_per_s(total, wrote),
            mib_per_s(total, read)
        );
        ops.remove(&root, name.as_bytes()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_lookup_getattr_and_setattr() {
    let server = nfs_support::server();
    let ops = ops(&server, 4);
    let root = ops.root().await.unwrap();
    let (fh, attr) = ops
        .create(&root, b"f", CreateHow::Guarded, &owner(0o640, 1234, 2345))
        .await
        .unwrap();
    assert_eq!(attr.kind, FileKind::File);
    assert_eq!((attr.mode, attr.uid, attr.gid), (0o640, 1234, 2345));
    assert_eq!((attr.size, attr.nlink), (0, 1));
    let meta = std::fs::metadata(server.export().join("f")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1234, 2345));
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    assert_eq!(attr.fileid, meta.ino());

    // Setuid survives the owner being set at creation.
    let (_, suid) = ops
        .create(
            &root,
            b"suid",
            CreateHow::Guarded,
            &owner(0o4755, 1000, 1000),
        )
        .await
        .unwrap();
    assert_eq!((suid.mode, suid.uid, suid.gid), (0o4755, 1000, 1000));
    let (_, suid) = ops
        .create(
            &root,
            b"suid-x",
            CreateHow::Exclusive(*b"verifier"),
            &owner(0o2755, 1000, 1000),
        )
        .await
        .unwrap();
    assert_eq!((suid.mode, suid.uid, suid.gid), (0o2755, 1000, 1000));

    // GUARDED refuses an existing name; UNCHECKED opens it.
    let err = ops
        .create(&root, b"f", CreateHow::Guarded, &owner(0o600, 0, 0))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(nfsstat3::NFS3ERR_EXIST), "{err}");
    assert_eq!(err.errno(), libc::EEXIST);
    let (again, _) = ops
        .create(&root, b"f", CreateHow::Unchecked, &SetAttrs::default())
        .await
        .unwrap();
    assert_eq!(again, fh);

    let (found, found_attr) = ops.lookup(&root, b"f").await.unwrap();
    assert_eq!(found, fh);
    assert_eq!(found_attr.fileid, attr.fileid);
    let err = ops.lookup(&root, b"missing").await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert_eq!(err.errno(), libc::ENOENT);
    let err = ops.lookup(&fh, b"x").await.unwrap_err();
    assert_eq!(err.errno(), libc::ENOTDIR, "{err}");
    let err = ops.lookup(&root, &[b'n'; 300]).await.unwrap_err();
    assert_eq!(err.errno(), libc::ENAMETOOLONG, "{err}");
    for bad in [&b""[..], b"a/b", b"a\0b"] {
        let err = ops.lookup(&root, bad).await.unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL, "{bad:?}: {err}");
    }

    // Write, then truncate down and extend with zeros.
    ops.write(&fh, 0, b"hello world", Stability::FileSync)
        .await
        .unwrap();
    let attr = ops
        .setattr(
            &fh,
            &SetAttrs {
                size: Some(5),
                ..SetAttrs::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(attr.size, 5);
    assert_eq!(std::fs::read(server.export().join("f")).unwrap(), b"hello");
    let attr = ops
        .setattr(
            &fh,
            &SetAttrs {
                size: Some(8),
                ..SetAttrs::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(attr.size, 8);
    let (data, eof) = ops.read(&fh, 0, 100).await.unwrap();
    assert_eq!((&data[..], eof), (&b"hello\0\0\0"[..], true));

    // Owner, both kinds of time, and mode (separately: a change of owner clears setuid on the server,
    // as chown(2) does, even when the same SETATTR sets it).
    let when = UNIX_EPOCH + Duration::new(1_600_000_000, 123_000_000);
    ops.setattr(
        &fh,
        &SetAttrs {
            uid: Some(7),
            gid: Some(8),
            atime: SetTime::ClientTime(when),
            mtime: SetTime::ClientTime(when),
            ..SetAttrs::default()
        },
    )
    .await
    .unwrap();
    let attr = ops
        .setattr(
            &fh,
            &SetAttrs {
                mode: Some(0o4711),
                ..SetAttrs::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((attr.mode, attr.uid, attr.gid), (0o4711, 7, 8));
    assert_eq!((attr.atime, attr.mtime), (when, when));
    let meta = std::fs::metadata(server.export().join("f")).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mtime()),
        (7, 8, 1_600_000_000)
    );
    let before = SystemTime::now() - Duration::from_secs(2);
    let attr = ops
        .setattr(
            &fh,
            &SetAttrs {
                mtime: SetTime::ServerTime,
                ..SetAttrs::default()
            },
        )
        .await
        .unwrap();
    assert!(attr.mtime > before, "{:?}", attr.mtime);
    assert_eq!(attr.atime, when);
    assert!(attr.ctime > before);
    let stat = ops.fsstat(&fh).await.unwrap();
    assert!(stat.total_bytes > 0 && stat.free_bytes <= stat.total_bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directories_symlinks_removal_and_their_errors() {
    let server = nfs_support::server();
    let ops = ops(&server, 4);
    let root = ops.root().await.unwrap();
    let (dir, attr) = ops
        .mkdir(&root, b"d", &owner(0o2750, 100, 200))
        .await
        .unwrap();
    assert_eq!(attr.kind, FileKind::Directory);
    assert_eq!((attr.mode, attr.uid, attr.gid), (0o2750, 100, 200));
    let meta = std::fs::metadata(server.export().join("d")).unwrap();
    assert!(meta.is_dir());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o2750);
    let err = ops
        .mkdir(&root, b"d", &owner(0o755, 0, 0))
        .await
        .unwrap_err();
    assert_eq!(err.errno(), libc::EEXIST, "{err}");

    let (link, attr) = ops
        .symlink(&dir, b"l", b"../target/x", &owner(0o777, 300, 400))
        .await
        .unwrap();
    assert_eq!(attr.kind, FileKind::Symlink);
    // `d` has the setgid bit: a new object in it takes its group (200), as on a local filesystem.
    assert_eq!((attr.uid, attr.gid), (300, 200));
    assert_eq!(ops.readlink(&link).await.unwrap(), b"../target/x");
    assert_eq!(
        std::fs::read_link(server.export().join("d/l")).unwrap(),
        std::path::Path::new("../target/x")
    );
    let meta = std::fs::symlink_metadata(server.export().join("d/l")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (300, 200));
    let err = ops.readlink(&dir).await.unwrap_err();
    assert_eq!(err.errno(), libc::EINVAL, "{err}");

    let err = ops.rmdir(&root, b"d").await.unwrap_err();
    assert_eq!(err.errno(), libc::ENOTEMPTY, "{err}");
    let err = ops.rmdir(&dir, b"l").await.unwrap_err();
    assert_eq!(err.errno(), libc::ENOTDIR, "{err}");
    let err = ops.remove(&root, b"d").await.unwrap_err();
    eprintln!("REMOVE of a directory: {err}");
    assert!(
        [libc::EISDIR, libc::EPERM, libc::EACCES, libc::ENOTEMPTY].contains(&err.errno()),
        "{err}"
    );
    ops.remove(&dir, b"l").await.unwrap();
    let err = ops.remove(&dir, b"l").await.unwrap_err();
    assert_eq!(err.errno(), libc::ENOENT, "{err}");
    ops.rmdir(&root, b"d").await.unwrap();
    assert!(!server.export().join("d").exists());

    // A handle whose object is gone is stale.
    let err = ops.getattr(&dir).await.unwrap_err();
    assert_eq!(err.status(), Some(nfsstat3::NFS3ERR_STALE), "{err}");
    assert_eq!(err.errno(), libc::ESTALE);
    assert!(err.to_string().contains("stale file handle"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_replaces_an_existing_file_and_links_count() {
    let server = nfs_support::server();
    let ops = ops(&server, 4);
    let root = ops.root().await.unwrap();
    let (sub, _) = ops.mkdir(&root, b"sub", &owner(0o755, 0, 0)).await.unwrap();
    let (a, _) = ops
        .create(&root, b"a", CreateHow::Guarded, &owner(0o644, 0, 0))
        .await
        .unwrap();
    ops.write(&a, 0, b"new", Stability::FileSync).await.unwrap();
    let (b, _) = ops
        .create(&sub, b"b", CreateHow::Guarded, &owner(0o644, 0, 0))
        .await
        .unwrap();
    ops.write(&b, 0, b"old content", Stability::FileSync)
        .await
        .unwrap();

    // Over an existing file, across directories: the target now is the renamed file.
    ops.rename(&root, b"a", &sub, b"b").await.unwrap();
    assert!(!server.export().join("a").exists());
    assert_eq!(
        std::fs::read(server.export().join("sub/b")).unwrap(),
        b"new"
    );
    let (now_b, _) = ops.lookup(&sub, b"b").await.unwrap();
    assert_eq!(now_b, a, "the handle follows the file, not the name");
    assert!(ops.lookup(&root, b"a").await.unwrap_err().is_not_found());
    let err = ops.rename(&root, b"a", &sub, b"c").await.unwrap_err();
    assert_eq!(err.errno(), libc::ENOENT, "{err}");
    // A directory over a non-empty directory is refused.
    let (d2, _) = ops.mkdir(&root, b"d2", &owner(0o755, 0, 0)).await.unwrap();
    let err = ops.rename(&root, b"d2", &root, b"sub").await.unwrap_err();
    assert!(
        [libc::ENOTEMPTY, libc::EEXIST].contains(&err.errno()),
        "{err}"
    );
    // A file over a directory is refused.
    let err = ops.rename(&sub, b"b", &root, b"d2").await.unwrap_err();
    assert_eq!(err.errno(), libc::EISDIR, "{err}");

    // Hard links share the object and count.
    let attr = ops.link(&a, &d2, b"hard").await.unwrap();
    assert_eq!(attr.nlink, 2);
    let (linked, linked_attr) = ops.lookup(&d2, b"hard").await.unwrap();
    assert_eq!(linked_attr.fileid, attr.fileid);
    assert_eq!(linked, a);
    assert_eq!(
        std::fs::metadata(server.export().join("d2/hard"))
            .unwrap()
            .nlink(),
        2
    );
    let err = ops.link(&a, &d2, b"hard").await.unwrap_err();
    assert_eq!(err.errno(), libc::EEXIST, "{err}");
    ops.remove(&sub, b"b").await.unwrap();
    assert_eq!(ops.getattr(&a).await.unwrap().nlink, 1);
    let (data, _) = ops.read(&linked, 0, 10).await.unwrap();
    assert_eq!(&data[..], b"new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readdirplus_pages_through_three_thousand_entries() {
    let server = nfs_support::server();
    let ops = ops(&server, 4);
    let many = server.export().join("many");
    std::fs::create_dir(&many).unwrap();
    for i in 0..3000 {
        std::fs::write(many.join(format!("entry-{i:05}")), i.to_string()).unwrap();
    }
    std::fs::create_dir(many.join("subdir")).unwrap();
    let root = ops.root().await.unwrap();
    let (dir, _) = ops.lookup(&root, b"many").await.unwrap();

    for max in [7, 100, 1000] {
        let started = Instant::now();
        let (mut cookie, mut verf, mut pages) = (0, [0; 8], 0);
        let mut seen = std::collections::BTreeMap::new();
        loop {
            let page = ops.readdirplus(&dir, cookie, verf, max).await.unwrap();
            pages += 1;
            assert!(page.entries.len() <= max as usize);
            assert!(page.eof || !page.entries.is_empty());
            for e in &page.entries {
                assert_ne!(e.cookie, 0);
                assert!(e.name != b"." && e.name != b"..");
                assert!(
                    seen.insert(e.name.clone(), (e.handle.clone(), e.attr.clone()))
                        .is_none(),
                    "{} listed twice",
                    String::from_utf8_lossy(&e.name)
                );
            }
            if page.eof {
                break;
            }
            cookie = page.entries.last().unwrap().cookie;
            verf = page.cookieverf;
        }
        eprintln!(
            "readdirplus of 3001 entries, at most {max} per page: {pages} pages in {:?}",
            started.elapsed()
        );
        assert_eq!(seen.len(), 3001, "max {max}");
        assert!(pages as u32 >= 3001 / max, "max {max}: {pages} pages");
        let (fh, attr) = &seen[&b"entry-01234"[..]];
        let meta = std::fs::metadata(many.join("entry-01234")).unwrap();
        assert_eq!(
            (attr.kind, attr.fileid, attr.size),
            (FileKind::File, meta.ino(), 4)
        );
        assert_eq!(&ops.read(fh, 0, 10).await.unwrap().0[..], b"1234");
        assert_eq!(seen[&b"subdir"[..]].1.kind, FileKind::Directory);
    }
    // An empty directory is one empty, final page.
    let (empty, _) = ops
        .mkdir(&root, b"empty", &owner(0o755, 0, 0))
        .await
        .unwrap();
    let page = ops.readdirplus(&empty, 0, [0; 8], 10).await.unwrap();
    assert!(page.entries.is_empty() && page.eof);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_of_sixteen_exclusive_creates_wins() {
    let server = nfs_support::server();
    let shared = ops(&server, 4);
    let root = shared.root().await.unwrap();
    let before = SystemTime::now() - Duration::from_secs(2);
    let mut tasks = Vec::new();
    for i in 0..16u8 {
        // Half on their own client (their own connections), half sharing one pool.
        let ops = if i % 2 == 0 {
            ops(&server, 1)
        } else {
            shared.clone()
        };
        let root = root.clone();
        tasks.push(tokio::spawn(async move {
            ops.create(
                &root,
                b"lock",
                CreateHow::Exclusive([i, 9, 9, 9, 9, 9, 9, 9]),
                &owner(0o600, 500, 600),
            )
            .await
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok((fh, attr)) => winners.push((fh, attr)),
            Err(e) => assert_eq!(e.errno(), libc::EEXIST, "{e}"),
        }
    }
    assert_eq!(winners.len(), 1);
    let (_, attr) = &winners[0];
    assert_eq!((attr.mode, attr.uid, attr.gid), (0o600, 500, 600));
    // The verifier the server kept in the times was replaced by the server's clock.
    assert!(attr.mtime > before && attr.atime > before, "{attr:?}");
    let meta = std::fs::metadata(server.export().join("lock")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (500, 600));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_fails_reads_within_the_deadline_and_recovers() {
    let server = nfs_support::server();
    let timeout = Duration::from_secs(1);
    let margin = Duration::from_millis(500);
    let mut config = server.config();
    config.timeout = timeout;
    config.connections = 4;
    let ops = NfsClient::new(config).handle_ops();
    let root = ops.root().await.unwrap();
    let (fh, _) = ops
        .create(&root, b"f", CreateHow::Guarded, &owner(0o644, 0, 0))
        .await
        .unwrap();
    ops.write(&fh, 0, b"still here", Stability::FileSync)
        .await
        .unwrap();

    server.freeze();
    // Several at once, as a FUSE mount issues them: each fails on its own deadline.
    let started = Instant::now();
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let (ops, fh) = (ops.clone(), fh.clone());
            tokio::spawn(async move { ops.read(&fh, 0, 100).await })
        })
        .collect();
    for call in calls {
        let err = call.await.unwrap().unwrap_err();
        assert!(err.is_timeout(), "{err}");
        assert_eq!(err.errno(), libc::EIO);
    }
    let took = started.elapsed();
    eprintln!("six reads on a frozen server failed after {took:?}");
    // Four connections, six calls: the two waiting for a connection fail on the same deadline.
    assert!(took >= timeout && took < timeout + margin, "took {took:?}");
    // Once calls have timed out, the next ones only probe, with a quarter of the deadline here.
    let started = Instant::now();
    let err = ops
        .write(&fh, 0, b"x", Stability::Unstable)
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(started.elapsed() < timeout / 2, "{:?}", started.elapsed());
    assert!(err.to_string().contains("did not answer write"), "{err}");

    server.thaw();
    let (data, _) = ops.read(&fh, 0, 100).await.unwrap();
    assert_eq!(&data[..], b"still here");

    // Stopped and restarted on the same ports: the next call reconnects by itself, and the handle
    // still works (ganesha's VFS handles survive a restart).
    assert!(server.run_script("stop"));
    let err = ops.read(&fh, 0, 100).await.unwrap_err();
    assert!(matches!(err, NfsError::Connect { .. }), "{err}");
    assert_eq!(err.errno(), libc::EIO);
    server.restart();
    let (data, _) = ops.read(&fh, 0, 100).await.unwrap();
    assert_eq!(&data[..], b"still here");
}

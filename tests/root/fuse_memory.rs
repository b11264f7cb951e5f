//! The FUSE adapter over `MemoryStore`, mounted for real and used only through std::fs and libc calls, as a
//! container would. Needs root and /dev/fuse; fails (does not skip) without them.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ferry::fuse::{mount, FileStore, MemoryStore, MountHandle, MountOptions};

const MIB: usize = 1 << 20;

/// A MemoryStore mounted on a temporary directory, unmounted on drop.
struct Mounted {
    rt: tokio::runtime::Runtime,
    handle: Option<MountHandle>,
    store: Arc<MemoryStore>,
    dir: tempfile::TempDir,
}

fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: these tests need the fuse kernel module (modprobe fuse) and root"
    );
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests mount FUSE filesystems and must run as root"
    );
}

impl Mounted {
    fn new(store: MemoryStore, opts: MountOptions) -> Mounted {
        require_fuse();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        let store = Arc::new(store);
        let dir = tempfile::tempdir().unwrap();
        let dyn_store: Arc<dyn FileStore> = store.clone();
        let handle = rt
            .block_on(mount(dyn_store, dir.path(), opts))
            .expect("mount");
        Mounted {
            rt,
            handle: Some(handle),
            store,
            dir,
        }
    }

    fn default() -> Mounted {
        Mounted::new(MemoryStore::new(), MountOptions::default())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(mut h) = self.handle.take() {
            if let Err(e) = self.rt.block_on(h.unmount()) {
                eprintln!("unmount failed: {e}; detaching");
                let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

/// The mountinfo lines for `path`: (source, fstype).
fn mounts_at(path: &Path) -> Vec<(String, String)> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|p| Path::new(p) == path))
        .filter_map(|l| l.split(" - ").nth(1))
        .map(|rest| {
            let mut f = rest.split(' ');
            let fstype = f.next().unwrap_or_default().to_string();
            let source = f.next().unwrap_or_default().to_string();
            (source, fstype)
        })
        .collect()
}

/// Fills `buf` with a pattern that depends on `seed` and on the absolute file offset, so misplaced, lost
/// or duplicated blocks all show up. `offset` must be a multiple of 8.
fn pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, word) in buf.chunks_mut(8).enumerate() {
        let mut x = seed ^ (offset / 8 + i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^= x >> 31;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 29;
        let bytes = x.to_le_bytes();
        word.copy_from_slice(&bytes[..word.len()]);
    }
}

fn write_pattern(path: &Path, seed: u64, len: usize) {
    let mut f = File::create(path).unwrap();
    let mut buf = vec![0u8; MIB];
    let mut off = 0;
    while off < len {
        let n = MIB.min(len - off);
        pattern(seed, off as u64, &mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        off += n;
    }
    f.sync_all().unwrap();
}

fn check_pattern(path: &Path, seed: u64, len: usize) {
    let mut f = File::open(path).unwrap();
    assert_eq!(f.metadata().unwrap().len(), len as u64);
    let mut got = vec![0u8; MIB];
    let mut want = vec![0u8; MIB];
    let mut off = 0;
    while off < len {
        let n = MIB.min(len - off);
        f.read_exact(&mut got[..n]).unwrap();
        pattern(seed, off as u64, &mut want[..n]);
        assert!(got[..n] == want[..n], "data differs in the MiB at {off}");
        off += n;
    }
    let mut rest = Vec::new();
    f.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "data past the end");
}

#[test]
fn a_64_mib_file_round_trips_and_reports_throughput() {
    let m = Mounted::default();
    let p = m.path("big");
    let len = 64 * MIB;
    let t = Instant::now();
    write_pattern(&p, 7, len);
    let write = t.elapsed();
    let t = Instant::now();
    check_pattern(&p, 7, len);
    let read = t.elapsed();
    let mibs = |d: Duration| 64.0 / d.as_secs_f64();
    let (largest_read, largest_write) = m.store.largest_io();
    println!(
        "64 MiB through FUSE over MemoryStore: write {:.0} MiB/s ({write:?}), read+verify {:.0} MiB/s ({read:?}); \
         largest store write {largest_write} B, largest store read {largest_read} B",
        mibs(write),
        mibs(read)
    );
    // One 1 MiB write(2) must reach the store as one 1 MiB write: max_write is negotiated.
    assert_eq!(largest_write, MIB as u64);
}

#[test]
fn a_single_1_mib_write_is_taken_whole_and_pwrite_reads_back() {
    let m = Mounted::default();
    let p = m.path("one");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .read(true)
        .open(&p)
        .unwrap();
    let mut buf = vec![0u8; MIB];
    pattern(3, 0, &mut buf);
    // SAFETY: the fd is open for the whole call and buf is valid for buf.len() bytes.
    let n = unsafe {
        libc::pwrite(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            buf.as_ptr().cast(),
            buf.len(),
            0,
        )
    };
    assert_eq!(n, MIB as isize, "one write(2) of 1 MiB");
    let mut back = vec![0u8; MIB];
    f.read_exact_at(&mut back, 0).unwrap();
    assert!(back == buf);
}

#[test]
fn append_truncate_and_sparse_extension() {
    let m = Mounted::default();
    let p = m.path("log");
    fs::write(&p, b"hello").unwrap();
    let mut f = OpenOptions::new().append(true).open(&p).unwrap();
    f.write_all(b" world").unwrap();
    drop(f);
    assert_eq!(fs::read(&p).unwrap(), b"hello world");

    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(5).unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"hello");
    // Extending shows zeros, not the old bytes.
    f.set_len(11).unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"hello\0\0\0\0\0\0");
    drop(f);

    // A write far past the end leaves a hole that reads as zeros and costs no space.
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(b"tail", 100 * MIB as u64).unwrap();
    drop(f);
    let meta = fs::metadata(&p).unwrap();
    assert_eq!(meta.len(), 100 * MIB as u64 + 4);
    assert!(
        meta.blocks() * 512 < MIB as u64,
        "sparse: {} blocks",
        meta.blocks()
    );
    let mut f = File::open(&p).unwrap();
    let mut mid = [1u8; 4096];
    f.seek(SeekFrom::Start(50 * MIB as u64)).unwrap();
    f.read_exact(&mut mid).unwrap();
    assert_eq!(mid, [0u8; 4096]);

    // O_TRUNC on open empties the file.
    fs::write(&p, b"new").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"new");
}

#[test]
fn chmod_chown_and_times() {
    let m = Mounted::default();
    let p = m.path("f");
    fs::write(&p, b"x").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o640);
    std::os::unix::fs::chown(&p, Some(1234), Some(5678)).unwrap();
    let meta = fs::metadata(&p).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1234, 5678));

    let when = SystemTime::UNIX_EPOCH + Duration::new(1_600_000_000, 123_456_789);
    let f = File::options().write(true).open(&p).unwrap();
    f.set_times(
        fs::FileTimes::new()
            .set_accessed(when)
            .set_modified(when + Duration::from_secs(60)),
    )
    .unwrap();
    drop(f);
    let meta = fs::metadata(&p).unwrap();
    assert_eq!(meta.accessed().unwrap(), when);
    assert_eq!(meta.modified().unwrap(), when + Duration::from_secs(60));
}

#[test]
fn directories_and_enotempty() {
    let m = Mounted::default();
    let d = m.path("d");
    fs::create_dir(&d).unwrap();
    fs::create_dir(d.join("sub")).unwrap();
    fs::write(d.join("sub/f"), b"x").unwrap();
    assert_eq!(fs::metadata(&d).unwrap().nlink(), 3);
    let e = fs::remove_dir(d.join("sub")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTEMPTY));
    let e = fs::create_dir(&d).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    fs::remove_file(d.join("sub/f")).unwrap();
    fs::remove_dir(d.join("sub")).unwrap();
    fs::remove_dir(&d).unwrap();
    assert!(!d.exists());
    let e = fs::remove_file(m.path("nothing")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
}

#[test]
fn renames_of_files_directories_and_over_an_existing_file() {
    let m = Mounted::default();
    fs::write(m.path("a"), b"A").unwrap();
    fs::write(m.path("b"), b"B").unwrap();
    fs::rename(m.path("a"), m.path("a2")).unwrap();
    assert!(!m.path("a").exists());
    assert_eq!(fs::read(m.path("a2")).unwrap(), b"A");
    // Over an existing file: the target is replaced.
    fs::rename(m.path("a2"), m.path("b")).unwrap();
    assert_eq!(fs::read(m.path("b")).unwrap(), b"A");
    assert!(!m.path("a2").exists());
    // Directories, with their contents, into another directory.
    fs::create_dir_all(m.path("x/inner")).unwrap();
    fs::write(m.path("x/inner/f"), b"deep").unwrap();
    fs::create_dir(m.path("y")).unwrap();
    fs::rename(m.path("x"), m.path("y/x")).unwrap();
    assert_eq!(fs::read(m.path("y/x/inner/f")).unwrap(), b"deep");
    // Into itself: refused.
    let e = fs::rename(m.path("y"), m.path("y/x/y")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    // A file over a directory: refused.
    let e = fs::rename(m.path("b"), m.path("y")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EISDIR));
}

#[test]
fn symlinks_and_hard_links() {
    let m = Mounted::default();
    fs::write(m.path("target"), b"data").unwrap();
    std::os::unix::fs::symlink("target", m.path("sym")).unwrap();
    assert_eq!(fs::read_link(m.path("sym")).unwrap(), Path::new("target"));
    assert!(fs::symlink_metadata(m.path("sym"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read(m.path("sym")).unwrap(), b"data");

    fs::hard_link(m.path("target"), m.path("hard")).unwrap();
    let a = fs::metadata(m.path("target")).unwrap();
    let b = fs::metadata(m.path("hard")).unwrap();
    assert_eq!(a.nlink(), 2);
    assert_eq!(a.ino(), b.ino());
    fs::write(m.path("hard"), b"changed").unwrap();
    assert_eq!(fs::read(m.path("target")).unwrap(), b"changed");
    fs::remove_file(m.path("target")).unwrap();
    assert_eq!(fs::metadata(m.path("hard")).unwrap().nlink(), 1);
    assert_eq!(fs::read(m.path("hard")).unwrap(), b"changed");
}

#[test]
fn an_unlinked_open_file_stays_readable_until_closed() {
    let m = Mounted::default();
    let p = m.path("open");
    fs::write(&p, b"still here").unwrap();
    let mut f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    fs::remove_file(&p).unwrap();
    assert!(!p.exists());
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "still here");
    f.write_all(b" and more").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    s.clear();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "still here and more");
    drop(f);
    // The hidden name that kept it alive is gone after the last close (release is asynchronous).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<_> = fs::read_dir(m.root())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left behind: {left:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_file_open_when_renamed_over_keeps_its_data_until_closed() {
    // A long TTL keeps the kernel from looking names up again while the store is stalled below.
    let m = Mounted::new(
        MemoryStore::with_timeout(Duration::from_secs(1)),
        MountOptions {
            attr_ttl: Duration::from_secs(30),
            ..MountOptions::default()
        },
    );
    fs::write(m.path("victim"), b"old").unwrap();
    fs::write(m.path("new"), b"new").unwrap();
    let f = File::open(m.path("victim")).unwrap();
    fs::rename(m.path("new"), m.path("victim")).unwrap();
    assert_eq!(fs::read(m.path("victim")).unwrap(), b"new");
    let mut buf = [0u8; 3];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"old");

    // A rename over an open file that the store then refuses leaves the file under its name.
    fs::create_dir(m.path("a")).unwrap();
    fs::write(m.path("a/src"), b"src").unwrap();
    let g = File::open(m.path("victim")).unwrap();
    let dir_id = fs::metadata(m.path("a")).unwrap().ino();
    m.store.stall(dir_id);
    let e = fs::rename(m.path("a/src"), m.path("victim")).unwrap_err();
    m.store.resume(dir_id);
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert_eq!(fs::read(m.path("victim")).unwrap(), b"new");
    drop((f, g));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut left: Vec<_> = fs::read_dir(m.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        if left == ["a", "victim"] {
            break;
        }
        assert!(Instant::now() < deadline, "left behind: {left:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_directory_of_5000_entries_lists_every_name_once() {
    let m = Mounted::default();
    let d = m.path("many");
    fs::create_dir(&d).unwrap();
    let want: HashSet<String> = (0..5000)
        .map(|i| format!("entry-{i:05}-with-a-longer-name"))
        .collect();
    for name in &want {
        File::create(d.join(name)).unwrap();
    }
    let got: Vec<String> = fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let unique: HashSet<String> = got.iter().cloned().collect();
    assert_eq!(got.len(), unique.len(), "duplicate names in the listing");
    assert_eq!(unique, want);
    // Metadata from the listing (readdirplus) agrees with a fresh stat.
    let e = fs::read_dir(&d).unwrap().next().unwrap().unwrap();
    assert_eq!(
        e.metadata().unwrap().ino(),
        fs::metadata(e.path()).unwrap().ino()
    );
}

#[test]
fn statfs_reports_the_store_capacity_and_fsync_works() {
    let store = MemoryStore::new();
    store.set_capacity(1 << 30);
    let m = Mounted::new(store, MountOptions::default());
    let before = nix::sys::statvfs::statvfs(m.root()).unwrap();
    assert_eq!(before.blocks() * before.fragment_size(), 1 << 30);
    let mut f = File::create(m.path("f")).unwrap();
    f.write_all(&vec![1u8; 4 * MIB]).unwrap();
    f.sync_all().unwrap();
    f.sync_data().unwrap();
    drop(f);
    let after = nix::sys::statvfs::statvfs(m.root()).unwrap();
    assert_eq!(
        (before.blocks_available() - after.blocks_available()) * after.fragment_size(),
        4 * MIB as u64
    );
}

#[test]
fn eight_concurrent_writers_each_get_their_own_data() {
    let m = Mounted::default();
    let len = 8 * MIB;
    std::thread::scope(|s| {
        for i in 0..8u64 {
            let p = m.path(&format!("w{i}"));
            s.spawn(move || write_pattern(&p, 100 + i, len));
        }
    });
    std::thread::scope(|s| {
        for i in 0..8u64 {
            let p = m.path(&format!("w{i}"));
            s.spawn(move || check_pattern(&p, 100 + i, len));
        }
    });
}

#[test]
fn created_objects_belong_to_the_caller_and_the_kernel_checks_modes() {
    let m = Mounted::new(
        MemoryStore::new(),
        MountOptions {
            allow_other: true,
            ..MountOptions::default()
        },
    );
    let shared = m.path("shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
    fs::write(m.path("secret"), b"root only").unwrap();
    fs::set_permissions(m.path("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    let (file_owner, dir_owner, secret) = std::thread::scope(|s| {
        s.spawn(|| {
            // setfsuid and setfsgid change only this thread's filesystem identity (and drop its file
            // capabilities), which is what FUSE reports as the caller.
            // SAFETY: plain syscalls with integer arguments.
            unsafe {
                libc::setfsgid(2000);
                libc::setfsuid(1000);
            }
            fs::write(shared.join("mine"), b"x").unwrap();
            fs::create_dir(shared.join("mydir")).unwrap();
            let secret = fs::read(m.path("secret")).map_err(|e| e.raw_os_error());
            let f = fs::metadata(shared.join("mine")).unwrap();
            let d = fs::metadata(shared.join("mydir")).unwrap();
            ((f.uid(), f.gid()), (d.uid(), d.gid()), secret)
        })
        .join()
        .unwrap()
    });
    assert_eq!(file_owner, (1000, 2000));
    assert_eq!(dir_owner, (1000, 2000));
    assert_eq!(secret, Err(Some(libc::EACCES)));
}

#[test]
fn an_unreachable_object_fails_with_eio_without_blocking_other_requests() {
    // attr_ttl 0: every stat asks the store, so the stat below really goes through the adapter.
    let m = Mounted::new(
        MemoryStore::with_timeout(Duration::from_secs(2)),
        MountOptions {
            attr_ttl: Duration::ZERO,
            ..MountOptions::default()
        },
    );
    fs::write(m.path("slow"), b"payload").unwrap();
    fs::write(m.path("other"), b"fine").unwrap();
    let fileid = fs::metadata(m.path("slow")).unwrap().ino();
    let f = File::open(m.path("slow")).unwrap();
    m.store.stall(fileid);

    let reader_done = AtomicBool::new(false);
    let (read_result, read_took, other_took) = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let t = Instant::now();
            let mut buf = [0u8; 7];
            let r = f.read_at(&mut buf, 0);
            reader_done.store(true, Ordering::SeqCst);
            (r, t.elapsed())
        });
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        let meta = fs::metadata(m.path("other")).unwrap();
        assert_eq!(fs::read(m.path("other")).unwrap(), b"fine");
        let other_took = t.elapsed();
        assert!(
            !reader_done.load(Ordering::SeqCst),
            "the stalled read should still be waiting"
        );
        assert_eq!(meta.len(), 4);
        let (r, took) = reader.join().unwrap();
        (r, took, other_took)
    });
    let e = read_result.expect_err("a read of a stalled object must fail");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(
        read_took >= Duration::from_millis(1500) && read_took < Duration::from_secs(10),
        "failed after {read_took:?}"
    );
    assert!(
        other_took < Duration::from_secs(1),
        "other path took {other_took:?}"
    );
    println!("stalled read failed after {read_took:?}; other path answered in {other_took:?}");

    // The server comes back: the same open file works again.
    m.store.resume(fileid);
    let mut buf = [0u8; 7];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"payload");

    // The whole store down: everything fails with EIO, then recovers.
    m.store.set_unreachable(true);
    let e = fs::metadata(m.path("other")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    m.store.set_unreachable(false);
    assert_eq!(fs::read(m.path("other")).unwrap(), b"fine");
}

#[test]
fn the_mount_table_names_the_volume_and_unmount_removes_it() {
    let mut m = Mounted::new(
        MemoryStore::new(),
        MountOptions {
            fsname: "ferry-nfs:vol1".into(),
            subtype: "ferry".into(),
            ..MountOptions::default()
        },
    );
    let path = m.root().to_path_buf();
    assert_eq!(
        mounts_at(&path),
        vec![("ferry-nfs:vol1".to_string(), "fuse.ferry".to_string())]
    );
    fs::write(path.join("f"), b"x").unwrap();
    let mut h = m.handle.take().unwrap();
    m.rt.block_on(h.unmount()).unwrap();
    assert!(mounts_at(&path).is_empty(), "still mounted");
}

#[test]
fn an_outside_umount_ends_the_session_cleanly() {
    let mut m = Mounted::default();
    let path = m.root().to_path_buf();
    fs::write(path.join("f"), b"x").unwrap();
    let mut h = m.handle.take().unwrap();
    nix::mount::umount2(&path, nix::mount::MntFlags::empty()).unwrap();
    let ended =
        m.rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), h.wait()).await });
    ended.expect("the session did not end").unwrap();
    assert!(mounts_at(&path).is_empty());
}

#[test]
fn unmount_of_a_busy_mount_fails_and_leaves_it_working() {
    let mut m = Mounted::default();
    let path = m.root().to_path_buf();
    fs::create_dir(path.join("d")).unwrap();
    // A process with its working directory inside makes the mount busy.
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .current_dir(path.join("d"))
        .spawn()
        .unwrap();
    let mut h = m.handle.take().unwrap();
    let e =
        m.rt.block_on(h.unmount())
            .expect_err("a busy mount must not unmount");
    assert!(e.to_string().contains("still uses it"), "{e}");
    fs::write(path.join("d/after"), b"ok").unwrap();
    assert_eq!(fs::read(path.join("d/after")).unwrap(), b"ok");
    child.kill().unwrap();
    child.wait().unwrap();
    m.rt.block_on(h.unmount()).unwrap();
    assert!(mounts_at(&path).is_empty());
}

#[test]
fn a_dropped_handle_unmounts_an_idle_mount() {
    let mut m = Mounted::default();
    let path = m.root().to_path_buf();
    fs::write(path.join("f"), b"x").unwrap();
    drop(m.handle.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !mounts_at(&path).is_empty() {
        assert!(
            Instant::now() < deadline,
            "a dropped handle left {path:?} mounted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A handle dropped while a process still uses its mount (an error path that returns without unmounting)
/// cannot unmount it, and must not leave it served by nobody, where every access would wait: it cuts the
/// connection, so every access fails at once with ENOTCONN, and the mount goes with the first `umount`
/// once the process left.
#[test]
fn a_dropped_handle_of_a_busy_mount_cuts_the_connection() {
    let mut m = Mounted::default();
    let path = m.root().to_path_buf();
    fs::create_dir(path.join("d")).unwrap();
    fs::write(path.join("d/f"), b"x").unwrap();
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .current_dir(path.join("d"))
        .spawn()
        .unwrap();
    drop(m.handle.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    let errno = loop {
        match fs::read(path.join("d/f")) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => break libc::ENOTCONN,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "the dropped mount still answers: {other:?}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    assert_eq!(errno, libc::ENOTCONN);
    assert_eq!(
        mounts_at(&path).len(),
        1,
        "a busy mount must stay in the table, cut off, not be detached lazily"
    );
    // A name the kernel has not cached needs the session: it fails at once too.
    let started = Instant::now();
    assert_eq!(
        fs::metadata(path.join("d/never-looked-up"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENOTCONN)
    );
    assert_eq!(
        fs::read_dir(path.join("d")).unwrap_err().raw_os_error(),
        Some(libc::ENOTCONN)
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a cut-off mount must not wait"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    nix::mount::umount2(&path, nix::mount::MntFlags::empty()).unwrap();
    assert!(mounts_at(&path).is_empty());
}

/// Closes `f` and returns what close(2) said, which `File`'s drop throws away.
fn close(f: File) -> nix::Result<()> {
    nix::unistd::close(std::os::fd::IntoRawFd::into_raw_fd(f))
}

/// Opens an existing file for writing without truncating it (no store call on open).
fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}

#[test]
fn a_failed_background_write_is_reported_by_fsync_and_by_close() {
    let store = MemoryStore::new();
    store.set_capacity(MIB as u64);
    // Every store call takes a while, so a write is acknowledged well before the store refuses it.
    store.set_delay(Duration::from_millis(100));
    let m = Mounted::new(store, MountOptions::default());
    let chunk = vec![1u8; MIB];

    // The first MiB fills the store; the second is acknowledged, and refused by the store only later.
    let mut f = File::create(m.path("fsynced")).unwrap();
    f.write_all(&chunk).unwrap();
    f.sync_all().unwrap();
    f.write_all(&chunk).unwrap();
    let e = f
        .sync_all()
        .expect_err("fsync must report the write that did not fit");
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    close(f).expect("reported once, by the fsync");
    drop(m);

    // The same without fsync: close(2) reports it. A store of its own, so the space is not still held by
    // the file above (its release reaches the adapter only after close(2) has returned).
    let store = MemoryStore::new();
    store.set_capacity(MIB as u64);
    store.set_delay(Duration::from_millis(100));
    let m = Mounted::new(store, MountOptions::default());
    let mut f = File::create(m.path("closed")).unwrap();
    f.write_all(&chunk).unwrap();
    f.sync_all().unwrap();
    f.write_all(&chunk).unwrap();
    assert_eq!(close(f), Err(nix::errno::Errno::ENOSPC));
    // What fitted is there.
    assert_eq!(fs::read(m.path("closed")).unwrap(), chunk);
}

#[test]
fn reads_and_stats_after_writes_see_them_while_the_store_is_slow() {
    let store = MemoryStore::new();
    // attr_ttl 0: stat asks the adapter every time, so it must not answer the size from before the writes.
    let m = Mounted::new(
        store,
        MountOptions {
            attr_ttl: Duration::ZERO,
            ..MountOptions::default()
        },
    );
    let p = m.path("slow");
    File::create(&p).unwrap();
    m.store.set_delay(Duration::from_millis(50));
    let mut f = open_rw(&p);
    let mut buf = vec![0u8; MIB];
    for i in 0..4u64 {
        pattern(9, i * MIB as u64, &mut buf);
        f.write_all(&buf).unwrap();
        // Each stat comes right after a write whose store call has not ended yet.
        assert_eq!(fs::metadata(&p).unwrap().len(), (i + 1) * MIB as u64);
    }
    // A new open drops the kernel's cached pages, so this read goes to the adapter.
    let mut back = vec![0u8; 4 * MIB];
    File::open(&p).unwrap().read_exact(&mut back).unwrap();
    let mut want = vec![0u8; 4 * MIB];
    pattern(9, 0, &mut want);
    assert!(back == want, "read after write differs");
    // Through the entries of a listing too.
    f.write_all(b"tail").unwrap();
    let listed: Vec<u64> = fs::read_dir(m.root())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .collect();
    assert_eq!(listed, vec![4 * MIB as u64 + 4]);
    close(f).unwrap();
}

#[test]
fn overlapping_writes_in_flight_end_in_the_last_written_data() {
    let m = Mounted::default();
    let p = m.path("overlap");
    File::create(&p).unwrap();
    m.store.set_delay(Duration::from_millis(20));
    let f = open_rw(&p);
    // Sixteen writes of 1 MiB, each shifted by 192 KiB and filled with its own byte: each overlaps the
    // ones before it, and all are in flight together.
    let mut model = Vec::new();
    for i in 0..16usize {
        let off = i * 192 * 1024;
        let data = vec![i as u8 + 1; MIB];
        f.write_all_at(&data, off as u64).unwrap();
        if model.len() < off + MIB {
            model.resize(off + MIB, 0);
        }
        model[off..off + MIB].copy_from_slice(&data);
    }
    // And the same range again and again, the last one winning.
    for i in 0..8u8 {
        f.write_all_at(&vec![100 + i; 4096], 0).unwrap();
    }
    model[..4096].fill(107);
    f.sync_all().unwrap();
    close(f).unwrap();
    m.store.set_delay(Duration::ZERO);
    let back = fs::read(&p).unwrap();
    assert_eq!(back.len(), model.len());
    let first_difference = back.iter().zip(&model).position(|(a, b)| a != b);
    assert_eq!(
        first_difference, None,
        "the data differs from the order written"
    );
}

#[test]
fn a_stalled_file_takes_writes_up_to_the_bound_then_fsync_fails_with_the_timeout() {
    let m = Mounted::new(
        MemoryStore::with_timeout(Duration::from_secs(2)),
        MountOptions::default(),
    );
    let p = m.path("stalled");
    File::create(&p).unwrap();
    fs::write(m.path("other"), b"fine").unwrap();
    let fileid = fs::metadata(&p).unwrap().ino();
    let mut f = open_rw(&p);
    m.store.stall(fileid);

    // Four MiB stay within the bound of writes in flight: acknowledged without waiting for the store.
    let t = Instant::now();
    for _ in 0..4 {
        f.write_all(&vec![2u8; MIB]).unwrap();
    }
    let wrote = t.elapsed();
    assert!(wrote < Duration::from_secs(1), "writes took {wrote:?}");
    // Another file answers meanwhile.
    assert_eq!(fs::read(m.path("other")).unwrap(), b"fine");

    let t = Instant::now();
    let e = f.sync_all().expect_err("fsync of a stalled file must fail");
    let took = t.elapsed();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_secs(10),
        "fsync failed after {took:?}"
    );
    println!("writes acknowledged in {wrote:?}; fsync failed after {took:?}");

    // The server answers again: the same open file works, and the mount unmounts cleanly (on drop).
    m.store.resume(fileid);
    f.write_all_at(b"again", 0).unwrap();
    f.sync_all().unwrap();
    close(f).unwrap();
    assert_eq!(&fs::read(&p).unwrap()[..5], b"again");
}

//! The FUSE adapter over `NfsStore` over a real NFS-Ganesha: a volume directory on the export, mounted
//! with FUSE and used only through std::fs and libc calls, as a container would, and checked in the
//! export directory on disk. Needs root, /dev/fuse and ganesha.

use crate::nfs_support;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::fuse::{mount, FileStore, MountHandle, MountOptions};
use ferry::nfs::{NfsClient, NfsStore, Stability};
use nfs_support::{pattern, Server};

const MIB: usize = 1 << 20;

/// A volume directory `vol` on a fresh ganesha, mounted through FUSE; unmounted and stopped on drop.
struct Mounted {
    handle: Option<MountHandle>,
    dir: tempfile::TempDir,
    // Dropped after the mount, so the server outlives every request of the session.
    server: Server,
    rt: tokio::runtime::Runtime,
}

impl Mounted {
    fn new(server: Server, timeout: Duration, stability: Stability) -> Mounted {
        assert!(
            Path::new("/dev/fuse").exists() && nix::unistd::geteuid().is_root(),
            "these tests mount FUSE filesystems: they need /dev/fuse and root"
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        let mut config = server.config();
        config.timeout = timeout;
        config.connections = 8;
        let client = NfsClient::new(config);
        let dir = tempfile::Builder::new()
            .prefix("ferry-nfs-fuse")
            .tempdir()
            .unwrap();
        let handle = rt.block_on(async {
            client.ensure_dir("vol", 0, 0, 0o777).await.unwrap();
            let store: Arc<dyn FileStore> = Arc::new(
                NfsStore::open(&client, "vol")
                    .await
                    .unwrap()
                    .with_stability(stability),
            );
            let opts = MountOptions {
                allow_other: true,
                fsname: "ferry-nfs:vol".into(),
                ..MountOptions::default()
            };
            mount(store, dir.path(), opts).await.expect("mount")
        });
        Mounted {
            handle: Some(handle),
            dir,
            server,
            rt,
        }
    }

    /// A path inside the mount.
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The same path in the export directory on the server's disk.
    fn on_disk(&self, name: &str) -> PathBuf {
        self.server.export().join("vol").join(name)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // A frozen server would make the unmount's last requests wait: thaw it first (harmless if not).
        let _ = nix::sys::signal::kill(self.server.pid(), nix::sys::signal::Signal::SIGCONT);
        if let Some(mut h) = self.handle.take() {
            if let Err(e) = self.rt.block_on(h.unmount()) {
                eprintln!("unmount failed: {e}; detaching");
                let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

macro_rules! mounted {
    ($timeout:expr, $stability:expr) => {
        Mounted::new(nfs_support::server(), $timeout, $stability)
    };
    () => {
        mounted!(Duration::from_secs(5), Stability::Unstable)
    };
}

/// Writes `len` bytes of `pattern(.., seed)` with 1 MiB write(2) calls and fsync; returns the time.
fn write_pattern(path: &Path, len: usize, seed: u64) -> Duration {
    let chunks: Vec<Vec<u8>> = (0..len / MIB)
        .map(|i| pattern((i * MIB) as u64, MIB, seed))
        .collect();
    let started = Instant::now();
    let mut f = File::create(path).unwrap();
    for chunk in &chunks {
        f.write_all(chunk).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    started.elapsed()
}

/// Reads `path` with 1 MiB read(2) calls and checks it against `pattern(.., seed)`; returns the time
/// the reads took.
fn check_pattern(path: &Path, len: usize, seed: u64) -> Duration {
    let mut f = File::open(path).unwrap();
    assert_eq!(f.metadata().unwrap().len(), len as u64);
    let mut got = vec![0u8; len];
    let started = Instant::now();
    f.read_exact(&mut got).unwrap();
    let took = started.elapsed();
    let mut rest = Vec::new();
    f.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "data past the end of {}", path.display());
    for (i, chunk) in got.chunks(MIB).enumerate() {
        assert!(
            chunk == &pattern((i * MIB) as u64, chunk.len(), seed)[..],
            "{}: the MiB at {} differs",
            path.display(),
            i * MIB
        );
    }
    took
}

fn mib_per_s(bytes: usize, took: Duration) -> f64 {
    bytes as f64 / MIB as f64 / took.as_secs_f64()
}

#[test]
fn a_256_mib_file_round_trips_and_lands_on_the_export() {
    let len = 256 * MIB;
    for stability in [Stability::Unstable, Stability::FileSync] {
        let m = mounted!(Duration::from_secs(10), stability);
        let wrote = write_pattern(&m.path("big"), len, 5);
        // Through the mount, and byte for byte on the server's disk.
        let read = check_pattern(&m.path("big"), len, 5);
        check_pattern(&m.on_disk("big"), len, 5);
        println!(
            "256 MiB through FUSE over NFS ({stability:?} writes): write+fsync {:.0} MiB/s ({wrote:.2?}), read {:.0} MiB/s ({read:.2?})",
            mib_per_s(len, wrote),
            mib_per_s(len, read)
        );
    }
}

#[test]
fn namespace_operations_show_on_the_export() {
    let m = mounted!();
    // mkdir, and a file in it.
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("d/f"), b"hello nfs").unwrap();
    assert!(m.on_disk("d").is_dir());
    assert_eq!(fs::read(m.on_disk("d/f")).unwrap(), b"hello nfs");

    // Rename, also over an existing file.
    fs::write(m.path("other"), b"old").unwrap();
    fs::rename(m.path("d/f"), m.path("other")).unwrap();
    assert!(!m.on_disk("d/f").exists());
    assert_eq!(fs::read(m.on_disk("other")).unwrap(), b"hello nfs");
    assert_eq!(fs::read(m.path("other")).unwrap(), b"hello nfs");
    fs::rename(m.path("d"), m.path("d2")).unwrap();
    assert!(m.on_disk("d2").is_dir() && !m.on_disk("d").exists());

    // Symlink and hard link.
    std::os::unix::fs::symlink("other", m.path("sym")).unwrap();
    assert_eq!(fs::read_link(m.on_disk("sym")).unwrap(), Path::new("other"));
    assert_eq!(fs::read(m.path("sym")).unwrap(), b"hello nfs");
    fs::hard_link(m.path("other"), m.path("d2/hard")).unwrap();
    assert_eq!(fs::metadata(m.path("other")).unwrap().nlink(), 2);
    assert_eq!(
        fs::metadata(m.on_disk("d2/hard")).unwrap().ino(),
        fs::metadata(m.on_disk("other")).unwrap().ino()
    );

    // chmod, chown, truncate.
    fs::set_permissions(m.path("other"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(m.path("other"), Some(1234), Some(2345)).unwrap();
    let meta = fs::metadata(m.on_disk("other")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    assert_eq!((meta.uid(), meta.gid()), (1234, 2345));
    let f = OpenOptions::new()
        .write(true)
        .open(m.path("other"))
        .unwrap();
    f.set_len(5).unwrap();
    drop(f);
    assert_eq!(fs::read(m.on_disk("other")).unwrap(), b"hello");
    assert_eq!(fs::read(m.path("d2/hard")).unwrap(), b"hello");
    // open(O_TRUNC) of an existing file empties it.
    fs::write(m.path("other"), b"").unwrap();
    assert_eq!(fs::metadata(m.on_disk("other")).unwrap().len(), 0);

    // Unlink and rmdir, and their errors.
    fs::remove_file(m.path("d2/hard")).unwrap();
    assert!(!m.on_disk("d2/hard").exists());
    assert_eq!(fs::metadata(m.path("other")).unwrap().nlink(), 1);
    fs::write(m.path("d2/keep"), b"x").unwrap();
    let e = fs::remove_dir(m.path("d2")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTEMPTY), "{e}");
    fs::remove_file(m.path("d2/keep")).unwrap();
    fs::remove_dir(m.path("d2")).unwrap();
    assert!(!m.on_disk("d2").exists());
    let e = fs::remove_file(m.path("missing")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    let e = fs::create_dir(m.path("sym")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "{e}");
    let e = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(m.path("other"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "{e}");

    // Made on the server's disk behind the mount's back: visible through it.
    fs::write(m.on_disk("from-disk"), b"made on the server").unwrap();
    assert_eq!(
        fs::read(m.path("from-disk")).unwrap(),
        b"made on the server"
    );

    // statfs reports the export's file system.
    let via_fuse = nix::sys::statvfs::statvfs(m.dir.path()).unwrap();
    let local = nix::sys::statvfs::statvfs(&m.server.export()).unwrap();
    assert_eq!(
        via_fuse.blocks() * via_fuse.fragment_size(),
        local.blocks() * local.fragment_size()
    );
}

#[test]
fn new_objects_belong_to_the_caller_on_the_export() {
    let m = mounted!();
    let (file, dir, link, exclusive) = std::thread::scope(|s| {
        s.spawn(|| {
            // setfsuid and setfsgid change only this thread's filesystem identity, which is what FUSE
            // reports as the caller.
            // SAFETY: plain syscalls with integer arguments.
            unsafe {
                libc::setfsgid(2000);
                libc::setfsuid(1000);
            }
            fs::write(m.path("mine"), b"by 1000").unwrap();
            fs::create_dir(m.path("mydir")).unwrap();
            std::os::unix::fs::symlink("mine", m.path("mylink")).unwrap();
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(m.path("excl"))
                .unwrap();
            f.write_all(b"exclusive").unwrap();
            drop(f);
            let owner = |p: &str| {
                let meta = fs::symlink_metadata(m.on_disk(p)).unwrap();
                (meta.uid(), meta.gid())
            };
            (
                owner("mine"),
                owner("mydir"),
                owner("mylink"),
                owner("excl"),
            )
        })
        .join()
        .unwrap()
    });
    for (what, owner) in [
        ("file", file),
        ("directory", dir),
        ("symlink", link),
        ("O_EXCL file", exclusive),
    ] {
        assert_eq!(owner, (1000, 2000), "{what}");
    }
    assert_eq!(fs::read(m.on_disk("mine")).unwrap(), b"by 1000");
    assert_eq!(fs::read(m.on_disk("excl")).unwrap(), b"exclusive");
    // The mode asked for, after the caller's umask, and times that are the server's clock (an
    // EXCLUSIVE create stores its verifier in them until they are set).
    let meta = fs::metadata(m.on_disk("excl")).unwrap();
    let age = std::time::SystemTime::now()
        .duration_since(meta.modified().unwrap())
        .unwrap_or_default();
    assert!(age < Duration::from_secs(60), "mtime {age:?} ago");
}

#[test]
fn a_directory_of_2000_entries_lists_completely() {
    let m = mounted!();
    fs::create_dir(m.path("many")).unwrap();
    let started = Instant::now();
    for i in 0..2000 {
        fs::write(m.path(&format!("many/file-{i:04}")), i.to_string()).unwrap();
    }
    let created = started.elapsed();
    let started = Instant::now();
    let mut names: Vec<String> = fs::read_dir(m.path("many"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let listed = started.elapsed();
    names.sort();
    let want: Vec<String> = (0..2000).map(|i| format!("file-{i:04}")).collect();
    assert_eq!(names, want);
    assert_eq!(fs::read_dir(m.on_disk("many")).unwrap().count(), 2000);
    assert_eq!(fs::read(m.path("many/file-1999")).unwrap(), b"1999");
    println!("2000 files created through FUSE over NFS in {created:?}, listed in {listed:?}");
}

#[test]
fn a_frozen_server_makes_reads_fail_with_eio_within_the_deadline_then_recover() {
    let timeout = Duration::from_secs(2);
    let m = mounted!(timeout, Stability::Unstable);
    // Written on the server's disk, never read through the mount: no page of it is cached.
    fs::write(m.on_disk("cold"), b"cold data").unwrap();
    let mut f = File::open(m.path("cold")).unwrap();

    m.server.freeze();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let e = f.read(&mut buf).unwrap_err();
    let took = started.elapsed();
    println!("read on a frozen server failed after {took:?}: {e}");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(
        took >= timeout && took < timeout + Duration::from_millis(1500),
        "took {took:?}"
    );

    m.server.thaw();
    let mut data = Vec::new();
    let mut f = File::open(m.path("cold")).unwrap();
    f.read_to_end(&mut data).unwrap();
    assert_eq!(data, b"cold data");
    // And writes go through again.
    fs::write(m.path("after"), b"thawed").unwrap();
    assert_eq!(fs::read(m.on_disk("after")).unwrap(), b"thawed");
}

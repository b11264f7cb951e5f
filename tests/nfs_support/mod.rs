//! Support for the NFS data-path tests (`nfs_client`, `nfs_ops`, `nfs_fuse`): the shared Ganesha harness
//! under the name these tests use, a macro that starts one or skips, and position-dependent test data.

#![allow(dead_code)]

pub use crate::common::ganesha::Ganesha as Server;

/// A fresh server of these tests' own.
pub fn server() -> Server {
    Server::start()
}

/// Deterministic, position-dependent bytes (xorshift per 8-byte word, seeded by the word's offset), so
/// a chunk in the wrong place or a stale page is caught, not only a wrong length.
pub fn pattern(offset: u64, len: usize, seed: u64) -> Vec<u8> {
    assert_eq!(offset % 8, 0);
    let mut out = Vec::with_capacity(len + 8);
    let mut word = offset / 8;
    while out.len() < len {
        let mut x = (word ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
        word += 1;
    }
    out.truncate(len);
    out
}

/// One host's view of a volume: its own NFS client (own connections), store and FUSE mount of the volume
/// directory, as a second Ferry daemon on another machine would have. Two `Host`s on one server are two
/// hosts sharing the volume. Unmounts on drop; declare it after the server, so it is dropped first.
pub struct Host {
    handle: Option<ferry::fuse::MountHandle>,
    pub dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
}

impl Host {
    /// Mounts the volume directory `volume` (made with mode 0777 if missing) with this NFS deadline and
    /// attribute cache lifetime.
    pub fn mount(
        server: &Server,
        volume: &str,
        timeout: std::time::Duration,
        attr_ttl: std::time::Duration,
    ) -> Host {
        use std::sync::Arc;
        assert!(
            std::path::Path::new("/dev/fuse").exists() && nix::unistd::geteuid().is_root(),
            "these tests mount FUSE filesystems: they need /dev/fuse and root"
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut config = server.config();
        config.timeout = timeout;
        let client = ferry::nfs::NfsClient::new(config);
        let dir = tempfile::Builder::new()
            .prefix("ferry-host")
            .tempdir()
            .unwrap();
        let handle = rt.block_on(async {
            client.ensure_dir(volume, 0, 0, 0o777).await.unwrap();
            let store: Arc<dyn ferry::fuse::FileStore> =
                Arc::new(ferry::nfs::NfsStore::open(&client, volume).await.unwrap());
            let opts = ferry::fuse::MountOptions {
                attr_ttl,
                allow_other: true,
                fsname: format!("ferry-nfs:{volume}"),
                ..ferry::fuse::MountOptions::default()
            };
            ferry::fuse::mount(store, dir.path(), opts)
                .await
                .expect("mount")
        });
        Host {
            handle: Some(handle),
            dir,
            rt,
        }
    }

    /// A path inside the mount.
    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(mut h) = self.handle.take() {
            if let Err(e) = self.rt.block_on(h.unmount()) {
                eprintln!("unmount failed: {e}; detaching");
                let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

/// Runs `f` in a thread whose filesystem identity (what FUSE and the kernel's permission checks see) is
/// `uid`:`gid`, with no supplementary groups beyond the process's.
pub fn as_user<T: Send>(uid: u32, gid: u32, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: plain syscalls with integer arguments; they change only this thread's fs identity.
            unsafe {
                libc::setfsgid(gid);
                libc::setfsuid(uid);
            }
            f()
        })
        .join()
        .unwrap()
    })
}

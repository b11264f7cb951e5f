//! Real workloads through a mounted nfs volume: the real daemon, a FUSE helper and a real NFS-Ganesha, driven
//! the way applications drive a filesystem: a 1 GiB sequential file, concurrent writers and appenders, fio
//! with verification, stress-ng's filesystem stressors, a source tree through tar, and an SQLite database
//! read by a second process while it is written.
//!
//! Every test checks outcomes (contents, sizes, modes, owners, link structure, exit statuses, integrity
//! checks), through the mount and, where it means something, in the exported directory on the server's disk.
//! Throughput figures are printed for information only (`--nocapture`); nothing is timed.
//!
//! The external programs (fio, stress-ng, sqlite3, tar, diff, cp) come from `scripts/deps`: a missing one
//! fails the test.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::ganesha::Ganesha;
use common::Daemon;

/// Where the tools live; a non-login PATH may lack the sbin directories.
const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The unit of the pattern files: 1 MiB, also the size of each write and read of the big file.
const BLOCK: usize = 1 << 20;
const MIB: f64 = (1 << 20) as f64;

/// Fails the test, saying how to install them, when any of `tools` is missing.
fn require_tools(tools: &[&str]) {
    let path = format!(
        "{}:{SYSTEM_PATH}",
        std::env::var("PATH").unwrap_or_default()
    );
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| !std::env::split_paths(&path).any(|dir| dir.join(t).is_file()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} not installed: run scripts/deps as root",
        missing.join(", ")
    );
}

/// One volume of the nfs backend, mounted through a daemon of its own against a Ganesha of its own.
struct Mounted {
    // Field order is drop order: the daemon goes first (its drop detaches the mount, so the helper can
    // remove its marker while the server still answers), then its directory, then the server.
    d: Daemon,
    _dir: tempfile::TempDir,
    g: Ganesha,
    name: String,
    id: String,
    mnt: PathBuf,
    mounts: u32,
}

impl Mounted {
    /// Starts Ganesha and a daemon, creates the volume `name` and mounts it.
    fn start(name: &str, tools: &[&str]) -> Mounted {
        require_tools(tools);
        let g = Ganesha::start();
        let dir = tempfile::Builder::new()
            .prefix(&format!("ferry-wl-{name}"))
            .tempdir()
            .unwrap();
        let config = dir.path().join("ferry.toml");
        // A generous deadline: these tests load two shared cores fully, and a slow reply is not a failure.
        std::fs::write(&config, g.config_section("30s")).unwrap();
        let d = Daemon::start_in(
            dir.path(),
            &dir.path().join("ferry.sock"),
            &[("FERRY_CONFIG", config.to_str().unwrap())],
        );
        d.create(name, r#"{"backend":"nfs"}"#);
        let mnt = d.mount(name, "c1");
        assert!(common::is_mounted(&mnt), "{} is not mounted", mnt.display());
        Mounted {
            d,
            _dir: dir,
            g,
            name: name.to_string(),
            id: "c1".into(),
            mnt,
            mounts: 1,
        }
    }

    /// The FUSE helper's log (`STATE/nfs/VOLUME/helper.log`), for failure messages: it names every
    /// error the helper returned to an application.
    fn helper_log(&self) -> String {
        let log = self.d.state.join("nfs").join(&self.name).join("helper.log");
        std::fs::read_to_string(&log)
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", log.display()))
    }

    /// The volume's directory in the export, on the server's disk.
    fn on_server(&self) -> PathBuf {
        self.g.export().join(&self.name)
    }

    /// Unmounts and mounts again under a new mount ID: a new helper and a new FUSE superblock, so nothing
    /// read afterwards can come from this host's page cache.
    fn remount(&mut self) {
        self.d.unmount(&self.name, &self.id);
        assert!(!common::is_mounted(&self.mnt));
        self.mounts += 1;
        self.id = format!("c{}", self.mounts);
        self.mnt = self.d.mount(&self.name, &self.id);
        assert!(common::is_mounted(&self.mnt));
    }

    /// Unmounts and removes the volume, checking that no file unlinked while open was left behind under
    /// its hidden name and that the volume's directory is gone from the export.
    fn finish(self) {
        self.d.unmount(&self.name, &self.id);
        assert!(!common::is_mounted(&self.mnt));
        let leftovers: Vec<PathBuf> = walk(&self.on_server())
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(".ferry-unlinked-"))
            })
            .collect();
        assert!(leftovers.is_empty(), "hidden files left: {leftovers:?}");
        self.d.remove(&self.name);
        assert!(!self.on_server().exists());
    }
}

/// Every path below `root` (not `root` itself), depth first, without following symlinks, sorted.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            }
            out.push(entry.path());
        }
    }
    out.sort();
    out
}

/// Runs a program (argument vector, no shell) and fails the test with its output unless it exits 0.
fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .env("PATH", SYSTEM_PATH)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\n--- stdout:\n{}\n--- stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn throughput(what: &str, bytes: u64, took: Duration) {
    println!(
        "{what}: {:.0} MiB in {:.2} s = {:.1} MiB/s",
        bytes as f64 / MIB,
        took.as_secs_f64(),
        bytes as f64 / MIB / took.as_secs_f64()
    );
}

/// Deterministic file contents: one random 1 MiB block, with the first 8 bytes of every 4 KiB page
/// replaced by a stamp of the block's index, the page and the seed. A block read at the wrong offset, from
/// another file, stale or zero-filled, does not match.
struct Pattern {
    base: Vec<u8>,
    seed: u64,
}

impl Pattern {
    fn new(seed: u64) -> Pattern {
        // xorshift64*: fast, and enough to make every page distinct.
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut base = Vec::with_capacity(BLOCK);
        while base.len() < BLOCK {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            base.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        Pattern { base, seed }
    }

    /// Block `index` of the file into `out` (BLOCK bytes).
    fn block(&self, index: u64, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.base);
        for page in 0..BLOCK / 4096 {
            let stamp = ((index << 8) | page as u64) ^ self.seed;
            out[page * 4096..page * 4096 + 8].copy_from_slice(&stamp.to_le_bytes());
        }
    }

    /// Writes `blocks` blocks to `path` in writes of `write_size` bytes, then fsyncs; returns the time taken.
    fn write_file(&self, path: &Path, blocks: u64, write_size: usize) -> Duration {
        let started = Instant::now();
        let mut f = File::create(path).unwrap();
        let mut buf = Vec::with_capacity(BLOCK);
        for i in 0..blocks {
            self.block(i, &mut buf);
            for chunk in buf.chunks(write_size) {
                f.write_all(chunk)
                    .unwrap_or_else(|e| panic!("{}: block {i}: {e}", path.display()));
            }
        }
        f.sync_all().unwrap();
        drop(f);
        started.elapsed()
    }

    /// Reads `path` in 1 MiB reads and checks every block and the length; returns the time taken.
    fn verify_file(&self, path: &Path, blocks: u64) -> Duration {
        let started = Instant::now();
        let mut f = File::open(path).unwrap();
        let len = f.metadata().unwrap().len();
        assert_eq!(len, blocks * BLOCK as u64, "{}: wrong size", path.display());
        let (mut want, mut got) = (Vec::with_capacity(BLOCK), vec![0u8; BLOCK]);
        for i in 0..blocks {
            f.read_exact(&mut got)
                .unwrap_or_else(|e| panic!("{}: block {i}: {e}", path.display()));
            self.block(i, &mut want);
            if got != want {
                let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
                panic!(
                    "{}: block {i} differs from byte {at} (file offset {})",
                    path.display(),
                    i * BLOCK as u64 + at as u64
                );
            }
        }
        assert_eq!(
            f.read(&mut got).unwrap(),
            0,
            "{}: data past the end",
            path.display()
        );
        started.elapsed()
    }
}

#[test]
fn a_1_gib_file_written_sequentially_reads_back_through_a_new_mount_and_on_the_server() {
    let mut v = Mounted::start("big", &[]);
    const BLOCKS: u64 = 1024;
    let pattern = Pattern::new(1);
    let took = pattern.write_file(&v.mnt.join("big.bin"), BLOCKS, BLOCK);
    throughput(
        "sequential write through FUSE (1 MiB writes, fsync)",
        BLOCKS << 20,
        took,
    );

    // The server's copy is complete and right as soon as fsync and close have returned.
    let on_disk = v.on_server().join("big.bin");
    assert_eq!(std::fs::metadata(&on_disk).unwrap().len(), BLOCKS << 20);
    pattern.verify_file(&on_disk, BLOCKS);

    // Read back through a fresh mount: a new helper, and no page cache from the writes.
    v.remount();
    let took = pattern.verify_file(&v.mnt.join("big.bin"), BLOCKS);
    throughput(
        "sequential read through FUSE (1 MiB reads, cold cache)",
        BLOCKS << 20,
        took,
    );
    v.finish();
}

/// One record of the shared append-only log: fixed size, so a torn or interleaved record shows.
const RECORD: usize = 128;

fn record(writer: usize, seq: usize) -> Vec<u8> {
    let check = (writer as u64 * 1_000_003 + seq as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut r = format!("w{writer:02} s{seq:06} c{check:016x} ").into_bytes();
    r.resize(RECORD - 1, b'.');
    r.push(b'\n');
    r
}

/// Checks the shared log: every record of every appender exactly once, whole, in each appender's order.
fn check_log(data: &[u8], writers: usize, per_writer: usize, what: &str) {
    assert_eq!(
        data.len(),
        writers * per_writer * RECORD,
        "{what}: wrong length (records lost or torn)"
    );
    let mut next = vec![0usize; writers];
    for (n, rec) in data.chunks(RECORD).enumerate() {
        let text = String::from_utf8_lossy(rec);
        let writer: usize = text
            .get(1..3)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{what}: record {n} is garbled: {text:?}"));
        assert!(writer < writers, "{what}: record {n}: {text:?}");
        assert_eq!(
            rec,
            record(writer, next[writer]),
            "{what}: record {n} is not writer {writer}'s record {}",
            next[writer]
        );
        next[writer] += 1;
    }
    assert!(next.iter().all(|&n| n == per_writer), "{what}: {next:?}");
}

#[test]
fn concurrent_writers_and_appenders_lose_nothing() {
    let v = Mounted::start("conc", &[]);
    const WRITERS: usize = 8;
    const FILE_BLOCKS: u64 = 32;
    const APPENDERS: usize = 8;
    const RECORDS: usize = 1000;
    let log = v.mnt.join("shared.log");
    let started = Instant::now();
    std::thread::scope(|s| {
        for w in 0..WRITERS {
            let path = v.mnt.join(format!("own-{w}.bin"));
            // Different write sizes per writer, so requests of several sizes interleave on the wire.
            let write_size = [4096, 65536, 131072, BLOCK][w % 4];
            s.spawn(move || {
                Pattern::new(100 + w as u64).write_file(&path, FILE_BLOCKS, write_size)
            });
        }
        for a in 0..APPENDERS {
            let log = &log;
            s.spawn(move || {
                let mut f = OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(log)
                    .unwrap();
                for seq in 0..RECORDS {
                    // One write(2) per record: O_APPEND makes each land whole at the end.
                    let n = f.write(&record(a, seq)).unwrap();
                    assert_eq!(n, RECORD, "short append");
                }
                f.sync_all().unwrap();
            });
        }
    });
    let took = started.elapsed();
    let bytes = WRITERS as u64 * (FILE_BLOCKS << 20) + (APPENDERS * RECORDS * RECORD) as u64;
    throughput("8 writers + 8 appenders through FUSE", bytes, took);

    for w in 0..WRITERS {
        let pattern = Pattern::new(100 + w as u64);
        pattern.verify_file(&v.mnt.join(format!("own-{w}.bin")), FILE_BLOCKS);
        pattern.verify_file(&v.on_server().join(format!("own-{w}.bin")), FILE_BLOCKS);
    }
    let through_mount = std::fs::read(&log).unwrap();
    check_log(
        &through_mount,
        APPENDERS,
        RECORDS,
        "shared.log through the mount",
    );
    let on_server = std::fs::read(v.on_server().join("shared.log")).unwrap();
    assert!(
        on_server == through_mount,
        "the server's shared.log differs from the mount's"
    );
    v.finish();
}

/// Runs fio with JSON output and checks its exit status, that every job reports no error, and that each
/// job both wrote and read (verification reads included); prints the bandwidths.
fn fio(dir: &Path, out: &Path, args: &[&str], jobs: usize) {
    let mut cmd = Command::new("fio");
    cmd.arg(format!("--directory={}", dir.display()))
        .args(args)
        // psync: plain pread/pwrite through the page cache, as most applications do.
        .args(["--ioengine=psync", "--direct=0"])
        // FUSE here has no fallocate (NFSv3 has no ALLOCATE): fio would warn and carry on without it.
        .arg("--fallocate=none")
        .args(["--verify=crc32c", "--verify_fatal=1", "--end_fsync=1"])
        // Otherwise fio leaves its verify state files in the current directory (the repository).
        .arg("--verify_state_save=0")
        .arg("--output-format=json")
        .arg(format!("--output={}", out.display()));
    let started = Instant::now();
    run(&mut cmd);
    let took = started.elapsed();
    let text = std::fs::read_to_string(out).unwrap();
    // fio may print notes before the JSON document.
    let json: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap()..])
        .unwrap_or_else(|e| panic!("fio's output is not JSON ({e}):\n{text}"));
    let list = json["jobs"].as_array().expect("jobs in fio's output");
    assert_eq!(list.len(), jobs, "{text}");
    for job in list {
        let name = job["jobname"].as_str().unwrap_or("?");
        assert_eq!(job["error"], 0, "fio job {name} reports an error:\n{job:#}");
        let (read, written) = (
            job["read"]["io_bytes"].as_u64().unwrap(),
            job["write"]["io_bytes"].as_u64().unwrap(),
        );
        assert!(
            read > 0 && written > 0,
            "fio job {name}: read {read}, wrote {written}"
        );
        println!(
            "fio {name}: wrote {:.0} MiB at {:.1} MiB/s, read {:.0} MiB at {:.1} MiB/s ({} write IOs, {} read IOs)",
            written as f64 / MIB,
            job["write"]["bw_bytes"].as_f64().unwrap_or(0.0) / MIB,
            read as f64 / MIB,
            job["read"]["bw_bytes"].as_f64().unwrap_or(0.0) / MIB,
            job["write"]["total_ios"],
            job["read"]["total_ios"],
        );
    }
    println!("fio run took {:.1} s", took.as_secs_f64());
}

#[test]
fn fio_with_verification_finds_no_errors() {
    let v = Mounted::start("fio", &["fio"]);
    let out = tempfile::tempdir().unwrap();
    let seq = v.mnt.join("seq");
    std::fs::create_dir(&seq).unwrap();
    // Sequential: 256 MiB in 1 MiB writes, then every block read back and its checksum verified.
    fio(
        &seq,
        &out.path().join("seq.json"),
        &["--name=seq", "--rw=write", "--bs=1M", "--size=256M"],
        1,
    );
    let rand = v.mnt.join("rand");
    std::fs::create_dir(&rand).unwrap();
    // Random mixed reads and writes, four jobs on four files at once, every request size from a page to
    // 1 MiB (bssplit applies to both directions, unlike --bs=4k,64k,1M, which sets read, write and trim
    // sizes); what was written is verified after each job's run.
    fio(
        &rand,
        &out.path().join("rand.json"),
        &[
            "--name=randrw",
            "--rw=randrw",
            "--rwmixread=50",
            "--bssplit=4k/50:64k/30:1m/20",
            "--size=128M",
            "--numjobs=4",
        ],
        4,
    );
    // fio's files are on the server with their full size.
    for (dir, name, size) in [
        ("seq", "seq.0.0", 256u64 << 20),
        ("rand", "randrw.3.0", 128 << 20),
    ] {
        let meta = std::fs::metadata(v.on_server().join(dir).join(name)).unwrap();
        assert_eq!(meta.len(), size, "{dir}/{name}");
    }
    v.finish();
}

/// Four jobs of 4 KiB random reads and writes at once, verified: on four files, and on four regions of one
/// file, where the helper serves one inode's reads beside its writes in flight (a read waits only for the
/// writes that overlap it, and for all of them when it meets the server's end of file).
#[test]
fn random_4k_io_from_four_jobs_verifies_on_separate_files_and_in_one_file() {
    let v = Mounted::start("rand4k", &["fio"]);
    let out = tempfile::tempdir().unwrap();
    let own = v.mnt.join("own");
    std::fs::create_dir(&own).unwrap();
    fio(
        &own,
        &out.path().join("own.json"),
        &[
            "--name=own",
            "--rw=randrw",
            "--rwmixread=50",
            "--bs=4k",
            "--size=16M",
            "--numjobs=4",
        ],
        4,
    );
    // One file, made at its full size first so that no job lays it out under the others; job N reads
    // and writes its own 16 MiB from N * 16 MiB on.
    let shared = v.mnt.join("shared");
    std::fs::create_dir(&shared).unwrap();
    File::create(shared.join("one"))
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    fio(
        &shared,
        &out.path().join("shared.json"),
        &[
            "--name=shared",
            "--filename=one",
            "--rw=randrw",
            "--rwmixread=50",
            "--bs=4k",
            "--size=16M",
            "--offset_increment=16M",
            "--numjobs=4",
        ],
        4,
    );
    for (dir, name, size) in [("own", "own.3.0", 16u64 << 20), ("shared", "one", 64 << 20)] {
        let meta = std::fs::metadata(v.on_server().join(dir).join(name)).unwrap();
        assert_eq!(meta.len(), size, "{dir}/{name}");
    }
    v.finish();
}

/// The stress-ng stressors run through the mount: instances and options. Sizes are cut down from the
/// defaults (1 GiB files) so that set-up fits in the run time over a network filesystem.
const STRESSORS: &[(&str, &str, &[&str])] = &[
    ("dir", "1", &[]),
    ("dentry", "1", &[]),
    ("dirmany", "1", &[]),
    ("rename", "2", &[]),
    ("link", "1", &[]),
    ("symlink", "1", &[]),
    ("access", "1", &[]),
    ("touch", "1", &[]),
    ("open", "1", &[]),
    ("chmod", "1", &[]),
    ("chown", "1", &[]),
    ("utime", "1", &[]),
    ("hdd", "2", &["--hdd-bytes", "32M"]),
    ("seek", "1", &["--seek-size", "16M"]),
    // Its set-up writes the file in small writes and counts against the run time.
    ("readahead", "1", &["--readahead-bytes", "2M"]),
    // 128 MiB is the smallest size this stress-ng accepts.
    ("copy-file", "1", &["--copy-file-bytes", "128M"]),
];

#[test]
fn stress_ng_filesystem_stressors_pass() {
    let v = Mounted::start("stress", &["stress-ng"]);
    let work = v.mnt.join("stress");
    std::fs::create_dir(&work).unwrap();
    // Stressors that exercise what an NFS volume offers: names (dir, dentry, dirmany, rename,
    // link, symlink, access, touch, open), attributes (chmod, chown, utime), and data (hdd with
    // verification, seek, readahead, copy-file). Left out, because the volume cannot have them:
    //   xattr            NFSv3 has no extended attributes;
    //   fallocate,       NFSv3 has no ALLOCATE or DEALLOCATE, so the FUSE mount has no fallocate;
    //   fpunch, iomix    (iomix also uses fallocate and file ioctls);
    //   mknod            device and FIFO nodes are not part of the volume's store contract;
    //   fiemap,          FS_IOC_* ioctls (extent maps, inode flags, fs-verity) are local-filesystem
    //   file-ioctl,      features that FUSE does not pass on;
    //   inode-flags,
    //   verity
    //   flock, lockf,    locks on this mount are the kernel's local fallback (the adapter implements no
    //   fcntl            lock operations), so they would test the kernel, not the volume;
    //   sync-file        sync_file_range is not passed to FUSE either;
    //   dirdeep          its clean-up of a very deep tree is not bounded by --timeout;
    //   filename         one bogo op tries every allowed name length and character: thousands of calls,
    //                    which never finish within the run over NFS (odd names are in the tar test);
    //   fstat            it stats /dev, not a path on the volume.
    let mut cmd = Command::new("stress-ng");
    cmd.arg("--temp-path").arg(&work);
    for (stressor, instances, options) in STRESSORS {
        cmd.arg(format!("--{stressor}"))
            .arg(instances)
            .args(*options);
    }
    cmd.args(["--timeout", "15s", "--verify", "--metrics-brief"]);
    let started = Instant::now();
    let out = run(&mut cmd);
    let took = started.elapsed();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("stress-ng took {:.1} s:\n{text}", took.as_secs_f64());
    assert!(text.contains("successful run completed"), "{text}");
    for bad in [
        "fail:",
        "error:",
        "verification failed",
        "untrustworthy",
        "expired during",
    ] {
        assert!(!text.contains(bad), "stress-ng reports {bad:?}:\n{text}");
    }
    // Every stressor got work done: "metrc: [PID] NAME BOGO-OPS ..." with at least one bogo op.
    for (stressor, _, _) in STRESSORS {
        let ops: Option<f64> = text.lines().find_map(|l| {
            let rest = l.split("metrc: [").nth(1)?.split_once("] ")?.1;
            let mut words = rest.split_whitespace();
            (words.next()? == *stressor).then(|| words.next()?.parse().ok())?
        });
        assert!(
            ops.is_some_and(|n| n > 0.0),
            "stress-ng's {stressor} did no work ({ops:?}):\n{text}"
        );
    }
    // Every stressor cleaned up after itself, through the mount and on the server alike.
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0);
    assert_eq!(
        std::fs::read_dir(v.on_server().join("stress"))
            .unwrap()
            .count(),
        0
    );
    v.finish();
}

/// What is compared of each entry of two trees; mtimes to the second, as tar stores them, and not for
/// symlinks: NFS-Ganesha 4.3's VFS backend answers a SETATTR of a symlink's times with success but does
/// not apply it (strace shows no utimensat on the server), so that says nothing about Ferry.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: Option<u64>,
    target: Option<PathBuf>,
    mtime: Option<i64>,
    nlink: Option<u64>,
}

/// Every entry below `root` by relative path, and the groups of hard-linked files (by relative paths).
fn tree(root: &Path) -> (BTreeMap<PathBuf, Entry>, BTreeSet<Vec<PathBuf>>) {
    let mut entries = BTreeMap::new();
    let mut by_inode: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
    for path in std::iter::once(root.to_path_buf()).chain(walk(root)) {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let rel = path.strip_prefix(root).unwrap().to_path_buf();
        let ft = meta.file_type();
        let kind = if ft.is_symlink() {
            "symlink"
        } else if ft.is_dir() {
            "dir"
        } else if ft.is_file() {
            "file"
        } else {
            "other"
        };
        if ft.is_file() {
            by_inode
                .entry((meta.dev(), meta.ino()))
                .or_default()
                .push(rel.clone());
        }
        entries.insert(
            rel,
            Entry {
                kind,
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                size: ft.is_file().then_some(meta.len()),
                target: ft.is_symlink().then(|| std::fs::read_link(&path).unwrap()),
                mtime: (!ft.is_symlink()).then_some(meta.mtime()),
                // A directory's link count depends on the filesystem's conventions; a file's does not.
                nlink: ft.is_file().then_some(meta.nlink()),
            },
        );
    }
    let groups = by_inode.into_values().filter(|g| g.len() > 1).collect();
    (entries, groups)
}

fn compare_trees(want: &Path, got: &Path) {
    run(Command::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(want)
        .arg(got));
    let (want_entries, want_links) = tree(want);
    let (got_entries, got_links) = tree(got);
    let want_names: BTreeSet<_> = want_entries.keys().collect();
    let got_names: BTreeSet<_> = got_entries.keys().collect();
    assert_eq!(
        want_names,
        got_names,
        "{} and {} list different names",
        want.display(),
        got.display()
    );
    for (rel, w) in &want_entries {
        assert_eq!(
            &got_entries[rel],
            w,
            "{} in {}",
            rel.display(),
            got.display()
        );
    }
    assert_eq!(
        want_links,
        got_links,
        "hard links differ in {}",
        got.display()
    );
}

/// A source tree with what tar has to carry: thousands of files, symlinks (relative, absolute, dangling,
/// long), hard links, owners, modes with setuid, setgid and sticky bits, odd and long names, deep nesting,
/// empty files and directories, and a larger file.
fn build_tree(root: &Path) {
    std::fs::create_dir(root).unwrap();
    run(Command::new("cp")
        .arg("-a")
        .arg("/usr/share/doc")
        .arg(root.join("doc")));
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir(root.join("ferry")).unwrap();
    run(Command::new("cp")
        .arg("-a")
        .arg(repo.join("src"))
        .arg(root.join("ferry/src")));
    run(Command::new("cp")
        .arg("-a")
        .arg(repo.join("Cargo.lock"))
        .arg(root.join("ferry")));

    let files: Vec<PathBuf> = walk(root)
        .into_iter()
        .filter(|p| std::fs::symlink_metadata(p).unwrap().is_file())
        .collect();
    let links = root.join("hardlinks");
    std::fs::create_dir(&links).unwrap();
    for (i, f) in files.iter().enumerate() {
        if i % 25 == 0 {
            std::fs::hard_link(f, links.join(format!("link-{i}"))).unwrap();
        }
        if i % 11 == 0 {
            std::os::unix::fs::lchown(f, Some(1000), Some(1000)).unwrap();
        } else if i % 13 == 0 {
            std::os::unix::fs::lchown(f, Some(4242), Some(4343)).unwrap();
        }
        let mode = match i % 7 {
            0 => Some(0o600),
            1 => Some(0o755),
            2 => Some(0o440),
            _ => None,
        };
        if let Some(mode) = mode {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(mode)).unwrap();
        }
    }
    let special = root.join("special");
    std::fs::create_dir(&special).unwrap();
    std::fs::write(special.join("setuid-tool"), b"#!/bin/true\n").unwrap();
    std::fs::set_permissions(
        special.join("setuid-tool"),
        PermissionsExt::from_mode(0o4755),
    )
    .unwrap();
    for (name, mode, owner) in [
        ("sticky", 0o1777, 0),
        ("setgid", 0o2775, 1234),
        ("private", 0o700, 5000),
    ] {
        let d = special.join(name);
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("inside"), name).unwrap();
        std::os::unix::fs::lchown(&d, Some(owner), Some(owner)).unwrap();
        std::fs::set_permissions(&d, PermissionsExt::from_mode(mode)).unwrap();
    }
    std::fs::create_dir(special.join("empty-dir")).unwrap();
    std::fs::write(special.join("empty-file"), b"").unwrap();
    std::fs::write(special.join("name with spaces & été"), b"odd name").unwrap();
    std::fs::write(special.join("n".repeat(250)), b"long name").unwrap();
    let mut deep = special.join("deep");
    for level in 0..24 {
        deep = deep.join(format!("level-{level}"));
    }
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("bottom"), b"deep").unwrap();
    let sym = std::os::unix::fs::symlink;
    sym("../ferry/Cargo.lock", special.join("relative-link")).unwrap();
    sym("/usr/share/doc", special.join("absolute-link")).unwrap();
    sym("does/not/exist", special.join("dangling-link")).unwrap();
    sym("deep", special.join("dir-link")).unwrap();
    sym(
        format!("{}/target", "x".repeat(500)).as_str(),
        special.join("long-link"),
    )
    .unwrap();
    std::os::unix::fs::lchown(special.join("relative-link"), Some(777), Some(888)).unwrap();
    Pattern::new(7).write_file(&special.join("large.bin"), 24, BLOCK);
    std::fs::hard_link(special.join("large.bin"), special.join("large-again.bin")).unwrap();
}

#[test]
fn a_source_tree_extracted_with_tar_matches_a_local_extraction() {
    let v = Mounted::start("tar", &["tar", "diff", "cp"]);
    let work = tempfile::Builder::new()
        .prefix("ferry-wl-tree")
        .tempdir()
        .unwrap();
    build_tree(&work.path().join("tree"));
    let archive = work.path().join("tree.tar");
    run(Command::new("tar")
        .arg("--numeric-owner")
        .arg("-cf")
        .arg(&archive)
        .arg("-C")
        .arg(work.path().join("tree"))
        .arg("."));
    let (entries, _) = tree(&work.path().join("tree"));
    let size = std::fs::metadata(&archive).unwrap().len();

    // As root, tar restores owners (by number here) and, with -p, modes including setuid, setgid, sticky.
    let extract = |into: &Path| {
        std::fs::create_dir(into).unwrap();
        let started = Instant::now();
        run(Command::new("tar")
            .args(["--numeric-owner", "-xpf"])
            .arg(&archive)
            .arg("-C")
            .arg(into));
        started.elapsed()
    };
    let local = work.path().join("local");
    let took_local = extract(&local);
    let took_mount = extract(&v.mnt.join("extract"));
    println!(
        "tar -x of {} entries ({:.0} MiB): {:.2} s on local disk, {:.2} s through FUSE",
        entries.len(),
        size as f64 / MIB,
        took_local.as_secs_f64(),
        took_mount.as_secs_f64()
    );
    assert!(entries.len() > 3000, "only {} entries", entries.len());

    compare_trees(&local, &v.mnt.join("extract"));
    compare_trees(&local, &v.on_server().join("extract"));
    // And again from a fresh mount, with nothing cached by the kernel.
    let mut v = v;
    v.remount();
    compare_trees(&local, &v.mnt.join("extract"));
    v.finish();
}

/// Reads one line from the reader process, failing the test on end of output.
fn reply(lines: &mut impl BufRead, what: &str) -> String {
    let mut line = String::new();
    let n = lines.read_line(&mut line).unwrap();
    assert!(n > 0, "the sqlite3 reader ended while waiting for {what}");
    line.trim_end().to_string()
}

#[test]
fn sqlite_database_stays_consistent_with_a_concurrent_reader() {
    let v = Mounted::start("sqlite", &["sqlite3"]);
    const TRANSACTIONS: usize = 50;
    const PER_TRANSACTION: usize = 100;
    const ROWS: usize = TRANSACTIONS * PER_TRANSACTION;
    let db = v.mnt.join("app.db");
    let work = tempfile::tempdir().unwrap();
    run(Command::new("sqlite3").arg(&db).arg(
        "PRAGMA journal_mode=DELETE; \
         CREATE TABLE items(id INTEGER PRIMARY KEY, k TEXT NOT NULL, v INTEGER NOT NULL, payload BLOB);",
    ));

    // The writer's script: many small transactions (each a journal created, synced and deleted), an
    // index, an update and a delete in one transaction each, and a VACUUM that rewrites the whole file.
    let mut script = String::from(".bail on\n.timeout 30000\n");
    for t in 0..TRANSACTIONS {
        script.push_str("BEGIN;\n");
        for i in 1 + t * PER_TRANSACTION..=(t + 1) * PER_TRANSACTION {
            script.push_str(&format!(
                "INSERT INTO items(k, v, payload) VALUES('key-{i}', {i}, randomblob(300));\n"
            ));
        }
        script.push_str("COMMIT;\n");
    }
    script.push_str(
        "CREATE INDEX items_k ON items(k);\n\
         UPDATE items SET v = v * 2 WHERE id % 3 = 0;\n\
         DELETE FROM items WHERE id % 7 = 0;\n\
         VACUUM;\n",
    );
    let script_path = work.path().join("workload.sql");
    std::fs::write(&script_path, script).unwrap();
    let remaining = ROWS - ROWS / 7;
    let sum: usize = (1..=ROWS)
        .filter(|i| i % 7 != 0)
        .map(|i| if i % 3 == 0 { 2 * i } else { i })
        .sum();

    // A second process holds the database open the whole time and reads while the writer works. Every
    // count it sees must be a committed state: whole transactions of inserts, or the end state of the delete.
    let mut reader = Command::new("sqlite3")
        .args(["-batch", "-readonly"])
        .arg(&db)
        .env("PATH", SYSTEM_PATH)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to_reader = reader.stdin.take().unwrap();
    let mut from_reader = BufReader::new(reader.stdout.take().unwrap());
    writeln!(to_reader, ".timeout 30000").unwrap();

    let started = Instant::now();
    let mut writer = Command::new("sqlite3")
        .arg("-batch")
        .arg(&db)
        .arg(format!(".read {}", script_path.display()))
        .env("PATH", SYSTEM_PATH)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = BTreeSet::new();
    let mut reads = 0;
    let status = loop {
        writeln!(to_reader, "SELECT 'count', count(*) FROM items;").unwrap();
        let line = reply(&mut from_reader, "a count");
        let count: usize = line
            .strip_prefix("count|")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("the reader answered {line:?}"));
        assert!(
            count.is_multiple_of(PER_TRANSACTION) || count == remaining,
            "the reader saw {count} rows, which no committed state has"
        );
        seen.insert(count);
        reads += 1;
        if let Some(status) = writer.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = started.elapsed();
    let mut err = String::new();
    writer
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        status.success(),
        "the sqlite3 writer failed with {status}: {err}\n--- helper log:\n{}",
        v.helper_log()
    );
    println!(
        "sqlite: {TRANSACTIONS} transactions, index, update, delete and VACUUM in {:.2} s; \
         the reader made {reads} reads and saw {} distinct counts",
        took.as_secs_f64(),
        seen.len()
    );
    // The reader, still open, sees the final state.
    writeln!(to_reader, "SELECT 'final', count(*), sum(v) FROM items;").unwrap();
    assert_eq!(
        reply(&mut from_reader, "the final count"),
        format!("final|{remaining}|{sum}")
    );
    drop(to_reader);
    let out = reader.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the sqlite3 reader failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let check = |db: &Path| {
        let out = run(Command::new("sqlite3")
            .arg("-readonly")
            .arg(db)
            .arg("PRAGMA integrity_check; SELECT count(*), sum(v) FROM items; SELECT count(*) FROM items INDEXED BY items_k WHERE k >= 'key-';"));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("ok\n{remaining}|{sum}\n{remaining}\n"),
            "{}",
            db.display()
        );
    };
    check(&db);
    // The journal is gone, and the server's copy of the file is the same consistent database.
    assert!(!v.mnt.join("app.db-journal").exists());
    check(&v.on_server().join("app.db"));
    v.finish();
}

//! The ebs backend through the real daemon: against the strict EBS emulator (exact blocks, checksums, small
//! pages, parent inheritance, injected throttling and latency) and against moto (an independent
//! implementation whose child snapshots do not inherit). Two daemons with separate state directories stand
//! in for two hosts.

use crate::common;
use crate::ebs_strict;
use crate::moto;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::Daemon;
use ebs_strict::StrictEbs;
use serde_json::Value;

const BLOCK: usize = 524_288;

/// A multi-threaded runtime that keeps the emulator serving while the test thread makes blocking calls.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A daemon ("host") whose [ebs] section points at `endpoint`.
pub(crate) fn host(endpoint: &str, label: &str, concurrency: usize) -> (tempfile::TempDir, Daemon) {
    host_with(endpoint, label, concurrency, "")
}

/// A daemon on moto, whose snapshots hold only their own blocks.
fn moto_host(moto: &moto::Moto, label: &str, concurrency: usize) -> (tempfile::TempDir, Daemon) {
    host_lines(
        &moto.endpoint(),
        label,
        concurrency,
        "",
        moto::Moto::EBS_LINES,
    )
}

/// Like `host`, with extra top-level configuration (before the [ebs] section).
fn host_with(
    endpoint: &str,
    label: &str,
    concurrency: usize,
    top: &str,
) -> (tempfile::TempDir, Daemon) {
    host_lines(endpoint, label, concurrency, top, "")
}

/// Like `host_with`, with extra lines in the [ebs] section.
pub(crate) fn host_lines(
    endpoint: &str,
    label: &str,
    concurrency: usize,
    top: &str,
    ebs: &str,
) -> (tempfile::TempDir, Daemon) {
    let tmp = tempfile::Builder::new()
        .prefix(&format!("ferry-ebs-{label}"))
        .tempdir()
        .unwrap();
    let config = tmp.path().join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            "{top}[ebs]\nregion = \"us-east-1\"\nendpoint_url = \"{endpoint}\"\nconcurrency = {concurrency}\n{ebs}"
        ),
    )
    .unwrap();
    let d = Daemon::start_in(tmp.path(), &tmp.path().join("ferry.sock"), &env(&config));
    (tmp, d)
}

/// The configuration file, and dummy AWS credentials.
pub(crate) fn env(config: &Path) -> Vec<(&str, &str)> {
    let mut env = vec![("FERRY_CONFIG", config.to_str().unwrap())];
    env.extend(moto::TEST_AWS_ENV);
    env
}

pub(crate) fn restart(d: &mut Daemon) {
    let config = d.dir.join("ferry.toml");
    d.spawn(&env(&config));
}

pub(crate) fn create(d: &Daemon, name: &str, size: &str) {
    d.create(
        name,
        &format!(r#"{{"backend":"ebs","size":"{size}","uid":"1000","mode":"0750"}}"#),
    );
}

/// Waits for the retention pass that follows an Unmount's push (it runs once the Unmount has answered)
/// to be over for generation `newest`: the generations Status lists are recorded at its end.
pub(crate) fn retained(d: &Daemon, name: &str, newest: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = d.get(name)["Status"].clone();
        if status["generations"][0]["generation"].as_u64() == Some(newest) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no retention pass after generation {newest}: {status}\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn generation(d: &Daemon, name: &str) -> Option<u64> {
    d.get(name)["Status"]["generation"].as_u64()
}

/// Deterministic bytes that differ per seed and position and compress poorly.
pub(crate) fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub(crate) fn write_file(path: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn unmount_err(d: &Daemon, name: &str, id: &str) -> String {
    d.err(
        "/VolumeDriver.Unmount",
        &format!(r#"{{"Name":"{name}","ID":"{id}"}}"#),
    )
}

pub(crate) fn mount_err(d: &Daemon, name: &str, id: &str) -> String {
    d.err(
        "/VolumeDriver.Mount",
        &format!(r#"{{"Name":"{name}","ID":"{id}"}}"#),
    )
}

/// The 512 KiB blocks whose contents differ between two images of one size.
fn differing_blocks(a: &Path, b: &Path) -> Vec<u64> {
    let (mut fa, mut fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    let len = fa.metadata().unwrap().len();
    assert_eq!(len, fb.metadata().unwrap().len());
    let (mut ba, mut bb) = (vec![0u8; BLOCK], vec![0u8; BLOCK]);
    let mut out = Vec::new();
    for i in 0..len / BLOCK as u64 {
        fa.read_exact(&mut ba).unwrap();
        fb.read_exact(&mut bb).unwrap();
        if ba != bb {
            out.push(i);
        }
    }
    out
}

/// Runs tar (GNU, from the base system) with these arguments; any failure fails the test.
fn tar(args: &[&str]) {
    let out = std::process::Command::new("tar")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "tar {args:?}: {out:?}");
}

fn image(d: &Daemon, name: &str) -> PathBuf {
    d.state.join("ebs").join(name).join("image")
}

#[test]
fn round_trip_between_two_hosts_against_the_strict_emulator() {
    let rt = runtime();
    let ebs = rt.block_on(StrictEbs::start(7));
    // Throttle every 11th call: every push and pull below must retry its way through.
    ebs.faults().throttle_every.store(11, Ordering::Relaxed);
    let (_ta, a) = host(&ebs.endpoint(), "a", 4);
    let (_tb, b) = host(&ebs.endpoint(), "b", 4);

    create(&a, "shared", "64MiB");
    assert_eq!(generation(&a, "shared"), None, "nothing shipped yet");
    let m = a.mount("shared", "c1");
    let data = pattern(1, 5 * 1024 * 1024 + 123);
    write_file(&m.join("data.bin"), &data);
    std::fs::create_dir(m.join("dir")).unwrap();
    std::os::unix::fs::symlink("data.bin", m.join("dir/link")).unwrap();
    let meta = std::fs::metadata(&m).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 1000);
    a.unmount("shared", "c1");
    assert_eq!(generation(&a, "shared"), Some(1));
    let first = a.get("shared")["Status"]["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(ebs.is_completed(&first));

    // Another host adopts the volume by name and options, and pulls it on mount.
    let err = b.err(
        "/VolumeDriver.Create",
        r#"{"Name":"shared","Opts":{"backend":"ebs","size":"128MiB","uid":"1000","mode":"0750"}}"#,
    );
    assert!(err.contains("size") && err.contains("64MiB"), "{err}");
    create(&b, "shared", "64MiB");
    assert_eq!(generation(&b, "shared"), Some(1));
    let mb = b.mount("shared", "c2");
    assert_eq!(std::fs::read(mb.join("data.bin")).unwrap(), data);
    assert_eq!(
        std::fs::read_link(mb.join("dir/link")).unwrap(),
        PathBuf::from("data.bin")
    );
    let more = pattern(2, 700_000);
    write_file(&mb.join("more.bin"), &more);
    b.unmount("shared", "c2");
    assert_eq!(generation(&b, "shared"), Some(2));

    // The first host's copy is stale now: mounting pulls generation 2 instead of showing old data.
    let m = a.mount("shared", "c3");
    assert_eq!(std::fs::read(m.join("more.bin")).unwrap(), more);
    assert_eq!(std::fs::read(m.join("data.bin")).unwrap(), data);
    assert_eq!(generation(&a, "shared"), Some(2));
    // Nothing written since the pull: ext4 still records the mount in its superblock, and that block
    // (with its backup groups' copies at most) is all that ships.
    let before = ebs.counters().blocks_put.load(Ordering::Relaxed);
    a.unmount("shared", "c3");
    let after = ebs.counters().blocks_put.load(Ordering::Relaxed);
    assert!(
        after - before <= 4,
        "{} blocks for an untouched volume",
        after - before
    );
    assert!(
        ebs.counters().throttled.load(Ordering::Relaxed) > 0,
        "the emulator throttled nothing"
    );
    // A release with nothing to ship (the copy is clean) makes no snapshot: the restart's
    // reconciliation of a released volume starts none.
    let newest = generation(&a, "shared");
    let calls = ebs.counters().blocks_put.load(Ordering::Relaxed);
    let mut a = a;
    a.kill9();
    restart(&mut a);
    assert_eq!(generation(&a, "shared"), newest);
    assert_eq!(ebs.counters().blocks_put.load(Ordering::Relaxed), calls);

    // No secret reaches the log or Status.
    for text in [a.log_text(), b.log_text(), a.get("shared").to_string()] {
        assert!(!text.contains(moto::TEST_SECRET));
    }
    drop(rt);
}

#[test]
fn incremental_push_ships_exactly_the_changed_blocks() {
    let rt = runtime();
    let ebs = rt.block_on(StrictEbs::start(1000));
    let (_t, d) = host(&ebs.endpoint(), "incr", 16);
    create(&d, "big", "1GiB");
    let m = d.mount("big", "c1");
    write_file(&m.join("file.bin"), &pattern(3, 64 * 1024 * 1024));
    d.unmount("big", "c1");
    assert_eq!(generation(&d, "big"), Some(1));
    let shipped_image = d.dir.join("gen1.img");
    std::fs::copy(image(&d, "big"), &shipped_image).unwrap();

    // Change 1 MiB in the middle of the file, in place.
    let m = d.mount("big", "c2");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.join("file.bin"))
        .unwrap();
    f.seek(SeekFrom::Start(32 * 1024 * 1024)).unwrap();
    f.write_all(&pattern(4, 1024 * 1024)).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let put_before = ebs.counters().blocks_put.load(Ordering::Relaxed);
    d.unmount("big", "c2");
    assert_eq!(generation(&d, "big"), Some(2));
    let snapshot = d.get("big")["Status"]["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let put = ebs.counters().blocks_put.load(Ordering::Relaxed) - put_before;

    // Exactly the blocks that differ between the two images, found independently, were shipped: the
    // 1 MiB of data (2 or 3 blocks) plus what ext4 changed around it (inode, journal).
    let differ = differing_blocks(&shipped_image, &image(&d, "big"));
    assert_eq!(ebs.own_blocks(&snapshot), differ);
    assert_eq!(put, differ.len() as u64);
    assert!(differ.len() >= 2 && differ.len() < 40, "{differ:?}");
    drop(rt);
}

#[test]
fn a_stale_base_is_refused_loudly_and_the_local_copy_kept() {
    let rt = runtime();
    let ebs = rt.block_on(StrictEbs::start(100));
    let (_ta, a) = host(&ebs.endpoint(), "sa", 4);
    let (_tb, b) = host(&ebs.endpoint(), "sb", 4);
    create(&a, "v", "32MiB");
    let m = a.mount("v", "x");
    write_file(&m.join("base"), b"base");
    a.unmount("v", "x");
    create(&b, "v", "32MiB");

    // Both hosts mount generation 1 at once (nothing can stop that without a shared catalog).
    let ma = a.mount("v", "a1");
    let mb = b.mount("v", "b1");
    write_file(&ma.join("from-a"), b"a");
    write_file(&mb.join("from-b"), b"b");
    a.unmount("v", "a1");
    assert_eq!(generation(&a, "v"), Some(2));
    let err = unmount_err(&b, "v", "b1");
    assert!(
        err.contains("changed elsewhere") && err.contains("generation 2") && err.contains("kept"),
        "{err}"
    );
    // Nothing of b's was shipped, the newest snapshot is still a's, and b's data is still on b.
    assert_eq!(generation(&a, "v"), Some(2));
    let health = b.get("v")["Status"].clone();
    assert_eq!(health["health"], "conflict", "{health}");
    let err = mount_err(&b, "v", "b2");
    assert!(err.contains("changed elsewhere"), "{err}");
    // The advice deletes nothing: no "remove" of the volume, whose Remove deletes a's snapshots.
    assert!(
        err.contains("ferry ebs set-aside v") && !err.contains("remove"),
        "{err}"
    );
    let copy: Value =
        serde_json::from_slice(&std::fs::read(b.state.join("ebs/v/copy.json")).unwrap()).unwrap();
    assert_eq!(copy["dirty"], true);
    assert_eq!(copy["generation"], 1);

    // The conflict survives a restart: Status, `ferry ls` and `ferry inspect` still say so.
    let mut b = b;
    b.kill9();
    restart(&mut b);
    let status = b.get("v")["Status"].clone();
    assert_eq!(status["health"], "conflict", "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .unwrap()
            .contains("changed elsewhere"),
        "{status}"
    );
    let ls = operator(&b, &["ls"]);
    assert!(
        ls.lines()
            .any(|l| l.starts_with("v ") && l.contains("conflict")),
        "{ls}"
    );
    let inspect = operator(&b, &["inspect", "v"]);
    assert!(
        inspect.contains("conflict") && inspect.contains("changed elsewhere"),
        "{inspect}"
    );

    // The documented recovery, literally: `ferry ebs set-aside v`, copy out what is needed from the
    // printed directory with a read-only loop mount, and mount again to take the newest data.
    let out = operator(&b, &["ebs", "set-aside", "v"]);
    let moved = out
        .split("was moved to ")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no path in {out}"));
    assert!(moved.join("image").is_file(), "{out}");
    let look = b.dir.join("rescued");
    std::fs::create_dir(&look).unwrap();
    run(&["mount", "-o", "loop,ro"], &[&moved.join("image"), &look]);
    let rescued = std::fs::read(look.join("from-b"));
    run(&["umount"], &[&look]);
    assert_eq!(rescued.unwrap(), b"b");
    assert_eq!(b.get("v")["Status"]["health"], "ok");
    let mb = b.mount("v", "b3");
    assert_eq!(std::fs::read(mb.join("from-a")).unwrap(), b"a");
    assert!(!mb.join("from-b").exists());
    b.unmount("v", "b3");
    assert_eq!(generation(&b, "v"), Some(3));
    drop(rt);
}

/// A `ferry` operator command against a daemon's admin socket; its standard output.
fn operator(d: &Daemon, args: &[&str]) -> String {
    let out = std::process::Command::new(common::ferry_bin())
        .args(args)
        .arg("--state-dir")
        .arg(&d.state)
        .arg("--config")
        .arg(d.dir.join("ferry.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ferry {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a program with fixed arguments and then paths; it must succeed.
fn run(args: &[&str], paths: &[&Path]) {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .args(paths)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?} {paths:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_failed_mount_leaves_the_local_copy_unchanged() {
    let rt = runtime();
    let ebs = rt.block_on(StrictEbs::start(100));
    let (_ta, a) = host(&ebs.endpoint(), "fa", 4);
    let (_tb, b) = host(&ebs.endpoint(), "fb", 4);
    create(&a, "f", "32MiB");
    let m = a.mount("f", "x");
    write_file(&m.join("one"), b"1");
    a.unmount("f", "x");
    assert_eq!(generation(&a, "f"), Some(1));

    // The mount itself fails (something else sits where the mountpoint goes).
    let mnt = a.state.join("ebs/f/mnt");
    std::fs::remove_dir(&mnt).unwrap();
    write_file(&mnt, b"in the way");
    let err = mount_err(&a, "f", "y");
    assert!(err.contains("mnt"), "{err}");
    let copy: Value =
        serde_json::from_slice(&std::fs::read(a.state.join("ebs/f/copy.json")).unwrap()).unwrap();
    assert_eq!(copy["dirty"], false, "{copy}");
    std::fs::remove_file(&mnt).unwrap();

    // Another host ships the next generation; this host's untouched copy just takes it.
    create(&b, "f", "32MiB");
    let mb = b.mount("f", "z");
    write_file(&mb.join("two"), b"2");
    b.unmount("f", "z");
    let m = a.mount("f", "y2");
    assert_eq!(std::fs::read(m.join("two")).unwrap(), b"2");
    a.unmount("f", "y2");
    assert_eq!(a.get("f")["Status"]["health"], "ok");
    drop(rt);
}

#[test]
fn a_deleted_local_copy_is_pulled_again_and_never_advises_removal() {
    let rt = runtime();
    let ebs = rt.block_on(StrictEbs::start(100));
    let (_t, a) = host(&ebs.endpoint(), "del", 4);
    create(&a, "d", "32MiB");
    let m = a.mount("d", "x");
    write_file(&m.join("kept"), b"shipped");
    a.unmount("d", "x");
    // Once the retention pass after the push is over: it writes into that directory.
    retained(&a, "d", 1);
    // Deleting the volume's directory under STATE_DIR/ebs (as the troubleshooting guide allows for a
    // copy with nothing unshipped) makes the next Mount pull the newest snapshot.
    std::fs::remove_dir_all(a.state.join("ebs/d")).unwrap();
    let m = a.mount("d", "y");
    assert_eq!(std::fs::read(m.join("kept")).unwrap(), b"shipped");
    a.unmount("d", "y");

    // A damaged copy.json: the documented recovery is `ferry ebs set-aside`, then mount.
    std::fs::write(a.state.join("ebs/d/copy.json"), b"{not json").unwrap();
    let err = mount_err(&a, "d", "z");
    assert!(
        err.contains("unreadable") && err.contains("ferry ebs set-aside d"),
        "{err}"
    );
    let out = operator(&a, &["ebs", "set-aside", "d"]);
    assert!(out.contains("was moved to"), "{out}");
    let m = a.mount("d", "z2");
    assert_eq!(std::fs::read(m.join("kept")).unwrap(), b"shipped");
    a.unmount("d", "z2");

    // Never shipped: the directory held the only copy, and the error says so without advising a Remove.
    // The documented recovery, run literally: restore the directory from a backup of the state directory
    // taken with the plugin stopped (operations.md, "Backups").
    create(&a, "n", "32MiB");
    let mut a = a;
    let backup = a.dir.join("backup.tar");
    a.terminate();
    tar(&[
        "-C",
        a.state.to_str().unwrap(),
        "--sparse",
        "-cf",
        backup.to_str().unwrap(),
        ".",
    ]);
    restart(&mut a);
    std::fs::remove_dir_all(a.state.join("ebs/n")).unwrap();
    let err = mount_err(&a, "n", "y");
    assert!(
        err.contains("missing") && err.contains("backup") && !err.contains("remove"),
        "{err}"
    );
    a.terminate();
    tar(&[
        "-C",
        a.state.to_str().unwrap(),
        "-xf",
        backup.to_str().unwrap(),
        "./ebs/n",
    ]);
    restart(&mut a);
    let m = a.mount("n", "restored");
    assert!(m.is_dir());
    a.unmount("n", "restored");
    drop(rt);
}

#[test]
fn a_crash_during_push_or_pull_is_finished_after_restart() {
    let rt = runtime();
    let ebs = rt.block_on(StrictEbs::start(50));
    let (_ta, mut a) = host(&ebs.endpoint(), "ca", 2);
    let (_tb, mut b) = host(&ebs.endpoint(), "cb", 2);
    create(&a, "c", "256MiB");
    let m = a.mount("c", "x");
    let data = pattern(5, 24 * 1024 * 1024);
    write_file(&m.join("data"), &data);

    // Slow every call so the push is still running when the plugin dies.
    ebs.faults().latency_ms.store(40, Ordering::Relaxed);
    let socket = a.socket.clone();
    let unmount = std::thread::spawn(move || {
        common::raw_call(
            &socket,
            "POST",
            "/VolumeDriver.Unmount",
            br#"{"Name":"c","ID":"x"}"#,
        )
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while ebs.counters().blocks_put.load(Ordering::Relaxed) < 5 {
        assert!(Instant::now() < deadline, "the push never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    a.kill9();
    let _ = unmount.join();
    ebs.faults().latency_ms.store(0, Ordering::Relaxed);
    // Nothing was completed, so no host can take the partial snapshot as the volume: another host is
    // told a push is in flight instead of getting an empty or partial volume.
    let err = b.err(
        "/VolumeDriver.Create",
        r#"{"Name":"c","Opts":{"backend":"ebs","size":"256MiB","uid":"1000","mode":"0750"}}"#,
    );
    assert!(err.contains("still being written"), "{err}");

    // Restart with slow calls: the socket opens at once while the interrupted unmount finishes in the
    // background. Get answers within 1 s before the push is done, and Mount of the volume says busy.
    ebs.faults().latency_ms.store(150, Ordering::Relaxed);
    restart(&mut a);
    let asked = Instant::now();
    let status = a.get("c")["Status"].clone();
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(status["generation"], Value::Null, "{status}");
    let err = mount_err(&a, "c", "early");
    assert!(
        err.contains("finishing a push or pull interrupted by a restart"),
        "{err}"
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while generation(&a, "c").is_none() {
        assert!(
            Instant::now() < deadline,
            "the push never finished: {}",
            a.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    ebs.faults().latency_ms.store(0, Ordering::Relaxed);
    assert_eq!(generation(&a, "c"), Some(1), "{}", a.log_text());
    assert!(
        a.log_text().contains("interrupted push"),
        "{}",
        a.log_text()
    );
    // Done: Mount works again (the record may still be settling for a moment after the generation).
    let ma = mount_when_ready(&a, "c", "late");
    assert_eq!(std::fs::read(ma.join("data")).unwrap(), data);
    a.unmount("c", "late");

    create(&b, "c", "256MiB");
    ebs.faults().latency_ms.store(40, Ordering::Relaxed);
    let socket = b.socket.clone();
    let mount = std::thread::spawn(move || {
        common::raw_call(
            &socket,
            "POST",
            "/VolumeDriver.Mount",
            br#"{"Name":"c","ID":"y"}"#,
        )
    });
    let got = ebs.counters().blocks_got.load(Ordering::Relaxed);
    while ebs.counters().blocks_got.load(Ordering::Relaxed) < got + 5 {
        assert!(Instant::now() < deadline, "the pull never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    b.kill9();
    let _ = mount.join();
    ebs.faults().latency_ms.store(0, Ordering::Relaxed);
    assert!(
        !image(&b, "c").exists(),
        "a half-pulled image must never look like a local copy"
    );
    // The interrupted mount is settled in the background too; then the volume mounts.
    restart(&mut b);
    let mb = mount_when_ready(&b, "c", "y2");
    assert_eq!(std::fs::read(mb.join("data")).unwrap(), data);
    b.unmount("c", "y2");
    drop(rt);
}

/// The completed snapshots the emulator holds for one generation of one volume.
fn snapshots_of(ebs: &StrictEbs, volume: &str, generation: u64) -> Vec<String> {
    ebs.completed_snapshots(volume, generation)
}

#[test]
fn simultaneous_unmounts_on_two_hosts_leave_one_generation() {
    let rt = runtime();
    let ebs = rt.block_on(StrictEbs::start(100));
    let (_ta, a) = host(&ebs.endpoint(), "ra", 4);
    let (_tb, b) = host(&ebs.endpoint(), "rb", 4);
    create(&a, "r", "32MiB");
    let m = a.mount("r", "x");
    write_file(&m.join("base"), b"base");
    a.unmount("r", "x");
    create(&b, "r", "32MiB");
    let ma = a.mount("r", "a1");
    let mb = b.mount("r", "b1");
    write_file(&ma.join("from-a"), &pattern(11, 2 * 1024 * 1024));
    write_file(&mb.join("from-b"), &pattern(12, 2 * 1024 * 1024));

    // Every call takes 200 ms, so both pushes read the same newest generation before either starts its
    // snapshot: both ship generation 2 at once.
    ebs.faults().latency_ms.store(200, Ordering::Relaxed);
    let unmount = |d: &Daemon, id: &'static str| {
        let socket = d.socket.clone();
        std::thread::spawn(move || {
            common::raw_call(
                &socket,
                "POST",
                "/VolumeDriver.Unmount",
                format!(r#"{{"Name":"r","ID":"{id}"}}"#).as_bytes(),
            )
        })
    };
    let (ua, ub) = (unmount(&a, "a1"), unmount(&b, "b1"));
    let (ra, rb) = (ua.join().unwrap(), ub.join().unwrap());
    ebs.faults().latency_ms.store(0, Ordering::Relaxed);

    // Exactly one generation 2 survives; the other host reports the race and keeps its data.
    let survivors = snapshots_of(&ebs, "r", 2);
    assert_eq!(survivors.len(), 1, "{survivors:?} {ra:?} {rb:?}");
    let a_won = ra.0 == 200;
    let (winner, loser, lost) = if a_won { (&a, &b, rb) } else { (&b, &a, ra) };
    assert_eq!(lost.0, 500, "{lost:?}");
    assert!(
        lost.1.contains("at the same moment") && lost.1.contains("ferry ebs set-aside r"),
        "{lost:?}"
    );
    assert_eq!(generation(winner, "r"), Some(2));
    assert_eq!(
        winner.get("r")["Status"]["snapshot"].as_str(),
        Some(survivors[0].as_str())
    );
    let copy: Value =
        serde_json::from_slice(&std::fs::read(loser.state.join("ebs/r/copy.json")).unwrap())
            .unwrap();
    assert_eq!(copy["dirty"], true, "{copy}");
    assert_eq!(copy["generation"], 1, "{copy}");
    assert!(loser.state.join("ebs/r/image").is_file());
    assert_eq!(loser.get("r")["Status"]["health"], "conflict");

    // The conflict is durable: after a restart the loser still says so, and refuses to mount its copy.
    let mut loser = if a_won { b } else { a };
    loser.kill9();
    restart(&mut loser);
    assert_eq!(loser.get("r")["Status"]["health"], "conflict");
    let err = mount_err(&loser, "r", "again");
    assert!(err.contains("changed elsewhere"), "{err}");
    // The documented recovery: set the copy aside (its data is there), and mount the winner's data.
    let out = operator(&loser, &["ebs", "set-aside", "r"]);
    assert!(out.contains("was moved to"), "{out}");
    let m = loser.mount("r", "after");
    let (won, lost) = if a_won {
        ("from-a", "from-b")
    } else {
        ("from-b", "from-a")
    };
    assert!(m.join(won).is_file() && !m.join(lost).exists());
    loser.unmount("r", "after");
    assert_eq!(loser.get("r")["Status"]["health"], "ok");
    drop(rt);
}

#[test]
fn remove_on_another_host_is_refused_while_the_volume_is_mounted() {
    let rt = runtime();
    let ebs = rt.block_on(StrictEbs::start(100));
    let (_ta, a) = host(&ebs.endpoint(), "ma", 4);
    let (_tb, b) = host(&ebs.endpoint(), "mb", 4);
    create(&a, "held", "32MiB");
    let m = a.mount("held", "x");
    write_file(&m.join("f"), b"first");
    a.unmount("held", "x");
    create(&b, "held", "32MiB");

    // a mounts it again: its newest snapshot carries a's "mounted" tag, and b's Remove is refused.
    let m = a.mount("held", "y");
    let first = a.get("held")["Status"]["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let host_id = std::fs::read_to_string(a.state.join("host-id")).unwrap();
    // One key per host, so that two hosts on one snapshot never clear each other's.
    let key = format!("ferry:mounted:{}", host_id.trim());
    let tag = ebs
        .tags(&first)
        .into_iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v);
    assert!(
        tag.as_deref().is_some_and(|t| t.contains(host_id.trim())),
        "{tag:?}"
    );
    let err = b.err("/VolumeDriver.Remove", r#"{"Name":"held"}"#);
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert!(
        err.contains("still mounted on host")
            && err.contains(hostname.trim())
            && err.contains(host_id.trim())
            && err.contains("unmount it there first"),
        "{err}"
    );
    assert!(ebs.is_completed(&first), "nothing may be deleted");
    assert_eq!(ebs.counters().deleted.load(Ordering::Relaxed), 0);
    assert_eq!(b.get("held")["Status"]["state"], "ready");

    // Once a unmounts (shipping generation 2), the tag is gone and b's Remove goes ahead.
    write_file(&m.join("g"), b"second");
    a.unmount("held", "y");
    assert!(!ebs
        .tags(&first)
        .iter()
        .any(|(k, _)| k.starts_with("ferry:mounted")));
    b.remove("held");
    assert!(snapshots_of(&ebs, "held", 1).is_empty() && snapshots_of(&ebs, "held", 2).is_empty());
    drop(rt);
}

/// The recovery troubleshooting.md gives for a host that died with the volume mounted: its tag stops being
/// refreshed, and once it is 120 s old the Remove refused before goes ahead. The two minutes are not slept:
/// the dead host's tag is rewritten with a time 122 s earlier, which is all the passing of time changes
/// for a tag nobody refreshes (Ferry judges the age from the time written in it).
#[test]
fn remove_elsewhere_goes_ahead_once_a_dead_hosts_tag_is_stale() {
    let rt = runtime();
    let ebs = rt.block_on(StrictEbs::start(100));
    let (_ta, mut a) = host(&ebs.endpoint(), "da", 4);
    let (_tb, b) = host(&ebs.endpoint(), "db", 4);
    create(&a, "orphaned", "32MiB");
    let m = a.mount("orphaned", "x");
    write_file(&m.join("f"), b"first");
    a.unmount("orphaned", "x");
    create(&b, "orphaned", "32MiB");
    a.mount("orphaned", "y");
    // a dies with the volume mounted: nothing refreshes or deletes its tag any more.
    a.kill9();
    let err = b.err("/VolumeDriver.Remove", r#"{"Name":"orphaned"}"#);
    assert!(
        err.contains("still mounted on host") && err.contains("120 s"),
        "{err}"
    );
    assert_eq!(ebs.counters().deleted.load(Ordering::Relaxed), 0);
    // "wait until its tag is 120 s old and remove the volume again"
    let aged = ferry::backend::ebs::MOUNTED_STALE.as_secs() + 2;
    let mut rewritten = 0;
    for id in ebs.snapshot_ids() {
        let Some((key, value)) = ebs
            .tags(&id)
            .into_iter()
            .find(|(k, _)| k.starts_with("ferry:mounted:"))
        else {
            continue;
        };
        let (at, rest) = value
            .split_once(' ')
            .expect("a mounted tag starts with its time");
        let at: u64 = at.parse().expect("a mounted tag's time is a number");
        ebs.set_tag(&id, &key, &format!("{} {rest}", at - aged));
        rewritten += 1;
    }
    assert!(rewritten > 0, "the dead host left no mounted tag to age");
    b.remove("orphaned");
    assert!(snapshots_of(&ebs, "orphaned", 1).is_empty());
    drop(rt);
}

/// A container that stopped while the plugin was down never sends its Unmount: at restart, where no mount
/// namespace but Ferry's holds the image's filesystem, the mount ID is released, what was written is
/// shipped, and the volume can be removed; one a container still holds keeps its ID.
#[test]
fn mount_ids_of_containers_gone_while_down_are_released_and_shipped_at_start() {
    let rt = runtime();
    let ebs = rt.block_on(StrictEbs::start(100));
    let (_t, mut d) = host(&ebs.endpoint(), "stale", 4);
    create(&d, "gone", "32MiB");
    create(&d, "kept", "32MiB");
    let gone = d.mount("gone", "c1");
    write_file(&gone.join("f"), b"written before the crash");
    let kept = d.mount("kept", "c2");
    let container = common::NamespaceHolder::start();
    d.kill9();
    // "gone"'s container stops while the plugin is down; "kept"'s runs on (it holds both in its
    // namespace, so let it go of "gone" first).
    let out = std::process::Command::new("nsenter")
        .arg("-t")
        .arg(container.pid().to_string())
        .args(["-m", "--", "umount", "-l"])
        .arg(&gone)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    restart(&mut d);
    let deadline = Instant::now() + Duration::from_secs(60);
    while generation(&d, "gone") != Some(1) || d.get("gone")["Status"]["active_mounts"] != 0 {
        assert!(Instant::now() < deadline, "{}", d.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(d
        .log_text()
        .contains("released mount IDs left by containers"));
    assert_eq!(d.get("kept")["Status"]["active_mounts"], 1);
    assert!(common::is_mounted(&kept));
    d.remove("gone");
    assert!(snapshots_of(&ebs, "gone", 1).is_empty());
    container.stop();
    d.unmount("kept", "c2");
    drop(rt);
}

/// Mounts once the volume is no longer busy finishing an interrupted operation; any other error fails.
fn mount_when_ready(d: &Daemon, name: &str, id: &str) -> PathBuf {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, body) = d.call(
            "/VolumeDriver.Mount",
            &format!(r#"{{"Name":"{name}","ID":"{id}"}}"#),
        );
        if code == 200 {
            return PathBuf::from(body["Mountpoint"].as_str().unwrap());
        }
        let err = body["Err"].as_str().unwrap_or_default();
        assert!(
            err.contains("interrupted by a restart") && Instant::now() < deadline,
            "{body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn remove_deletes_the_snapshots_and_refuses_while_mounted() {
    let rt = runtime();
    let ebs = rt.block_on(StrictEbs::start(100));
    let (_t, d) = host(&ebs.endpoint(), "rm", 4);
    create(&d, "gone", "32MiB");
    let m = d.mount("gone", "x");
    write_file(&m.join("f"), b"data");
    // A container holds the mount in its own namespace (without one, the ID is provably stale and Remove
    // releases it).
    let container = common::NamespaceHolder::start();
    let err = d.err("/VolumeDriver.Remove", r#"{"Name":"gone"}"#);
    assert!(err.contains("in use") || err.contains("mounted"), "{err}");
    container.stop();
    d.unmount("gone", "x");
    let m = d.mount("gone", "x2");
    write_file(&m.join("g"), b"more");
    d.unmount("gone", "x2");
    assert_eq!(generation(&d, "gone"), Some(2));
    d.remove("gone");
    assert_eq!(ebs.counters().deleted.load(Ordering::Relaxed), 2);
    assert!(!d.state.join("ebs/gone").exists());
    // The name starts afresh.
    create(&d, "gone", "32MiB");
    assert_eq!(generation(&d, "gone"), None);

    // A volume removed on another host and made again there starts at generation 1 again: a copy of
    // the old generation 1 here must be replaced by the new data, not mounted as if it were current.
    let (_t2, other) = host(&ebs.endpoint(), "rm2", 4);
    let m = d.mount("gone", "y");
    write_file(&m.join("which"), b"old");
    d.unmount("gone", "y");
    assert_eq!(generation(&d, "gone"), Some(1));
    create(&other, "gone", "32MiB");
    other.remove("gone");
    create(&other, "gone", "32MiB");
    let m = other.mount("gone", "z");
    write_file(&m.join("which"), b"new");
    other.unmount("gone", "z");
    assert_eq!(generation(&other, "gone"), Some(1));
    let m = d.mount("gone", "y2");
    assert_eq!(std::fs::read(m.join("which")).unwrap(), b"new");
    d.unmount("gone", "y2");
    drop(rt);
}

#[test]
fn round_trip_through_moto() {
    let moto = moto::Moto::start();
    let (_ta, a) = moto_host(&moto, "ma", 8);
    let (_tb, b) = moto_host(&moto, "mb", 8);
    create(&a, "mv", "64MiB");
    let m = a.mount("mv", "c1");
    let data = pattern(7, 3 * 1024 * 1024);
    write_file(&m.join("one"), &data);
    a.unmount("mv", "c1");
    let m = a.mount("mv", "c2");
    write_file(&m.join("two"), b"second generation");
    a.unmount("mv", "c2");
    assert_eq!(generation(&a, "mv"), Some(2), "{}", moto.log());

    // moto's second snapshot holds only its own blocks: the pull must read the chain to find "one".
    create(&b, "mv", "64MiB");
    let mb = b.mount("mv", "c3");
    assert_eq!(std::fs::read(mb.join("one")).unwrap(), data);
    assert_eq!(std::fs::read(mb.join("two")).unwrap(), b"second generation");
    b.unmount("mv", "c3");
    b.remove("mv");
    let err = a.err("/VolumeDriver.Mount", r#"{"Name":"mv","ID":"c4"}"#);
    assert!(err.contains("snapshots were deleted"), "{err}");
    // The documented way out deletes nothing: set this host's copy aside, and mount what EBS holds now
    // (nothing: a new, empty filesystem).
    assert!(err.contains("ferry ebs set-aside mv"), "{err}");
    let out = operator(&a, &["ebs", "set-aside", "mv"]);
    assert!(out.contains("was moved to"), "{out}");
    let m = a.mount("mv", "c5");
    assert!(!m.join("one").exists());
    a.unmount("mv", "c5");
}

/// The blocks of the last "pulled the newest snapshot" line of a daemon's log, and whether it patched.
pub(crate) fn last_pull(d: &Daemon) -> (u64, bool) {
    let log = d.log_text();
    let line = log
        .lines()
        .rfind(|l| l.contains("pulled the newest snapshot"))
        .unwrap_or_else(|| panic!("no pull in the log:\n{log}"));
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k} in {line}"))
            .trim_matches('"')
            .to_string()
    };
    (field("blocks").parse().unwrap(), field("patched") == "true")
}

/// A host whose copy is one generation behind fetches only what the newer snapshot holds (moto lists a
/// snapshot's own blocks), written into its copy in place, and ends with exactly the other host's files.
#[test]
fn a_copy_one_generation_behind_is_patched_with_the_changed_blocks_only() {
    let moto = moto::Moto::start();
    let (_ta, a) = moto_host(&moto, "pa", 8);
    let (_tb, b) = moto_host(&moto, "pb", 8);
    create(&a, "pv", "64MiB");
    let m = a.mount("pv", "c1");
    write_file(&m.join("base"), &pattern(3, 8 * 1024 * 1024));
    write_file(&m.join("gone"), &pattern(4, 1024 * 1024));
    a.unmount("pv", "c1");
    create(&b, "pv", "64MiB");
    b.mount("pv", "b1");
    b.unmount("pv", "b1");
    let (full, patched) = last_pull(&b);
    assert!(
        !patched && full >= 18,
        "the first pull is whole: {full} blocks"
    );
    // Generation 2 on host a: one file rewritten, one deleted, one added.
    let m = a.mount("pv", "c2");
    write_file(&m.join("base"), &pattern(5, 8 * 1024 * 1024));
    std::fs::remove_file(m.join("gone")).unwrap();
    write_file(&m.join("new"), b"generation two");
    a.unmount("pv", "c2");
    let mb = b.mount("pv", "b2");
    let (blocks, patched) = last_pull(&b);
    assert!(patched, "host b patched its copy");
    assert!(
        blocks < full,
        "patched {blocks} blocks, a whole pull is {full}"
    );
    assert_eq!(
        std::fs::read(mb.join("base")).unwrap(),
        pattern(5, 8 * 1024 * 1024)
    );
    assert!(!mb.join("gone").exists());
    assert_eq!(std::fs::read(mb.join("new")).unwrap(), b"generation two");
    b.unmount("pv", "b2");
}

#[test]
fn remove_elsewhere_is_refused_while_mounted_through_moto() {
    let moto = moto::Moto::start();
    let (_ta, a) = moto_host(&moto, "mra", 4);
    let (_tb, b) = moto_host(&moto, "mrb", 4);
    create(&a, "mh", "32MiB");
    let m = a.mount("mh", "x");
    write_file(&m.join("f"), b"first");
    a.unmount("mh", "x");
    create(&b, "mh", "32MiB");
    let m = a.mount("mh", "y");
    let err = b.err("/VolumeDriver.Remove", r#"{"Name":"mh"}"#);
    let host_id = std::fs::read_to_string(a.state.join("host-id")).unwrap();
    assert!(
        err.contains("still mounted on host") && err.contains(host_id.trim()),
        "{err}\n{}",
        moto.log()
    );
    write_file(&m.join("g"), b"second");
    a.unmount("mh", "y");
    assert_eq!(generation(&a, "mh"), Some(2));
    b.remove("mh");
    // Gone from EBS: a's next mount is told so, not given stale data.
    let err = mount_err(&a, "mh", "z");
    assert!(err.contains("snapshots were deleted"), "{err}");
}

/// `ferry checkpoint` against a daemon's admin socket.
fn checkpoint_cli(d: &Daemon, name: &str) -> String {
    let out = std::process::Command::new(common::ferry_bin())
        .args(["checkpoint", name, "--state-dir"])
        .arg(&d.state)
        .arg("--config")
        .arg(d.dir.join("ferry.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ferry checkpoint: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[test]
fn checkpoint_ships_a_mounted_volume_and_metrics_count_the_blocks() {
    let rt = runtime();
    let ebs = rt.block_on(StrictEbs::start(100));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (_ta, a) = host_with(
        &ebs.endpoint(),
        "cpa",
        4,
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let (_tb, mut b) = host(&ebs.endpoint(), "cpb", 4);
    create(&a, "live", "64MiB");
    let m = a.mount("live", "c1");
    let data = pattern(9, 2 * 1024 * 1024);
    write_file(&m.join("early"), &data);

    // While the container still runs, a checkpoint ships what it wrote.
    let out = checkpoint_cli(&a, "live");
    assert!(out.contains("generation 1"), "{out}");
    assert_eq!(generation(&a, "live"), Some(1));
    assert!(
        a.log_text()
            .contains("checkpoint: changed blocks copied aside"),
        "{}",
        a.log_text()
    );
    // The filesystem was thawed: the container can keep writing.
    write_file(&m.join("late"), b"after the checkpoint");
    let scraped = scrape(port);
    let shipped = metric(&scraped, "ferry_shipped_blocks_total{backend=\"ebs\"}");
    assert_eq!(shipped, ebs.counters().blocks_put.load(Ordering::Relaxed));
    assert_eq!(
        metric(&scraped, "ferry_shipped_bytes_total{backend=\"ebs\"}"),
        shipped * BLOCK as u64
    );

    // Another host sees the checkpointed data (a host crash now would lose only "late").
    create(&b, "live", "64MiB");
    let mb = b.mount("live", "r");
    assert_eq!(std::fs::read(mb.join("early")).unwrap(), data);
    assert!(!mb.join("late").exists());
    // That host goes away without shipping (its mount alone changed the superblock).
    b.kill9();

    // The last unmount ships the rest as the next generation, on top of the checkpoint.
    a.unmount("live", "c1");
    assert_eq!(generation(&a, "live"), Some(2));
    assert!(metric(&scrape(port), "ferry_shipped_blocks_total{backend=\"ebs\"}") > shipped);
    drop(rt);
}

#[test]
fn without_credentials_the_error_says_so_and_where_it_looked() {
    let rt = runtime();
    let ebs = rt.block_on(StrictEbs::start(7));
    let tmp = tempfile::Builder::new()
        .prefix("ferry-ebs-nocreds")
        .tempdir()
        .unwrap();
    let config = tmp.path().join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            "[ebs]\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\n",
            ebs.endpoint()
        ),
    )
    .unwrap();
    // No credentials anywhere: blank keys count as unset, the files do not exist, no IMDS. (Blank
    // container-provider variables would count as a broken configuration, so they are left alone.)
    let creds = tmp.path().join("no-credentials");
    let aws_config = tmp.path().join("no-config");
    let env = [
        ("FERRY_CONFIG", config.to_str().unwrap()),
        ("AWS_ACCESS_KEY_ID", ""),
        ("AWS_SECRET_ACCESS_KEY", ""),
        ("AWS_SESSION_TOKEN", ""),
        ("AWS_SHARED_CREDENTIALS_FILE", creds.to_str().unwrap()),
        ("AWS_CONFIG_FILE", aws_config.to_str().unwrap()),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    let d = Daemon::start_in(tmp.path(), &tmp.path().join("ferry.sock"), &env);
    let err = d.err(
        "/VolumeDriver.Create",
        r#"{"Name":"nocreds","Opts":{"backend":"ebs","size":"64MiB"}}"#,
    );
    assert!(
        err.contains("no AWS credentials for EBS DescribeSnapshots of volume nocreds")
            && err.contains("the credential chain found none")
            && err.contains("AWS_ACCESS_KEY_ID")
            && err.contains(&format!("{} and {}", creds.display(), aws_config.display()))
            && err.contains("instance role"),
        "{err}"
    );
    assert!(!err.contains("network"), "{err}");
    // Nothing was created.
    let (status, _) = d.call("/VolumeDriver.Get", r#"{"Name":"nocreds"}"#);
    assert_ne!(status, 200);
}

//! Bounded ebs history against the strict EBS emulator, which behaves as EBS does where moto does not: a
//! snapshot lists and reads what it inherits, ListChangedBlocks compares a snapshot with an ancestor, and a
//! deleted parent's blocks live on in its children. Two daemons with separate state directories stand in
//! for two hosts; the emulator counts every block read, so "only what changed" is checked exactly.

use crate::common::{self, Daemon};
use crate::ebs_backend::{
    create, generation, host_lines, last_pull, pattern, restart, retained, runtime, write_file,
};
use crate::ebs_strict::StrictEbs;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A host on the emulator with these extra `[ebs]` lines.
fn host(
    ebs: &StrictEbs,
    label: &str,
    concurrency: usize,
    lines: &str,
) -> (tempfile::TempDir, Daemon) {
    host_lines(&ebs.endpoint(), label, concurrency, "", lines)
}

/// Rewrites a host's `[ebs]` lines (its configuration file) and restarts it.
fn reconfigure(ebs: &StrictEbs, d: &mut Daemon, concurrency: usize, lines: &str) {
    d.terminate();
    std::fs::write(
        d.dir.join("ferry.toml"),
        format!(
            "[ebs]\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\nconcurrency = {concurrency}\n{lines}",
            ebs.endpoint()
        ),
    )
    .unwrap();
    restart(d);
}

/// `ferry prune NAME` against a daemon, which must succeed; its output (JSON with `json`).
fn prune(d: &Daemon, name: &str, json: bool) -> String {
    let config = d.dir.join("ferry.toml");
    let mut args = vec!["prune", name, "--config", config.to_str().unwrap()];
    if json {
        args.push("--json");
    }
    let out = common::ferry(&args, &d.state);
    assert_eq!(out.code, 0, "{}", out.stderr);
    out.stdout
}

fn snapshot(d: &Daemon, name: &str) -> String {
    d.get(name)["Status"]["snapshot"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Every file the model holds reads back from `mp` exactly.
fn check(mp: &Path, model: &BTreeMap<String, Vec<u8>>) {
    for (name, data) in model {
        let got = std::fs::read(mp.join(name)).unwrap();
        assert!(got == *data, "{name} differs ({} bytes)", got.len());
    }
}

/// One generation written on `d`: `len` bytes at `offset` of the file "base" rewritten in place, and a
/// small file of its own.
fn round(
    d: &Daemon,
    name: &str,
    model: &mut BTreeMap<String, Vec<u8>>,
    seed: u64,
    offset: usize,
    len: usize,
) {
    let mp = d.mount(name, "w");
    let data = pattern(seed, len);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(mp.join("base"))
        .unwrap();
    f.write_all_at(&data, offset as u64).unwrap();
    f.sync_all().unwrap();
    drop(f);
    model.get_mut("base").unwrap()[offset..offset + len].copy_from_slice(&data);
    let small = format!("g{seed}");
    write_file(&mp.join(&small), small.as_bytes());
    model.insert(small.clone(), small.into_bytes());
    d.unmount(name, "w");
}

/// A host one generation behind, and one ten generations behind, read exactly the blocks the newer
/// generations wrote (counted by the emulator), in place in their copies, and end with the newest data.
#[test]
fn hosts_behind_by_one_and_ten_generations_fetch_exactly_the_changed_blocks() {
    let rt = runtime();
    let ebs = rt.block_on(StrictEbs::start(50));
    // Enough generations kept that ten behind is still a base EBS can compare with.
    let (_ta, a) = host(&ebs, "ka", 4, "keep = 12\n");
    let (_tb, b) = host(&ebs, "kb", 4, "keep = 12\n");
    create(&a, "kv", "64MiB");
    let mut model = BTreeMap::new();
    let mp = a.mount("kv", "w");
    let base = pattern(1, 12 << 20);
    write_file(&mp.join("base"), &base);
    model.insert("base".to_string(), base);
    a.unmount("kv", "w");
    create(&b, "kv", "64MiB");
    b.mount("kv", "r");
    b.unmount("kv", "r");
    let (whole, patched) = last_pull(&b);
    assert!(!patched && whole >= 24, "the first pull is whole: {whole}");

    for (k, first_seed) in [(1u64, 10u64), (10, 20)] {
        // b's Unmount may have shipped its superblock as a generation of its own: a must be current.
        let from = generation(&b, "kv").unwrap();
        for i in 0..k {
            let seed = first_seed + i;
            round(
                &a,
                "kv",
                &mut model,
                seed,
                (seed as usize * 300_000) % (11 << 20),
                256 * 1024,
            );
        }
        let newest = generation(&a, "kv").unwrap();
        // What the generations after b's base wrote, as the emulator holds them.
        let gens = ebs.completed_by_generation("kv");
        let changed: BTreeSet<u64> = gens
            .range(from + 1..=newest)
            .flat_map(|(_, id)| ebs.own_blocks(id))
            .collect();
        assert!(
            newest - from >= k,
            "{k} generations behind: {from} -> {newest}"
        );
        let got = ebs.counters().blocks_got.load(Ordering::Relaxed);
        let mp = b.mount("kv", "r");
        let read = ebs.counters().blocks_got.load(Ordering::Relaxed) - got;
        let (blocks, patched) = last_pull(&b);
        assert!(patched, "{k} behind: b patched its copy");
        assert_eq!(
            read,
            changed.len() as u64,
            "{k} behind: b read exactly the {} blocks written since its base, not {read}",
            changed.len()
        );
        assert_eq!(blocks, read);
        assert!(
            read < whole,
            "{k} behind: {read} blocks, a whole pull is {whole}"
        );
        check(&mp, &model);
        b.unmount("kv", "r");
        // a follows whatever b's Unmount shipped.
        a.mount("kv", "w");
        a.unmount("kv", "w");
    }
}

/// `[ebs] keep = 3` (the default): once the retention pass after every push is over, the volume has its
/// newest three snapshots, the data of 50 round trips stays whole, and a host that never saw any of it
/// pulls the newest alone.
#[test]
fn retention_keeps_exactly_keep_generations_over_fifty_round_trips() {
    let rt = runtime();
    let ebs = rt.block_on(StrictEbs::start(100));
    let (_ta, a) = host(&ebs, "ra", 4, "");
    create(&a, "rv", "64MiB");
    let mut model = BTreeMap::new();
    let mp = a.mount("rv", "w");
    write_file(&mp.join("base"), &pattern(1, 4 << 20));
    model.insert("base".to_string(), pattern(1, 4 << 20));
    a.unmount("rv", "w");
    for i in 2..=50u64 {
        round(
            &a,
            "rv",
            &mut model,
            i,
            (i as usize * 77_777) % (3 << 20),
            64 * 1024,
        );
        let newest = generation(&a, "rv").unwrap();
        assert_eq!(newest, i, "one generation per round trip");
        retained(&a, "rv", newest);
        let gens = ebs.completed_by_generation("rv");
        let kept: Vec<u64> = gens.keys().copied().collect();
        let want: Vec<u64> = (newest.saturating_sub(2).max(1)..=newest).collect();
        assert_eq!(kept, want, "round {i}: the newest three generations");
    }
    let kept = a.get("rv")["Status"]["generations"].clone();
    let shown: Vec<u64> = kept
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["generation"].as_u64().unwrap())
        .collect();
    assert_eq!(shown, [50, 49, 48], "{kept}");
    assert!(kept[1]["changed_bytes"].as_u64().unwrap() > 0, "{kept}");
    assert!(kept[1]["started"].as_u64().is_some(), "{kept}");
    // Another host pulls generation 50 with its parents long gone.
    let (_tb, b) = host(&ebs, "rb", 4, "");
    create(&b, "rv", "64MiB");
    let mb = b.mount("rv", "r");
    check(&mb, &model);
    // `ferry prune` says what it keeps, and with nothing to delete deletes nothing.
    let pruned: serde_json::Value = serde_json::from_str(&prune(&a, "rv", true)).unwrap();
    assert_eq!(pruned["deleted"].as_array().unwrap().len(), 0, "{pruned}");
    assert_eq!(pruned["kept"].as_array().unwrap().len(), 3, "{pruned}");
    b.unmount("rv", "r");
}

/// A pull runs while retention deletes the snapshot's parents (they live on in it, as on EBS), and a
/// push elsewhere meanwhile does not delete the snapshot being pulled: it is tagged as such until the
/// pull is done, and `ferry prune` deletes it afterwards.
#[test]
fn a_pull_in_progress_survives_retention_elsewhere() {
    let rt = runtime();
    let ebs = rt.block_on(StrictEbs::start(100));
    let (_ta, mut a) = host(&ebs, "pa", 4, "keep = 10\n");
    create(&a, "pv", "96MiB");
    let mut model = BTreeMap::new();
    let mp = a.mount("pv", "w");
    write_file(&mp.join("base"), &pattern(1, 40 << 20));
    model.insert("base".to_string(), pattern(1, 40 << 20));
    a.unmount("pv", "w");
    round(&a, "pv", &mut model, 2, 1 << 20, 512 * 1024);
    round(&a, "pv", &mut model, 3, 9 << 20, 512 * 1024);
    assert_eq!(ebs.completed_by_generation("pv").len(), 3);
    let third = snapshot(&a, "pv");
    reconfigure(&ebs, &mut a, 4, "keep = 1\n");

    // b pulls generation 3 slowly: one block at a time, 40 ms each.
    let (_tb, b) = host(&ebs, "pb", 1, "keep = 1\n");
    create(&b, "pv", "96MiB");
    ebs.faults().latency_ms.store(40, Ordering::Relaxed);
    let got = ebs.counters().blocks_got.load(Ordering::Relaxed);
    std::thread::scope(|s| {
        let pulling = s.spawn(|| b.mount("pv", "r"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while ebs.counters().blocks_got.load(Ordering::Relaxed) < got + 5 {
            assert!(Instant::now() < deadline, "b's pull never started");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Its parents go while it reads.
        let pruned: serde_json::Value = serde_json::from_str(&prune(&a, "pv", true)).unwrap();
        assert_eq!(pruned["deleted"].as_array().unwrap().len(), 2, "{pruned}");
        // A push elsewhere: with keep = 1, generation 3 would go, but b is pulling it.
        let mut elsewhere = model.clone();
        round(&a, "pv", &mut elsewhere, 4, 20 << 20, 512 * 1024);
        retained(&a, "pv", 4);
        let gens = ebs.completed_by_generation("pv");
        assert!(
            !pulling.is_finished(),
            "the pull ended before the push elsewhere; make it slower"
        );
        assert_eq!(gens.keys().copied().collect::<Vec<_>>(), [3, 4]);
        let mp = pulling.join().unwrap();
        check(&mp, &model);
    });
    ebs.faults().latency_ms.store(0, Ordering::Relaxed);
    // Once b's tag is gone (cleared after its pull), generation 3 is retention's like any other.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ebs
        .tags(&third)
        .iter()
        .any(|(k, _)| k.starts_with("ferry:pulling:"))
    {
        assert!(Instant::now() < deadline, "b never cleared its pulling tag");
        std::thread::sleep(Duration::from_millis(50));
    }
    // b still has it mounted (a's Unmount of its own copy of that base cleared only a's tag): kept.
    let out = prune(&a, "pv", false);
    assert!(out.contains("deleted 0 snapshot"), "{out}");
    // b's copy is now behind what a shipped meanwhile, so its Unmount refuses to ship over it; it is
    // no longer mounted there all the same.
    let err = b.err("/VolumeDriver.Unmount", r#"{"Name":"pv","ID":"r"}"#);
    assert!(err.contains("changed elsewhere"), "{err}");
    let out = prune(&a, "pv", false);
    assert!(out.contains("deleted 1 snapshot"), "{out}");
    assert_eq!(
        ebs.completed_by_generation("pv")
            .keys()
            .copied()
            .collect::<Vec<_>>(),
        [4]
    );
}

/// Killed with SIGKILL while retention deletes: nothing the catalog or the newest generations need is
/// gone, and the deletion is finished after the restart.
#[test]
fn a_retention_killed_midway_is_finished_after_restart() {
    let rt = runtime();
    let ebs = rt.block_on(StrictEbs::start(100));
    let (_ta, mut a) = host(&ebs, "xa", 4, "keep = 100\n");
    create(&a, "xv", "64MiB");
    let mut model = BTreeMap::new();
    let mp = a.mount("xv", "w");
    write_file(&mp.join("base"), &pattern(1, 2 << 20));
    model.insert("base".to_string(), pattern(1, 2 << 20));
    a.unmount("xv", "w");
    for i in 2..=8u64 {
        round(&a, "xv", &mut model, i, (i as usize) * 100_000, 64 * 1024);
    }
    let newest = snapshot(&a, "xv");
    assert_eq!(ebs.completed_by_generation("xv").len(), 8);
    reconfigure(&ebs, &mut a, 4, "keep = 2\n");

    // Every call now answers after 400 ms, so the kill lands between the first deletions and the rest.
    ebs.faults().latency_ms.store(400, Ordering::Relaxed);
    let deleted = ebs.counters().deleted.load(Ordering::Relaxed);
    let config = a.dir.join("ferry.toml");
    let state = a.state.clone();
    let prune = std::thread::spawn(move || {
        common::ferry(
            &["prune", "xv", "--config", config.to_str().unwrap()],
            &state,
        )
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while ebs.counters().deleted.load(Ordering::Relaxed) == deleted {
        assert!(
            Instant::now() < deadline,
            "retention never started deleting"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    a.kill9();
    let _ = prune.join();
    let intent = a.state.join("ebs/xv/retiring");
    assert!(intent.is_file(), "the intent outlives the kill");
    let left = ebs.completed_by_generation("xv");
    assert!(
        left.len() > 2,
        "the kill came before every deletion: {left:?}"
    );
    assert!(
        left.contains_key(&7) && left.get(&8) == Some(&newest),
        "{left:?}"
    );

    ebs.faults().latency_ms.store(0, Ordering::Relaxed);
    restart(&mut a);
    let deadline = Instant::now() + Duration::from_secs(30);
    while ebs.completed_by_generation("xv").len() > 2 {
        assert!(
            Instant::now() < deadline,
            "the restart never finished the deletion: {:?}\n{}",
            ebs.completed_by_generation("xv"),
            a.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        ebs.completed_by_generation("xv")
            .keys()
            .copied()
            .collect::<Vec<_>>(),
        [7, 8]
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while intent.exists() {
        assert!(Instant::now() < deadline, "the intent file stayed");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_tb, b) = host(&ebs, "xb", 4, "");
    create(&b, "xv", "64MiB");
    let mb = b.mount("xv", "r");
    check(&mb, &model);
    b.unmount("xv", "r");
}

//! Cluster mode across hosts: every Ferry host runs in a network namespace of its own against a real
//! three-member etcd cluster, so a partition is a link going down; ebs volumes ship through the strict EBS
//! emulator (which counts snapshots and keeps tags) on the test network's gateway. Nothing here reads one
//! host's view of its own writes: every claim is checked from another host.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::cluster::{eventually, unique_prefix, Etcd, Host, Net};
use crate::common::{self, Daemon};
use crate::ebs_strict::StrictEbs;
use crate::moto::TEST_AWS_ENV;

/// A test cluster. Fields drop in order: hosts (their daemons and mounts) before etcd, the emulator and the
/// network.
struct World {
    hosts: Vec<Host>,
    etcd: Etcd,
    ebs: Option<StrictEbs>,
    _rt: tokio::runtime::Runtime,
    prefix: String,
    net: Net,
}

impl World {
    fn new(label: &str, hosts: u8, ebs: bool) -> World {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut net = Net::new();
        let etcd = Etcd::start(&net);
        let ebs = ebs.then(|| rt.block_on(StrictEbs::start_on(net.gateway().parse().unwrap(), 64)));
        let prefix = unique_prefix(label);
        let _ = &mut net;
        let mut w = World {
            hosts: Vec::new(),
            etcd,
            ebs,
            _rt: rt,
            prefix,
            net,
        };
        for n in 1..=hosts {
            w.add_host(n);
        }
        w
    }

    fn extra(&self) -> String {
        match &self.ebs {
            Some(e) => format!(
                // Every generation is kept, so a test can count the snapshots of each.
                "[ebs]\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\nconcurrency = 4\nkeep = 100\n",
                e.endpoint()
            ),
            None => String::new(),
        }
    }

    fn add_host(&mut self, n: u8) {
        let extra = self.extra();
        let h = Host::start(
            &mut self.net,
            n,
            &self.etcd,
            &self.prefix,
            &extra,
            &TEST_AWS_ENV,
        );
        self.hosts.push(h);
    }

    fn d(&self, i: usize) -> &Daemon {
        &self.hosts[i].daemon
    }

    fn ebs(&self) -> &StrictEbs {
        self.ebs.as_ref().unwrap()
    }

    /// Completed snapshots of `volume` with generation `generation`.
    fn snapshots(&self, volume: &str, generation: u64) -> Vec<String> {
        self.ebs().completed_snapshots(volume, generation)
    }

    fn all_snapshots(&self, volume: &str) -> usize {
        let ebs = self.ebs();
        ebs.snapshot_ids()
            .into_iter()
            .filter(|id| {
                ebs.tags(id)
                    .iter()
                    .any(|(k, v)| k == "ferry:volume" && v == volume)
            })
            .count()
    }
}

fn names(d: &Daemon) -> BTreeSet<String> {
    let v = d.ok("/VolumeDriver.List", "{}");
    v["Volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["Name"].as_str().unwrap().to_string())
        .collect()
}

fn mount_err(d: &Daemon, name: &str, id: &str) -> String {
    d.err(
        "/VolumeDriver.Mount",
        &format!(r#"{{"Name":"{name}","ID":"{id}"}}"#),
    )
}

fn try_mount(d: &Daemon, name: &str, id: &str) -> Result<std::path::PathBuf, String> {
    let (status, v) = d.call(
        "/VolumeDriver.Mount",
        &format!(r#"{{"Name":"{name}","ID":"{id}"}}"#),
    );
    match (status, v["Mountpoint"].as_str()) {
        (200, Some(p)) if v.get("Err").is_none() => Ok(p.into()),
        _ => Err(v["Err"].as_str().unwrap_or("?").to_string()),
    }
}

fn try_unmount(d: &Daemon, name: &str, id: &str) -> Result<(), String> {
    let (status, v) = d.call(
        "/VolumeDriver.Unmount",
        &format!(r#"{{"Name":"{name}","ID":"{id}"}}"#),
    );
    if status == 200 && v.get("Err").is_none() {
        Ok(())
    } else {
        Err(v["Err"].as_str().unwrap_or("?").to_string())
    }
}

fn cluster_status(d: &Daemon, name: &str) -> Value {
    d.get(name)["Status"]["cluster"].clone()
}

fn sha(path: &Path) -> String {
    hex(&Sha256::digest(std::fs::read(path).unwrap()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn write_data(dir: &Path, seed: u8, len: usize) -> String {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let path = dir.join("data.bin");
    std::fs::write(&path, &data).unwrap();
    let f = std::fs::File::open(&path).unwrap();
    f.sync_all().unwrap();
    sha(&path)
}

fn ebs_opts() -> &'static str {
    r#"{"backend":"ebs","size":"64MiB"}"#
}

#[test]
fn cluster_create_storm_from_three_hosts_makes_each_volume_once() {
    let w = World::new("storm", 3, false);
    let names_wanted: Vec<String> = (0..50).map(|i| format!("storm-{i:02}")).collect();
    std::thread::scope(|s| {
        for (k, h) in w.hosts.iter().enumerate() {
            let names_wanted = &names_wanted;
            s.spawn(move || {
                // Each host in its own order, so the same name is created from several hosts at once.
                let mut order: Vec<&String> = names_wanted.iter().collect();
                order.rotate_left(k * 17);
                for name in order {
                    h.daemon.create(name, "{}");
                }
            });
        }
    });
    let want: BTreeSet<String> = names_wanted.iter().cloned().collect();
    for h in &w.hosts {
        assert!(
            eventually(Duration::from_secs(10), || names(&h.daemon) == want),
            "{}'s List: {:?}",
            h.node,
            names(&h.daemon)
        );
    }
    // Each definition was made by exactly one host, and each volume's storage once: a local volume is
    // created only on the host whose definition won.
    let mut made = 0;
    for name in &names_wanted {
        let creators: BTreeSet<String> = w
            .hosts
            .iter()
            .map(|h| {
                cluster_status(&h.daemon, name)["created_by"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(creators.len(), 1, "{name}: every host names one creator");
        let creator = creators.into_iter().next().unwrap();
        for h in &w.hosts {
            let local = h.dir().join("state/local").join(name);
            assert_eq!(
                local.exists(),
                h.node == creator,
                "{name} storage on {}",
                h.node
            );
            made += usize::from(local.exists());
        }
    }
    assert_eq!(made, 50);
    // The same name with other options is refused on any host, naming the option.
    let err = w.d(1).err(
        "/VolumeDriver.Create",
        r#"{"Name":"storm-07","Opts":{"size":"64MiB"}}"#,
    );
    assert!(err.contains("size"), "{err}");
    let caps = w.d(2).ok("/VolumeDriver.Capabilities", "{}");
    assert_eq!(caps["Capabilities"]["Scope"], "global");
    // A local volume is refused elsewhere, naming its host.
    let creator = cluster_status(w.d(0), "storm-00")["created_by"]
        .as_str()
        .unwrap()
        .to_string();
    let other = w.hosts.iter().find(|h| h.node != creator).unwrap();
    let err = mount_err(&other.daemon, "storm-00", "m1");
    assert!(
        err.contains(&creator) && err.contains("local volume"),
        "{err}"
    );
}

#[test]
fn cluster_ebs_volume_has_one_writer_and_follows_to_another_host() {
    let w = World::new("exclusive", 2, true);
    let (a, b) = (w.d(0), w.d(1));
    a.create("vol", ebs_opts());
    b.create("vol", ebs_opts()); // Swarm's Create on every node: a no-op
    let mp = a.mount("vol", "ma");
    let digest = write_data(&mp, 7, 3 << 20);
    let err = mount_err(b, "vol", "mb");
    assert!(err.contains("host-1"), "B's Mount names the owner: {err}");
    let owner = cluster_status(b, "vol");
    assert_eq!(owner["owner"], "host-1", "{owner}");
    assert!(owner["token"].as_i64().unwrap() > 0);
    // The operator's view from the other host: both hosts alive, host 1 owns the volume.
    let hosts: Value = serde_json::from_str(&w.hosts[1].operator(&["hosts", "--json"])).unwrap();
    let row = |node: &str| {
        hosts["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["node"] == node)
            .cloned()
            .unwrap_or_else(|| panic!("{node} missing from {hosts}"))
    };
    assert_eq!(row("host-1")["state"], "alive");
    assert_eq!(row("host-1")["owns"], serde_json::json!(["vol"]));
    assert_eq!(row("host-2")["owns"], serde_json::json!([]));
    assert_eq!(hosts["this_node"], "host-2");
    let inspect = w.hosts[1].operator(&["inspect", "vol"]);
    assert!(
        inspect.contains("host-1 (fencing token"),
        "ferry inspect shows owner and token: {inspect}"
    );
    a.unmount("vol", "ma");
    let mp = b.mount("vol", "mb");
    assert_eq!(sha(&mp.join("data.bin")), digest, "B reads A's bytes");
    assert_eq!(cluster_status(a, "vol")["owner"], "host-2");
    let err = mount_err(a, "vol", "ma2");
    assert!(err.contains("host-2"), "{err}");
    b.unmount("vol", "mb");
    assert_eq!(w.snapshots("vol", 1).len(), 1);
}

#[test]
fn cluster_racing_mounts_and_unmounts_never_make_two_generations() {
    let w = World::new("race", 2, true);
    let (a, b) = (w.d(0), w.d(1));
    a.create("race", ebs_opts());
    b.create("race", ebs_opts());
    for round in 0..4u8 {
        // Both hosts mount at the same moment: exactly one wins.
        let (ra, rb) = std::thread::scope(|s| {
            let ta = s.spawn(|| try_mount(a, "race", "ma"));
            let tb = s.spawn(|| try_mount(b, "race", "mb"));
            (ta.join().unwrap(), tb.join().unwrap())
        });
        assert!(
            ra.is_ok() != rb.is_ok(),
            "round {round}: exactly one mount wins: {ra:?} {rb:?}"
        );
        let (winner, loser, id, mp) = match (&ra, &rb) {
            (Ok(p), _) => (a, b, "ma", p.clone()),
            (_, Ok(p)) => (b, a, "mb", p.clone()),
            _ => unreachable!(),
        };
        write_data(&mp, round, 1 << 20);
        // The owner unmounts while the other host tries to mount and to unmount at the same moment.
        std::thread::scope(|s| {
            let t1 = s.spawn(|| winner.unmount("race", id));
            let t2 = s.spawn(|| {
                let _ = try_unmount(loser, "race", "other");
                try_mount(loser, "race", "late")
            });
            t1.join().unwrap();
            if t2.join().unwrap().is_ok() {
                loser.unmount("race", "late");
            }
        });
    }
    let gens: Vec<u64> = (1..=12)
        .filter(|g| !w.snapshots("race", *g).is_empty())
        .collect();
    for g in &gens {
        assert_eq!(
            w.snapshots("race", *g).len(),
            1,
            "generation {g} has one snapshot"
        );
    }
    let newest = cluster_status(a, "race")["generation"].as_u64().unwrap();
    assert_eq!(gens.last().copied(), Some(newest));
    assert_eq!(
        gens,
        (1..=newest).collect::<Vec<_>>(),
        "an unbroken line of generations"
    );
}

#[test]
fn cluster_remove_is_refused_while_another_host_has_the_volume() {
    let w = World::new("remove", 2, true);
    let (a, b) = (w.d(0), w.d(1));
    a.create("rm", ebs_opts());
    let mp = a.mount("rm", "ma");
    write_data(&mp, 1, 1 << 20);
    a.unmount("rm", "ma");
    let mp = a.mount("rm", "ma");
    let digest = write_data(&mp, 2, 1 << 20);
    let before = w.all_snapshots("rm");
    let err = b.err("/VolumeDriver.Remove", r#"{"Name":"rm"}"#);
    assert!(err.contains("host-1"), "{err}");
    assert_eq!(w.all_snapshots("rm"), before, "nothing deleted");
    assert!(names(b).contains("rm"));
    a.unmount("rm", "ma");
    let mp = b.mount("rm", "mb");
    assert_eq!(sha(&mp.join("data.bin")), digest);
    b.unmount("rm", "mb");
    // Idle everywhere: Remove on either host deletes record and data once, and every host forgets it.
    b.ok("/VolumeDriver.Remove", r#"{"Name":"rm"}"#);
    assert_eq!(w.all_snapshots("rm"), 0);
    assert!(eventually(Duration::from_secs(5), || !names(a).contains("rm")));
    assert!(eventually(Duration::from_secs(5), || !w.hosts[0]
        .dir()
        .join("state/ebs/rm")
        .exists()));
}

#[test]
fn cluster_host_death_fails_over_within_the_lease_ttl() {
    let mut w = World::new("death", 2, true);
    w.d(0).create(
        "dies",
        r#"{"backend":"ebs","size":"64MiB","checkpoint":"1m"}"#,
    );
    let mp = w.d(0).mount("dies", "ma");
    let digest = write_data(&mp, 3, 2 << 20);
    // The checkpoint is what a dead host leaves: run it now instead of waiting a minute.
    let ran = std::process::Command::new(common::ferry_bin())
        .args(["checkpoint", "dies", "--admin-socket"])
        .arg(w.hosts[0].dir().join("state/admin.sock"))
        .output()
        .unwrap();
    assert!(
        ran.status.success(),
        "{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    std::fs::write(mp.join("after-checkpoint"), b"lost with the host").unwrap();
    w.hosts[0].daemon.kill9();
    let killed = Instant::now();
    let took = loop {
        match try_mount(w.d(1), "dies", "mb") {
            Ok(mp) => {
                assert_eq!(
                    sha(&mp.join("data.bin")),
                    digest,
                    "data as new as the checkpoint"
                );
                break killed.elapsed();
            }
            Err(e) => {
                assert!(e.contains("host-1"), "{e}");
                assert!(
                    killed.elapsed() < Duration::from_secs(20),
                    "no failover: {e}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    // lease_ttl is 4 s; the pull of a 64 MiB volume takes well under the rest.
    assert!(took < Duration::from_secs(4 + 6), "failover took {took:?}");
    w.d(1).unmount("dies", "mb");
    // The dead host comes back: its copy holds changes never published; it must not publish them.
    common::unmount_under(&w.hosts[0].dir().join("state"));
    w.hosts[0].respawn();
    let gen = cluster_status(w.d(1), "dies")["generation"]
        .as_u64()
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || {
        cluster_status(w.d(0), "dies")["generation"].as_u64() == Some(gen)
    }));
}

#[test]
fn cluster_partitioned_owner_fences_itself_before_another_host_takes_over() {
    let w = World::new("partition", 2, true);
    let (a, b) = (w.d(0), w.d(1));
    a.create("part", ebs_opts());
    let mp = a.mount("part", "ma");
    let digest = write_data(&mp, 9, 1 << 20);
    a.unmount("part", "ma");
    let mp = a.mount("part", "ma");
    w.net.cut(1);
    let cut = Instant::now();
    // A writer on A: its writes must fail before B can take the volume over.
    let mut fenced_at = None;
    while cut.elapsed() < Duration::from_secs(10) {
        if std::fs::write(mp.join("late"), b"x").is_err() {
            fenced_at = Some(cut.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let fenced_at = fenced_at.expect("A's writes never failed");
    let mut taken_at = None;
    while cut.elapsed() < Duration::from_secs(20) {
        if let Ok(p) = try_mount(b, "part", "mb") {
            assert_eq!(sha(&p.join("data.bin")), digest);
            taken_at = Some(cut.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let taken_at = taken_at.expect("B never took over");
    assert!(
        fenced_at < taken_at,
        "A fenced at {fenced_at:?}, B took over at {taken_at:?}"
    );
    let mp_b = b.mount("part", "mb2");
    let digest_b = write_data(&mp_b, 10, 1 << 20);
    b.unmount("part", "mb2");
    b.unmount("part", "mb");
    let gen = cluster_status(b, "part")["generation"].as_u64().unwrap();
    w.net.heal(1);
    // A's link is back: its Unmount publishes nothing and reports what it kept.
    let err = try_unmount(a, "part", "ma").unwrap_err();
    assert!(
        err.contains("kept") || err.contains("not published"),
        "{err}"
    );
    assert!(eventually(Duration::from_secs(10), || {
        cluster_status(a, "part")["generation"].as_u64() == Some(gen)
    }));
    assert_eq!(w.snapshots("part", gen + 1).len(), 0, "A published nothing");
    let ls = std::process::Command::new(common::ferry_bin())
        .args(["inspect", "part", "--admin-socket"])
        .arg(w.hosts[0].dir().join("state/admin.sock"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&ls.stdout);
    assert!(
        text.contains("conflict") && text.contains("set-aside"),
        "{text}"
    );
    // B's data stands.
    let mp = b.mount("part", "mb3");
    assert_eq!(sha(&mp.join("data.bin")), digest_b);
    b.unmount("part", "mb3");
}

#[test]
fn cluster_paused_owner_cannot_publish_a_push_in_flight() {
    let w = World::new("paused", 2, true);
    let (a, b) = (w.d(0), w.d(1));
    a.create("pause", ebs_opts());
    let mp = a.mount("pause", "ma");
    let digest = write_data(&mp, 4, 4 << 20);
    a.unmount("pause", "ma");
    let mp = a.mount("pause", "ma");
    write_data(&mp, 5, 16 << 20);
    // Slow the emulator so A's push is still in flight when A is paused.
    w.ebs()
        .faults()
        .latency_ms
        .store(150, std::sync::atomic::Ordering::Relaxed);
    let pid = nix::unistd::Pid::from_raw(w.hosts[0].daemon.pid() as i32);
    std::thread::scope(|s| {
        let unmount = s.spawn(|| try_unmount(a, "pause", "ma"));
        std::thread::sleep(Duration::from_millis(400));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        // Past the TTL: A's claim lapses and B takes the volume from the last published generation.
        let mut mp_b = None;
        let started = Instant::now();
        while mp_b.is_none() && started.elapsed() < Duration::from_secs(20) {
            mp_b = try_mount(b, "pause", "mb").ok();
            std::thread::sleep(Duration::from_millis(200));
        }
        let mp_b = mp_b.expect("B never took over");
        assert_eq!(sha(&mp_b.join("data.bin")), digest);
        w.ebs()
            .faults()
            .latency_ms
            .store(0, std::sync::atomic::Ordering::Relaxed);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
        let r = unmount.join().unwrap();
        assert!(r.is_err(), "A's push must be refused: {r:?}");
    });
    assert_eq!(
        w.snapshots("pause", 2).len(),
        0,
        "the refused snapshot was deleted"
    );
    assert_eq!(cluster_status(b, "pause")["generation"].as_u64(), Some(1));
    b.unmount("pause", "mb");
}

#[test]
fn cluster_survives_a_lost_etcd_member_and_a_whole_etcd_outage() {
    let w = World::new("etcdloss", 2, true);
    let (a, b) = (w.d(0), w.d(1));
    a.create("e0", ebs_opts());
    w.etcd.kill(1);
    // With one member dead, no call fails.
    for i in 0..10 {
        let name = format!("m{i}");
        a.create(&name, ebs_opts());
        b.create(&name, ebs_opts());
        let mp = b.mount(&name, "x");
        write_data(&mp, i as u8, 4096);
        b.unmount(&name, "x");
        assert!(names(a).contains(&name));
    }
    w.etcd.restart(1);
    let mp = a.mount("e0", "held");
    // A writer on the mounted volume: it keeps working while etcd is away, until the fence deadline (a
    // quarter of the 4 s TTL before the lease could expire), and no longer.
    let stopped = Instant::now();
    let writer = std::thread::spawn(move || loop {
        if std::fs::write(mp.join("during-outage"), b"ok").is_err() {
            return stopped.elapsed();
        }
        if stopped.elapsed() > Duration::from_secs(30) {
            return stopped.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    });
    // All of etcd down: Get and List answer from memory, fast; Mount fails fast and clearly.
    w.etcd.stop_all();
    for d in [a, b] {
        let t = Instant::now();
        let _ = d.ok("/VolumeDriver.List", "{}");
        let _ = d.get("m3");
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "Get+List took {:?}",
            t.elapsed()
        );
    }
    let t = Instant::now();
    let err = mount_err(b, "m4", "y");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "Mount took {:?}",
        t.elapsed()
    );
    assert!(err.contains("etcd"), "{err}");
    assert!(eventually(Duration::from_secs(6), || {
        cluster_status(b, "m3")["catalog_in_sync"] == false
    }));
    let fenced_after = writer.join().unwrap();
    assert!(
        fenced_after > Duration::from_millis(1500) && fenced_after < Duration::from_secs(4),
        "writes stopped {fenced_after:?} after etcd went away"
    );
    assert_eq!(a.get("e0")["Status"]["health"], "fenced");
    w.etcd.start_all();
    assert!(eventually(Duration::from_secs(30), || {
        cluster_status(b, "m3")["catalog_in_sync"] == true && try_mount(b, "m4", "y").is_ok()
    }));
    b.unmount("m4", "y");
    let _ = try_unmount(a, "e0", "held");
}

#[test]
fn cluster_a_joining_host_imports_its_volumes_and_reports_conflicts() {
    let mut w = World::new("import", 1, false);
    // A host that ran alone: two volumes in its embedded catalog.
    let tmp = tempfile::tempdir().unwrap();
    let solo = Daemon::start_in(tmp.path(), &tmp.path().join("ferry.sock"), &[]);
    solo.create("mine", "{}");
    solo.create("clash", r#"{"size":"64MiB"}"#);
    let solo_state = solo.state.clone();
    drop(solo);
    common::unmount_under(&solo_state);
    w.d(0).create("clash", "{}");
    // It joins the cluster with that state directory.
    w.add_host(2);
    let h2_state = w.hosts[1].dir().join("state");
    w.hosts[1].daemon.terminate();
    common::unmount_under(&h2_state);
    std::fs::remove_dir_all(&h2_state).unwrap();
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(&solo_state)
        .arg(&h2_state)
        .status()
        .unwrap();
    assert!(st.success());
    w.hosts[1].respawn();
    let (a, b) = (w.d(0), w.d(1));
    assert!(eventually(Duration::from_secs(10), || names(a).contains("mine")));
    assert_eq!(cluster_status(a, "mine")["created_by"], "host-2");
    let clash = b.get("clash");
    assert_eq!(clash["Status"]["health"], "conflict", "{clash}");
    let err = mount_err(b, "clash", "x");
    assert!(err.contains("different"), "{err}");
    // Host 1's volume of that name is untouched.
    assert_eq!(cluster_status(a, "clash")["created_by"], "host-1");
    // The way out troubleshooting gives: remove it on the joining host, which removes only its own.
    b.remove("clash");
    assert!(!w.hosts[1].dir().join("state/local/clash").exists());
    assert!(names(a).contains("clash"));
    assert!(w.hosts[0].dir().join("state/local/clash").exists());
    assert_eq!(cluster_status(b, "clash")["created_by"], "host-1");
}

/// An nfs volume with `access=single` in a cluster: one host at a time, and a host that stops renewing its
/// lease (its daemon paused) has its FUSE helper refuse writes on its own before another host takes over.
/// The two daemons run in the test's own network namespace (the test NFS server listens on loopback) and
/// reach etcd on the test network's gateway.
#[test]
fn cluster_single_writer_nfs_volume_is_fenced_by_its_helper_when_the_daemon_stops_renewing() {
    let net = Net::new();
    let etcd = Etcd::start(&net);
    let ganesha = crate::common::ganesha::Ganesha::start();
    let prefix = unique_prefix("nfs-single");
    let start = |node: &str| {
        let tmp = tempfile::tempdir().unwrap();
        let config = crate::cluster::cluster_config(
            tmp.path(),
            &etcd.endpoints(),
            node,
            &prefix,
            crate::cluster::LEASE_TTL,
            &ganesha.config_section("5s"),
        );
        let d = Daemon::start_in(
            tmp.path(),
            &tmp.path().join("ferry.sock"),
            &[("FERRY_CONFIG", config.to_str().unwrap())],
        );
        (tmp, d)
    };
    let (_ta, a) = start("host-a");
    let (_tb, b) = start("host-b");
    a.create("one", r#"{"backend":"nfs","access":"single"}"#);
    b.create("one", r#"{"backend":"nfs","access":"single"}"#);
    // The same name shared would be another volume: refused naming the option.
    let err = b.err(
        "/VolumeDriver.Create",
        r#"{"Name":"one","Opts":{"backend":"nfs"}}"#,
    );
    assert!(err.contains("access"), "{err}");
    let mp = a.mount("one", "ma");
    std::fs::write(mp.join("from-a"), b"a").unwrap();
    let err = mount_err(&b, "one", "mb");
    assert!(err.contains("host-a"), "{err}");
    // A's daemon stops (as a hung daemon would): its helper keeps serving, until the fence deadline.
    let pid = nix::unistd::Pid::from_raw(a.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let paused = Instant::now();
    let mut fenced_at = None;
    while paused.elapsed() < Duration::from_secs(10) {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(mp.join("writer"));
        let ok = f.and_then(|mut f| {
            use std::io::Write;
            f.write_all(b"x")?;
            f.sync_all()
        });
        if ok.is_err() {
            fenced_at = Some(paused.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let fenced_at = fenced_at.expect("A's helper never refused writes");
    // Not at once: the lease was renewed just before the pause, so writes go on until the deadline.
    assert!(
        fenced_at > Duration::from_millis(1500),
        "fenced after {fenced_at:?}"
    );
    let mut taken_at = None;
    while paused.elapsed() < Duration::from_secs(20) {
        if try_mount(&b, "one", "mb").is_ok() {
            taken_at = Some(paused.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let taken_at = taken_at.expect("B never took over");
    assert!(
        fenced_at < taken_at,
        "fenced {fenced_at:?}, taken {taken_at:?}"
    );
    let mp_b = b.get("one")["Mountpoint"].as_str().unwrap().to_string();
    let written = std::fs::read(Path::new(&mp_b).join("writer")).unwrap_or_default();
    std::fs::write(Path::new(&mp_b).join("from-b"), b"b").unwrap();
    // What A's containers still try to write never reaches the server.
    let _ = std::fs::write(mp.join("writer"), b"late");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        std::fs::read(Path::new(&mp_b).join("writer")).unwrap_or_default(),
        written
    );
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let _ = try_unmount(&a, "one", "ma");
    b.unmount("one", "mb");
    drop(a);
    drop(b);
    drop(ganesha);
}

#[test]
fn cluster_release_takes_a_volume_from_a_cut_off_owner_that_then_publishes_nothing() {
    let w = World::new("release", 2, true);
    let (a, b) = (w.d(0), w.d(1));
    a.create("rel", ebs_opts());
    let mp = a.mount("rel", "ma");
    let digest = write_data(&mp, 1, 1 << 20);
    a.unmount("rel", "ma");
    let mp = a.mount("rel", "ma");
    write_data(&mp, 2, 1 << 20);
    w.net.cut(1);
    assert!(mount_err(b, "rel", "mb").contains("host-1"));
    // The operator does not wait for the lease: host 1 is cut off, and its claim is taken from it.
    let said = w.hosts[1].operator(&["release", "rel"]);
    assert!(said.contains("taken from host host-1"), "{said}");
    let mp_b = b.mount("rel", "mb");
    assert_eq!(
        sha(&mp_b.join("data.bin")),
        digest,
        "the last published data"
    );
    let digest_b = write_data(&mp_b, 3, 1 << 20);
    b.unmount("rel", "mb");
    w.net.heal(1);
    // Host 1 comes back and unmounts: its token no longer matches, so nothing it made is published.
    assert!(eventually(Duration::from_secs(10), || {
        cluster_status(a, "rel")["generation"].as_u64() == Some(2)
    }));
    // Either its base check or the token check refuses, before or after its upload; both keep its changes.
    let err = try_unmount(a, "rel", "ma").unwrap_err();
    assert!(err.contains("kept in"), "{err}");
    assert_eq!(a.get("rel")["Status"]["health"], "conflict");
    assert_eq!(w.snapshots("rel", 3).len(), 0);
    let mp = b.mount("rel", "mb2");
    assert_eq!(sha(&mp.join("data.bin")), digest_b);
    b.unmount("rel", "mb2");
    // The way out troubleshooting gives: set host 1's kept changes aside, and it mounts the newest data.
    let said = w.hosts[0].operator(&["ebs", "set-aside", "rel"]);
    assert!(said.contains("was moved to"), "{said}");
    let mp = a.mount("rel", "ma3");
    assert_eq!(sha(&mp.join("data.bin")), digest_b);
    a.unmount("rel", "ma3");
    assert_eq!(a.get("rel")["Status"]["health"], "ok");
}

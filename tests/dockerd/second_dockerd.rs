//! Two Docker "hosts" on one machine, each with its own Ferry, from `scripts/second-dockerd` (see
//! tests/common/docker2.rs). This proves, with the local backend, the set-up that tests of shared backends
//! (NFS, EBS) use for "a container on another host": each host creates and uses volumes through its own
//! driver, sees only its own volumes and containers, and each Ferry is only ever asked about its own volumes.
//!
//! It fails when the machine's dockerd is unreachable. It holds
//! the lock of tests/dockerd/docker.rs (`/tmp/ferry-e2e-docker.lock`) while it runs. With `FERRY_E2E_SHOW_LOG=1` it
//! prints both Ferry logs at the end.
//!
//! **Host 1.** By default both hosts are second dockerds, and the machine's dockerd is only asked to list
//! its containers (which involves no plugin). With `FERRY_E2E_2H_MACHINE=1` host 1 is the machine's dockerd
//! instead, with its Ferry linked into `/run/docker/plugins`. That costs: the machine's dockerd remembers
//! every legacy plugin it activated until it restarts, and every `docker volume ls` (and every lookup of a
//! volume name it does not know) then waits about 15 s for the dead ones, so each such run leaves the
//! machine's dockerd slower. Its driver name is then `FERRY_E2E_PLUGIN_NAME` when that is set (as in
//! tests/dockerd/docker.rs, so runs reuse one dead plugin instead of piling them up), else unique per run.
//! Host 2's driver name is always unique per run: host 2 and what it remembers are gone after the run.

use crate::docker2;
use crate::e2e;

use std::fs::File;
use std::path::Path;
use std::time::Instant;

use docker2::{DockerCli, FerryPlugin, SecondDockerd, BUSYBOX_IMAGE};
use e2e::{lock_docker_tests, run_id};
use nix::fcntl::Flock;

/// The key of the label on every container this test starts (value: the run id).
const LABEL_KEY: &str = "ferry-2h";

/// Everything the test set up. `Drop` removes what it made through Docker while both plugins still answer;
/// then the fields drop in order: host 2's Ferry, host 2's dockerd, host 1's Ferry (unregistered), host 1's
/// dockerd (when it is a second one), the directory, the lock.
struct TwoHosts {
    run: String,
    host1: DockerCli,
    ferry_b: FerryPlugin,
    host2: SecondDockerd,
    ferry_a: FerryPlugin,
    host1_daemon: Option<SecondDockerd>,
    _tmp: Option<tempfile::TempDir>,
    _lock: Flock<File>,
}

impl TwoHosts {
    fn label(&self) -> String {
        format!("{LABEL_KEY}={}", self.run)
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "{what}\n--- ferry log, host 1 ({}) ---\n{}\n--- ferry log, host 2 ({}) ---\n{}\n--- end of dockerd log, host 2 ---\n{}\n--- end of dockerd log, host 1 (when a second dockerd) ---\n{}",
            self.ferry_a.name(),
            self.ferry_a.log_text(),
            self.ferry_b.name(),
            self.ferry_b.log_text(),
            tail(&self.host2.log_text(), 40),
            tail(&self.host1_daemon.as_ref().map(|d| d.log_text()).unwrap_or_default(), 40),
        )
    }

    fn check<T>(&self, r: Result<T, String>) -> T {
        r.unwrap_or_else(|e| self.fail(&e))
    }

    fn on1(&self, args: &[&str]) -> String {
        self.check(self.host1.ok(args))
    }

    fn on2(&self, args: &[&str]) -> String {
        self.check(self.host2.docker_ok(args))
    }

    /// `docker run` arguments with the label and no network, then `rest`.
    fn run_args<'a>(&'a self, label: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["run", "--network", "none", "--label", label];
        v.extend_from_slice(rest);
        v
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        self.host1.sweep(&self.label(), self.ferry_a.name());
        self.host2.cli().sweep(&self.label(), self.ferry_b.name());
        if std::env::var("FERRY_E2E_SHOW_LOG").as_deref() == Ok("1") {
            eprintln!(
                "--- ferry log, host 1 ---\n{}\n--- ferry log, host 2 ---\n{}",
                self.ferry_a.log_text(),
                self.ferry_b.log_text()
            );
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn lines(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn two_dockerds_each_with_its_own_ferry() {
    let began = Instant::now();
    let machine = DockerCli::machine();
    if let Err(e) = machine.ok(&["info"]) {
        panic!("dockerd is unreachable:\n{e}");
    }
    let on_machine = std::env::var("FERRY_E2E_2H_MACHINE").as_deref() == Ok("1");
    let lock = lock_docker_tests();
    eprintln!("lock taken after {:?}", began.elapsed());
    let run = run_id();
    let fixed_name = std::env::var("FERRY_E2E_PLUGIN_NAME")
        .ok()
        .filter(|n| on_machine && !n.is_empty());
    let name_a = fixed_name
        .clone()
        .unwrap_or_else(|| format!("ferry-2h-a-{run}"));
    let name_b = format!("ferry-2h-b-{run}");
    let t = Instant::now();
    let (host1_daemon, ferry_a, tmp) = if on_machine {
        let tmp = tempfile::Builder::new()
            .prefix("ferry-2h")
            .tempdir()
            .unwrap();
        let ferry = FerryPlugin::start_on_machine(&name_a, tmp.path(), &[]);
        (None, ferry, Some(tmp))
    } else {
        let d = SecondDockerd::start_temp();
        eprintln!("host 1 (second dockerd) up in {:?}", d.start_time);
        let ferry = d.start_ferry(&name_a, &[]);
        (Some(d), ferry, None)
    };
    let host2 = SecondDockerd::start_temp();
    eprintln!("host 2 (second dockerd) up in {:?}", host2.start_time);
    let ferry_b = host2.start_ferry(&name_b, &[]);
    eprintln!("daemons and plugins up in {:?}", t.elapsed());
    let h = TwoHosts {
        run,
        host1: host1_daemon
            .as_ref()
            .map_or_else(DockerCli::machine, |d| d.cli().clone()),
        ferry_b,
        host2,
        ferry_a,
        host1_daemon,
        _tmp: tmp,
        _lock: lock,
    };
    // What a killed earlier run left under a fixed host-1 name (the plugin answers now, so this is quick).
    if fixed_name.is_some() {
        h.host1.sweep(LABEL_KEY, h.ferry_a.name());
    }

    let t = Instant::now();
    let (built1, built2) = std::thread::scope(|s| {
        let other = s.spawn(|| h.host2.load_image());
        (h.host1.load_image(), other.join().unwrap())
    });
    h.check(built1);
    h.check(built2);
    eprintln!("images built in {:?}", t.elapsed());

    let t = Instant::now();
    let label = h.label();
    let vol_a = format!("ferry-2h-{}-a", h.run);
    let vol_b = format!("ferry-2h-{}-b", h.run);
    // Host 1: a plain volume through driver A, written by one container.
    let out = h.on1(&["volume", "create", "--driver", &name_a, &vol_a]);
    assert_eq!(out.trim(), vol_a);
    let mount_a = format!("{vol_a}:/data");
    let out = h.on1(&h.run_args(
        &label,
        &[
            "--rm",
            "-v",
            &mount_a,
            BUSYBOX_IMAGE,
            "sh",
            "-c",
            "echo written-on-host1 > /data/who && cat /data/who",
        ],
    ));
    assert_eq!(lines(&out), ["written-on-host1"], "{out}");
    // Host 2: a size-capped volume through driver B. Ferry mounts its filesystem inside host 2's mount
    // namespace; the container must get that filesystem, not the empty directory under it.
    let out = h.on2(&[
        "volume", "create", "--driver", &name_b, "-o", "size=64M", &vol_b,
    ]);
    assert_eq!(out.trim(), vol_b);
    let mount_b = format!("{vol_b}:/data");
    let out = h.on2(&h.run_args(
        &label,
        &[
            "--rm",
            "-v",
            &mount_b,
            BUSYBOX_IMAGE,
            "sh",
            "-c",
            "echo written-on-host2 > /data/who && cat /data/who && grep ' /data ' /proc/mounts",
        ],
    ));
    let got = lines(&out);
    assert_eq!(got.first(), Some(&"written-on-host2"), "{out}");
    assert!(
        got.get(1)
            .is_some_and(|m| m.split(' ').nth(2) == Some("ext4")),
        "the container on host 2 did not get Ferry's ext4 filesystem at /data: {out}"
    );
    eprintln!("volumes created and written in {:?}", t.elapsed());

    // A long-running container on each host, using its volume (so that Docker reports its mount point).
    let id1 = h.on1(&h.run_args(
        &label,
        &["-d", "-v", &mount_a, BUSYBOX_IMAGE, "sleep", "600"],
    ));
    let id1 = id1.trim();
    let id2 = h.on2(&h.run_args(
        &label,
        &["-d", "-v", &mount_b, BUSYBOX_IMAGE, "sleep", "600"],
    ));
    let id2 = id2.trim();

    // The daemons are independent: each lists only its own containers and knows nothing of the other's.
    let ps1 = h.on1(&["ps", "-aq", "--no-trunc"]);
    let ps2 = h.on2(&["ps", "-aq", "--no-trunc"]);
    assert!(lines(&ps1).contains(&id1), "host 1 lost {id1}: {ps1}");
    assert!(!lines(&ps1).contains(&id2), "host 1 lists host 2's {id2}");
    assert_eq!(
        lines(&ps2),
        [id2],
        "host 2 should have exactly its own container"
    );
    assert!(
        h.host1
            .run(&["container", "inspect", id2])
            .is_ok_and(|o| !o.status.success()),
        "host 1 can inspect host 2's container"
    );
    assert!(
        h.host2
            .docker(&["container", "inspect", id1])
            .is_ok_and(|o| !o.status.success()),
        "host 2 can inspect host 1's container"
    );

    if h.host1_daemon.is_some() {
        // Neither is the machine's dockerd.
        let ps = h.check(machine.ok(&["ps", "-aq", "--no-trunc"]));
        assert!(
            !lines(&ps).contains(&id1) && !lines(&ps).contains(&id2),
            "the machine's dockerd lists a container of a second dockerd: {ps}"
        );
    }

    // Each host sees only its own volumes: host 2 exactly one, host 1 its own and nothing of driver B (and
    // exactly one when it is a second dockerd).
    let t = Instant::now();
    let v1 = h.check(h.host1.volumes());
    let v2 = h.check(h.host2.cli().volumes());
    assert!(
        v1.contains(&(name_a.clone(), vol_a.clone())),
        "host 1 does not list {vol_a}: {v1:?}"
    );
    assert!(
        !v1.iter().any(|(d, n)| d == &name_b || n == &vol_b),
        "host 1 lists host 2's volume: {v1:?}"
    );
    assert_eq!(v2, [(name_b.clone(), vol_b.clone())], "host 2's volumes");
    if h.host1_daemon.is_some() {
        assert_eq!(v1, [(name_a.clone(), vol_a.clone())], "host 1's volumes");
    }
    eprintln!("volumes listed in {:?}", t.elapsed());

    // The data stayed where it was written: new containers read it back, and it is in each Ferry's own
    // state directory.
    let out = h.on1(&h.run_args(
        &label,
        &["--rm", "-v", &mount_a, BUSYBOX_IMAGE, "cat", "/data/who"],
    ));
    assert_eq!(lines(&out), ["written-on-host1"]);
    let out = h.on2(&h.run_args(
        &label,
        &["--rm", "-v", &mount_b, BUSYBOX_IMAGE, "cat", "/data/who"],
    ));
    assert_eq!(lines(&out), ["written-on-host2"]);
    let on_disk = h.ferry_a.local_volume_dir(&vol_a).join("data/who");
    assert_eq!(
        std::fs::read_to_string(&on_disk).ok().as_deref(),
        Some("written-on-host1\n"),
        "{}",
        on_disk.display()
    );
    let mp_a = h.on1(&["volume", "inspect", "-f", "{{.Mountpoint}}", &vol_a]);
    let mp_b = h.on2(&["volume", "inspect", "-f", "{{.Mountpoint}}", &vol_b]);
    assert!(
        Path::new(mp_a.trim()).starts_with(&h.ferry_a.state),
        "{mp_a}"
    );
    assert!(
        Path::new(mp_b.trim()).starts_with(&h.ferry_b.state),
        "{mp_b}"
    );
    // Host 2's volume is a filesystem mounted in host 2's namespace: read it there.
    let mut cat = h.host2.command("cat");
    cat.arg(Path::new(mp_b.trim()).join("who"));
    let out = h.check(docker2::run_command_ok(cat, docker2::COMMAND_TIMEOUT));
    assert_eq!(out, "written-on-host2\n");

    // Each Ferry was asked about its own volume only (calls are logged with the volume name).
    let (log_a, log_b) = (h.ferry_a.log_text(), h.ferry_b.log_text());
    if !log_a.contains(&vol_a) || !log_b.contains(&vol_b) {
        h.fail("a Ferry log does not mention its own volume");
    }
    if log_a.contains(&vol_b) || log_b.contains(&vol_a) {
        h.fail("a Ferry was asked about the other host's volume");
    }

    // Tear down through Docker, checking it works, before the guard's sweep.
    let t = Instant::now();
    h.on1(&["rm", "-f", id1]);
    h.on2(&["rm", "-f", id2]);
    h.on1(&["volume", "rm", &vol_a]);
    h.on2(&["volume", "rm", &vol_b]);
    assert!(h.check(h.host2.cli().volumes()).is_empty());
    eprintln!("containers and volumes removed in {:?}", t.elapsed());

    let mut h = h;
    let t = Instant::now();
    let r = h.host2.stop();
    h.check(r);
    eprintln!("host 2 stopped in {:?}", t.elapsed());
    let t = Instant::now();
    drop(h);
    eprintln!("the rest cleaned up in {:?}", t.elapsed());
    eprintln!("whole test: {:?}", began.elapsed());
}

//! The nfs backend end to end, through real dockerds, the `docker` CLI and `docker-compose`, with one real
//! NFS-Ganesha serving both "hosts".
//!
//! Both hosts are second dockerds (`scripts/second-dockerd`, see tests/common/docker2.rs), each with its own
//! mount namespace and its own Ferry (own state directory, so its own host id) registered as a legacy
//! plugin in that dockerd's private plugin directory, and configured (`FERRY_CONFIG`) with the `[nfs]`
//! section of the Ganesha. Each Ferry runs inside its host's namespace, so the FUSE helpers it starts for
//! Mount serve mounts that its dockerd and containers see. The machine's dockerd is only asked `docker info`:
//! no plugin is ever registered with it, so it cannot be left remembering a dead one.
//!
//! In order, in one test (the set-up costs more than the scenarios):
//!  1. host 1 creates `shared` with `-o backend=nfs`; one container writes (data through stdin), a second
//!     reads it back; `docker volume inspect` shows the nfs status; the files are in the export on disk;
//!  2. host 2 creates `shared` too (adopting the same directory), reads host 1's data, writes a reply that
//!     host 1 reads;
//!  3. while a container on host 1 keeps the volume mounted, a file host 2 writes is visible in it at once,
//!     and `docker volume rm shared` on host 2 is refused ("still mounted on host"); once that container is
//!     stopped, the removal succeeds and deletes the directory, and host 1's removal succeeds;
//!  4. a compose project on host 1 with `driver_opts: {backend: nfs}`: `up` writes, `down -v` deletes;
//!  5. `docker run --rm --mount type=volume,...,volume-driver=A,volume-opt=backend=nfs` creates a named volume
//!     that outlives the container.
//!
//! At the end no FUSE helper of either Ferry runs, nothing is mounted under their state directories and the
//! export holds nothing but Ferry's own marker area.
//!
//! It fails when the machine's dockerd is unreachable or ganesha or rpcbind is missing (the dockerd tier's
//! gate, tests/common/tier.rs, says so first; `FERRY_SKIP_DOCKER=1` skips the whole tier). It
//! holds the lock of tests/dockerd/docker.rs (`/tmp/ferry-e2e-docker.lock`) while it runs. A failure prints both
//! Ferry logs, every FUSE helper's log and the end of both dockerd logs; `FERRY_E2E_SHOW_LOG=1` prints the
//! Ferry logs at the end of a passing run too.

use crate::docker2;
use crate::e2e;
use crate::ganesha;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use docker2::{
    tail, DockerCli, FerryPlugin, SecondDockerd, TwoHosts, BUSYBOX, BUSYBOX_IMAGE, COMMAND_TIMEOUT,
};
use e2e::{lock_docker_tests, run_id};
use ganesha::Ganesha;
use nix::fcntl::Flock;

/// The key of the label on every container this test starts (value: the run id).
const LABEL_KEY: &str = "ferry-nfs-docker";
/// The volume both hosts share.
const SHARED: &str = "shared";
/// How long Ferry may wait on the server for one operation.
const NFS_TIMEOUT: &str = "5s";

/// Text of ~`size` bytes that differs line by line (ASCII, so it survives a trip through stdout).
fn blob(size: usize) -> String {
    let mut s = String::with_capacity(size + 64);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut i = 0u64;
    while s.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(&format!("{i:08} {x:016x} {:016x}\n", x.rotate_left(29)));
        i += 1;
    }
    s
}

/// Everything the test set up. `Drop` first removes what it made through Docker while both plugins still
/// answer (compose project, labelled containers, the plugins' volumes); then the fields drop in order:
/// host 2's Ferry, host 2's dockerd (which kills whatever is left in its namespace, FUSE helpers
/// included), the same for host 1, the Ganesha, the configuration directory and last the lock.
struct Hosts {
    run: String,
    label: String,
    /// Compose project (name, file) still to take down.
    project: Option<(String, PathBuf)>,
    ferry_b: FerryPlugin,
    host2: SecondDockerd,
    ferry_a: FerryPlugin,
    host1: SecondDockerd,
    nfs: Ganesha,
    tmp: tempfile::TempDir,
    _lock: Flock<File>,
}

impl Hosts {
    fn a(&self) -> &str {
        self.ferry_a.name()
    }

    fn b(&self) -> &str {
        self.ferry_b.name()
    }

    fn export(&self) -> PathBuf {
        self.nfs.export()
    }

    /// Every FUSE helper log under a Ferry's state directory (`STATE/nfs/VOLUME/helper.log`).
    fn helper_logs(ferry: &FerryPlugin) -> String {
        let mut out = String::new();
        let Ok(entries) = std::fs::read_dir(ferry.state.join("nfs")) else {
            return out;
        };
        for e in entries.flatten() {
            let log = e.path().join("helper.log");
            if let Ok(text) = std::fs::read_to_string(&log) {
                out.push_str(&format!("--- {} ---\n{}\n", log.display(), tail(&text, 60)));
            }
        }
        out
    }

    fn on1(&self, args: &[&str]) -> String {
        self.on(&self.host1, args)
    }

    fn on2(&self, args: &[&str]) -> String {
        self.on(&self.host2, args)
    }

    /// Checks what `docker volume inspect` says of an nfs volume of `driver` on `host`.
    fn expect_nfs_volume(&self, host: &SecondDockerd, driver: &str, volume: &str) {
        let v = self.inspect(host, volume);
        let s = &v["Status"];
        let ok = v["Driver"] == driver
            && s["backend"] == "nfs"
            && s["server"] == "127.0.0.1"
            && s["export"] == "/export"
            && s["path"] == volume
            && s["health"] == "ok";
        self.ensure(ok, || {
            format!("unexpected `docker volume inspect {volume}` through {driver}: {v:#}")
        });
    }

    /// Pids of the FUSE helpers (`ferry nfs-mount`) that serve mounts under `ferry`'s state directory.
    fn helpers(ferry: &FerryPlugin) -> Vec<u32> {
        let state = ferry.state.to_string_lossy().into_owned();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let args: Vec<String> = cmdline
                    .split(|b| *b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                args.iter().any(|a| a == "nfs-mount") && args.iter().any(|a| a.contains(&state))
            })
            .collect()
    }

    /// Waits (a few seconds at most) until no FUSE helper of either Ferry runs and nothing is mounted under
    /// either state directory in its host's namespace.
    fn expect_nothing_mounted(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let helpers = [Self::helpers(&self.ferry_a), Self::helpers(&self.ferry_b)];
            let mounts = [
                self.host1.mounts_under(&self.ferry_a.state),
                self.host2.mounts_under(&self.ferry_b.state),
            ];
            if helpers.iter().all(Vec::is_empty) && mounts.iter().all(Vec::is_empty) {
                return;
            }
            if Instant::now() > deadline {
                self.fail(&format!(
                    "with every container gone, FUSE helpers still run (host 1, host 2: {helpers:?}) or mounts \
                     remain (host 1, host 2: {mounts:?})"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `(driver, name)` of every volume `host` lists.
    fn volumes(&self, host: &SecondDockerd) -> Vec<(String, String)> {
        self.check(host.cli().volumes())
    }

    /// Takes the compose project down (if still up), removes labelled containers and the plugins'
    /// volumes, ignoring errors.
    fn sweep(&mut self) {
        if let Some((project, file)) = self.project.take() {
            let _ = docker2::run_command(
                self.compose_command(&project, &file, &["down", "-v", "--remove-orphans"]),
                COMMAND_TIMEOUT,
            );
        }
        self.host1.cli().sweep(&self.label, self.ferry_a.name());
        self.host2.cli().sweep(&self.label, self.ferry_b.name());
    }

    /// `docker-compose` for host 1.
    fn compose_command(&self, project: &str, file: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker-compose");
        cmd.current_dir(self.tmp.path())
            .env("DOCKER_HOST", self.host1.host())
            .env("DOCKER_CONFIG", self.host1.dir().join("docker-config"))
            .env("COMPOSE_HTTP_TIMEOUT", "150")
            .args(["-p", project, "-f"])
            .arg(file)
            .args(["--ansi", "never"])
            .args(args);
        cmd
    }

    fn compose(&self, project: &str, file: &Path, args: &[&str]) -> String {
        self.check(docker2::run_command_ok(
            self.compose_command(project, file, args),
            COMMAND_TIMEOUT,
        ))
    }
}

impl TwoHosts for Hosts {
    fn diagnostics(&self) -> String {
        format!(
            "--- ferry log, host 1 ({}) ---\n{}\n--- helper logs, host 1 ---\n{}\
             --- ferry log, host 2 ({}) ---\n{}\n--- helper logs, host 2 ---\n{}\
             --- end of dockerd log, host 1 ---\n{}\n--- end of dockerd log, host 2 ---\n{}",
            self.a(),
            self.ferry_a.log_text(),
            Self::helper_logs(&self.ferry_a),
            self.b(),
            self.ferry_b.log_text(),
            Self::helper_logs(&self.ferry_b),
            tail(&self.host1.log_text(), 40),
            tail(&self.host2.log_text(), 40),
        )
    }

    fn label(&self) -> &str {
        &self.label
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.sweep();
        if std::env::var("FERRY_E2E_SHOW_LOG").as_deref() == Ok("1") {
            eprintln!("{}", self.diagnostics());
        }
    }
}

#[test]
fn nfs_volumes_through_two_dockerds_and_compose() {
    let began = Instant::now();
    if let Err(e) = DockerCli::machine().ok(&["info"]) {
        panic!("dockerd is unreachable:\n{e}");
    }
    let lock = lock_docker_tests();
    eprintln!("lock taken after {:?}", began.elapsed());
    let t = Instant::now();
    let nfs = Ganesha::start();
    let run = run_id();
    let tmp = tempfile::Builder::new()
        .prefix("ferry-nfs-docker")
        .tempdir()
        .unwrap();
    let config = tmp.path().join("ferry.toml");
    std::fs::write(&config, nfs.config_section(NFS_TIMEOUT)).unwrap();
    let env = [("FERRY_CONFIG", config.to_str().unwrap())];
    let host1 = SecondDockerd::start_temp();
    let ferry_a = host1.start_ferry(&format!("ferry-nfs-a-{run}"), &env);
    let host2 = SecondDockerd::start_temp();
    let ferry_b = host2.start_ferry(&format!("ferry-nfs-b-{run}"), &env);
    eprintln!(
        "ganesha, two dockerds and two plugins up in {:?}",
        t.elapsed()
    );
    let mut h = Hosts {
        label: format!("{LABEL_KEY}={run}"),
        run,
        project: None,
        ferry_b,
        host2,
        ferry_a,
        host1,
        nfs,
        tmp,
        _lock: lock,
    };
    let (a, b) = (h.a().to_string(), h.b().to_string());

    let t = Instant::now();
    let (built1, built2) = std::thread::scope(|s| {
        let other = s.spawn(|| h.host2.load_image());
        (h.host1.load_image(), other.join().unwrap())
    });
    h.check(built1);
    h.check(built2);
    eprintln!("images built in {:?}", t.elapsed());

    // 1. Host 1: create, write from one container, read back from another, inspect, find it on disk.
    let t = Instant::now();
    let mount = format!("{SHARED}:/data");
    let out = h.on1(&["volume", "create", "-d", &a, "-o", "backend=nfs", SHARED]);
    assert_eq!(out.trim(), SHARED);
    let dir = h.export().join(SHARED);
    h.ensure(dir.is_dir(), || {
        format!("{} is not a directory after create", dir.display())
    });
    let greeting = "hello from host 1\n";
    let data = blob(2 << 20);
    h.run_fed(
        &h.host1,
        greeting.as_bytes(),
        &["-v", &mount, BUSYBOX_IMAGE, "tee", "/data/greeting"],
    );
    h.run_fed(
        &h.host1,
        data.as_bytes(),
        &[
            "-v",
            &mount,
            BUSYBOX_IMAGE,
            "dd",
            "of=/data/blob",
            "bs=65536",
        ],
    );
    // The container's /data is the FUSE mount the helper serves, not a directory under it.
    let out = h.run(
        &h.host1,
        &[
            "-v",
            &mount,
            BUSYBOX_IMAGE,
            "cat",
            "/data/greeting",
            "/proc/mounts",
        ],
    );
    let fstype = out
        .strip_prefix(greeting)
        .and_then(|mounts| {
            mounts
                .lines()
                .find(|l| l.split(' ').nth(1) == Some("/data"))
        })
        .and_then(|l| l.split(' ').nth(2));
    h.ensure(fstype.is_some_and(|t| t.starts_with("fuse")), || {
        format!("host 1's container did not read the greeting from a FUSE mount at /data:\n{out}")
    });
    let out = h.run(
        &h.host1,
        &["-v", &mount, BUSYBOX_IMAGE, "cat", "/data/blob"],
    );
    h.ensure(out == data, || {
        format!(
            "host 1 read back {} bytes of the {}-byte blob, not the same",
            out.len(),
            data.len()
        )
    });
    h.expect_nfs_volume(&h.host1, &a, SHARED);
    assert_eq!(
        std::fs::read_to_string(dir.join("greeting"))
            .ok()
            .as_deref(),
        Some(greeting)
    );
    h.ensure(
        std::fs::read(dir.join("blob")).ok().as_deref() == Some(data.as_bytes()),
        || {
            format!(
                "{} differs from what the container wrote",
                dir.join("blob").display()
            )
        },
    );
    eprintln!("1. host 1 wrote and read back in {:?}", t.elapsed());

    // 2. Host 2 adopts the same directory, reads host 1's data and replies; host 1 reads the reply.
    let t = Instant::now();
    let out = h.on2(&["volume", "create", "-d", &b, "-o", "backend=nfs", SHARED]);
    assert_eq!(out.trim(), SHARED);
    h.expect_nfs_volume(&h.host2, &b, SHARED);
    let out = h.run(
        &h.host2,
        &["-v", &mount, BUSYBOX_IMAGE, "cat", "/data/greeting"],
    );
    assert_eq!(out, greeting, "host 2 read");
    let out = h.run(
        &h.host2,
        &["-v", &mount, BUSYBOX_IMAGE, "cat", "/data/blob"],
    );
    h.ensure(out == data, || {
        format!(
            "host 2 read {} bytes of host 1's blob, not the same",
            out.len()
        )
    });
    let reply = "hello from host 2\n";
    h.run_fed(
        &h.host2,
        reply.as_bytes(),
        &["-v", &mount, BUSYBOX_IMAGE, "tee", "/data/reply"],
    );
    let out = h.run(
        &h.host1,
        &["-v", &mount, BUSYBOX_IMAGE, "cat", "/data/reply"],
    );
    assert_eq!(out, reply, "host 1 read host 2's reply");
    assert_eq!(
        std::fs::read_to_string(dir.join("reply")).ok().as_deref(),
        Some(reply)
    );
    eprintln!("2. host 2 read and replied in {:?}", t.elapsed());

    // 3. A container on host 1 keeps the volume mounted: live sharing, and host 2 cannot remove it.
    let t = Instant::now();
    let id = h.on1(&[
        "run",
        "-d",
        "--network",
        "none",
        "--label",
        &h.label,
        "-v",
        &mount,
        BUSYBOX_IMAGE,
        "sleep",
        "600",
    ]);
    let id = id.trim().to_string();
    h.ensure(Hosts::helpers(&h.ferry_a).len() == 1, || {
        format!(
            "host 1 should run one FUSE helper while its container runs: {:?}",
            Hosts::helpers(&h.ferry_a)
        )
    });
    let live = "written on host 2 while host 1 has it mounted\n";
    h.run_fed(
        &h.host2,
        live.as_bytes(),
        &["-v", &mount, BUSYBOX_IMAGE, "tee", "/data/live"],
    );
    let out = h.on1(&["exec", &id, "cat", "/data/live"]);
    assert_eq!(
        out, live,
        "the running container on host 1 sees host 2's file"
    );
    let refused = h.check(h.host2.docker(&["volume", "rm", SHARED]));
    h.ensure(
        !refused.status.success() && refused.stderr.contains("still mounted on host"),
        || {
            format!(
                "host 2 removed (or failed otherwise to remove) a volume host 1 has mounted: {}\nstdout: {}\nstderr: {}",
                refused.status, refused.stdout, refused.stderr
            )
        },
    );
    h.ensure(dir.join("greeting").exists(), || {
        "the refused removal deleted data".into()
    });
    h.ensure(
        h.volumes(&h.host2) == [(b.clone(), SHARED.to_string())],
        || "host 2 forgot the volume whose removal was refused".into(),
    );
    // Stopped, the container no longer holds the mount (dockerd sends Unmount as it stops): host 2 may
    // remove the volume now. Unmount may finish just after `docker stop` returns: retry while refused.
    h.on1(&["stop", "-t", "0", &id]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = h.check(h.host2.docker(&["volume", "rm", SHARED]));
        if out.status.success() {
            break;
        }
        h.ensure(
            out.stderr.contains("still mounted on host") && Instant::now() < deadline,
            || {
                format!(
                    "host 2 cannot remove the volume host 1 stopped using: {}\n{}",
                    out.status, out.stderr
                )
            },
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    h.ensure(!dir.exists(), || {
        format!("{} survived the removal on host 2", dir.display())
    });
    h.ensure(h.volumes(&h.host2).is_empty(), || {
        "host 2 still lists a volume".into()
    });
    // Host 1 still has its record (and the stopped container); removing both works.
    h.on1(&["rm", &id]);
    h.on1(&["volume", "rm", SHARED]);
    h.ensure(h.volumes(&h.host1).is_empty(), || {
        "host 1 still lists a volume".into()
    });
    eprintln!(
        "3. removal refused while mounted elsewhere, then done, in {:?}",
        t.elapsed()
    );

    // 4. Compose on host 1: a project volume with driver_opts, written by a service, removed by `down -v`.
    let t = Instant::now();
    // Letters and digits only, so compose's "legacy" volume name (the project name without - and _) is the
    // same and `down` finds it at once.
    let project = format!("ferrynfs{}", h.run.replace('-', ""));
    let file = h.tmp.path().join("docker-compose.yml");
    let yaml = format!(
        r#"version: "3.7"
services:
  writer:
    image: {BUSYBOX_IMAGE}
    network_mode: none
    labels:
      {LABEL_KEY}: "{run}"
    command: ["cp", "/bin/busybox", "/data/busybox-copy"]
    volumes:
      - data:/data
volumes:
  data:
    driver: {a}
    driver_opts:
      backend: nfs
"#,
        run = h.run,
    );
    std::fs::write(&file, yaml).unwrap();
    h.project = Some((project.clone(), file.clone()));
    h.compose(
        &project,
        &file,
        &[
            "up",
            "--abort-on-container-exit",
            "--exit-code-from",
            "writer",
        ],
    );
    let vol = format!("{project}_data");
    h.expect_nfs_volume(&h.host1, &a, &vol);
    let info = h.inspect(&h.host1, &vol);
    h.ensure(
        info["Labels"]["com.docker.compose.project"] == project.as_str(),
        || format!("compose's volume lacks its project label: {info:#}"),
    );
    let copy = h.export().join(&vol).join("busybox-copy");
    let original = std::fs::read(BUSYBOX).unwrap();
    h.ensure(std::fs::read(&copy).ok() == Some(original), || {
        format!("{} is not a copy of {BUSYBOX}", copy.display())
    });
    h.compose(&project, &file, &["down", "-v"]);
    h.project = None;
    h.ensure(!h.export().join(&vol).exists(), || {
        format!("`docker-compose down -v` left {vol} in the export")
    });
    h.ensure(h.volumes(&h.host1).is_empty(), || {
        "host 1 still lists a volume after `down -v`".into()
    });
    eprintln!("4. compose up and down -v in {:?}", t.elapsed());

    // 5. `--mount` with volume-driver and volume-opt creates a named volume that outlives `--rm`.
    let t = Instant::now();
    let named = "mounted";
    let spec = format!("type=volume,src={named},dst=/d,volume-driver={a},volume-opt=backend=nfs");
    let note = "made through --mount\n";
    h.run_fed(
        &h.host1,
        note.as_bytes(),
        &["--mount", &spec, BUSYBOX_IMAGE, "tee", "/d/note"],
    );
    h.ensure(
        h.volumes(&h.host1) == [(a.clone(), named.to_string())],
        || "the --mount volume did not outlive its --rm container".into(),
    );
    h.expect_nfs_volume(&h.host1, &a, named);
    assert_eq!(
        std::fs::read_to_string(h.export().join(named).join("note"))
            .ok()
            .as_deref(),
        Some(note)
    );
    h.on1(&["volume", "rm", named]);
    h.ensure(!h.export().join(named).exists(), || {
        format!("{named} survived its removal")
    });
    eprintln!("5. --mount volume in {:?}", t.elapsed());

    h.expect_nothing_mounted();
    // Nothing of ours is left in the export but Ferry's own marker area.
    let left: Vec<String> = std::fs::read_dir(h.export())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    h.ensure(left.is_empty(), || format!("left in the export: {left:?}"));

    let t = Instant::now();
    drop(h);
    eprintln!("cleaned up in {:?}", t.elapsed());
    eprintln!("whole test: {:?}", began.elapsed());
}

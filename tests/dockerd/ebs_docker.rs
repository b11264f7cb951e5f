//! The ebs backend end to end, through real dockerds and the `docker` CLI, with moto as the EBS and EC2
//! service both "hosts" share.
//!
//! Both hosts are second dockerds (`scripts/second-dockerd`, see tests/common/docker2.rs), each with its own
//! mount namespace and its own Ferry (own state directory, own cache of local copies) registered as a legacy
//! plugin in that dockerd's private plugin directory and configured (`FERRY_CONFIG`) with an `[ebs]`
//! section pointing at moto. The machine's dockerd is only asked `docker info`.
//!
//! In order, in one test:
//!  1. host 1 creates `moving` with `-o backend=ebs -o size=64MiB`; a container writes data through stdin
//!     and stops, so the last unmount ships generation 1; `docker volume inspect` shows the generation;
//!  2. host 2 creates `moving` with the same options (adopting it: inspect shows generation 1 before any
//!     mount), and a container there reads exactly what host 1 wrote, then writes a reply and stops
//!     (generation 2);
//!  3. a container on host 1 reads the reply: host 1's copy was stale and was pulled again, never mounted
//!     as it was;
//!  4. `docker volume rm` on host 2 deletes the snapshots from moto, and on host 1 its record and copy;
//!     nothing is left mounted and no secret reached a log.
//!
//! It fails when the machine's dockerd is unreachable and when moto
//! cannot be installed. It holds the lock of tests/dockerd/docker.rs while it runs. A failure prints both Ferry logs
//! and the end of both dockerd logs.

use crate::docker2;
use crate::e2e;
use crate::moto;

use std::process::Command;

use docker2::{
    tail, DockerCli, FerryPlugin, SecondDockerd, TwoHosts, BUSYBOX_IMAGE, COMMAND_TIMEOUT,
};
use e2e::{lock_docker_tests, run_id};
use serde_json::Value;

const LABEL_KEY: &str = "ferry-ebs-docker";
const VOLUME: &str = "moving";

/// Text of ~`size` bytes that differs line by line.
fn blob(size: usize) -> String {
    let mut s = String::with_capacity(size + 64);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut i = 0u64;
    while s.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(&format!("{i:08} {x:016x}\n"));
        i += 1;
    }
    s
}

struct Hosts {
    label: String,
    ferry_b: FerryPlugin,
    host2: SecondDockerd,
    ferry_a: FerryPlugin,
    host1: SecondDockerd,
    moto: moto::Moto,
    _tmp: tempfile::TempDir,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl TwoHosts for Hosts {
    fn diagnostics(&self) -> String {
        format!(
            "--- ferry log, host 1 ---\n{}\n--- ferry log, host 2 ---\n{}\n--- end of moto log ---\n{}\n\
             --- end of dockerd log, host 1 ---\n{}\n--- end of dockerd log, host 2 ---\n{}",
            self.ferry_a.log_text(),
            self.ferry_b.log_text(),
            tail(&self.moto.log(), 20),
            tail(&self.host1.log_text(), 40),
            tail(&self.host2.log_text(), 40),
        )
    }

    fn label(&self) -> &str {
        &self.label
    }
}

impl Hosts {
    fn status(&self, host: &SecondDockerd, volume: &str) -> Value {
        self.inspect(host, volume)["Status"].clone()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.host1.cli().sweep(&self.label, self.ferry_a.name());
        self.host2.cli().sweep(&self.label, self.ferry_b.name());
        if std::env::var("FERRY_E2E_SHOW_LOG").as_deref() == Ok("1") {
            eprintln!("{}", self.diagnostics());
        }
    }
}

#[test]
fn ebs_volume_moves_between_two_dockerds() {
    if let Err(e) = DockerCli::machine().ok(&["info"]) {
        panic!("dockerd is unreachable:\n{e}");
    }
    let lock = lock_docker_tests();
    let moto = moto::Moto::start();
    let run = run_id();
    let tmp = tempfile::Builder::new()
        .prefix("ferry-ebs-docker")
        .tempdir()
        .unwrap();
    let config = tmp.path().join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            "[ebs]\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\n{}",
            moto.endpoint(),
            moto::Moto::EBS_LINES
        ),
    )
    .unwrap();
    let mut env = vec![("FERRY_CONFIG", config.to_str().unwrap())];
    env.extend(moto::TEST_AWS_ENV);
    let host1 = SecondDockerd::start_temp();
    let ferry_a = host1.start_ferry(&format!("ferry-ebs-a-{run}"), &env);
    let host2 = SecondDockerd::start_temp();
    let ferry_b = host2.start_ferry(&format!("ferry-ebs-b-{run}"), &env);
    let h = Hosts {
        label: format!("{LABEL_KEY}={run}"),
        ferry_b,
        host2,
        ferry_a,
        host1,
        moto,
        _tmp: tmp,
        _lock: lock,
    };
    let (a, b) = (h.ferry_a.name().to_string(), h.ferry_b.name().to_string());
    let (built1, built2) = std::thread::scope(|s| {
        let other = s.spawn(|| h.host2.load_image());
        (h.host1.load_image(), other.join().unwrap())
    });
    h.check(built1);
    h.check(built2);
    let mount = format!("{VOLUME}:/data");

    // 1. Host 1 writes; the container's stop ships generation 1.
    let out = h.on(
        &h.host1,
        &[
            "volume",
            "create",
            "-d",
            &a,
            "-o",
            "backend=ebs",
            "-o",
            "size=64MiB",
            VOLUME,
        ],
    );
    assert_eq!(out.trim(), VOLUME);
    let data = blob(3 << 20);
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
    let s = h.status(&h.host1, VOLUME);
    h.ensure(
        s["backend"] == "ebs" && s["generation"] == 1 && s["health"] == "ok",
        || format!("host 1 after the first container: {s:#}"),
    );

    // 2. Host 2 adopts the volume by name and options, and its container reads host 1's data.
    h.on(
        &h.host2,
        &[
            "volume",
            "create",
            "-d",
            &b,
            "-o",
            "backend=ebs",
            "-o",
            "size=64MiB",
            VOLUME,
        ],
    );
    let s = h.status(&h.host2, VOLUME);
    h.ensure(s["generation"] == 1, || {
        format!("host 2 did not adopt: {s:#}")
    });
    let out = h.run(
        &h.host2,
        &["-v", &mount, BUSYBOX_IMAGE, "cat", "/data/blob"],
    );
    h.ensure(out == data, || {
        format!(
            "host 2 read {} bytes, not host 1's {} bytes",
            out.len(),
            data.len()
        )
    });
    h.run_fed(
        &h.host2,
        b"reply from host 2\n",
        &["-v", &mount, BUSYBOX_IMAGE, "tee", "/data/reply"],
    );
    let s = h.status(&h.host2, VOLUME);
    h.ensure(s["generation"].as_u64() >= Some(2), || {
        format!("host 2 did not ship its reply: {s:#}")
    });

    // 3. Host 1's copy is stale now; its next container sees the reply.
    let out = h.run(
        &h.host1,
        &["-v", &mount, BUSYBOX_IMAGE, "cat", "/data/reply"],
    );
    h.ensure(out == "reply from host 2\n", || {
        format!("host 1 read {out:?} instead of host 2's reply")
    });

    // 4. Removing on host 2 deletes the snapshots from moto; host 1 then removes its record and copy.
    h.on(&h.host2, &["volume", "rm", VOLUME]);
    h.on(&h.host1, &["volume", "rm", VOLUME]);
    let out = h.check(docker2::run_command_ok(
        {
            let mut c = Command::new("curl");
            c.args(["-s", "-X", "POST", "-d"])
                .arg("Action=DescribeSnapshots&Version=2016-11-15&Filter.1.Name=tag:ferry:volume&Filter.1.Value.1=moving")
                .arg(h.moto.endpoint());
            c
        },
        COMMAND_TIMEOUT,
    ));
    h.ensure(!out.contains("<snapshotId>"), || {
        format!("snapshots left in moto after both removals: {out}")
    });
    for text in [h.ferry_a.log_text(), h.ferry_b.log_text()] {
        h.ensure(!text.contains(moto::TEST_SECRET), || {
            "a secret reached a log".into()
        });
    }
    let left = [
        h.host1.mounts_under(&h.ferry_a.state),
        h.host2.mounts_under(&h.ferry_b.state),
    ];
    h.ensure(left.iter().all(Vec::is_empty), || {
        format!("mounts left: {left:?}")
    });
}

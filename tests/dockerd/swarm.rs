//! The headline of cluster mode: a Docker Swarm of two dockerds, each with its own Ferry in cluster mode on
//! one etcd, runs a one-replica service whose ebs volume and single-writer nfs volume come from Ferry; the
//! service writes; its node is drained; the task starts on the other node and finds its data.
//!
//! Both dockerds are second dockerds (scripts/second-dockerd), each in an empty network namespace of its
//! own; a veth pair joins the two namespaces so that the Swarm's managers and workers reach each other
//! (2377, 7946). The Ferry daemons run in each host's mount namespace and the machine's network namespace,
//! where etcd, moto and NFS-Ganesha listen on loopback.

use std::process::Command;
use std::time::Duration;

use crate::cluster::{eventually, Etcd};
use crate::docker2::{FerryPlugin, SecondDockerd, BUSYBOX_IMAGE};
use crate::e2e::{lock_docker_tests, run_id};
use crate::ganesha::Ganesha;
use crate::moto::{Moto, TEST_AWS_ENV};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `ip ARGS` in the network namespace of process `pid`.
fn ip_in(pid: &str, args: &[&str]) {
    let out = Command::new("nsenter")
        .args(["-t", pid, "-n", "ip"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {args:?} in {pid}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn dockerd_pid(d: &SecondDockerd) -> String {
    std::fs::read_to_string(d.dir().join("docker.pid"))
        .unwrap()
        .trim()
        .to_string()
}

/// Joins the two hosts' network namespaces with a veth pair: 10.79.0.1 and 10.79.0.2.
fn link(a: &SecondDockerd, b: &SecondDockerd, tag: &str) {
    let (pa, pb) = (dockerd_pid(a), dockerd_pid(b));
    let (va, vb) = (format!("fsw{tag}a"), format!("fsw{tag}b"));
    ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
    ip(&["link", "set", &va, "netns", &pa]);
    ip(&["link", "set", &vb, "netns", &pb]);
    for (pid, dev, addr) in [(&pa, &va, "10.79.0.1/24"), (&pb, &vb, "10.79.0.2/24")] {
        ip_in(pid, &["link", "set", "lo", "up"]);
        ip_in(pid, &["addr", "add", addr, "dev", dev]);
        ip_in(pid, &["link", "set", dev, "up"]);
    }
}

struct Swarm {
    service: String,
    volumes: Vec<String>,
    ferry_b: FerryPlugin,
    ferry_a: FerryPlugin,
    b: SecondDockerd,
    a: SecondDockerd,
}

impl Swarm {
    fn fail(&self, what: &str) -> ! {
        panic!(
            "{what}\n--- ferry A ---\n{}\n--- ferry B ---\n{}\n--- dockerd A ---\n{}\n--- dockerd B ---\n{}",
            tail(&self.ferry_a.log_text(), 60),
            tail(&self.ferry_b.log_text(), 60),
            tail(&self.a.log_text(), 30),
            tail(&self.b.log_text(), 30)
        )
    }

    /// The container of the service's running task on `d`, if any.
    fn task_on(&self, d: &SecondDockerd) -> Option<String> {
        let label = format!("label=com.docker.swarm.service.name={}", self.service);
        let out = d.docker_ok(&["ps", "-q", "--filter", &label]).ok()?;
        out.lines().next().map(str::to_string)
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        let _ = self.a.docker(&["service", "rm", &self.service]);
        for d in [&self.a, &self.b] {
            let _ = eventually(Duration::from_secs(30), || self.task_on(d).is_none());
        }
        for v in &self.volumes {
            let _ = eventually(Duration::from_secs(20), || {
                self.a
                    .docker(&["volume", "rm", v])
                    .map(|o| o.status.success())
                    .unwrap_or(false)
            });
        }
        let _ = self.b.docker(&["swarm", "leave", "--force"]);
        let _ = self.a.docker(&["swarm", "leave", "--force"]);
    }
}

fn refs(e: &[(String, String)]) -> Vec<(&str, &str)> {
    e.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[test]
fn swarm_service_moves_to_another_node_with_its_ebs_and_nfs_data() {
    let _lock = lock_docker_tests();
    let run = run_id();
    let moto = Moto::start();
    let etcd = Etcd::start_on("127.0.0.1", 3);
    let ganesha = Ganesha::start();
    let a = SecondDockerd::start_temp();
    let b = SecondDockerd::start_temp();
    link(&a, &b, &format!("{}", std::process::id() % 10000));
    for d in [&a, &b] {
        d.load_image().unwrap();
    }
    let plugin = format!("ferry-sw-{run}");
    let endpoints: Vec<String> = etcd
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    let config = |node: &str| {
        let path = std::env::temp_dir().join(format!("ferry-swarm-{run}-{node}.toml"));
        std::fs::write(
            &path,
            format!(
                "{}[ebs]\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\n{}[cluster]\netcd = [{}]\nnode = \"{node}\"\nprefix = \"/ferry-swarm-{run}\"\nlease_ttl = \"4s\"\n",
                ganesha.config_section("10s"),
                moto.endpoint(),
                Moto::EBS_LINES,
                endpoints.join(", ")
            ),
        )
        .unwrap();
        path
    };
    let (ca, cb) = (config("node-a"), config("node-b"));
    let env_for = |c: &std::path::Path| -> Vec<(String, String)> {
        let mut e: Vec<(String, String)> = TEST_AWS_ENV
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        e.push(("FERRY_CONFIG".into(), c.to_str().unwrap().to_string()));
        e
    };
    let (ea, eb) = (env_for(&ca), env_for(&cb));
    let (ea, eb) = (refs(&ea), refs(&eb));
    let ferry_a = a.start_ferry(&plugin, &ea);
    let ferry_b = b.start_ferry(&plugin, &eb);
    let service = format!("ferry-sw-{run}");
    let (ev, nv) = (format!("swe-{run}"), format!("swn-{run}"));
    let s = Swarm {
        service: service.clone(),
        volumes: vec![ev.clone(), nv.clone()],
        ferry_b,
        ferry_a,
        b,
        a,
    };
    let check = |r: Result<String, String>| r.unwrap_or_else(|e| s.fail(&e));
    check(s.a.docker_ok(&["swarm", "init", "--advertise-addr", "10.79.0.1"]));
    let token = check(s.a.docker_ok(&["swarm", "join-token", "-q", "worker"]));
    check(s.b.docker_ok(&[
        "swarm",
        "join",
        "--token",
        token.trim(),
        "--advertise-addr",
        "10.79.0.2",
        "10.79.0.1:2377",
    ]));
    // The volumes, made through one host; the other host's Docker learns of them through its own Ferry.
    check(s.a.docker_ok(&[
        "volume",
        "create",
        "--driver",
        &plugin,
        "-o",
        "backend=ebs",
        "-o",
        "size=64MiB",
        &ev,
    ]));
    check(s.a.docker_ok(&[
        "volume",
        "create",
        "--driver",
        &plugin,
        "-o",
        "backend=nfs",
        "-o",
        "access=single",
        &nv,
    ]));
    // A legacy plugin is part of a node's description only once its dockerd activated it; Swarm places
    // tasks only on nodes whose description has the volume's driver.
    let listed = check(s.b.docker_ok(&["volume", "ls", "--format", "{{.Name}}"]));
    assert!(
        listed.contains(&ev) && listed.contains(&nv),
        "host B lists the cluster's volumes: {listed}"
    );
    let described = eventually(Duration::from_secs(60), || {
        let out = s.a.docker_ok(&["node", "ls", "-q"]).unwrap_or_default();
        let nodes: Vec<&str> = out.lines().collect();
        nodes.len() == 2
            && nodes.iter().all(|n| {
                s.a.docker_ok(&[
                    "node",
                    "inspect",
                    n,
                    "--format",
                    "{{json .Description.Engine.Plugins}}",
                ])
                .map(|p| p.contains(&plugin))
                .unwrap_or(false)
            })
    });
    if !described {
        s.fail("the nodes' descriptions never listed the plugin");
    }
    let emount = format!(
        "type=volume,src={ev},dst=/e,volume-driver={plugin},volume-opt=backend=ebs,volume-opt=size=64MiB"
    );
    let nmount = format!(
        "type=volume,src={nv},dst=/n,volume-driver={plugin},volume-opt=backend=nfs,volume-opt=access=single"
    );
    check(s.a.docker_ok(&[
        "service",
        "create",
        "--detach",
        "--name",
        &service,
        "--replicas",
        "1",
        "--no-resolve-image",
        "--mount",
        &emount,
        "--mount",
        &nmount,
        BUSYBOX_IMAGE,
        "sh",
        "-c",
        "while true; do sleep 1; done",
    ]));
    let mut first = None;
    if !eventually(Duration::from_secs(90), || {
        first = [&s.a, &s.b]
            .into_iter()
            .find_map(|d| s.task_on(d).map(|c| (std::ptr::eq(d, &s.a), c)));
        first.is_some()
    }) {
        s.fail("the service's task never ran");
    }
    let (on_a, container) = first.unwrap();
    let (from, to) = if on_a { (&s.a, &s.b) } else { (&s.b, &s.a) };
    let written = check(from.docker_ok(&[
        "exec",
        &container,
        "sh",
        "-c",
        "head -c 3000000 /dev/urandom > /e/blob && head -c 200000 /dev/urandom > /n/blob && sync && \
         sha256sum /e/blob /n/blob | cut -d' ' -f1",
    ]));
    let node = check(from.docker_ok(&["info", "--format", "{{.Swarm.NodeID}}"]));
    check(s.a.docker_ok(&["node", "update", "--availability", "drain", node.trim()]));
    let mut moved = None;
    if !eventually(Duration::from_secs(120), || {
        moved = s.task_on(to);
        moved.is_some()
    }) {
        s.fail("the task never started on the other node after the drain");
    }
    let found = check(to.docker_ok(&[
        "exec",
        &moved.unwrap(),
        "sh",
        "-c",
        "sha256sum /e/blob /n/blob | cut -d' ' -f1",
    ]));
    assert_eq!(
        found.trim(),
        written.trim(),
        "the moved task finds its data"
    );
    assert!(s.task_on(from).is_none(), "one replica, on one node");
    drop(s);
    drop(ganesha);
    drop(etcd);
    drop(moto);
}

//! The test infrastructure of cluster mode (tests/common/cluster.rs) against the real things it drives:
//! network namespaces on a private bridge, a three-member etcd cluster, moto and the strict EBS emulator on
//! the bridge's gateway, and `ferry serve` running in a host's namespace.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cluster::{cluster_config, eventually, moto_on, unique_prefix, Etcd, HostNet, Net};
use crate::common::{Daemon, SpawnOptions};
use crate::ebs_strict::StrictEbs;
use crate::moto::TEST_AWS_ENV;

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The key's value as `host` reads it through `endpoints`, or `None` when etcd cannot be reached.
fn get(host: &HostNet, endpoints: &[String], key: &str) -> Option<String> {
    let out = host
        .etcdctl(endpoints)
        .args(["get", key, "--print-value-only"])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// One HTTP/1.0 GET; the status line, or the error.
fn http_get(addr: &str, path: &str) -> Result<String, std::io::Error> {
    let addr = addr.parse().unwrap();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok(reply.lines().next().unwrap_or_default().to_string())
}

#[test]
fn cluster_infra_etcd_from_namespaces_through_a_partition_and_a_lost_member() {
    let mut net = Net::new();
    let h1 = net.host(1);
    let h2 = net.host(2);
    let etcd = Etcd::start(&net);
    let all = etcd.endpoints();
    let key = format!("{}/k", unique_prefix("infra"));

    ok(h1.etcdctl(&all).args(["put", &key, "from-1"]));
    assert_eq!(get(&h2, &all, &key).as_deref(), Some("from-1"));

    net.cut(1);
    let started = Instant::now();
    assert_eq!(get(&h1, &all, &key), None, "host 1 still reaches etcd");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a cut host took {:?} to fail",
        started.elapsed()
    );
    assert_eq!(get(&h2, &all, &key).as_deref(), Some("from-1"));
    // Nothing else on the gateway answers host 1 either.
    let member = format!("{}:{}", net.gateway(), etcd.base + 1);
    assert!(h1.run(move || http_get(&member, "/health")).is_err());

    net.heal(1);
    assert!(
        eventually(Duration::from_secs(15), || get(&h1, &all, &key).as_deref()
            == Some("from-1")),
        "host 1 does not reach etcd again after heal"
    );

    // One member down: the other two still hold a quorum, once they have elected a leader if the dead
    // member led (seconds on a loaded machine; requests time out meanwhile).
    etcd.kill(1);
    let rest = vec![etcd.endpoint(2), etcd.endpoint(3)];
    assert!(
        eventually(Duration::from_secs(15), || h2
            .etcdctl(&rest)
            .args(["put", &key, "after-kill"])
            .output()
            .unwrap()
            .status
            .success()),
        "the two members left do not answer:\n{}",
        etcd.log(2)
    );
    assert_eq!(get(&h1, &rest, &key).as_deref(), Some("after-kill"));
    assert_eq!(get(&h1, &[etcd.endpoint(1)], &key), None);

    // The member comes back on its data and catches up.
    etcd.restart(1);
    assert_eq!(
        get(&h1, &[etcd.endpoint(1)], &key).as_deref(),
        Some("after-kill")
    );
}

#[test]
fn cluster_infra_etcd_stops_and_starts_on_its_data() {
    let net = Net::new();
    let etcd = Etcd::start(&net);
    let all = etcd.endpoints();
    let key = format!("{}/kept", unique_prefix("infra"));
    ok(crate::cluster::etcdctl(&all).args(["put", &key, "kept"]));
    etcd.stop_all();
    for i in 1..=3 {
        assert!(
            !Path::new(&etcd.dir.join(format!("m{i}.pid"))).exists(),
            "member {i} still recorded as running"
        );
    }
    let out = crate::cluster::etcdctl(&all)
        .args(["get", &key])
        .output()
        .unwrap();
    assert!(!out.status.success(), "etcd answers while stopped");
    etcd.start_all();
    let value = ok(crate::cluster::etcdctl(&all).args(["get", &key, "--print-value-only"]));
    assert_eq!(value.trim(), "kept");
}

/// A daemon in `host`'s network namespace with its [ebs] section on moto at `endpoint`.
fn ebs_daemon(host: &HostNet, endpoint: &str) -> (tempfile::TempDir, Daemon) {
    let tmp = tempfile::Builder::new()
        .prefix(&format!("ferry-infra-{}-", host.n))
        .tempdir()
        .unwrap();
    let config = tmp.path().join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            "[ebs]\nregion = \"us-east-1\"\nendpoint_url = \"{endpoint}\"\n{}",
            crate::moto::Moto::EBS_LINES
        ),
    )
    .unwrap();
    let mut env = vec![("FERRY_CONFIG", config.to_str().unwrap())];
    env.extend(TEST_AWS_ENV);
    let d = Daemon::start_with(
        tmp.path(),
        &tmp.path().join("ferry.sock"),
        &env,
        SpawnOptions {
            netns: Some(host.netns_path()),
            ..Default::default()
        },
    );
    (tmp, d)
}

#[test]
fn cluster_infra_peers_on_the_gateway_serve_daemons_in_namespaces() {
    let mut net = Net::new();
    let h1 = net.host(1);
    let h2 = net.host(2);
    let moto = moto_on(&net);
    let addr = format!("{}:{}", moto.host, moto.port);
    let seen = addr.clone();
    let status = h1.run(move || http_get(&seen, "/moto-api/")).unwrap();
    assert!(status.contains(" 200 "), "{status}");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let strict = rt.block_on(StrictEbs::start_on(net.gateway().parse().unwrap(), 7));
    let strict_addr = strict.addr.to_string();
    let status = h2
        .run(move || http_get(&strict_addr, "/snapshots/snap-none/blocks"))
        .unwrap();
    assert!(status.starts_with("HTTP/1."), "{status}");
    assert!(
        strict
            .counters()
            .calls
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );

    // Daemons in the namespaces: their network is the host's, their mounts are the test's.
    let (_ta, a) = ebs_daemon(&h1, &moto.endpoint());
    let (_tb, b) = ebs_daemon(&h2, &moto.endpoint());
    let netns_of = |pid: u32| {
        std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .unwrap()
            .ino()
    };
    assert_eq!(
        netns_of(a.pid()),
        std::fs::metadata(h1.netns_path()).unwrap().ino()
    );
    assert_ne!(netns_of(a.pid()), netns_of(std::process::id()));
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/ns/mnt", a.pid())).unwrap(),
        std::fs::read_link("/proc/self/ns/mnt").unwrap()
    );

    a.create("shared", r#"{"backend":"ebs","size":"64MiB"}"#);
    let m = a.mount("shared", "c1");
    std::fs::write(m.join("hello"), b"from host 1").unwrap();
    a.unmount("shared", "c1");
    b.create("shared", r#"{"backend":"ebs","size":"64MiB"}"#);
    let m = b.mount("shared", "c2");
    assert_eq!(std::fs::read(m.join("hello")).unwrap(), b"from host 1");
    b.unmount("shared", "c2");

    // Cut off, host 1 reaches moto no more; host 2 still does.
    net.cut(1);
    let seen = addr.clone();
    assert!(h1.run(move || http_get(&seen, "/moto-api/")).is_err());
    let seen = addr.clone();
    assert!(h2.run(move || http_get(&seen, "/moto-api/")).is_ok());
    drop(strict);
    drop(rt);
}

#[test]
fn cluster_infra_config_carries_the_cluster_section_and_extra_keys() {
    let dir = tempfile::tempdir().unwrap();
    let endpoints = vec!["http://10.77.3.1:23791".to_string()];
    let path = cluster_config(
        dir.path(),
        &endpoints,
        "host-a",
        "/ferry-test-xyz",
        "4s",
        "default_backend = \"ebs\"\n[cluster]\nuser = \"ferry\"\nlease_ttl = \"9s\"\n[metrics]\nlisten = \"127.0.0.1:1\"\n",
    );
    let text = std::fs::read_to_string(&path).unwrap();
    let t: toml::Table = text.parse().unwrap();
    assert_eq!(t["default_backend"].as_str(), Some("ebs"), "{text}");
    let c = t["cluster"].as_table().unwrap();
    assert_eq!(
        c["etcd"].as_array().unwrap()[0].as_str(),
        Some(endpoints[0].as_str())
    );
    assert_eq!(c["node"].as_str(), Some("host-a"));
    assert_eq!(c["prefix"].as_str(), Some("/ferry-test-xyz"));
    assert_eq!(c["lease_ttl"].as_str(), Some("9s"), "extra keys win");
    assert_eq!(c["user"].as_str(), Some("ferry"));
    assert_eq!(t["metrics"]["listen"].as_str(), Some("127.0.0.1:1"));
}

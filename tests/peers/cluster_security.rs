//! Cluster mode against an etcd secured as in production: client URLs over TLS that demand a client
//! certificate, and etcd's own authentication with a user whose role reaches only the cluster's prefix.
//! Hosts run in network namespaces as in cluster_mode.rs; the certificates are throw-away ones made with
//! openssl for each test. Misconfigurations must answer with errors that say what is wrong, quickly, and
//! the password must never show.

use std::collections::BTreeSet;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster::{cluster_config, eventually, random, unique_prefix, Certs, Etcd, Host, Net};
use crate::common::{self, Daemon};

/// The etcd user the hosts log in as: distinctive, so an error that names it is told apart from one that
/// merely says "ferry".
const USER: &str = "volume-agent";

/// A password unlike anything else a log or an answer could contain.
fn secret(label: &str) -> String {
    format!("Pw-{label}-{:016x}", random())
}

/// Writes `password` to a root-only file in `dir`, as an operator would keep it.
fn password_file(dir: &Path, name: &str, password: &str) -> PathBuf {
    use std::io::Write;
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .unwrap();
    writeln!(f, "{password}").unwrap();
    path
}

/// `[cluster]` keys for TLS with `certs`' client certificate, logging in as `user` with `password_file`.
fn auth_toml(certs: &Certs, user: &str, password_file: &Path) -> String {
    format!(
        "{}user = {user:?}\npassword_file = {:?}\n",
        certs.cluster_toml(),
        password_file.to_str().unwrap()
    )
}

fn names(d: &Daemon) -> BTreeSet<String> {
    d.ok("/VolumeDriver.List", "{}")["Volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["Name"].as_str().unwrap().to_string())
        .collect()
}

fn create_body(name: &str) -> String {
    format!(r#"{{"Name":"{name}","Opts":{{}}}}"#)
}

/// Runs `ferry serve` with `config` and waits (20 s at most) for it to exit, as it must when the
/// configuration cannot work; returns whether it succeeded and everything it printed.
fn serve_exits(dir: &Path, config: &Path) -> (bool, String) {
    let out_path = dir.join("serve.out");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut child = Command::new(common::ferry_bin())
        .arg("serve")
        .arg("--socket")
        .arg(dir.join("ferry.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("FERRY_CONFIG", config)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "ferry serve still runs after 20 s:\n{}",
                std::fs::read_to_string(&out_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (
        status.success(),
        std::fs::read_to_string(&out_path).unwrap(),
    )
}

/// `"deleted a simple token"` lines for `user` in member 1's log: etcd deletes a token when its TTL has
/// passed unused, and every member applies the same deletions.
fn tokens_expired(etcd: &Etcd, user: &str) -> usize {
    etcd.log(1)
        .lines()
        .filter(|l| {
            l.contains(r#""msg":"deleted a simple token""#)
                && l.contains(&format!(r#""user-name":"{user}""#))
        })
        .count()
}

fn logins(h: &Host) -> usize {
    h.daemon.log_text().matches("logged in to etcd").count()
}

#[test]
fn cluster_over_tls_with_a_password_shares_volumes_and_never_shows_the_password() {
    let mut net = Net::new();
    let certs = Certs::for_net(&net);
    let etcd = Etcd::start_tls(&net, &certs);
    let prefix = unique_prefix("tls");
    let password = secret("ok");
    etcd.enable_auth(USER, &password, &prefix);
    let secrets = tempfile::tempdir().unwrap();
    let file = password_file(secrets.path(), "etcd-password", &password);
    let extra = auth_toml(&certs, USER, &file);
    let a = Host::start(&mut net, 1, &etcd, &prefix, &extra, &[]);
    let b = Host::start(&mut net, 2, &etcd, &prefix, &extra, &[]);
    assert!(etcd.endpoints().iter().all(|e| e.starts_with("https://")));

    a.daemon.create("shared", "{}");
    assert!(
        eventually(Duration::from_secs(10), || names(&b.daemon)
            .contains("shared")),
        "host-2's List: {:?}",
        names(&b.daemon)
    );
    let seen = b.daemon.get("shared");
    assert_eq!(seen["Status"]["cluster"]["created_by"], "host-1", "{seen}");
    for h in [&a, &b] {
        let caps = h.daemon.ok("/VolumeDriver.Capabilities", "{}");
        assert_eq!(caps["Capabilities"]["Scope"], "global", "{caps}");
        assert!(logins(h) >= 1, "{} never logged in", h.node);
    }

    // The definition really is in etcd, readable by Ferry's user...
    let as_user = etcd
        .etcdctl()
        .args(["--user", USER, "--password", &password])
        .args(["get", "--prefix", "--keys-only", &format!("{prefix}/v/")])
        .output()
        .unwrap();
    let keys = String::from_utf8_lossy(&as_user.stdout);
    assert!(
        as_user.status.success() && keys.contains(&format!("{prefix}/v/shared")),
        "{keys} {}",
        String::from_utf8_lossy(&as_user.stderr)
    );
    // ...and etcd keeps it from a client that has no user, and from one that has no certificate.
    let anonymous = etcd
        .etcdctl()
        .args(["get", "--prefix", &format!("{prefix}/")])
        .output()
        .unwrap();
    assert!(
        !anonymous.status.success(),
        "etcd answered a client without a user: {}",
        String::from_utf8_lossy(&anonymous.stdout)
    );
    let no_cert = crate::cluster::etcdctl(&etcd.endpoints())
        .arg("--cacert")
        .arg(certs.ca())
        .args(["get", "--prefix", &format!("{prefix}/")])
        .output()
        .unwrap();
    assert!(
        !no_cert.status.success(),
        "etcd answered a client without a certificate"
    );

    for h in [&a, &b] {
        let get = serde_json::to_string(&h.daemon.get("shared")).unwrap();
        let inspect = h.operator(&["inspect", "shared"]);
        let hosts = h.operator(&["hosts", "--json"]);
        assert!(inspect.contains("shared"), "{inspect}");
        assert!(
            hosts.contains("host-1") && hosts.contains("host-2"),
            "{hosts}"
        );
        let log = h.daemon.log_text();
        for (what, text) in [
            ("the log", &log),
            ("Get", &get),
            ("ferry inspect", &inspect),
            ("ferry hosts --json", &hosts),
        ] {
            assert!(
                !text.contains(&password),
                "{}'s {what} shows the password",
                h.node
            );
        }
    }
}

#[test]
fn cluster_with_a_wrong_ca_fails_fast_naming_etcd() {
    let mut net = Net::new();
    let certs = Certs::for_net(&net);
    let stranger = Certs::for_net(&net);
    let etcd = Etcd::start_tls(&net, &certs);
    let prefix = unique_prefix("wrong-ca");
    // The right client certificate, but trust in a CA that did not sign etcd's certificate.
    let extra = format!(
        "[cluster]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        stranger.ca().to_str().unwrap(),
        certs.client_cert().to_str().unwrap(),
        certs.client_key().to_str().unwrap()
    );
    let h = Host::start(&mut net, 1, &etcd, &prefix, &extra, &[]);

    let started = Instant::now();
    let err = h.daemon.err("/VolumeDriver.Create", &create_body("v"));
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "Create took {took:?}: {err}");
    assert!(err.contains("etcd"), "{err}");
    assert!(
        err.contains("certificate"),
        "the TLS failure is named: {err}"
    );

    let started = Instant::now();
    assert!(names(&h.daemon).is_empty());
    let (_, get) = h.daemon.call("/VolumeDriver.Get", r#"{"Name":"v"}"#);
    assert!(get["Err"].as_str().is_some(), "{get}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "List and Get took {:?}",
        started.elapsed()
    );
}

#[test]
fn cluster_with_a_wrong_password_or_no_user_says_so_without_the_password() {
    let mut net = Net::new();
    let certs = Certs::for_net(&net);
    let etcd = Etcd::start_tls(&net, &certs);
    let prefix = unique_prefix("wrong-pw");
    let right = secret("right");
    etcd.enable_auth(USER, &right, &prefix);
    let secrets = tempfile::tempdir().unwrap();
    let wrong = secret("wrong");
    let file = password_file(secrets.path(), "wrong-password", &wrong);
    let bad = Host::start(
        &mut net,
        1,
        &etcd,
        &prefix,
        &auth_toml(&certs, USER, &file),
        &[],
    );
    // Certificates but no user, against an etcd that wants one.
    let anonymous = Host::start(&mut net, 2, &etcd, &prefix, &certs.cluster_toml(), &[]);

    let started = Instant::now();
    let err = bad.daemon.err("/VolumeDriver.Create", &create_body("v"));
    assert!(started.elapsed() < Duration::from_secs(5), "{err}");
    assert!(
        err.contains(USER) && err.contains("cluster.password_file"),
        "{err}"
    );
    assert!(!err.contains(&wrong) && !err.contains(&right), "{err}");

    let started = Instant::now();
    let err = anonymous
        .daemon
        .err("/VolumeDriver.Create", &create_body("w"));
    assert!(started.elapsed() < Duration::from_secs(5), "{err}");
    assert!(
        err.contains("cluster.user") && err.contains("cluster.password_file"),
        "{err}"
    );

    // The daemons still answer what needs no etcd.
    assert!(names(&bad.daemon).is_empty());
    assert!(names(&anonymous.daemon).is_empty());
    // Background retries log the failed login over and over, never with the password.
    let log = bad.daemon.log_text();
    assert!(log.contains("cluster.password_file"), "{log}");
    assert!(!log.contains(&wrong) && !log.contains(&right));
}

#[test]
fn cluster_serve_refuses_to_start_without_its_password_file_or_a_ca_for_https() {
    let tmp = tempfile::tempdir().unwrap();
    let password = secret("start");
    let file = password_file(tmp.path(), "etcd-password", &password);
    let certs = Certs::generate("127.0.0.1");
    let user = format!(
        "user = {USER:?}\npassword_file = {:?}\n",
        file.to_str().unwrap()
    );
    let missing = tmp.path().join("no-such-password-file");
    let cases = [
        (
            "missing",
            vec!["http://127.0.0.1:2".to_string()],
            format!(
                "[cluster]\nuser = {USER:?}\npassword_file = {:?}\n",
                missing.to_str().unwrap()
            ),
            vec![
                "cluster.password_file".to_string(),
                missing.display().to_string(),
            ],
        ),
        (
            "https-no-ca",
            vec!["https://127.0.0.1:2".to_string()],
            format!("[cluster]\n{user}"),
            vec!["https://".to_string(), "cluster.ca".to_string()],
        ),
        (
            "cert-no-ca",
            vec!["https://127.0.0.1:2".to_string()],
            format!(
                "[cluster]\ncert = {:?}\nkey = {:?}\n{user}",
                certs.client_cert().to_str().unwrap(),
                certs.client_key().to_str().unwrap()
            ),
            vec!["cluster.cert".to_string(), "cluster.ca".to_string()],
        ),
    ];
    for (label, endpoints, extra, wanted) in cases {
        let dir = tmp.path().join(label);
        std::fs::create_dir(&dir).unwrap();
        let config = cluster_config(
            &dir,
            &endpoints,
            "host-1",
            "/ferry-start",
            crate::cluster::LEASE_TTL,
            &extra,
        );
        let (ok, out) = serve_exits(&dir, &config);
        assert!(!ok, "{label}: ferry serve started:\n{out}");
        for w in &wanted {
            assert!(out.contains(w.as_str()), "{label}: no {w:?} in:\n{out}");
        }
        assert!(!out.contains(&password), "{label}: the password shows");
        assert!(
            !dir.join("ferry.sock").exists(),
            "{label}: the plugin socket was bound"
        );
    }
}

#[test]
fn cluster_logs_in_again_after_etcd_lets_its_token_expire() {
    let mut net = Net::new();
    let certs = Certs::for_net(&net);
    // Tokens lapse after 2 s unused; lease keep-alives do not use them, so an idle host's token lapses.
    let etcd = Etcd::start_tls_with(&net, &certs, &["--auth-token-ttl", "2"]);
    let prefix = unique_prefix("token");
    let password = secret("token");
    etcd.enable_auth(USER, &password, &prefix);
    let secrets = tempfile::tempdir().unwrap();
    let file = password_file(secrets.path(), "etcd-password", &password);
    let extra = auth_toml(&certs, USER, &file);
    let a = Host::start(&mut net, 1, &etcd, &prefix, &extra, &[]);
    let b = Host::start(&mut net, 2, &etcd, &prefix, &extra, &[]);
    a.daemon.create("before", "{}");
    assert!(eventually(Duration::from_secs(10), || names(&b.daemon)
        .contains("before")));

    // Hosts are never idle for long (each rewrites its host key every few seconds), so a new login may
    // come from that rewrite or from the Create: what counts is that calls after an expiry succeed and
    // that the hosts did log in again.
    let (logins_a, logins_b) = (logins(&a), logins(&b));
    for round in 0..2 {
        let expired = tokens_expired(&etcd, USER);
        assert!(
            eventually(Duration::from_secs(10), || tokens_expired(&etcd, USER)
                >= expired + 2),
            "round {round}: etcd did not expire the hosts' tokens"
        );
        let (mine_a, mine_b) = (format!("a-{round}"), format!("b-{round}"));
        a.daemon.create(&mine_a, "{}");
        b.daemon.create(&mine_b, "{}");
        for h in [&a, &b] {
            assert!(
                eventually(Duration::from_secs(10), || {
                    let n = names(&h.daemon);
                    n.contains(&mine_a) && n.contains(&mine_b)
                }),
                "round {round}: {}'s List: {:?}",
                h.node,
                names(&h.daemon)
            );
        }
    }
    assert!(
        logins(&a) > logins_a && logins(&b) > logins_b,
        "the hosts did not log in again"
    );
    // Remove goes through etcd too, with whatever token the host holds by now.
    a.daemon.remove("a-0");
    assert!(eventually(Duration::from_secs(10), || !names(&b.daemon)
        .contains("a-0")));
    for h in [&a, &b] {
        assert!(!h.daemon.log_text().contains(&password));
    }
}

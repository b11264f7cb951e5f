//! Test support for cluster mode: a private network where each Ferry host is a network namespace (so a
//! partition is a link going down), a real three-member etcd cluster on that network's gateway, and hosts
//! that run `ferry serve` in their namespace with a `[cluster]` configuration.
//!
//! Include it with `#[path = "../common/cluster.rs"] mod cluster;` beside `common` (it uses
//! `crate::common`). Declare the `Net` first in a test so it is dropped last, after the hosts and peers on it:
//!
//! ```ignore
//! let mut net = Net::new();
//! let etcd = Etcd::start(&net);
//! let a = Host::start(&mut net, 1, &etcd, &prefix, "", &[]);
//! let b = Host::start(&mut net, 2, &etcd, &prefix, "", &[]);
//! net.cut(1); // host 1 loses the network: etcd, moto and every other host
//! ```
//!
//! Hosts reach whatever listens on `net.gateway()` in the test's own namespace: etcd, moto ([`moto_on`]), the
//! strict EBS emulator (`StrictEbs::start_on(net.gateway().parse()?, ..)`). They do not reach each other: Docker's `FORWARD DROP` policy applies to bridged traffic when
//! br_netfilter is loaded, and changing the machine's firewall is not the tests' business.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use crate::common::{in_netns, open_netns, Daemon, SpawnOptions};

/// Where the lock of each allocated /24 lives; /run is a tmpfs, so a reboot forgets them with the links.
const LOCK_DIR: &str = "/run/ferry-test-net";
/// The lease TTL `Host::start` configures: short, so expiry tests wait seconds.
pub const LEASE_TTL: &str = "4s";

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ip(args: &[&str]) -> Output {
    run(Command::new("ip").args(args))
}

/// For cleanup, where what is to be removed may already be gone.
fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip").args(args).output();
}

/// One host's end of the network: the namespace `fh{X}-{n}` with `eth0` at 10.77.X.(10+n), whose peer
/// `fv{X}-{n}` is a port of the bridge.
#[derive(Debug, Clone)]
pub struct HostNet {
    pub n: u8,
    /// The namespace's name, as `ip netns` lists it.
    pub netns: String,
    /// The veth end in the test's namespace, on the bridge.
    pub veth: String,
    pub ip: String,
}

impl HostNet {
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }

    /// `program` to be run in this host's network namespace (only: it shares the test's mounts).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        in_netns(&mut cmd, &self.netns_path());
        cmd
    }

    /// Runs `f` on a thread of its own in this host's network namespace: the sockets it opens are the
    /// host's. Only the thread moves; the rest of the test process stays where it is.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        use std::os::fd::AsRawFd;
        let fd = open_netns(&self.netns_path());
        std::thread::spawn(move || {
            // SAFETY: setns on an open namespace fd changes only the calling thread's network namespace.
            let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            drop(fd);
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// `etcdctl` against `endpoints`, from this host, with timeouts short enough for partition tests.
    pub fn etcdctl(&self, endpoints: &[String]) -> Command {
        let mut cmd = self.command("etcdctl");
        etcdctl_args(&mut cmd, endpoints);
        cmd
    }
}

fn etcdctl_args(cmd: &mut Command, endpoints: &[String]) {
    cmd.arg("--endpoints")
        .arg(endpoints.join(","))
        .args(["--dial-timeout", "1s", "--command-timeout", "2s"])
        .env("ETCDCTL_API", "3");
}

/// `etcdctl` against `endpoints` from the test's own namespace.
pub fn etcdctl(endpoints: &[String]) -> Command {
    let mut cmd = Command::new("etcdctl");
    etcdctl_args(&mut cmd, endpoints);
    cmd
}

/// A private test network: the bridge `fbr{X}` at 10.77.X.1/24 in the test's namespace and a namespace per
/// host. X is unique among all the networks of every test process on the machine while this one lives (a
/// `flock` on /run/ferry-test-net/X.lock). Dropping it removes the namespaces, veths and bridge.
pub struct Net {
    x: u8,
    hosts: BTreeMap<u8, HostNet>,
    _lock: Flock<File>,
}

fn leftovers_file(x: u8) -> PathBuf {
    Path::new(LOCK_DIR).join(format!("{x}.cleanup"))
}

impl Net {
    pub fn new() -> Net {
        std::fs::create_dir_all(LOCK_DIR).unwrap();
        for x in 1..=250u8 {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(Path::new(LOCK_DIR).join(format!("{x}.lock")))
                .unwrap();
            let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
                continue;
            };
            // Whoever held X before us and did not clean up is gone: its leftovers are ours to remove.
            remove_leftovers(x);
            if subnet_in_use(x) {
                continue;
            }
            let bridge = format!("fbr{x}");
            ip(&["link", "add", &bridge, "type", "bridge"]);
            let net = Net {
                x,
                hosts: BTreeMap::new(),
                _lock: lock,
            };
            ip(&[
                "addr",
                "add",
                &format!("{}/24", net.gateway()),
                "dev",
                &bridge,
            ]);
            ip(&["link", "set", &bridge, "up"]);
            return net;
        }
        panic!("no free test network: all of 10.77.1-250.0/24 are taken (see {LOCK_DIR})");
    }

    /// Records a command (an argument vector) that stops something started for this network outside the
    /// test's process tree (etcd and moto run under setsid), for the next user of X to run in case this
    /// process dies without dropping what it started.
    pub fn on_crash(&self, argv: &[&OsStr]) {
        use std::io::Write;
        let line: Vec<&str> = argv
            .iter()
            .map(|a| a.to_str().expect("a UTF-8 argument"))
            .collect();
        assert!(line.iter().all(|a| !a.contains(['\t', '\n'])));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(leftovers_file(self.x))
            .unwrap();
        writeln!(f, "{}", line.join("\t")).unwrap();
    }

    /// X, the third octet of this network's addresses.
    pub fn x(&self) -> u8 {
        self.x
    }

    pub fn bridge(&self) -> String {
        format!("fbr{}", self.x)
    }

    /// The bridge's address in the test's namespace, where peers listen for the hosts.
    pub fn gateway(&self) -> String {
        format!("10.77.{}.1", self.x)
    }

    /// Host `n` (1..=200) of this network, made the first time it is asked for: a namespace with loopback
    /// up, `eth0` at 10.77.X.(10+n)/24 and a default route through the gateway.
    pub fn host(&mut self, n: u8) -> HostNet {
        assert!((1..=200).contains(&n), "host numbers are 1..=200, not {n}");
        if let Some(h) = self.hosts.get(&n) {
            return h.clone();
        }
        let x = self.x;
        let h = HostNet {
            n,
            netns: format!("fh{x}-{n}"),
            veth: format!("fv{x}-{n}"),
            ip: format!("10.77.{x}.{}", 10 + u16::from(n)),
        };
        ip(&["netns", "add", &h.netns]);
        // Recorded before the links exist, so a failure below still gets the namespace removed on drop.
        self.hosts.insert(n, h.clone());
        ip(&[
            "link", "add", &h.veth, "type", "veth", "peer", "name", "eth0", "netns", &h.netns,
        ]);
        ip(&["link", "set", &h.veth, "master", &self.bridge(), "up"]);
        let ns = h.netns.as_str();
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/24", h.ip),
            "dev",
            "eth0",
        ]);
        ip(&["-n", ns, "link", "set", "eth0", "up"]);
        ip(&["-n", ns, "route", "add", "default", "via", &self.gateway()]);
        h
    }

    /// Partitions host `n`: its link to the bridge goes down, cutting it off from the gateway and the
    /// other hosts. Connections it has stay open and hang, as on a real partition.
    pub fn cut(&self, n: u8) {
        ip(&["link", "set", &self.known(n).veth, "down"]);
    }

    /// Ends the partition of host `n`.
    pub fn heal(&self, n: u8) {
        ip(&["link", "set", &self.known(n).veth, "up"]);
    }

    fn known(&self, n: u8) -> &HostNet {
        self.hosts
            .get(&n)
            .unwrap_or_else(|| panic!("host {n} was never added to the network"))
    }
}

impl Default for Net {
    fn default() -> Net {
        Net::new()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for h in self.hosts.values() {
            // The veth first: a process still running in the namespace keeps the namespace (and so its
            // end of the pair) alive after `ip netns del`, and deleting either end deletes both.
            ip_quiet(&["link", "del", &h.veth]);
            ip_quiet(&["netns", "del", &h.netns]);
        }
        ip_quiet(&["link", "del", &self.bridge()]);
        let _ = std::fs::remove_file(leftovers_file(self.x));
    }
}

/// Removes namespaces, veths and the bridge of network X left by a test process that died holding it.
fn remove_leftovers(x: u8) {
    if let Ok(text) = std::fs::read_to_string(leftovers_file(x)) {
        for line in text.lines() {
            let argv: Vec<&str> = line.split('\t').collect();
            let _ = Command::new(argv[0]).args(&argv[1..]).output();
        }
        let _ = std::fs::remove_file(leftovers_file(x));
    }
    let ns_prefix = format!("fh{x}-");
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with(&ns_prefix) {
                continue;
            }
            // Daemons the dead test started there would keep the namespace and its veth alive.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &name]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
            ip_quiet(&["netns", "del", &name]);
        }
    }
    let veth_prefix = format!("fv{x}-");
    let links = ip(&["-o", "link", "show"]);
    for line in String::from_utf8_lossy(&links.stdout).lines() {
        // "7: fv3-1@if2: <BROADCAST,..." names the link in the second field.
        let Some(field) = line.split_whitespace().nth(1) else {
            continue;
        };
        let name = field.trim_end_matches(':').split('@').next().unwrap_or("");
        if name.starts_with(&veth_prefix) {
            ip_quiet(&["link", "del", name]);
        }
    }
    ip_quiet(&["link", "del", &format!("fbr{x}")]);
}

/// Whether an interface of this machine (not ours: those are gone) already has an address in 10.77.X.0/24.
fn subnet_in_use(x: u8) -> bool {
    let out = ip(&["-4", "-o", "addr", "show"]);
    let prefix = format!("10.77.{x}.");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .any(|addr| addr.starts_with(&prefix))
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/etcd-cluster")
}

/// A number that differs between calls and processes, without a dependency for it.
pub fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}

/// A real etcd cluster run by scripts/etcd-cluster in a temporary directory. Member `i` (1-based) serves
/// clients on `ip:base+i` and peers on `ip:base+100+i`. Dropping it stops every member.
pub struct Etcd {
    pub ip: String,
    pub base: u16,
    pub members: usize,
    /// The cluster's directory: DIR/mI.log is member I's log.
    pub dir: PathBuf,
    /// The certificates of an etcd that serves clients over TLS and demands client certificates.
    pub tls: Option<Certs>,
    _tmp: tempfile::TempDir,
}

impl Etcd {
    /// Three members on the network's gateway, where every host of it reaches them.
    pub fn start(net: &Net) -> Etcd {
        let etcd = Etcd::start_on(&net.gateway(), 3);
        net.on_crash(&[script().as_os_str(), "stop".as_ref(), etcd.dir.as_os_str()]);
        etcd
    }

    /// Three members on the network's gateway that serve clients over TLS with `certs` (whose server
    /// certificate names the gateway) and accept only clients with a certificate from its CA.
    pub fn start_tls(net: &Net, certs: &Certs) -> Etcd {
        Etcd::start_tls_with(net, certs, &[])
    }

    /// As [`Etcd::start_tls`], with more etcd flags for every member (such as `--auth-token-ttl 2`).
    pub fn start_tls_with(net: &Net, certs: &Certs, flags: &[&str]) -> Etcd {
        let etcd = Etcd::start_with(&net.gateway(), 3, Some(certs), flags);
        net.on_crash(&[script().as_os_str(), "stop".as_ref(), etcd.dir.as_os_str()]);
        etcd
    }

    /// `members` members listening on `ip`.
    pub fn start_on(ip: &str, members: usize) -> Etcd {
        Etcd::start_with(ip, members, None, &[])
    }

    fn start_with(ip: &str, members: usize, tls: Option<&Certs>, flags: &[&str]) -> Etcd {
        let tmp = tempfile::Builder::new()
            .prefix("ferry-etcd")
            .tempdir()
            .unwrap();
        let mut why = String::new();
        // Another process may take a port between our probe and etcd's bind: try other ranges.
        for attempt in 0..5 {
            let base = free_base(ip, members);
            let dir = tmp.path().join(format!("c{attempt}"));
            let mut cmd = Command::new(script());
            cmd.arg("start")
                .arg(&dir)
                .args([ip, &base.to_string(), &members.to_string()])
                .args(flags);
            match tls {
                Some(certs) => cmd.env("ETCD_CLUSTER_TLS", &certs.dir),
                None => cmd.env_remove("ETCD_CLUSTER_TLS"),
            };
            let out = cmd.output().expect("run scripts/etcd-cluster");
            if out.status.success() {
                return Etcd {
                    ip: ip.to_string(),
                    base,
                    members,
                    dir,
                    tls: tls.cloned(),
                    _tmp: tmp,
                };
            }
            why = String::from_utf8_lossy(&out.stderr).into_owned();
            eprintln!("scripts/etcd-cluster start failed: {why}");
            let _ = Command::new(script()).arg("stop").arg(&dir).output();
        }
        panic!("etcd did not start: {why}");
    }

    /// Every member's client URL, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        (1..=self.members).map(|i| self.endpoint(i)).collect()
    }

    pub fn endpoint(&self, i: usize) -> String {
        assert!((1..=self.members).contains(&i), "no member {i}");
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.ip, self.base as usize + i)
    }

    /// `etcdctl` against every member from the test's namespace, with the client certificate when etcd
    /// demands one.
    pub fn etcdctl(&self) -> Command {
        let mut cmd = etcdctl(&self.endpoints());
        if let Some(c) = &self.tls {
            cmd.arg("--cacert")
                .arg(c.ca())
                .arg("--cert")
                .arg(c.client_cert())
                .arg("--key")
                .arg(c.client_key());
        }
        cmd
    }

    /// Turns on etcd's authentication: a `root` user (etcd wants one before it enables authentication) with
    /// a throw-away password, and `user` with `password` and a role that may read and write every key
    /// under `prefix` and nothing else. Returns root's password, for checks made as root.
    pub fn enable_auth(&self, user: &str, password: &str, prefix: &str) -> String {
        let root_password = format!("root-{:x}", random());
        let role = format!("{user}-role");
        let range = format!("{}/", prefix.trim_end_matches('/'));
        let steps: [Vec<String>; 6] = [
            vec![
                "user".into(),
                "add".into(),
                "root".into(),
                "--new-user-password".into(),
                root_password.clone(),
            ],
            vec![
                "user".into(),
                "grant-role".into(),
                "root".into(),
                "root".into(),
            ],
            vec![
                "user".into(),
                "add".into(),
                user.into(),
                "--new-user-password".into(),
                password.into(),
            ],
            vec!["role".into(), "add".into(), role.clone()],
            vec![
                "role".into(),
                "grant-permission".into(),
                role.clone(),
                "readwrite".into(),
                range,
                "--prefix=true".into(),
            ],
            vec!["user".into(), "grant-role".into(), user.into(), role],
        ];
        for step in steps {
            run(self.etcdctl().args(&step));
        }
        run(self.etcdctl().args(["auth", "enable"]));
        root_password
    }

    /// SIGKILL member `i`, as a crash.
    pub fn kill(&self, i: usize) {
        self.script(&["kill", &i.to_string()]);
    }

    /// Starts member `i` again on its data and waits until it is healthy (which needs a quorum).
    pub fn restart(&self, i: usize) {
        self.script(&["restart", &i.to_string()]);
    }

    /// Stops every member (SIGTERM; this can take about 10 s, as the last one gives up on its peers).
    pub fn stop_all(&self) {
        self.script(&["stop"]);
    }

    /// Starts every member again on its data and waits until the cluster is healthy.
    pub fn start_all(&self) {
        let all: Vec<String> = (1..=self.members).map(|i| i.to_string()).collect();
        let mut args = vec!["restart"];
        args.extend(all.iter().map(String::as_str));
        self.script(&args);
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("m{i}.log"))).unwrap_or_default()
    }

    fn script(&self, args: &[&str]) {
        let mut cmd = Command::new(script());
        cmd.arg(args[0]).arg(&self.dir).args(&args[1..]);
        run(&mut cmd);
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("stop").arg(&self.dir).output();
    }
}

/// A throw-away PKI made with `openssl`: a CA, a server certificate for etcd and a client certificate,
/// PEM files in one directory (the layout `ETCD_CLUSTER_TLS` of scripts/etcd-cluster reads). Clones share
/// the directory, which goes when the last is dropped.
#[derive(Clone)]
pub struct Certs {
    pub dir: PathBuf,
    _tmp: std::sync::Arc<tempfile::TempDir>,
}

impl Certs {
    /// Certificates for an etcd on the network's gateway.
    pub fn for_net(net: &Net) -> Certs {
        Certs::generate(&net.gateway())
    }

    /// A new CA, a server certificate whose subjectAltName is `server_ip`, and a client certificate.
    pub fn generate(server_ip: &str) -> Certs {
        let tmp = tempfile::Builder::new()
            .prefix("ferry-certs")
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_path_buf();
        let openssl = |args: &[&str]| {
            run(Command::new("openssl").current_dir(&dir).args(args));
        };
        let new_key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"][..],
                &new_key,
                &[
                    "-keyout",
                    "ca-key.pem",
                    "-out",
                    "ca.pem",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=ferry-test-ca",
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
            ]
            .concat(),
        );
        // The server certificate is a client one too: etcd's JSON gateway presents it to etcd itself, and
        // so do the health checks of scripts/etcd-cluster. Its CommonName is no etcd user, so those checks
        // never act as one.
        let server_ext = format!(
            "subjectAltName=IP:{server_ip}\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n"
        );
        // etcd's gateway refuses a client certificate that has a CommonName (etcd would otherwise take it
        // for a user name): Ferry's has an organization only.
        let client_ext = "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n";
        for (name, subject, ext) in [
            ("server", "/CN=ferry-test-etcd", server_ext.as_str()),
            ("client", "/O=ferry-test-client", client_ext),
        ] {
            let (key, csr, pem, extfile) = (
                format!("{name}-key.pem"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("{name}.ext"),
            );
            std::fs::write(dir.join(&extfile), ext).unwrap();
            openssl(
                &[
                    &["req"][..],
                    &new_key,
                    &["-keyout", &key, "-out", &csr, "-subj", subject],
                ]
                .concat(),
            );
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &extfile,
            ]);
        }
        Certs {
            dir,
            _tmp: std::sync::Arc::new(tmp),
        }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("client.pem")
    }

    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client-key.pem")
    }

    /// The `[cluster]` keys `ca`, `cert` and `key` for a Ferry host that trusts this CA and presents the
    /// client certificate.
    pub fn cluster_toml(&self) -> String {
        format!(
            "[cluster]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            self.ca().to_str().unwrap(),
            self.client_cert().to_str().unwrap(),
            self.client_key().to_str().unwrap()
        )
    }
}

/// A base port whose client (base+1..) and peer (base+101..) ports are all free on `ip` now. Below the
/// kernel's ephemeral range, so outgoing connections do not take them meanwhile, and far from 2379/2380.
fn free_base(ip: &str, members: usize) -> u16 {
    for _ in 0..100 {
        let base = 20_000 + (random() % 12_000) as u16;
        let ports = (1..=members).flat_map(|i| [base as usize + i, base as usize + 100 + i]);
        let held: Result<Vec<_>, _> = ports
            .map(|p| std::net::TcpListener::bind((ip, p as u16)))
            .collect();
        if held.is_ok() {
            return base;
        }
    }
    panic!("no free range of etcd ports on {ip}");
}

/// moto on the network's gateway, where every host of it reaches it.
pub fn moto_on(net: &Net) -> crate::moto::Moto {
    let moto = crate::moto::Moto::start_on(&net.gateway());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/moto-server");
    net.on_crash(&[script.as_os_str(), "stop".as_ref(), moto.dir().as_os_str()]);
    moto
}

/// Writes DIR/ferry.toml: a `[cluster]` section with these values, and `extra_toml` (any TOML: top-level
/// keys, other sections, and more `[cluster]` keys such as `ca` or `user`, which win over the arguments).
pub fn cluster_config(
    dir: &Path,
    etcd_endpoints: &[String],
    node: &str,
    prefix: &str,
    lease_ttl: &str,
    extra_toml: &str,
) -> PathBuf {
    let mut config: toml::Table = extra_toml
        .parse()
        .unwrap_or_else(|e| panic!("extra_toml is not TOML: {e}\n{extra_toml}"));
    let mut cluster = toml::Table::new();
    cluster.insert(
        "etcd".into(),
        toml::Value::Array(
            etcd_endpoints
                .iter()
                .map(|e| toml::Value::String(e.clone()))
                .collect(),
        ),
    );
    cluster.insert("node".into(), node.into());
    cluster.insert("prefix".into(), prefix.into());
    cluster.insert("lease_ttl".into(), lease_ttl.into());
    match config.remove("cluster") {
        Some(toml::Value::Table(extra)) => cluster.extend(extra),
        Some(other) => panic!("extra_toml: cluster is not a table: {other}"),
        None => {}
    }
    config.insert("cluster".into(), toml::Value::Table(cluster));
    let path = dir.join("ferry.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    path
}

/// A unique key prefix for one test, so tests sharing nothing still never read each other's keys.
pub fn unique_prefix(label: &str) -> String {
    format!("/ferry-test-{label}-{}-{:x}", std::process::id(), random())
}

/// A Ferry host: `ferry serve` in the network namespace of host `n`, with its own directory, socket, state
/// and configuration (`[cluster]` on the test's etcd, node `host-{n}`, lease TTL [`LEASE_TTL`]).
pub struct Host {
    /// Declared before the directory, so the daemon is killed (and its mounts detached) before the
    /// directory goes.
    pub daemon: Daemon,
    pub node: String,
    pub n: u8,
    pub net: HostNet,
    pub config: PathBuf,
    env: Vec<(String, String)>,
    _tmp: tempfile::TempDir,
}

impl Host {
    /// Starts host `n`, adding it to `net` if new. `extra_toml` goes into the configuration as
    /// [`cluster_config`] says; `env` adds to the daemon's environment (FERRY_CONFIG is set here).
    pub fn start(
        net: &mut Net,
        n: u8,
        etcd: &Etcd,
        prefix: &str,
        extra_toml: &str,
        env: &[(&str, &str)],
    ) -> Host {
        let hn = net.host(n);
        let node = format!("host-{n}");
        let tmp = tempfile::Builder::new()
            .prefix(&format!("ferry-{node}-"))
            .tempdir()
            .unwrap();
        let config = cluster_config(
            tmp.path(),
            &etcd.endpoints(),
            &node,
            prefix,
            LEASE_TTL,
            extra_toml,
        );
        let mut owned: Vec<(String, String)> =
            vec![("FERRY_CONFIG".into(), config.to_str().unwrap().into())];
        owned.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let pairs: Vec<(&str, &str)> = owned
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let daemon = Daemon::start_with(
            tmp.path(),
            &tmp.path().join("ferry.sock"),
            &pairs,
            SpawnOptions {
                netns: Some(hn.netns_path()),
                ..Default::default()
            },
        );
        Host {
            daemon,
            node,
            n,
            net: hn,
            config,
            env: owned,
            _tmp: tmp,
        }
    }

    /// An operator command (`ferry ARGS`) against this host's admin socket; it must succeed. Returns its
    /// standard output.
    pub fn operator(&self, args: &[&str]) -> String {
        let out = Command::new(crate::common::ferry_bin())
            .args(args)
            .arg("--admin-socket")
            .arg(self.dir().join("state/admin.sock"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ferry {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn dir(&self) -> &Path {
        &self.daemon.dir
    }

    /// Starts the daemon again (after `daemon.kill9()` or `daemon.terminate()`), with the same
    /// environment, in the same namespace.
    pub fn respawn(&mut self) {
        let pairs: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.daemon.spawn(&pairs);
    }
}

/// Polls `f` every 100 ms until it is true or `limit` passes; whether it became true.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

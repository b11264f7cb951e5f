//! Shared test support: starts the real `ferry` binary on a temporary socket and state directory and speaks
//! raw HTTP/JSON to it, as dockerd does.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running `ferry serve`. Dropping it kills the daemon and detaches anything left mounted under its state
/// directory, so a failed test does not leak loop devices into the next.
pub struct Daemon {
    child: Option<Child>,
    pub socket: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
    pub dir: PathBuf,
    /// How the process is started, each time it is.
    pub spawn_options: SpawnOptions,
    _tmp: Option<tempfile::TempDir>,
}

/// The process environment of a daemon beyond its variables.
#[derive(Debug, Clone, Default)]
pub struct SpawnOptions {
    /// RLIMIT_NOFILE, soft and hard, as a service manager's `LimitNOFILE=` sets it.
    pub nofile: Option<u64>,
    /// The umask it starts under.
    pub umask: Option<u32>,
    /// A network namespace to run in (such as /run/netns/NAME), and only that: unlike `ip netns exec`, the
    /// mount namespace stays the test's, so the mounts the daemon makes are the ones the test sees.
    pub netns: Option<PathBuf>,
}

/// The directories of this test's daemons. Tests run one per process (nextest), so these are exactly the
/// mounts a `NamespaceHolder` of this test may keep; other tests' mounts it must not.
static OWN_DIRS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn own_dir(dir: &Path) {
    let mut dirs = OWN_DIRS.lock().unwrap_or_else(|e| e.into_inner());
    dirs.push(dir.to_path_buf());
    if let Ok(real) = dir.canonicalize() {
        dirs.push(real);
    }
}

pub fn ferry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

impl Daemon {
    /// Starts a daemon in a fresh temporary directory.
    pub fn start() -> Daemon {
        let tmp = tempfile::Builder::new()
            .prefix("ferry-test")
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_path_buf();
        let mut d = Daemon::start_in(&dir, &dir.join("ferry.sock"), &[]);
        d._tmp = Some(tmp);
        d
    }

    /// Starts a daemon with the given socket, state under `dir/state`, and extra environment.
    pub fn start_in(dir: &Path, socket: &Path, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_with(dir, socket, env, SpawnOptions::default())
    }

    /// As `start_in`, with resource limits or a umask of its own.
    pub fn start_with(
        dir: &Path,
        socket: &Path,
        env: &[(&str, &str)],
        spawn_options: SpawnOptions,
    ) -> Daemon {
        own_dir(dir);
        let mut d = Daemon {
            child: None,
            socket: socket.to_path_buf(),
            state: dir.join("state"),
            log: dir.join("ferry.log"),
            dir: dir.to_path_buf(),
            spawn_options,
            _tmp: None,
        };
        d.spawn(env);
        d
    }

    /// Like `start_in`, with the state directory at `state` (which may be a link).
    pub fn start_in_state(dir: &Path, socket: &Path, state: &Path) -> Daemon {
        own_dir(dir);
        own_dir(state);
        let mut d = Daemon {
            child: None,
            socket: socket.to_path_buf(),
            state: state.to_path_buf(),
            log: dir.join("ferry.log"),
            dir: dir.to_path_buf(),
            _tmp: None,
            spawn_options: SpawnOptions::default(),
        };
        d.spawn(&[]);
        d
    }

    /// Starts the process again (after `kill9` or `terminate`) on the same socket and state.
    pub fn spawn(&mut self, env: &[(&str, &str)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(ferry_bin());
        cmd.arg("serve")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state)
            .env("FERRY_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let SpawnOptions {
            nofile,
            umask,
            ref netns,
        } = self.spawn_options;
        // Opened here: between fork and exec nothing may allocate, and opening a path would.
        let netns = netns.as_ref().map(|p| open_netns(p));
        if nofile.is_some() || umask.is_some() || netns.is_some() {
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec the closure only makes system calls (setns on an fd the parent
            // opened and keeps open until the Command is dropped, setrlimit, umask), all async-signal-safe,
            // and allocates nothing (an OS error is a plain errno).
            unsafe {
                cmd.pre_exec(move || {
                    if let Some(fd) = &netns {
                        if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    if let Some(n) = nofile {
                        nix::sys::resource::setrlimit(
                            nix::sys::resource::Resource::RLIMIT_NOFILE,
                            n,
                            n,
                        )?;
                    }
                    if let Some(mask) = umask {
                        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask));
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("ferry exited early with {status}:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "ferry did not listen in time:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM, and waits for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("daemon running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        c.wait().unwrap()
    }

    /// SIGTERM, and waits at most `limit` for the exit; `None` (after a SIGKILL) if it did not come.
    pub fn terminate_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take().expect("daemon running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = c.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// Waits for a daemon that was already signalled to exit.
    pub fn terminate_wait(&mut self) -> std::process::ExitStatus {
        self.child.take().expect("daemon running").wait().unwrap()
    }

    /// One call; returns the HTTP status and the JSON body.
    pub fn call(&self, endpoint: &str, body: &str) -> (u16, Value) {
        let (status, text) = raw_call(&self.socket, "POST", endpoint, body.as_bytes());
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{endpoint}: non-JSON reply {text:?}: {e}"));
        (status, json)
    }

    /// A call that must succeed.
    pub fn ok(&self, endpoint: &str, body: &str) -> Value {
        let (status, json) = self.call(endpoint, body);
        assert_eq!(status, 200, "{endpoint} {body}: {json}");
        assert!(json.get("Err").is_none(), "{endpoint} {body}: {json}");
        json
    }

    /// A call that must fail; returns the error text.
    pub fn err(&self, endpoint: &str, body: &str) -> String {
        let (status, json) = self.call(endpoint, body);
        assert_ne!(
            status, 200,
            "{endpoint} {body} unexpectedly succeeded: {json}"
        );
        json["Err"]
            .as_str()
            .unwrap_or_else(|| panic!("no Err in {json}"))
            .to_string()
    }

    pub fn create(&self, name: &str, opts: &str) {
        self.ok(
            "/VolumeDriver.Create",
            &format!(r#"{{"Name":"{name}","Opts":{opts}}}"#),
        );
    }

    pub fn mount(&self, name: &str, id: &str) -> PathBuf {
        let v = self.ok(
            "/VolumeDriver.Mount",
            &format!(r#"{{"Name":"{name}","ID":"{id}"}}"#),
        );
        PathBuf::from(v["Mountpoint"].as_str().unwrap())
    }

    pub fn unmount(&self, name: &str, id: &str) {
        self.ok(
            "/VolumeDriver.Unmount",
            &format!(r#"{{"Name":"{name}","ID":"{id}"}}"#),
        );
    }

    pub fn get(&self, name: &str) -> Value {
        self.ok("/VolumeDriver.Get", &format!(r#"{{"Name":"{name}"}}"#))["Volume"].clone()
    }

    pub fn remove(&self, name: &str) {
        self.ok("/VolumeDriver.Remove", &format!(r#"{{"Name":"{name}"}}"#));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        unmount_under(&self.state);
    }
}

/// Opens a network namespace file (/run/netns/NAME, /proc/PID/ns/net) for `setns`.
pub fn open_netns(path: &Path) -> std::os::fd::OwnedFd {
    std::fs::File::open(path)
        .unwrap_or_else(|e| panic!("open network namespace {}: {e}", path.display()))
        .into()
}

/// Makes `cmd` run in the network namespace at `netns`, and in no other namespace of it.
pub fn in_netns<'a>(cmd: &'a mut Command, netns: &Path) -> &'a mut Command {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    // Opened before the fork, as nothing between fork and exec may allocate; O_CLOEXEC (std's default)
    // keeps it out of the program.
    let fd = open_netns(netns);
    // SAFETY: between fork and exec the closure makes one system call, setns, on an fd that the closure
    // owns (so it stays open until the Command is dropped), and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Lazily unmounts every mount below `root`, deepest first.
pub fn unmount_under(root: &Path) {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(root))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for p in points {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}

pub fn is_mounted(path: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|p| Path::new(p) == path)
}

/// Detaches, inside the mount namespace of `pid`, the mounts other tests running at the same time made
/// under the temporary directory: a container of this test must not look like one holding their volumes.
fn drop_foreign_mounts(pid: u32) {
    let own = OWN_DIRS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let tmp = std::env::temp_dir();
    let tmp_real = tmp.canonicalize().unwrap_or_else(|_| tmp.clone());
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")) else {
        return;
    };
    let mut foreign: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| {
            (p.starts_with(&tmp) || p.starts_with(&tmp_real)) && *p != tmp && *p != tmp_real
        })
        .filter(|p| !own.iter().any(|d| p.starts_with(d)))
        .collect();
    foreign.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for p in foreign {
        let _ = Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-m", "umount", "-l"])
            .arg(&p)
            .stderr(Stdio::null())
            .status();
    }
}

/// Waits, up to `limit`, until no process in another mount namespace has a mount at `path`. Tests running
/// beside this one start processes in mount namespaces of their own (holders, `ip netns exec` for the
/// cluster tests' daemons), and each copies every mount of that moment, this test's volumes included,
/// until it ends or drops them. A test that needs "nothing else holds the volume" waits for this first.
pub fn wait_until_no_other_namespace_mounts(path: &Path, limit: Duration) {
    let own = std::fs::read_link("/proc/self/ns/mnt").ok();
    let deadline = Instant::now() + limit;
    let held_elsewhere = || -> Option<String> {
        let entries = std::fs::read_dir("/proc").ok()?;
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            let ns = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
            if ns.is_none() || ns == own {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")) else {
                continue;
            };
            if text
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .any(|p| Path::new(&p.replace("\\040", " ")) == path)
            {
                return Some(pid.to_string());
            }
        }
        None
    };
    while let Some(pid) = held_elsewhere() {
        if Instant::now() >= deadline {
            eprintln!(
                "{} is still mounted in the mount namespace of pid {pid} after {limit:?}",
                path.display()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A process in a mount namespace of its own (`unshare -m`, private propagation), made while the volumes
/// the test mounted existed: it keeps its copy of those mounts whatever happens to the host's, as a running
/// container keeps its volumes. Dropping it kills it, which ends the copies.
pub struct NamespaceHolder {
    child: Child,
}

impl NamespaceHolder {
    pub fn start() -> NamespaceHolder {
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sleep", "3600"])
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare (util-linux) runs");
        let own = std::fs::read_link("/proc/self/ns/mnt").unwrap();
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        // It holds the mounts once it runs `sleep` in its new namespace.
        loop {
            let ns = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if ns.is_some_and(|n| n != own) && comm.trim() == "sleep" {
                break;
            }
            assert!(Instant::now() < deadline, "unshare did not start in time");
            std::thread::sleep(Duration::from_millis(10));
        }
        drop_foreign_mounts(pid);
        NamespaceHolder { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Bind-mounts `source` on `target` inside the holder's namespace only, as Docker gives a container a
    /// plain volume's directory. `target` is made if missing.
    pub fn bind(&self, source: &Path, target: &Path) {
        std::fs::create_dir_all(target).unwrap();
        let out = Command::new("nsenter")
            .arg("-t")
            .arg(self.pid().to_string())
            .args(["-m", "--", "mount", "--bind"])
            .arg(source)
            .arg(target)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nsenter mount --bind: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `path` as the holder's namespace sees it (through `/proc/PID/root`).
    pub fn path(&self, path: &Path) -> PathBuf {
        let rel = path.strip_prefix("/").unwrap_or(path);
        PathBuf::from(format!("/proc/{}/root", self.pid())).join(rel)
    }

    /// Ends the holder and its copies of the mounts.
    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NamespaceHolder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends one raw HTTP/1.1 request over the socket and returns the status and body.
pub fn raw_call(socket: &Path, method: &str, endpoint: &str, body: &[u8]) -> (u16, String) {
    let mut head = format!(
        "{method} {endpoint} HTTP/1.1\r\nHost: plugin.moby.localhost\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    head.extend_from_slice(body);
    raw_request(socket, &head)
}

/// Sends arbitrary bytes and parses the HTTP reply.
pub fn raw_request(socket: &Path, bytes: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(130))).unwrap();
    // The server may answer (413) and close before reading a huge body: a broken pipe is expected then.
    if let Err(e) = s.write_all(bytes) {
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "{e}"
        );
    }
    let mut out = Vec::new();
    if let Err(e) = s.read_to_end(&mut out) {
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad HTTP reply {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
/// Runs `f` on a thread of its own whose credentials are nobody's (uid and gid 65534, no supplementary
/// groups) while the rest of the test process stays root: the raw system calls change only the calling
/// thread, where glibc's setuid() would change every thread of the process. A socket connected from that
/// thread carries uid 65534 to its peer (SO_PEERCRED), as one from an unprivileged user's process does.
pub fn as_nobody<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        // SAFETY: system calls with integer arguments (and a null list of zero groups); they change only
        // this thread's credentials, and the thread ends with `f`.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()),
                0
            );
            assert_eq!(libc::syscall(libc::SYS_setresgid, 65534, 65534, 65534), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534), 0);
        }
        f()
    })
}

pub mod ganesha;

/// What an operator command printed and how it exited.
pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs an operator command (`ferry ARGS --state-dir STATE`) with nothing from the environment choosing
/// another daemon.
pub fn ferry(args: &[&str], state: &Path) -> Ran {
    let out = Command::new(ferry_bin())
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .env_remove("FERRY_ADMIN_SOCKET")
        .env_remove("FERRY_CONFIG")
        .output()
        .unwrap();
    Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

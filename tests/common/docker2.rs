//! A second Docker "host" on this machine, for end-to-end tests that need a container somewhere else: a second
//! dockerd started by `scripts/second-dockerd` with its own data root, exec root, socket, containerd and mount
//! namespace, plus Ferry daemons registered as legacy volume plugins with either dockerd.
//!
//! Include it with `#[path = "common/docker2.rs"] mod docker2;` (it depends on nothing else in tests/common).
//! [`TwoHosts`] gives a two-host fixture its docker commands that fail the test with every log attached.
//!
//! ```ignore
//! let host2 = SecondDockerd::start_temp();           // ~0.3 s; stopped (and its directory removed) on drop
//! host2.load_image().unwrap();                       // BUSYBOX_IMAGE, FROM scratch, nothing pulled
//! let ferry = host2.start_ferry("ferry-b-123", &[]); // `ferry serve` inside host 2, as driver ferry-b-123
//! host2.docker_ok(&["volume", "create", "--driver", ferry.name(), "v"]).unwrap();
//! host2.docker_ok(&["run", "--rm", "--network", "none", "-v", "v:/data", BUSYBOX_IMAGE, "true"]).unwrap();
//! ```
//!
//! **Plugin directories.** dockerd looks for legacy plugins in the constant directory `/run/docker/plugins`.
//! The second dockerd gets its own: in its mount namespace an empty `DIR/plugins` is mounted over that path,
//! so each dockerd only ever sees (and activates, and then remembers for as long as it runs) its own
//! plugins. A plugin for the second host therefore puts its socket in [`SecondDockerd::plugin_dir`]; one for
//! the machine's dockerd links it into `/run/docker/plugins` ([`FerryPlugin::start_on_machine`]). Every
//! plugin the machine's dockerd ever activates costs it about 15 s per lookup of an unknown volume name once
//! the plugin is gone, until dockerd restarts: prefer a second dockerd for anything that can be done there.
//!
//! **Mounts.** The second dockerd, its containerd and [`SecondDockerd::command`]s (so the Ferry daemons from
//! [`SecondDockerd::start_ferry`]) share that mount namespace, so whatever a backend mounts there is what
//! the second host's containers see, as on a real host.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Busybox with its applets installed as symlinks; `CMD` is a shell. The same recipe as tests/dockerd/docker.rs.
pub const BUSYBOX_IMAGE: &str = "ferry-test-busybox:latest";
pub const BUSYBOX: &str = "/usr/bin/busybox";
/// Where the machine's dockerd looks for legacy plugins.
pub const MACHINE_PLUGIN_DIR: &str = "/run/docker/plugins";
/// A generous bound for one docker command, so a hung plugin fails the test instead of stalling it.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(150);
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/second-dockerd");
/// Prefix of the temporary directories of [`SecondDockerd::start_temp`].
const TEMP_PREFIX: &str = "ferry-docker2-";

// ---------------------------------------------------------------------------------------------------------
// Tests spread over two hosts.

/// A fixture of two hosts (the machine's dockerd or a second one, each with its own Ferry): given what to
/// print when the test fails and the label its containers carry, it runs docker commands that fail the test
/// with everything worth reading instead of an error to unwrap.
pub trait TwoHosts {
    /// The daemons' and peers' logs, for a failure message.
    fn diagnostics(&self) -> String;
    /// `KEY=VALUE` on every container the test starts, so cleanup finds them.
    fn label(&self) -> &str;

    fn fail(&self, what: &str) -> ! {
        panic!("{what}\n{}", self.diagnostics())
    }

    fn check<T>(&self, r: Result<T, String>) -> T {
        r.unwrap_or_else(|e| self.fail(&e))
    }

    fn ensure(&self, cond: bool, what: impl FnOnce() -> String) {
        if !cond {
            self.fail(&what());
        }
    }

    /// `docker ARGS` on `host`; its output.
    fn on(&self, host: &SecondDockerd, args: &[&str]) -> String {
        self.check(host.docker_ok(args))
    }

    /// `docker run --rm` on `host`, labelled, without network, then `rest` (options, image, command).
    fn run(&self, host: &SecondDockerd, rest: &[&str]) -> String {
        let mut args = vec!["run", "--rm", "--network", "none", "--label", self.label()];
        args.extend_from_slice(rest);
        self.on(host, &args)
    }

    /// [`TwoHosts::run`] with `-i` and `input` on the container's stdin.
    fn run_fed(&self, host: &SecondDockerd, input: &[u8], rest: &[&str]) -> String {
        let mut args = vec![
            "run",
            "--rm",
            "-i",
            "--network",
            "none",
            "--label",
            self.label(),
        ];
        args.extend_from_slice(rest);
        self.check(run_with_input(
            host.cli().command(&args),
            input,
            COMMAND_TIMEOUT,
        ))
    }

    /// The one volume `docker volume inspect` describes on `host`.
    fn inspect(&self, host: &SecondDockerd, volume: &str) -> serde_json::Value {
        let text = self.on(host, &["volume", "inspect", volume]);
        let all: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| self.fail(&format!("volume inspect gave non-JSON {text:?}: {e}")));
        self.ensure(all.as_array().map(Vec::len) == Some(1), || {
            format!("volume inspect {volume}: {all}")
        });
        all[0].clone()
    }
}

// ---------------------------------------------------------------------------------------------------------
// Running programs (argument vectors only; never a shell).

pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

fn drain_bytes(mut r: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Runs `cmd` with `input` on its stdin (written by a thread, then closed); stdout when it succeeds,
/// otherwise an error with everything it printed. Killed after `timeout`.
pub fn run_with_input(mut cmd: Command, input: &[u8], timeout: Duration) -> Result<String, String> {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {what}: {e}"))?;
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = drain_bytes(child.stdout.take().unwrap());
    let err = drain_bytes(child.stderr.take().unwrap());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{what} did not finish within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let written = writer.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
    if !status.success() {
        return Err(format!(
            "{what} failed with {status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
        ));
    }
    written.map_err(|e| format!("{what}: writing its stdin: {e}"))?;
    Ok(stdout)
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn drain(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion with its output captured (drained by threads, so a chatty program cannot block
/// on a full pipe); kills it after `timeout`.
pub fn run_command(mut cmd: Command, timeout: Duration) -> Result<Output, String> {
    let what = describe(&cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start `{what}`: {e}"))?;
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("`{what}` did not finish within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Like [`run_command`], but a failure exit is an error carrying everything the program printed.
pub fn run_command_ok(cmd: Command, timeout: Duration) -> Result<String, String> {
    let what = describe(&cmd);
    let out = run_command(cmd, timeout)?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "`{what}` failed with {}\nstdout:\n{}\nstderr:\n{}",
            out.status, out.stdout, out.stderr
        ))
    }
}

// ---------------------------------------------------------------------------------------------------------
// The docker command-line tool, aimed at one daemon.

/// `docker` for one daemon: the machine's ([`DockerCli::machine`]) or a [`SecondDockerd`]'s.
#[derive(Clone, Debug)]
pub struct DockerCli {
    /// `-H` value; `None` for the machine's default daemon.
    host: Option<String>,
    /// DOCKER_CONFIG, so the client state of one daemon cannot collide with another's.
    config: Option<PathBuf>,
}

impl DockerCli {
    pub fn machine() -> DockerCli {
        DockerCli {
            host: None,
            config: None,
        }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker");
        if let Some(h) = &self.host {
            cmd.arg("-H").arg(h);
        }
        if let Some(c) = &self.config {
            cmd.env("DOCKER_CONFIG", c);
        }
        cmd.env("DOCKER_BUILDKIT", "0").args(args);
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Result<Output, String> {
        run_command(self.command(args), COMMAND_TIMEOUT)
    }

    /// Stdout when the command succeeds; otherwise an error with everything it printed.
    pub fn ok(&self, args: &[&str]) -> Result<String, String> {
        run_command_ok(self.command(args), COMMAND_TIMEOUT)
    }

    /// Builds `tag` from `dockerfile` with `files` ((name in the context, source)) copied into the context.
    pub fn build_image(
        &self,
        tag: &str,
        dockerfile: &str,
        files: &[(&str, &Path)],
    ) -> Result<(), String> {
        let ctx = tempfile::Builder::new()
            .prefix("ferry-docker2-image")
            .tempdir()
            .map_err(|e| e.to_string())?;
        std::fs::write(ctx.path().join("Dockerfile"), dockerfile).map_err(|e| e.to_string())?;
        for (name, src) in files {
            let dst = ctx.path().join(name);
            std::fs::create_dir_all(dst.parent().unwrap()).map_err(|e| e.to_string())?;
            std::fs::copy(src, &dst).map_err(|e| format!("cannot copy {}: {e}", src.display()))?;
        }
        self.ok(&["build", "-q", "-t", tag, ctx.path().to_str().unwrap()])
            .map(|_| ())
    }

    /// Builds [`BUSYBOX_IMAGE`] `FROM scratch` with the host's static busybox (no registry is needed).
    pub fn load_image(&self) -> Result<(), String> {
        self.build_image(
            BUSYBOX_IMAGE,
            "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nCMD [\"/bin/sh\"]\n",
            &[("busybox", Path::new(BUSYBOX))],
        )
    }

    /// `(driver, name)` of every volume the daemon lists, sorted.
    pub fn volumes(&self) -> Result<Vec<(String, String)>, String> {
        let out = self.ok(&["volume", "ls", "--format", "{{.Driver}} {{.Name}}"])?;
        let mut v: Vec<(String, String)> = out
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(d, n)| (d.to_string(), n.to_string()))
            .collect();
        v.sort();
        Ok(v)
    }

    /// Full ids of every container the daemon has, running or not, that carries `label` (`key` or `key=value`).
    pub fn containers(&self, label: &str) -> Result<Vec<String>, String> {
        let filter = format!("label={label}");
        let out = self.ok(&["ps", "-aq", "--no-trunc", "--filter", &filter])?;
        Ok(out.split_whitespace().map(str::to_string).collect())
    }

    /// Removes, ignoring errors, the containers that carry `label` and then the volumes of `driver`. Run it
    /// while the driver still answers.
    pub fn sweep(&self, label: &str, driver: &str) {
        if let Ok(ids) = self.containers(label) {
            for id in ids {
                let _ = self.run(&["rm", "-f", "-v", &id]);
            }
        }
        let filter = format!("driver={driver}");
        if let Ok(names) = self.ok(&["volume", "ls", "-q", "--filter", &filter]) {
            for v in names.split_whitespace() {
                let _ = self.run(&["volume", "rm", "-f", v]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// The second dockerd.

/// A second dockerd (see the module comment). Dropping it stops it: containers still running there are
/// killed, whatever is mounted in its namespace goes with the namespace, and a directory from
/// [`SecondDockerd::start_temp`] is removed.
pub struct SecondDockerd {
    dir: PathBuf,
    cli: DockerCli,
    running: bool,
    /// How long `start` took.
    pub start_time: Duration,
    // Dropped after `Drop::drop` stopped the daemon.
    _tmp: Option<tempfile::TempDir>,
}

fn script(args: &[&std::ffi::OsStr]) -> Result<String, String> {
    let mut cmd = Command::new(SCRIPT);
    cmd.args(args);
    run_command_ok(cmd, Duration::from_secs(120))
}

impl SecondDockerd {
    /// Starts (or adopts, when one already answers there) the second dockerd in `dir`; panics with the end
    /// of its log when it does not come up within a minute.
    pub fn start(dir: &Path) -> SecondDockerd {
        Self::try_start(dir).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_start(dir: &Path) -> Result<SecondDockerd, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let began = Instant::now();
        script(&["start".as_ref(), dir.as_os_str()])
            .map_err(|e| format!("cannot start the second dockerd in {}:\n{e}", dir.display()))?;
        Ok(SecondDockerd {
            cli: DockerCli {
                host: Some(format!("unix://{}", dir.join("docker.sock").display())),
                config: Some(dir.join("docker-config")),
            },
            dir,
            running: true,
            start_time: began.elapsed(),
            _tmp: None,
        })
    }

    /// Starts one in a fresh temporary directory, first stopping and removing those that test processes
    /// which no longer exist left behind (a test killed by SIGKILL cannot stop its own).
    pub fn start_temp() -> SecondDockerd {
        reap_stale();
        let tmp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempdir()
            .unwrap();
        std::fs::write(tmp.path().join("owner"), std::process::id().to_string()).unwrap();
        let mut d = Self::start(tmp.path());
        d._tmp = Some(tmp);
        d
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    /// The `-H` value, `unix://DIR/docker.sock`.
    pub fn host(&self) -> &str {
        self.cli.host.as_deref().unwrap()
    }

    /// This daemon's `/run/docker/plugins`: a legacy plugin for it puts `NAME.sock` (or a symlink to its
    /// socket) here.
    pub fn plugin_dir(&self) -> PathBuf {
        self.dir.join("plugins")
    }

    pub fn cli(&self) -> &DockerCli {
        &self.cli
    }

    /// Runs `docker -H unix://DIR/docker.sock ARGS`.
    pub fn docker(&self, args: &[&str]) -> Result<Output, String> {
        self.cli.run(args)
    }

    /// [`SecondDockerd::docker`], and stdout when it succeeds; otherwise an error with everything printed.
    pub fn docker_ok(&self, args: &[&str]) -> Result<String, String> {
        self.cli.ok(args)
    }

    /// Builds [`BUSYBOX_IMAGE`] in this daemon.
    pub fn load_image(&self) -> Result<(), String> {
        self.cli.load_image()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("dockerd.log")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// A command that runs `program` inside this host's mount namespace (through `second-dockerd exec`,
    /// which execs, so the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(SCRIPT);
        cmd.arg("exec").arg(&self.dir).arg(program);
        cmd
    }

    /// Starts `ferry serve` inside this host as the legacy plugin `name` (socket `plugin_dir()/NAME.sock`),
    /// with its state in `DIR/ferry-NAME/state` and extra environment `env`.
    pub fn start_ferry(&self, name: &str, env: &[(&str, &str)]) -> FerryPlugin {
        let home = self.dir.join(format!("ferry-{name}"));
        let socket = self.plugin_dir().join(format!("{name}.sock"));
        let mut cmd = self.command(env!("CARGO_BIN_EXE_ferry"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        FerryPlugin::spawn(name, &home, socket, None, Some(self.dir.clone()), cmd)
    }

    /// Mount points at or below `root` in this host's mount namespace, deepest first.
    pub fn mounts_under(&self, root: &Path) -> Vec<PathBuf> {
        mounts_below(&mountinfo_in(&self.dir), root)
    }

    /// Stops the daemon (see `Drop`); a second call does nothing.
    pub fn stop(&mut self) -> Result<(), String> {
        if !self.running {
            return Ok(());
        }
        self.running = false;
        let stop = || script(&["stop".as_ref(), self.dir.as_os_str()]).map(|_| ());
        // `stop` is idempotent: once (in CI, under load) it ended with status 1 and nothing said, after
        // which a second one finds what is left and finishes. The first error is kept on stderr.
        stop().or_else(|first| {
            eprintln!(
                "second dockerd in {}: stopping again after: {first}",
                self.dir.display()
            );
            stop()
        })
    }
}

impl Drop for SecondDockerd {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("second dockerd in {}: {e}", self.dir.display());
        }
    }
}

/// Stops and deletes second dockerds in `TEMP_PREFIX` directories whose owning process is gone.
fn reap_stale() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if !e.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            continue;
        }
        // No owner file yet: being set up right now by someone else.
        let Ok(owner) = std::fs::read_to_string(path.join("owner")) else {
            continue;
        };
        let alive = owner
            .trim()
            .parse::<u32>()
            .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive && script(&["stop".as_ref(), path.as_os_str()]).is_ok() {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// Mount points (field 5 of mountinfo) at or below `root`, deepest first.
fn mounts_below(mountinfo: &str, root: &Path) -> Vec<PathBuf> {
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(root))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    points
}

// ---------------------------------------------------------------------------------------------------------
// Ferry as a legacy plugin of one of the daemons.

/// A running `ferry serve` registered as the legacy volume plugin `name`. Dropping it kills the daemon,
/// unregisters it (removes its socket, or the link to it if that still points at this daemon) and lazily
/// detaches anything it left mounted under its state directory. Remove what Docker has of its volumes
/// before that (for example with [`DockerCli::sweep`]), while it still answers.
pub struct FerryPlugin {
    name: String,
    /// Where the daemon listens.
    pub socket: PathBuf,
    /// The link in the machine's plugin directory, when registered that way.
    link: Option<PathBuf>,
    pub state: PathBuf,
    pub log: PathBuf,
    /// The second dockerd's directory when the daemon runs in its namespace.
    namespace_of: Option<PathBuf>,
    child: Option<Child>,
}

impl FerryPlugin {
    /// Starts `ferry serve` for the machine's dockerd: it listens on `dir/ferry.sock` (state in
    /// `dir/state`), and `/run/docker/plugins/NAME.sock` becomes a symlink to that, atomically replacing
    /// whatever an earlier run left there (as tests/dockerd/docker.rs does; see `Plugin::link` there).
    pub fn start_on_machine(name: &str, dir: &Path, env: &[(&str, &str)]) -> FerryPlugin {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let socket = dir.join("ferry.sock");
        let link = Path::new(MACHINE_PLUGIN_DIR).join(format!("{name}.sock"));
        let p = FerryPlugin::spawn(name, dir, socket, Some(link.clone()), None, cmd);
        std::fs::create_dir_all(MACHINE_PLUGIN_DIR).unwrap();
        let tmp_link =
            Path::new(MACHINE_PLUGIN_DIR).join(format!(".{name}.{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&tmp_link);
        std::os::unix::fs::symlink(&p.socket, &tmp_link)
            .and_then(|()| std::fs::rename(&tmp_link, &link))
            .unwrap_or_else(|e| panic!("cannot link {}: {e}", link.display()));
        p
    }

    /// `cmd` is the ferry binary (possibly behind `second-dockerd exec`); waits until it listens.
    fn spawn(
        name: &str,
        dir: &Path,
        socket: PathBuf,
        link: Option<PathBuf>,
        namespace_of: Option<PathBuf>,
        mut cmd: Command,
    ) -> FerryPlugin {
        std::fs::create_dir_all(dir).unwrap();
        let log_path = dir.join("ferry.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let _ = std::fs::remove_file(&socket);
        cmd.arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .env("FERRY_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start ferry for {name}: {e}"));
        let mut p = FerryPlugin {
            name: name.to_string(),
            socket,
            link: None,
            state: dir.join("state"),
            log: log_path,
            namespace_of,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&p.socket).is_err() {
            if let Some(status) = p.child.as_mut().unwrap().try_wait().unwrap() {
                p.child = None;
                panic!(
                    "ferry ({name}) exited early with {status}:\n{}",
                    p.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "ferry ({name}) did not listen in time:\n{}",
                p.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        p.link = link;
        p
    }

    /// The driver name Docker knows it by.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Where the local backend keeps `volume` (`data` inside it is what containers see).
    pub fn local_volume_dir(&self, volume: &str) -> PathBuf {
        self.state.join("local").join(volume)
    }

    /// Kills the daemon and unregisters it (what `Drop` does); a second call does nothing.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(link) = self.link.take() {
            if std::fs::read_link(&link).is_ok_and(|t| t == self.socket) {
                let _ = std::fs::remove_file(&link);
            }
        }
        let _ = std::fs::remove_file(&self.socket);
        match &self.namespace_of {
            None => {
                let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
                for p in mounts_below(&text, &self.state) {
                    let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
                }
            }
            Some(dir) => {
                for p in mounts_below(&mountinfo_in(dir), &self.state) {
                    let mut cmd = Command::new(SCRIPT);
                    cmd.arg("exec").arg(dir).args(["umount", "-l"]).arg(&p);
                    let _ = run_command(cmd, Duration::from_secs(30));
                }
            }
        }
    }
}

fn mountinfo_in(second_dockerd_dir: &Path) -> String {
    let mut cmd = Command::new(SCRIPT);
    cmd.arg("exec")
        .arg(second_dockerd_dir)
        .args(["cat", "/proc/self/mountinfo"]);
    run_command_ok(cmd, Duration::from_secs(30)).unwrap_or_default()
}

impl Drop for FerryPlugin {
    fn drop(&mut self) {
        self.stop();
    }
}

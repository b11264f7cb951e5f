//! End-to-end tests against the real dockerd on this machine: the `ferry` binary is registered as a legacy
//! volume plugin (`/run/docker/plugins/<name>.sock`, a symlink to the daemon's own socket: see
//! `Plugin::link`) and driven through the `docker` and `docker-compose` command-line tools, as users would.
//!
//! These tests fail when dockerd is unreachable (`FERRY_SKIP_DOCKER=1` skips the whole tier, see tests/common/tier.rs).
//! With `FERRY_E2E_SHOW_LOG=1` each scenario prints Ferry's debug log (every call dockerd made) at the end.
//! Images cannot be pulled here, so the test image is built `FROM scratch` with the static busybox.
//!
//! **The plugin name.** Each run of this test binary registers its own plugin name,
//! `ferry-e2e-<pid>-<random>`, so runs from different checkouts can never collide; the scenarios of one run
//! share it, one at a time under an exclusive `flock`, each with its own daemon and state directory.
//! dockerd remembers every legacy plugin it has ever activated until it restarts, and keeps calling the dead
//! ones: every lookup of a volume name Docker does not know (`docker-compose up` makes two per volume) tries
//! each dead plugin in turn, about 15 s apiece. On a long-lived dockerd that runs the suite often, set
//! `FERRY_E2E_PLUGIN_NAME` to a fixed name so runs stop adding dead plugins (the lock keeps them apart).
//!
//! Dead plugins other programs left in dockerd still slow `docker-compose up` down (2 × 15 s each). The
//! compose scenario counts them first (`docker info` lists every remembered driver) and fails at once, with
//! the list, when the wait would exceed `FERRY_E2E_COMPOSE_PROBE_BUDGET` seconds (default 180): restarting
//! dockerd clears them, or raise the budget to wait.

use crate::common;
use crate::e2e;

use std::fs::File;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::Daemon;
use e2e::{lock_docker_tests, run_id};
use nix::fcntl::Flock;
use serde_json::Value;

/// Busybox with its applets installed as symlinks; `CMD` is a shell.
const BASE_IMAGE: &str = "ferry-test-busybox:latest";
/// The base image plus `VOLUME /data` with a file baked in, so Docker copies it up into the new volume.
const VOLUME_IMAGE: &str = "ferry-test-busybox-volume:latest";
const BAKED: &str = "baked into the image\n";
const BUSYBOX: &str = "/usr/bin/busybox";
const PLUGIN_DIR: &str = "/run/docker/plugins";
/// The plugin name all scenarios of this run share (see the module comment).
fn plugin_name() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        std::env::var("FERRY_E2E_PLUGIN_NAME")
            .ok()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| format!("ferry-e2e-{}", run_id()))
    })
}
/// Serializes users of the plugin name across threads and processes.
/// The key of the label on every container the tests start.
const LABEL_KEY: &str = "ferry-e2e";
const MIB64: u64 = 64 * 1024 * 1024;
/// A generous bound for one docker command, so a hung plugin fails the test instead of stalling it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(150);
/// `docker-compose up` looks its volume up twice by a name Docker does not know yet, and dockerd then asks
/// every legacy plugin it ever saw, waiting about 15 s for each dead one (see the module comment). Compose's
/// own per-request limit (60 s by default) is raised to match, and the command gets far longer than usual.
const COMPOSE_HTTP_TIMEOUT_SECS: &str = "900";
const COMPOSE_TIMEOUT: Duration = Duration::from_secs(2 * 900 + 120);
/// How long dockerd retries a legacy plugin whose socket is gone before giving up on it.
const DEAD_PLUGIN_SECS: u64 = 15;
const DEFAULT_PROBE_BUDGET_SECS: u64 = 180;

// ---------------------------------------------------------------------------------------------------------
// Running programs (argument vectors only; never a host shell).

struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// A child whose stdout and stderr are drained by threads, so a chatty program cannot block on a full pipe.
/// Dropping it kills the program if it is still running.
struct Running {
    what: String,
    child: Option<Child>,
    readers: Vec<JoinHandle<String>>,
}

fn drain(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

fn describe(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

fn spawn(program: &str, args: &[&str], cwd: Option<&Path>) -> Result<Running, String> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    if program == "docker" {
        cmd.env("DOCKER_BUILDKIT", "0");
    }
    if program == "docker-compose" {
        cmd.env("COMPOSE_HTTP_TIMEOUT", COMPOSE_HTTP_TIMEOUT_SECS);
    }
    let what = describe(program, args);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start `{what}`: {e}"))?;
    let readers = vec![
        drain(child.stdout.take().unwrap()),
        drain(child.stderr.take().unwrap()),
    ];
    Ok(Running {
        what,
        child: Some(child),
        readers,
    })
}

impl Running {
    /// `Some(status)` once the program has exited.
    fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().unwrap().try_wait().unwrap()
    }

    fn wait(mut self, timeout: Duration) -> Result<Output, String> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.try_status() {
                break status;
            }
            if Instant::now() > deadline {
                return Err(format!("`{}` did not finish within {timeout:?}", self.what));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.child = None;
        let mut texts = self.readers.drain(..).map(|h| h.join().unwrap_or_default());
        Ok(Output {
            status,
            stdout: texts.next().unwrap(),
            stderr: texts.next().unwrap(),
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run(program: &str, args: &[&str], cwd: Option<&Path>) -> Result<Output, String> {
    spawn(program, args, cwd)?.wait(COMMAND_TIMEOUT)
}

fn run_ok(program: &str, args: &[&str], cwd: Option<&Path>) -> Result<String, String> {
    run_ok_within(program, args, cwd, COMMAND_TIMEOUT)
}

fn run_ok_within(
    program: &str,
    args: &[&str],
    cwd: Option<&Path>,
    timeout: Duration,
) -> Result<String, String> {
    let out = spawn(program, args, cwd)?.wait(timeout)?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "`{}` failed with {}\nstdout:\n{}\nstderr:\n{}",
            describe(program, args),
            out.status,
            out.stdout,
            out.stderr
        ))
    }
}

// ---------------------------------------------------------------------------------------------------------
// One-time setup: dockerd must answer, and the test images are built once per test process.

fn build_image(tag: &str, dockerfile: &str, files: &[(&str, &Path)]) -> Result<(), String> {
    let ctx = tempfile::Builder::new()
        .prefix("ferry-e2e-image")
        .tempdir()
        .map_err(|e| e.to_string())?;
    std::fs::write(ctx.path().join("Dockerfile"), dockerfile).map_err(|e| e.to_string())?;
    for (name, src) in files {
        let dst = ctx.path().join(name);
        std::fs::create_dir_all(dst.parent().unwrap()).map_err(|e| e.to_string())?;
        std::fs::copy(src, &dst).map_err(|e| format!("cannot copy {}: {e}", src.display()))?;
    }
    let dir = ctx.path().to_str().unwrap();
    run_ok("docker", &["build", "-q", "-t", tag, dir], None).map(|_| ())
}

fn setup() -> Result<(), String> {
    run_ok("docker", &["info"], None).map_err(|e| format!("dockerd is unreachable:\n{e}"))?;
    build_image(
        BASE_IMAGE,
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nCMD [\"/bin/sh\"]\n",
        &[("busybox", Path::new(BUSYBOX))],
    )?;
    let baked = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
    std::fs::write(baked.path(), BAKED).map_err(|e| e.to_string())?;
    build_image(
        VOLUME_IMAGE,
        &format!("FROM {BASE_IMAGE}\nCOPY baked.txt /data/baked.txt\nVOLUME /data\n"),
        &[("baked.txt", baked.path())],
    )
}

/// Builds the test images once; panics when Docker is unusable.
fn docker_ready() {
    static SETUP: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(e) = SETUP.get_or_init(setup) {
        panic!("Docker end-to-end setup failed: {e}");
    }
}

/// Legacy volume plugins dockerd remembers (it lists every driver it knows in `docker info`) that no
/// longer answer: each costs about 15 s whenever dockerd looks up a volume name it does not know.
fn dead_legacy_plugins() -> Result<Vec<String>, String> {
    let out = run_ok(
        "docker",
        &["info", "--format", "{{json .Plugins.Volume}}"],
        None,
    )?;
    let names: Vec<String> = serde_json::from_str(out.trim())
        .map_err(|e| format!("unexpected `docker info` output {out:?}: {e}"))?;
    let answers = |name: &str| {
        let dir = Path::new(PLUGIN_DIR);
        let sockets = [
            dir.join(format!("{name}.sock")),
            dir.join(name).join(format!("{name}.sock")),
        ];
        // A spec file names an address this does not check: count such a plugin as alive.
        let specs = ["/etc/docker/plugins", "/usr/lib/docker/plugins"]
            .iter()
            .flat_map(|d| ["spec", "json"].map(|ext| Path::new(d).join(format!("{name}.{ext}"))));
        sockets.iter().any(|s| UnixStream::connect(s).is_ok())
            || specs.into_iter().any(|p| p.exists())
    };
    Ok(names
        .into_iter()
        // `local` is built in; names with `/` or `:` are managed plugins, which are not probed this way.
        .filter(|n| n != "local" && !n.contains('/') && !n.contains(':'))
        .filter(|n| !answers(n))
        .collect())
}

// ---------------------------------------------------------------------------------------------------------
// A Ferry daemon registered with dockerd, and everything the test made through Docker.

struct Plugin {
    /// The driver name Docker knows the plugin by.
    name: String,
    /// Makes this scenario's volume names, compose project and label unique.
    run_id: String,
    /// Compose projects to take down: (project, compose file).
    projects: Vec<(String, PathBuf)>,
    // Fields drop in order: the daemon (killed; leftover mounts detached), then its directory, then the lock.
    daemon: Daemon,
    tmp: tempfile::TempDir,
    _lock: Flock<File>,
}

impl Plugin {
    /// Registers a plugin of its own for `scenario`, under the Docker tests' lock.
    fn start(scenario: &str) -> Plugin {
        docker_ready();
        let lock = lock_docker_tests();
        let tmp = tempfile::Builder::new()
            .prefix(&format!("ferry-e2e-{scenario}"))
            .tempdir()
            .unwrap();
        // The daemon listens on a socket of its own; Docker reaches it through a symlink (see `link`).
        let socket = tmp.path().join("ferry.sock");
        let daemon = Daemon::start_in(tmp.path(), &socket, &[]);
        let p = Plugin {
            name: plugin_name().to_string(),
            run_id: run_id(),
            projects: Vec::new(),
            daemon,
            tmp,
            _lock: lock,
        };
        p.link();
        // Containers and volumes a crashed run left behind under this driver; the plugin answers now, so
        // Docker does not wait on it.
        p.sweep();
        p
    }

    /// Where dockerd looks for the plugin.
    fn public_socket() -> PathBuf {
        Path::new(PLUGIN_DIR).join(format!("{}.sock", plugin_name()))
    }

    /// Points `/run/docker/plugins/<name>.sock` at this daemon's socket, atomically replacing whatever
    /// an earlier run left there. A symlink rather than the socket itself: a daemon of an earlier run that is
    /// still shutting down (for example after its test process was killed, which also frees the lock)
    /// unlinks its socket path on the way out, and must not take ours with it. dockerd stats the path and
    /// connects through the link.
    fn link(&self) {
        std::fs::create_dir_all(PLUGIN_DIR).unwrap();
        let public = Self::public_socket();
        let tmp_link =
            Path::new(PLUGIN_DIR).join(format!(".{}.{}.tmp", plugin_name(), self.run_id));
        let _ = std::fs::remove_file(&tmp_link);
        std::os::unix::fs::symlink(&self.daemon.socket, &tmp_link)
            .and_then(|()| std::fs::rename(&tmp_link, &public))
            .unwrap_or_else(|e| self.fail(&format!("cannot link {}: {e}", public.display())));
    }

    /// Removes the public link if it still points at this daemon.
    fn unlink(&self) {
        let public = Self::public_socket();
        if std::fs::read_link(&public).is_ok_and(|target| target == self.daemon.socket) {
            let _ = std::fs::remove_file(&public);
        }
    }

    /// A volume name unique to this scenario run.
    fn volume_name(&self, suffix: &str) -> String {
        format!("{}-{}-{suffix}", self.name, self.run_id)
    }

    /// The label put on every container the tests start (value: the run), swept by key.
    fn label(&self) -> String {
        format!("{LABEL_KEY}={}", self.run_id)
    }

    /// Removes every labelled container and every volume Docker has under this driver.
    fn sweep(&self) {
        let label = format!("label={LABEL_KEY}");
        if let Ok(ids) = run_ok("docker", &["ps", "-aq", "--filter", &label], None) {
            for id in ids.split_whitespace() {
                let _ = run("docker", &["rm", "-f", "-v", id], None);
            }
        }
        let driver = format!("driver={}", self.name);
        if let Ok(names) = run_ok("docker", &["volume", "ls", "-q", "--filter", &driver], None) {
            for v in names.split_whitespace() {
                let _ = run("docker", &["volume", "rm", "-f", v], None);
            }
        }
    }

    /// Where the local backend keeps a volume (`data` inside it is what containers see).
    fn volume_dir(&self, volume: &str) -> PathBuf {
        self.daemon.state.join("local").join(volume)
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "{what}\n--- ferry log ({}, run {}) ---\n{}",
            self.name,
            self.run_id,
            self.daemon.log_text()
        )
    }

    fn check<T>(&self, r: Result<T, String>) -> T {
        r.unwrap_or_else(|e| self.fail(&e))
    }

    fn docker(&self, args: &[&str]) -> String {
        self.check(run_ok("docker", args, None))
    }

    /// `docker run --rm` with the test label and no network, then `args` (options, image, command).
    fn docker_run(&self, args: &[&str]) -> String {
        let label = self.label();
        let mut full = vec!["run", "--rm", "--network", "none", "--label", &label];
        full.extend_from_slice(args);
        self.docker(&full)
    }

    fn compose(&self, project: &str, file: &Path, args: &[&str]) -> String {
        let file = file.to_str().unwrap();
        let mut full = vec!["-p", project, "-f", file, "--ansi", "never"];
        full.extend_from_slice(args);
        let result = run_ok_within(
            "docker-compose",
            &full,
            Some(self.tmp.path()),
            COMPOSE_TIMEOUT,
        );
        self.check(result.map_err(|e| {
            if e.contains("took too long") || e.contains("did not finish within") {
                format!(
                    "{e}\nhint: dockerd asks every legacy plugin it ever activated, dead ones included, about a \
                     volume name it does not know, about 15 s each; restarting dockerd forgets the dead ones"
                )
            } else {
                e
            }
        }))
    }

    fn docker_inspect_volume(&self, volume: &str) -> Value {
        let text = self.docker(&["volume", "inspect", volume]);
        let all: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| self.fail(&format!("volume inspect gave non-JSON {text:?}: {e}")));
        assert_eq!(all.as_array().map(Vec::len), Some(1), "{all}");
        all[0].clone()
    }

    /// Names Docker lists for this driver.
    fn docker_volumes(&self) -> Vec<String> {
        let filter = format!("driver={}", self.name);
        let out = self.docker(&["volume", "ls", "-q", "--filter", &filter]);
        let mut names: Vec<String> = out.lines().map(str::to_string).collect();
        names.sort();
        names
    }

    /// Names Ferry itself lists, asked directly on the socket.
    fn ferry_list(&self) -> Vec<String> {
        let json = self.daemon.ok("/VolumeDriver.List", "{}");
        let mut names: Vec<String> = json["Volumes"]
            .as_array()
            .unwrap_or_else(|| self.fail(&format!("List without Volumes: {json}")))
            .iter()
            .map(|v| v["Name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    }

    /// Ferry's `Get`, asked directly on the socket: `None` when Ferry does not know the volume.
    fn ferry_get(&self, volume: &str) -> Option<Value> {
        let (status, json) = self
            .daemon
            .call("/VolumeDriver.Get", &format!(r#"{{"Name":"{volume}"}}"#));
        if status == 200 && json.get("Err").is_none() {
            return Some(json["Volume"].clone());
        }
        let err = json["Err"].as_str().unwrap_or_default();
        if !err.contains("does not exist") {
            self.fail(&format!(
                "Get {volume} failed unexpectedly: {status} {json}"
            ));
        }
        None
    }

    /// Asserts Ferry has forgotten `volume` and deleted its storage.
    fn assert_removed(&self, volume: &str) {
        if let Some(v) = self.ferry_get(volume) {
            self.fail(&format!("Ferry still has {volume} after removal: {v}"));
        }
        if self.ferry_list().iter().any(|n| n == volume) {
            self.fail(&format!("Ferry still lists {volume}"));
        }
        let dir = self.volume_dir(volume);
        if dir.exists() {
            self.fail(&format!("{} survived the removal", dir.display()));
        }
    }

    /// Polls `cond` for up to `timeout`; fails with `what` if it never holds.
    fn wait_for(&self, what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !cond() {
            if Instant::now() > deadline {
                self.fail(&format!("timed out after {timeout:?} waiting for {what}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Plugin {
    /// Removes everything made through Docker while the plugin still answers, then unregisters it. Errors
    /// are ignored: this also runs while a failed test unwinds.
    fn drop(&mut self) {
        for (project, file) in &self.projects {
            let file = file.to_str().unwrap();
            let _ = run(
                "docker-compose",
                &["-p", project, "-f", file, "down", "-v", "--remove-orphans"],
                Some(self.tmp.path()),
            );
        }
        self.sweep();
        self.unlink();
        if std::env::var("FERRY_E2E_SHOW_LOG").as_deref() == Ok("1") {
            eprintln!(
                "--- ferry log ({}) ---\n{}",
                self.run_id,
                self.daemon.log_text()
            );
        }
    }
}

fn status_of<'a>(p: &Plugin, volume: &'a Value) -> &'a serde_json::Map<String, Value> {
    volume["Status"]
        .as_object()
        .unwrap_or_else(|| p.fail(&format!("no Status object in {volume}")))
}

// ---------------------------------------------------------------------------------------------------------
// Scenarios.

/// `docker volume create` (plain and size-capped), data written by one container and read by another,
/// `volume ls`, `volume inspect` (Status from Ferry, active mounts while a container runs) and `volume rm`.
#[test]
fn named_volumes_through_the_docker_cli() {
    let p = Plugin::start("named");
    let plain = p.volume_name("plain");
    let sized = p.volume_name("sized");

    let out = p.docker(&["volume", "create", "--driver", &p.name, &plain]);
    assert_eq!(out.trim(), plain);
    let out = p.docker(&[
        "volume", "create", "--driver", &p.name, "-o", "size=64M", &sized,
    ]);
    assert_eq!(out.trim(), sized);
    assert_eq!(p.ferry_list(), {
        let mut v = vec![plain.clone(), sized.clone()];
        v.sort();
        v
    });

    for vol in [&plain, &sized] {
        let content = format!("hello from {vol}");
        let bind = format!("{vol}:/data");
        let script = format!("echo '{content}' > /data/hello.txt && sync");
        p.docker_run(&["-v", &bind, BASE_IMAGE, "sh", "-c", &script]);
        let read = p.docker_run(&["-v", &bind, BASE_IMAGE, "cat", "/data/hello.txt"]);
        assert_eq!(
            read.trim(),
            content,
            "second container read back the wrong data"
        );
        let data = p.volume_dir(vol).join("data");
        if vol == &plain {
            // A plain volume is a directory on the host: the file is visible there.
            let on_host = std::fs::read_to_string(data.join("hello.txt")).unwrap_or_default();
            assert_eq!(on_host.trim(), content);
        } else if common::is_mounted(&data) {
            p.fail(&format!(
                "{} still mounted after both containers exited",
                data.display()
            ));
        }
    }

    // Both listed by Docker under this driver.
    let mut expected = vec![plain.clone(), sized.clone()];
    expected.sort();
    assert_eq!(
        p.docker_volumes(),
        expected,
        "docker volume ls --filter driver="
    );

    // Inspect: Docker's view with Ferry's Status.
    let info = p.docker_inspect_volume(&sized);
    assert_eq!(info["Name"], sized.as_str());
    assert_eq!(info["Driver"], p.name.as_str());
    assert_eq!(info["Options"]["size"], "64M", "{info}");
    let st = status_of(&p, &info);
    assert_eq!(st["backend"], "local", "{info}");
    assert_eq!(st["options"]["backend"], "local", "{info}");
    assert_eq!(st["options"]["size"], "64MiB", "{info}");
    assert_eq!(st["size_bytes"], MIB64, "{info}");
    assert_eq!(st["fs"], "ext4", "{info}");
    assert_eq!(st["active_mounts"], 0, "{info}");
    let info = p.docker_inspect_volume(&plain);
    let st = status_of(&p, &info);
    assert_eq!(st["backend"], "local", "{info}");
    assert_eq!(st["size"], "unlimited", "{info}");
    assert_eq!(st["active_mounts"], 0, "{info}");

    // While a container holds the sized volume: one active mount, the image mounted, the mountpoint shown.
    let label = p.label();
    let bind = format!("{sized}:/data");
    let id = p.docker(&[
        "run",
        "-d",
        "--network",
        "none",
        "--label",
        &label,
        "-v",
        &bind,
        BASE_IMAGE,
        "sleep",
        "300",
    ]);
    let id = id.trim().to_string();
    let data = p.volume_dir(&sized).join("data");
    let info = p.docker_inspect_volume(&sized);
    let st = status_of(&p, &info);
    assert_eq!(st["active_mounts"], 1, "{info}");
    assert_eq!(info["Mountpoint"], data.to_str().unwrap(), "{info}");
    assert!(
        common::is_mounted(&data),
        "{} not mounted while in use",
        data.display()
    );
    p.docker(&["rm", "-f", &id]);
    p.wait_for(
        "the sized volume to be released",
        Duration::from_secs(30),
        || {
            p.ferry_get(&sized)
                .is_some_and(|v| v["Status"]["active_mounts"] == 0)
                && !common::is_mounted(&data)
        },
    );

    // Removal through Docker reaches Ferry and deletes the storage.
    p.docker(&["volume", "rm", &plain, &sized]);
    p.assert_removed(&plain);
    p.assert_removed(&sized);
    assert!(
        p.docker_volumes().is_empty(),
        "Docker still lists volumes of {}",
        p.name
    );
}

/// An image with `VOLUME /data` run with `--volume-driver`: Docker creates an anonymous (64-hex) volume in
/// Ferry, copies the image's `/data` into it, and `--rm` removes it again.
#[test]
fn anonymous_image_volume_with_volume_driver() {
    let p = Plugin::start("anon");
    assert!(p.ferry_list().is_empty());

    let label = p.label();
    // The container copies the baked file, signals readiness, and waits (at most a minute) for the host to
    // write `done` into the volume.
    let script = "cat /data/baked.txt > /data/copied.txt && echo ready > /data/ready && i=0; \
                  while [ ! -e /data/done ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; cat /data/done";
    let mut container = p.check(spawn(
        "docker",
        &[
            "run",
            "--rm",
            "--network",
            "none",
            "--label",
            &label,
            "--volume-driver",
            &p.name,
            VOLUME_IMAGE,
            "sh",
            "-c",
            script,
        ],
        None,
    ));

    let mut volume = String::new();
    p.wait_for(
        "the anonymous volume to appear in Ferry",
        Duration::from_secs(60),
        || {
            if let Some(status) = container.try_status() {
                p.fail(&format!("the container exited early with {status}"));
            }
            let names = p.ferry_list();
            match names.as_slice() {
                [one] if p.volume_dir(one).join("data/ready").exists() => {
                    volume = one.clone();
                    true
                }
                _ => false,
            }
        },
    );
    assert!(
        volume.len() == 64 && volume.bytes().all(|b| b.is_ascii_hexdigit()),
        "an anonymous volume should have a 64-hex name, got {volume:?}"
    );
    let data = p.volume_dir(&volume).join("data");
    let got = p.ferry_get(&volume).unwrap();
    assert_eq!(got["Status"]["active_mounts"], 1, "{got}");
    assert_eq!(got["Mountpoint"], data.to_str().unwrap(), "{got}");
    // Docker copied the image's /data into the empty volume before the container started.
    let baked = std::fs::read_to_string(data.join("baked.txt")).unwrap_or_default();
    assert_eq!(baked, BAKED, "copy-up of the image's /data");
    let copied = std::fs::read_to_string(data.join("copied.txt")).unwrap_or_default();
    assert_eq!(copied, BAKED, "the container's copy");

    std::fs::write(data.join("done"), "finish\n").unwrap();
    let out = p.check(container.wait(COMMAND_TIMEOUT));
    if !out.status.success() || out.stdout != "finish\n" {
        p.fail(&format!(
            "container ended with {}\nstdout: {:?}\nstderr: {}",
            out.status, out.stdout, out.stderr
        ));
    }

    // `--rm` removes anonymous volumes too; allow a moment in case removal trails the client's return.
    p.wait_for(
        "--rm to remove the anonymous volume",
        Duration::from_secs(30),
        || p.ferry_list().is_empty(),
    );
    p.assert_removed(&volume);
    assert!(
        p.docker_volumes().is_empty(),
        "Docker still lists volumes of {}",
        p.name
    );
}

/// `--mount type=volume,...,volume-driver=,volume-opt=size=64M`: the volume is created on first use with the
/// option, and inside the container it is a 64 MiB filesystem that fills up.
#[test]
fn mount_flag_creates_a_size_capped_volume() {
    let p = Plugin::start("mount");
    let vol = p.volume_name("capped");
    let mount = format!(
        "type=volume,src={vol},dst=/data,volume-driver={},volume-opt=size=64M",
        p.name
    );
    let script =
        "df -k /data | tail -n 1; dd if=/dev/zero of=/data/fill bs=1M count=100 2>&1; echo rc=$?";
    let out = p.docker_run(&["--mount", &mount, BASE_IMAGE, "sh", "-c", script]);

    // `size` is what is available on the new volume; the filesystem is larger by its own overhead.
    let df = out.lines().next().unwrap_or_default();
    let column = |n: usize| -> u64 {
        df.split_whitespace()
            .nth(n)
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| p.fail(&format!("unexpected df output:\n{out}")))
    };
    let (total_kib, available_kib) = (column(1), column(3));
    assert!(
        available_kib >= 64 * 1024 && total_kib <= 96 * 1024,
        "/data should have 64 MiB available in a filesystem of at most 96 MiB, df says {available_kib} of {total_kib} KiB:\n{out}"
    );
    assert!(
        out.contains("No space left on device") && out.contains("rc=1"),
        "writing 100 MiB into a 64 MiB volume should fail with ENOSPC:\n{out}"
    );

    let got = p
        .ferry_get(&vol)
        .unwrap_or_else(|| p.fail(&format!("Ferry does not have {vol}")));
    assert_eq!(got["Status"]["size_bytes"], MIB64, "{got}");
    assert_eq!(got["Status"]["active_mounts"], 0, "{got}");
    assert_eq!(p.docker_volumes(), vec![vol.clone()]);

    // A named volume survives `--rm`; remove it explicitly.
    p.docker(&["volume", "rm", &vol]);
    p.assert_removed(&vol);
}

/// A container that stops while the plugin is down never gets its Unmount (Docker does not retry it). The
/// restarted plugin sees that no mount namespace holds the volumes any more and releases their mount IDs,
/// so `docker volume rm` works, for a size-capped and a plain volume; a volume a running container still
/// uses keeps its mount and stays refused.
#[test]
fn volumes_of_containers_stopped_while_the_plugin_was_down_can_be_removed() {
    let mut p = Plugin::start("stuck");
    let capped = p.volume_name("capped");
    let plain = p.volume_name("plain");
    let kept = p.volume_name("kept");
    p.docker(&[
        "volume", "create", "--driver", &p.name, "-o", "size=32M", &capped,
    ]);
    p.docker(&["volume", "create", "--driver", &p.name, &plain]);
    p.docker(&[
        "volume", "create", "--driver", &p.name, "-o", "size=32M", &kept,
    ]);
    let label = p.label();
    let mut containers = Vec::new();
    for vol in [&capped, &plain, &kept] {
        let bind = format!("{vol}:/data");
        let id = p.docker(&[
            "run",
            "-d",
            "--network",
            "none",
            "--label",
            &label,
            "-v",
            &bind,
            BASE_IMAGE,
            "sleep",
            "600",
        ]);
        containers.push(id.trim().to_string());
    }
    for vol in [&capped, &plain, &kept] {
        let st = p.ferry_get(vol).unwrap_or_else(|| p.fail("volume missing"));
        assert_eq!(st["Status"]["active_mounts"], 1, "{st}");
    }

    p.daemon.kill9();
    // Docker's Unmount for these two fails against the dead plugin; the containers stop anyway.
    for id in &containers[..2] {
        let _ = run("docker", &["kill", id], None);
        let _ = run("docker", &["rm", "-f", id], None);
    }
    p.daemon.spawn(&[]);
    let log = p.daemon.log_text();
    assert_eq!(
        log.matches("released mount IDs left by containers").count(),
        2,
        "{log}"
    );
    p.docker(&["volume", "rm", &capped, &plain]);
    p.assert_removed(&capped);
    p.assert_removed(&plain);

    // The running container's volume was adopted, still mounted, and its removal is still refused.
    let data = p.volume_dir(&kept).join("data");
    assert!(common::is_mounted(&data), "{}", p.daemon.log_text());
    let got = p.ferry_get(&kept).unwrap_or_else(|| p.fail("kept is gone"));
    assert_eq!(got["Status"]["active_mounts"], 1, "{got}");
    let refused = run("docker", &["volume", "rm", &kept], None).unwrap();
    assert!(!refused.status.success(), "removed a volume in use");
    p.docker(&["rm", "-f", &containers[2]]);
    p.wait_for("kept to be released", Duration::from_secs(30), || {
        p.ferry_get(&kept)
            .is_some_and(|v| v["Status"]["active_mounts"] == 0)
    });
    p.docker(&["volume", "rm", &kept]);
    p.assert_removed(&kept);
}

/// A compose project (file version 3.7) whose top-level volume uses the plugin with `driver_opts`.
#[test]
fn compose_project_volume() {
    let mut p = Plugin::start("compose");
    // Letters and digits only: compose 1.29 first looks for a "legacy" volume named after the project with
    // `-` and `_` removed, and with such a project name that is the same name, so `down` finds it at once.
    let project = format!("ferrye2e{}", p.run_id.replace('-', ""));
    let file = p.tmp.path().join("docker-compose.yml");
    let yaml = format!(
        r#"version: "3.7"
services:
  writer:
    image: {BASE_IMAGE}
    network_mode: none
    labels:
      {LABEL_KEY}: "{run_id}"
    command: ["sh", "-c", "echo from-compose > /data/compose.txt && df -k /data"]
    volumes:
      - data:/data
volumes:
  data:
    driver: {name}
    driver_opts:
      size: "64M"
"#,
        name = p.name,
        run_id = p.run_id,
    );
    std::fs::write(&file, yaml).unwrap();

    // `up` looks the volume up twice before creating it, and dockerd then waits on every dead plugin.
    let dead = p.check(dead_legacy_plugins());
    let expected_wait = 2 * DEAD_PLUGIN_SECS * dead.len() as u64;
    let budget = std::env::var("FERRY_E2E_COMPOSE_PROBE_BUDGET")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_PROBE_BUDGET_SECS);
    if expected_wait > budget {
        panic!(
            "dockerd remembers {} dead legacy volume plugins, so `docker-compose up` would wait about {expected_wait} s \
             probing them (2 lookups × 15 s each) before creating its volume; that exceeds \
             FERRY_E2E_COMPOSE_PROBE_BUDGET={budget}. Restart dockerd to make it forget them, or raise the budget \
             (and set FERRY_E2E_PLUGIN_NAME to a fixed name so later runs add no more).\n\
             dead plugins: {dead:?}",
            dead.len()
        );
    }
    if !dead.is_empty() {
        eprintln!(
            "note: dockerd remembers {} dead legacy plugins; `docker-compose up` will wait about {expected_wait} s",
            dead.len()
        );
    }
    p.projects.push((project.clone(), file.clone()));

    let started = Instant::now();
    let out = p.compose(
        &project,
        &file,
        &[
            "up",
            "--abort-on-container-exit",
            "--exit-code-from",
            "writer",
        ],
    );
    eprintln!("`docker-compose up` took {:.1?}", started.elapsed());
    assert!(
        out.contains("/data"),
        "the service's df output is missing:\n{out}"
    );

    let vol = format!("{project}_data");
    let got = p
        .ferry_get(&vol)
        .unwrap_or_else(|| p.fail(&format!("compose did not create {vol} in Ferry")));
    assert_eq!(got["Status"]["size_bytes"], MIB64, "{got}");
    assert_eq!(got["Status"]["options"]["size"], "64MiB", "{got}");
    let info = p.docker_inspect_volume(&vol);
    assert_eq!(info["Driver"], p.name.as_str());
    assert_eq!(
        info["Labels"]["com.docker.compose.project"],
        project.as_str(),
        "{info}"
    );
    // The data outlives the service container.
    let bind = format!("{vol}:/data");
    let read = p.docker_run(&["-v", &bind, BASE_IMAGE, "cat", "/data/compose.txt"]);
    assert_eq!(read.trim(), "from-compose");

    p.compose(&project, &file, &["down", "-v"]);
    // Taken down: the guard must not repeat it, since compose would then look the removed volume up by name,
    // which costs the slow probe described above.
    p.projects.clear();
    p.assert_removed(&vol);
    assert!(
        p.docker_volumes().is_empty(),
        "Docker still lists volumes of {}",
        p.name
    );
}

//! End-to-end test of Ferry as a Docker *managed* (v2) plugin: `scripts/build-plugin` packs the `ferry`
//! binary cargo built for this test into a plugin, dockerd runs it in its own namespaces (rootfs, state bind
//! mount, propagated mount, host /dev), and volumes are driven through the `docker` command-line tool.
//!
//! Like `tests/dockerd/docker.rs` this fails when dockerd is unreachable. It
//! takes the same lock file, so it never runs alongside the other dockerd tests. Each run registers its own
//! plugin, `ferry-mp-<pid>-<random>:latest`, with a state directory in a temporary directory, and removes
//! the plugin, its volumes and its containers on every path. A plugin left by a run that was killed is
//! removed by the next run (under the lock no other run can own one).
//!
//! dockerd writes the plugin's log into its own log; on failure the lines of this plugin are printed from
//! the first of `FERRY_DOCKERD_LOG`, /var/log/dockerd.log, /var/log/docker.log,
//! /var/log/ferry-test-dockerd.log that exists.

use crate::e2e;

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use e2e::{lock_docker_tests, run_id};
use nix::fcntl::Flock;
use serde_json::Value;

/// Busybox with its applets installed as symlinks; the same image (and build) as `tests/dockerd/docker.rs`.
const BASE_IMAGE: &str = "ferry-test-busybox:latest";
const BUSYBOX: &str = "/usr/bin/busybox";
/// Shared with `tests/dockerd/docker.rs`: one dockerd test at a time, across processes.
/// Every plugin this test creates starts with this; under the lock any other one is a dead run's leftover.
const NAME_PREFIX: &str = "ferry-mp-";
/// The key of the label on every container the test starts.
const LABEL_KEY: &str = "ferry-mp";
/// A generous bound for one docker command, so a hung plugin fails the test instead of stalling it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(150);
/// `docker plugin enable --timeout`: dockerd also caps every later call to the plugin at this.
const ENABLE_TIMEOUT_SECS: u64 = 30;
const DOCKERD_LOGS: [&str; 3] = [
    "/var/log/dockerd.log",
    "/var/log/docker.log",
    "/var/log/ferry-test-dockerd.log",
];

// ---------------------------------------------------------------------------------------------------------
// Running programs (argument vectors only; never a host shell).

struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
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

/// Kills the program if the caller gives up on it (timeout or panic).
struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `program` with `args`, feeding it `input` on stdin, and waits at most `timeout`.
fn run_with(
    program: &str,
    args: &[&str],
    input: Option<&str>,
    timeout: Duration,
) -> Result<Output, String> {
    let what = describe(program, args);
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if program == "docker" {
        cmd.env("DOCKER_BUILDKIT", "0");
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start `{what}`: {e}"))?;
    let readers = [
        drain(child.stdout.take().unwrap()),
        drain(child.stderr.take().unwrap()),
    ];
    // A writer thread, so a program that does not read its input cannot block us on a full pipe.
    let writer = input.map(|text| {
        let mut stdin = child.stdin.take().unwrap();
        let text = text.to_string();
        std::thread::spawn(move || {
            let _ = stdin.write_all(text.as_bytes());
        })
    });
    let mut guard = KillOnDrop(Some(child));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = guard.0.as_mut().unwrap().try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            return Err(format!("`{what}` did not finish within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    guard.0 = None;
    if let Some(w) = writer {
        let _ = w.join();
    }
    let [out, err] = readers.map(|h| h.join().unwrap_or_default());
    Ok(Output {
        status,
        stdout: out,
        stderr: err,
    })
}

fn run(program: &str, args: &[&str]) -> Result<Output, String> {
    run_with(program, args, None, COMMAND_TIMEOUT)
}

fn check_ok(program: &str, args: &[&str], out: Output) -> Result<String, String> {
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

fn run_ok(program: &str, args: &[&str]) -> Result<String, String> {
    check_ok(program, args, run(program, args)?)
}

// ---------------------------------------------------------------------------------------------------------
// Setup shared with nothing else in this process: dockerd must answer, and the test image is built.

/// Builds the test image; panics when Docker is unusable.
fn docker_ready() {
    if let Err(e) = run_ok("docker", &["info"]) {
        panic!("dockerd is unreachable:\n{e}");
    }
    if let Err(e) = build_base_image() {
        panic!("cannot build the test image: {e}");
    }
}

fn build_base_image() -> Result<(), String> {
    let ctx = tempfile::Builder::new()
        .prefix("ferry-mp-image")
        .tempdir()
        .map_err(|e| e.to_string())?;
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nCMD [\"/bin/sh\"]\n",
    )
    .map_err(|e| e.to_string())?;
    std::fs::copy(BUSYBOX, ctx.path().join("busybox"))
        .map_err(|e| format!("cannot copy {BUSYBOX} (apt-get install busybox-static): {e}"))?;
    let dir = ctx.path().to_str().unwrap();
    run_ok("docker", &["build", "-q", "-t", BASE_IMAGE, dir]).map(|_| ())
}

/// Removes a managed plugin and every volume and container that uses it, ignoring errors. The volumes go
/// first, through the plugin, so its storage is released; only then is the plugin forced away.
fn remove_plugin_and_volumes(name: &str, label: Option<&str>) {
    if let Some(label) = label {
        let filter = format!("label={label}");
        if let Ok(ids) = run_ok("docker", &["ps", "-aq", "--filter", &filter]) {
            for id in ids.split_whitespace() {
                let _ = run("docker", &["rm", "-f", "-v", id]);
            }
        }
    }
    let enabled = run_ok("docker", &["plugin", "inspect", "-f", "{{.Enabled}}", name]);
    let Ok(enabled) = enabled else {
        return; // no such plugin
    };
    if enabled.trim() != "true" {
        let _ = run("docker", &["plugin", "enable", name]);
    }
    let filter = format!("driver={name}");
    if let Ok(volumes) = run_ok("docker", &["volume", "ls", "-q", "--filter", &filter]) {
        for v in volumes.split_whitespace() {
            let _ = run("docker", &["volume", "rm", "-f", v]);
        }
    }
    let _ = run("docker", &["plugin", "disable", "-f", name]);
    let _ = run("docker", &["plugin", "rm", "-f", name]);
}

/// Plugins a killed run of this test left behind.
fn sweep_dead_runs() {
    let Ok(names) = run_ok("docker", &["plugin", "ls", "--format", "{{.Name}}"]) else {
        return;
    };
    for name in names.lines().filter(|n| n.starts_with(NAME_PREFIX)) {
        eprintln!("removing the plugin {name}, left by an earlier run");
        remove_plugin_and_volumes(name, Some(LABEL_KEY));
    }
}

/// Loop devices whose backing file path (as the plugin saw it) ends with `suffix`.
fn loop_devices_backed_by(suffix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut found: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter(|e| {
            std::fs::read_to_string(e.path().join("loop/backing_file")).is_ok_and(|f| {
                f.trim_end()
                    .trim_end_matches(" (deleted)")
                    .ends_with(suffix)
            })
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    found
}

// ---------------------------------------------------------------------------------------------------------
// One managed plugin and everything the test made through Docker.

struct ManagedPlugin {
    /// The plugin reference, which is also the volume driver name.
    name: String,
    run_id: String,
    /// Filled in once dockerd has created the plugin; its log lines carry `plugin=<id>`.
    id: Option<String>,
    /// The host directory bound at /var/lib/ferry inside the plugin.
    state: PathBuf,
    // Drop runs first (plugin, volumes, containers gone), then the directory, then the lock.
    _tmp: tempfile::TempDir,
    _lock: Flock<File>,
}

impl ManagedPlugin {
    /// Takes the lock and prepares a name and a state directory; the plugin is not created yet.
    fn new() -> ManagedPlugin {
        let lock = lock_docker_tests();
        sweep_dead_runs();
        let run_id = run_id();
        let tmp = tempfile::Builder::new()
            .prefix("ferry-mp")
            .tempdir()
            .unwrap();
        let state = tmp.path().join("state");
        std::fs::create_dir(&state).unwrap();
        ManagedPlugin {
            name: format!("{NAME_PREFIX}{run_id}:latest"),
            run_id,
            id: None,
            state,
            _tmp: tmp,
            _lock: lock,
        }
    }

    fn label(&self) -> String {
        format!("{LABEL_KEY}={}", self.run_id)
    }

    fn volume_name(&self, suffix: &str) -> String {
        format!("{NAME_PREFIX}{}-{suffix}", self.run_id)
    }

    /// What a failure report needs: the plugin as dockerd sees it and the plugin's own log.
    fn diagnostics(&self) -> String {
        let inspect = match run("docker", &["plugin", "inspect", &self.name]) {
            Ok(o) => format!("{}{}", o.stdout, o.stderr),
            Err(e) => e,
        };
        let log = match &self.id {
            Some(id) => plugin_log(id),
            None => "(the plugin was not created)".to_string(),
        };
        format!(
            "--- docker plugin inspect {} ---\n{inspect}\n--- plugin log ---\n{log}",
            self.name
        )
    }

    fn fail(&self, what: &str) -> ! {
        panic!("{what}\n{}", self.diagnostics())
    }

    fn check<T>(&self, r: Result<T, String>) -> T {
        r.unwrap_or_else(|e| self.fail(&e))
    }

    fn docker(&self, args: &[&str]) -> String {
        self.check(run_ok("docker", args))
    }

    /// Runs a docker command and returns how long it took.
    fn timed_docker(&self, args: &[&str]) -> Duration {
        let start = Instant::now();
        self.docker(args);
        start.elapsed()
    }

    /// `docker run --rm` with the test label and no network, `input` on stdin, then `args`.
    fn docker_run(&self, input: Option<&str>, args: &[&str]) -> String {
        let label = self.label();
        let mut full = vec!["run", "--rm", "--network", "none", "--label", &label];
        if input.is_some() {
            full.push("-i");
        }
        full.extend_from_slice(args);
        let out = self.check(run_with("docker", &full, input, COMMAND_TIMEOUT));
        self.check(check_ok("docker", &full, out))
    }

    fn volume_status(&self, volume: &str) -> Value {
        let text = self.docker(&["volume", "inspect", volume]);
        let all: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| self.fail(&format!("volume inspect gave non-JSON {text:?}: {e}")));
        all[0]["Status"].clone()
    }

    /// The volumes in Ferry's catalog, asked from the host through the admin socket the plugin keeps in
    /// its state directory (`ferry ls`), so the check does not depend on what dockerd caches.
    fn catalog_volumes(&self) -> Vec<String> {
        let state = self.state.to_str().unwrap();
        let args = ["ls", "--state-dir", state, "--json"];
        let text = self.check(run_ok(env!("CARGO_BIN_EXE_ferry"), &args));
        let json: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| self.fail(&format!("ferry ls gave non-JSON {text:?}: {e}")));
        let mut names: Vec<String> = json
            .as_array()
            .unwrap_or_else(|| self.fail(&format!("ferry ls gave no array: {json}")))
            .iter()
            .filter_map(|v| v["name"].as_str().map(str::to_string))
            .collect();
        names.sort();
        names
    }

    fn enabled(&self) -> bool {
        self.docker(&["plugin", "inspect", "-f", "{{.Enabled}}", &self.name])
            .trim()
            == "true"
    }

    fn enable(&self) -> Duration {
        let timeout = ENABLE_TIMEOUT_SECS.to_string();
        self.timed_docker(&["plugin", "enable", "--timeout", &timeout, &self.name])
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

impl Drop for ManagedPlugin {
    /// Removes the plugin and everything made with it. Errors are ignored: this also runs while a failed
    /// test unwinds.
    fn drop(&mut self) {
        remove_plugin_and_volumes(&self.name, Some(&self.label()));
    }
}

/// This plugin's lines from dockerd's log (the last 200).
fn plugin_log(id: &str) -> String {
    let candidates = std::env::var("FERRY_DOCKERD_LOG")
        .ok()
        .into_iter()
        .chain(DOCKERD_LOGS.iter().map(|s| s.to_string()));
    for path in candidates {
        let Ok(text) = std::fs::read(&path) else {
            continue;
        };
        let text = String::from_utf8_lossy(&text);
        let tag = format!("plugin={id}");
        // Capabilities is asked before nearly every call and says nothing.
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(&tag) && !l.contains("VolumeDriver.Capabilities"))
            .collect();
        let tail = &lines[lines.len().saturating_sub(200)..];
        return format!("(from {path})\n{}", tail.join("\n"));
    }
    format!(
        "(no dockerd log found in {DOCKERD_LOGS:?}; set FERRY_DOCKERD_LOG; lines carry plugin={id})"
    )
}

fn status_str<'a>(p: &ManagedPlugin, status: &'a Value, key: &str) -> &'a str {
    status[key]
        .as_str()
        .unwrap_or_else(|| p.fail(&format!("volume Status has no string {key:?}: {status}")))
}

// ---------------------------------------------------------------------------------------------------------
// The scenario.

/// Build and create the plugin, point its state mount at a temporary directory, enable it; a plain and a
/// size-capped volume written by one container and read by another; disable (refused while volumes use it,
/// then forced) and enable again with the data intact; then remove the volumes and the plugin and check
/// the state directory and the loop device were released.
#[test]
fn managed_plugin_through_dockerd() {
    docker_ready();
    let started = Instant::now();
    let mut p = ManagedPlugin::new();
    let plain = p.volume_name("plain");
    let sized = p.volume_name("sized");

    // Packing: the script under test, with the binary cargo built for this test (no release build).
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-plugin");
    let script = script.to_str().unwrap();
    let create_started = Instant::now();
    let build_args = ["--name", &p.name, "--binary", env!("CARGO_BIN_EXE_ferry")];
    let out = p.check(run_with(
        script,
        &build_args,
        None,
        Duration::from_secs(300),
    ));
    p.check(check_ok(script, &build_args, out));
    let create_time = create_started.elapsed();
    let id = p.docker(&["plugin", "inspect", "-f", "{{.Id}}", &p.name]);
    p.id = Some(id.trim().to_string());
    if p.enabled() {
        p.fail("a newly created plugin is enabled");
    }
    // The script refuses to replace an existing plugin, which would orphan its volumes.
    let again = p.check(run(script, &build_args));
    if again.status.success() || !again.stderr.contains("already exists") {
        p.fail(&format!(
            "build-plugin over an existing plugin: {} {}",
            again.status, again.stderr
        ));
    }

    let state_setting = format!("state.source={}", p.state.display());
    p.docker(&["plugin", "set", &p.name, &state_setting, "FERRY_LOG=debug"]);
    let enable_time = p.enable();
    if !p.enabled() {
        p.fail("enable succeeded but the plugin is not enabled");
    }
    eprintln!(
        "plugin {}: build-plugin + create {create_time:.2?}, enable {enable_time:.2?}",
        p.name
    );

    let create_plain = p.timed_docker(&["volume", "create", "-d", &p.name, &plain]);
    let create_sized = p.timed_docker(&[
        "volume",
        "create",
        "-d",
        &p.name,
        "-o",
        "size=64MiB",
        &sized,
    ]);
    eprintln!("volume create: plain {create_plain:.2?}, 64MiB ext4 {create_sized:.2?}");
    // The state mount works: the volumes live in the host directory given with `plugin set`.
    let plain_data = p.state.join("local").join(&plain).join("data");
    let sized_image = p.state.join("local").join(&sized).join("disk.img");
    if !plain_data.is_dir() || !sized_image.is_file() {
        p.fail(&format!(
            "expected {} and {} on the host",
            plain_data.display(),
            sized_image.display()
        ));
    }

    let mut both = vec![plain.clone(), sized.clone()];
    both.sort();
    let listed = p.catalog_volumes();
    if listed != both {
        p.fail(&format!("ferry ls lists {listed:?}, expected {both:?}"));
    }

    // Writes into both volumes from one container, fed on stdin.
    let content = format!("written through the managed plugin, run {}\n", p.run_id);
    let plain_bind = format!("{plain}:/plain");
    let sized_bind = format!("{sized}:/sized");
    let mount_started = Instant::now();
    p.docker_run(
        Some(&content),
        &[
            "-v",
            &plain_bind,
            "-v",
            &sized_bind,
            BASE_IMAGE,
            "tee",
            "/plain/hello.txt",
            "/sized/hello.txt",
        ],
    );
    eprintln!(
        "first container on both volumes (mount, write, unmount): {:.2?}",
        mount_started.elapsed()
    );
    // A plain volume is a directory in the state directory: the file is there on the host too.
    let on_host = std::fs::read_to_string(plain_data.join("hello.txt")).unwrap_or_default();
    if on_host != content {
        p.fail(&format!(
            "the host copy of the plain volume's file is {on_host:?}"
        ));
    }

    // While a container holds the capped volume: Status from Ferry, and a loop device behind the image.
    let image_suffix = format!("/local/{sized}/disk.img");
    let label = p.label();
    let holder = p.docker(&[
        "run",
        "-d",
        "--network",
        "none",
        "--label",
        &label,
        "-v",
        &sized_bind,
        BASE_IMAGE,
        "sleep",
        "120",
    ]);
    let holder = holder.trim().to_string();
    p.wait_for(
        "the capped volume to show an active mount",
        Duration::from_secs(30),
        || p.volume_status(&sized)["active_mounts"].as_u64() == Some(1),
    );
    let status = p.volume_status(&sized);
    for (key, want) in [
        ("health", "ok"),
        ("backend", "local"),
        ("fs", "ext4"),
        ("size", "64MiB"),
    ] {
        let got = status_str(&p, &status, key);
        if got != want {
            p.fail(&format!(
                "Status.{key} is {got:?}, expected {want:?}: {status}"
            ));
        }
    }
    let loops = loop_devices_backed_by(&image_suffix);
    if loops.len() != 1 {
        p.fail(&format!(
            "expected one loop device behind {image_suffix}, found {loops:?}"
        ));
    }
    eprintln!("while mounted: {} backs {sized}; Status {status}", loops[0]);
    let df = p.docker_run(None, &["-v", &sized_bind, BASE_IMAGE, "df", "-k", "/sized"]);
    // `size` is the room a new volume has: df shows at least 64 MiB available, in a filesystem made only
    // as much larger as its own overhead needs.
    let column = |n: usize| -> u64 {
        df.lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().nth(n))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| p.fail(&format!("unexpected df output {df:?}")))
    };
    let (total_kib, available_kib) = (column(1), column(3));
    if available_kib < 64 * 1024 || total_kib > 96 * 1024 {
        p.fail(&format!(
            "the capped volume has {available_kib} KiB available of {total_kib} KiB, expected at least 64 MiB available in at most 96 MiB: {df}"
        ));
    }
    p.docker(&["rm", "-f", &holder]);
    let plain_status = p.volume_status(&plain);
    if status_str(&p, &plain_status, "health") != "ok" {
        p.fail(&format!("plain volume Status: {plain_status}"));
    }

    let read_back = |p: &ManagedPlugin, when: &str| {
        let read = p.docker_run(
            None,
            &[
                "-v",
                &plain_bind,
                "-v",
                &sized_bind,
                BASE_IMAGE,
                "cat",
                "/plain/hello.txt",
                "/sized/hello.txt",
            ],
        );
        if read != format!("{content}{content}") {
            p.fail(&format!(
                "{when}: read back {read:?}, expected {content:?} twice"
            ));
        }
    };
    read_back(&p, "second container");

    // Docker refuses to disable a plugin its volumes reference, unless forced.
    let refused = p.check(run("docker", &["plugin", "disable", &p.name]));
    if refused.status.success() || !refused.stderr.contains("in use") {
        p.fail(&format!(
            "disable while volumes exist: {} {:?}",
            refused.status, refused.stderr
        ));
    }
    p.docker(&["plugin", "disable", "-f", &p.name]);
    if p.enabled() {
        p.fail("the plugin is still enabled after disable -f");
    }
    let reenable_time = p.enable();
    eprintln!("re-enable: {reenable_time:.2?}");
    read_back(&p, "after disable -f and enable");

    // Removal: Docker's list (from Ferry's List), the catalog, the state directory, the loop device.
    p.docker(&["volume", "rm", &plain, &sized]);
    let driver_filter = format!("driver={}", p.name);
    let left = p.docker(&["volume", "ls", "-q", "--filter", &driver_filter]);
    if !left.trim().is_empty() {
        p.fail(&format!("volumes still listed after removal: {left}"));
    }
    let listed = p.catalog_volumes();
    if !listed.is_empty() {
        p.fail(&format!("the catalog still has {listed:?} after removal"));
    }
    for v in [&plain, &sized] {
        let dir = p.state.join("local").join(v);
        if dir.exists() {
            p.fail(&format!("{} survived the removal", dir.display()));
        }
    }
    p.wait_for(
        "the loop device to be released",
        Duration::from_secs(10),
        || loop_devices_backed_by(&image_suffix).is_empty(),
    );

    p.docker(&["plugin", "disable", &p.name]);
    p.docker(&["plugin", "rm", &p.name]);
    let plugins = p.docker(&["plugin", "ls", "--format", "{{.Name}}"]);
    if plugins.lines().any(|n| n == p.name) {
        p.fail(&format!("{} is still installed: {plugins}", p.name));
    }
    // The state outlives the plugin (catalog kept, no volume directories), ready for a reinstall.
    if !p.state.join("catalog.redb").is_file() {
        p.fail("the catalog did not outlive the plugin");
    }
    let leftovers: Vec<_> = std::fs::read_dir(p.state.join("local"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    if !leftovers.is_empty() {
        p.fail(&format!(
            "volume directories left in the state: {leftovers:?}"
        ));
    }
    eprintln!("managed-plugin scenario took {:.2?}", started.elapsed());
}

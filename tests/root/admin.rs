//! The operator CLI against a real daemon: `ferry ls`, `inspect`, `status` and `doctor` over the admin
//! socket, as tables and as JSON, and the errors an operator sees when the socket is wrong, the daemon is
//! down, or the caller is not root.

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::{ferry, ferry_bin, is_mounted, Daemon, NamespaceHolder, Ran};
use serde_json::Value;

fn json(args: &[&str], state: &Path) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let ran = ferry(&all, state);
    assert_eq!(ran.code, 0, "{args:?} failed: {}", ran.stderr);
    serde_json::from_str(&ran.stdout).unwrap_or_else(|e| panic!("{e}: {}", ran.stdout))
}

#[test]
fn ls_inspect_and_status_show_what_the_daemon_knows() {
    let d = Daemon::start();
    d.create("plain", r#"{"uid":"1000","mode":"0750"}"#);
    d.create("capped", r#"{"size":"32MiB"}"#);
    let mountpoint = d.mount("capped", "m1");
    d.mount("capped", "m1");
    d.mount("capped", "m2");

    let ls = ferry(&["ls"], &d.state);
    assert_eq!(ls.code, 0, "{}", ls.stderr);
    let lines: Vec<&str> = ls.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", ls.stdout);
    assert!(lines[0].starts_with("NAME") && lines[0].contains("MOUNTPOINT"));
    let capped = lines.iter().find(|l| l.starts_with("capped")).unwrap();
    assert!(
        capped.contains("32MiB") && capped.contains(" 3 "),
        "{capped}"
    );
    assert!(
        capped.ends_with(&mountpoint.display().to_string()),
        "{capped}"
    );
    let plain = lines.iter().find(|l| l.starts_with("plain")).unwrap();
    assert!(
        plain.contains("unlimited") && plain.trim_end().ends_with('-'),
        "{plain}"
    );

    let all = json(&["ls"], &d.state);
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0]["name"], "capped");
    assert_eq!(all[0]["active_mounts"], 3);
    assert_eq!(all[0]["mount_ids"]["m1"], 2);
    assert_eq!(all[0]["mount_ids"]["m2"], 1);
    assert_eq!(all[0]["backend_status"]["size_bytes"], 32 << 20);
    assert_eq!(all[1]["options"]["uid"], "1000");

    let one = json(&["inspect", "capped"], &d.state);
    assert_eq!(one["state"], "ready");
    assert_eq!(one["health"], "ok");
    assert_eq!(one["mountpoint"], mountpoint.display().to_string());
    assert!(one["catalog_version"].as_u64().unwrap() >= 3);
    let text = ferry(&["inspect", "capped"], &d.state);
    assert!(text.stdout.contains("m1 (x2)"), "{}", text.stdout);

    let missing = ferry(&["inspect", "nope"], &d.state);
    assert_eq!(missing.code, 1);
    assert!(
        missing.stderr.contains("\"nope\" does not exist"),
        "{}",
        missing.stderr
    );
    let bad = ferry(&["inspect", "../etc"], &d.state);
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("volume name"), "{}", bad.stderr);

    let status = json(&["status"], &d.state);
    assert_eq!(status["pid"], d.pid());
    assert_eq!(status["volumes"], 2);
    assert_eq!(status["active_mounts"], 3);
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    let local = &status["backends"][0];
    assert_eq!(local["backend"], "local");
    assert_eq!(local["reachable"], true);
    assert!(local["details"]["free_bytes"].as_u64().unwrap() > 0);
    let text = ferry(&["status"], &d.state);
    assert_eq!(text.code, 0);
    assert!(text.stdout.contains("BACKEND") && text.stdout.contains("local"));

    d.unmount("capped", "m1");
    d.unmount("capped", "m1");
    d.unmount("capped", "m2");
    d.remove("capped");
    d.remove("plain");
    assert_eq!(ferry(&["ls"], &d.state).stdout, "no volumes\n");
}

#[test]
fn status_reports_an_unusable_backend_and_exits_2() {
    let d = Daemon::start();
    // A read-only bind mount over the local backend's root makes it unusable without touching the daemon.
    let root = d.state.join("local");
    let ro = nix::mount::MsFlags::MS_BIND;
    nix::mount::mount(Some(&root), &root, None::<&str>, ro, None::<&str>).unwrap();
    nix::mount::mount(
        None::<&str>,
        &root,
        None::<&str>,
        ro | nix::mount::MsFlags::MS_REMOUNT | nix::mount::MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .unwrap();
    let ran = ferry(&["status", "--json"], &d.state);
    let text = ferry(&["status"], &d.state);
    nix::mount::umount2(&root, nix::mount::MntFlags::MNT_DETACH).unwrap();
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    let status: Value = serde_json::from_str(&ran.stdout).unwrap();
    assert_eq!(status["backends"][0]["reachable"], false);
    let error = status["backends"][0]["error"].as_str().unwrap();
    assert!(error.contains("Read-only file system"), "{error}");
    assert!(text.stdout.contains("NO"), "{}", text.stdout);
    let doctor = json(&["doctor"], &d.state);
    assert_eq!(doctor["ok"], true, "the host itself is fine: {doctor}");
}

#[test]
fn doctor_checks_the_host_and_the_daemon() {
    let d = Daemon::start();
    let report = json(&["doctor"], &d.state);
    let checks = report["checks"].as_array().unwrap();
    let find = |name: &str| {
        checks
            .iter()
            .find(|c| c["check"] == name)
            .unwrap_or_else(|| panic!("no {name} check in {report}"))
    };
    // This machine runs the whole test suite, so everything the suite needs must pass here.
    for name in [
        "privileges",
        "loop devices",
        "mkfs.ext4",
        "state directory",
        "daemon",
        "backend: local",
    ] {
        assert_eq!(find(name)["verdict"], "ok", "{}", find(name));
    }
    assert_eq!(report["ok"], true);
    let text = ferry(&["doctor"], &d.state);
    assert_eq!(text.code, 0, "{}", text.stdout);
    assert!(text.stdout.contains("failed, "), "{}", text.stdout);

    // Without a daemon the host checks still run, and the daemon check says what is wrong.
    let tmp = tempfile::tempdir().unwrap();
    let report = json(&["doctor"], &tmp.path().join("nowhere"));
    let daemon = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "daemon")
        .unwrap();
    assert_eq!(daemon["verdict"], "warn");
    assert!(daemon["detail"]
        .as_str()
        .unwrap()
        .contains("does not exist"));
    assert!(daemon["fix"].as_str().unwrap().contains("start the daemon"));
}

#[test]
fn errors_name_the_socket_and_whether_the_daemon_runs() {
    let mut d = Daemon::start();
    let socket = d.state.join("admin.sock");
    let pid = d.pid();

    // Another state directory: the message names the socket it tried and the daemon that does run.
    let tmp = tempfile::tempdir().unwrap();
    let elsewhere = ferry(&["ls"], tmp.path());
    assert_eq!(elsewhere.code, 1);
    assert!(
        elsewhere
            .stderr
            .contains(&tmp.path().join("admin.sock").display().to_string())
            && elsewhere.stderr.contains("the socket does not exist")
            && elsewhere.stderr.contains("a ferry daemon is running")
            && elsewhere.stderr.contains(&pid.to_string()),
        "{}",
        elsewhere.stderr
    );

    // Not root: the socket refuses, whatever its mode says.
    std::fs::set_permissions(&d.state, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let nobody = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            ferry_bin(),
            "ls",
            "--admin-socket",
        ])
        .arg(&socket)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&nobody.stderr);
    assert_eq!(nobody.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("it is for root only"), "{stderr}");
    assert!(stderr.contains(&socket.display().to_string()), "{stderr}");

    // A crashed daemon leaves its socket behind: the message says nothing listens and the pid is gone.
    d.kill9();
    let dead = ferry(&["status"], &d.state);
    assert_eq!(dead.code, 1);
    assert!(
        dead.stderr.contains("nothing listens on it"),
        "{}",
        dead.stderr
    );
    // Other tests' daemons may run beside this one; the killed one must not be listed among them.
    let listed: Vec<u32> = dead
        .stderr
        .split_once("running (pid ")
        .map(|(_, rest)| rest.split(')').next().unwrap_or(""))
        .unwrap_or("")
        .split(", ")
        .filter_map(|p| p.parse().ok())
        .collect();
    assert!(!listed.contains(&pid), "{}", dead.stderr);
    // A clean stop removes the admin socket with the plugin socket.
    d.spawn(&[]);
    assert!(socket.exists());
    assert!(d.terminate().success());
    assert!(!socket.exists());
    assert!(!d.socket.exists());
}

/// Runs `ferry ARGS --state-dir STATE` with stdout (`closed_stdout`) or stderr on a pipe whose reading
/// end is already closed, so every write to it fails with EPIPE, as under `ferry ls | head -0`.
fn ferry_into_closed_pipe(args: &[&str], state: &Path, closed_stdout: bool) -> Ran {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut cmd = Command::new(ferry_bin());
    cmd.args(args)
        .arg("--state-dir")
        .arg(state)
        .env_remove("FERRY_ADMIN_SOCKET")
        .env_remove("FERRY_CONFIG");
    if closed_stdout {
        cmd.stdout(writer).stderr(std::process::Stdio::piped());
    } else {
        cmd.stderr(writer).stdout(std::process::Stdio::piped());
    }
    let out = cmd.output().unwrap();
    Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn a_reader_that_goes_away_is_not_a_crash() {
    let d = Daemon::start();
    d.create("one", "{}");
    // Each command's usual exit status, quietly: the output was not wanted, the outcome stands.
    for (args, code) in [
        (&["ls"][..], 0),
        (&["ls", "--json"][..], 0),
        (&["inspect", "one"][..], 0),
        (&["status"][..], 0),
        (&["doctor", "--json"][..], 0),
    ] {
        let ran = ferry_into_closed_pipe(args, &d.state, true);
        assert_eq!(ran.code, code, "{args:?}: {}", ran.stderr);
        assert!(
            !ran.stderr.contains("panicked") && !ran.stderr.contains("Broken pipe"),
            "{args:?}: {}",
            ran.stderr
        );
    }
    // A failing command whose error cannot be shown still exits with 1, not a panic's 101.
    let tmp = tempfile::tempdir().unwrap();
    let ran = ferry_into_closed_pipe(&["ls"], &tmp.path().join("nowhere"), false);
    assert_eq!(ran.code, 1, "{}", ran.stdout);
}

#[test]
fn doctor_as_another_user_says_it_needs_root() {
    let d = Daemon::start();
    // As with /var/lib/ferry: the state directory is root's (0700) inside a directory anyone may enter.
    std::fs::set_permissions(&d.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = |json: bool| {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            ferry_bin(),
            "doctor",
            "--state-dir",
        ])
        .arg(&d.state)
        .env_remove("FERRY_ADMIN_SOCKET")
        .env_remove("FERRY_CONFIG");
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, text) = run(false);
    assert_eq!(code, Some(2), "{text}");
    // Neither a read-only filesystem nor a missing daemon: the user lacks root.
    assert!(
        !text.contains("read-only") && !text.contains("start the daemon"),
        "{text}"
    );
    assert!(text.contains("not running as root (uid 65534)"), "{text}");
    let (_, json) = run(true);
    let report: Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    let find = |name: &str| {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == name)
            .unwrap_or_else(|| panic!("no {name} check in {report}"))
            .clone()
    };
    let state = find("state directory");
    assert_eq!(state["verdict"], "warn", "{state}");
    assert!(
        state["detail"]
            .as_str()
            .unwrap()
            .contains("is not writable by this user (permission denied to uid 65534, not root)"),
        "{state}"
    );
    assert!(
        state["fix"].as_str().unwrap().contains("as root"),
        "{state}"
    );
    let daemon = find("daemon");
    assert!(
        daemon["detail"]
            .as_str()
            .unwrap()
            .contains("it is for root only")
            && daemon["fix"]
                .as_str()
                .unwrap()
                .contains("run `ferry doctor` as root"),
        "{daemon}"
    );
    // /dev/loop-control is root's: the check says it could not look, not that loop devices are missing.
    let loops = find("loop devices");
    if loops["verdict"] != "ok" {
        assert!(
            loops["detail"].as_str().unwrap().starts_with("not checked")
                && !loops["fix"].as_str().unwrap().contains("modprobe"),
            "{loops}"
        );
    }
}

#[test]
fn a_missing_configuration_file_is_named_once() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("ferry.toml");
    let ran = ferry(
        &["ls", "--config", missing.to_str().unwrap()],
        &tmp.path().join("state"),
    );
    assert_eq!(ran.code, 1);
    // The whole of stderr: the cause once, and what to do.
    assert_eq!(
        ran.stderr,
        format!(
            "ferry: cannot read the configuration file {}: it does not exist; fix the path, or drop \
             --config / FERRY_CONFIG to run on the embedded defaults\n",
            missing.display()
        )
    );
}

/// `ferry release` drops mount IDs Docker will never unmount: refused while another mount namespace (a
/// container) still has the volume mounted, done with `--force` or once it is gone; the last one releases
/// the storage, and the volume can be removed.
#[test]
fn release_frees_mount_ids_only_when_nothing_holds_the_volume_or_when_forced() {
    let d = Daemon::start();
    for (name, opts) in [("capped", r#"{"size":"32M"}"#), ("plain", "null")] {
        d.create(name, opts);
        let mp = d.mount(name, "c1");
        d.mount(name, "c2");
        let container = NamespaceHolder::start();
        // Docker bind-mounts a plain volume's directory into the container.
        let in_container = d.dir.join(format!("container-{name}"));
        container.bind(&mp, &in_container);
        // Docker's own check: still in use.
        let err = d.err("/VolumeDriver.Remove", &format!(r#"{{"Name":"{name}"}}"#));
        assert!(err.contains("ferry release"), "{err}");

        let held = ferry(&["release", name], &d.state);
        assert_eq!(held.code, 1, "{name}: {}{}", held.stdout, held.stderr);
        assert!(
            held.stderr
                .contains("still mounted in another mount namespace")
                && held.stderr.contains(&format!("pid {}", container.pid())),
            "{name}: {}",
            held.stderr
        );
        assert_eq!(d.get(name)["Status"]["active_mounts"], 2, "{name}");
        let unknown = ferry(&["release", name, "--id", "nope"], &d.state);
        assert!(
            unknown
                .stderr
                .contains("has no active mount with ID \"nope\""),
            "{}",
            unknown.stderr
        );

        // --force drops one ID while the container still holds the volume.
        let forced = json(&["release", name, "--id", "c1", "--force"], &d.state);
        assert_eq!(forced["released"], serde_json::json!(["c1"]), "{forced}");
        assert_eq!(forced["detached"], false, "{forced}");
        assert_eq!(d.get(name)["Status"]["active_mounts"], 1, "{name}");

        // Once the container is gone, no force is needed; the last ID releases the storage.
        container.stop();
        let done = ferry(&["release", name], &d.state);
        assert_eq!(done.code, 0, "{name}: {}", done.stderr);
        assert!(
            done.stdout.contains("released mount ID(s) c2")
                && done.stdout.contains("its storage was released"),
            "{}",
            done.stdout
        );
        assert_eq!(d.get(name)["Status"]["active_mounts"], 0, "{name}");
        if name == "capped" {
            assert!(!is_mounted(&mp));
        }
        let again = ferry(&["release", name], &d.state);
        assert!(
            again.stdout.contains("no mount IDs to release"),
            "{}",
            again.stdout
        );
        d.remove(name);
    }
    assert!(d.log_text().contains("mount IDs released by the operator"));
}

//! Docker's volume-plugin protocol over a real socket with raw JSON, against the real daemon.

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Barrier};

use common::{is_mounted, raw_call, raw_request, Daemon, NamespaceHolder};

fn names(d: &Daemon) -> Vec<String> {
    let v = d.ok("/VolumeDriver.List", "{}");
    v["Volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["Name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn activate_capabilities_and_empty_list() {
    let d = Daemon::start();
    let (status, body) = raw_call(&d.socket, "POST", "/Plugin.Activate", b"");
    assert_eq!(status, 200);
    assert_eq!(body, r#"{"Implements":["VolumeDriver"]}"#);
    for body in ["", "{}", "{}\n"] {
        let caps = d.ok("/VolumeDriver.Capabilities", body);
        assert_eq!(caps["Capabilities"]["Scope"], "local");
        assert_eq!(
            d.ok("/VolumeDriver.List", body)["Volumes"],
            serde_json::json!([])
        );
    }
}

#[test]
fn create_get_path_list_remove() {
    let d = Daemon::start();
    d.ok("/VolumeDriver.Create", r#"{"Name":"plain","Opts":null}"#);
    d.ok("/VolumeDriver.Create", r#"{"Name":"noopts"}"#);
    d.create(
        "capped",
        r#"{"size":"32MiB","mode":"0750","uid":"1000","gid":"1000"}"#,
    );
    let anon = "4f2c1b7a9e0d4c5b6a7f8e9d0c1b2a3f4e5d6c7b8a9f0e1d2c3b4a5f6e7d8c9b";
    d.ok(
        "/VolumeDriver.Create",
        &format!(r#"{{"Name":"{anon}","Opts":null}}"#),
    );
    assert_eq!(names(&d), vec![anon, "capped", "noopts", "plain"]);

    let v = d.get("capped");
    assert_eq!(v["Name"], "capped");
    assert!(v.get("Mountpoint").is_none(), "not mounted yet: {v}");
    let created = v["CreatedAt"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(created).is_ok(), "{created}");
    let st = &v["Status"];
    assert_eq!(st["backend"], "local");
    assert_eq!(st["size"], "32MiB");
    assert_eq!(st["active_mounts"], 0);
    assert_eq!(st["health"], "ok");
    assert_eq!(st["options"]["mode"], "0750");
    assert_eq!(st["options"]["fs"], "ext4");
    assert_eq!(
        d.ok("/VolumeDriver.Path", r#"{"Name":"capped"}"#)["Mountpoint"],
        ""
    );

    // Same options in another spelling: idempotent. Different: refused, naming the option.
    d.create(
        "capped",
        r#"{"size":"32M","mode":"750","uid":"1000","gid":"1000","fs":"ext4"}"#,
    );
    let err = d.err(
        "/VolumeDriver.Create",
        r#"{"Name":"capped","Opts":{"size":"64M","mode":"0750","uid":"1000","gid":"1000"}}"#,
    );
    assert!(err.contains("\"size\""), "{err}");
    let err = d.err(
        "/VolumeDriver.Create",
        r#"{"Name":"plain","Opts":{"uid":"5"}}"#,
    );
    assert!(err.contains("\"uid\""), "{err}");

    let mp = d.mount("capped", "id1");
    assert_eq!(
        d.ok("/VolumeDriver.Path", r#"{"Name":"capped"}"#)["Mountpoint"],
        mp.to_str().unwrap()
    );
    let list = d.ok("/VolumeDriver.List", "{}");
    let entry = list["Volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["Name"] == "capped")
        .unwrap()
        .clone();
    assert_eq!(entry["Mountpoint"], mp.to_str().unwrap());
    d.unmount("capped", "id1");

    for n in [anon, "capped", "noopts", "plain"] {
        d.remove(n);
    }
    assert!(names(&d).is_empty());
    let err = d.err("/VolumeDriver.Get", r#"{"Name":"plain"}"#);
    assert!(err.contains("does not exist"), "{err}");
    let err = d.err("/VolumeDriver.Remove", r#"{"Name":"plain"}"#);
    assert!(err.contains("does not exist"), "{err}");
    assert_eq!(std::fs::read_dir(d.state.join("local")).unwrap().count(), 0);
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let d = Daemon::start();
    d.create("keep", "null");
    let before = names(&d);
    let entries_before = std::fs::read_dir(d.state.join("local")).unwrap().count();

    let long = "a".repeat(256);
    for name in [
        "",
        "..",
        ".",
        "../etc",
        "a/b",
        "/abs",
        "a b",
        "a\\u0000b",
        "-x",
        "a\\nb",
        long.as_str(),
    ] {
        for ep in [
            "/VolumeDriver.Create",
            "/VolumeDriver.Get",
            "/VolumeDriver.Remove",
            "/VolumeDriver.Path",
        ] {
            let err = d.err(ep, &format!(r#"{{"Name":"{name}"}}"#));
            assert!(err.contains("volume name"), "{ep} {name:?}: {err}");
        }
        let err = d.err(
            "/VolumeDriver.Mount",
            &format!(r#"{{"Name":"{name}","ID":"x"}}"#),
        );
        assert!(err.contains("volume name"), "{name:?}: {err}");
    }
    let cases = [
        (r#"{"password":"hunter2"}"#, "\"password\""),
        (r#"{"size":"lots"}"#, "\"size\""),
        (r#"{"size":"1K"}"#, "\"size\""),
        (r#"{"fs":"xfs"}"#, "\"size\""),
        (r#"{"size":"1G","fs":"ntfs"}"#, "\"fs\""),
        (r#"{"uid":"root"}"#, "\"uid\""),
        (r#"{"gid":"-4"}"#, "\"gid\""),
        (r#"{"mode":"999"}"#, "\"mode\""),
        (r#"{"backend":"tape"}"#, "\"backend\""),
    ];
    for (opts, key) in cases {
        let err = d.err(
            "/VolumeDriver.Create",
            &format!(r#"{{"Name":"new","Opts":{opts}}}"#),
        );
        assert!(err.contains(key), "{opts}: {err}");
        assert!(!err.contains("hunter2"), "secret echoed: {err}");
    }
    let err = d.err(
        "/VolumeDriver.Create",
        r#"{"Name":"new","Opts":{"password":"x"}}"#,
    );
    assert!(err.contains("backend, size, fs, uid, gid, mode"), "{err}");

    // Bodies: empty, malformed, wrong types, missing fields.
    for ep in [
        "/VolumeDriver.Create",
        "/VolumeDriver.Remove",
        "/VolumeDriver.Mount",
        "/VolumeDriver.Unmount",
        "/VolumeDriver.Path",
        "/VolumeDriver.Get",
    ] {
        for body in [
            "",
            "\n",
            "{",
            "[]",
            "null",
            "{}",
            r#"{"Name":5}"#,
            "\u{0}\u{1}",
        ] {
            let (status, json) = d.call(ep, body);
            assert_eq!(status, 400, "{ep} {body:?}: {json}");
            assert!(
                json["Err"].as_str().is_some_and(|e| !e.is_empty()),
                "{ep} {body:?}: {json}"
            );
        }
    }
    let err = d.err("/VolumeDriver.Mount", r#"{"Name":"keep"}"#);
    assert!(err.contains("ID"), "{err}");
    let err = d.err("/VolumeDriver.Mount", r#"{"Name":"keep","ID":""}"#);
    assert!(err.contains("mount ID"), "{err}");
    let err = d.err("/VolumeDriver.Create", r#"{"Name":"x","Opts":{"size":1}}"#);
    assert!(err.contains("Create"), "{err}");

    // Paths and methods.
    let (status, body) = raw_call(&d.socket, "POST", "/VolumeDriver.Explode", b"{}");
    assert_eq!(status, 404);
    assert!(
        body.contains("unknown endpoint") && body.contains("VolumeDriver.Mount"),
        "{body}"
    );
    let (status, body) = raw_call(&d.socket, "GET", "/VolumeDriver.List", b"");
    assert_eq!(status, 405);
    assert!(body.contains("POST"), "{body}");
    let (status, _) = raw_call(
        &d.socket,
        "DELETE",
        "/VolumeDriver.Remove",
        br#"{"Name":"keep"}"#,
    );
    assert_eq!(status, 405);
    let huge = format!(
        r#"{{"Name":"big","Opts":{{"size":"{}"}}}}"#,
        "9".repeat(2 << 20)
    );
    let (status, body) = raw_call(&d.socket, "POST", "/VolumeDriver.Create", huge.as_bytes());
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("Err"), "{body}");
    let (status, _) = raw_request(&d.socket, b"this is not http\r\n\r\n");
    assert_eq!(status, 400);

    assert_eq!(names(&d), before);
    assert_eq!(
        std::fs::read_dir(d.state.join("local")).unwrap().count(),
        entries_before
    );
    // The daemon is still healthy after all of that.
    d.get("keep");
}

#[test]
fn mount_counts_per_id() {
    let d = Daemon::start();
    d.create("v", r#"{"size":"32M"}"#);
    let id = "e".repeat(64);
    let p1 = d.mount("v", &id);
    // docker cp mounts again with the same ID.
    let p2 = d.mount("v", &id);
    assert_eq!(p1, p2);
    assert!(is_mounted(&p1));
    assert_eq!(d.get("v")["Status"]["active_mounts"], 2);
    // While a container holds the volume, Remove refuses.
    let container = NamespaceHolder::start();
    let err = d.err("/VolumeDriver.Remove", r#"{"Name":"v"}"#);
    assert!(err.contains("in use"), "{err}");
    container.stop();
    // Unmount of an unknown ID succeeds and changes nothing.
    d.unmount("v", "not-a-known-id");
    d.unmount("v", &id);
    assert!(
        is_mounted(&p1),
        "the first unmount must not release while the ID is still active"
    );
    assert_eq!(d.get("v")["Status"]["active_mounts"], 1);
    d.unmount("v", &id);
    assert!(!is_mounted(&p1));
    assert_eq!(
        d.ok("/VolumeDriver.Path", r#"{"Name":"v"}"#)["Mountpoint"],
        ""
    );
    d.unmount("v", &id);
    d.remove("v");
    let err = d.err("/VolumeDriver.Mount", r#"{"Name":"v","ID":"x"}"#);
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn fifty_concurrent_mount_unmount_pairs() {
    let d = Arc::new(Daemon::start());
    d.create("busy", r#"{"size":"32M"}"#);
    let barrier = Arc::new(Barrier::new(50));
    let threads: Vec<_> = (0..50)
        .map(|i| {
            let d = d.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let id = format!("{i:064x}");
                let mp = d.mount("busy", &id);
                // Every Mount answers before any Unmount starts, so the volume is prepared once.
                barrier.wait();
                d.unmount("busy", &id);
                mp
            })
        })
        .collect();
    let points: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(points.windows(2).all(|w| w[0] == w[1]));
    assert!(!is_mounted(&points[0]));
    let st = &d.get("busy")["Status"];
    assert_eq!(st["active_mounts"], 0);
    assert_eq!(st["mount_ids"], 0);
    let log = d.log_text();
    let prepared = log
        .lines()
        .filter(|l| l.contains("storage prepared") && l.contains("busy"))
        .count();
    let released = log
        .lines()
        .filter(|l| l.contains("storage released") && l.contains("busy"))
        .count();
    assert_eq!((prepared, released), (1, 1), "{log}");
    d.remove("busy");
}

#[test]
fn keep_alive_connection_serves_many_calls() {
    use std::io::{BufRead, BufReader, Read, Write};
    let d = Daemon::start();
    d.create("k", "null");
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    for _ in 0..20 {
        let body = br#"{"Name":"k"}"#;
        write!(s, "POST /VolumeDriver.Get HTTP/1.1\r\nHost: plugin.moby.localhost\r\nContent-Length: {}\r\n\r\n", body.len()).unwrap();
        s.write_all(body).unwrap();
        let mut len = 0;
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("HTTP/1.1 200"), "{line}");
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut buf = vec![0; len];
        reader.read_exact(&mut buf).unwrap();
        assert!(String::from_utf8(buf).unwrap().contains("\"Name\":\"k\""));
    }
}

#[test]
fn socket_ownership_and_lifecycle() {
    let mut d = Daemon::start();
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let state_mode = std::fs::metadata(&d.state).unwrap().permissions().mode() & 0o777;
    assert_eq!(state_mode, 0o700);
    let catalog_mode = std::fs::metadata(d.state.join("catalog.redb"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(catalog_mode, 0o600);

    // A second daemon on a live socket refuses to start and leaves the first one serving.
    let out = std::process::Command::new(common::ferry_bin())
        .args(["serve", "--socket"])
        .arg(&d.socket)
        .arg("--state-dir")
        .arg(d.dir.join("other-state"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already serving"), "{stderr}");
    d.ok("/VolumeDriver.List", "{}");

    // SIGTERM removes the socket but leaves volumes in use mounted.
    d.create("inuse", r#"{"size":"32M"}"#);
    let mp = d.mount("inuse", "c1");
    std::fs::write(mp.join("f"), b"still here").unwrap();
    // The container using it runs on through the restart.
    let container = NamespaceHolder::start();
    let status = d.terminate();
    assert!(status.success(), "{status}\n{}", d.log_text());
    assert!(!d.socket.exists());
    assert!(is_mounted(&mp), "shutdown must not unmount a volume in use");

    // A stale socket file (no process behind it) is replaced.
    let stale = std::os::unix::net::UnixListener::bind(&d.socket).unwrap();
    drop(stale);
    assert!(d.socket.exists());
    d.spawn(&[]);
    assert_eq!(std::fs::read(mp.join("f")).unwrap(), b"still here");
    assert_eq!(d.get("inuse")["Status"]["active_mounts"], 1);
    container.stop();
    d.unmount("inuse", "c1");
    assert!(!is_mounted(&mp));
    let log = d.log_text();
    assert!(log.contains("replacing a stale socket"), "{log}");
}

#[test]
fn refuses_to_replace_a_non_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ferry.sock");
    std::fs::write(&sock, b"not a socket").unwrap();
    let out = std::process::Command::new(common::ferry_bin())
        .args(["serve", "--socket"])
        .arg(&sock)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
    assert_eq!(std::fs::read(&sock).unwrap(), b"not a socket");
    let _ = Path::new("/");
}

#[test]
fn sigterm_and_sigint_finish_calls_in_flight() {
    use std::io::{Read, Write};
    for signal in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
    ] {
        let mut d = Daemon::start();
        // Several slow creates (mkfs) in flight when the signal arrives.
        let mut streams: Vec<_> = (0..4)
            .map(|i| {
                let body = format!(r#"{{"Name":"slow{i}","Opts":{{"size":"1G","fs":"xfs"}}}}"#);
                let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
                write!(s, "POST /VolumeDriver.Create HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
                s
            })
            .collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while d.log_text().matches("call started").count() < 4 {
            assert!(std::time::Instant::now() < deadline, "{}", d.log_text());
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(d.pid() as i32), signal).unwrap();
        for s in &mut streams {
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            assert!(
                out.starts_with("HTTP/1.1 200"),
                "{signal}: {out}\n{}",
                d.log_text()
            );
        }
        let status = d.terminate_wait();
        assert!(status.success(), "{status}");
        assert!(!d.socket.exists(), "{signal}: the socket must be removed");
        d.spawn(&[]);
        for i in 0..4 {
            assert_eq!(d.get(&format!("slow{i}"))["Status"]["fs"], "xfs");
        }
    }
}

#[test]
fn shutdown_leaves_a_socket_that_another_daemon_took_over() {
    let mut first = Daemon::start();
    // Another process replaces the path while the first is still running (as a restart racing a stop can).
    let _ = std::fs::remove_file(&first.socket);
    std::fs::create_dir_all(first.dir.join("second")).unwrap();
    let second = Daemon::start_in(&first.dir.join("second"), &first.socket, &[]);
    let status = first.terminate();
    assert!(status.success());
    assert!(
        first.log_text().contains("belongs to another process"),
        "{}",
        first.log_text()
    );
    second.ok("/VolumeDriver.List", "{}");
}

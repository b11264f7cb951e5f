//! The plugin protocol in process: the real router, `VolumeService`, catalog and local backend behind a real
//! Unix socket in a temporary directory, with the recording mounter standing in for mount(2), so Docker's
//! calls are checked end to end over raw HTTP without root, loop devices or a daemon process.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry::listener::{bind_unix_socket, ListenerSettings, Peers};
use ferry::mount::RecordingMounter;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::common::{raw_call, raw_request};

/// One plugin: a runtime serving the socket until dropped.
struct Plugin {
    runtime: tokio::runtime::Runtime,
    stop: CancellationToken,
    socket: PathBuf,
    mounter: Arc<RecordingMounter>,
}

impl Plugin {
    fn start(dir: &Path) -> Plugin {
        Plugin::start_with(dir, Arc::new(RecordingMounter::default()))
    }

    /// Starts on `dir`'s catalog, as `ferry serve` would after a restart on the same state directory.
    fn start_with(dir: &Path, mounter: Arc<RecordingMounter>) -> Plugin {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let socket = dir.join("ferry.sock");
        let stop = CancellationToken::new();
        let listener = {
            let _entered = runtime.enter();
            bind_unix_socket(&socket).unwrap()
        };
        let service = runtime.block_on(crate::start_service(dir, &mounter));
        let limits = ListenerSettings::default().limits(64);
        // This process's own uid is admitted, as Ferry's own user is.
        let peers = Peers::Uids(vec![nix::unistd::geteuid().as_raw()]);
        runtime.spawn(ferry::plugin::server::serve(
            listener,
            service,
            limits,
            peers,
            stop.clone(),
        ));
        Plugin {
            runtime,
            stop,
            socket,
            mounter,
        }
    }

    fn call(&self, endpoint: &str, body: &str) -> (u16, Value) {
        let (status, text) = raw_call(&self.socket, "POST", endpoint, body.as_bytes());
        let json =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{endpoint}: {e}: {text:?}"));
        (status, json)
    }

    fn ok(&self, endpoint: &str, body: &str) -> Value {
        let (status, json) = self.call(endpoint, body);
        assert_eq!(status, 200, "{endpoint} {body}: {json}");
        assert!(
            json.get("Err").is_none_or(|e| e == ""),
            "{endpoint} {body}: {json}"
        );
        json
    }

    fn err(&self, endpoint: &str, body: &str) -> String {
        let (status, json) = self.call(endpoint, body);
        assert_ne!(status, 200, "{endpoint} {body} succeeded: {json}");
        json["Err"].as_str().unwrap_or_default().to_string()
    }

    fn names(&self) -> Vec<String> {
        self.ok("/VolumeDriver.List", "{}")["Volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["Name"].as_str().unwrap().to_string())
            .collect()
    }

    /// Stops serving and waits until the socket's calls are answered and the catalog is closed.
    fn stop(self) {
        self.stop.cancel();
        self.runtime.shutdown_timeout(Duration::from_secs(10));
    }
}

#[test]
fn activate_capabilities_and_the_volume_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let p = Plugin::start(dir.path());
    let (status, body) = raw_call(&p.socket, "POST", "/Plugin.Activate", b"");
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"Implements":["VolumeDriver"]}"#)
    );
    assert_eq!(
        p.ok("/VolumeDriver.Capabilities", "")["Capabilities"]["Scope"],
        "local"
    );
    assert_eq!(p.names(), Vec::<String>::new());

    p.ok(
        "/VolumeDriver.Create",
        r#"{"Name":"web","Opts":{"mode":"0750"}}"#,
    );
    p.ok("/VolumeDriver.Create", r#"{"Name":"cache","Opts":null}"#);
    assert_eq!(p.names(), ["cache", "web"]);
    let v = &p.ok("/VolumeDriver.Get", r#"{"Name":"web"}"#)["Volume"];
    assert_eq!(v["Status"]["backend"], "local");
    assert_eq!(v["Status"]["options"]["mode"], "0750");
    assert!(v.get("Mountpoint").is_none(), "not mounted yet: {v}");
    assert_eq!(
        p.ok("/VolumeDriver.Path", r#"{"Name":"web"}"#)["Mountpoint"],
        ""
    );

    let mp = p.ok("/VolumeDriver.Mount", r#"{"Name":"web","ID":"c1"}"#)["Mountpoint"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!mp.is_empty());
    assert_eq!(
        p.ok("/VolumeDriver.Path", r#"{"Name":"web"}"#)["Mountpoint"],
        mp.as_str()
    );
    assert_eq!(
        p.ok("/VolumeDriver.Get", r#"{"Name":"web"}"#)["Volume"]["Mountpoint"],
        mp.as_str()
    );
    // docker cp mounts again with the same ID: a count, not a set.
    p.ok("/VolumeDriver.Mount", r#"{"Name":"web","ID":"c1"}"#);
    let status = &p.ok("/VolumeDriver.Get", r#"{"Name":"web"}"#)["Volume"]["Status"];
    assert_eq!(status["active_mounts"], 2, "{status}");

    // A container holds the storage: Remove is refused and nothing is deleted.
    p.mounter.hold_elsewhere(&dir.path().join("local/web/data"));
    let err = p.err("/VolumeDriver.Remove", r#"{"Name":"web"}"#);
    assert!(err.contains("in use"), "{err}");
    p.mounter
        .release_elsewhere(&dir.path().join("local/web/data"));

    // Unmount of an unknown ID succeeds and changes nothing; the last unmount of the ID releases.
    p.ok("/VolumeDriver.Unmount", r#"{"Name":"web","ID":"unknown"}"#);
    p.ok("/VolumeDriver.Unmount", r#"{"Name":"web","ID":"c1"}"#);
    assert_eq!(
        p.ok("/VolumeDriver.Path", r#"{"Name":"web"}"#)["Mountpoint"],
        mp.as_str()
    );
    p.ok("/VolumeDriver.Unmount", r#"{"Name":"web","ID":"c1"}"#);
    assert_eq!(
        p.ok("/VolumeDriver.Path", r#"{"Name":"web"}"#)["Mountpoint"],
        ""
    );

    p.ok("/VolumeDriver.Remove", r#"{"Name":"web"}"#);
    assert_eq!(p.names(), ["cache"]);
    let err = p.err("/VolumeDriver.Get", r#"{"Name":"web"}"#);
    assert!(err.contains("does not exist"), "{err}");
    let err = p.err("/VolumeDriver.Mount", r#"{"Name":"web","ID":"c2"}"#);
    assert!(err.contains("does not exist"), "{err}");
    p.stop();
}

#[test]
fn create_is_idempotent_and_names_the_option_that_differs() {
    let dir = tempfile::tempdir().unwrap();
    let p = Plugin::start(dir.path());
    p.ok(
        "/VolumeDriver.Create",
        r#"{"Name":"v","Opts":{"mode":"0750","size":"32M"}}"#,
    );
    // The same options in another spelling.
    p.ok(
        "/VolumeDriver.Create",
        r#"{"Name":"v","Opts":{"mode":"750","fs":"ext4","size":"32MiB","backend":"local"}}"#,
    );
    let err = p.err(
        "/VolumeDriver.Create",
        r#"{"Name":"v","Opts":{"mode":"0700","size":"32M"}}"#,
    );
    assert!(err.contains("\"mode\""), "{err}");
    let err = p.err(
        "/VolumeDriver.Create",
        r#"{"Name":"w","Opts":{"colour":"blue"}}"#,
    );
    assert!(err.contains("colour"), "{err}");
    let err = p.err(
        "/VolumeDriver.Create",
        r#"{"Name":"w","Opts":{"uid":"-1"}}"#,
    );
    assert!(err.contains("uid"), "{err}");
    assert_eq!(p.names(), ["v"]);
    p.stop();
}

#[test]
fn bad_requests_are_refused_at_the_door_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = Plugin::start(dir.path());
    p.ok("/VolumeDriver.Create", r#"{"Name":"keep"}"#);
    for name in ["", "..", "../etc", "a/b", "/abs", "a b", "-x"] {
        let body = serde_json::json!({ "Name": name }).to_string();
        for ep in [
            "/VolumeDriver.Create",
            "/VolumeDriver.Get",
            "/VolumeDriver.Remove",
        ] {
            let err = p.err(ep, &body);
            assert!(err.contains("volume name"), "{ep} {name:?}: {err}");
        }
    }
    for body in ["", "{", "[]", "null", r#"{"Name":5}"#] {
        let (status, json) = p.call("/VolumeDriver.Get", body);
        assert_eq!(status, 400, "{body:?}: {json}");
        assert!(
            json["Err"].as_str().is_some_and(|e| !e.is_empty()),
            "{json}"
        );
    }
    let err = p.err("/VolumeDriver.Mount", r#"{"Name":"keep","ID":""}"#);
    assert!(err.contains("mount ID"), "{err}");
    let (status, body) = raw_call(&p.socket, "POST", "/VolumeDriver.Explode", b"{}");
    assert_eq!(status, 404, "{body}");
    let (status, _) = raw_call(&p.socket, "GET", "/VolumeDriver.List", b"");
    assert_eq!(status, 405);
    let (status, _) = raw_request(&p.socket, b"this is not http\r\n\r\n");
    assert_eq!(status, 400);
    assert_eq!(p.names(), ["keep"]);
    p.stop();
}

#[test]
fn volumes_and_mounts_survive_a_restart_on_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let mounter = Arc::new(RecordingMounter::default());
    let p = Plugin::start_with(dir.path(), mounter.clone());
    p.ok(
        "/VolumeDriver.Create",
        r#"{"Name":"a","Opts":{"mode":"0705"}}"#,
    );
    p.ok("/VolumeDriver.Create", r#"{"Name":"b"}"#);
    let mp = p.ok("/VolumeDriver.Mount", r#"{"Name":"a","ID":"m"}"#)["Mountpoint"].clone();
    // The container keeps using the volume while the plugin is down.
    mounter.hold_elsewhere(&dir.path().join("local/a/data"));
    p.stop();

    let p = Plugin::start_with(dir.path(), mounter.clone());
    assert_eq!(p.names(), ["a", "b"]);
    let a = p.ok("/VolumeDriver.Get", r#"{"Name":"a"}"#);
    assert_eq!(a["Volume"]["Mountpoint"], mp, "{a}");
    assert_eq!(a["Volume"]["Status"]["active_mounts"], 1, "{a}");
    assert_eq!(a["Volume"]["Status"]["options"]["mode"], "0705", "{a}");
    mounter.release_elsewhere(&dir.path().join("local/a/data"));
    p.ok("/VolumeDriver.Unmount", r#"{"Name":"a","ID":"m"}"#);
    assert_eq!(
        p.ok("/VolumeDriver.Path", r#"{"Name":"a"}"#)["Mountpoint"],
        ""
    );
    p.ok("/VolumeDriver.Remove", r#"{"Name":"a"}"#);
    p.stop();
}

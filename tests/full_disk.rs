//! A full (or read-only) state filesystem, for real: a small tmpfs as the state directory, filled with a
//! file until the kernel says ENOSPC. The catalog must fail calls with that cause and work again once
//! there is room, without a restart; `ferry status` must call local unusable meanwhile; an Unmount that
//! failed must not leave its volume in use; and sparse images must neither promise more than the disk
//! has nor be mounted again unchecked after the disk filled under them.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{ferry_bin, Daemon};
use serde_json::Value;

/// A temporary directory whose `state` is a tmpfs of `mib` MiB, so it fills quickly.
struct SmallState {
    tmp: tempfile::TempDir,
}

impl SmallState {
    fn new(mib: u64) -> SmallState {
        let tmp = tempfile::Builder::new()
            .prefix("ferry-full")
            .tempdir()
            .unwrap();
        let state = tmp.path().join("state");
        std::fs::create_dir(&state).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &state,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={mib}m,mode=0700").as_str()),
        )
        .unwrap();
        SmallState { tmp }
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    fn daemon(&self, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_in(self.dir(), &self.dir().join("ferry.sock"), env)
    }
}

impl Drop for SmallState {
    fn drop(&mut self) {
        common::unmount_under(&self.state());
    }
}

/// Writes `path` until the filesystem is full; returns how much it wrote.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let mut written = 0u64;
    for chunk in [1usize << 20, 4096, 512] {
        let buf = vec![0xa5u8; chunk];
        loop {
            match f.write(&buf) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    written
}

/// Writes a file and makes sure it reached the volume's image.
fn write_synced(path: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// Bytes free on the filesystem of `path`, as `df` shows them.
fn free_bytes(path: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path).unwrap();
    st.blocks_available() * st.fragment_size()
}

struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

fn ferry(args: &[&str], state: &Path) -> Ran {
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

/// `ferry status --json`: its exit code and the local backend's report.
fn local_status(state: &Path) -> (i32, Value) {
    let ran = ferry(&["status", "--json"], state);
    let status: Value = serde_json::from_str(&ran.stdout)
        .unwrap_or_else(|e| panic!("{e}: {} {}", ran.stdout, ran.stderr));
    (ran.code, status["backends"][0].clone())
}

/// Polls Get until `done` holds for the volume, for at most `secs` seconds (background passes run every
/// 5 s); returns the last answer.
fn wait_for(d: &Daemon, name: &str, secs: u64, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let v = d.get(name);
        if done(&v) || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The catalog fails while the state filesystem is full and names the cause, never redb's "previous
/// I/O error"; `ferry status` calls local unusable with exit code 2, and a capped volume mounted
/// meanwhile turns `error`. Once there is room, the next calls work without a restart, and the next
/// mount of the capped volume checks its filesystem first. (Unmounts that fail while the catalog cannot
/// be written are covered with a disk that fails every write, in the service's unit tests: on a real
/// filesystem, redb may still find room in pages it already has.)
#[test]
fn a_full_state_filesystem_fails_calls_with_its_cause_and_they_work_again_once_freed() {
    let small = SmallState::new(64);
    let d = small.daemon(&[]);
    d.create("capped", r#"{"size":"16MiB"}"#);
    let mp = d.mount("capped", "c1");
    write_synced(&mp.join("kept"), b"written before the disk filled");
    d.create("plain", "null");
    let (code, local) = local_status(&small.state());
    assert_eq!(code, 0, "{local}");

    let filler = small.state().join("filler");
    fill(&filler);
    assert_eq!(free_bytes(&small.state()), 0);

    // Each Create writes the catalog; it must fail as the catalog needs room the disk no longer has.
    let mut first_failure = None;
    for i in 0..500 {
        let (status, body) = d.call(
            "/VolumeDriver.Create",
            &format!(r#"{{"Name":"while-full-{i}","Opts":null}}"#),
        );
        if status != 200 {
            first_failure = Some(body["Err"].as_str().unwrap().to_string());
            break;
        }
    }
    let err = first_failure.expect("no catalog write failed on a full state filesystem");
    assert!(
        err.contains("No space left on device") && err.contains("catalog.redb"),
        "{err}"
    );
    // The next calls keep naming the real cause, not redb's "Previous I/O error" of a poisoned handle.
    // (Whether a given later write fails depends on whether redb finds room in pages it already has.)
    let (status, body) = d.call("/VolumeDriver.Create", r#"{"Name":"during","Opts":null}"#);
    if status != 200 {
        let e = body["Err"].as_str().unwrap();
        assert!(
            e.contains("No space left on device") && !e.contains("Previous I/O"),
            "{e}"
        );
    }
    // The capped volume mounted meanwhile: its sparse image can no longer grow.
    let v = wait_for(&d, "capped", 20, |v| v["Status"]["health"] == "error");
    let problem = v["Status"]["last_error"].as_str().unwrap_or_default();
    assert!(
        problem.contains("is full, so writes inside the volume can fail and be lost"),
        "{v}"
    );
    let ls = ferry(&["ls"], &small.state());
    assert!(
        ls.stdout
            .lines()
            .any(|l| l.starts_with("capped ") && l.contains(" error ")),
        "{}",
        ls.stdout
    );
    let (code, local) = local_status(&small.state());
    assert_eq!(code, 2, "{local}");
    assert_eq!(local["reachable"], false, "{local}");
    let error = local["error"].as_str().unwrap();
    assert!(error.contains("is full (0 B free of"), "{error}");
    let text = ferry(&["status"], &small.state());
    assert!(text.stdout.contains("NO"), "{}", text.stdout);

    std::fs::remove_file(&filler).unwrap();
    // No restart: the next calls work.
    d.create("after", r#"{"mode":"0750"}"#);
    let after = d.mount("after", "a1");
    std::fs::write(after.join("f"), b"x").unwrap();
    d.unmount("after", "a1");
    d.remove("after");
    d.remove("plain");
    let (code, local) = local_status(&small.state());
    assert_eq!(code, 0, "{local}");

    // Writes may have been lost while the image could not grow: health stays `error` until the next
    // mount has checked the filesystem.
    d.unmount("capped", "c1");
    assert_eq!(d.get("capped")["Status"]["health"], "error");
    let mp = d.mount("capped", "c2");
    assert!(
        d.log_text()
            .contains("checking the volume's filesystem before mounting it"),
        "{}",
        d.log_text()
    );
    assert_eq!(d.get("capped")["Status"]["health"], "ok");
    assert_eq!(
        std::fs::read(mp.join("kept")).unwrap(),
        b"written before the disk filled"
    );
    let root: Vec<_> = std::fs::read_dir(&mp)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(root, ["kept"], "the check left the root as it was");
    d.unmount("capped", "c2");
    d.remove("capped");
    assert!(!d.log_text().contains("Previous I/O"), "{}", d.log_text());
}

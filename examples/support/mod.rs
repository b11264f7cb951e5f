//! What the benchmark drivers (ebs_bench, cluster_bench) share: starting, calling, stopping and cleaning up
//! daemons, the data they write and check, and how results are summed up. Included with
//! `#[path = "support/mod.rs"] mod support;`.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;

/// Where one benchmark daemon keeps its files, all in one directory of its own.
pub struct ServeDir {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
}

impl ServeDir {
    pub fn new(dir: PathBuf) -> ServeDir {
        ServeDir {
            socket: dir.join("ferry.sock"),
            state: dir.join("state"),
            log: dir.join("ferry.log"),
            dir,
        }
    }
}

/// Starts `ferry serve` in `at.dir` with `config` as its configuration file and `ferry_log` as its log
/// filter, notes its pid in `pids` (for the driver script's clean-up), and waits up to 20 s for it to
/// listen. AWS credentials are dummies given through the standard chain, with nothing of this machine's
/// AWS setup. A daemon that does not come up is stopped before the error returns.
pub fn start_serve(
    ferry: &Path,
    at: &ServeDir,
    config: &str,
    ferry_log: &str,
    pids: &Path,
    label: &str,
) -> Result<Child> {
    std::fs::create_dir_all(&at.dir)
        .with_context(|| format!("cannot create {}", at.dir.display()))?;
    let config_path = at.dir.join("ferry.toml");
    std::fs::write(&config_path, config)?;
    // Empty AWS files rather than none: a missing file named by AWS_CONFIG_FILE is logged as a warning.
    let aws = at.dir.join("aws-empty");
    std::fs::write(&aws, "")?;
    let log = std::fs::File::create(&at.log)?;
    let mut child = Command::new(ferry)
        .arg("serve")
        .arg("--socket")
        .arg(&at.socket)
        .arg("--state-dir")
        .arg(&at.state)
        .env("FERRY_CONFIG", &config_path)
        .env("FERRY_LOG", ferry_log)
        .env("AWS_ACCESS_KEY_ID", "AKIDFERRYBENCH")
        .env("AWS_SECRET_ACCESS_KEY", "ferry-bench-dummy-secret")
        .env("AWS_CONFIG_FILE", &aws)
        .env("AWS_SHARED_CREDENTIALS_FILE", &aws)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env_remove("FERRY_ADMIN_SOCKET")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", ferry.display()))?;
    let noted = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(pids)
        .and_then(|mut f| writeln!(f, "{}", child.id()));
    let up = noted
        .map_err(anyhow::Error::from)
        .and_then(|()| wait_listening(&mut child, at, label));
    if let Err(e) = up {
        let _ = terminate(&mut child, Duration::from_secs(10));
        return Err(e);
    }
    Ok(child)
}

fn wait_listening(child: &mut Child, at: &ServeDir, label: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&at.socket).is_err() {
        if let Some(status) = child.try_wait()? {
            bail!(
                "ferry serve ({label}) exited at start-up ({status}):\n{}",
                std::fs::read_to_string(&at.log).unwrap_or_default()
            );
        }
        ensure!(
            Instant::now() < deadline,
            "ferry serve ({label}) did not listen on {} within 20 s",
            at.socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// One plugin protocol call to the daemon `label` on `socket`. The outer error is a broken exchange; the
/// inner one is the plugin's `Err`.
pub fn plugin_call(
    socket: &Path,
    label: &str,
    endpoint: &str,
    body: &Value,
) -> Result<std::result::Result<Value, String>> {
    let body = body.to_string();
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to {} ({label})", socket.display()))?;
    // Docker gives Create and Mount 2 minutes; a slow pull of a big volume must not be cut short here.
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    write!(
        s,
        "POST /VolumeDriver.{endpoint} HTTP/1.1\r\nHost: plugin.moby.localhost\r\n\
         Accept: application/vnd.docker.plugins.v1.2+json\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .with_context(|| format!("VolumeDriver.{endpoint} on {label}: no reply"))?;
    let text = String::from_utf8_lossy(&out);
    let (head, reply) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("VolumeDriver.{endpoint}: bad reply {text:?}"))?;
    let v: Value = serde_json::from_str(reply)
        .with_context(|| format!("VolumeDriver.{endpoint}: non-JSON reply {reply:?}"))?;
    let err = v.get("Err").and_then(Value::as_str).unwrap_or("");
    if !err.is_empty() {
        return Ok(Err(err.to_string()));
    }
    ensure!(
        head.starts_with("HTTP/1.1 200"),
        "VolumeDriver.{endpoint} {body} on {label}: {head}"
    );
    Ok(Ok(v))
}

/// SIGTERM, then SIGKILL after `grace`.
pub fn terminate(child: &mut Child, grace: Duration) -> Result<std::process::ExitStatus> {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            eprintln!(
                "ferry serve (pid {pid}) ignored SIGTERM for {} s; killing it",
                grace.as_secs()
            );
            child.kill()?;
            return Ok(child.wait()?);
        }
        std::thread::sleep(Duration::from_millis(50));
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

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

pub fn verdict(pass: bool) -> &'static str {
    if pass {
        "PASS"
    } else {
        "MISS"
    }
}

pub fn save(path: &Path, doc: &Value) -> Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(doc)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

pub struct Pattern(u64);

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        Pattern(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let x = &mut self.0;
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
    }
}

pub const CHUNK: usize = 4 << 20;

pub fn verify_data(path: &Path, seed: u64, bytes: u64) -> Result<()> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    ensure!(
        f.metadata()?.len() == bytes,
        "{} has the wrong length",
        path.display()
    );
    let (mut p, mut want, mut got) = (Pattern::new(seed), vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        p.fill(&mut want[..n]);
        f.read_exact(&mut got[..n])?;
        ensure!(
            want[..n] == got[..n],
            "{} differs from what was written, {} bytes from its end",
            path.display(),
            left
        );
        left -= n as u64;
    }
    Ok(())
}

//! The listeners of the real daemon against clients that misbehave: connections past a 1,024 open-file
//! limit on the plugin socket and on the metrics endpoint, idle and half-sent connections and their
//! timeouts, a stop that such clients cannot delay, a plugin socket that is never open to another user while
//! the daemon starts under umask 000, and the peer check when the socket is opened to everyone.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{as_nobody, Daemon, SpawnOptions};

/// The limit a service manager commonly gives (systemd's default soft limit).
const FD_LIMIT: u64 = 1024;
/// More connections than the daemon could ever hold under `FD_LIMIT`.
const FLOOD: usize = 1100;

/// Lets this test process hold `FLOOD` connections whatever limit it was started with.
fn raise_own_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        soft >= 2 * FLOOD as u64 + 64,
        "this test needs an open-file limit of at least {}; it is {soft}",
        2 * FLOOD + 64
    );
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("ferry.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn request(endpoint: &str, body: &str, close: bool) -> Vec<u8> {
    format!(
        "POST {endpoint} HTTP/1.1\r\nHost: plugin.moby.localhost\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\nContent-Length: {}\r\n{}\r\n{body}",
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes()
}

/// One call on a new connection that must be answered within `within`, the bound a client such as
/// dockerd can rely on; returns the status line and the body.
fn call_within(socket: &Path, endpoint: &str, body: &str, within: Duration) -> (String, String) {
    let started = Instant::now();
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(within)).unwrap();
    s.set_write_timeout(Some(within)).unwrap();
    s.write_all(&request(endpoint, body, true)).unwrap();
    let mut out = Vec::new();
    if let Err(e) = s.read_to_end(&mut out) {
        panic!(
            "{endpoint} was not answered within {within:?} ({e}); got {:?} after {:?}",
            String::from_utf8_lossy(&out),
            started.elapsed()
        );
    }
    assert!(
        started.elapsed() <= within,
        "{endpoint} took {:?}",
        started.elapsed()
    );
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// Reads one answer from a kept-alive connection: its head and exactly its Content-Length of body.
fn read_answer(s: &mut UnixStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "closed mid-answer: {buf:?}");
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no content-length in {head}"));
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).unwrap();
    head
}

/// Docker's calls are answered while more connections than the open-file limit allows are held open.
fn assert_docker_is_served(d: &Daemon) {
    // Answered at all first: the daemon may still be working through the connections queued before.
    let (status, _) = call_within(
        &d.socket,
        "/VolumeDriver.Get",
        r#"{"Name":"before"}"#,
        Duration::from_secs(10),
    );
    assert_eq!(status, "HTTP/1.1 200 OK");
    for _ in 0..3 {
        let (status, body) = call_within(
            &d.socket,
            "/VolumeDriver.Get",
            r#"{"Name":"before"}"#,
            Duration::from_secs(1),
        );
        assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
        assert!(body.contains(r#""Name":"before""#), "{body}");
    }
    let (status, body) = call_within(
        &d.socket,
        "/VolumeDriver.Create",
        r#"{"Name":"during","Opts":null}"#,
        Duration::from_secs(5),
    );
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    assert_eq!(body, "{}");
    let (status, body) = call_within(
        &d.socket,
        "/VolumeDriver.Get",
        r#"{"Name":"during"}"#,
        Duration::from_secs(1),
    );
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn idle_and_half_sent_connections_past_the_fd_limit_leave_docker_served() {
    raise_own_fd_limit();
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(
        tmp.path(),
        &tmp.path().join("ferry.sock"),
        &[],
        SpawnOptions {
            nofile: Some(FD_LIMIT),
            ..Default::default()
        },
    );
    d.create("before", "null");
    // Every other one has sent the start of a request and stopped.
    let held: Vec<UnixStream> = (0..FLOOD)
        .map(|i| {
            let mut s =
                UnixStream::connect(&d.socket).unwrap_or_else(|e| panic!("connection {i}: {e}"));
            if i % 2 == 1 {
                // The server may already have closed it to make room: that is what it should do.
                let _ = s.write_all(b"POST /VolumeDriver.Get HTTP/1.1\r\nHost: ");
            }
            s
        })
        .collect();
    assert_docker_is_served(&d);
    // It never came near the limit: the oldest idle (then half-sent) connections made room for new ones.
    let fds = open_fds(d.pid());
    assert!(
        fds < FD_LIMIT as usize - 200,
        "{fds} descriptors open under a limit of {FD_LIMIT}"
    );
    assert!(
        d.log_text().contains("connection limit reached"),
        "{}",
        d.log_text()
    );
    drop(held);
}

#[test]
fn metrics_clients_cannot_starve_the_plugin_socket() {
    raise_own_fd_limit();
    let tmp = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = write_config(
        tmp.path(),
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let d = Daemon::start_with(
        tmp.path(),
        &tmp.path().join("ferry.sock"),
        &[("FERRY_CONFIG", config.to_str().unwrap())],
        SpawnOptions {
            nofile: Some(FD_LIMIT),
            ..Default::default()
        },
    );
    d.create("before", "null");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    // An unprivileged local user can open these: the endpoint is plain TCP.
    let held: Vec<TcpStream> = (0..FLOOD)
        .map(|i| {
            TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("metrics connection {i}: {e}"))
        })
        .collect();
    assert_docker_is_served(&d);
    // The endpoint itself still answers a scrape, in place of an idle connection.
    let mut scrape = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
    scrape
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    scrape
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    scrape.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("ferry_calls_total"), "{out}");
    let fds = open_fds(d.pid());
    assert!(
        fds < FD_LIMIT as usize - 200,
        "{fds} descriptors open under a limit of {FD_LIMIT}"
    );
    drop(held);
}

#[test]
fn sigterm_ends_the_daemon_promptly_whatever_clients_hold() {
    let mut d = Daemon::start();
    d.create("v", "null");
    // Headers cut off in the middle.
    let mut half_head = UnixStream::connect(&d.socket).unwrap();
    half_head
        .write_all(b"POST /VolumeDriver.Get HTTP/1.1\r\nHost: plugin.moby.localhost\r\nContent-")
        .unwrap();
    // Whole headers, then part of the body they announce.
    let mut half_body = UnixStream::connect(&d.socket).unwrap();
    half_body
        .write_all(b"POST /VolumeDriver.Create HTTP/1.1\r\nHost: plugin.moby.localhost\r\nContent-Length: 200\r\n\r\n{\"Name\":\"half")
        .unwrap();
    // Connected and silent, and kept alive after an answer.
    let silent = UnixStream::connect(&d.socket).unwrap();
    let mut kept = UnixStream::connect(&d.socket).unwrap();
    kept.write_all(&request("/VolumeDriver.List", "{}", false))
        .unwrap();
    assert!(read_answer(&mut kept).starts_with("HTTP/1.1 200"));
    // An answer on a later connection shows the daemon has taken all of the above.
    d.ok("/VolumeDriver.Get", r#"{"Name":"v"}"#);

    let status = d
        .terminate_within(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("still running 15 s after SIGTERM:\n{}", d.log_text()));
    assert!(status.success(), "{status}\n{}", d.log_text());
    assert!(!d.socket.exists(), "the socket was left behind");
    // The half-sent Create was never made.
    let mut d = Daemon::start_in(&d.dir.clone(), &d.socket.clone(), &[]);
    let err = d.err("/VolumeDriver.Get", r#"{"Name":"half"}"#);
    assert!(err.contains("does not exist"), "{err}");
    d.terminate();
    drop((half_head, half_body, silent, kept));
}

/// Reads until the server closes the connection; returns what came before the close and when it came.
fn until_closed(s: &mut UnixStream, limit: Duration) -> (Vec<u8>, Instant) {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!(
            "the server did not close the connection within {limit:?} ({e}); got {:?}",
            String::from_utf8_lossy(&out)
        ),
    }
    (out, Instant::now())
}

#[test]
fn idle_and_slow_connections_are_closed_after_their_timeouts() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(
        tmp.path(),
        "[listeners]\nidle_timeout = \"1s\"\nrequest_timeout = \"1s\"\n",
    );
    let d = Daemon::start_in(
        tmp.path(),
        &tmp.path().join("ferry.sock"),
        &[("FERRY_CONFIG", config.to_str().unwrap())],
    );
    let limit = Duration::from_secs(10);

    // Kept alive after an answer, then idle: closed after the idle timeout, not before.
    let mut kept = UnixStream::connect(&d.socket).unwrap();
    kept.write_all(&request("/VolumeDriver.List", "{}", false))
        .unwrap();
    assert!(read_answer(&mut kept).starts_with("HTTP/1.1 200"));
    let answered = Instant::now();
    let (rest, closed) = until_closed(&mut kept, limit);
    assert!(rest.is_empty(), "{rest:?}");
    assert!(
        closed.duration_since(answered) >= Duration::from_millis(900),
        "closed {:?} after the answer, before the idle timeout",
        closed.duration_since(answered)
    );

    // Never used at all.
    let mut silent = UnixStream::connect(&d.socket).unwrap();
    let (rest, _) = until_closed(&mut silent, limit);
    assert!(rest.is_empty(), "{rest:?}");

    // Headers that never end, sent slowly enough to keep the connection busy: dropped unanswered once the
    // request timeout has passed since its first byte.
    let mut slow = UnixStream::connect(&d.socket).unwrap();
    slow.write_all(b"POST /VolumeDriver.List HTTP/1.1\r\n")
        .unwrap();
    let started = Instant::now();
    let mut dropped = false;
    while started.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(200));
        if slow.write_all(b"X-Slow: 1\r\n").is_err() {
            dropped = true;
            break;
        }
    }
    assert!(
        dropped,
        "a trickle of headers kept the connection for {limit:?}"
    );
    let (rest, _) = until_closed(&mut slow, limit);
    assert!(
        rest.is_empty(),
        "answered: {:?}",
        String::from_utf8_lossy(&rest)
    );

    // Whole headers and part of the body: dropped unanswered, and the call never made.
    let mut half_body = UnixStream::connect(&d.socket).unwrap();
    half_body
        .write_all(b"POST /VolumeDriver.Create HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n{\"Name\":\"half\"")
        .unwrap();
    let (rest, _) = until_closed(&mut half_body, limit);
    assert!(
        rest.is_empty(),
        "answered: {:?}",
        String::from_utf8_lossy(&rest)
    );
    let err = d.err("/VolumeDriver.Get", r#"{"Name":"half"}"#);
    assert!(err.contains("does not exist"), "{err}");
    assert!(
        d.log_text()
            .contains("did not arrive in full within the request timeout"),
        "{}",
        d.log_text()
    );
}

/// What an unprivileged prober saw while it knocked on the socket.
#[derive(Debug, Default)]
struct Knocks {
    attempts: u64,
    /// connect() succeeded.
    connected: u64,
    /// An HTTP answer came back.
    served: u64,
    /// connect() failed for lack of permission: the socket existed and its mode refused.
    denied: u64,
}

/// As nobody, connects to `socket` in a tight loop until `stop`, sending a call on every connection made.
fn knock_until(socket: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Knocks> {
    as_nobody(move || {
        let mut k = Knocks::default();
        while !stop.load(Ordering::Relaxed) {
            k.attempts += 1;
            match UnixStream::connect(&socket) {
                Ok(mut s) => {
                    k.connected += 1;
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let _ = s.write_all(&request("/VolumeDriver.List", "{}", true));
                    let mut out = Vec::new();
                    let _ = s.read_to_end(&mut out);
                    if !out.is_empty() {
                        k.served += 1;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => k.denied += 1,
                Err(_) => {}
            }
        }
        k
    })
}

#[test]
fn the_plugin_socket_is_never_open_to_others_while_the_daemon_starts() {
    let tmp = tempfile::tempdir().unwrap();
    // Anyone may reach the socket's directory, as /run/docker/plugins.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = tmp.path().join("ferry.sock");
    let stop = Arc::new(AtomicBool::new(false));
    let prober = knock_until(socket.clone(), stop.clone());
    let mut d = Daemon::start_with(
        tmp.path(),
        &socket,
        &[],
        SpawnOptions {
            umask: Some(0),
            ..Default::default()
        },
    );
    for _ in 1..20 {
        assert!(d.terminate().success(), "{}", d.log_text());
        d.spawn(&[]);
    }
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    d.terminate();
    stop.store(true, Ordering::Relaxed);
    let knocks = prober.join().unwrap();
    assert_eq!(mode, 0o600);
    assert!(knocks.attempts > 1000, "{knocks:?}");
    assert!(
        knocks.denied > 0,
        "the prober never found the socket: {knocks:?}"
    );
    assert_eq!(
        (knocks.connected, knocks.served),
        (0, 0),
        "another user reached the plugin socket during 20 starts: {knocks:?}"
    );
}

#[test]
fn other_users_are_refused_even_when_the_socket_is_opened_to_them() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = Daemon::start_in(tmp.path(), &tmp.path().join("ferry.sock"), &[]);
    // As a careless chmod, or a bind mount into a container, would.
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let socket = d.socket.clone();
    let answers = as_nobody(move || {
        (0..5)
            .map(|_| {
                let mut s = UnixStream::connect(&socket).expect("the mode lets nobody connect");
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let _ = s.write_all(&request("/VolumeDriver.List", "{}", true));
                let mut out = Vec::new();
                match s.read_to_end(&mut out) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                    Err(e) => panic!("the connection was neither answered nor closed: {e}"),
                }
                String::from_utf8_lossy(&out).into_owned()
            })
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    assert!(
        answers.iter().all(|a| a.is_empty()),
        "served another user: {answers:?}"
    );
    // Root still is.
    d.ok("/VolumeDriver.List", "{}");
    // One line for the five refusals, naming the user.
    let log = d.log_text();
    let lines: Vec<_> = log
        .lines()
        .filter(|l| l.contains("refused a connection from a user who may not use this socket"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("uid=65534"), "{}", lines[0]);

    // A user named in listeners.docker_uids, such as a rootless dockerd's, is served.
    let tmp2 = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp2.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = write_config(tmp2.path(), "[listeners]\ndocker_uids = [65534]\n");
    let d2 = Daemon::start_in(
        tmp2.path(),
        &tmp2.path().join("ferry.sock"),
        &[("FERRY_CONFIG", config.to_str().unwrap())],
    );
    std::fs::set_permissions(&d2.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let socket = d2.socket.clone();
    let (status, body) = as_nobody(move || {
        call_within(&socket, "/VolumeDriver.List", "{}", Duration::from_secs(10))
    })
    .join()
    .unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
}

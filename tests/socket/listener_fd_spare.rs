//! The plugin socket's spare descriptor, in process: with every descriptor of the process in use, a new
//! connection is still accepted, served in place of the longest-idle connection, and answered. The test
//! lowers the whole process's open-file limit, which would starve every other test of the tier's binary, so
//! it runs itself again in a child process of its own and only the child lowers the limit.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry::listener::{
    bind_unix_socket, serve, BodyError, Handler, Limits, Listener, Peer, Peers, ServeOptions,
};
use http_body_util::Full;
use hyper::{Response, StatusCode};
use tokio_util::sync::CancellationToken;

/// Answers every request with "hello".
struct Hello;

impl Handler for Hello {
    fn max_body(&self) -> usize {
        1024
    }

    fn handle(
        &self,
        _head: hyper::http::request::Parts,
        _body: Bytes,
        _peer: Peer,
    ) -> impl std::future::Future<Output = Response<Full<Bytes>>> + Send {
        std::future::ready(Response::new(Full::new(Bytes::from_static(b"hello"))))
    }

    fn body_error(&self, _path: &str, _err: BodyError) -> Response<Full<Bytes>> {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        r
    }
}

const KEEP_ALIVE: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
const CLOSE: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// Reads one "hello" answer from a kept-alive connection.
fn read_hello(s: &mut UnixStream) {
    let mut text = String::new();
    let mut buf = [0u8; 512];
    while !text.ends_with("hello") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed after {text:?}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

/// Set in the child process that runs the test for real.
const CHILD: &str = "FERRY_TEST_FD_SPARE_CHILD";

#[test]
fn a_connection_is_answered_when_descriptors_run_out() {
    if std::env::var_os(CHILD).is_some() {
        return descriptors_run_out();
    }
    let name = format!(
        "{}::a_connection_is_answered_when_descriptors_run_out",
        module_path!().split_once("::").map_or("", |(_, m)| m)
    );
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name.as_str(), "--exact", "--test-threads=1", "--nocapture"])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the child test failed:\n{text}");
    // It must have run the test, not matched nothing.
    assert!(text.contains("1 passed"), "the child ran no test:\n{text}");
}

fn descriptors_run_out() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plugin.sock");
    let listener = {
        let _enter = rt.enter();
        bind_unix_socket(&path).unwrap()
    };
    let stop = CancellationToken::new();
    let opts = ServeOptions {
        name: "test socket",
        // No cap to speak of: only the open-file limit stops this listener.
        limits: Limits {
            max_connections: 100_000,
            idle_timeout: Duration::from_secs(600),
            request_timeout: Duration::from_secs(60),
        },
        peers: Peers::Anyone,
        spare_fd: true,
        drain: Duration::from_secs(1),
    };
    let server = rt.spawn(serve(
        Listener::Unix(listener),
        Arc::new(Hello),
        opts,
        stop.clone(),
    ));
    // Five connections answered once and kept alive: idle, so closable to make room.
    let mut idle: Vec<UnixStream> = (0..5)
        .map(|_| {
            let mut s = UnixStream::connect(&path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(KEEP_ALIVE).unwrap();
            read_hello(&mut s);
            s
        })
        .collect();

    // Use up every descriptor the process may have, then give back exactly one, for the client.
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, open_fds() + 32, hard).unwrap();
    let mut filler = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => filler.push(f),
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => break,
            Err(e) => panic!("{e}"),
        }
    }
    filler.pop();
    // The server has no descriptor left to accept with but its spare. (Whether one is free at any later
    // instant is not the test's to say: the server may already have answered and reopened its spare.)
    let mut client = UnixStream::connect(&path).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    client.write_all(CLOSE).unwrap();
    let mut answer = String::new();
    let read = client.read_to_string(&mut answer);
    drop(filler);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    read.unwrap_or_else(|e| panic!("not answered with descriptors exhausted: {e}"));
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("hello"),
        "{answer:?}"
    );

    // The longest-idle connection gave its place; the others are still served.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut closed = Vec::new();
    for s in &mut idle {
        s.set_nonblocking(true).unwrap();
    }
    while closed.is_empty() && Instant::now() < deadline {
        closed = idle
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!((&**s).read(&mut [0u8; 16]), Ok(0)))
            .map(|(i, _)| i)
            .collect();
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        closed,
        vec![0],
        "the oldest idle connection is closed first"
    );
    for s in &mut idle[1..] {
        s.set_nonblocking(false).unwrap();
        s.write_all(KEEP_ALIVE).unwrap();
        read_hello(s);
    }

    stop.cancel();
    rt.block_on(server).unwrap();
}

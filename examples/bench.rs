//! The load generator behind `scripts/bench`. It is a benchmark, not a test: it measures and reports, and
//! fails only when something breaks (a refused call, a dead daemon, a failed `docker run`).
//!
//! - `socket`: speaks raw HTTP/1.1 to a running `ferry serve` the way dockerd does (one persistent keep-alive
//!   connection per client, `POST` with a JSON body and Docker's Accept header) and measures Get, Mount of
//!   an already-mounted volume, List (small catalog and 10,000 volumes) and the daemon's resident memory.
//! - `docker`: times `docker run --rm -v VOL:/data IMAGE true` on a Ferry volume and on a `local` volume,
//!   interleaved so that drift in the machine's load hits both alike.
//! - `get`: only Get, from many clients for a fixed time, on volumes that already exist; one JSON object out.
//!   `scripts/bench-cluster` runs it against a daemon in cluster mode and one without, turn about.
//! - `report`: reads the JSON `socket` and `docker` wrote, prints every figure against its target as PASS/MISS and
//!   optionally writes a Markdown table.
//!
//! Latencies are taken from just before a request is written until its whole response has been read; the
//! response is checked (status always, body on a sample) outside that window. Percentiles are nearest-rank.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::Barrier;

/// Docker's Accept header for plugin calls (moby's `pkg/plugins/client.go` sends it on every call).
const ACCEPT: &str = "application/vnd.docker.plugins.v1.2+json";
/// Every how many responses a client fully decodes and checks the body (the status is always checked).
const CHECK_EVERY: usize = 64;
/// Targets from the brief.
const TARGET_P99_MS: f64 = 1.0;
const TARGET_LIST_BULK_P99_MS: f64 = 20.0;
const TARGET_RSS_MIB: f64 = 30.0;
const TARGET_DOCKER_RATIO: f64 = 1.10;
/// Mount IDs held on one volume for the extra Mount figure: the record rewritten on every Mount grows with
/// them (many containers sharing one volume).
const HELD_IDS: usize = 1_000;

#[derive(Parser)]
#[command(about = "Ferry's benchmark load generator (run through scripts/bench)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Protocol latencies and memory against a running daemon.
    Socket(SocketArgs),
    /// `docker run` with a Ferry volume against one of Docker's `local` driver.
    Docker(DockerArgs),
    /// Get latency alone against a running daemon, on volumes it already has.
    Get(GetArgs),
    /// Prints the results against their targets and optionally writes Markdown.
    Report(ReportArgs),
}

#[derive(clap::Args)]
struct GetArgs {
    /// The daemon's socket.
    #[arg(long)]
    socket: PathBuf,
    /// The daemon's process ID, for its CPU time.
    #[arg(long)]
    pid: u32,
    /// Volumes to Get, which must exist; each client starts at its own and goes round them.
    #[arg(long, value_delimiter = ',', required = true)]
    volumes: Vec<String>,
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Seconds of timed Gets.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Untimed Gets per client first.
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// Where to write the result (JSON).
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
struct SocketArgs {
    /// The daemon's socket.
    #[arg(long)]
    socket: PathBuf,
    /// The daemon's process ID, for VmRSS.
    #[arg(long)]
    pid: u32,
    /// Where to write the results (JSON).
    #[arg(long)]
    out: PathBuf,
    /// Multiplies every iteration count (use e.g. 0.1 for a quick smoke run).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// How many volumes to create for the large-catalog List and the memory figure.
    #[arg(long, default_value_t = 10_000)]
    bulk: usize,
    /// Stop any one configuration after this many seconds of timed work, whatever its iteration count.
    #[arg(long, default_value_t = 40)]
    max_seconds: u64,
    /// Threads of the load generator; 1 (the default) runs every client on one epoll loop, which leaves the
    /// daemon the most CPU on a small machine.
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// The daemon's catalog file, to report its size at the end.
    #[arg(long)]
    catalog: Option<PathBuf>,
}

#[derive(clap::Args)]
struct DockerArgs {
    /// A volume of Ferry's driver, already created.
    #[arg(long)]
    ferry_volume: String,
    /// Ferry's driver name, to check that the volume really is Ferry's.
    #[arg(long)]
    driver: String,
    /// A volume of Docker's `local` driver, already created.
    #[arg(long)]
    local_volume: String,
    /// The image to run `true` in.
    #[arg(long)]
    image: String,
    /// A label put on every container, so an interrupted run can be cleaned up.
    #[arg(long)]
    label: String,
    /// Untimed pairs of runs first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed runs per driver.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
struct ReportArgs {
    /// Result files written by `socket` and `docker`.
    #[arg(long = "results", required = true)]
    results: Vec<PathBuf>,
    /// Also write the results as Markdown here.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// The commit measured, for the Markdown header.
    #[arg(long, default_value = "")]
    commit: String,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Socket(args) => {
            let rt = if args.client_threads <= 1 {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(args.client_threads)
                    .enable_all()
                    .build()?
            };
            rt.block_on(socket_bench(args))
        }
        Cmd::Get(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(get_bench(args)),
        Cmd::Docker(args) => docker_bench(args),
        Cmd::Report(args) => report(args),
    }
}

// ------------------------------------------------------------------------------------------------------
// A raw HTTP/1.1 client on one keep-alive connection.

/// One persistent connection, as dockerd keeps them. Requests are written whole; the response is read
/// until its Content-Length (or its last chunk) is in the buffer.
struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    /// Bytes of `buf` belonging to the previous response, dropped at the next call.
    consumed: usize,
    req: Vec<u8>,
    /// The decoded body of a chunked response.
    chunked: Vec<u8>,
}

struct Reply<'a> {
    status: u16,
    body: &'a [u8],
}

impl Reply<'_> {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body[..self.body.len().min(400)]).into_owned()
    }

    /// Anything but 200 means the daemon refused or failed the call: the benchmark is broken.
    fn ok(&self, method: &str) -> Result<()> {
        ensure!(
            self.status == 200,
            "{method} answered {}: {}",
            self.status,
            self.text()
        );
        Ok(())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Conn {
    async fn connect(path: &Path) -> Result<Conn> {
        let stream = UnixStream::connect(path)
            .await
            .with_context(|| format!("cannot connect to {}", path.display()))?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(64 * 1024),
            consumed: 0,
            req: Vec::with_capacity(512),
            chunked: Vec::new(),
        })
    }

    async fn fill(&mut self) -> Result<()> {
        if self.buf.capacity() - self.buf.len() < 16 * 1024 {
            self.buf.reserve(64 * 1024);
        }
        let n = self.stream.read_buf(&mut self.buf).await?;
        ensure!(n > 0, "the daemon closed the connection");
        Ok(())
    }

    /// POSTs `body` (a JSON object; a newline is added, as Go's encoder does) and reads the response.
    async fn call(&mut self, endpoint: &str, body: &str) -> Result<Reply<'_>> {
        self.exchange(endpoint, body)
            .await
            .with_context(|| format!("{endpoint} {body}: no valid reply from the daemon"))
    }

    async fn exchange(&mut self, endpoint: &str, body: &str) -> Result<Reply<'_>> {
        self.buf.drain(..self.consumed);
        self.consumed = 0;
        ensure!(
            self.buf.is_empty(),
            "the daemon sent bytes nobody asked for"
        );
        self.req.clear();
        // Go's JSON encoder ends a body with a newline; Plugin.Activate has no body at all.
        let newline = if body.is_empty() { "" } else { "\n" };
        write!(
            StrBuf(&mut self.req),
            "POST {endpoint} HTTP/1.1\r\nHost: plugin.moby.localhost\r\nUser-Agent: Go-http-client/1.1\r\n\
             Content-Length: {}\r\nAccept: {ACCEPT}\r\n\r\n{body}{newline}",
            body.len() + newline.len()
        )?;
        self.stream.write_all(&self.req).await?;

        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(&self.buf[..head_end]).context("non-UTF-8 response head")?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
        let (mut length, mut chunked) = (None, false);
        for line in lines {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let v = v.trim();
            if k.eq_ignore_ascii_case("content-length") {
                length = Some(v.parse::<usize>().context("bad Content-Length")?);
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.eq_ignore_ascii_case("chunked");
            } else if k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close") {
                bail!("the daemon asked to close a keep-alive connection");
            }
        }
        if let Some(len) = length {
            while self.buf.len() < head_end + len {
                self.fill().await?;
            }
            self.consumed = head_end + len;
            return Ok(Reply {
                status,
                body: &self.buf[head_end..head_end + len],
            });
        }
        ensure!(chunked, "response has neither Content-Length nor chunking");
        self.chunked.clear();
        let mut pos = head_end;
        loop {
            let line_end = loop {
                if let Some(i) = find(&self.buf[pos..], b"\r\n") {
                    break pos + i;
                }
                self.fill().await?;
            };
            let size_text = std::str::from_utf8(&self.buf[pos..line_end])?;
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .context("bad chunk size")?;
            pos = line_end + 2;
            while self.buf.len() < pos + size + 2 {
                self.fill().await?;
            }
            self.chunked.extend_from_slice(&self.buf[pos..pos + size]);
            pos += size + 2;
            if size == 0 {
                // No trailers are expected from hyper for a plain body.
                break;
            }
        }
        self.consumed = pos;
        Ok(Reply {
            status,
            body: &self.chunked,
        })
    }
}

/// Lets `write!` append to a byte vector.
struct StrBuf<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for StrBuf<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Calls and insists on 200; returns the decoded body when `decode` is set.
async fn call_ok(conn: &mut Conn, endpoint: &str, body: &str, decode: bool) -> Result<Value> {
    let reply = conn.call(endpoint, body).await?;
    ensure!(
        reply.status == 200,
        "{endpoint} {body} answered {}: {}",
        reply.status,
        reply.text()
    );
    if !decode {
        return Ok(Value::Null);
    }
    let v: Value = serde_json::from_slice(reply.body)
        .with_context(|| format!("{endpoint} answered non-JSON: {}", reply.text()))?;
    if let Some(err) = v.get("Err").and_then(Value::as_str) {
        ensure!(err.is_empty(), "{endpoint} {body} failed: {err}");
    }
    Ok(v)
}

// ------------------------------------------------------------------------------------------------------
// Statistics.

#[derive(Clone, Copy)]
struct Stats {
    n: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

/// Nearest-rank percentiles, in milliseconds.
fn stats(mut ns: Vec<u64>) -> Result<Stats> {
    ensure!(!ns.is_empty(), "no samples");
    ns.sort_unstable();
    let rank = |p: f64| {
        let r = (p * ns.len() as f64).ceil() as usize;
        ns[r.clamp(1, ns.len()) - 1] as f64 / 1e6
    };
    Ok(Stats {
        n: ns.len(),
        p50: rank(0.50),
        p99: rank(0.99),
        max: *ns.last().unwrap_or(&0) as f64 / 1e6,
    })
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn verdict(pass: bool) -> &'static str {
    if pass {
        "PASS"
    } else {
        "MISS"
    }
}

// ------------------------------------------------------------------------------------------------------
// The protocol benchmark.

/// What each client does in one iteration.
#[derive(Clone)]
enum Work {
    /// Get of these volumes, each client starting at its own and going round them.
    Get { volumes: Vec<String> },
    /// Mount with a fresh ID (timed) then Unmount of that ID (timed separately); each client has its own
    /// volume from the list, or all share the first. The volume is held mounted by a base ID throughout.
    MountCycle { volumes: Vec<String> },
    /// List, expecting this many volumes.
    List { expect: usize },
    /// Create of the names `prefix-<i>` for i in the client's share of 0..total.
    Create { prefix: String, total: usize },
}

#[derive(Clone, Copy)]
struct Run {
    clients: usize,
    iters_per_client: usize,
    warmup_per_client: usize,
    max: Duration,
}

struct Outcome {
    primary: Stats,
    /// Unmount latencies of a MountCycle.
    secondary: Option<Stats>,
    /// Timed requests (all kinds) per second of wall time.
    rate: f64,
    wall: Duration,
    /// CPU time (user + system) per request, warm-up included, of the daemon and of this load generator.
    daemon_cpu_us: f64,
    client_cpu_us: f64,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh 64-hex mount ID, like Docker's.
fn fresh_id() -> String {
    format!("fe77{:060x}", NEXT_ID.fetch_add(1, Ordering::Relaxed))
}

fn name_body(name: &str) -> String {
    json!({ "Name": name }).to_string()
}

fn mount_body(name: &str, id: &str) -> String {
    json!({ "Name": name, "ID": id }).to_string()
}

async fn one_iteration(
    conn: &mut Conn,
    work: &Work,
    client: usize,
    i: usize,
    check: bool,
    primary: &mut Vec<u64>,
    secondary: &mut Vec<u64>,
) -> Result<()> {
    match work {
        Work::Get { volumes } => {
            let volume = &volumes[(client + i) % volumes.len()];
            let body = name_body(volume);
            let t = Instant::now();
            let reply = conn.call("/VolumeDriver.Get", &body).await?;
            primary.push(t.elapsed().as_nanos() as u64);
            reply.ok("Get")?;
            if check {
                let v: Value = serde_json::from_slice(reply.body)?;
                ensure!(
                    v["Volume"]["Name"] == volume.as_str(),
                    "Get answered for another volume: {v}"
                );
            }
        }
        Work::MountCycle { volumes } => {
            let volume = &volumes[client % volumes.len()];
            let id = fresh_id();
            let body = mount_body(volume, &id);
            let t = Instant::now();
            let reply = conn.call("/VolumeDriver.Mount", &body).await?;
            primary.push(t.elapsed().as_nanos() as u64);
            reply.ok("Mount")?;
            if check {
                let v: Value = serde_json::from_slice(reply.body)?;
                ensure!(
                    v["Mountpoint"].as_str().is_some_and(|m| !m.is_empty()),
                    "Mount answered no mountpoint: {v}"
                );
            }
            let t = Instant::now();
            let reply = conn.call("/VolumeDriver.Unmount", &body).await?;
            secondary.push(t.elapsed().as_nanos() as u64);
            reply.ok("Unmount")?;
        }
        Work::List { expect } => {
            let t = Instant::now();
            let reply = conn.call("/VolumeDriver.List", "{}").await?;
            primary.push(t.elapsed().as_nanos() as u64);
            reply.ok("List")?;
            if check {
                let v: Value = serde_json::from_slice(reply.body)?;
                let n = v["Volumes"].as_array().map_or(0, Vec::len);
                ensure!(n == *expect, "List returned {n} volumes, expected {expect}");
            }
        }
        Work::Create { prefix, .. } => {
            let body = json!({ "Name": format!("{prefix}-{i:05}"), "Opts": null }).to_string();
            let t = Instant::now();
            let reply = conn.call("/VolumeDriver.Create", &body).await?;
            primary.push(t.elapsed().as_nanos() as u64);
            reply.ok("Create")?;
        }
    }
    Ok(())
}

struct ClientResult {
    primary: Vec<u64>,
    secondary: Vec<u64>,
    start: Instant,
    end: Instant,
}

async fn client_loop(
    socket: PathBuf,
    work: Work,
    client: usize,
    run: Run,
    barrier: Arc<Barrier>,
) -> Result<ClientResult> {
    let Run {
        clients,
        iters_per_client: iters,
        warmup_per_client: warmup,
        max,
    } = run;
    let mut conn = Conn::connect(&socket).await?;
    let (mut primary, mut secondary) = (Vec::new(), Vec::new());
    // Creates are not repeatable: they get no warm-up, and each client takes every `clients`-th name. Other
    // work may be bounded by time alone (an iteration count out of reach), so its indices are not collected.
    let indices: Box<dyn ExactSizeIterator<Item = usize> + Send> = match &work {
        Work::Create { total, .. } => Box::new((client..*total).step_by(clients)),
        _ => Box::new(0..iters),
    };
    let count = indices.len();
    if !matches!(work, Work::Create { .. }) {
        for i in 0..warmup {
            one_iteration(
                &mut conn,
                &work,
                client,
                i,
                i == 0,
                &mut primary,
                &mut secondary,
            )
            .await?;
        }
    }
    primary.clear();
    secondary.clear();
    // Enough for a time-bounded run at this machine's rates without regrowing inside the timed loop.
    primary.reserve(count.min(1 << 18));
    secondary.reserve(count.min(1 << 18));
    barrier.wait().await;
    let start = Instant::now();
    for (k, i) in indices.enumerate() {
        let check = k % CHECK_EVERY == 0 || k + 1 == count;
        one_iteration(
            &mut conn,
            &work,
            client,
            i,
            check,
            &mut primary,
            &mut secondary,
        )
        .await?;
        if start.elapsed() > max && !matches!(work, Work::Create { .. }) {
            break;
        }
    }
    Ok(ClientResult {
        primary,
        secondary,
        start,
        end: Instant::now(),
    })
}

/// Total CPU time (user + system, all threads, exited ones included) of a process, in microseconds.
fn cpu_us(pid: Option<u32>) -> Result<f64> {
    let path = pid.map_or("/proc/self/stat".to_string(), |p| format!("/proc/{p}/stat"));
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {path}; has the daemon died?"))?;
    // The command name may hold spaces: fields are counted from after its closing parenthesis, where
    // field 3 (state) starts; utime and stime are fields 14 and 15.
    let after = text
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("bad {path}"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .ok_or_else(|| anyhow!("bad {path}"))
    };
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ensure!(hz > 0, "cannot read the clock tick rate");
    Ok((ticks(11)? + ticks(12)?) * 1e6 / hz as f64)
}

async fn run_clients(socket: &Path, pid: u32, work: &Work, run: &Run) -> Result<Outcome> {
    let cpu_before = (cpu_us(Some(pid))?, cpu_us(None)?);
    let barrier = Arc::new(Barrier::new(run.clients));
    let tasks: Vec<_> = (0..run.clients)
        .map(|c| {
            tokio::spawn(client_loop(
                socket.to_path_buf(),
                work.clone(),
                c,
                *run,
                barrier.clone(),
            ))
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.context("client task panicked")??);
    }
    let start = results
        .iter()
        .map(|r| r.start)
        .min()
        .context("no clients")?;
    let end = results.iter().map(|r| r.end).max().context("no clients")?;
    let wall = end - start;
    let (mut primary, mut secondary) = (Vec::new(), Vec::new());
    for r in results {
        primary.extend(r.primary);
        secondary.extend(r.secondary);
    }
    let requests = primary.len() + secondary.len();
    let warmup = match work {
        Work::Create { .. } => 0,
        Work::MountCycle { .. } => 2 * run.clients * run.warmup_per_client,
        _ => run.clients * run.warmup_per_client,
    };
    let all = (requests + warmup) as f64;
    let daemon_cpu_us = (cpu_us(Some(pid))? - cpu_before.0) / all;
    let client_cpu_us = (cpu_us(None)? - cpu_before.1) / all;
    Ok(Outcome {
        daemon_cpu_us,
        client_cpu_us,
        primary: stats(primary)?,
        secondary: if secondary.is_empty() {
            None
        } else {
            Some(stats(secondary)?)
        },
        rate: requests as f64 / wall.as_secs_f64(),
        wall,
    })
}

/// VmRSS and VmHWM of a process, in MiB.
fn memory(pid: u32) -> Result<(f64, f64)> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {path}; has the daemon died?"))?;
    let field = |key: &str| -> Result<f64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(key))
            .ok_or_else(|| anyhow!("{path} has no {key}"))?;
        let kb: f64 = line[key.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("bad line {line:?}"))?;
        Ok(kb / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Collects result rows and prints each as it is measured.
struct Results {
    rows: Vec<Value>,
}

impl Results {
    fn latency(
        &mut self,
        key: &str,
        what: &str,
        clients: usize,
        s: Stats,
        o: &Outcome,
        target_p99_ms: Option<f64>,
    ) {
        let pass = target_p99_ms.map(|t| s.p99 < t);
        println!(
            "  {what:<50} clients={clients:<3} n={:<6} p50={:>7.3} ms  p99={:>7.3} ms  max={:>7.3} ms  \
             {:>6.0} req/s  CPU/req: daemon {:.0} µs, client {:.0} µs",
            s.n, s.p50, s.p99, s.max, o.rate, o.daemon_cpu_us, o.client_cpu_us
        );
        self.rows.push(json!({
            "kind": "latency", "key": key, "what": what, "clients": clients, "n": s.n,
            "p50_ms": s.p50, "p99_ms": s.p99, "max_ms": s.max, "rate": o.rate,
            "daemon_cpu_us": o.daemon_cpu_us, "client_cpu_us": o.client_cpu_us,
            "target": target_p99_ms.map(|t| format!("p99 < {t} ms")), "pass": pass,
        }));
    }

    fn value(
        &mut self,
        key: &str,
        what: &str,
        value: f64,
        unit: &str,
        target: Option<(&str, bool)>,
    ) {
        println!("  {what:<50} {value:.2} {unit}");
        self.rows.push(json!({
            "kind": "value", "key": key, "what": what, "value": value, "unit": unit,
            "target": target.map(|t| t.0), "pass": target.map(|t| t.1),
        }));
    }
}

async fn get_bench(args: GetArgs) -> Result<()> {
    let work = Work::Get {
        volumes: args.volumes.clone(),
    };
    let run = Run {
        clients: args.clients,
        // The time limit ends the run; the count only has to be out of reach.
        iters_per_client: usize::MAX,
        warmup_per_client: args.warmup,
        max: Duration::from_secs_f64(args.seconds),
    };
    let o = run_clients(&args.socket, args.pid, &work, &run).await?;
    let s = o.primary;
    println!(
        "  Get  clients={} n={:<7} p50={:>7.3} ms  p99={:>7.3} ms  max={:>7.3} ms  {:>6.0} req/s  CPU/req: daemon {:.0} µs, client {:.0} µs",
        args.clients, s.n, s.p50, s.p99, s.max, o.rate, o.daemon_cpu_us, o.client_cpu_us
    );
    let doc = json!({
        "clients": args.clients, "n": s.n, "p50_ms": s.p50, "p99_ms": s.p99, "max_ms": s.max,
        "rate": o.rate, "seconds": o.wall.as_secs_f64(),
        "daemon_cpu_us": o.daemon_cpu_us, "client_cpu_us": o.client_cpu_us,
    });
    std::fs::write(&args.out, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("cannot write {}", args.out.display()))
}

fn scaled(n: usize, scale: f64) -> usize {
    ((n as f64 * scale).round() as usize).max(1)
}

async fn socket_bench(args: SocketArgs) -> Result<()> {
    let sock = args.socket.as_path();
    let max = Duration::from_secs(args.max_seconds);
    let mut res = Results { rows: Vec::new() };
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    let mut conn = Conn::connect(sock).await?;
    let v = call_ok(&mut conn, "/Plugin.Activate", "", true).await?;
    ensure!(
        v["Implements"][0] == "VolumeDriver",
        "not a volume plugin: {v}"
    );
    let (rss_start, _) = memory(args.pid)?;

    // The small catalog: one volume for Get, one shared and 32 per-client volumes for Mount.
    let own: Vec<String> = (0..32).map(|i| format!("bench-mnt-{i:02}")).collect();
    let shared = "bench-mnt-shared".to_string();
    let get_vol = "bench-get".to_string();
    let many = "bench-mnt-many".to_string();
    let mut small: Vec<&String> = vec![&get_vol, &shared, &many];
    small.extend(own.iter());
    for name in &small {
        call_ok(&mut conn, "/VolumeDriver.Create", &name_body(name), true).await?;
    }
    let small_count = small.len();

    let run = |clients: usize, per_client: usize, warmup: usize| Run {
        clients,
        iters_per_client: scaled(per_client, args.scale),
        warmup_per_client: warmup,
        max,
    };

    println!("(a) Get latency");
    let get = Work::Get {
        volumes: vec![get_vol.clone()],
    };
    let o = run_clients(sock, args.pid, &get, &run(1, 20_000, 500)).await?;
    res.latency("get_c1", "Get", 1, o.primary, &o, None);
    let o = run_clients(sock, args.pid, &get, &run(32, 1_000, 50)).await?;
    res.latency("get_c32", "Get", 32, o.primary, &o, Some(TARGET_P99_MS));

    println!(
        "(b) Mount of an already-mounted volume (fresh mount ID each; Unmount timed separately)"
    );
    let base = fresh_id();
    for v in own.iter().chain([&shared, &many]) {
        call_ok(
            &mut conn,
            "/VolumeDriver.Mount",
            &mount_body(v, &base),
            true,
        )
        .await?;
    }
    let held: Vec<String> = (0..HELD_IDS).map(|_| fresh_id()).collect();
    for id in &held {
        call_ok(
            &mut conn,
            "/VolumeDriver.Mount",
            &mount_body(&many, id),
            false,
        )
        .await?;
    }
    let cases = [
        ("mount_c1", "1 volume", 1, 5_000, vec![shared.clone()], None),
        (
            "mount_c32_shared",
            "all clients on ONE volume",
            32,
            400,
            vec![shared.clone()],
            Some(TARGET_P99_MS),
        ),
        (
            "mount_c32_own",
            "each client on its own volume",
            32,
            400,
            own.clone(),
            Some(TARGET_P99_MS),
        ),
        (
            "mount_c1_many",
            "volume holding 1,000 IDs (extra)",
            1,
            1_000,
            vec![many.clone()],
            None,
        ),
    ];
    for (key, variant, clients, per_client, volumes, target) in cases {
        let o = run_clients(
            sock,
            args.pid,
            &Work::MountCycle { volumes },
            &run(clients, per_client, 10),
        )
        .await?;
        res.latency(
            key,
            &format!("Mount of mounted, {variant}"),
            clients,
            o.primary,
            &o,
            target,
        );
        let u = o.secondary.context("no unmount samples")?;
        res.latency(
            &format!("un{key}"),
            &format!("  (its Unmount, {variant})"),
            clients,
            u,
            &o,
            None,
        );
    }
    for id in &held {
        call_ok(
            &mut conn,
            "/VolumeDriver.Unmount",
            &mount_body(&many, id),
            false,
        )
        .await?;
    }
    for v in own.iter().chain([&shared, &many]) {
        call_ok(
            &mut conn,
            "/VolumeDriver.Unmount",
            &mount_body(v, &base),
            true,
        )
        .await?;
        // Every fresh ID must have been unmounted again: nothing may be left active.
        let got = call_ok(&mut conn, "/VolumeDriver.Get", &name_body(v), true).await?;
        let active = &got["Volume"]["Status"]["active_mounts"];
        ensure!(
            active.as_u64() == Some(0),
            "{v} still has {active} active mounts after the benchmark"
        );
    }

    println!("(c) List latency, small catalog ({small_count} volumes)");
    let list = Work::List {
        expect: small_count,
    };
    let o = run_clients(sock, args.pid, &list, &run(1, 10_000, 200)).await?;
    res.latency(
        "list_c1",
        &format!("List, {small_count} volumes"),
        1,
        o.primary,
        &o,
        None,
    );
    let o = run_clients(sock, args.pid, &list, &run(32, 400, 20)).await?;
    res.latency(
        "list_c32",
        &format!("List, {small_count} volumes"),
        32,
        o.primary,
        &o,
        None,
    );
    let (rss_small, _) = memory(args.pid)?;

    println!("(c) Creating {} plain-directory volumes", args.bulk);
    let create = Work::Create {
        prefix: "bulk".into(),
        total: args.bulk,
    };
    let o = run_clients(sock, args.pid, &create, &run(32, 0, 0)).await?;
    ensure!(
        o.primary.n == args.bulk,
        "created {} of {}",
        o.primary.n,
        args.bulk
    );
    res.latency(
        "create_c32",
        "Create (plain directory), during the bulk create",
        32,
        o.primary,
        &o,
        None,
    );
    res.value(
        "create_rate",
        &format!("Bulk create of {} volumes, wall time", args.bulk),
        o.wall.as_secs_f64(),
        "s",
        None,
    );
    let total = small_count + args.bulk;
    let (rss_created, _) = memory(args.pid)?;

    println!("(c) List latency, large catalog ({total} volumes)");
    let o = run_clients(
        sock,
        args.pid,
        &Work::List { expect: total },
        &run(1, 1_000, 10),
    )
    .await?;
    res.latency(
        "list_bulk_c1",
        &format!("List, {total} volumes"),
        1,
        o.primary,
        &o,
        Some(TARGET_LIST_BULK_P99_MS),
    );
    let o = run_clients(sock, args.pid, &get, &run(1, 5_000, 100)).await?;
    res.latency(
        "get_bulk_c1",
        &format!("Get, {total} volumes in the catalog"),
        1,
        o.primary,
        &o,
        None,
    );

    println!("(d) Daemon memory");
    let (rss_listed, hwm) = memory(args.pid)?;
    res.value(
        "rss_start",
        "VmRSS at start (empty catalog)",
        rss_start,
        "MiB",
        None,
    );
    res.value(
        "rss_small",
        &format!("VmRSS after the small-catalog runs ({small_count} volumes)"),
        rss_small,
        "MiB",
        None,
    );
    res.value(
        "rss_created",
        &format!("VmRSS after creating, {total} volumes"),
        rss_created,
        "MiB",
        None,
    );
    let target = format!("< {TARGET_RSS_MIB} MiB");
    res.value(
        "rss_bulk",
        &format!("VmRSS with {total} volumes, after the List runs"),
        rss_listed,
        "MiB",
        Some((&target, rss_listed < TARGET_RSS_MIB)),
    );
    res.value(
        "rss_hwm",
        "VmHWM (peak resident) over the whole run",
        hwm,
        "MiB",
        None,
    );
    if let Some(path) = &args.catalog {
        let len = std::fs::metadata(path)
            .with_context(|| format!("cannot stat {}", path.display()))?
            .len();
        res.value(
            "catalog_size",
            &format!("Catalog file size with {total} volumes"),
            len as f64 / (1u64 << 20) as f64,
            "MiB",
            None,
        );
    }

    let doc = json!({ "socket": { "loadavg_start": loadavg.trim(), "loadavg_end":
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(), "scale": args.scale,
        "client_threads": args.client_threads },
        "rows": res.rows });
    std::fs::write(&args.out, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    Ok(())
}

// ------------------------------------------------------------------------------------------------------
// docker run, Ferry against local.

fn docker(args: &[&str]) -> Result<String> {
    let out = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run docker")?;
    ensure!(
        out.status.success(),
        "docker {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// One `docker run --rm -v VOL:/data IMAGE true`, timed from spawn to exit.
fn timed_run(volume: &str, image: &str, label: &str) -> Result<f64> {
    let mount = format!("{volume}:/data");
    let args = ["run", "--rm", "--label", label, "-v", &mount, image, "true"];
    let t = Instant::now();
    docker(&args)?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

fn docker_bench(args: DockerArgs) -> Result<()> {
    let driver = docker(&[
        "volume",
        "inspect",
        "--format",
        "{{.Driver}}",
        &args.ferry_volume,
    ])?;
    ensure!(
        driver == args.driver,
        "volume {} has driver {driver:?}, not {:?}",
        args.ferry_volume,
        args.driver
    );
    let local = docker(&[
        "volume",
        "inspect",
        "--format",
        "{{.Driver}}",
        &args.local_volume,
    ])?;
    ensure!(
        local == "local",
        "volume {} has driver {local:?}",
        args.local_volume
    );
    let server = docker(&["version", "--format", "{{.Server.Version}}"])?;

    let (mut ferry, mut local) = (Vec::new(), Vec::new());
    for i in 0..args.warmup + args.runs {
        let f = timed_run(&args.ferry_volume, &args.image, &args.label)?;
        let l = timed_run(&args.local_volume, &args.image, &args.label)?;
        let phase = if i < args.warmup { "warm-up" } else { "timed" };
        println!(
            "  run {:>2} ({phase:<7}) ferry {f:>7.1} ms   local {l:>7.1} ms",
            i + 1
        );
        if i >= args.warmup {
            ferry.push(f);
            local.push(l);
        }
    }
    let (mf, ml) = (median(&ferry), median(&local));
    let ratio = mf / ml;
    let range = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        format!("{lo:.1}–{hi:.1} ms")
    };
    println!(
        "  median: ferry {mf:.1} ms ({}), local {ml:.1} ms ({}), ratio {ratio:.3}",
        range(&ferry),
        range(&local)
    );
    let target = format!("≤ {TARGET_DOCKER_RATIO:.2}");
    let doc = json!({
        "docker": { "server": server, "runs": args.runs, "warmup": args.warmup,
                    "ferry_range": range(&ferry), "local_range": range(&local) },
        "rows": [
            { "kind": "value", "key": "docker_ferry", "unit": "ms", "value": mf, "target": null, "pass": null,
              "what": format!("docker run --rm -v VOL:/data IMAGE true, Ferry volume, median of {}", args.runs) },
            { "kind": "value", "key": "docker_local", "unit": "ms", "value": ml, "target": null, "pass": null,
              "what": format!("docker run --rm -v VOL:/data IMAGE true, local volume, median of {}", args.runs) },
            { "kind": "value", "key": "docker_ratio", "unit": "", "value": ratio, "target": target,
              "pass": ratio <= TARGET_DOCKER_RATIO, "what": "docker run ratio ferry/local (medians)" },
        ],
    });
    std::fs::write(&args.out, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    Ok(())
}

// ------------------------------------------------------------------------------------------------------
// The report.

fn fmt_value(row: &Value) -> String {
    let v = row["value"].as_f64().unwrap_or(f64::NAN);
    let unit = row["unit"].as_str().unwrap_or("");
    if unit.is_empty() {
        format!("{v:.3}")
    } else {
        format!("{v:.2} {unit}")
    }
}

fn report(args: ReportArgs) -> Result<()> {
    let mut docs = Vec::new();
    for path in &args.results {
        let text =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        docs.push(serde_json::from_slice::<Value>(&text)?);
    }
    let rows: Vec<&Value> = docs
        .iter()
        .flat_map(|d| d["rows"].as_array().into_iter().flatten())
        .collect();
    let socket_info = docs.iter().find_map(|d| d.get("socket"));
    let docker_info = docs.iter().find_map(|d| d.get("docker"));

    println!("== Results");
    for r in &rows {
        let what = r["what"].as_str().unwrap_or("");
        if r["kind"] == "latency" {
            println!(
                "  {what:<50} clients={:<3} p50={:>7.3} ms  p99={:>7.3} ms  (n={}, {:.0} req/s, daemon CPU {:.0} µs/req)",
                r["clients"],
                r["p50_ms"].as_f64().unwrap_or(f64::NAN),
                r["p99_ms"].as_f64().unwrap_or(f64::NAN),
                r["n"],
                r["rate"].as_f64().unwrap_or(f64::NAN),
                r["daemon_cpu_us"].as_f64().unwrap_or(f64::NAN),
            );
        } else {
            println!("  {what:<50} {}", fmt_value(r));
        }
    }
    println!("== Targets");
    let mut missed = 0;
    for r in rows.iter().filter(|r| r["pass"].is_boolean()) {
        let pass = r["pass"] == true;
        missed += usize::from(!pass);
        let what = r["what"].as_str().unwrap_or("");
        let figure = if r["kind"] == "latency" {
            format!(
                "p99 {:.3} ms at {} client(s)",
                r["p99_ms"].as_f64().unwrap_or(f64::NAN),
                r["clients"]
            )
        } else {
            fmt_value(r)
        };
        println!(
            "{}  {what}: {figure} (target {})",
            verdict(pass),
            r["target"].as_str().unwrap_or("")
        );
    }
    println!("== {missed} target(s) missed (a benchmark: this is reported, not failed)");

    if let Some(path) = &args.markdown {
        let mut md = String::new();
        let now = humantime::format_rfc3339_seconds(SystemTime::now());
        writeln!(md, "# Ferry benchmarks\n")?;
        writeln!(
            md,
            "Measured by `scripts/bench` on {now}{}; {} CPU cores, kernel {}.\n",
            if args.commit.is_empty() {
                String::new()
            } else {
                format!(", built from the working tree at commit `{}`", args.commit)
            },
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
        )?;
        writeln!(
            md,
            "Protocol calls are raw HTTP/1.1 over the Unix socket, one keep-alive connection per client, each \
             client sending its next request as soon as the last is answered (closed loop), from a load \
             generator with {} thread(s) on the same machine. Each Mount uses a fresh mount ID on a volume that is already \
             mounted and is followed by an Unmount of that ID, timed separately. Percentiles are nearest-rank. \
             Throughput counts timed requests of every kind per second of wall time; daemon CPU per request is \
             the daemon's user + system time over the run divided by its requests, warm-up included. \
             Other work on the machine moves these figures from run to run, the p99s most.\n",
            socket_info.map_or(1, |s| s["client_threads"].as_u64().unwrap_or(1))
        )?;
        if let Some(s) = socket_info {
            writeln!(
                md,
                "Load average at the start of the protocol runs: {}; at the end: {}.",
                s["loadavg_start"].as_str().unwrap_or("?"),
                s["loadavg_end"].as_str().unwrap_or("?")
            )?;
        }
        writeln!(md)?;
        writeln!(
            md,
            "| Measurement | Clients | Requests | p50 | p99 | Throughput | Daemon CPU per request | Target | Result |"
        )?;
        writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---|---|")?;
        for r in rows.iter().filter(|r| r["kind"] == "latency") {
            writeln!(
                md,
                "| {} | {} | {} | {:.3} ms | {:.3} ms | {:.0}/s | {:.0} µs | {} | {} |",
                r["what"].as_str().unwrap_or("").trim(),
                r["clients"],
                r["n"],
                r["p50_ms"].as_f64().unwrap_or(f64::NAN),
                r["p99_ms"].as_f64().unwrap_or(f64::NAN),
                r["rate"].as_f64().unwrap_or(f64::NAN),
                r["daemon_cpu_us"].as_f64().unwrap_or(f64::NAN),
                r["target"].as_str().unwrap_or(""),
                r["pass"].as_bool().map_or("", verdict)
            )?;
        }
        writeln!(md)?;
        writeln!(md, "| Figure | Value | Target | Result |")?;
        writeln!(md, "|---|---:|---|---|")?;
        for r in rows.iter().filter(|r| r["kind"] == "value") {
            writeln!(
                md,
                "| {} | {} | {} | {} |",
                r["what"].as_str().unwrap_or(""),
                fmt_value(r),
                r["target"].as_str().unwrap_or(""),
                r["pass"].as_bool().map_or("", verdict)
            )?;
        }
        if let Some(d) = docker_info {
            writeln!(
                md,
                "\n`docker run` on Docker Engine {}: {} warm-up pairs, then {} runs per driver, interleaved \
                 (ferry, local, ferry, local, …). Range: ferry {}, local {}.",
                d["server"].as_str().unwrap_or("?"),
                d["warmup"],
                d["runs"],
                d["ferry_range"].as_str().unwrap_or("?"),
                d["local_range"].as_str().unwrap_or("?")
            )?;
        }
        std::fs::write(path, md).with_context(|| format!("cannot write {}", path.display()))?;
        println!("Markdown written to {}", path.display());
    }
    Ok(())
}

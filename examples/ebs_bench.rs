//! The driver behind `scripts/bench-ebs`. It is a benchmark, not a test: it measures and reports, and fails
//! only when something breaks (a refused call, a dead daemon, data that does not come back whole).
//!
//! Every Ferry figure is taken through Ferry's real path: the release `ferry serve` as a daemon with an
//! `[ebs]` section, driven over its Unix socket with Docker's volume protocol. Unmount of the last mount
//! pushes (ships the changed blocks as a snapshot); Create + Mount of the same name on a second daemon with
//! its own state directory (a second "host") pulls.
//!
//! - `strict`: the strict EBS emulator runs in this process with a fixed latency per call; push and pull
//!   throughput at several concurrencies as a fraction of the ideal (concurrency x 512 KiB / latency),
//!   each next to bare SDK calls with as many blocks in flight (what the machine and the emulator allow
//!   without Ferry); one concurrency again with no latency, where only processing counts; and an
//!   incremental change: bytes shipped against the 512 KiB blocks that differ between the images.
//! - `moto`: against a running moto, push and pull alternated with a bare sequential loop of `aws-sdk-ebs`
//!   calls moving the same blocks, as a ratio per pair.
//! - `history`: bounded history on the strict emulator (see `support/ebs_history.rs`).
//! - `report`: prints every figure against its target as PASS/MISS and optionally writes Markdown.
//!
//! Two timings are kept apart throughout. The transfer phase is what Ferry logs itself ("shipped a
//! snapshot" and "pulled the newest snapshot", blocks and seconds): for a push, from after StartSnapshot to
//! CompleteSnapshot answered; for a pull, from ListSnapshotBlocks to the image synced and renamed. The whole
//! call is the protocol Unmount or Mount as a client sees it, which adds the lookups of the volume's
//! snapshots, StartSnapshot, scanning the image for changed blocks, and unmounting or mounting.

#[path = "../tests/common/ebs_strict.rs"]
mod ebs_strict;

#[path = "support/mod.rs"]
mod support;

#[path = "support/ebs_history.rs"]
mod history;
use support::{
    median, plugin_call, save, start_serve, terminate, unmount_under, verdict, verify_data,
    Pattern, ServeDir, CHUNK,
};

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, ensure, Context, Result};
use aws_sdk_ebs::primitives::ByteStream;
use aws_sdk_ebs::types::ChecksumAlgorithm;
use base64::Engine;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use ebs_strict::StrictEbs;

/// The EBS direct APIs move data in blocks of exactly this many bytes.
const BLOCK: u64 = 512 * 1024;
const MIB: f64 = (1u64 << 20) as f64;
/// Targets from the issues, judged on the whole Unmount and Mount calls, which are what Docker waits for:
/// the fraction of the ideal at concurrency 16, a pull with no latency against bare SDK calls moving the
/// same blocks, and the daemon's CPU seconds per GiB pulled.
const TARGET_WHOLE_AT_16: f64 = 0.85;
const TARGET_PULL_BARE: f64 = 1.0;
const TARGET_PULL_CPU_GIB: f64 = 1.0;
const TARGET_BARE_LOOP: f64 = 0.9;
/// The incremental change: this much of a file, rewritten in place where its data starts a 512 KiB block of
/// the image.
const CHANGE: u64 = 1 << 20;
/// The emulator's listing page; the real service allows up to 10,000 blocks per page.
const PAGE: usize = 10_000;

#[derive(Parser)]
#[command(about = "Ferry's EBS benchmark driver (run through scripts/bench-ebs)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Push and pull against the strict emulator with a latency per call, and the incremental change.
    Strict(StrictArgs),
    /// Push and pull against moto, alternated with a bare loop of SDK calls.
    Moto(MotoArgs),
    /// Bounded history on the strict emulator: bytes pulled per byte changed, Mount time against the
    /// volume's age, a huge sparse volume's Unmount and memory.
    History(history::HistoryArgs),
    /// Prints the results against their targets and optionally writes Markdown.
    Report(ReportArgs),
}

#[derive(clap::Args)]
struct Common {
    /// The `ferry` binary to run as the daemon.
    #[arg(long)]
    ferry: PathBuf,
    /// A directory for the daemons' state, logs and image copies.
    #[arg(long)]
    work: PathBuf,
    /// Every daemon's PID is appended here, so the script can stop them if this program dies.
    #[arg(long)]
    pids: PathBuf,
    /// Where to write the results (JSON).
    #[arg(long)]
    out: PathBuf,
    /// Timed repetitions of each measurement.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

#[derive(clap::Args)]
struct StrictArgs {
    #[command(flatten)]
    common: Common,
    /// Milliseconds the emulator waits before answering each call.
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
    /// The `[ebs] concurrency` values to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    concurrency: Vec<usize>,
    /// MiB written per block in flight: concurrency 16 moves 16 times this, so every run takes about
    /// the same time at the ideal rate.
    #[arg(long, default_value_t = 32)]
    mib_per_stream: u64,
    /// Size of the file the incremental change is made in.
    #[arg(long, default_value_t = 64)]
    incremental_file_mib: u64,
    /// Also measure this concurrency with no latency at all (0 skips it): the rate at which the daemon,
    /// the SDK and the emulator process blocks, which the latency-bound runs hide.
    #[arg(long, default_value_t = 16)]
    unlimited_concurrency: usize,
}

#[derive(clap::Args)]
struct MotoArgs {
    #[command(flatten)]
    common: Common,
    /// moto's endpoint, such as http://127.0.0.1:12355.
    #[arg(long)]
    endpoint: String,
    /// MiB written into the volume and moved each way.
    #[arg(long, default_value_t = 256)]
    mib: u64,
    /// `[ebs] concurrency` of the daemons; Ferry's default when not given.
    #[arg(long)]
    concurrency: Option<usize>,
    /// moto's process ID, for its CPU time.
    #[arg(long)]
    moto_pid: u32,
    /// moto's version, for the report.
    #[arg(long, default_value = "?")]
    moto_version: String,
}

#[derive(clap::Args)]
struct ReportArgs {
    /// Result files written by `strict` and `moto`.
    #[arg(long = "results", required = true)]
    results: Vec<PathBuf>,
    /// Also write the results as Markdown here.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Lines about the run (commit, versions) for the Markdown header.
    #[arg(long = "about")]
    about: Vec<String>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Strict(args) => strict(args),
        Cmd::Moto(args) => moto(args),
        Cmd::History(args) => history::history(args),
        Cmd::Report(args) => report(args),
    }
}

// ------------------------------------------------------------------------------------------------------
// The daemon, as a second process driven over its socket.

/// One `ferry serve` with its own socket, state directory, configuration and log: one "host".
struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    state: PathBuf,
    log: PathBuf,
    dir: PathBuf,
}

impl Daemon {
    fn start(
        common: &Common,
        label: &str,
        endpoint: &str,
        concurrency: Option<usize>,
    ) -> Result<Daemon> {
        Daemon::start_with(common, label, endpoint, concurrency, "")
    }

    /// As `start`, with `lines` added to the `[ebs]` section.
    fn start_with(
        common: &Common,
        label: &str,
        endpoint: &str,
        concurrency: Option<usize>,
        lines: &str,
    ) -> Result<Daemon> {
        let dir = common.work.join(label);
        let mut text = format!("[ebs]\nregion = \"us-east-1\"\nendpoint_url = \"{endpoint}\"\n");
        if let Some(c) = concurrency {
            writeln!(text, "concurrency = {c}")?;
        }
        // moto's snapshots hold only their own blocks (the strict emulator's inherit, as EBS's do).
        if label.starts_with("moto") {
            writeln!(text, "keep_chain = true")?;
        }
        if !lines.is_empty() {
            writeln!(text, "{lines}")?;
        }
        let at = ServeDir::new(dir);
        let log = std::env::var("BENCH_FERRY_LOG").unwrap_or("info".into());
        let child = start_serve(&common.ferry, &at, &text, &log, &common.pids, label)?;
        Ok(Daemon {
            child: Some(child),
            socket: at.socket,
            state: at.state,
            log: at.log,
            dir: at.dir,
        })
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// One protocol call that must succeed; returns the reply.
    fn call(&self, endpoint: &str, body: &Value) -> Result<Value> {
        plugin_call(&self.socket, "ferry serve", endpoint, body)?
            .map_err(|e| anyhow!("VolumeDriver.{endpoint} {body} failed: {e}"))
    }

    fn create(&self, name: &str, size_mib: u64) -> Result<()> {
        let opts = json!({ "backend": "ebs", "size": format!("{size_mib}MiB") });
        self.call("Create", &json!({ "Name": name, "Opts": opts }))
            .map(drop)
    }

    fn mount(&self, name: &str, id: &str) -> Result<PathBuf> {
        let v = self.call("Mount", &json!({ "Name": name, "ID": id }))?;
        let m = v["Mountpoint"]
            .as_str()
            .ok_or_else(|| anyhow!("Mount of {name} answered no Mountpoint: {v}"))?;
        Ok(PathBuf::from(m))
    }

    fn unmount(&self, name: &str, id: &str) -> Result<()> {
        self.call("Unmount", &json!({ "Name": name, "ID": id }))
            .map(drop)
    }

    fn remove(&self, name: &str) -> Result<()> {
        self.call("Remove", &json!({ "Name": name })).map(drop)
    }

    /// The volume's Status as Get reports it.
    fn status(&self, name: &str) -> Result<Value> {
        let v = self.call("Get", &json!({ "Name": name }))?;
        Ok(v["Volume"]["Status"].clone())
    }

    fn image(&self, name: &str) -> PathBuf {
        self.state.join("ebs").join(name).join("image")
    }

    fn log_len(&self) -> u64 {
        std::fs::metadata(&self.log).map_or(0, |m| m.len())
    }

    /// Ferry's own account of the transfer: the first line after `from` (a log offset) with `message`.
    fn logged(&self, from: u64, message: &str) -> Result<Logged> {
        let text = std::fs::read(&self.log)?;
        let text = String::from_utf8_lossy(&text[from as usize..]);
        let line = text
            .lines()
            .find(|l| l.contains(message))
            .ok_or_else(|| anyhow!("no \"{message}\" in {} after the call", self.log.display()))?;
        let fields = &line[line.find(message).unwrap_or(0) + message.len()..];
        let field = |key: &str| -> Result<f64> {
            fields
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
                .map(|v| v.trim_matches('"'))
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| anyhow!("no {key}= in the log line {line:?}"))
        };
        Ok(Logged {
            blocks: field("blocks")? as u64,
            seconds: field("seconds")?,
        })
    }

    /// User + system CPU seconds of the daemon so far.
    fn cpu(&self) -> f64 {
        cpu_seconds(self.pid()).unwrap_or(f64::NAN)
    }

    fn warnings(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .count()
    }

    /// SIGTERM and wait; a daemon that does not exit cleanly is a failure.
    fn stop(mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let status = terminate(&mut child, Duration::from_secs(10))?;
        ensure!(
            status.success(),
            "ferry serve (pid {}) exited with {status} on SIGTERM; see {}",
            child.id(),
            self.log.display()
        );
        Ok(())
    }
}

impl Drop for Daemon {
    /// On a failure midway: stop the daemon and detach whatever it left mounted, so no loop device leaks.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = terminate(&mut child, Duration::from_secs(10));
        }
        unmount_under(&self.dir);
    }
}

fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the command name: utime and stime are fields 12 and 13 (proc(5)).
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    ensure!(f.len() == 2, "cannot read the CPU time of pid {pid}");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((f[0] + f[1]) / hz)
}

/// What Ferry logged for one push or pull.
#[derive(Clone, Copy)]
struct Logged {
    blocks: u64,
    seconds: f64,
}

/// One push or pull as measured.
#[derive(Clone, Copy)]
struct Transfer {
    logged: Logged,
    /// The whole Unmount or Mount call.
    wall: f64,
    /// Daemon CPU seconds during the call.
    cpu: f64,
    /// CPU seconds of the EBS peer during the call: the emulator (this process) or moto.
    peer_cpu: f64,
}

impl Transfer {
    fn mib(&self) -> f64 {
        (self.logged.blocks * BLOCK) as f64 / MIB
    }
    fn rate(&self) -> f64 {
        self.mib() / self.logged.seconds
    }
    fn wall_rate(&self) -> f64 {
        self.mib() / self.wall
    }
    /// Cores kept busy by the daemon and the peer together over the whole call.
    fn busy(&self) -> f64 {
        (self.cpu + self.peer_cpu) / self.wall
    }
}

/// Times one Unmount (a push) or Mount (a pull) and reads Ferry's log line for it. `peer` is the process
/// serving the EBS APIs, whose CPU time is taken too.
fn timed<T>(
    d: &Daemon,
    peer: u32,
    message: &str,
    call: impl FnOnce() -> Result<T>,
) -> Result<(T, Transfer)> {
    let peer_cpu = || cpu_seconds(peer).unwrap_or(f64::NAN);
    let (from, cpu0, peer0) = (d.log_len(), d.cpu(), peer_cpu());
    let t = Instant::now();
    let out = call()?;
    let wall = t.elapsed().as_secs_f64();
    let (cpu, peer_cpu) = (d.cpu() - cpu0, peer_cpu() - peer0);
    let logged = d.logged(from, message)?;
    Ok((
        out,
        Transfer {
            logged,
            wall,
            cpu,
            peer_cpu,
        },
    ))
}

// ------------------------------------------------------------------------------------------------------
// Data: incompressible, reproducible from a seed, so the pulled copy is checked without keeping a copy.

fn write_data(path: &Path, seed: u64, bytes: u64) -> Result<()> {
    let mut f =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let (mut p, mut buf) = (Pattern::new(seed), vec![0u8; CHUNK]);
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        p.fill(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_all()
        .with_context(|| format!("cannot sync {}", path.display()))
}

/// A volume size that holds `data_mib` of file data with room for ext4's own blocks.
fn volume_mib(data_mib: u64) -> u64 {
    data_mib + data_mib / 4 + 64
}

// ------------------------------------------------------------------------------------------------------
// Statistics and result rows.

fn range(v: &[f64], digits: usize) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{lo:.digits$}–{hi:.digits$}")
}

/// One line of the results: Ferry's figure, what it is compared with, the ratio, and the target if any.
fn row(
    what: String,
    ferry: String,
    reference: String,
    ratio: f64,
    target: Option<(String, bool)>,
) -> Value {
    json!({
        "what": what, "ferry": ferry, "reference": reference, "ratio": ratio,
        "target": target.as_ref().map(|t| t.0.clone()), "pass": target.map(|t| t.1),
    })
}

// ------------------------------------------------------------------------------------------------------
// Against the strict emulator.

fn runtime() -> Result<tokio::runtime::Runtime> {
    // Two workers: the emulator must keep serving while the main thread blocks on protocol calls.
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn strict(args: StrictArgs) -> Result<()> {
    let rt = runtime()?;
    let common = &args.common;
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut runs = Vec::new();
    let mut warnings = 0;
    // The emulator runs on this process's runtime, so its CPU time is this process's.
    let me = std::process::id();
    let mut configs: Vec<(u64, usize)> = args
        .concurrency
        .iter()
        .map(|c| (args.latency_ms, *c))
        .collect();
    if args.unlimited_concurrency > 0 {
        configs.push((0, args.unlimited_concurrency));
    }
    for (latency_ms, c) in configs {
        // A fresh emulator per run: it keeps every block in memory until it is dropped.
        let ebs = rt.block_on(StrictEbs::start(PAGE));
        ebs.faults().latency_ms.store(latency_ms, Ordering::Relaxed);
        let label = format!("strict-c{c}-{latency_ms}ms");
        let a = Daemon::start(common, &format!("{label}-a"), &ebs.endpoint(), Some(c))?;
        let b = Daemon::start(common, &format!("{label}-b"), &ebs.endpoint(), Some(c))?;
        let data_mib = c as u64 * args.mib_per_stream;
        // With no latency there is no ideal: the run measures processing only, against the bare calls.
        let ideal = if latency_ms > 0 {
            c as f64 * (BLOCK as f64 / MIB) / (latency_ms as f64 / 1e3)
        } else {
            f64::INFINITY
        };
        let at = if latency_ms > 0 {
            format!("concurrency {c}")
        } else {
            format!("concurrency {c} with no latency")
        };
        // "21 MiB/s, 0.83 of ideal", or only the rate when there is no ideal.
        let rate = |mib_s: f64| {
            if latency_ms > 0 {
                format!("{mib_s:.0} MiB/s, {:.2} of ideal", mib_s / ideal)
            } else {
                format!("{mib_s:.0} MiB/s")
            }
        };
        println!(
            "== strict emulator, {latency_ms} ms per call, concurrency {c}: {data_mib} MiB each way{}",
            if latency_ms > 0 {
                format!(", ideal {ideal:.0} MiB/s")
            } else {
                String::new()
            }
        );
        let (mut push, mut pull) = (Vec::new(), Vec::new());
        let (mut bare_push_rates, mut bare_pull_rates) = (Vec::new(), Vec::new());
        let client = rt.block_on(sdk_client(&ebs.endpoint()));
        for r in 0..common.repeats {
            let name = format!("{label}-r{r}");
            let seed = 1000 * c as u64 + r as u64;
            a.create(&name, volume_mib(data_mib))?;
            let m = a.mount(&name, "writer")?;
            write_data(&m.join("data.bin"), seed, data_mib << 20)?;
            let calls = ebs.counters().calls.load(Ordering::Relaxed);
            let ((), up) = timed(&a, me, "shipped a snapshot", || a.unmount(&name, "writer"))?;
            let up_calls = ebs.counters().calls.load(Ordering::Relaxed) - calls;
            b.create(&name, volume_mib(data_mib))?;
            let calls = ebs.counters().calls.load(Ordering::Relaxed);
            let (mb, down) = timed(&b, me, "pulled the newest snapshot", || {
                b.mount(&name, "reader")
            })?;
            let down_calls = ebs.counters().calls.load(Ordering::Relaxed) - calls;
            verify_data(&mb.join("data.bin"), seed, data_mib << 20)?;
            println!(
                "   run {}: push {} blocks, {:.2} s logged ({}), Unmount {:.2} s, {} calls; \
                 pull {} blocks, {:.2} s logged ({}), Mount {:.2} s, {} calls",
                r + 1,
                up.logged.blocks,
                up.logged.seconds,
                rate(up.rate()),
                up.wall,
                up_calls,
                down.logged.blocks,
                down.logged.seconds,
                rate(down.rate()),
                down.wall,
                down_calls
            );
            push.push(up);
            pull.push(down);
            b.unmount(&name, "reader")?;
            b.remove(&name)?;
            // The reference right after Ferry's run, with the same blocks from the image Ferry pushed.
            let blocks = read_nonzero_blocks(&a.image(&name))?;
            let size_gib = volume_mib(data_mib).div_ceil(1024) as i64;
            let (bp, bl) = rt.block_on(bare_concurrent(&client, blocks, size_gib, c))?;
            println!(
                "   bare SDK calls, {c} in flight, same blocks: push {}, pull {}",
                rate(bp),
                rate(bl)
            );
            runs.push(json!({ "concurrency": c, "latency_ms": latency_ms, "run": r + 1,
                "push": { "blocks": up.logged.blocks, "seconds": up.logged.seconds, "wall": up.wall,
                          "cpu": up.cpu, "emulator_cpu": up.peer_cpu, "calls": up_calls, "bare_mib_s": bp },
                "pull": { "blocks": down.logged.blocks, "seconds": down.logged.seconds, "wall": down.wall,
                          "cpu": down.cpu, "emulator_cpu": down.peer_cpu, "calls": down_calls, "bare_mib_s": bl } }));
            bare_push_rates.push(bp);
            bare_pull_rates.push(bl);
            a.remove(&name)?;
        }
        for (dir, list, call, bare) in [
            ("Push", &push, "Unmount", &bare_push_rates),
            ("Pull", &pull, "Mount", &bare_pull_rates),
        ] {
            let fr: Vec<f64> = list.iter().map(|t| t.rate() / ideal).collect();
            let wall_fr: Vec<f64> = list.iter().map(|t| t.wall_rate() / ideal).collect();
            let rates: Vec<f64> = list.iter().map(Transfer::rate).collect();
            let wall_rates: Vec<f64> = list.iter().map(Transfer::wall_rate).collect();
            let blocks = list[0].logged.blocks;
            let f = median(&fr);
            let wall_f = median(&wall_fr);
            let target = (c == 16).then(|| {
                (
                    format!("≥ {TARGET_WHOLE_AT_16:.2}"),
                    wall_f >= TARGET_WHOLE_AT_16,
                )
            });
            if latency_ms > 0 {
                rows.push(row(
                    format!("{dir} at {at}, transfer phase (Ferry's log), {blocks} blocks"),
                    format!("{:.0} MiB/s", median(&rates)),
                    format!("ideal {ideal:.0} MiB/s"),
                    f,
                    None,
                ));
                rows.push(row(
                    format!("{dir} at {at}, whole {call} call (wall)"),
                    format!("{:.0} MiB/s", median(&wall_rates)),
                    format!("ideal {ideal:.0} MiB/s"),
                    wall_f,
                    target,
                ));
            }
            let ratios: Vec<f64> = rates.iter().zip(bare.iter()).map(|(f, b)| f / b).collect();
            let wall_ratios: Vec<f64> = wall_rates
                .iter()
                .zip(bare.iter())
                .map(|(f, b)| f / b)
                .collect();
            let bare_text = if latency_ms > 0 {
                format!(
                    "bare {:.0} MiB/s = {:.2} of ideal",
                    median(bare),
                    median(bare) / ideal
                )
            } else {
                format!("bare {:.0} MiB/s", median(bare))
            };
            rows.push(row(
                format!("{dir} at {at}, transfer phase against bare SDK calls with {c} in flight (same emulator, no Ferry)"),
                format!("{:.0} MiB/s", median(&rates)),
                bare_text.clone(),
                median(&ratios),
                None,
            ));
            let bare_target = (latency_ms == 0 && dir == "Pull").then(|| {
                (
                    format!("≥ {TARGET_PULL_BARE:.2}"),
                    median(&wall_ratios) >= TARGET_PULL_BARE,
                )
            });
            rows.push(row(
                format!(
                    "{dir} at {at}, whole {call} call against bare SDK calls with {c} in flight"
                ),
                format!("{:.0} MiB/s", median(&wall_rates)),
                bare_text,
                median(&wall_ratios),
                bare_target,
            ));
            let cpu: Vec<f64> = list.iter().map(|t| t.cpu / (t.mib() / 1024.0)).collect();
            if dir == "Pull" && c == 16 {
                let per_gib = median(&cpu);
                rows.push(row(
                    format!("Pull at {at}: daemon CPU seconds per GiB over the whole Mount call"),
                    format!("{per_gib:.2} s/GiB"),
                    "user + system CPU of ferry serve / GiB".to_string(),
                    per_gib,
                    Some((
                        format!("< {TARGET_PULL_CPU_GIB:.1} s/GiB"),
                        per_gib < TARGET_PULL_CPU_GIB,
                    )),
                ));
            }
            let peer: Vec<f64> = list
                .iter()
                .map(|t| t.peer_cpu / (t.mib() / 1024.0))
                .collect();
            let fractions = if latency_ms > 0 {
                format!(
                    "fraction of ideal {} (transfer phase), {} (whole {call}); ",
                    range(&fr, 2),
                    range(&wall_fr, 2)
                )
            } else {
                String::new()
            };
            notes.push(format!(
                "{dir} at {at}: {fractions}transfer phase {} s, whole {call} {} s; CPU per GiB moved: daemon {} s, \
                 emulator {} s; cores busy during the {call} (daemon + emulator) {}",
                range(&list.iter().map(|t| t.logged.seconds).collect::<Vec<_>>(), 2),
                range(&list.iter().map(|t| t.wall).collect::<Vec<_>>(), 2),
                range(&cpu, 2),
                range(&peer, 2),
                range(&list.iter().map(Transfer::busy).collect::<Vec<_>>(), 2)
            ));
        }
        warnings += a.warnings() + b.warnings();
        a.stop()?;
        b.stop()?;
        drop(ebs);
    }

    let (inc_rows, inc_notes, inc_run) = incremental(&rt, &args)?;
    rows.extend(inc_rows);
    notes.extend(inc_notes);
    warnings += inc_run["warnings"].as_u64().unwrap_or(0) as usize;
    let doc = json!({
        "part": "strict",
        "about": format!("Strict EBS emulator in the driver's process, every call answered {} ms after it arrived (its own work \
                          included), listing pages of {PAGE} blocks; \
                          ideal = concurrency x 512 KiB / latency; {} MiB written per block in flight (so {} MiB at \
                          concurrency 16); medians of {} runs; the runs \"with no latency\" measure processing alone",
                         args.latency_ms, args.mib_per_stream, 16 * args.mib_per_stream, common.repeats),
        "rows": rows, "notes": notes, "runs": runs, "incremental": inc_run, "warnings": warnings,
    });
    save(&common.out, &doc)
}

/// Ships a volume, rewrites 1 MiB of a file in place, and ships again: what the second push sends is
/// compared with the 512 KiB blocks that differ between the two images, found independently.
fn incremental(
    rt: &tokio::runtime::Runtime,
    args: &StrictArgs,
) -> Result<(Vec<Value>, Vec<String>, Value)> {
    let common = &args.common;
    let ebs = rt.block_on(StrictEbs::start(PAGE));
    ebs.faults()
        .latency_ms
        .store(args.latency_ms, Ordering::Relaxed);
    let d = Daemon::start(common, "strict-incremental", &ebs.endpoint(), Some(16))?;
    // Room for the rewritten MiB to move by up to one block to meet the image's block boundaries.
    let file_mib = args.incremental_file_mib.max(4);
    println!(
        "== incremental: a {file_mib} MiB file, then 1 MiB of it rewritten in place (strict emulator, concurrency 16)"
    );
    let name = "incremental";
    d.create(name, volume_mib(file_mib))?;
    let m = d.mount(name, "w1")?;
    write_data(&m.join("file.bin"), 7, file_mib << 20)?;
    d.unmount(name, "w1")?;
    let before = common.work.join("incremental-before.img");
    std::fs::copy(d.image(name), &before)?;

    let m = d.mount(name, "w2")?;
    let mut new = vec![0u8; CHANGE as usize];
    Pattern::new(8).fill(&mut new);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.join("file.bin"))?;
    let (offset, aligned) = aligned_offset(&f, &before, (file_mib / 2) << 20)?;
    f.write_all_at(&new, offset)?;
    f.sync_all()?;
    drop(f);
    let put0 = ebs.counters().blocks_put.load(Ordering::Relaxed);
    let ((), up) = timed(&d, std::process::id(), "shipped a snapshot", || {
        d.unmount(name, "w2")
    })?;
    let put = ebs.counters().blocks_put.load(Ordering::Relaxed) - put0;
    let snapshot = d.status(name)?["snapshot"]
        .as_str()
        .ok_or_else(|| anyhow!("Get of {name} shows no snapshot after the push"))?
        .to_string();
    let after = common.work.join("incremental-after.img");
    std::fs::copy(d.image(name), &after)?;

    let diff = differing_blocks(&before, &after, &new)?;
    let differ = diff.blocks;
    let own = ebs.own_blocks(&snapshot);
    ensure!(
        put == up.logged.blocks,
        "Ferry logged {} blocks shipped, the emulator counted {put}",
        up.logged.blocks
    );
    let shipped = up.logged.blocks * BLOCK;
    let changed = differ.len() as u64 * BLOCK;
    // Exactly the differing blocks: the same count and the same indices.
    let exact = own == differ;
    let ratio = shipped as f64 / changed as f64;
    let data_blocks = diff.data_pieces.iter().filter(|n| **n > 0).count();
    let page_bytes: u64 = diff.data_pieces.iter().map(|n| n * FS_BLOCK as u64).sum();
    println!(
        "   shipped {} blocks ({:.1} MiB) in {:.2} s (Unmount {:.2} s); {} blocks differ between the images: {:?}; \
         {data_blocks} of them hold the new data ({} KiB found), the rest are ext4 metadata and journal",
        up.logged.blocks,
        shipped as f64 / MIB,
        up.logged.seconds,
        up.wall,
        differ.len(),
        differ,
        page_bytes / 1024
    );
    ensure!(
        page_bytes == CHANGE,
        "only {page_bytes} bytes of the rewritten MiB were found in the new image"
    );
    let rows = vec![
        row(
            "Incremental push: bytes shipped / bytes of the 512 KiB blocks that differ between the images"
                .into(),
            format!("{} blocks, {:.1} MiB", up.logged.blocks, shipped as f64 / MIB),
            format!("{} blocks differ, {:.1} MiB", differ.len(), changed as f64 / MIB),
            ratio,
            Some(("= 1.00, the same blocks".into(), exact && ratio == 1.0)),
        ),
        row(
            "Incremental push: bytes shipped / 1 MiB of file data rewritten".into(),
            format!("{:.1} MiB", shipped as f64 / MIB),
            "1.0 MiB".into(),
            shipped as f64 / CHANGE as f64,
            None,
        ),
    ];
    let notes = vec![format!(
        "Incremental: 1 MiB rewritten in place at byte {offset} of a {file_mib} MiB file ({}); the second push \
         shipped blocks {own:?}, the images differ in blocks {differ:?}; {data_blocks} of those blocks hold the \
         new 1 MiB, the other {} are ext4 metadata and journal blocks",
        if aligned {
            "where its data starts a 512 KiB block of the image"
        } else {
            "its data in the image could not be aligned to 512 KiB blocks"
        },
        differ.len() - data_blocks
    )];
    let run = json!({ "shipped_blocks": up.logged.blocks, "seconds": up.logged.seconds, "wall": up.wall,
                      "emulator_blocks_put": put, "differing": differ, "shipped": own,
                      "data_blocks": data_blocks, "warnings": d.warnings() });
    d.stop()?;
    drop(ebs);
    std::fs::remove_file(&before)?;
    std::fs::remove_file(&after)?;
    Ok((rows, notes, run))
}

/// An offset near `want` in the open file `f` whose data sits at the start of a 512 KiB block of `image`
/// (a copy of the image holding the file) and runs on contiguously for 1 MiB, so a 1 MiB rewrite there
/// changes exactly two blocks of data. ext4 places a file's data at 1 or 4 KiB granularity, so a 1 MiB
/// offset in the file is usually not on a block boundary of the image. Found by content: the file's bytes
/// are unique. Returns `want` unchanged, and false, if the data is not found contiguous.
fn aligned_offset(f: &std::fs::File, image: &Path, want: u64) -> Result<(u64, bool)> {
    let mut data = vec![0u8; (CHANGE + BLOCK) as usize];
    f.read_exact_at(&mut data, want)?;
    let img = std::fs::File::open(image)?;
    let mut block = vec![0u8; BLOCK as usize];
    let mut at = None;
    'scan: for i in 0..img.metadata()?.len() / BLOCK {
        img.read_exact_at(&mut block, i * BLOCK)?;
        for (j, piece) in block.chunks(FS_BLOCK).enumerate() {
            if piece == &data[..FS_BLOCK] {
                at = Some(i * BLOCK + (j * FS_BLOCK) as u64);
                break 'scan;
            }
        }
    }
    let Some(at) = at else {
        return Ok((want, false));
    };
    let shift = (BLOCK - at % BLOCK) % BLOCK;
    let mut there = vec![0u8; CHANGE as usize];
    img.read_exact_at(&mut there, at + shift)?;
    if there[..] == data[shift as usize..(shift + CHANGE) as usize] {
        Ok((want + shift, true))
    } else {
        Ok((want, false))
    }
}

/// The smallest ext4 block size: mke2fs gives filesystems under 512 MiB 1 KiB blocks, so that is the
/// alignment at which the rewritten data can sit in the image.
const FS_BLOCK: usize = 1024;

/// How two images of one volume differ.
struct ImageDiff {
    /// The 512 KiB blocks whose contents differ, ascending.
    blocks: Vec<u64>,
    /// For each of them, how many of its 1 KiB pieces hold a piece of the rewritten data.
    data_pieces: Vec<u64>,
}

/// Compares two images of one size block by block, and finds the rewritten data `new` wherever ext4 put
/// it in the second.
fn differing_blocks(a: &Path, b: &Path, new: &[u8]) -> Result<ImageDiff> {
    let pages: std::collections::HashSet<&[u8]> = new.chunks(FS_BLOCK).collect();
    let (fa, fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let len = fa.metadata()?.len();
    ensure!(len == fb.metadata()?.len(), "the two images differ in size");
    let (mut ba, mut bb) = (vec![0u8; BLOCK as usize], vec![0u8; BLOCK as usize]);
    let (mut differ, mut data) = (Vec::new(), Vec::new());
    for i in 0..len / BLOCK {
        fa.read_exact_at(&mut ba, i * BLOCK)?;
        fb.read_exact_at(&mut bb, i * BLOCK)?;
        if ba != bb {
            differ.push(i);
            data.push(bb.chunks(FS_BLOCK).filter(|p| pages.contains(p)).count() as u64);
        }
    }
    Ok(ImageDiff {
        blocks: differ,
        data_pieces: data,
    })
}

// ------------------------------------------------------------------------------------------------------
// Against moto, with a bare loop of SDK calls as the baseline.

async fn sdk_client(endpoint: &str) -> aws_sdk_ebs::Client {
    let creds = aws_sdk_ebs::config::Credentials::new(
        "AKIDFERRYBENCH",
        "ferry-bench-dummy-secret",
        None,
        None,
        "ferry-bench",
    );
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(creds)
        .load()
        .await;
    aws_sdk_ebs::Client::new(&shared)
}

/// The baseline's timings: the same window as Ferry's log line, and the whole loop.
struct Bare {
    blocks: u64,
    /// Push: after StartSnapshot until CompleteSnapshot answered. Pull: ListSnapshotBlocks to the last block.
    seconds: f64,
    /// Push: StartSnapshot included.
    whole: f64,
    /// moto's CPU seconds over the whole loop.
    peer_cpu: f64,
}

/// StartSnapshot, one PutSnapshotBlock per block read from `image` in a plain sequential loop (with the
/// SHA-256 checksum every client must send), CompleteSnapshot.
async fn bare_push(
    client: &aws_sdk_ebs::Client,
    image: &Path,
    indices: &[u64],
    size_gib: i64,
    moto: u32,
) -> Result<(String, Bare)> {
    let file = std::fs::File::open(image)?;
    let cpu0 = cpu_seconds(moto)?;
    let t_whole = Instant::now();
    let out = client
        .start_snapshot()
        .volume_size(size_gib)
        .description("ferry bench: bare loop")
        .send()
        .await
        .context("StartSnapshot")?;
    let id = out
        .snapshot_id()
        .ok_or_else(|| anyhow!("StartSnapshot answered no id"))?
        .to_string();
    let t = Instant::now();
    for &i in indices {
        let mut buf = vec![0u8; BLOCK as usize];
        file.read_exact_at(&mut buf, i * BLOCK)?;
        let sum = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&buf));
        client
            .put_snapshot_block()
            .snapshot_id(&id)
            .block_index(i32::try_from(i)?)
            .data_length(BLOCK as i32)
            .checksum(sum)
            .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
            .block_data(ByteStream::from(Bytes::from(buf)))
            .send()
            .await
            .context("PutSnapshotBlock")?;
    }
    client
        .complete_snapshot()
        .snapshot_id(&id)
        .changed_blocks_count(i32::try_from(indices.len())?)
        .send()
        .await
        .context("CompleteSnapshot")?;
    let bare = Bare {
        blocks: indices.len() as u64,
        seconds: t.elapsed().as_secs_f64(),
        whole: t_whole.elapsed().as_secs_f64(),
        peer_cpu: cpu_seconds(moto)? - cpu0,
    };
    Ok((id, bare))
}

/// ListSnapshotBlocks (every page), then one GetSnapshotBlock per block in a plain sequential loop, each
/// body read whole.
async fn bare_pull(client: &aws_sdk_ebs::Client, id: &str, moto: u32) -> Result<Bare> {
    let cpu0 = cpu_seconds(moto)?;
    let t = Instant::now();
    let mut blocks = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let page = client
            .list_snapshot_blocks()
            .snapshot_id(id)
            .set_next_token(next.take())
            .send()
            .await
            .context("ListSnapshotBlocks")?;
        for b in page.blocks() {
            if let (Some(i), Some(t)) = (b.block_index(), b.block_token()) {
                blocks.push((i, t.to_string()));
            }
        }
        match page.next_token() {
            Some(t) if !t.is_empty() && !page.blocks().is_empty() => next = Some(t.to_string()),
            _ => break,
        }
    }
    for (i, token) in &blocks {
        let out = client
            .get_snapshot_block()
            .snapshot_id(id)
            .block_index(*i)
            .block_token(token)
            .send()
            .await
            .context("GetSnapshotBlock")?;
        let data = out.block_data.collect().await?.into_bytes();
        ensure!(
            data.len() as u64 == BLOCK,
            "block {i} came back {} bytes long",
            data.len()
        );
    }
    let seconds = t.elapsed().as_secs_f64();
    Ok(Bare {
        blocks: blocks.len() as u64,
        seconds,
        whole: seconds,
        peer_cpu: cpu_seconds(moto)? - cpu0,
    })
}

/// The same blocks moved by bare SDK calls with `c` in flight, without Ferry: what this machine and the
/// emulator allow. Returns push and pull MiB/s, each timed as Ferry's log times its transfers (push: after
/// StartSnapshot to CompleteSnapshot answered; pull: ListSnapshotBlocks to the last block).
async fn bare_concurrent(
    client: &aws_sdk_ebs::Client,
    blocks: Vec<(u64, Bytes)>,
    size_gib: i64,
    c: usize,
) -> Result<(f64, f64)> {
    use std::sync::Arc;
    use tokio::sync::Semaphore;
    use tokio::task::JoinSet;
    let n = blocks.len() as u64;
    let mib = (n * BLOCK) as f64 / MIB;
    let out = client
        .start_snapshot()
        .volume_size(size_gib)
        .send()
        .await
        .context("StartSnapshot")?;
    let id = out
        .snapshot_id()
        .ok_or_else(|| anyhow!("StartSnapshot answered no id"))?
        .to_string();
    let sem = Arc::new(Semaphore::new(c));
    let t = Instant::now();
    let mut set = JoinSet::new();
    for (i, data) in blocks {
        let permit = sem.clone().acquire_owned().await?;
        let (client, id) = (client.clone(), id.clone());
        set.spawn(async move {
            let _permit = permit;
            let sum = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&data));
            client
                .put_snapshot_block()
                .snapshot_id(id)
                .block_index(i32::try_from(i)?)
                .data_length(BLOCK as i32)
                .checksum(sum)
                .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
                .block_data(ByteStream::from(data))
                .send()
                .await
                .context("PutSnapshotBlock")?;
            Ok::<_, anyhow::Error>(())
        });
        while let Some(done) = set.try_join_next() {
            done??;
        }
    }
    while let Some(done) = set.join_next().await {
        done??;
    }
    client
        .complete_snapshot()
        .snapshot_id(&id)
        .changed_blocks_count(i32::try_from(n)?)
        .send()
        .await
        .context("CompleteSnapshot")?;
    let push = mib / t.elapsed().as_secs_f64();

    let t = Instant::now();
    let mut listed = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let page = client
            .list_snapshot_blocks()
            .snapshot_id(&id)
            .set_next_token(next.take())
            .send()
            .await
            .context("ListSnapshotBlocks")?;
        for b in page.blocks() {
            if let (Some(i), Some(t)) = (b.block_index(), b.block_token()) {
                listed.push((i, t.to_string()));
            }
        }
        match page.next_token() {
            Some(t) if !t.is_empty() && !page.blocks().is_empty() => next = Some(t.to_string()),
            _ => break,
        }
    }
    ensure!(
        listed.len() as u64 == n,
        "listed {} blocks of {n}",
        listed.len()
    );
    for (i, token) in listed {
        let permit = sem.clone().acquire_owned().await?;
        let (client, id) = (client.clone(), id.clone());
        set.spawn(async move {
            let _permit = permit;
            let out = client
                .get_snapshot_block()
                .snapshot_id(id)
                .block_index(i)
                .block_token(token)
                .send()
                .await
                .context("GetSnapshotBlock")?;
            let data = out.block_data.collect().await?.into_bytes();
            ensure!(
                data.len() as u64 == BLOCK,
                "block {i} came back {} bytes long",
                data.len()
            );
            Ok(())
        });
        while let Some(done) = set.try_join_next() {
            done??;
        }
    }
    while let Some(done) = set.join_next().await {
        done??;
    }
    let pull = mib / t.elapsed().as_secs_f64();
    Ok((push, pull))
}

/// The non-zero blocks of an image with their data.
fn read_nonzero_blocks(image: &Path) -> Result<Vec<(u64, Bytes)>> {
    let f = std::fs::File::open(image)?;
    let mut out = Vec::new();
    for i in nonzero_blocks(image)? {
        let mut buf = vec![0u8; BLOCK as usize];
        f.read_exact_at(&mut buf, i * BLOCK)?;
        out.push((i, Bytes::from(buf)));
    }
    Ok(out)
}

/// The blocks of an image that hold anything but zeros: what a first push ships.
fn nonzero_blocks(image: &Path) -> Result<Vec<u64>> {
    let f = std::fs::File::open(image)?;
    let mut buf = vec![0u8; BLOCK as usize];
    let mut out = Vec::new();
    for i in 0..f.metadata()?.len() / BLOCK {
        f.read_exact_at(&mut buf, i * BLOCK)?;
        if buf.iter().any(|b| *b != 0) {
            out.push(i);
        }
    }
    Ok(out)
}

/// Empties moto (`POST /moto-api/reset`), so its memory does not grow over the run: moto keeps the
/// blocks of deleted snapshots.
fn moto_reset(endpoint: &str) -> Result<()> {
    let host = endpoint
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("moto's endpoint must be http://HOST:PORT, not {endpoint}"))?
        .trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(host)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "POST /moto-api/reset HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    ensure!(
        out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200"),
        "moto reset answered {out:?}"
    );
    Ok(())
}

/// One Ferry push and pull of `mib` MiB on volume `name`: written on `a`, pulled on `b`.
struct FerryRound<'a> {
    a: &'a Daemon,
    b: &'a Daemon,
    name: String,
    mib: u64,
    seed: u64,
    moto: u32,
}

impl FerryRound<'_> {
    fn push(&self) -> Result<Transfer> {
        self.a.create(&self.name, volume_mib(self.mib))?;
        let m = self.a.mount(&self.name, "writer")?;
        write_data(&m.join("data.bin"), self.seed, self.mib << 20)?;
        let ((), t) = timed(self.a, self.moto, "shipped a snapshot", || {
            self.a.unmount(&self.name, "writer")
        })?;
        Ok(t)
    }

    fn pull(&self) -> Result<Transfer> {
        self.b.create(&self.name, volume_mib(self.mib))?;
        let (m, t) = timed(self.b, self.moto, "pulled the newest snapshot", || {
            self.b.mount(&self.name, "reader")
        })?;
        verify_data(&m.join("data.bin"), self.seed, self.mib << 20)?;
        Ok(t)
    }

    fn finish(&self) -> Result<()> {
        self.b.unmount(&self.name, "reader")?;
        self.b.remove(&self.name)?;
        self.a.remove(&self.name)
    }
}

fn moto(args: MotoArgs) -> Result<()> {
    let rt = runtime()?;
    let common = &args.common;
    let client = rt.block_on(sdk_client(&args.endpoint));
    let a = Daemon::start(common, "moto-a", &args.endpoint, args.concurrency)?;
    let b = Daemon::start(common, "moto-b", &args.endpoint, args.concurrency)?;
    let concurrency = args
        .concurrency
        .map_or_else(|| "Ferry's default".to_string(), |c| c.to_string());
    println!(
        "== moto at {}: {} MiB each way, daemons at concurrency {concurrency}; Ferry alternated with a bare SDK loop",
        args.endpoint, args.mib
    );
    moto_reset(&args.endpoint)?;

    // Warm-up (untimed): the image it leaves is where the bare loop reads the same blocks Ferry ships.
    let warm = FerryRound {
        a: &a,
        b: &b,
        name: "moto-warmup".into(),
        mib: args.mib,
        seed: 99,
        moto: args.moto_pid,
    };
    let up = warm.push()?;
    let source = common.work.join("moto-source.img");
    std::fs::copy(a.image(&warm.name), &source)?;
    warm.pull()?;
    warm.finish()?;
    moto_reset(&args.endpoint)?;
    let indices = nonzero_blocks(&source)?;
    let size_gib = volume_mib(args.mib).div_ceil(1024) as i64;
    println!(
        "   warm-up: Ferry shipped {} blocks; the bare loop moves the {} non-zero blocks of that image",
        up.logged.blocks,
        indices.len()
    );

    let mut runs = Vec::new();
    let (mut ratios_push, mut ratios_pull, mut whole_push, mut whole_pull) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut f_push, mut f_pull, mut b_push, mut b_pull) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut wf_push, mut wf_pull, mut wb_push, mut wb_pull) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // moto's CPU seconds per GiB moved: Ferry push, bare push, Ferry pull, bare pull.
    let mut moto_cpu: [Vec<f64>; 4] = Default::default();
    for r in 0..common.repeats {
        let round = FerryRound {
            a: &a,
            b: &b,
            name: format!("moto-r{r}"),
            mib: args.mib,
            seed: 99,
            moto: args.moto_pid,
        };
        // Each push is next to its baseline and each pull next to its baseline; who goes first alternates.
        let ferry_first = r % 2 == 0;
        let (fu, bu, id) = if ferry_first {
            let fu = round.push()?;
            let (id, bu) = rt.block_on(bare_push(
                &client,
                &source,
                &indices,
                size_gib,
                args.moto_pid,
            ))?;
            (fu, bu, id)
        } else {
            let (id, bu) = rt.block_on(bare_push(
                &client,
                &source,
                &indices,
                size_gib,
                args.moto_pid,
            ))?;
            (round.push()?, bu, id)
        };
        let (fd, bd) = if ferry_first {
            let fd = round.pull()?;
            (fd, rt.block_on(bare_pull(&client, &id, args.moto_pid))?)
        } else {
            let bd = rt.block_on(bare_pull(&client, &id, args.moto_pid))?;
            (round.pull()?, bd)
        };
        ensure!(
            bd.blocks == bu.blocks,
            "the bare loop pulled {} blocks of {}",
            bd.blocks,
            bu.blocks
        );
        round.finish()?;
        moto_reset(&args.endpoint)?;
        let mib = |blocks: u64, s: f64| (blocks * BLOCK) as f64 / MIB / s;
        let (pf, pb) = (fu.rate(), mib(bu.blocks, bu.seconds));
        let (lf, lb) = (fd.rate(), mib(bd.blocks, bd.seconds));
        println!(
            "   run {} ({} first): push Ferry {pf:.0} MiB/s ({} blocks, {:.2} s logged, Unmount {:.2} s), bare {pb:.0} MiB/s \
             ({} blocks, {:.2} s), ratio {:.2}; pull Ferry {lf:.0} MiB/s ({:.2} s logged, Mount {:.2} s), bare {lb:.0} MiB/s \
             ({:.2} s), ratio {:.2}",
            r + 1,
            if ferry_first { "Ferry" } else { "bare loop" },
            fu.logged.blocks,
            fu.logged.seconds,
            fu.wall,
            bu.blocks,
            bu.seconds,
            pf / pb,
            fd.logged.seconds,
            fd.wall,
            bd.seconds,
            lf / lb
        );
        ratios_push.push(pf / pb);
        ratios_pull.push(lf / lb);
        whole_push.push(fu.wall_rate() / mib(bu.blocks, bu.whole));
        whole_pull.push(fd.wall_rate() / mib(bd.blocks, bd.whole));
        f_push.push(pf);
        f_pull.push(lf);
        b_push.push(pb);
        b_pull.push(lb);
        wf_push.push(fu.wall_rate());
        wf_pull.push(fd.wall_rate());
        wb_push.push(mib(bu.blocks, bu.whole));
        wb_pull.push(mib(bd.blocks, bd.whole));
        let gib = |blocks: u64| (blocks * BLOCK) as f64 / MIB / 1024.0;
        moto_cpu[0].push(fu.peer_cpu / gib(fu.logged.blocks));
        moto_cpu[1].push(bu.peer_cpu / gib(bu.blocks));
        moto_cpu[2].push(fd.peer_cpu / gib(fd.logged.blocks));
        moto_cpu[3].push(bd.peer_cpu / gib(bd.blocks));
        runs.push(json!({ "run": r + 1, "ferry_first": ferry_first,
            "ferry_push": { "blocks": fu.logged.blocks, "seconds": fu.logged.seconds, "wall": fu.wall, "cpu": fu.cpu, "moto_cpu": fu.peer_cpu },
            "bare_push": { "blocks": bu.blocks, "seconds": bu.seconds, "whole": bu.whole, "moto_cpu": bu.peer_cpu },
            "ferry_pull": { "blocks": fd.logged.blocks, "seconds": fd.logged.seconds, "wall": fd.wall, "cpu": fd.cpu, "moto_cpu": fd.peer_cpu },
            "bare_pull": { "blocks": bd.blocks, "seconds": bd.seconds, "moto_cpu": bd.peer_cpu } }));
    }
    let target = |r: f64| Some((format!("≥ {TARGET_BARE_LOOP:.2}"), r >= TARGET_BARE_LOOP));
    let (rp, rl) = (median(&ratios_push), median(&ratios_pull));
    let rows = vec![
        row(
            format!("Push through moto, transfer phase (Ferry's log) against the bare loop from StartSnapshot answered to CompleteSnapshot answered, {} MiB", args.mib),
            format!("{:.0} MiB/s", median(&f_push)),
            format!("bare loop {:.0} MiB/s", median(&b_push)),
            rp,
            target(rp),
        ),
        row(
            "Pull through moto, transfer phase (Ferry's log) against the bare loop from ListSnapshotBlocks to the last block".into(),
            format!("{:.0} MiB/s", median(&f_pull)),
            format!("bare loop {:.0} MiB/s", median(&b_pull)),
            rl,
            target(rl),
        ),
        row(
            "Push through moto, whole Unmount call against the whole bare loop (StartSnapshot included)".into(),
            format!("{:.0} MiB/s", median(&wf_push)),
            format!("bare loop {:.0} MiB/s", median(&wb_push)),
            median(&whole_push),
            None,
        ),
        row(
            "Pull through moto, whole Mount call against the whole bare loop".into(),
            format!("{:.0} MiB/s", median(&wf_pull)),
            format!("bare loop {:.0} MiB/s", median(&wb_pull)),
            median(&whole_pull),
            None,
        ),
    ];
    let list = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let notes = vec![
        format!(
            "moto, ratio Ferry/bare loop per pair, transfer phase: push {}, pull {}; whole call: push {}, pull {}",
            list(&ratios_push),
            list(&ratios_pull),
            list(&whole_push),
            list(&whole_pull),
        ),
        format!(
            "moto's CPU seconds per GiB moved (medians): Ferry push {:.2}, bare push {:.2}, Ferry pull {:.2}, bare pull {:.2}",
            median(&moto_cpu[0]),
            median(&moto_cpu[1]),
            median(&moto_cpu[2]),
            median(&moto_cpu[3]),
        ),
    ];
    let warnings = a.warnings() + b.warnings();
    a.stop()?;
    b.stop()?;
    std::fs::remove_file(&source)?;
    let doc = json!({
        "part": "moto",
        "about": format!("moto {} at {}, daemons at concurrency {concurrency}, {} MiB each way; {} pairs, Ferry and the \
                          bare loop alternating which goes first; ratios are medians of the per-pair ratios",
                         args.moto_version, args.endpoint, args.mib, common.repeats),
        "rows": rows, "notes": notes, "runs": runs, "warnings": warnings,
    });
    save(&common.out, &doc)
}

// ------------------------------------------------------------------------------------------------------
// The report.

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
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let warnings: u64 = docs
        .iter()
        .map(|d| d["warnings"].as_u64().unwrap_or(0))
        .sum();

    println!("== Results (transfer phase = Ferry's own log line; whole call = the protocol call's wall time)");
    for r in &rows {
        let mark = r["pass"].as_bool().map_or("    ", verdict);
        let mut figure = format!("{:.3}", r["ratio"].as_f64().unwrap_or(f64::NAN));
        if !s(&r["ferry"]).is_empty() {
            figure = format!(
                "{figure} (Ferry {}; {})",
                s(&r["ferry"]),
                s(&r["reference"])
            );
        }
        let target = r["target"]
            .as_str()
            .map_or(String::new(), |t| format!(" [target {t}]"));
        println!("{mark}  {}: {figure}{target}", s(&r["what"]));
    }
    for d in &docs {
        for n in d["notes"].as_array().into_iter().flatten() {
            println!("      {}", s(n));
        }
    }
    let missed = rows.iter().filter(|r| r["pass"] == false).count();
    println!("== {missed} target(s) missed (a benchmark: this is reported, not failed)");
    println!("== warning or error lines in the daemons' logs: {warnings}");

    if let Some(path) = &args.markdown {
        let mut md = String::new();
        writeln!(md, "## EBS: push and pull through the EBS direct APIs\n")?;
        let now = humantime::format_rfc3339_seconds(SystemTime::now());
        writeln!(
            md,
            "Measured by `scripts/bench-ebs` on {now}; {} CPU cores, kernel {}.",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
        )?;
        for a in &args.about {
            writeln!(md, "{a}")?;
        }
        for d in &docs {
            writeln!(md, "{}.", s(&d["about"]))?;
        }
        writeln!(md)?;
        writeln!(
            md,
            "| Measurement | Ferry | Reference | Ratio | Target | Result |"
        )?;
        writeln!(md, "|---|---:|---:|---:|---|---|")?;
        for r in &rows {
            writeln!(
                md,
                "| {} | {} | {} | {:.2} | {} | {} |",
                s(&r["what"]),
                s(&r["ferry"]),
                s(&r["reference"]),
                r["ratio"].as_f64().unwrap_or(f64::NAN),
                s(&r["target"]),
                r["pass"].as_bool().map_or("", verdict)
            )?;
        }
        writeln!(md)?;
        for d in &docs {
            for n in d["notes"].as_array().into_iter().flatten() {
                writeln!(md, "- {}.", s(n))?;
            }
        }
        writeln!(
            md,
            "- Warning or error lines in the daemons' logs: {warnings}."
        )?;
        std::fs::write(path, md).with_context(|| format!("cannot write {}", path.display()))?;
        println!("Markdown written to {}", path.display());
    }
    Ok(())
}

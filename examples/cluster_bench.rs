//! The driver behind `scripts/bench-cluster`. It is a benchmark, not a test: it measures and reports, and
//! fails only when something breaks (a refused call, a dead daemon, data that does not come back whole, a
//! catalog that does not agree across hosts).
//!
//! Every "host" is the release `ferry serve` as a process of its own, with its own socket, state directory
//! and configuration, driven over its socket with Docker's volume protocol. Hosts in cluster mode share a
//! real three-member etcd (`scripts/etcd-cluster`); ebs volumes go through moto (`scripts/moto-server`).
//!
//! - `follow`: an ebs volume written on host A, shipped once as a base and pulled once by host B; then A
//!   rewrites a tenth of it and the time from the start of A's Unmount until B's Mount returns is taken.
//! - `failover`: A mounts and writes, checkpoints, and is killed with SIGKILL; B retries Mount every 100 ms
//!   while A's claim is alive; the time from the kill until B's Mount returns.
//! - `get`: Get latency at 32 clients, a daemon in cluster mode against one without, turn about, through the
//!   `get` load generator of examples/bench.rs (`--repeats` runs of each).
//! - `storm`: three hosts create the same names at once, each in its own order.
//! - `report`: prints every figure against its target as PASS/MISS and optionally writes Markdown.

#[path = "support/mod.rs"]
mod support;
use support::{
    median, plugin_call, save, start_serve, terminate, unmount_under, verdict, verify_data,
    Pattern, ServeDir, CHUNK,
};

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

/// Targets from the issue.
const TARGET_FOLLOW_S: f64 = 5.0;
/// Failover may take the lease TTL plus this.
const TARGET_FAILOVER_MARGIN_S: f64 = 5.0;
const TARGET_GET_P99_RATIO: f64 = 1.2;
/// How often B asks again while A's claim is alive, as the issue describes a retrying client.
const RETRY: Duration = Duration::from_millis(100);
/// The refusal while another host's claim is alive (ClusterError::OwnedElsewhere).
const OWNED_ELSEWHERE: &str = "is mounted on host";
/// The refusal while another host is in the middle of changing the volume (ClusterError::Busy).
const BUSY: &str = "try again in a moment";

#[derive(Parser)]
#[command(about = "Ferry's cluster-mode benchmark driver (run through scripts/bench-cluster)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Time for an ebs volume to follow from one host to another.
    Follow(EbsArgs),
    /// Time for another host to take an ebs volume over after its owner is killed.
    Failover(EbsArgs),
    /// Get latency at 32 clients, cluster mode against the embedded catalog.
    Get(GetArgs),
    /// Three hosts creating the same names at once.
    Storm(StormArgs),
    /// Prints the results against their targets and optionally writes Markdown.
    Report(ReportArgs),
}

#[derive(clap::Args)]
struct Common {
    /// The `ferry` binary to run as the daemons.
    #[arg(long)]
    ferry: PathBuf,
    /// A directory for the daemons' state, sockets and logs.
    #[arg(long)]
    work: PathBuf,
    /// Every daemon's PID is appended here, so the script can stop them if this program dies.
    #[arg(long)]
    pids: PathBuf,
    /// Where to write the results (JSON).
    #[arg(long)]
    out: PathBuf,
    /// etcd's client URLs, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    etcd: Vec<String>,
    /// The key prefix in etcd; one per part, so no part sees another's volumes.
    #[arg(long)]
    prefix: String,
    /// Timed repetitions of each measurement.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

#[derive(clap::Args)]
struct EbsArgs {
    #[command(flatten)]
    common: Common,
    /// moto's endpoint, such as http://127.0.0.1:12356.
    #[arg(long)]
    endpoint: String,
    /// The volume's size.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// MiB of the base generation (follow), in files of `change_mib` each.
    #[arg(long, default_value_t = 600)]
    base_mib: u64,
    /// MiB rewritten (follow) or written (failover) before the timed part.
    #[arg(long, default_value_t = 100)]
    change_mib: u64,
    /// `[cluster] lease_ttl` in seconds; Ferry's default (10) when not given.
    #[arg(long)]
    lease_ttl: Option<u64>,
}

#[derive(clap::Args)]
struct GetArgs {
    #[command(flatten)]
    common: Common,
    /// The load generator: the `bench` example, whose `get` command does the timing.
    #[arg(long)]
    load: PathBuf,
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Seconds per run.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Volumes in each catalog, all of which the clients Get in turn.
    #[arg(long, default_value_t = 64)]
    volumes: usize,
}

#[derive(clap::Args)]
struct StormArgs {
    #[command(flatten)]
    common: Common,
    /// Names every host creates.
    #[arg(long, default_value_t = 200)]
    names: usize,
    /// Connections per host, each taking the host's next name as soon as its last Create is answered.
    #[arg(long, default_value_t = 4)]
    clients: usize,
}

#[derive(clap::Args)]
struct ReportArgs {
    /// Result files written by the other commands.
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
    match Cli::parse().command {
        Cmd::Follow(args) => follow(args),
        Cmd::Failover(args) => failover(args),
        Cmd::Get(args) => get(args),
        Cmd::Storm(args) => storm(args),
        Cmd::Report(args) => report(args),
    }
}

// ------------------------------------------------------------------------------------------------------
// Daemons.

/// What goes into one daemon's configuration file.
struct Config<'a> {
    /// etcd, node and prefix; `None` runs on the embedded catalog alone.
    cluster: Option<(&'a Common, String)>,
    lease_ttl: Option<u64>,
    /// moto's endpoint for an `[ebs]` section.
    ebs: Option<&'a str>,
}

impl Config<'_> {
    fn toml(&self) -> String {
        let mut t = String::new();
        if let Some(endpoint) = self.ebs {
            let _ = writeln!(
                t,
                // moto's snapshots hold only their own blocks.
                "[ebs]\nregion = \"us-east-1\"\nendpoint_url = \"{endpoint}\"\nkeep_chain = true"
            );
        }
        if let Some((common, node)) = &self.cluster {
            let etcd: Vec<String> = common.etcd.iter().map(|e| format!("\"{e}\"")).collect();
            let _ = writeln!(
                t,
                "[cluster]\netcd = [{}]\nnode = \"{node}\"\nprefix = \"{}\"",
                etcd.join(", "),
                common.prefix
            );
            if let Some(ttl) = self.lease_ttl {
                let _ = writeln!(t, "lease_ttl = \"{ttl}s\"");
            }
        }
        t
    }
}

/// One `ferry serve` with its own socket, state directory, configuration and log: one "host".
struct Daemon {
    child: Option<Child>,
    label: String,
    socket: PathBuf,
    state: PathBuf,
    log: PathBuf,
    dir: PathBuf,
}

impl Daemon {
    fn start(common: &Common, label: &str, config: &Config) -> Result<Daemon> {
        let at = ServeDir::new(common.work.join(label));
        let child = start_serve(
            &common.ferry,
            &at,
            &config.toml(),
            "info",
            &common.pids,
            label,
        )?;
        Ok(Daemon {
            child: Some(child),
            label: label.to_string(),
            socket: at.socket,
            state: at.state,
            log: at.log,
            dir: at.dir,
        })
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// One protocol call. The outer error is a broken exchange; the inner one is the plugin's `Err`.
    fn call(&self, endpoint: &str, body: &Value) -> Result<std::result::Result<Value, String>> {
        plugin_call(&self.socket, &self.label, endpoint, body)
    }

    /// A call that must succeed.
    fn ok(&self, endpoint: &str, body: &Value) -> Result<Value> {
        self.call(endpoint, body)?.map_err(|e| {
            anyhow!(
                "VolumeDriver.{endpoint} {body} on {} failed: {e}",
                self.label
            )
        })
    }

    fn create(&self, name: &str, opts: &Value) -> Result<()> {
        self.ok("Create", &json!({ "Name": name, "Opts": opts }))
            .map(drop)
    }

    fn try_mount(&self, name: &str, id: &str) -> Result<std::result::Result<PathBuf, String>> {
        Ok(self
            .call("Mount", &json!({ "Name": name, "ID": id }))?
            .map(|v| PathBuf::from(v["Mountpoint"].as_str().unwrap_or(""))))
    }

    fn mount(&self, name: &str, id: &str) -> Result<PathBuf> {
        self.try_mount(name, id)?
            .map_err(|e| anyhow!("Mount of {name} on {} failed: {e}", self.label))
    }

    fn unmount(&self, name: &str, id: &str) -> Result<()> {
        self.ok("Unmount", &json!({ "Name": name, "ID": id }))
            .map(drop)
    }

    fn list(&self) -> Result<BTreeSet<String>> {
        let v = self.ok("List", &json!({}))?;
        Ok(v["Volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["Name"].as_str().map(str::to_string))
            .collect())
    }

    fn log_len(&self) -> u64 {
        std::fs::metadata(&self.log).map_or(0, |m| m.len())
    }

    /// Ferry's own account of a transfer: the first line after `from` (a log offset) with `message`.
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

    /// The warning and error lines of the log.
    fn warnings(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .map(|l| format!("{}: {l}", self.label))
            .collect()
    }

    /// SIGKILL, as a host that dies; returns the moment the signal was sent. Its mounts stay until drop.
    fn kill9(&mut self) -> Result<Instant> {
        let mut child = self.child.take().context("the daemon is not running")?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)?;
        let at = Instant::now();
        child.wait()?;
        Ok(at)
    }

    /// SIGTERM and wait; a daemon that does not exit cleanly is a failure.
    fn stop(mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let status = terminate(&mut child, Duration::from_secs(20))?;
        ensure!(
            status.success(),
            "ferry serve ({}) exited with {status} on SIGTERM; see {}",
            self.label,
            self.log.display()
        );
        Ok(())
    }
}

impl Drop for Daemon {
    /// On a failure midway, or after a SIGKILL: no daemon left running, nothing left mounted.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = terminate(&mut child, Duration::from_secs(20));
        }
        unmount_under(&self.dir);
    }
}

/// What Ferry logged for one push or pull.
#[derive(Clone, Copy)]
struct Logged {
    blocks: u64,
    seconds: f64,
}

/// The ebs volume options of a volume of this size.
fn ebs_opts(size_mib: u64) -> Value {
    json!({ "backend": "ebs", "size": format!("{size_mib}MiB") })
}

fn cluster<'a>(args: &'a EbsArgs, node: &str) -> Config<'a> {
    Config {
        cluster: Some((&args.common, node.to_string())),
        lease_ttl: args.lease_ttl,
        ebs: Some(&args.endpoint),
    }
}

// ------------------------------------------------------------------------------------------------------
// Data: incompressible, reproducible from a seed, so a pulled copy is checked without keeping a copy.

/// Writes `bytes` of the seed's data from the start of the file, over what is there: an existing file keeps
/// its blocks, so rewriting it changes the same blocks of the image rather than allocating new ones.
fn write_data(path: &Path, seed: u64, bytes: u64) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    f.rewind()?;
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

// ------------------------------------------------------------------------------------------------------
// Statistics and result rows.

fn list(v: &[f64], digits: usize) -> String {
    v.iter()
        .map(|x| format!("{x:.digits$}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One line of the results: the figure, and its target if any.
fn row(what: impl Into<String>, value: String, target: Option<(String, bool)>) -> Value {
    json!({
        "what": what.into(), "value": value,
        "target": target.as_ref().map(|t| t.0.clone()), "pass": target.map(|t| t.1),
    })
}

/// The warning lines of these daemons, for the notes: how many, and the first few.
fn warnings(daemons: &[&Daemon]) -> Vec<String> {
    daemons.iter().flat_map(|d| d.warnings()).collect()
}

// ------------------------------------------------------------------------------------------------------
// Follow.

fn follow(args: EbsArgs) -> Result<()> {
    let common = &args.common;
    ensure!(
        args.change_mib > 0 && args.base_mib >= args.change_mib,
        "the base must hold at least one file of --change-mib"
    );
    let a = Daemon::start(common, "follow-a", &cluster(&args, "bench-a"))?;
    let b = Daemon::start(common, "follow-b", &cluster(&args, "bench-b"))?;
    let name = "follow";
    let opts = ebs_opts(args.size_mib);
    let files = args.base_mib / args.change_mib;
    let change = args.change_mib << 20;
    let file = |f: u64| format!("data-{f}.bin");
    let seed = |f: u64, generation: usize| f * 1000 + generation as u64 + 1;
    println!(
        "== follow: a {} MiB ebs volume, base of {files} files of {} MiB; A rewrites one file, B follows",
        args.size_mib, args.change_mib
    );
    a.create(name, &opts)?;
    // Swarm creates the volume on every node; on B it only finds the cluster's definition.
    b.create(name, &opts)?;
    let m = a.mount(name, "a0")?;
    for f in 0..files {
        write_data(&m.join(file(f)), seed(f, 0), change)?;
    }
    let from = a.log_len();
    let t = Instant::now();
    a.unmount(name, "a0")?;
    let base_push = (
        t.elapsed().as_secs_f64(),
        a.logged(from, "shipped a snapshot")?,
    );
    let from = b.log_len();
    let t = Instant::now();
    let m = b.mount(name, "b0")?;
    let base_pull = (
        t.elapsed().as_secs_f64(),
        b.logged(from, "pulled the newest snapshot")?,
    );
    for f in 0..files {
        verify_data(&m.join(file(f)), seed(f, 0), change)?;
    }
    b.unmount(name, "b0")?;
    println!(
        "   base: A's Unmount {:.2} s ({} blocks shipped), B's Mount {:.2} s ({} blocks pulled)",
        base_push.0, base_push.1.blocks, base_pull.0, base_pull.1.blocks
    );

    let (mut total, mut unmount, mut mount) = (Vec::new(), Vec::new(), Vec::new());
    let (mut shipped, mut pulled, mut ship_s, mut pull_s) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut runs = Vec::new();
    for r in 1..=common.repeats {
        let m = a.mount(name, &format!("a{r}"))?;
        let f = (r as u64 - 1) % files;
        write_data(&m.join(file(f)), seed(f, r), change)?;
        let (fa, fb) = (a.log_len(), b.log_len());
        let t0 = Instant::now();
        a.unmount(name, &format!("a{r}"))?;
        let t1 = Instant::now();
        let m = b.mount(name, &format!("b{r}"))?;
        let t2 = Instant::now();
        let ship = a.logged(fa, "shipped a snapshot")?;
        let pull = b.logged(fb, "pulled the newest snapshot")?;
        verify_data(&m.join(file(f)), seed(f, r), change)?;
        b.unmount(name, &format!("b{r}"))?;
        let (u, mt) = ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64());
        println!(
            "   run {r}: {:.2} s = A's Unmount {u:.2} s ({} blocks shipped in {:.2} s) + B's Mount {mt:.2} s \
             ({} blocks pulled in {:.2} s)",
            u + mt,
            ship.blocks,
            ship.seconds,
            pull.blocks,
            pull.seconds
        );
        total.push(u + mt);
        unmount.push(u);
        mount.push(mt);
        shipped.push(ship.blocks as f64);
        pulled.push(pull.blocks as f64);
        ship_s.push(ship.seconds);
        pull_s.push(pull.seconds);
        runs.push(json!({ "run": r, "unmount": u, "mount": mt, "shipped_blocks": ship.blocks,
            "ship_seconds": ship.seconds, "pulled_blocks": pull.blocks, "pull_seconds": pull.seconds }));
    }
    let t = median(&total);
    let rows = vec![
        row(
            format!(
                "Follow: start of A's Unmount until B's Mount returns, {} MiB of {} MiB rewritten (median)",
                args.change_mib, args.size_mib
            ),
            format!("{t:.2} s"),
            Some((format!("< {TARGET_FOLLOW_S} s"), t < TARGET_FOLLOW_S)),
        ),
        row(
            "Follow, phase 1: A's Unmount (ships the change)",
            format!(
                "{:.2} s ({:.0} blocks, {:.2} s of it shipping)",
                median(&unmount),
                median(&shipped),
                median(&ship_s)
            ),
            None,
        ),
        row(
            "Follow, phase 2: B's Mount (pulls the newest generation)",
            format!(
                "{:.2} s ({:.0} blocks, {:.2} s of it pulling)",
                median(&mount),
                median(&pulled),
                median(&pull_s)
            ),
            None,
        ),
        // B holds the base, so the least it can move is what A shipped; more means it pulled what it had.
        row(
            "Follow: blocks B pulled / blocks A shipped (B already held the base)",
            format!("{:.2}", median(&pulled) / median(&shipped)),
            None,
        ),
    ];
    let mut notes = vec![
        format!(
            "Follow per run: total {} s; A's Unmount {} s; B's Mount {} s; blocks shipped {}, pulled {}",
            list(&total, 2),
            list(&unmount, 2),
            list(&mount, 2),
            list(&shipped, 0),
            list(&pulled, 0)
        ),
        format!(
            "Follow, untimed base: A's Unmount {:.2} s shipped {} blocks ({:.2} s logged); B's Mount {:.2} s \
             pulled {} blocks ({:.2} s logged)",
            base_push.0,
            base_push.1.blocks,
            base_push.1.seconds,
            base_pull.0,
            base_pull.1.blocks,
            base_pull.1.seconds
        ),
    ];
    let warned = warnings(&[&a, &b]);
    notes.extend(warned.iter().take(5).cloned());
    a.stop()?;
    b.stop()?;
    let doc = json!({
        "part": "follow",
        "about": format!("Follow: an ebs volume of {} MiB with a base of {} MiB in {files} files, then {} MiB \
                          (one file) rewritten in place per run; {} runs", args.size_mib,
                         files * args.change_mib, args.change_mib, common.repeats),
        "rows": rows, "notes": notes, "runs": runs, "warnings": warned.len(),
    });
    save(&common.out, &doc)
}

// ------------------------------------------------------------------------------------------------------
// Failover.

fn failover(args: EbsArgs) -> Result<()> {
    let common = &args.common;
    let ttl = args.lease_ttl.unwrap_or(10) as f64;
    let target = ttl + TARGET_FAILOVER_MARGIN_S;
    let b = Daemon::start(common, "failover-b", &cluster(&args, "bench-fb"))?;
    let opts = ebs_opts(args.size_mib);
    let change = args.change_mib << 20;
    println!(
        "== failover: A writes {} MiB, checkpoints, is killed with SIGKILL; B retries Mount every {} ms \
         (lease_ttl {ttl} s)",
        args.change_mib,
        RETRY.as_millis()
    );
    let (mut total, mut lapse, mut mount, mut pulled, mut checkpoints) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut runs, mut warned) = (Vec::new(), Vec::new());
    for r in 1..=common.repeats {
        let name = format!("failover-{r}");
        let mut a = Daemon::start(
            common,
            &format!("failover-a{r}"),
            &cluster(&args, &format!("bench-fa{r}")),
        )?;
        a.create(&name, &opts)?;
        let m = a.mount(&name, "a")?;
        write_data(&m.join("data.bin"), r as u64, change)?;
        let t = Instant::now();
        let out = Command::new(&common.ferry)
            .args(["checkpoint", &name, "--admin-socket"])
            .arg(a.state.join("admin.sock"))
            .stdin(Stdio::null())
            .output()?;
        ensure!(
            out.status.success(),
            "ferry checkpoint {name} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        checkpoints.push(t.elapsed().as_secs_f64());
        // Written after the checkpoint, so lost with the host: B must not see it.
        write_data(&m.join("after-checkpoint.bin"), 7, 1 << 20)?;
        let from = b.log_len();
        let killed = a.kill9()?;
        let (mut refused, mut busy) = (0usize, 0usize);
        let (mp, started) = loop {
            let started = Instant::now();
            match b.try_mount(&name, "b")? {
                Ok(mp) => break (mp, started),
                Err(e) if e.contains(OWNED_ELSEWHERE) || e.contains(BUSY) => {
                    if e.contains(BUSY) {
                        busy += 1;
                    } else {
                        refused += 1;
                    }
                    ensure!(
                        killed.elapsed() < Duration::from_secs(120),
                        "B's Mount of {name} still refused 120 s after A was killed: {e}"
                    );
                    std::thread::sleep(RETRY);
                }
                Err(e) => bail!("B's Mount of {name} failed: {e}"),
            }
        };
        let done = Instant::now();
        let pull = b.logged(from, "pulled the newest snapshot")?;
        verify_data(&mp.join("data.bin"), r as u64, change)?;
        ensure!(
            !mp.join("after-checkpoint.bin").exists(),
            "B sees a file A wrote after its last checkpoint"
        );
        b.unmount(&name, "b")?;
        warned.extend(a.warnings());
        // Detaches what the killed daemon left mounted.
        drop(a);
        let (tot, lap, mt) = (
            (done - killed).as_secs_f64(),
            (started - killed).as_secs_f64(),
            (done - started).as_secs_f64(),
        );
        println!(
            "   run {r}: {tot:.2} s = {lap:.2} s until B's Mount was let through ({refused} refusals, {busy} busy) \
             + {mt:.2} s for that Mount ({} blocks pulled in {:.2} s)",
            pull.blocks, pull.seconds
        );
        total.push(tot);
        lapse.push(lap);
        mount.push(mt);
        pulled.push(pull.blocks as f64);
        runs.push(json!({ "run": r, "total": tot, "until_let_through": lap, "mount": mt,
            "refusals": refused, "busy": busy, "pulled_blocks": pull.blocks, "pull_seconds": pull.seconds }));
    }
    let t = median(&total);
    let rows = vec![
        row(
            format!("Failover: kill -9 of A until B's Mount returns, lease_ttl {ttl} s (median)"),
            format!("{t:.2} s"),
            Some((format!("≤ lease_ttl + {TARGET_FAILOVER_MARGIN_S} s = {target} s"), t <= target)),
        ),
        row(
            "Failover, phase 1: kill until the Mount attempt that was let through (A's claim lapsing)",
            format!("{:.2} s", median(&lapse)),
            None,
        ),
        row(
            format!("Failover, phase 2: that Mount (pulls A's checkpoint, {} MiB written)", args.change_mib),
            format!("{:.2} s ({:.0} blocks)", median(&mount), median(&pulled)),
            None,
        ),
    ];
    let mut notes = vec![format!(
        "Failover per run: total {} s; until let through {} s; the Mount {} s; `ferry checkpoint` before the kill \
         took {} s",
        list(&total, 2),
        list(&lapse, 2),
        list(&mount, 2),
        list(&checkpoints, 2)
    )];
    warned.extend(b.warnings());
    notes.extend(warned.iter().take(5).cloned());
    b.stop()?;
    let doc = json!({
        "part": "failover",
        "about": format!("Failover: an ebs volume of {} MiB, {} MiB written and checkpointed, then the owner's \
                          daemon killed with SIGKILL; lease_ttl {ttl} s; {} runs, a fresh owner and volume each",
                         args.size_mib, args.change_mib, common.repeats),
        "rows": rows, "notes": notes, "runs": runs, "warnings": warned.len(),
    });
    save(&common.out, &doc)
}

// ------------------------------------------------------------------------------------------------------
// Get latency.

fn get(args: GetArgs) -> Result<()> {
    let common = &args.common;
    let embedded = Daemon::start(
        common,
        "get-embedded",
        &Config {
            cluster: None,
            lease_ttl: None,
            ebs: None,
        },
    )?;
    let clustered = Daemon::start(
        common,
        "get-cluster",
        &Config {
            cluster: Some((common, "bench-g".into())),
            lease_ttl: None,
            ebs: None,
        },
    )?;
    let names: Vec<String> = (0..args.volumes).map(|i| format!("get-{i:03}")).collect();
    for n in &names {
        embedded.create(n, &json!({}))?;
        clustered.create(n, &json!({}))?;
    }
    let want: BTreeSet<String> = names.iter().cloned().collect();
    for d in [&embedded, &clustered] {
        let got = d.list()?;
        ensure!(
            got == want,
            "{} lists {} volumes, not the {} created",
            d.label,
            got.len(),
            want.len()
        );
    }
    println!(
        "== Get at {} clients over {} volumes, {} s per run, the two daemons turn about",
        args.clients, args.volumes, args.seconds
    );
    let run = |d: &Daemon, tag: &str| -> Result<Value> {
        let out = common.work.join(format!("get-{tag}.json"));
        let status = Command::new(&args.load)
            .arg("get")
            .arg("--socket")
            .arg(&d.socket)
            .args(["--pid", &d.pid().to_string()])
            .args(["--volumes", &names.join(",")])
            .args(["--clients", &args.clients.to_string()])
            .args(["--seconds", &args.seconds.to_string()])
            .arg("--out")
            .arg(&out)
            .stdin(Stdio::null())
            .status()
            .with_context(|| format!("cannot run {}", args.load.display()))?;
        ensure!(
            status.success(),
            "the Get load generator failed on {}",
            d.label
        );
        Ok(serde_json::from_slice(&std::fs::read(&out)?)?)
    };
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let (mut e50, mut e99, mut c50, mut c99, mut ratios) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut erate, mut crate_, mut ecpu, mut ccpu) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut runs, mut ratios50) = (Vec::new(), Vec::new());
    for r in 1..=common.repeats {
        // Alternating who goes first keeps a drift in the machine's load from favouring one of them.
        let cluster_first = r % 2 == 0;
        println!(
            "   run {r} ({} first):",
            if cluster_first { "cluster" } else { "embedded" }
        );
        let (e, c) = if cluster_first {
            let c = run(&clustered, &format!("cluster-{r}"))?;
            (run(&embedded, &format!("embedded-{r}"))?, c)
        } else {
            let e = run(&embedded, &format!("embedded-{r}"))?;
            (e, run(&clustered, &format!("cluster-{r}"))?)
        };
        e50.push(f(&e, "p50_ms"));
        e99.push(f(&e, "p99_ms"));
        c50.push(f(&c, "p50_ms"));
        c99.push(f(&c, "p99_ms"));
        erate.push(f(&e, "rate"));
        crate_.push(f(&c, "rate"));
        ecpu.push(f(&e, "daemon_cpu_us"));
        ccpu.push(f(&c, "daemon_cpu_us"));
        ratios.push(f(&c, "p99_ms") / f(&e, "p99_ms"));
        ratios50.push(f(&c, "p50_ms") / f(&e, "p50_ms"));
        runs.push(json!({ "run": r, "cluster_first": cluster_first, "embedded": e, "cluster": c }));
    }
    let ratio = median(&ratios);
    let mut rows = vec![
        row(
            format!(
                "Get at {} clients, embedded catalog: p50 / p99 (medians)",
                args.clients
            ),
            format!("{:.3} / {:.3} ms", median(&e50), median(&e99)),
            None,
        ),
        row(
            format!(
                "Get at {} clients, cluster mode: p50 / p99 (medians)",
                args.clients
            ),
            format!("{:.3} / {:.3} ms", median(&c50), median(&c99)),
            None,
        ),
        row(
            "Get p99, cluster / embedded (median of the per-run ratios)",
            format!("{ratio:.2}"),
            Some((
                format!("≤ {TARGET_GET_P99_RATIO}"),
                ratio <= TARGET_GET_P99_RATIO,
            )),
        ),
    ];
    // The p99 of a 2-core machine shared with other work moves with that work; the p50 moves far less, so it
    // is shown beside the target as the steadier view of the same cost.
    rows.push(row(
        "Get p50, cluster / embedded (median of the per-run ratios)",
        format!("{:.2}", median(&ratios50)),
        None,
    ));
    let mut notes = vec![format!(
        "Get per run: embedded p99 {} ms, cluster p99 {} ms, ratios {}; throughput embedded {} /s, cluster {} /s; \
         daemon CPU per Get embedded {} µs, cluster {} µs",
        list(&e99, 3),
        list(&c99, 3),
        list(&ratios, 2),
        list(&erate, 0),
        list(&crate_, 0),
        list(&ecpu, 1),
        list(&ccpu, 1)
    )];
    let warned = warnings(&[&embedded, &clustered]);
    notes.extend(warned.iter().take(5).cloned());
    embedded.stop()?;
    clustered.stop()?;
    let doc = json!({
        "part": "get",
        "about": format!("Get: {} clients of the `get` load generator of examples/bench.rs (one keep-alive \
                          connection each, closed loop, one thread), {} local volumes in each catalog, {} s per run, \
                          {} runs per daemon alternating which goes first; percentiles nearest-rank",
                         args.clients, args.volumes, args.seconds, common.repeats),
        "rows": rows, "notes": notes, "runs": runs, "warnings": warned.len(),
    });
    save(&common.out, &doc)
}

// ------------------------------------------------------------------------------------------------------
// Create storm.

/// A fixed shuffle of 0..n (Fisher-Yates with xorshift), so reruns create in the same orders.
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

fn storm(args: StormArgs) -> Result<()> {
    let common = &args.common;
    let hosts: Vec<Daemon> = (1..=3)
        .map(|k| {
            Daemon::start(
                common,
                &format!("storm-{k}"),
                &Config {
                    cluster: Some((common, format!("bench-s{k}"))),
                    lease_ttl: None,
                    ebs: None,
                },
            )
        })
        .collect::<Result<_>>()?;
    let names: Vec<String> = (0..args.names).map(|i| format!("storm-{i:03}")).collect();
    // Forward, backward and shuffled: every name is created from two or three hosts close together.
    let forward: Vec<usize> = (0..args.names).collect();
    let orders = [
        forward.clone(),
        forward.iter().rev().copied().collect(),
        shuffled(args.names, 13),
    ];
    println!(
        "== create storm: 3 hosts create the same {} names at once, {} connections per host",
        args.names, args.clients
    );
    let barrier = Barrier::new(3 * args.clients + 1);
    let latencies = Mutex::new(Vec::new());
    let busy = AtomicUsize::new(0);
    let (start, ends) = std::thread::scope(|s| -> Result<(Instant, Vec<Instant>)> {
        let mut threads = Vec::new();
        for (d, order) in hosts.iter().zip(&orders) {
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..args.clients {
                let (next, barrier, latencies, busy, names) =
                    (next.clone(), &barrier, &latencies, &busy, &names);
                threads.push(s.spawn(move || -> Result<Instant> {
                    barrier.wait();
                    let mut mine = Vec::new();
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&i) = order.get(k) else { break };
                        let body = json!({ "Name": names[i], "Opts": {} });
                        let t = Instant::now();
                        loop {
                            match d.call("Create", &body)? {
                                Ok(_) => break,
                                Err(e) if e.contains(BUSY) => {
                                    busy.fetch_add(1, Ordering::Relaxed);
                                    std::thread::sleep(Duration::from_millis(10));
                                }
                                Err(e) => {
                                    bail!("Create of {} on {} failed: {e}", names[i], d.label)
                                }
                            }
                        }
                        mine.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                    latencies.lock().unwrap().extend(mine);
                    Ok(Instant::now())
                }));
            }
        }
        barrier.wait();
        let start = Instant::now();
        let mut ends = Vec::new();
        for t in threads {
            ends.push(t.join().map_err(|_| anyhow!("a storm client panicked"))??);
        }
        Ok((start, ends))
    })?;
    let end = ends.into_iter().max().context("no clients")?;
    let wall = (end - start).as_secs_f64();
    // The catalog on every host follows etcd through a watch: wait (a while) until all three agree.
    let want: BTreeSet<String> = names.iter().cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let lists = loop {
        let lists: Vec<BTreeSet<String>> = hosts.iter().map(Daemon::list).collect::<Result<_>>()?;
        if lists.iter().all(|l| *l == want) || Instant::now() > deadline {
            break lists;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let converged = end.elapsed().as_secs_f64();
    for (d, l) in hosts.iter().zip(&lists) {
        ensure!(
            *l == want,
            "{} lists {} volumes 10 s after the storm ({} of the {} names missing, {} others)",
            d.label,
            l.len(),
            want.difference(l).count(),
            want.len(),
            l.difference(&want).count()
        );
    }
    let distinct = lists[0].len();
    // A local volume's storage must exist once, on the host whose definition won.
    let made: usize = names
        .iter()
        .map(|n| {
            hosts
                .iter()
                .filter(|d| d.state.join("local").join(n).exists())
                .count()
        })
        .sum();
    ensure!(
        made == names.len(),
        "{made} directories made for {} volumes across the three hosts",
        names.len()
    );
    let mut lat = latencies.into_inner().unwrap();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1];
    let rate = distinct as f64 / wall;
    let busy = busy.into_inner();
    println!(
        "   {distinct} volumes in {wall:.3} s: {rate:.0} volumes/s; Create p50 {:.2} ms, p99 {:.2} ms; \
         {busy} busy refusals retried; Lists agreed {converged:.3} s after the last reply",
        pct(0.5),
        pct(0.99)
    );
    let rows = vec![
        row(
            format!(
                "Create storm: {} names from 3 hosts at once, distinct volumes / wall time",
                args.names
            ),
            format!("{rate:.0} volumes/s ({distinct} in {wall:.3} s)"),
            None,
        ),
        row(
            "Create storm: volumes in List, on each of the 3 hosts",
            lists
                .iter()
                .map(|l| l.len().to_string())
                .collect::<Vec<_>>()
                .join(" / "),
            Some((format!("= {} everywhere, the same names", args.names), true)),
        ),
    ];
    let mut notes = vec![format!(
        "Create storm: {} Creates ({} connections per host), latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
         {busy} answered \"being created by another host\" and were retried after 10 ms; each volume's directory \
         was made on exactly one host; every List held the {} names {converged:.3} s after the last Create returned",
        lat.len(),
        args.clients,
        pct(0.5),
        pct(0.99),
        lat[lat.len() - 1],
        args.names
    )];
    let refs: Vec<&Daemon> = hosts.iter().collect();
    let warned = warnings(&refs);
    notes.extend(warned.iter().take(5).cloned());
    for d in hosts {
        d.stop()?;
    }
    let doc = json!({
        "part": "storm",
        "about": format!("Create storm: 3 hosts, {} names (plain local volumes) each in its own order (forward, \
                          backward, shuffled), {} connections per host", args.names, args.clients),
        "rows": rows, "notes": notes, "warnings": warned.len(),
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
    println!("== Results");
    for r in &rows {
        let mark = r["pass"].as_bool().map_or("    ", verdict);
        let target = r["target"]
            .as_str()
            .map_or(String::new(), |t| format!(" [target {t}]"));
        println!("{mark}  {}: {}{target}", s(&r["what"]), s(&r["value"]));
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
        writeln!(md, "## Cluster mode (issue 13)\n")?;
        let now = humantime::format_rfc3339_seconds(SystemTime::now());
        writeln!(
            md,
            "Measured by `scripts/bench-cluster` on {now}; {} CPU cores, kernel {}.",
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
        writeln!(md, "| Measurement | Value | Target | Result |")?;
        writeln!(md, "|---|---:|---|---|")?;
        for r in &rows {
            writeln!(
                md,
                "| {} | {} | {} | {} |",
                s(&r["what"]),
                s(&r["value"]),
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

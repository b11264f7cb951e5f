//! `ebs_bench history`: what bounded history buys, against the strict EBS emulator (which lists inherited
//! blocks, answers ListChangedBlocks and deletes parents as EBS does):
//!
//! - bytes pulled over bytes changed for a host 1 and 10 generations behind (target at most 1.1): the
//!   changed bytes are the blocks the newer snapshots hold, as the emulator counts them, and the pulled
//!   bytes the blocks it served to the Mount;
//! - the whole Mount on a fresh host of a volume with 1 generation of history and of one with 200 (with
//!   `[ebs] keep` at its default), at the emulator's latency: they must differ by less than 20%;
//! - the Unmount of a huge sparse volume (4 TiB) holding 1 MiB, and the daemon's peak resident memory
//!   (targets: under 1 s and under 64 MiB).

use super::*;

#[derive(clap::Args)]
pub(crate) struct HistoryArgs {
    #[command(flatten)]
    common: Common,
    /// Milliseconds the emulator waits before answering each call while Mount times are taken.
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
    /// Generations of the long-lived volume.
    #[arg(long, default_value_t = 200)]
    generations: u64,
    /// Size of the huge sparse volume, in TiB (0 skips it).
    #[arg(long, default_value_t = 4)]
    huge_tib: u64,
}

/// Targets from the issue.
const TARGET_PULLED_PER_CHANGED: f64 = 1.1;
const TARGET_HISTORY_RATIO: f64 = 1.2;
const TARGET_HUGE_SECONDS: f64 = 1.0;
const TARGET_HUGE_RSS_MIB: f64 = 64.0;

/// One generation on `d`: `len` bytes rewritten at `offset` of the file "base", fsynced, shipped.
fn rewrite(d: &Daemon, name: &str, seed: u64, offset: u64, len: usize) -> Result<()> {
    let mp = d.mount(name, "w")?;
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(mp.join("base"))?;
        let mut buf = vec![0u8; len];
        Pattern::new(seed).fill(&mut buf);
        f.write_all_at(&buf, offset)?;
        f.sync_all()?;
    }
    d.unmount(name, "w")
}

/// Peak resident memory of a process, in MiB (VmHWM).
fn peak_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("no VmHWM for pid {pid}"))?;
    Ok(kib / 1024.0)
}

pub(crate) fn history(args: HistoryArgs) -> Result<()> {
    let rt = runtime()?;
    let common = &args.common;
    let (mut rows, mut notes) = (Vec::new(), Vec::new());
    let mut warnings = 0;

    // Bytes pulled against bytes changed, 1 and 10 generations behind.
    {
        let ebs = rt.block_on(StrictEbs::start(PAGE));
        let lines = "keep = 12";
        let a = Daemon::start_with(common, "history-k-a", &ebs.endpoint(), None, lines)?;
        let b = Daemon::start_with(common, "history-k-b", &ebs.endpoint(), None, lines)?;
        a.create("k", 512)?;
        let mp = a.mount("k", "w")?;
        write_data(&mp.join("base"), 1, 256 << 20)?;
        a.unmount("k", "w")?;
        b.create("k", 512)?;
        b.mount("k", "r")?;
        b.unmount("k", "r")?;
        let mut seed = 10;
        for k in [1u64, 10] {
            // b's Unmount may have shipped its superblock: a takes it first.
            a.mount("k", "w")?;
            a.unmount("k", "w")?;
            let from = b.status("k")?["generation"].as_u64().unwrap_or(0);
            for _ in 0..k {
                seed += 1;
                // 4 MiB rewritten per generation, at places that differ.
                rewrite(&a, "k", seed, (seed * 9_999_991) % (250 << 20), 4 << 20)?;
            }
            let newest = a.status("k")?["generation"].as_u64().unwrap_or(0);
            let changed: std::collections::BTreeSet<u64> = ebs
                .completed_by_generation("k")
                .range(from + 1..=newest)
                .flat_map(|(_, id)| ebs.own_blocks(id))
                .collect();
            let got = ebs.counters().blocks_got.load(Ordering::Relaxed);
            let t = Instant::now();
            b.mount("k", "r")?;
            let secs = t.elapsed().as_secs_f64();
            let pulled = ebs.counters().blocks_got.load(Ordering::Relaxed) - got;
            b.unmount("k", "r")?;
            let ratio = pulled as f64 / changed.len().max(1) as f64;
            rows.push(row(
                format!("pull of a host {k} generation(s) behind: bytes pulled / bytes changed"),
                format!("{:.1} MiB pulled", (pulled * BLOCK) as f64 / MIB),
                format!(
                    "{:.1} MiB changed",
                    (changed.len() as u64 * BLOCK) as f64 / MIB
                ),
                ratio,
                Some((
                    format!("at most {TARGET_PULLED_PER_CHANGED}"),
                    ratio <= TARGET_PULLED_PER_CHANGED,
                )),
            ));
            notes.push(json!(format!(
                "{k} behind: generations {from} -> {newest}, the whole Mount took {secs:.2} s"
            )));
        }
        warnings += a.warnings() + b.warnings();
        a.stop()?;
        b.stop()?;
    }

    // A Mount with 1 and with 200 generations of history.
    {
        let ebs = rt.block_on(StrictEbs::start(PAGE));
        let a = Daemon::start_with(common, "history-g-a", &ebs.endpoint(), None, "")?;
        for name in ["young", "old"] {
            a.create(name, 256)?;
            let mp = a.mount(name, "w")?;
            write_data(&mp.join("base"), 2, 64 << 20)?;
            a.unmount(name, "w")?;
        }
        let built = Instant::now();
        for g in 2..=args.generations {
            rewrite(&a, "old", 100 + g, (g * 7_777_777) % (60 << 20), 64 << 10)?;
        }
        // The retention pass after the last Unmount runs once that Unmount has answered.
        let settle = Instant::now() + std::time::Duration::from_secs(10);
        while ebs.completed_by_generation("old").len() > 3 && Instant::now() < settle {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let kept = ebs.completed_by_generation("old").len();
        notes.push(json!(format!(
            "{} generations made in {:.0} s with no latency; {kept} snapshots kept ([ebs] keep default)",
            args.generations,
            built.elapsed().as_secs_f64()
        )));
        ebs.faults()
            .latency_ms
            .store(args.latency_ms, Ordering::Relaxed);
        let (mut young, mut old) = (Vec::new(), Vec::new());
        for r in 0..common.repeats {
            for (name, times) in [("young", &mut young), ("old", &mut old)] {
                let d = Daemon::start_with(
                    common,
                    &format!("history-g-{name}-{r}"),
                    &ebs.endpoint(),
                    None,
                    "",
                )?;
                d.create(name, 256)?;
                let t = Instant::now();
                d.mount(name, "r")?;
                times.push(t.elapsed().as_secs_f64());
                d.unmount(name, "r")?;
                warnings += d.warnings();
                d.stop()?;
            }
        }
        let (y, o) = (median(&young), median(&old));
        let ratio = o / y;
        rows.push(row(
            format!(
                "whole Mount on a fresh host, {} generations of history over 1 ({} ms per call)",
                args.generations, args.latency_ms
            ),
            format!("{o:.2} s"),
            format!("{y:.2} s"),
            ratio,
            Some((
                format!("below {TARGET_HISTORY_RATIO}"),
                ratio < TARGET_HISTORY_RATIO,
            )),
        ));
        warnings += a.warnings();
        a.stop()?;
    }

    // A huge sparse volume holding 1 MiB.
    if args.huge_tib > 0 {
        let ebs = rt.block_on(StrictEbs::start(PAGE));
        let size_mib = args.huge_tib << 20;
        let a = Daemon::start_with(common, "history-huge", &ebs.endpoint(), None, "")?;
        a.create("huge", size_mib)?;
        let t = Instant::now();
        let mp = a.mount("huge", "w")?;
        let first_mount = t.elapsed().as_secs_f64();
        write_data(&mp.join("data"), 3, 1 << 20)?;
        let t = Instant::now();
        a.unmount("huge", "w")?;
        let first_unmount = t.elapsed().as_secs_f64();
        let image_mib = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(a.image("huge"))?.blocks() as f64 * 512.0 / MIB
        };
        warnings += a.warnings();
        a.stop()?;
        // A fresh daemon, so its peak memory is this volume's Mount and Unmount alone.
        let a = Daemon::start_with(common, "history-huge", &ebs.endpoint(), None, "")?;
        let mp = a.mount("huge", "w2")?;
        write_data(&mp.join("data"), 4, 1 << 20)?;
        let t = Instant::now();
        a.unmount("huge", "w2")?;
        let secs = t.elapsed().as_secs_f64();
        let rss = peak_rss_mib(a.pid())?;
        rows.push(row(
            format!(
                "Unmount of a {} TiB volume holding 1 MiB (1 MiB rewritten)",
                args.huge_tib
            ),
            format!("{secs:.2} s"),
            "1 s".into(),
            secs,
            Some((
                format!("under {TARGET_HUGE_SECONDS} s"),
                secs < TARGET_HUGE_SECONDS,
            )),
        ));
        rows.push(row(
            format!(
                "daemon peak RSS over that Mount and Unmount ({} TiB volume)",
                args.huge_tib
            ),
            format!("{rss:.1} MiB"),
            "64 MiB".into(),
            rss / TARGET_HUGE_RSS_MIB,
            Some((
                format!("under {TARGET_HUGE_RSS_MIB} MiB"),
                rss < TARGET_HUGE_RSS_MIB,
            )),
        ));
        notes.push(json!(format!(
            "{} TiB volume: the first Mount (mkfs) took {first_mount:.1} s and the first Unmount (shipping what \
             mkfs wrote) {first_unmount:.1} s; the image holds {image_mib:.0} MiB on disk",
            args.huge_tib
        )));
        warnings += a.warnings();
        a.stop()?;
    }

    let doc = json!({
        "part": "history",
        "about": format!("Strict EBS emulator in the driver's process; history rows: generations made with no latency, \
                          Mounts timed at {} ms per call, medians of {} runs", args.latency_ms, common.repeats),
        "rows": rows, "notes": notes, "warnings": warnings,
    });
    save(&common.out, &doc)
}

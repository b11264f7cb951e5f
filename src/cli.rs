//! The operator commands: `ferry ls`, `inspect`, `status`, `doctor`, `checkpoint`, `prune`, `release` and
//! `ebs set-aside`.
//! Each asks the daemon over the admin socket (doctor also looks at the host itself) and prints a table for
//! people or, with `--json`, the daemon's JSON for scripts. Rendering is kept apart from fetching so it is
//! unit-tested without a daemon.

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::admin::{AdminClient, ClientError, DaemonStatus};
use crate::config::ServeConfig;
use crate::doctor::{self, Check, Verdict};
use crate::service::{BackendReport, ReleaseReport, VolumeReport};

/// How long a command waits for the daemon: longer than the daemon's own backend-check deadline, so a slow
/// backend shows up as that backend's error rather than as a timeout of the whole command.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// One operator command.
#[derive(Clone, Debug)]
pub enum Command {
    Ls,
    Inspect(String),
    Status,
    Doctor,
    /// Ship a mounted volume's changes now (ebs).
    Checkpoint(String),
    /// Apply an ebs volume's snapshot retention now.
    Prune(String),
    /// Move this host's copy of an ebs volume to a rescue directory (`ferry ebs set-aside`).
    EbsSetAside(String),
    /// Cluster mode's hosts.
    Hosts,
    /// Drop mount IDs Docker will never unmount.
    Release {
        name: String,
        id: Option<String>,
        force: bool,
    },
}

/// How long `ferry checkpoint` waits: an upload of many changed blocks takes a while.
pub const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(600);

/// What a command printed and how the process should exit: 0 all well, 1 an error (reported through
/// `Err`), 2 the command worked but found a problem (an unreachable backend, a failed doctor check).
pub struct Outcome {
    pub text: String,
    pub exit_code: u8,
}

/// Runs one command against the daemon that `config` describes.
pub async fn run(
    command: &Command,
    config: &ServeConfig,
    json: bool,
) -> Result<Outcome, ClientError> {
    let client = AdminClient::new(config.admin_socket.clone(), CLIENT_TIMEOUT);
    match command {
        Command::Ls => {
            let volumes: Vec<VolumeReport> = client.get("/v1/volumes").await?;
            Ok(Outcome {
                text: if json {
                    to_json(&volumes)
                } else {
                    render_ls(&volumes)
                },
                exit_code: 0,
            })
        }
        Command::Inspect(name) => {
            let path = format!("/v1/volumes/{}", percent_encode(name));
            let volume: VolumeReport = client.get(&path).await?;
            Ok(Outcome {
                text: if json {
                    to_json(&volume)
                } else {
                    render_inspect(&volume)
                },
                exit_code: 0,
            })
        }
        Command::Checkpoint(name) => {
            let path = format!("/v1/volumes/{}/checkpoint", percent_encode(name));
            let client = AdminClient::new(config.admin_socket.clone(), CHECKPOINT_TIMEOUT);
            let shipped: Option<crate::catalog::Shipped> = client.post(&path).await?;
            Ok(Outcome {
                text: if json {
                    to_json(&shipped)
                } else {
                    match shipped {
                        Some(s) => format!(
                            "{name}: newest snapshot {} (generation {})\n",
                            s.snapshot, s.generation
                        ),
                        None => format!(
                            "{name}: nothing shipped (not an ebs volume, or nothing written yet)\n"
                        ),
                    }
                },
                exit_code: 0,
            })
        }
        Command::Prune(name) => {
            let path = format!("/v1/volumes/{}/prune", percent_encode(name));
            // Waits for a push of the volume that may be running.
            let client = AdminClient::new(config.admin_socket.clone(), CHECKPOINT_TIMEOUT);
            let done: crate::backend::ebs::Pruned = client.post(&path).await?;
            Ok(Outcome {
                text: if json {
                    to_json(&done)
                } else {
                    render_pruned(&done)
                },
                exit_code: 0,
            })
        }
        Command::EbsSetAside(name) => {
            let path = format!("/v1/volumes/{}/set-aside", percent_encode(name));
            // Waits for a checkpoint of the volume that may be running.
            let client = AdminClient::new(config.admin_socket.clone(), CHECKPOINT_TIMEOUT);
            let done: crate::admin::SetAside = client.post(&path).await?;
            Ok(Outcome {
                text: if json {
                    to_json(&done)
                } else {
                    format!(
                        "{name}: this host's copy was moved to {}\n\
                         copy out what you need from its image (mount it read-only with `mount -o loop,ro {}/image DIR`);\n\
                         the next mount of {name} pulls the newest snapshot from EBS\n",
                        done.moved_to.display(),
                        done.moved_to.display()
                    )
                },
                exit_code: 0,
            })
        }
        Command::Release { name, id, force } => {
            let mut path = format!("/v1/volumes/{}/release?force={force}", percent_encode(name));
            if let Some(id) = id {
                let _ = write!(path, "&id={}", percent_encode(id));
            }
            let report: ReleaseReport = client.post(&path).await?;
            Ok(Outcome {
                text: if json {
                    to_json(&report)
                } else {
                    render_release(&report)
                },
                exit_code: 0,
            })
        }
        Command::Hosts => {
            let hosts: crate::cluster::HostsReport = client.get("/v1/hosts").await?;
            Ok(Outcome {
                text: if json {
                    to_json(&hosts)
                } else {
                    render_hosts(&hosts)
                },
                exit_code: 0,
            })
        }
        Command::Status => {
            let status: DaemonStatus = client.get("/v1/status").await?;
            let all_reachable = status.backends.iter().all(|b| b.reachable);
            Ok(Outcome {
                text: if json {
                    to_json(&status)
                } else {
                    render_status(&status)
                },
                exit_code: if all_reachable { 0 } else { 2 },
            })
        }
        Command::Doctor => {
            let mut checks = doctor::host_checks(config);
            checks.extend(doctor::server_checks(config).await);
            match client.get::<DaemonStatus>("/v1/status").await {
                Ok(status) => {
                    checks.push(Check::ok(
                        "daemon",
                        format!(
                            "ferry {} (pid {}) answers on {}, up {}",
                            status.version,
                            status.pid,
                            config.admin_socket.display(),
                            uptime(status.uptime_secs)
                        ),
                    ));
                    checks.extend(status.backends.iter().map(backend_check));
                    if config.cluster.is_some() {
                        checks.push(cluster_check(
                            client.get::<crate::cluster::HostsReport>("/v1/hosts").await,
                        ));
                    }
                }
                Err(e) => checks.push(Check::bad(
                    "daemon",
                    Verdict::Warn,
                    e.to_string(),
                    match e {
                        // The daemon may well run: only root may ask it.
                        ClientError::PermissionDenied { .. } => doctor::RUN_AS_ROOT,
                        _ => "start the daemon to check the reachability of its backends (systemctl start ferry)",
                    },
                )),
            }
            let failed = checks.iter().any(|c| c.verdict == Verdict::Fail);
            Ok(Outcome {
                text: if json {
                    to_json(&json!({ "ok": !failed, "checks": checks }))
                } else {
                    render_doctor(&checks)
                },
                exit_code: if failed { 2 } else { 0 },
            })
        }
    }
}

fn backend_check(b: &BackendReport) -> Check {
    let name = format!("backend: {}", b.backend);
    if b.reachable {
        Check::ok(&name, backend_details(b))
    } else {
        Check::bad(
            &name,
            if b.default {
                Verdict::Fail
            } else {
                Verdict::Warn
            },
            b.error.clone().unwrap_or_else(|| "unreachable".into()),
            "see docs/troubleshooting.md for this error; `ferry status` checks again",
        )
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    let mut s =
        serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    s.push('\n');
    s
}

/// Escapes everything but the characters Docker allows in names, so any name reaches the daemon intact.
fn percent_encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Whether this host is in its cluster: a lease, and a catalog copy in sync.
fn cluster_check(hosts: Result<crate::cluster::HostsReport, ClientError>) -> Check {
    let fix = "check that etcd runs and that this host reaches the endpoints in cluster.etcd (firewall, TLS files, user); Ferry reconnects by itself";
    match hosts {
        Ok(h) if h.in_sync => Check::ok(
            "cluster",
            format!(
                "node {} holds lease {}; {} host(s) alive",
                h.this_node,
                h.lease,
                h.hosts.iter().filter(|x| x.state == "alive").count()
            ),
        ),
        Ok(h) => Check::bad(
            "cluster",
            Verdict::Fail,
            format!(
                "node {}: etcd is out of reach (lease: {}); Get and List answer from the last known state",
                h.this_node, h.lease
            ),
            fix,
        ),
        Err(e) => Check::bad("cluster", Verdict::Fail, e.to_string(), fix),
    }
}

fn render_hosts(h: &crate::cluster::HostsReport) -> String {
    let mut out = format!(
        "this host      {}\nlease          {}\ncatalog        {}\n\n",
        h.this_node,
        h.lease,
        if h.in_sync {
            "in sync"
        } else {
            "STALE (etcd out of reach)"
        }
    );
    let _ = writeln!(out, "{:<20} {:<9} {:<20} ATTACHED", "NODE", "STATE", "OWNS");
    for host in &h.hosts {
        let owns = if host.owns.is_empty() {
            "-".to_string()
        } else {
            host.owns.join(",")
        };
        let attached = if host.attached.is_empty() {
            "-".to_string()
        } else {
            host.attached.join(",")
        };
        let _ = writeln!(
            out,
            "{:<20} {:<9} {:<20} {}",
            host.node, host.state, owns, attached
        );
    }
    out
}

fn render_release(r: &ReleaseReport) -> String {
    if let Some(from) = &r.taken_from {
        return format!(
            "{}: taken from host {from}; it can no longer publish its changes, and any host can mount the volume now\n",
            r.name
        );
    }
    if r.released.is_empty() {
        return format!("{}: no mount IDs to release\n", r.name);
    }
    let mut out = format!("{}: released mount ID(s) {}", r.name, r.released.join(", "));
    if r.detached {
        out.push_str("; no mount is left, so its storage was released");
    }
    out.push('\n');
    if !r.forced_past.is_empty() {
        let _ = writeln!(
            out,
            "warning: still mounted in another mount namespace ({}); that container keeps its mount until it stops",
            r.forced_past.join(", ")
        );
    }
    out
}

/// Left-aligned columns separated by two spaces.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn str_field<'a>(map: &'a serde_json::Map<String, Value>, key: &str) -> Option<&'a str> {
    map.get(key).and_then(Value::as_str)
}

/// Backend facts worth a column in `ls`, when a backend reports them (the EBS generation or snapshot).
fn version_of(v: &VolumeReport) -> Option<String> {
    let s = &v.backend_status;
    match (s.get("generation"), str_field(s, "snapshot")) {
        (Some(g), Some(snap)) => Some(format!("gen {g} ({snap})")),
        (Some(g), None) => Some(format!("gen {g}")),
        (None, Some(snap)) => Some(snap.to_string()),
        (None, None) => None,
    }
}

pub fn render_ls(volumes: &[VolumeReport]) -> String {
    if volumes.is_empty() {
        return "no volumes\n".into();
    }
    let with_version = volumes.iter().any(|v| version_of(v).is_some());
    let mut headers = vec!["NAME", "BACKEND", "SIZE", "STATE", "HEALTH", "MOUNTS"];
    if with_version {
        headers.push("GENERATION");
    }
    headers.push("MOUNTPOINT");
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .map(|v| {
            let mut row = vec![
                v.name.clone(),
                v.backend.clone(),
                str_field(&v.backend_status, "size")
                    .unwrap_or("-")
                    .to_string(),
                v.state.clone(),
                v.health.clone(),
                v.active_mounts.to_string(),
            ];
            if with_version {
                row.push(version_of(v).unwrap_or_else(|| "-".into()));
            }
            row.push(
                v.mountpoint
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "-".into()),
            );
            row
        })
        .collect();
    table(&headers, &rows)
}

fn timestamp(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// "SNAPSHOT, started TIME, SIZE changed" of one kept ebs generation.
fn generation_text(g: &crate::backend::ebs::Generation) -> String {
    let mut text = g.snapshot.clone();
    if let Some(t) = g.started {
        text.push_str(&format!(", started {}", timestamp(t)));
    }
    if let Some(b) = g.changed_bytes {
        text.push_str(&format!(", {} changed", doctor::human_bytes(b)));
    }
    text
}

/// What `ferry prune` did.
fn render_pruned(p: &crate::backend::ebs::Pruned) -> String {
    let mut out = format!(
        "{}: deleted {} snapshot(s); keeping {} generation(s) ([ebs] keep = {})\n",
        p.volume,
        p.deleted.len(),
        p.kept.len(),
        p.keep
    );
    if let Some(n) = &p.note {
        out.push_str(&format!("{n}\n"));
    }
    for id in &p.deleted {
        out.push_str(&format!("  deleted {id}\n"));
    }
    for g in &p.kept {
        out.push_str(&format!(
            "  kept generation {}: {}\n",
            g.generation,
            generation_text(g)
        ));
    }
    out
}

fn uptime(secs: u64) -> String {
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn render_inspect(v: &VolumeReport) -> String {
    let mut rows: Vec<(String, String)> = vec![
        ("name".into(), v.name.clone()),
        ("backend".into(), v.backend.clone()),
        ("state".into(), v.state.clone()),
        ("health".into(), v.health.clone()),
    ];
    if let Some(e) = &v.last_error {
        rows.push(("last error".into(), e.clone()));
    }
    rows.push(("created".into(), timestamp(v.created_at)));
    rows.push((
        "mountpoint".into(),
        v.mountpoint
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "- (not mounted)".into()),
    ));
    rows.push(("active mounts".into(), v.active_mounts.to_string()));
    for (id, count) in &v.mount_ids {
        rows.push(("  mount id".into(), format!("{id} (x{count})")));
    }
    for (k, val) in &v.options {
        rows.push((format!("option {k}"), val.clone()));
    }
    for (k, val) in &v.backend_status {
        if k == "generations" {
            continue;
        }
        rows.push((format!("{} {k}", v.backend), value_text(val)));
    }
    // The ebs generations kept, newest first: one row each.
    let kept: Vec<crate::backend::ebs::Generation> = v
        .backend_status
        .get("generations")
        .and_then(|g| serde_json::from_value(g.clone()).ok())
        .unwrap_or_default();
    for g in &kept {
        rows.push((
            format!("kept generation {}", g.generation),
            generation_text(g),
        ));
    }
    rows.push(("catalog version".into(), v.catalog_version.to_string()));
    if let Some(c) = &v.cluster {
        rows.push(("cluster created by".into(), c.created_by.clone()));
        rows.push((
            "cluster owner".into(),
            match (&c.owner, c.token) {
                (Some(o), Some(t)) => format!("{o} (fencing token {t})"),
                (Some(o), None) => o.clone(),
                _ => "- (no host owns it)".into(),
            },
        ));
        if let Some(g) = c.generation {
            rows.push(("cluster generation".into(), g.to_string()));
        }
        rows.push((
            "cluster mounted on".into(),
            if c.attached_on.is_empty() {
                "-".into()
            } else {
                c.attached_on.join(", ")
            },
        ));
        if !c.catalog_in_sync {
            rows.push((
                "cluster catalog".into(),
                "STALE: etcd is out of reach; this is the last state seen".into(),
            ));
        }
    }
    let width = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    rows.iter()
        .map(|(k, val)| format!("{k:<width$}  {val}\n"))
        .collect()
}

fn backend_details(b: &BackendReport) -> String {
    let d = &b.details;
    let mut parts = Vec::new();
    if let (Some(free), Some(total)) = (
        d.get("free_bytes").and_then(Value::as_u64),
        d.get("total_bytes").and_then(Value::as_u64),
    ) {
        parts.push(format!(
            "{} free of {}",
            doctor::human_bytes(free),
            doctor::human_bytes(total)
        ));
    }
    for (k, v) in d {
        if k != "free_bytes" && k != "total_bytes" {
            parts.push(format!("{k} {}", value_text(v)));
        }
    }
    parts.join(", ")
}

pub fn render_status(s: &DaemonStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ferry {}, pid {}, up {} (since {})",
        s.version,
        s.pid,
        uptime(s.uptime_secs),
        timestamp(s.started_at)
    );
    let _ = writeln!(out, "plugin socket  {}", s.socket.display());
    let _ = writeln!(out, "admin socket   {}", s.admin_socket.display());
    let _ = writeln!(out, "state dir      {}", s.state_dir.display());
    if let Some(m) = &s.mount_root {
        let _ = writeln!(out, "mount root     {}", m.display());
    }
    let _ = writeln!(
        out,
        "volumes        {} ({} attached, {} active mounts)",
        s.volumes, s.attached_volumes, s.active_mounts
    );
    let r = &s.reconcile;
    let _ = writeln!(
        out,
        "start-up       {} volumes: {} adopted, {} remounted, {} released, {} rolled back, {} removed, {} failed",
        r.volumes, r.adopted, r.remounted, r.released, r.rolled_back, r.removed, r.failed
    );
    out.push('\n');
    let rows: Vec<Vec<String>> = s
        .backends
        .iter()
        .map(|b| {
            vec![
                b.backend.clone(),
                if b.default { "yes" } else { "no" }.into(),
                if b.reachable { "yes" } else { "NO" }.into(),
                format!("{} ms", b.checked_in_ms),
                if b.reachable {
                    backend_details(b)
                } else {
                    b.error.clone().unwrap_or_default()
                },
            ]
        })
        .collect();
    out.push_str(&table(
        &["BACKEND", "DEFAULT", "REACHABLE", "CHECKED IN", "DETAILS"],
        &rows,
    ));
    out
}

pub fn render_doctor(checks: &[Check]) -> String {
    let rows: Vec<Vec<String>> = checks
        .iter()
        .map(|c| vec![c.verdict.as_str().into(), c.check.clone(), c.detail.clone()])
        .collect();
    let mut out = table(&["RESULT", "CHECK", "DETAIL"], &rows);
    let fixes: Vec<&Check> = checks.iter().filter(|c| c.fix.is_some()).collect();
    if !fixes.is_empty() {
        out.push_str("\nhow to fix:\n");
        for c in fixes {
            let _ = writeln!(
                out,
                "  {} ({}): {}",
                c.check,
                c.verdict.as_str(),
                c.fix.as_deref().unwrap_or_default()
            );
        }
    }
    let failed = checks.iter().filter(|c| c.verdict == Verdict::Fail).count();
    let warned = checks.iter().filter(|c| c.verdict == Verdict::Warn).count();
    let _ = writeln!(
        out,
        "\n{} checks: {} failed, {} warnings",
        checks.len(),
        failed,
        warned
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn volume(name: &str) -> VolumeReport {
        VolumeReport {
            name: name.into(),
            backend: "local".into(),
            state: "ready".into(),
            health: "ok".into(),
            last_error: None,
            mountpoint: None,
            active_mounts: 0,
            mount_ids: BTreeMap::new(),
            created_at: 0,
            options: BTreeMap::from([("backend".to_string(), "local".to_string())]),
            catalog_version: 1,
            backend_status: serde_json::Map::new(),
            cluster: None,
        }
    }

    #[test]
    fn doctor_fails_the_cluster_check_while_etcd_is_out_of_reach() {
        let report = |in_sync| crate::cluster::HostsReport {
            this_node: "host-a".into(),
            lease: "7".into(),
            in_sync,
            hosts: vec![],
        };
        assert_eq!(cluster_check(Ok(report(true))).verdict, Verdict::Ok);
        let bad = cluster_check(Ok(report(false)));
        assert_eq!(bad.verdict, Verdict::Fail);
        assert!(bad.detail.contains("out of reach"), "{}", bad.detail);
    }

    #[test]
    fn ls_aligns_columns_and_adds_generation_only_when_known() {
        let mut a = volume("a");
        a.backend_status.insert("size".into(), json!("64MiB"));
        a.mountpoint = Some("/mnt/a".into());
        a.active_mounts = 2;
        let b = volume("longer-name");
        let text = render_ls(&[a.clone(), b.clone()]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("NAME         BACKEND"), "{text}");
        assert!(!lines[0].contains("GENERATION"));
        assert!(
            lines[1].contains("64MiB") && lines[1].ends_with("/mnt/a"),
            "{text}"
        );
        assert!(lines[2].starts_with("longer-name  local"), "{text}");
        let mut c = volume("c");
        c.backend_status.insert("generation".into(), json!(7));
        assert!(render_ls(&[a, b, c]).contains("gen 7"));
        assert_eq!(render_ls(&[]), "no volumes\n");
    }

    #[test]
    fn inspect_shows_mount_ids_options_and_errors() {
        let mut v = volume("v");
        v.mount_ids.insert("abc".into(), 2);
        v.last_error = Some("cannot mount".into());
        v.health = "error".into();
        let text = render_inspect(&v);
        assert!(
            text.contains("mount id") && text.contains("abc (x2)"),
            "{text}"
        );
        assert!(text.contains("last error") && text.contains("cannot mount"));
        assert!(text.contains("option backend"));
        assert!(text.contains("1970-01-01T00:00:00Z"));
    }

    #[test]
    fn inspect_and_prune_show_the_kept_generations() {
        let mut v = volume("v");
        v.backend = "ebs".into();
        v.backend_status.insert(
            "generations".into(),
            json!([
                {"generation": 9, "snapshot": "snap-9", "started": 86400, "changed_bytes": 3 << 20},
                {"generation": 8, "snapshot": "snap-8"},
            ]),
        );
        let text = render_inspect(&v);
        assert!(
            text.contains("kept generation 9")
                && text.contains("snap-9, started 1970-01-02T00:00:00Z, 3.0 MiB changed"),
            "{text}"
        );
        assert!(text.contains("kept generation 8  snap-8\n"), "{text}");
        assert!(!text.contains("ebs generations"), "{text}");
        let pruned = crate::backend::ebs::Pruned {
            volume: "v".into(),
            keep: 1,
            kept: vec![crate::backend::ebs::Generation {
                generation: 9,
                snapshot: "snap-9".into(),
                started: None,
                changed_bytes: None,
            }],
            deleted: vec!["snap-8".into()],
            note: None,
        };
        let text = render_pruned(&pruned);
        assert!(
            text.starts_with("v: deleted 1 snapshot(s); keeping 1 generation(s) ([ebs] keep = 1)"),
            "{text}"
        );
        assert!(text.contains("deleted snap-8") && text.contains("kept generation 9: snap-9"));
    }

    #[test]
    fn names_are_escaped_for_the_path() {
        assert_eq!(percent_encode("a.b-c_d9"), "a.b-c_d9");
        assert_eq!(percent_encode("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn doctor_lists_fixes_and_counts() {
        let checks = vec![
            Check::ok("one", "fine"),
            Check::bad("two", Verdict::Fail, "broken", "repair it"),
        ];
        let text = render_doctor(&checks);
        assert!(text.contains("FAIL    two    broken"), "{text}");
        assert!(text.contains("two (FAIL): repair it"));
        assert!(text.contains("2 checks: 1 failed, 0 warnings"));
    }
}

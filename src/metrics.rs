//! Prometheus metrics: counters and latency histograms per protocol call and outcome, backend errors by
//! kind, and gauges computed at scrape time from the service's in-memory view. Rendering the text
//! exposition format by hand keeps the dependency tree small; the format is simple and tested by parsing.
//! Served only when `[metrics] listen` is configured, on plain HTTP: bind it to loopback or a trusted
//! network, it reveals volume counts but no names or options.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::service::VolumeService;

/// Upper bounds of the latency buckets, in seconds: from sub-millisecond Get to Docker's 2-minute limit.
const BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    120.0,
];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// What the protocol layer and the service report.
#[derive(Default)]
pub struct Metrics {
    calls: Mutex<BTreeMap<(&'static str, &'static str), Histogram>>,
    backend_errors: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

/// Facts read from the service at scrape time.
pub struct Gauges {
    pub volumes_by_backend: BTreeMap<&'static str, u64>,
    pub active_mounts: u64,
    pub attached_volumes: u64,
    /// Data shipped and pulled, per backend that ships data.
    pub transfers: BTreeMap<&'static str, crate::backend::TransferTotals>,
}

impl Metrics {
    /// Records one protocol call; `outcome` is `ok`, `refused` (the caller's mistake) or `error`.
    pub fn observe_call(&self, method: &'static str, outcome: &'static str, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let mut calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        let h = calls.entry((method, outcome)).or_default();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            h.counts[i] += 1;
        }
        h.count += 1;
        h.sum += secs;
    }

    /// Counts a backend failure of the given kind.
    pub fn backend_error(&self, backend: &'static str, kind: &'static str) {
        *self
            .backend_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((backend, kind))
            .or_default() += 1;
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::new();
        let calls = self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone();
        out.push_str("# HELP ferry_calls_total Protocol calls answered, by method and outcome.\n");
        out.push_str("# TYPE ferry_calls_total counter\n");
        for ((method, outcome), h) in &calls {
            let _ = writeln!(
                out,
                "ferry_calls_total{{method=\"{method}\",outcome=\"{outcome}\"}} {}",
                h.count
            );
        }
        out.push_str("# HELP ferry_call_duration_seconds Time to answer a protocol call.\n");
        out.push_str("# TYPE ferry_call_duration_seconds histogram\n");
        for ((method, outcome), h) in &calls {
            let labels = format!("method=\"{method}\",outcome=\"{outcome}\"");
            let mut cumulative = 0;
            for (bound, n) in BUCKETS.iter().zip(h.counts) {
                cumulative += n;
                let _ = writeln!(
                    out,
                    "ferry_call_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "ferry_call_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(out, "ferry_call_duration_seconds_sum{{{labels}}} {}", h.sum);
            let _ = writeln!(
                out,
                "ferry_call_duration_seconds_count{{{labels}}} {}",
                h.count
            );
        }
        out.push_str("# HELP ferry_backend_errors_total Backend failures, by backend and kind.\n");
        out.push_str("# TYPE ferry_backend_errors_total counter\n");
        for ((backend, kind), n) in self
            .backend_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "ferry_backend_errors_total{{backend=\"{backend}\",kind=\"{kind}\"}} {n}"
            );
        }
        out.push_str("# HELP ferry_volumes Volumes in the catalog, by backend.\n");
        out.push_str("# TYPE ferry_volumes gauge\n");
        for (backend, n) in &g.volumes_by_backend {
            let _ = writeln!(out, "ferry_volumes{{backend=\"{backend}\"}} {n}");
        }
        out.push_str("# HELP ferry_active_mounts Active Docker mounts, counted per mount ID.\n");
        out.push_str("# TYPE ferry_active_mounts gauge\n");
        let _ = writeln!(out, "ferry_active_mounts {}", g.active_mounts);
        out.push_str("# HELP ferry_attached_volumes Volumes whose storage is attached.\n");
        out.push_str("# TYPE ferry_attached_volumes gauge\n");
        let _ = writeln!(out, "ferry_attached_volumes {}", g.attached_volumes);
        type Pick = fn(&crate::backend::TransferTotals) -> u64;
        let series: [(&str, &str, Pick); 4] = [
            (
                "ferry_shipped_bytes_total",
                "Bytes shipped to remote storage (EBS snapshots).",
                |t| t.bytes_shipped,
            ),
            (
                "ferry_shipped_blocks_total",
                "Blocks shipped to remote storage.",
                |t| t.blocks_shipped,
            ),
            (
                "ferry_pulled_bytes_total",
                "Bytes pulled from remote storage.",
                |t| t.bytes_pulled,
            ),
            (
                "ferry_pulled_blocks_total",
                "Blocks pulled from remote storage.",
                |t| t.blocks_pulled,
            ),
        ];
        for (name, help, value) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (backend, t) in &g.transfers {
                let _ = writeln!(out, "{name}{{backend=\"{backend}\"}} {}", value(t));
            }
        }
        out
    }
}

/// Serves `GET /metrics` on `addr` until the process exits.
pub async fn serve(addr: SocketAddr, service: Arc<VolumeService>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(listen = %addr, "metrics endpoint serving");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let service = service.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let service = service.clone();
                        async move {
                            let resp =
                                if req.method() == Method::GET && req.uri().path() == "/metrics" {
                                    let body = service.metrics().render(&service.gauges());
                                    let mut r = Response::new(Full::new(Bytes::from(body)));
                                    r.headers_mut().insert(
                                        hyper::header::CONTENT_TYPE,
                                        hyper::header::HeaderValue::from_static(
                                            "text/plain; version=0.0.4",
                                        ),
                                    );
                                    r
                                } else {
                                    let mut r = Response::new(Full::new(Bytes::from_static(
                                        b"only GET /metrics is served here\n",
                                    )));
                                    *r.status_mut() = StatusCode::NOT_FOUND;
                                    r
                                };
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(())
}

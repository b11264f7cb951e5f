//! Prometheus metrics: counters and latency histograms per protocol call and outcome, backend errors by
//! kind, and gauges computed at scrape time from the service's in-memory view. Rendering the text
//! exposition format by hand keeps the dependency tree small; the format is simple and tested by parsing.
//! Served only when `[metrics] listen` is configured, on plain HTTP: bind it to loopback or a trusted
//! network, it reveals volume counts but no names or options. Its connections are capped apart from the
//! plugin socket's (`listener`), so its clients cannot take the descriptors Docker's calls need.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::listener::{BodyError, Handler, Limits, Listener, Peer, Peers, ServeOptions};
use crate::sync::Recover;

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
        let mut calls = self.calls.lock().recover();
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
            .recover()
            .entry((backend, kind))
            .or_default() += 1;
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::new();
        let calls = self.calls.lock().recover().clone();
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
        for ((backend, kind), n) in self.backend_errors.lock().recover().iter() {
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

/// A request body the endpoint reads at most; scrapers send none.
const MAX_BODY: usize = 64 << 10;

/// What a scrape returns: the exposition text, rendered at the time of the scrape. The daemon passes
/// one over the service, so this module needs nothing of the service but this.
pub type Exposition = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves `GET /metrics` on `listener` until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    exposition: Exposition,
    limits: Limits,
    stop: CancellationToken,
) {
    let opts = ServeOptions {
        name: "metrics endpoint",
        limits,
        // Plain HTTP on an address the operator chose; the cap keeps its clients from the plugin's
        // descriptors, and nothing here is secret.
        peers: Peers::Anyone,
        spare_fd: false,
        drain: Duration::from_secs(2),
    };
    let handler = Arc::new(MetricsHandler { exposition });
    crate::listener::serve(Listener::Tcp(listener), handler, opts, stop).await;
}

struct MetricsHandler {
    exposition: Exposition,
}

impl Handler for MetricsHandler {
    fn max_body(&self) -> usize {
        MAX_BODY
    }

    fn handle(
        &self,
        head: hyper::http::request::Parts,
        _body: Bytes,
        _peer: Peer,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send {
        let resp = if head.method == Method::GET && head.uri.path() == "/metrics" {
            let body = (self.exposition)();
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        } else {
            text(
                StatusCode::NOT_FOUND,
                "only GET /metrics is served here\n".into(),
            )
        };
        std::future::ready(resp)
    }

    fn body_error(&self, _path: &str, err: BodyError) -> Response<Full<Bytes>> {
        match err {
            BodyError::TooLarge(_) => text(
                StatusCode::PAYLOAD_TOO_LARGE,
                "only GET /metrics is served here\n".into(),
            ),
            BodyError::Unreadable(cause) => text(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request: {cause}\n"),
            ),
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

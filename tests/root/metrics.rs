//! The Prometheus endpoint: scraped over HTTP and parsed as the text exposition format.

use crate::common;

use std::collections::BTreeMap;
use std::io::{Read, Write};

use common::Daemon;

fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        out.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{out}"
    );
    out.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// Parses samples into `name{labels}` -> value, checking every line's syntax and that each sample's
/// family was declared with `# TYPE` first.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut types = BTreeMap::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
                for pair in labels[1..labels.len() - 1].split(',') {
                    let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("{line}"));
                    assert!(
                        !k.is_empty() && v.starts_with('"') && v.ends_with('"'),
                        "{line}"
                    );
                }
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "no # TYPE for {line}");
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "duplicate {series}"
        );
    }
    samples
}

#[test]
fn scrape_and_parse() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.toml");
    std::fs::write(
        &config,
        format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    )
    .unwrap();
    let d = Daemon::start_in(
        dir.path(),
        &dir.path().join("f.sock"),
        &[("FERRY_CONFIG", config.to_str().unwrap())],
    );
    d.create("a", "null");
    d.create("b", r#"{"size":"32M"}"#);
    d.mount("b", "m1");
    d.mount("b", "m1");
    d.get("a");
    d.err("/VolumeDriver.Get", r#"{"Name":"missing"}"#);
    d.err(
        "/VolumeDriver.Create",
        r#"{"Name":"c","Opts":{"bogus":"1"}}"#,
    );

    let m = parse(&scrape(port));
    let calls = |method: &str, outcome: &str| {
        m[&format!("ferry_calls_total{{method=\"{method}\",outcome=\"{outcome}\"}}")]
    };
    assert_eq!(calls("VolumeDriver.Create", "ok"), 2.0);
    assert_eq!(calls("VolumeDriver.Create", "refused"), 1.0);
    assert_eq!(calls("VolumeDriver.Mount", "ok"), 2.0);
    assert_eq!(calls("VolumeDriver.Get", "ok"), 1.0);
    assert_eq!(calls("VolumeDriver.Get", "refused"), 1.0);
    assert_eq!(m["ferry_volumes{backend=\"local\"}"], 2.0);
    assert_eq!(m["ferry_active_mounts"], 2.0);
    assert_eq!(m["ferry_attached_volumes"], 1.0);

    // Histogram buckets are cumulative and end at the count.
    let labels = "method=\"VolumeDriver.Mount\",outcome=\"ok\"";
    let buckets: Vec<f64> = m
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("ferry_call_duration_seconds_bucket{{{labels},")))
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(buckets.len(), 17);
    let inf = m[&format!("ferry_call_duration_seconds_bucket{{{labels},le=\"+Inf\"}}")];
    assert_eq!(
        inf,
        m[&format!("ferry_call_duration_seconds_count{{{labels}}}")]
    );
    assert_eq!(inf, 2.0);
    let mut ordered: Vec<(f64, f64)> = m
        .iter()
        .filter_map(|(k, v)| {
            let le = k.strip_prefix(&format!(
                "ferry_call_duration_seconds_bucket{{{labels},le=\""
            ))?;
            let le = le.strip_suffix("\"}")?;
            Some((
                if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                },
                *v,
            ))
        })
        .collect();
    ordered.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    assert!(ordered.windows(2).all(|w| w[0].1 <= w[1].1), "{ordered:?}");
    assert!(m[&format!("ferry_call_duration_seconds_sum{{{labels}}}")] > 0.0);

    // Nothing but /metrics is served, and no volume name leaks into the metrics.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    assert!(!scrape(port).contains("\"b\""));
    d.unmount("b", "m1");
    d.unmount("b", "m1");
}

#[test]
fn off_by_default() {
    let d = Daemon::start();
    assert!(!d.log_text().contains("metrics endpoint serving"));
}

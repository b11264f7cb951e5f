//! A strict EBS direct APIs emulator for tests: the rules of the real service that moto does not enforce
//! (see `shared/docs/test-peers.md`), over the same REST/JSON wire protocol, on a loopback port.
//!
//! Enforced: blocks of exactly 524288 bytes, the base64 SHA-256 checksum of every block, block indices inside
//! the volume, writes only while a snapshot is pending, the exact `ChangedBlocksCount` at completion, a
//! parent that exists and is completed, children inheriting their parent's blocks when listed and read,
//! block tokens checked on reads, pagination of listings with a small page size, ListChangedBlocks between a
//! snapshot and its ancestor, and deletion as EBS does it: a deleted snapshot is gone, and its children keep
//! the blocks they read through it. Injected on demand:
//! throttling (every Nth call answers `ThrottlingException`, which a client must retry) and a fixed latency
//! per call (every answer leaves that long after its request arrived, the emulator's work included). It
//! counts calls and blocks put so tests can assert exactly what was shipped.
//!
//! Signatures are not checked: the emulator tests the client's use of the API, not AWS authentication.
//!
//! Include it with `#[path = "common/ebs_strict.rs"] mod ebs_strict;`.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const BLOCK_SIZE: usize = 524_288;
/// Blocks per GiB of volume size.
const BLOCKS_PER_GIB: u64 = (1 << 30) / BLOCK_SIZE as u64;

#[derive(Debug)]
struct Snapshot {
    volume_size_gib: u64,
    parent: Option<String>,
    tags: Vec<(String, String)>,
    completed: bool,
    /// When it was started, in seconds since the epoch.
    started: u64,
    /// The blocks written to this snapshot itself, by index.
    /// With each block its checksum, computed once when it was written: hashing on every read while
    /// holding the state lock would serialize all reads and cap the emulator below what it emulates.
    blocks: BTreeMap<u64, (Bytes, String)>,
}

#[derive(Debug, Default)]
struct State {
    snapshots: HashMap<String, Snapshot>,
    /// ClientToken to snapshot id, so a retried StartSnapshot returns the same snapshot.
    tokens: HashMap<String, String>,
}

/// Knobs and counters shared between the server and the test.
#[derive(Debug, Default)]
pub struct Faults {
    /// Every Nth call (counting all calls) is throttled; 0 never.
    pub throttle_every: AtomicU64,
    /// Added before every answer, in milliseconds.
    pub latency_ms: AtomicU64,
}

#[derive(Debug, Default)]
pub struct Counters {
    pub calls: AtomicU64,
    pub throttled: AtomicU64,
    pub blocks_put: AtomicU64,
    pub blocks_got: AtomicU64,
    pub list_pages: AtomicU64,
    pub ec2_calls: AtomicU64,
    pub deleted: AtomicU64,
    /// ListChangedBlocks pages answered.
    pub changed_lists: AtomicU64,
}

struct Inner {
    state: Mutex<State>,
    faults: Faults,
    counters: Counters,
    page_size: usize,
    next_id: AtomicU64,
}

/// A running emulator; dropping it stops the server.
pub struct StrictEbs {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StrictEbs {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StrictEbs {
    /// Starts on a free loopback port inside the current Tokio runtime. Listings answer at most
    /// `page_size` blocks per page, whatever the client asks for (the real service may also answer fewer).
    pub async fn start(page_size: usize) -> StrictEbs {
        StrictEbs::start_on([127, 0, 0, 1].into(), page_size).await
    }

    /// As `start`, listening on `ip` (such as a test network's gateway, which other network namespaces
    /// reach) instead of loopback.
    pub async fn start_on(ip: std::net::IpAddr, page_size: usize) -> StrictEbs {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            faults: Faults::default(),
            counters: Counters::default(),
            page_size: page_size.max(1),
            next_id: AtomicU64::new(1),
        });
        let served = inner.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                // As a real HTTP front end does: a reply's last segment must not wait for the client's
                // delayed ACK of the one before.
                let _ = stream.set_nodelay(true);
                let inner = served.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let inner = inner.clone();
                        async move { Ok::<_, std::convert::Infallible>(inner.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        StrictEbs { addr, inner, task }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn faults(&self) -> &Faults {
        &self.inner.faults
    }

    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// The indices written to one snapshot itself (not inherited), ascending.
    pub fn own_blocks(&self, snapshot: &str) -> Vec<u64> {
        let state = self.inner.state.lock().unwrap();
        state
            .snapshots
            .get(snapshot)
            .map(|s| s.blocks.keys().copied().collect())
            .unwrap_or_default()
    }

    pub fn is_completed(&self, snapshot: &str) -> bool {
        let state = self.inner.state.lock().unwrap();
        state.snapshots.get(snapshot).is_some_and(|s| s.completed)
    }

    /// Every snapshot id the emulator holds (a deleted one is gone, its children took over its blocks).
    pub fn snapshot_ids(&self) -> Vec<String> {
        let state = self.inner.state.lock().unwrap();
        let mut ids: Vec<String> = state.snapshots.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Sets one tag of a snapshot as EC2's CreateTags would, for tests that stand in for time passing.
    pub fn set_tag(&self, snapshot: &str, key: &str, value: &str) {
        let mut state = self.inner.state.lock().unwrap();
        let s = state.snapshots.get_mut(snapshot).expect("no such snapshot");
        s.tags.retain(|(k, _)| k != key);
        s.tags.push((key.to_string(), value.to_string()));
    }

    /// The completed snapshots Ferry made for one generation of one volume (by its tags).
    pub fn completed_snapshots(&self, volume: &str, generation: u64) -> Vec<String> {
        self.snapshot_ids()
            .into_iter()
            .filter(|id| {
                let tags = self.tags(id);
                let has = |k: &str, v: &str| tags.iter().any(|(tk, tv)| tk == k && tv == v);
                self.is_completed(id)
                    && has("ferry:volume", volume)
                    && has("ferry:generation", &generation.to_string())
            })
            .collect()
    }

    /// The completed snapshots Ferry made for one volume, by generation (from their tags).
    pub fn completed_by_generation(&self, volume: &str) -> BTreeMap<u64, String> {
        self.snapshot_ids()
            .into_iter()
            .filter(|id| self.is_completed(id))
            .filter_map(|id| {
                let tags = self.tags(&id);
                let tag = |k: &str| tags.iter().find(|(tk, _)| tk == k).map(|(_, v)| v.clone());
                if tag("ferry:volume").as_deref() != Some(volume) {
                    return None;
                }
                Some((tag("ferry:generation")?.parse().ok()?, id.clone()))
            })
            .collect()
    }

    pub fn tags(&self, snapshot: &str) -> Vec<(String, String)> {
        let state = self.inner.state.lock().unwrap();
        state
            .snapshots
            .get(snapshot)
            .map(|s| s.tags.clone())
            .unwrap_or_default()
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: Value) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// A restJson1 error: the type in `x-amzn-ErrorType`, as the SDKs read it.
fn error(status: StatusCode, kind: &str, reason: &str, message: &str) -> Reply {
    let mut r = reply(status, json!({ "Message": message, "Reason": reason }));
    r.headers_mut()
        .insert("x-amzn-ErrorType", kind.parse().unwrap());
    r
}

fn invalid(reason: &str, message: &str) -> Reply {
    error(
        StatusCode::BAD_REQUEST,
        "ValidationException",
        reason,
        message,
    )
}

fn not_found(what: &str) -> Reply {
    error(
        StatusCode::NOT_FOUND,
        "ResourceNotFoundException",
        "SNAPSHOT_NOT_FOUND",
        &format!("{what} does not exist"),
    )
}

fn ec2_reply(body: &str) -> Reply {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/xml;charset=UTF-8")
        .body(Full::new(Bytes::from(format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n{body}"
        ))))
        .unwrap()
}

/// An EC2 query-API error, as the SDKs parse it.
fn ec2_error(status: StatusCode, code: &str, message: &str) -> Reply {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>\
         <Message>{}</Message></Error></Errors><RequestID>strict</RequestID></Response>",
        xml(message)
    );
    Response::builder()
        .status(status)
        .header("content-type", "text/xml;charset=UTF-8")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Decodes one application/x-www-form-urlencoded component.
fn form_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Sleeps until `deadline` on the blocking pool: tokio's timer has 1 ms ticks and rounds up (a 20 ms
/// sleep took 21.1 ms on average here, 5 % of every call's budget), a thread's sleep ends within ~0.1 ms.
async fn wait_until(deadline: std::time::Instant) {
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    if !left.is_zero() {
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(left)).await;
    }
}

fn checksum(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(data))
}

fn header<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A block token names the snapshot it was listed from and the index, so reads with a token from
/// another listing are refused like the real service refuses them.
fn block_token(snapshot: &str, index: u64) -> String {
    format!("{snapshot}.{index}")
}

impl Inner {
    /// Answers `latency` after the request arrived: the emulator's own work (reading a block, checking
    /// its checksum) happens inside that time, as a remote service's does inside its latency, instead of
    /// being added to it by a machine whose cores the client shares.
    async fn handle(&self, req: Request<Incoming>) -> Reply {
        let latency = self.faults.latency_ms.load(Ordering::Relaxed);
        let deadline = std::time::Instant::now() + Duration::from_millis(latency);
        let reply = self.serve(req).await;
        if latency > 0 {
            wait_until(deadline).await;
        }
        reply
    }

    async fn serve(&self, req: Request<Incoming>) -> Reply {
        let n = self.counters.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let every = self.faults.throttle_every.load(Ordering::Relaxed);
        let is_ec2 = req.method() == Method::POST && req.uri().path() == "/";
        if every > 0 && n.is_multiple_of(every) {
            self.counters.throttled.fetch_add(1, Ordering::Relaxed);
            if is_ec2 {
                return ec2_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "RequestLimitExceeded",
                    "Request limit exceeded.",
                );
            }
            return error(
                StatusCode::BAD_REQUEST,
                "ThrottlingException",
                "ACCOUNT_THROTTLED",
                "rate exceeded",
            );
        }
        let path: Vec<String> = req
            .uri()
            .path()
            .trim_matches('/')
            .split('/')
            .map(str::to_string)
            .collect();
        let parts: Vec<&str> = path.iter().map(String::as_str).collect();
        if is_ec2 {
            return self.ec2(req).await;
        }
        match (req.method().clone(), parts.as_slice()) {
            (Method::POST, ["snapshots"]) => self.start_snapshot(req).await,
            (Method::PUT, ["snapshots", id, "blocks", index]) => {
                let (id, index) = (id.to_string(), index.to_string());
                self.put_block(req, &id, &index).await
            }
            (Method::POST, ["snapshots", "completion", id]) => {
                let id = id.to_string();
                self.complete(&req, &id)
            }
            (Method::GET, ["snapshots", id, "changedblocks"]) => {
                let id = id.to_string();
                self.list_changed_blocks(&req, &id)
            }
            (Method::GET, ["snapshots", id, "blocks"]) => {
                let id = id.to_string();
                self.list_blocks(&req, &id)
            }
            (Method::GET, ["snapshots", id, "blocks", index]) => {
                let (id, index) = (id.to_string(), index.to_string());
                self.get_block(&req, &id, &index)
            }
            _ => error(
                StatusCode::NOT_FOUND,
                "UnknownOperationException",
                "",
                &format!(
                    "the strict emulator does not serve {} {}",
                    req.method(),
                    req.uri()
                ),
            ),
        }
    }

    async fn start_snapshot(&self, req: Request<Incoming>) -> Reply {
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return invalid("", &format!("cannot read the body: {e}")),
        };
        let Ok(v) = serde_json::from_slice::<Value>(&body) else {
            return invalid("", "the body is not JSON");
        };
        let Some(size) = v["VolumeSize"].as_u64().filter(|s| *s >= 1) else {
            return invalid("", "VolumeSize (GiB, at least 1) is required");
        };
        let parent = v["ParentSnapshotId"].as_str().map(str::to_string);
        let tags: Vec<(String, String)> = v["Tags"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|t| {
                        (
                            t["Key"].as_str().unwrap_or_default().to_string(),
                            t["Value"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut state = self.state.lock().unwrap();
        if let Some(token) = v["ClientToken"].as_str() {
            if let Some(id) = state.tokens.get(token) {
                let s = &state.snapshots[id];
                return reply(StatusCode::CREATED, self.describe(id, s));
            }
        }
        if let Some(p) = &parent {
            match state.snapshots.get(p) {
                None => return not_found(&format!("parent snapshot {p}")),
                Some(ps) if !ps.completed => {
                    return invalid(
                        "INVALID_PARENT_SNAPSHOT_ID",
                        &format!("parent snapshot {p} is not completed"),
                    )
                }
                Some(ps) if ps.volume_size_gib > size => {
                    return invalid(
                        "INVALID_VOLUME_SIZE",
                        "the volume size is smaller than the parent's",
                    )
                }
                Some(_) => {}
            }
        }
        let id = format!(
            "snap-{:017x}",
            self.next_id.fetch_add(1, Ordering::Relaxed) * 0x9e37_79b9
        );
        let snap = Snapshot {
            volume_size_gib: size,
            parent,
            tags,
            completed: false,
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            blocks: BTreeMap::new(),
        };
        let described = self.describe(&id, &snap);
        if let Some(token) = v["ClientToken"].as_str() {
            state.tokens.insert(token.to_string(), id.clone());
        }
        state.snapshots.insert(id, snap);
        reply(StatusCode::CREATED, described)
    }

    /// The EC2 query-API calls Ferry makes: DescribeSnapshots (by id, or by tag filters), DeleteSnapshot,
    /// and CreateTags/DeleteTags on snapshots. EC2 answers in XML.
    async fn ec2(&self, req: Request<Incoming>) -> Reply {
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return ec2_error(StatusCode::BAD_REQUEST, "InvalidRequest", "unreadable body")
            }
        };
        let form: Vec<(String, String)> = String::from_utf8_lossy(&body)
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (form_decode(k), form_decode(v)))
            .collect();
        let get = |key: &str| form.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        self.counters.ec2_calls.fetch_add(1, Ordering::Relaxed);
        match get("Action").as_deref() {
            Some("DescribeSnapshots") => {
                let ids: Vec<String> = form
                    .iter()
                    .filter(|(k, _)| k.starts_with("SnapshotId."))
                    .map(|(_, v)| v.clone())
                    .collect();
                // Filter.N.Name=tag:KEY with Filter.N.Value.M values.
                let mut filters: Vec<(String, Vec<String>)> = Vec::new();
                for n in 1.. {
                    let Some(name) = get(&format!("Filter.{n}.Name")) else {
                        break;
                    };
                    let values = form
                        .iter()
                        .filter(|(k, _)| k.starts_with(&format!("Filter.{n}.Value.")))
                        .map(|(_, v)| v.clone())
                        .collect();
                    filters.push((name, values));
                }
                let state = self.state.lock().unwrap();
                for id in &ids {
                    if !state.snapshots.contains_key(id) {
                        return ec2_error(
                            StatusCode::BAD_REQUEST,
                            "InvalidSnapshot.NotFound",
                            &format!("The snapshot '{id}' does not exist."),
                        );
                    }
                }
                let mut items = String::new();
                let mut sorted: Vec<_> = state.snapshots.iter().collect();
                sorted.sort_by(|a, b| a.0.cmp(b.0));
                for (id, snap) in sorted {
                    if !ids.is_empty() && !ids.contains(id) {
                        continue;
                    }
                    let matches = filters.iter().all(|(name, values)| {
                        let Some(key) = name.strip_prefix("tag:") else {
                            return false;
                        };
                        snap.tags
                            .iter()
                            .any(|(k, v)| k == key && values.contains(v))
                    });
                    if !matches {
                        continue;
                    }
                    let tags: String = snap
                        .tags
                        .iter()
                        .map(|(k, v)| {
                            format!(
                                "<item><key>{}</key><value>{}</value></item>",
                                xml(k),
                                xml(v)
                            )
                        })
                        .collect();
                    let status = if snap.completed {
                        "completed"
                    } else {
                        "pending"
                    };
                    items.push_str(&format!(
                        "<item><snapshotId>{id}</snapshotId><status>{status}</status>\
                         <volumeSize>{}</volumeSize><ownerId>123456789012</ownerId>\
                         <startTime>{}</startTime><tagSet>{tags}</tagSet></item>",
                        snap.volume_size_gib,
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + Duration::from_secs(snap.started)
                        )
                    ));
                }
                ec2_reply(&format!(
                    "<DescribeSnapshotsResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\">\
                     <requestId>strict</requestId><snapshotSet>{items}</snapshotSet></DescribeSnapshotsResponse>"
                ))
            }
            Some("DeleteSnapshot") => {
                let id = get("SnapshotId").unwrap_or_default();
                let mut state = self.state.lock().unwrap();
                let Some(gone) = state.snapshots.remove(&id) else {
                    return ec2_error(
                        StatusCode::BAD_REQUEST,
                        "InvalidSnapshot.NotFound",
                        &format!("The snapshot '{id}' does not exist."),
                    );
                };
                // Real EBS deletes a parent but keeps whatever its children still read through it: each
                // child takes over the blocks it did not overwrite, and the parent's parent, so every
                // child reads exactly what it read before, and the parent itself is gone for good.
                for child in state
                    .snapshots
                    .values_mut()
                    .filter(|s| s.parent.as_deref() == Some(id.as_str()))
                {
                    for (index, block) in &gone.blocks {
                        child.blocks.entry(*index).or_insert_with(|| block.clone());
                    }
                    child.parent = gone.parent.clone();
                }
                self.counters.deleted.fetch_add(1, Ordering::Relaxed);
                ec2_reply(
                    "<DeleteSnapshotResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\">\
                     <requestId>strict</requestId><return>true</return></DeleteSnapshotResponse>",
                )
            }
            Some(action @ ("CreateTags" | "DeleteTags")) => {
                let ids: Vec<String> = form
                    .iter()
                    .filter(|(k, _)| k.starts_with("ResourceId."))
                    .map(|(_, v)| v.clone())
                    .collect();
                // Tag.N.Key with an optional Tag.N.Value (required for CreateTags, as EC2 takes a
                // missing value as empty; for DeleteTags a value deletes the tag only if it matches).
                let mut given: Vec<(String, Option<String>)> = Vec::new();
                for n in 1.. {
                    let Some(key) = get(&format!("Tag.{n}.Key")) else {
                        break;
                    };
                    given.push((key, get(&format!("Tag.{n}.Value"))));
                }
                if ids.is_empty() || (action == "CreateTags" && given.is_empty()) {
                    return ec2_error(
                        StatusCode::BAD_REQUEST,
                        "MissingParameter",
                        "ResourceId.N and Tag.N.Key are required",
                    );
                }
                let mut state = self.state.lock().unwrap();
                for id in &ids {
                    if !state.snapshots.contains_key(id) {
                        return ec2_error(
                            StatusCode::BAD_REQUEST,
                            "InvalidSnapshot.NotFound",
                            &format!("The snapshot '{id}' does not exist."),
                        );
                    }
                }
                for id in &ids {
                    let Some(snap) = state.snapshots.get_mut(id) else {
                        continue;
                    };
                    for (key, value) in &given {
                        if action == "CreateTags" {
                            let value = value.clone().unwrap_or_default();
                            match snap.tags.iter_mut().find(|(k, _)| k == key) {
                                Some(t) => t.1 = value,
                                None => snap.tags.push((key.clone(), value)),
                            }
                        } else {
                            snap.tags.retain(|(k, v)| {
                                k != key || value.as_ref().is_some_and(|w| w != v)
                            });
                        }
                    }
                }
                ec2_reply(&format!(
                    "<{action}Response xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\">\
                     <requestId>strict</requestId><return>true</return></{action}Response>"
                ))
            }
            other => ec2_error(
                StatusCode::BAD_REQUEST,
                "InvalidAction",
                &format!("the strict emulator does not serve EC2 action {other:?}"),
            ),
        }
    }

    fn describe(&self, id: &str, s: &Snapshot) -> Value {
        let tags: Vec<Value> = s
            .tags
            .iter()
            .map(|(k, v)| json!({ "Key": k, "Value": v }))
            .collect();
        let mut d = json!({
            "SnapshotId": id,
            "OwnerId": "123456789012",
            "Status": if s.completed { "completed" } else { "pending" },
            "StartTime": s.started,
            "VolumeSize": s.volume_size_gib,
            "BlockSize": BLOCK_SIZE,
            "Tags": tags,
        });
        if let Some(p) = &s.parent {
            d["ParentSnapshotId"] = json!(p);
        }
        d
    }

    async fn put_block(&self, req: Request<Incoming>, id: &str, index: &str) -> Reply {
        let Ok(index) = index.parse::<u64>() else {
            return invalid("INVALID_BLOCK", "the block index is not a number");
        };
        let length = header(&req, "x-amz-data-length").and_then(|l| l.parse::<usize>().ok());
        let sum = header(&req, "x-amz-checksum").map(str::to_string);
        let algorithm = header(&req, "x-amz-checksum-algorithm").map(str::to_string);
        let data = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return invalid("", &format!("cannot read the block: {e}")),
        };
        if length != Some(BLOCK_SIZE) || data.len() != BLOCK_SIZE {
            return invalid(
                "INVALID_DATA_LENGTH",
                &format!(
                    "blocks are exactly {BLOCK_SIZE} bytes (x-amz-Data-Length {length:?}, body {})",
                    data.len()
                ),
            );
        }
        if algorithm.as_deref() != Some("SHA256") {
            return invalid(
                "UNSUPPORTED_CHECKSUM_ALGORITHM",
                "x-amz-Checksum-Algorithm must be SHA256",
            );
        }
        let expected = checksum(&data);
        if sum.as_deref() != Some(expected.as_str()) {
            return invalid(
                "INVALID_CHECKSUM",
                "the block's checksum does not match its data",
            );
        }
        let mut state = self.state.lock().unwrap();
        let Some(s) = state.snapshots.get_mut(id) else {
            return not_found(&format!("snapshot {id}"));
        };
        if s.completed {
            return invalid(
                "INVALID_SNAPSHOT_STATE",
                &format!("snapshot {id} is completed; it takes no more writes"),
            );
        }
        if index >= s.volume_size_gib * BLOCKS_PER_GIB {
            return invalid(
                "INVALID_BLOCK",
                &format!("block {index} is outside the volume"),
            );
        }
        s.blocks.insert(index, (data, expected.clone()));
        self.counters.blocks_put.fetch_add(1, Ordering::Relaxed);
        Response::builder()
            .status(StatusCode::CREATED)
            .header("x-amz-Checksum", expected)
            .header("x-amz-Checksum-Algorithm", "SHA256")
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    fn complete(&self, req: &Request<Incoming>, id: &str) -> Reply {
        let count = header(req, "x-amz-changedblockscount").and_then(|c| c.parse::<u64>().ok());
        let mut state = self.state.lock().unwrap();
        let Some(s) = state.snapshots.get_mut(id) else {
            return not_found(&format!("snapshot {id}"));
        };
        if s.completed {
            return reply(StatusCode::ACCEPTED, json!({ "Status": "completed" }));
        }
        let written = s.blocks.len() as u64;
        if count != Some(written) {
            return invalid(
                "INVALID_CHANGED_BLOCKS_COUNT",
                &format!(
                    "x-amz-ChangedBlocksCount is {count:?}, but {written} blocks were written"
                ),
            );
        }
        s.completed = true;
        reply(StatusCode::ACCEPTED, json!({ "Status": "completed" }))
    }

    /// The snapshot whose copy of `index` a read of `id` sees: the nearest in the chain that wrote it.
    fn owner_of(state: &State, id: &str, index: u64) -> Option<(Bytes, String)> {
        let mut at = Some(id.to_string());
        while let Some(cur) = at {
            let s = state.snapshots.get(&cur)?;
            if let Some(data) = s.blocks.get(&index) {
                return Some(data.clone());
            }
            at = s.parent.clone();
        }
        None
    }

    fn visible_blocks(state: &State, id: &str) -> Vec<u64> {
        let mut all = std::collections::BTreeSet::new();
        let mut at = Some(id.to_string());
        while let Some(cur) = at {
            let Some(s) = state.snapshots.get(&cur) else {
                break;
            };
            all.extend(s.blocks.keys().copied());
            at = s.parent.clone();
        }
        all.into_iter().collect()
    }

    /// One page of a listing of the ascending block indices `all`, as the query asks (`maxResults`, at most
    /// the emulator's page size; `pageToken` or `startingBlockIndex`), with the token of the next page.
    fn page(
        &self,
        q: &HashMap<String, String>,
        all: Vec<u64>,
    ) -> Result<(Vec<u64>, Option<String>), Box<Reply>> {
        let asked = q
            .get("maxResults")
            .and_then(|m| m.parse::<usize>().ok())
            .unwrap_or(usize::MAX);
        let page = asked.min(self.page_size);
        let start = match q.get("pageToken") {
            Some(t) => match t.strip_prefix("after-").and_then(|n| n.parse::<u64>().ok()) {
                Some(n) => n + 1,
                None => {
                    return Err(Box::new(invalid(
                        "INVALID_PAGE_TOKEN",
                        "the page token is not one of ours",
                    )))
                }
            },
            None => q
                .get("startingBlockIndex")
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0),
        };
        let visible: Vec<u64> = all.into_iter().filter(|i| *i >= start).collect();
        let this: Vec<u64> = visible.iter().copied().take(page).collect();
        let next = (visible.len() > this.len())
            .then(|| this.last().map(|l| format!("after-{l}")))
            .flatten();
        Ok((this, next))
    }

    fn list_blocks(&self, req: &Request<Incoming>, id: &str) -> Reply {
        let q = query(req);
        let state = self.state.lock().unwrap();
        let Some(s) = state.snapshots.get(id) else {
            return not_found(&format!("snapshot {id}"));
        };
        if !s.completed {
            return invalid(
                "INVALID_SNAPSHOT_STATE",
                &format!("snapshot {id} is not completed"),
            );
        }
        let (this, next) = match self.page(&q, Self::visible_blocks(&state, id)) {
            Ok(p) => p,
            Err(reply) => return *reply,
        };
        let mut body = json!({
            "Blocks": this.iter().map(|i| json!({ "BlockIndex": i, "BlockToken": block_token(id, *i) })).collect::<Vec<_>>(),
            "VolumeSize": s.volume_size_gib,
            "BlockSize": BLOCK_SIZE,
            "ExpiryTime": 4_000_000_000u64,
        });
        if let Some(next) = next {
            body["NextToken"] = json!(next);
        }
        self.counters.list_pages.fetch_add(1, Ordering::Relaxed);
        reply(StatusCode::OK, body)
    }

    /// ListChangedBlocks: the blocks written after `firstSnapshotId` in the lineage of the second
    /// snapshot, `id` (every block of the second when there is no first), each with the tokens that read
    /// it from either snapshot. Both must be completed, and the first an ancestor of the second, as EBS
    /// requires.
    fn list_changed_blocks(&self, req: &Request<Incoming>, id: &str) -> Reply {
        let q = query(req);
        let second = &id.to_string();
        let first = q.get("firstSnapshotId");
        let state = self.state.lock().unwrap();
        for id in [Some(second), first].into_iter().flatten() {
            match state.snapshots.get(id.as_str()) {
                None => return not_found(&format!("snapshot {id}")),
                Some(s) if !s.completed => {
                    return invalid(
                        "INVALID_SNAPSHOT_STATE",
                        &format!("snapshot {id} is not completed"),
                    )
                }
                Some(_) => {}
            }
        }
        // The snapshots from the second back to (not including) the first.
        let mut path = Vec::new();
        let mut at = Some(second.clone());
        while let Some(cur) = at {
            if Some(&cur) == first {
                break;
            }
            let Some(s) = state.snapshots.get(&cur) else {
                break;
            };
            path.push(cur);
            at = s.parent.clone();
        }
        if let Some(f) = first {
            let reached = path
                .last()
                .and_then(|l| state.snapshots.get(l))
                .is_some_and(|s| s.parent.as_ref() == Some(f));
            if !reached && second != f {
                return invalid(
                    "INVALID_PARAMETER_COMBINATION",
                    &format!("snapshot {f} is not in the lineage of {second}"),
                );
            }
        }
        let changed: std::collections::BTreeSet<u64> = path
            .iter()
            .filter_map(|id| state.snapshots.get(id))
            .flat_map(|s| s.blocks.keys().copied())
            .collect();
        let (this, next) = match self.page(&q, changed.into_iter().collect()) {
            Ok(p) => p,
            Err(reply) => return *reply,
        };
        let first_has = |i: u64| first.is_some_and(|f| Self::owner_of(&state, f, i).is_some());
        let blocks: Vec<Value> = this
            .iter()
            .map(|i| {
                let mut b = json!({ "BlockIndex": i, "SecondBlockToken": block_token(second, *i) });
                if first_has(*i) {
                    b["FirstBlockToken"] = json!(block_token(first.unwrap(), *i));
                }
                b
            })
            .collect();
        let size = state.snapshots[second.as_str()].volume_size_gib;
        let mut body = json!({
            "ChangedBlocks": blocks,
            "VolumeSize": size,
            "BlockSize": BLOCK_SIZE,
            "ExpiryTime": 4_000_000_000u64,
        });
        if let Some(next) = next {
            body["NextToken"] = json!(next);
        }
        self.counters.list_pages.fetch_add(1, Ordering::Relaxed);
        self.counters.changed_lists.fetch_add(1, Ordering::Relaxed);
        reply(StatusCode::OK, body)
    }

    fn get_block(&self, req: &Request<Incoming>, id: &str, index: &str) -> Reply {
        let Ok(index) = index.parse::<u64>() else {
            return invalid("INVALID_BLOCK", "the block index is not a number");
        };
        let q = query(req);
        if q.get("blockToken").map(String::as_str) != Some(block_token(id, index).as_str()) {
            return invalid(
                "INVALID_BLOCK_TOKEN",
                "the block token does not come from a listing of this snapshot",
            );
        }
        let state = self.state.lock().unwrap();
        if !state.snapshots.get(id).is_some_and(|s| s.completed) {
            return not_found(&format!("completed snapshot {id}"));
        }
        let Some((data, sum)) = Self::owner_of(&state, id, index) else {
            return invalid("INVALID_BLOCK", &format!("block {index} was never written"));
        };
        drop(state);
        self.counters.blocks_got.fetch_add(1, Ordering::Relaxed);
        Response::builder()
            .status(StatusCode::OK)
            .header("x-amz-Data-Length", BLOCK_SIZE.to_string())
            .header("x-amz-Checksum", sum)
            .header("x-amz-Checksum-Algorithm", "SHA256")
            .header("content-type", "application/octet-stream")
            .body(Full::new(data))
            .unwrap()
    }
}

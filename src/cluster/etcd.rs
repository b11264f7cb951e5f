//! A small etcd v3 client over etcd's JSON gateway (`/v3/...` on every member's client URL), built on the
//! HTTP client Ferry already has. The gRPC client crates need `protoc` on every machine that builds Ferry;
//! the gateway needs nothing, and Ferry uses only KV, transactions, leases, watches and authentication.
//!
//! Every call tries the member that answered last, then the others in turn, so a dead member costs one
//! connect timeout and is then skipped: no call fails while one member answers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

use crate::sync::Recover;

#[derive(Clone, Debug, thiserror::Error)]
pub enum EtcdError {
    /// No member answered (connection refused, timed out, or every member said it is unavailable).
    #[error("no etcd member answered ({0})")]
    Unavailable(String),
    /// A member answered with an error that another member would answer too.
    #[error("etcd refused the request: {0}")]
    Rejected(String),
    #[error("etcd sent an answer Ferry cannot read: {0}")]
    BadAnswer(String),
}

/// How to reach and log in to etcd.
#[derive(Clone)]
pub struct EtcdSettings {
    pub endpoints: Vec<String>,
    /// The TLS client set-up, for `https://` endpoints.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// User and password (etcd's own authentication).
    pub auth: Option<(String, String)>,
    /// How long one attempt against one member may take.
    pub attempt_timeout: Duration,
}

impl std::fmt::Debug for EtcdSettings {
    // The password is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSettings")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls.is_some())
            .field("user", &self.auth.as_ref().map(|a| &a.0))
            .finish()
    }
}

#[derive(Clone, Debug)]
struct Endpoint {
    tls: bool,
    host: String,
    port: u16,
}

fn parse_endpoint(url: &str) -> Result<Endpoint, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else {
        return Err(format!(
            "etcd endpoint {url:?} must start with http:// or https://"
        ));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = if let Some(h) = rest.strip_prefix('[') {
        let (h, p) = h
            .split_once("]:")
            .ok_or_else(|| format!("etcd endpoint {url:?} needs a port"))?;
        (h.to_string(), p)
    } else {
        let (h, p) = rest.rsplit_once(':').ok_or_else(|| {
            format!("etcd endpoint {url:?} needs a port, as in http://10.0.0.1:2379")
        })?;
        (h.to_string(), p)
    };
    let port = port
        .parse()
        .map_err(|_| format!("etcd endpoint {url:?} has an invalid port"))?;
    if host.is_empty() || host.contains('/') {
        return Err(format!("etcd endpoint {url:?} has no valid host"));
    }
    Ok(Endpoint { tls, host, port })
}

/// Validates endpoint URLs, for configuration errors at start-up.
pub fn check_endpoints(urls: &[String]) -> Result<(), String> {
    if urls.is_empty() {
        return Err("cluster.etcd lists no endpoint".into());
    }
    for u in urls {
        parse_endpoint(u)?;
    }
    Ok(())
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(s: &str) -> Result<Vec<u8>, EtcdError> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| EtcdError::BadAnswer(format!("bad base64: {e}")))
}

/// etcd's JSON gateway writes 64-bit numbers as strings.
fn de_i64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        S(String),
        N(i64),
    }
    match N::deserialize(d)? {
        N::S(s) => s.parse().map_err(serde::de::Error::custom),
        N::N(n) => Ok(n),
    }
}

#[derive(Deserialize)]
struct RawKv {
    #[serde(default)]
    key: String,
    #[serde(default, deserialize_with = "de_i64")]
    create_revision: i64,
    #[serde(default, deserialize_with = "de_i64")]
    mod_revision: i64,
    #[serde(default, deserialize_with = "de_i64")]
    version: i64,
    #[serde(default)]
    value: String,
    #[serde(default, deserialize_with = "de_i64")]
    lease: i64,
}

/// One key with its revisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    pub lease: i64,
}

impl TryFrom<RawKv> for Kv {
    type Error = EtcdError;
    fn try_from(r: RawKv) -> Result<Self, EtcdError> {
        Ok(Kv {
            key: String::from_utf8(unb64(&r.key)?)
                .map_err(|_| EtcdError::BadAnswer("a key is not UTF-8".into()))?,
            value: unb64(&r.value)?,
            create_revision: r.create_revision,
            mod_revision: r.mod_revision,
            version: r.version,
            lease: r.lease,
        })
    }
}

#[derive(Deserialize, Default)]
struct RawHeader {
    #[serde(default, deserialize_with = "de_i64")]
    revision: i64,
}

/// A condition of a transaction.
#[derive(Clone, Debug)]
pub enum Cmp {
    /// The key's create revision equals this (0: the key does not exist).
    CreateRevision(String, i64),
    /// The key's last modification revision equals this.
    ModRevision(String, i64),
}

/// An operation of a transaction.
#[derive(Clone, Debug)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: i64,
    },
    Delete {
        key: String,
    },
    /// Every key under a prefix.
    Range {
        prefix: String,
    },
    /// One key.
    Get {
        key: String,
    },
}

/// What one operation of a transaction answered: the keys read by a range, nothing otherwise.
#[derive(Clone, Debug, Default)]
pub struct OpResult {
    pub kvs: Vec<Kv>,
}

#[derive(Clone, Debug)]
pub struct TxnResult {
    pub succeeded: bool,
    /// The store's revision after the transaction: the create revision of a key it created.
    pub revision: i64,
    pub results: Vec<OpResult>,
}

/// The end of the range of every key starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn cmp_json(c: &Cmp) -> Value {
    match c {
        Cmp::CreateRevision(k, r) => json!({
            "key": b64(k.as_bytes()), "target": "CREATE", "result": "EQUAL", "create_revision": r.to_string()
        }),
        Cmp::ModRevision(k, r) => json!({
            "key": b64(k.as_bytes()), "target": "MOD", "result": "EQUAL", "mod_revision": r.to_string()
        }),
    }
}

fn op_json(o: &Op) -> Value {
    match o {
        Op::Put { key, value, lease } => {
            let mut put = json!({"key": b64(key.as_bytes()), "value": b64(value)});
            if *lease != 0 {
                put["lease"] = Value::String(lease.to_string());
            }
            json!({ "request_put": put })
        }
        Op::Delete { key } => json!({"request_delete_range": {"key": b64(key.as_bytes())}}),
        Op::Range { prefix } => json!({"request_range": {
            "key": b64(prefix.as_bytes()), "range_end": b64(&prefix_end(prefix))
        }}),
        Op::Get { key } => json!({"request_range": {"key": b64(key.as_bytes())}}),
    }
}

/// A change seen by a watch.
#[derive(Clone, Debug)]
pub enum Event {
    Put(Kv),
    /// The key that was deleted, and the revision of the deletion.
    Delete {
        key: String,
        revision: i64,
    },
}

/// What a watch stream delivers.
#[derive(Debug)]
pub enum WatchMessage {
    Events(Vec<Event>),
    /// The revision to resume from was compacted away: read everything again.
    Compacted,
}

const AUTHENTICATE: &str = "/v3/auth/authenticate";

/// The client. Cheap to share behind an `Arc`.
pub struct EtcdClient {
    endpoints: Vec<Endpoint>,
    urls: Vec<String>,
    settings: EtcdSettings,
    /// The member that answered last, tried first.
    preferred: AtomicUsize,
    /// The authentication token, once logged in.
    token: Mutex<Option<String>>,
}

impl std::fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdClient")
            .field("endpoints", &self.urls)
            .finish()
    }
}

type Conn = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

impl EtcdClient {
    pub fn new(settings: EtcdSettings) -> Result<Self, String> {
        check_endpoints(&settings.endpoints)?;
        let endpoints = settings
            .endpoints
            .iter()
            .map(|u| parse_endpoint(u))
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.iter().any(|e| e.tls) && settings.tls.is_none() {
            return Err("an https:// etcd endpoint needs cluster.ca (the CA that signed etcd's certificate)".into());
        }
        Ok(EtcdClient {
            endpoints,
            urls: settings.endpoints.clone(),
            settings,
            preferred: AtomicUsize::new(0),
            token: Mutex::new(None),
        })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.urls
    }

    /// Makes the next call start with the next member: the one tried first did not answer in time (a hung
    /// member accepts connections and then says nothing, which only the caller's deadline notices).
    pub fn rotate(&self) {
        let n = self.endpoints.len();
        let _ = self
            .preferred
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| Some((p + 1) % n));
    }

    async fn connect(&self, ep: &Endpoint) -> Result<Conn, String> {
        let addr = format!("{}:{}", ep.host, ep.port);
        let tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        macro_rules! handshake {
            ($io:expr) => {{
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new($io))
                    .await
                    .map_err(|e| format!("{addr}: {e}"))?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                sender
            }};
        }
        if ep.tls {
            let Some(cfg) = self.settings.tls.clone() else {
                return Err(format!("{addr}: https needs cluster.ca"));
            };
            let name = rustls::pki_types::ServerName::try_from(ep.host.clone())
                .map_err(|e| format!("{addr}: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("{addr}: TLS: {e}"))?;
            Ok(handshake!(tls))
        } else {
            Ok(handshake!(tcp))
        }
    }

    fn request(&self, ep: &Endpoint, path: &str, body: &Value) -> hyper::Request<Full<Bytes>> {
        let mut b = hyper::Request::post(path)
            .header(hyper::header::HOST, format!("{}:{}", ep.host, ep.port))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            // etcd 3.4 tells the gateway's requests from direct gRPC ones by this header. Without it a
            // request without a token runs as the user named by the CommonName of the certificate the
            // gateway presents to etcd (the server's own), which is answered "permission denied", or
            // allowed if a user of that name exists; with it, etcd answers "user name is empty" and the
            // client logs in.
            .header(hyper::header::ACCEPT, "application/json");
        if let Some(t) = self.token.lock().recover().as_ref() {
            b = b.header(hyper::header::AUTHORIZATION, t.as_str());
        }
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        b.body(Full::new(Bytes::from(bytes)))
            .unwrap_or_else(|_| hyper::Request::new(Full::new(Bytes::new())))
    }

    /// One attempt against one member: the answer's JSON, or why it failed and whether another member
    /// might do better.
    async fn attempt(&self, ep: &Endpoint, path: &str, body: &Value) -> Result<Value, Attempt> {
        let work = async {
            let mut conn = self.connect(ep).await.map_err(Attempt::Retry)?;
            let resp = conn
                .send_request(self.request(ep, path, body))
                .await
                .map_err(|e| Attempt::Retry(e.to_string()))?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| Attempt::Retry(e.to_string()))?
                .to_bytes();
            let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
                Attempt::Retry(format!(
                    "HTTP {status}, not JSON ({e}): {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                ))
            })?;
            if let Some(err) = grpc_error(&v) {
                return Err(err);
            }
            if !status.is_success() {
                return Err(Attempt::Retry(format!("HTTP {status}")));
            }
            Ok(v)
        };
        match tokio::time::timeout(self.settings.attempt_timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(Attempt::Retry(format!(
                "{}:{} did not answer within {} ms",
                ep.host,
                ep.port,
                self.settings.attempt_timeout.as_millis()
            ))),
        }
    }

    /// Calls a gateway path on the first member that answers.
    pub async fn call(&self, path: &str, body: Value) -> Result<Value, EtcdError> {
        let mut relogged = false;
        loop {
            let mut failures = Vec::new();
            let n = self.endpoints.len();
            let start = self.preferred.load(Ordering::Relaxed) % n;
            let mut auth_failed = false;
            for i in 0..n {
                let idx = (start + i) % n;
                match self.attempt(&self.endpoints[idx], path, &body).await {
                    Ok(v) => {
                        self.preferred.store(idx, Ordering::Relaxed);
                        return Ok(v);
                    }
                    Err(Attempt::Retry(why)) => failures.push(why),
                    Err(Attempt::Auth(why)) => {
                        auth_failed = true;
                        failures.push(why);
                        break;
                    }
                    Err(Attempt::Fatal(why)) => return Err(EtcdError::Rejected(why)),
                }
            }
            // Logging in answers through this same loop; its own auth failure must not log in again.
            if auth_failed && !relogged && self.settings.auth.is_some() && path != AUTHENTICATE {
                relogged = true;
                self.login().await?;
                continue;
            }
            if auth_failed && self.settings.auth.is_none() {
                return Err(EtcdError::Rejected(format!(
                    "etcd wants a user ({}); set cluster.user and cluster.password_file",
                    failures.join("; ")
                )));
            }
            return Err(EtcdError::Unavailable(failures.join("; ")));
        }
    }

    /// Logs in with the configured user and password (once at start, and again when a token expires).
    pub async fn login(&self) -> Result<(), EtcdError> {
        let Some((user, password)) = self.settings.auth.clone() else {
            return Ok(());
        };
        *self.token.lock().recover() = None;
        let v = Box::pin(self.call(
            AUTHENTICATE,
            json!({"name": user, "password": password}),
        ))
        .await
        .map_err(|e| match e {
            // Never echo anything that might contain the password.
            EtcdError::Rejected(m) => EtcdError::Rejected(format!(
                "login as etcd user {user:?} failed: {m}; check cluster.user and cluster.password_file"
            )),
            other => other,
        })?;
        let token = v
            .get("token")
            .and_then(Value::as_str)
            .ok_or_else(|| EtcdError::BadAnswer("authenticate answered no token".into()))?;
        *self.token.lock().recover() = Some(token.to_string());
        // Tells an operator (and the tests) how often tokens lapse: each login after the first is one.
        tracing::debug!(user = %user, "logged in to etcd");
        Ok(())
    }

    /// Every key under `prefix`, with the store's revision at the time of the read.
    pub async fn range_prefix(&self, prefix: &str) -> Result<(Vec<Kv>, i64), EtcdError> {
        let v = self
            .call(
                "/v3/kv/range",
                json!({"key": b64(prefix.as_bytes()), "range_end": b64(&prefix_end(prefix))}),
            )
            .await?;
        let revision = header_revision(&v)?;
        Ok((kvs_of(&v)?, revision))
    }

    /// One key.
    pub async fn get(&self, key: &str) -> Result<Option<Kv>, EtcdError> {
        let v = self
            .call("/v3/kv/range", json!({"key": b64(key.as_bytes())}))
            .await?;
        Ok(kvs_of(&v)?.into_iter().next())
    }

    pub async fn put(&self, key: &str, value: &[u8], lease: i64) -> Result<i64, EtcdError> {
        let mut body = json!({"key": b64(key.as_bytes()), "value": b64(value)});
        if lease != 0 {
            body["lease"] = Value::String(lease.to_string());
        }
        let v = self.call("/v3/kv/put", body).await?;
        header_revision(&v)
    }

    pub async fn txn(
        &self,
        compare: &[Cmp],
        success: &[Op],
        failure: &[Op],
    ) -> Result<TxnResult, EtcdError> {
        let body = json!({
            "compare": compare.iter().map(cmp_json).collect::<Vec<_>>(),
            "success": success.iter().map(op_json).collect::<Vec<_>>(),
            "failure": failure.iter().map(op_json).collect::<Vec<_>>(),
        });
        let v = self.call("/v3/kv/txn", body).await?;
        let succeeded = v.get("succeeded").and_then(Value::as_bool).unwrap_or(false);
        let revision = header_revision(&v)?;
        let mut results = Vec::new();
        if let Some(rs) = v.get("responses").and_then(Value::as_array) {
            for r in rs {
                let kvs = match r.get("response_range") {
                    Some(range) => kvs_of(range)?,
                    None => Vec::new(),
                };
                results.push(OpResult { kvs });
            }
        }
        Ok(TxnResult {
            succeeded,
            revision,
            results,
        })
    }

    /// Grants a lease; returns its ID and TTL in seconds.
    pub async fn lease_grant(&self, ttl: i64) -> Result<(i64, i64), EtcdError> {
        let v = self
            .call("/v3/lease/grant", json!({"TTL": ttl.to_string()}))
            .await?;
        let id = num(&v, "ID")?;
        let ttl = num(&v, "TTL")?;
        if let Some(e) = v
            .get("error")
            .and_then(Value::as_str)
            .filter(|e| !e.is_empty())
        {
            return Err(EtcdError::Rejected(e.to_string()));
        }
        Ok((id, ttl))
    }

    /// Renews a lease once; returns its TTL, 0 when the lease no longer exists.
    pub async fn lease_keepalive(&self, id: i64) -> Result<i64, EtcdError> {
        // The gateway streams keep-alive answers; one request gets exactly one.
        let v = self
            .call_first("/v3/lease/keepalive", json!({"ID": id.to_string()}))
            .await?;
        let result = v.get("result").unwrap_or(&v);
        Ok(result
            .get("TTL")
            .map(|t| match t {
                Value::String(s) => s.parse().unwrap_or(0),
                Value::Number(n) => n.as_i64().unwrap_or(0),
                _ => 0,
            })
            .unwrap_or(0))
    }

    pub async fn lease_revoke(&self, id: i64) -> Result<(), EtcdError> {
        match self
            .call("/v3/lease/revoke", json!({"ID": id.to_string()}))
            .await
        {
            Ok(_) => Ok(()),
            // Already gone is what revoking wants.
            Err(EtcdError::Rejected(m)) if m.contains("not found") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Like `call`, for a streaming gateway path: the first JSON message of the stream.
    async fn call_first(&self, path: &str, body: Value) -> Result<Value, EtcdError> {
        let n = self.endpoints.len();
        let start = self.preferred.load(Ordering::Relaxed) % n;
        let mut failures = Vec::new();
        for i in 0..n {
            let idx = (start + i) % n;
            let ep = &self.endpoints[idx];
            let work = async {
                let mut conn = self.connect(ep).await?;
                let resp = conn
                    .send_request(self.request(ep, path, &body))
                    .await
                    .map_err(|e| e.to_string())?;
                let mut body = resp.into_body();
                let mut buf = BytesMut::new();
                loop {
                    let frame = body
                        .frame()
                        .await
                        .ok_or_else(|| "the stream ended without an answer".to_string())?
                        .map_err(|e| e.to_string())?;
                    if let Ok(data) = frame.into_data() {
                        buf.extend_from_slice(&data);
                        let mut it =
                            serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
                        if let Some(Ok(v)) = it.next() {
                            return Ok::<Value, String>(v);
                        }
                    }
                }
            };
            match tokio::time::timeout(self.settings.attempt_timeout, work).await {
                Ok(Ok(v)) => {
                    if let Some(Attempt::Fatal(m) | Attempt::Auth(m)) = grpc_error(&v) {
                        return Err(EtcdError::Rejected(m));
                    }
                    if let Some(Attempt::Retry(m)) = grpc_error(&v) {
                        failures.push(m);
                        continue;
                    }
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok(v);
                }
                Ok(Err(e)) => failures.push(format!("{}:{}: {e}", ep.host, ep.port)),
                Err(_) => failures.push(format!("{}:{} timed out", ep.host, ep.port)),
            }
        }
        Err(EtcdError::Unavailable(failures.join("; ")))
    }

    /// Watches every key under `prefix` from `start_revision`, sending what it sees to `tx` until the
    /// stream breaks (an error) or the receiver is gone (`Ok`).
    pub async fn watch(
        &self,
        prefix: &str,
        start_revision: i64,
        tx: tokio::sync::mpsc::Sender<WatchMessage>,
    ) -> Result<(), EtcdError> {
        let body = json!({"create_request": {
            "key": b64(prefix.as_bytes()),
            "range_end": b64(&prefix_end(prefix)),
            "start_revision": start_revision.to_string(),
        }});
        let n = self.endpoints.len();
        let start = self.preferred.load(Ordering::Relaxed) % n;
        let mut failures = Vec::new();
        let mut stream = None;
        for i in 0..n {
            let ep = &self.endpoints[(start + i) % n];
            let opened = tokio::time::timeout(self.settings.attempt_timeout, async {
                let mut conn = self.connect(ep).await?;
                let resp = conn
                    .send_request(self.request(ep, "/v3/watch", &body))
                    .await
                    .map_err(|e| e.to_string())?;
                if !resp.status().is_success() {
                    return Err(format!("HTTP {}", resp.status()));
                }
                Ok::<_, String>((conn, resp.into_body()))
            })
            .await;
            match opened {
                Ok(Ok(s)) => {
                    stream = Some(s);
                    break;
                }
                Ok(Err(e)) => failures.push(format!("{}:{}: {e}", ep.host, ep.port)),
                Err(_) => failures.push(format!("{}:{} timed out", ep.host, ep.port)),
            }
        }
        let Some((_conn, mut body)) = stream else {
            return Err(EtcdError::Unavailable(failures.join("; ")));
        };
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let frame = match body.frame().await {
                None => return Err(EtcdError::Unavailable("the watch stream ended".into())),
                Some(Err(e)) => {
                    return Err(EtcdError::Unavailable(format!("the watch broke: {e}")))
                }
                Some(Ok(f)) => f,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            let mut consumed = 0;
            {
                let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
                while let Some(item) = it.next() {
                    match item {
                        Ok(v) => {
                            consumed = it.byte_offset();
                            if let Some(msg) = watch_message(&v)? {
                                if tx.send(msg).await.is_err() {
                                    return Ok(());
                                }
                            }
                        }
                        Err(e) if e.is_eof() => break,
                        Err(e) => return Err(EtcdError::BadAnswer(e.to_string())),
                    }
                }
            }
            buf.drain(..consumed);
        }
    }
}

enum Attempt {
    /// Another member may answer.
    Retry(String),
    /// The token expired or is invalid: log in again.
    Auth(String),
    /// Every member would answer the same.
    Fatal(String),
}

/// The gRPC error an answer carries, classified.
fn grpc_error(v: &Value) -> Option<Attempt> {
    let obj = v.get("error").filter(|e| e.is_object()).unwrap_or(v);
    let code = obj.get("code").and_then(Value::as_i64)?;
    if code == 0 {
        return None;
    }
    let message = obj
        .get("message")
        .or_else(|| obj.get("error"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    Some(match code {
        // UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED, UNKNOWN (leader changes, "no leader").
        14 | 4 | 10 | 2 => Attempt::Retry(message),
        // UNAUTHENTICATED, or an invalid token.
        16 => Attempt::Auth(message),
        _ if message.contains("invalid auth token") => Attempt::Auth(message),
        // A request without a token once etcd's authentication is on: the client has not logged in yet
        // (it logs in on demand) or a concurrent login cleared the token. Code INVALID_ARGUMENT, as for a
        // malformed request, so only the message tells.
        _ if message.contains("user name is empty") => Attempt::Auth(message),
        _ => Attempt::Fatal(message),
    })
}

fn header_revision(v: &Value) -> Result<i64, EtcdError> {
    let h: RawHeader = v
        .get("header")
        .map(|h| serde_json::from_value(h.clone()))
        .transpose()
        .map_err(|e| EtcdError::BadAnswer(e.to_string()))?
        .unwrap_or_default();
    Ok(h.revision)
}

fn num(v: &Value, field: &str) -> Result<i64, EtcdError> {
    match v.get(field) {
        Some(Value::String(s)) => s
            .parse()
            .map_err(|_| EtcdError::BadAnswer(format!("{field} is not a number"))),
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| EtcdError::BadAnswer(format!("{field} is not a number"))),
        _ => Err(EtcdError::BadAnswer(format!("no {field} in the answer"))),
    }
}

fn kvs_of(v: &Value) -> Result<Vec<Kv>, EtcdError> {
    let Some(arr) = v.get("kvs").and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    arr.iter()
        .map(|k| {
            serde_json::from_value::<RawKv>(k.clone())
                .map_err(|e| EtcdError::BadAnswer(e.to_string()))?
                .try_into()
        })
        .collect()
}

fn watch_message(v: &Value) -> Result<Option<WatchMessage>, EtcdError> {
    if let Some(Attempt::Retry(m) | Attempt::Fatal(m) | Attempt::Auth(m)) = grpc_error(v) {
        return Err(EtcdError::Unavailable(format!("the watch failed: {m}")));
    }
    let Some(r) = v.get("result") else {
        return Ok(None);
    };
    let compacted = r
        .get("compact_revision")
        .map(|c| match c {
            Value::String(s) => s != "0",
            Value::Number(n) => n.as_i64() != Some(0),
            _ => false,
        })
        .unwrap_or(false);
    if compacted || r.get("canceled").and_then(Value::as_bool) == Some(true) {
        return Ok(Some(WatchMessage::Compacted));
    }
    let Some(events) = r.get("events").and_then(Value::as_array) else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for e in events {
        let raw: RawKv = serde_json::from_value(e.get("kv").cloned().unwrap_or(Value::Null))
            .map_err(|e| EtcdError::BadAnswer(e.to_string()))?;
        let kv: Kv = raw.try_into()?;
        if e.get("type").and_then(Value::as_str) == Some("DELETE") {
            out.push(Event::Delete {
                key: kv.key,
                revision: kv.mod_revision,
            });
        } else {
            out.push(Event::Put(kv));
        }
    }
    Ok(Some(WatchMessage::Events(out)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_parsed_and_bad_ones_named() {
        let e = parse_endpoint("http://10.0.0.1:2379").unwrap();
        assert_eq!((e.tls, e.host.as_str(), e.port), (false, "10.0.0.1", 2379));
        let e = parse_endpoint("https://[::1]:2379/").unwrap();
        assert_eq!((e.tls, e.host.as_str(), e.port), (true, "::1", 2379));
        assert!(parse_endpoint("10.0.0.1:2379")
            .unwrap_err()
            .contains("http://"));
        assert!(parse_endpoint("http://host").unwrap_err().contains("port"));
        assert!(check_endpoints(&[]).is_err());
    }

    #[test]
    fn prefix_end_is_the_next_key_after_every_key_with_the_prefix() {
        assert_eq!(prefix_end("/ferry/v/"), b"/ferry/v0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }

    #[test]
    fn watch_events_decode_puts_and_deletes() {
        let v = json!({"result": {"header": {"revision": "9"}, "events": [
            {"kv": {"key": b64(b"/p/v/a"), "create_revision": "3", "mod_revision": "9", "version": "2", "value": b64(b"x")}},
            {"type": "DELETE", "kv": {"key": b64(b"/p/o/a"), "mod_revision": "9"}}
        ]}});
        let Some(WatchMessage::Events(ev)) = watch_message(&v).unwrap() else {
            panic!("no events")
        };
        assert!(
            matches!(&ev[0], Event::Put(kv) if kv.key == "/p/v/a" && kv.create_revision == 3 && kv.value == b"x")
        );
        assert!(
            matches!(&ev[1], Event::Delete { key, revision } if key == "/p/o/a" && *revision == 9)
        );
        let c = json!({"result": {"compact_revision": "5", "canceled": true}});
        assert!(matches!(
            watch_message(&c).unwrap(),
            Some(WatchMessage::Compacted)
        ));
    }

    #[test]
    fn requests_ask_for_json_so_etcd_never_takes_the_gateways_certificate_for_a_user() {
        let c = EtcdClient::new(EtcdSettings {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            tls: None,
            auth: None,
            attempt_timeout: Duration::from_secs(1),
        })
        .unwrap();
        let r = c.request(&c.endpoints[0], "/v3/kv/range", &json!({}));
        assert_eq!(r.headers()[hyper::header::ACCEPT], "application/json");
    }

    #[test]
    fn gateway_errors_are_classified() {
        let unavailable = json!({"error": "etcdserver: no leader", "code": 14, "message": "etcdserver: no leader"});
        assert!(matches!(grpc_error(&unavailable), Some(Attempt::Retry(_))));
        let auth = json!({"error": "x", "code": 3, "message": "etcdserver: invalid auth token"});
        assert!(matches!(grpc_error(&auth), Some(Attempt::Auth(_))));
        // What etcd 3.4's gateway answers (HTTP 401) once a simple token's TTL has passed.
        let expired = json!({"error": "etcdserver: invalid auth token", "code": 16, "message": "etcdserver: invalid auth token"});
        assert!(matches!(grpc_error(&expired), Some(Attempt::Auth(_))));
        // What it answers (HTTP 400) to a request without a token while authentication is on.
        let no_token = json!({"error": "etcdserver: user name is empty", "code": 3, "message": "etcdserver: user name is empty"});
        assert!(matches!(grpc_error(&no_token), Some(Attempt::Auth(_))));
        let wrong_password = json!({"code": 3, "message": "etcdserver: authentication failed, invalid user ID or password"});
        assert!(matches!(
            grpc_error(&wrong_password),
            Some(Attempt::Fatal(_))
        ));
        let bad = json!({"code": 3, "message": "etcdserver: key is not provided"});
        assert!(matches!(grpc_error(&bad), Some(Attempt::Fatal(_))));
        assert!(grpc_error(&json!({"header": {}})).is_none());
    }
}

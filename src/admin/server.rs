//! The admin socket's server: `GET /v1/volumes`, `GET /v1/volumes/NAME` and `GET /v1/status`, and the
//! actions `POST /v1/volumes/NAME/checkpoint`, `POST /v1/volumes/NAME/release[?id=ID][&force=true]` and
//! `POST /v1/volumes/NAME/set-aside`. The socket
//! is mode 0600 and every connection's peer must be root or the daemon's own user, so a permissive umask or
//! a bind mount cannot open it to others; others are answered 403, so the CLI can tell them why.
//! Connections, timeouts and the stop belong to `listener`.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Response, StatusCode};
use serde::Serialize;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use super::{DaemonStatus, ErrorBody};
use crate::listener::{BodyError, Handler, Limits, Listener, Peer, Peers, ServeOptions};
use crate::service::{ReconcileReport, ServiceError, VolumeService};

/// How long `GET /v1/status` waits for each backend's check; the CLI waits a little longer.
pub const BACKEND_CHECK_DEADLINE: Duration = Duration::from_secs(5);
/// The admin API takes no request bodies; anything longer than this is not the CLI.
const MAX_BODY: usize = 64 << 10;
/// How long a stop waits for the operator's calls in progress.
const DRAIN: Duration = Duration::from_secs(5);

/// What the admin API needs besides the service.
pub struct AdminContext {
    pub service: Arc<VolumeService>,
    pub started: Instant,
    /// Seconds since the Unix epoch.
    pub started_at: u64,
    pub socket: PathBuf,
    pub admin_socket: PathBuf,
    pub state_dir: PathBuf,
    pub mount_root: Option<PathBuf>,
    pub reconcile: ReconcileReport,
}

/// Serves the admin API on `listener` until `stop` is cancelled.
pub async fn serve(
    listener: UnixListener,
    ctx: Arc<AdminContext>,
    limits: Limits,
    stop: CancellationToken,
) {
    let handler = Arc::new(AdminHandler {
        ctx,
        own_uid: nix::unistd::geteuid().as_raw(),
    });
    let opts = ServeOptions {
        name: "admin socket",
        limits,
        // Everyone is let in to be told, with 403, that the socket is for root only.
        peers: Peers::Anyone,
        spare_fd: false,
        drain: DRAIN,
    };
    crate::listener::serve(Listener::Unix(listener), handler, opts, stop).await;
}

struct AdminHandler {
    ctx: Arc<AdminContext>,
    own_uid: u32,
}

impl Handler for AdminHandler {
    fn max_body(&self) -> usize {
        MAX_BODY
    }

    fn handle(
        &self,
        head: hyper::http::request::Parts,
        _body: Bytes,
        peer: Peer,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send {
        let allowed = peer.uid.is_some_and(|u| u == 0 || u == self.own_uid);
        let ctx = self.ctx.clone();
        async move {
            if allowed {
                handle(&ctx, &head.method, head.uri.path(), head.uri.query()).await
            } else {
                error(
                    StatusCode::FORBIDDEN,
                    "the admin socket is for root only".into(),
                )
            }
        }
    }

    fn body_error(&self, _path: &str, err: BodyError) -> Response<Full<Bytes>> {
        match err {
            BodyError::TooLarge(limit) => error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the admin API takes no request body (this one is over {limit} bytes)"),
            ),
            BodyError::Unreadable(cause) => error(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {cause}"),
            ),
        }
    }
}

/// What `POST /v1/volumes/NAME/set-aside` answers.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct SetAside {
    pub volume: String,
    /// Where this host's copy of the volume now is.
    pub moved_to: PathBuf,
}

/// One admin request, decoded from its method, path and query before anything runs, as the plugin router
/// does for Docker's calls.
#[derive(Debug, PartialEq, Eq)]
enum AdminRequest {
    /// `GET /v1/volumes`
    Volumes,
    /// `GET /v1/volumes/NAME`
    Volume(String),
    /// `GET /v1/status`
    Status,
    /// `POST /v1/volumes/NAME/checkpoint`: ship a mounted volume's changes now.
    Checkpoint(String),
    /// `POST /v1/volumes/NAME/release[?id=ID][&force=true]`: drop mount IDs left behind.
    Release {
        name: String,
        id: Option<String>,
        force: bool,
    },
    /// `POST /v1/volumes/NAME/set-aside`: the way out of an ebs conflict, this host's copy moved aside.
    SetAside(String),
    /// `POST /v1/volumes/NAME/prune`: apply an ebs volume's snapshot retention now.
    Prune(String),
    /// `GET /v1/hosts`: cluster mode's hosts, leases and owned volumes.
    Hosts,
}

/// Why a request was not routed: the status to answer and what to tell the operator.
#[derive(Debug, PartialEq, Eq)]
struct RouteError(StatusCode, String);

const ACTIONS: [&str; 4] = ["checkpoint", "prune", "release", "set-aside"];
const API: &str = "/v1/volumes, /v1/volumes/NAME, /v1/volumes/NAME/checkpoint, /v1/volumes/NAME/prune, /v1/volumes/NAME/release, /v1/volumes/NAME/set-aside, /v1/status, /v1/hosts";

fn route(method: &Method, path: &str, query: Option<&str>) -> Result<AdminRequest, RouteError> {
    let decode = |name: &str| {
        percent_decode(name).ok_or_else(|| {
            RouteError(
                StatusCode::BAD_REQUEST,
                "the volume name in the path is not valid percent-encoded UTF-8".into(),
            )
        })
    };
    let (resource, action) = match path.strip_prefix("/v1/volumes/") {
        Some(rest) => match rest.rsplit_once('/') {
            Some((name, action)) if ACTIONS.contains(&action) => (Some(name), Some(action)),
            _ => (Some(rest), None),
        },
        None => (None, None),
    };
    let want = if action.is_some() {
        Method::POST
    } else {
        Method::GET
    };
    let known = action.is_some()
        || resource.is_some()
        || path == "/v1/volumes"
        || path == "/v1/status"
        || path == "/v1/hosts";
    if !known {
        return Err(RouteError(
            StatusCode::NOT_FOUND,
            format!("{path} is not part of the admin API ({API})"),
        ));
    }
    if method != want {
        return Err(RouteError(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {path}; use {want}"),
        ));
    }
    Ok(match (path, resource, action) {
        ("/v1/volumes", _, _) => AdminRequest::Volumes,
        ("/v1/status", _, _) => AdminRequest::Status,
        ("/v1/hosts", _, _) => AdminRequest::Hosts,
        (_, Some(name), Some("checkpoint")) => AdminRequest::Checkpoint(decode(name)?),
        (_, Some(name), Some("set-aside")) => AdminRequest::SetAside(decode(name)?),
        (_, Some(name), Some("prune")) => AdminRequest::Prune(decode(name)?),
        (_, Some(name), Some(_)) => {
            let (id, force) = release_query(query)?;
            AdminRequest::Release {
                name: decode(name)?,
                id,
                force,
            }
        }
        (_, Some(name), None) => AdminRequest::Volume(decode(name)?),
        // `known` admitted nothing else.
        (_, None, _) => {
            return Err(RouteError(
                StatusCode::NOT_FOUND,
                format!("{path} is not part of the admin API ({API})"),
            ))
        }
    })
}

/// `id=MOUNT_ID` and `force=true|false` of a release.
fn release_query(query: Option<&str>) -> Result<(Option<String>, bool), RouteError> {
    let (mut id, mut force) = (None, false);
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match (key, percent_decode(value)) {
            ("id", Some(v)) => id = Some(v),
            ("force", Some(v)) if v == "true" || v == "false" => force = v == "true",
            _ => {
                return Err(RouteError(
                    StatusCode::BAD_REQUEST,
                    format!(
                    "bad query parameter {pair:?}: release takes id=MOUNT_ID and force=true|false"
                ),
                ))
            }
        }
    }
    Ok((id, force))
}

async fn handle(
    ctx: &AdminContext,
    method: &Method,
    path: &str,
    query: Option<&str>,
) -> Response<Full<Bytes>> {
    let request = match route(method, path, query) {
        Ok(request) => request,
        Err(RouteError(status, message)) => return error(status, message),
    };
    let answer = match request {
        AdminRequest::Volumes => Ok(json(StatusCode::OK, &ctx.service.reports())),
        AdminRequest::Status => Ok(json(StatusCode::OK, &status(ctx).await)),
        AdminRequest::Volume(name) => ctx
            .service
            .report(&name)
            .map(|report| json(StatusCode::OK, &report)),
        AdminRequest::Checkpoint(name) => ctx
            .service
            .checkpoint(&name)
            .await
            .map(|shipped| json(StatusCode::OK, &shipped)),
        AdminRequest::Release { name, id, force } => release(ctx, &name, id.as_deref(), force)
            .await
            .map(|report| json(StatusCode::OK, &report)),
        AdminRequest::Hosts => match ctx.service.cluster() {
            Some(c) => Ok(json(StatusCode::OK, &c.hosts())),
            None => Ok(error(
                StatusCode::NOT_FOUND,
                "this daemon is not in a cluster: there is no [cluster] section in its configuration".into(),
            )),
        },
        AdminRequest::Prune(name) => ctx
            .service
            .prune(&name)
            .await
            .map(|pruned| json(StatusCode::OK, &pruned)),
        AdminRequest::SetAside(name) => ctx.service.set_aside(&name).await.map(|moved_to| {
            json(
                StatusCode::OK,
                &SetAside {
                    volume: name,
                    moved_to,
                },
            )
        }),
    };
    answer.unwrap_or_else(service_error)
}

/// `ferry release`: drops this host's mount IDs; in a cluster, a volume with none here that another host
/// owns is taken from that host (an operator's word that it is cut off).
async fn release(
    ctx: &AdminContext,
    name: &str,
    id: Option<&str>,
    force: bool,
) -> Result<crate::service::ReleaseReport, ServiceError> {
    let clustered = ctx.service.cluster().is_some();
    let mut report = match ctx.service.release(name, id, force).await {
        Ok(r) => r,
        Err(ServiceError::NotFound(_)) if clustered && id.is_none() => {
            crate::service::ReleaseReport {
                name: name.to_string(),
                ..Default::default()
            }
        }
        Err(e) => return Err(e),
    };
    if clustered && id.is_none() && report.released.is_empty() {
        report.taken_from = ctx.service.release_elsewhere(name).await?;
    }
    Ok(report)
}

/// A service error as the admin API answers it: the status says whose problem it is.
fn service_error(e: ServiceError) -> Response<Full<Bytes>> {
    let status = match &e {
        ServiceError::NotFound(_) => StatusCode::NOT_FOUND,
        ServiceError::Held { .. } => StatusCode::CONFLICT,
        e if e.is_user_error() => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

async fn status(ctx: &AdminContext) -> DaemonStatus {
    let gauges = ctx.service.gauges();
    DaemonStatus {
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        started_at: ctx.started_at,
        uptime_secs: ctx.started.elapsed().as_secs(),
        socket: ctx.socket.clone(),
        admin_socket: ctx.admin_socket.clone(),
        state_dir: ctx.state_dir.clone(),
        mount_root: ctx.mount_root.clone(),
        default_backend: ctx.service.defaults().backend.as_str().into(),
        volumes: gauges.volumes_by_backend.values().sum(),
        attached_volumes: gauges.attached_volumes,
        active_mounts: gauges.active_mounts,
        reconcile: ctx.reconcile.clone(),
        backends: ctx.service.check_backends(BACKEND_CHECK_DEADLINE).await,
    }
}

/// Decodes `%XX` escapes, so any name Docker accepts can be asked for; `None` if an escape is malformed
/// (the crate's decoder would keep it as literal text) or the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let well_formed = bytes.iter().enumerate().all(|(i, b)| {
        *b != b'%'
            || bytes
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return None;
    }
    percent_encoding::percent_decode(bytes)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = status;
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn error(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&ErrorBody { error: message }).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

#[cfg(test)]
mod tests {
    use super::{percent_decode, route, AdminRequest, RouteError};
    use hyper::{Method, StatusCode};

    #[test]
    fn routing() {
        let get = |p: &str| route(&Method::GET, p, None);
        let post = |p: &str, q: Option<&str>| route(&Method::POST, p, q);
        assert_eq!(get("/v1/volumes"), Ok(AdminRequest::Volumes));
        assert_eq!(get("/v1/status"), Ok(AdminRequest::Status));
        assert_eq!(
            get("/v1/volumes/a%2Eb"),
            Ok(AdminRequest::Volume("a.b".into()))
        );
        assert_eq!(
            post("/v1/volumes/v/checkpoint", None),
            Ok(AdminRequest::Checkpoint("v".into()))
        );
        assert_eq!(
            post("/v1/volumes/v/set-aside", None),
            Ok(AdminRequest::SetAside("v".into()))
        );
        assert_eq!(
            post("/v1/volumes/v/release", Some("id=m%201&force=true")),
            Ok(AdminRequest::Release {
                name: "v".into(),
                id: Some("m 1".into()),
                force: true
            })
        );
        assert_eq!(
            post("/v1/volumes/v/release", None),
            Ok(AdminRequest::Release {
                name: "v".into(),
                id: None,
                force: false
            })
        );
        // A name that ends like no action is a volume name.
        assert_eq!(
            get("/v1/volumes/a/b"),
            Ok(AdminRequest::Volume("a/b".into()))
        );
        let status = |r: Result<AdminRequest, RouteError>| r.unwrap_err().0;
        assert_eq!(
            status(post("/v1/volumes", None)),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            status(get("/v1/volumes/v/checkpoint")),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(status(get("/v2/volumes")), StatusCode::NOT_FOUND);
        assert_eq!(status(get("/v1/volumes/bad%zz")), StatusCode::BAD_REQUEST);
        assert_eq!(
            status(post("/v1/volumes/v/release", Some("force=yes"))),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(post("/v1/volumes/v/release", Some("who=me"))),
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Eb").as_deref(), Some("a.b"));
        assert_eq!(
            percent_decode("plain_name-1").as_deref(),
            Some("plain_name-1")
        );
        assert_eq!(percent_decode("bad%2"), None);
        assert_eq!(percent_decode("bad%zz"), None);
        assert_eq!(percent_decode("bad%+1"), None);
        assert_eq!(percent_decode("bad%-f"), None);
        assert_eq!(percent_decode("a%25b").as_deref(), Some("a%b"));
        assert_eq!(percent_decode("%ff"), None);
    }
}

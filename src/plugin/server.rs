//! The plugin socket's server: a thin layer that routes each request (whose body `listener` has read,
//! bounded), calls `VolumeService` and writes Docker's JSON. Each call gets a span with the volume and
//! mount ID, and an error is logged once, here. Connections, timeouts, the peer check and the stop belong
//! to `listener`; this module only answers.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Response, StatusCode};
use serde::Serialize;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::router::{route, Request, RouteError};
use super::wire;
use crate::listener::{BodyError, Handler, Limits, Listener, Peer, Peers, ServeOptions};
use crate::service::{ServiceError, VolumeInfo, VolumeService};

/// Docker's bodies are a few hundred bytes; anything near this is not Docker.
pub const MAX_BODY: usize = 1 << 20;
/// Inside Docker's 2-minute deadline for Create and Mount, leaving time for the reply.
pub const LONG_DEADLINE: Duration = Duration::from_secs(110);
/// Inside Docker's 1-minute deadline for every other call.
pub const SHORT_DEADLINE: Duration = Duration::from_secs(55);

/// Serves Docker's protocol on `listener` until `stop` is cancelled, then stops accepting, lets the
/// calls in progress answer and waits for the work they started. Only processes of `peers` are served.
pub async fn serve(
    listener: UnixListener,
    service: Arc<VolumeService>,
    limits: Limits,
    peers: Peers,
    stop: CancellationToken,
) {
    let handler = Arc::new(PluginHandler {
        service: service.clone(),
    });
    let opts = ServeOptions {
        name: "plugin socket",
        limits,
        peers,
        spare_fd: true,
        // Every call in progress ends within its deadline; its answer then needs a moment to be written.
        drain: LONG_DEADLINE + Duration::from_secs(5),
    };
    crate::listener::serve(Listener::Unix(listener), handler, opts, stop).await;
    service.finish_background_work(LONG_DEADLINE).await;
}

/// Docker's volume-plugin protocol over `VolumeService`.
struct PluginHandler {
    service: Arc<VolumeService>,
}

impl Handler for PluginHandler {
    fn max_body(&self) -> usize {
        MAX_BODY
    }

    fn handle(
        &self,
        head: hyper::http::request::Parts,
        body: Bytes,
        _peer: Peer,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send {
        let service = self.service.clone();
        async move { handle(service, &head.method, head.uri.path(), &body).await }
    }

    fn body_error(&self, path: &str, err: BodyError) -> Response<Full<Bytes>> {
        match err {
            BodyError::TooLarge(limit) => {
                let err = RouteError::TooLarge(limit);
                tracing::warn!(path, error = %err, "refused a request");
                error_response(StatusCode::PAYLOAD_TOO_LARGE, err.to_string())
            }
            BodyError::Unreadable(cause) => error_response(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {cause}"),
            ),
        }
    }
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    // Serialising these plain structs cannot fail; fall back to an empty object rather than panic.
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(wire::CONTENT_TYPE));
    resp
}

fn error_response(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    json_response(status, &wire::ErrResponse { err: message })
}

async fn handle(
    service: Arc<VolumeService>,
    method: &Method,
    path: &str,
    body: &[u8],
) -> Response<Full<Bytes>> {
    let request = match route(method, path, body) {
        Ok(r) => r,
        Err(err) => {
            let status = match err {
                RouteError::UnknownPath(_) => StatusCode::NOT_FOUND,
                RouteError::Method { .. } => StatusCode::METHOD_NOT_ALLOWED,
                RouteError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
                RouteError::EmptyBody { .. } | RouteError::BadBody { .. } => {
                    StatusCode::BAD_REQUEST
                }
            };
            tracing::warn!(path, error = %err, "refused a request");
            return error_response(status, err.to_string());
        }
    };
    let (volume, mount_id) = match &request {
        Request::Create(r) => (r.name.as_str(), ""),
        Request::Remove(r) | Request::Path(r) | Request::Get(r) => (r.name.as_str(), ""),
        Request::Mount(r) | Request::Unmount(r) => (r.name.as_str(), r.id.as_str()),
        _ => ("", ""),
    };
    let span = tracing::info_span!("call", method = request.method(), volume, mount_id);
    let method_name = request.method();
    async move {
        tracing::debug!("call started");
        let started = std::time::Instant::now();
        let result = dispatch(&service, request).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) if e.is_user_error() => "refused",
            Err(_) => "error",
        };
        service
            .metrics()
            .observe_call(method_name, outcome, started.elapsed());
        match result {
            Ok(resp) => {
                tracing::debug!("ok");
                resp
            }
            Err(err) => {
                if err.is_user_error() {
                    tracing::info!(error = %err, "{method_name} refused");
                } else {
                    tracing::error!(error = %err, "{method_name} failed");
                }
                error_response(StatusCode::INTERNAL_SERVER_ERROR, err.to_string())
            }
        }
    }
    .instrument(span)
    .await
}

fn path_string(p: Option<&Path>) -> String {
    p.map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn volume_json(info: VolumeInfo) -> wire::Volume {
    wire::Volume {
        name: info.name,
        mountpoint: path_string(info.mountpoint.as_deref()),
        created_at: Some(
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(info.created_at))
                .to_string(),
        ),
        status: Some(info.status),
    }
}

async fn dispatch(
    service: &Arc<VolumeService>,
    request: Request,
) -> Result<Response<Full<Bytes>>, ServiceError> {
    let ok = StatusCode::OK;
    Ok(match request {
        Request::Activate => json_response(
            ok,
            &wire::ActivateResponse {
                implements: ["VolumeDriver"],
            },
        ),
        Request::Capabilities => json_response(
            ok,
            &wire::CapabilitiesResponse {
                capabilities: wire::Scope {
                    scope: service.scope(),
                },
            },
        ),
        Request::Create(r) => {
            let svc = service.clone();
            let name = r.name.clone();
            service
                .with_deadline("create", &name, LONG_DEADLINE, async move {
                    svc.create(&r.name, r.opts.as_ref()).await
                })
                .await?;
            json_response(ok, &wire::Empty {})
        }
        Request::Remove(r) => {
            let svc = service.clone();
            let name = r.name.clone();
            service
                .with_deadline("remove", &name, SHORT_DEADLINE, async move {
                    svc.remove(&r.name).await
                })
                .await?;
            json_response(ok, &wire::Empty {})
        }
        Request::Mount(r) => {
            let path = service
                .mount_for_caller(&r.name, &r.id, LONG_DEADLINE)
                .await?;
            json_response(
                ok,
                &wire::MountpointResponse {
                    mountpoint: path_string(Some(&path)),
                },
            )
        }
        Request::Unmount(r) => {
            let svc = service.clone();
            let name = r.name.clone();
            service
                .with_deadline("unmount", &name, SHORT_DEADLINE, async move {
                    svc.unmount(&r.name, &r.id).await
                })
                .await?;
            json_response(ok, &wire::Empty {})
        }
        Request::Path(r) => {
            let p = service.path(&r.name)?;
            json_response(
                ok,
                &wire::MountpointResponse {
                    mountpoint: path_string(p.as_deref()),
                },
            )
        }
        Request::Get(r) => json_response(
            ok,
            &wire::GetResponse {
                volume: volume_json(service.get(&r.name)?),
            },
        ),
        Request::List => {
            let volumes = service
                .list()
                .into_iter()
                .map(|v| wire::Volume {
                    name: v.name,
                    mountpoint: path_string(v.mountpoint.as_deref()),
                    created_at: None,
                    status: None,
                })
                .collect();
            json_response(ok, &wire::ListResponse { volumes })
        }
    })
}

//! The HTTP/1.1 server on the plugin's Unix socket: a thin hyper layer that reads a bounded body, routes
//! it, calls `VolumeService` and writes Docker's JSON. Each call gets a span with the volume and mount ID,
//! and an error is logged once, here.

use std::convert::Infallible;
use std::future::Future;
use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use serde::Serialize;
use tokio::net::UnixListener;
use tracing::Instrument;

use super::router::{route, Request, RouteError};
use super::wire;
use crate::service::{ServiceError, VolumeInfo, VolumeService};

/// Docker's bodies are a few hundred bytes; anything near this is not Docker.
pub const MAX_BODY: usize = 1 << 20;
/// Inside Docker's 2-minute deadline for Create and Mount, leaving time for the reply.
pub const LONG_DEADLINE: Duration = Duration::from_secs(110);
/// Inside Docker's 1-minute deadline for every other call.
pub const SHORT_DEADLINE: Duration = Duration::from_secs(55);

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("another process is already serving {0}; stop it first, or choose another --socket")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot set up the socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Binds the plugin socket, readable and writable by root only. A socket file left by a dead process is
/// replaced; one that a live process answers on is not.
pub fn bind_socket(path: &Path) -> Result<UnixListener, SocketError> {
    let io = |source| SocketError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(SocketError::NotASocket(path.into()))
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(SocketError::InUse(path.into())),
            Err(e)
                if e.kind() == ErrorKind::ConnectionRefused || e.kind() == ErrorKind::NotFound =>
            {
                tracing::info!(socket = %path.display(), "replacing a stale socket");
                std::fs::remove_file(path)
                    .or_else(|e| {
                        if e.kind() == ErrorKind::NotFound {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
                    .map_err(io)?;
            }
            Err(e) => return Err(io(e)),
        },
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Serves until `shutdown` completes, then stops accepting, lets the calls in flight finish and returns.
pub async fn serve(
    listener: UnixListener,
    service: Arc<VolumeService>,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    // No idle timeout: dockerd keeps connections for 30 s and must never find one closed under it.
    http.keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let service = service.clone();
                let conn = http.serve_connection(
                    TokioIo::new(stream),
                    hyper::service::service_fn(move |req| handle(service.clone(), req)),
                );
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: finishing calls in flight");
    if tokio::time::timeout(LONG_DEADLINE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not finish in time");
    }
    service.finish_background_work(LONG_DEADLINE).await;
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
    req: hyper::Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            let err = RouteError::TooLarge(MAX_BODY);
            tracing::warn!(path, error = %err, "refused a request");
            return Ok(error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                err.to_string(),
            ));
        }
        Err(e) => {
            return Ok(error_response(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}"),
            ));
        }
    };
    let request = match route(&method, &path, &body) {
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
            return Ok(error_response(status, err.to_string()));
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
    Ok(async move {
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
    .await)
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
                capabilities: wire::Scope { scope: "local" },
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

//! The admin socket's client, for the operator commands. Every failure names the socket and says whether a
//! Ferry daemon runs on this host, so "cannot connect" never leaves the operator guessing.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use super::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the ferry daemon at {socket}: {reason}; {daemon}")]
    Unreachable {
        socket: PathBuf,
        reason: String,
        /// Whether and where a daemon runs, with what to do.
        daemon: String,
    },
    #[error("permission denied on the admin socket {socket}: it is for root only; run this command as root")]
    PermissionDenied { socket: PathBuf },
    #[error("the ferry daemon at {socket} did not answer within {secs} s; {daemon}")]
    Timeout {
        socket: PathBuf,
        secs: u64,
        daemon: String,
    },
    #[error("the ferry daemon at {socket} answered: {message}")]
    Refused {
        socket: PathBuf,
        status: u16,
        message: String,
    },
    #[error("the ferry daemon at {socket} sent an answer this ferry command cannot read ({detail}); are the daemon and the command the same version?")]
    BadAnswer { socket: PathBuf, detail: String },
}

impl ClientError {
    /// True when the daemon answered that the thing asked for does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ClientError::Refused { status, .. } if *status == 404)
    }
}

/// A client of one admin socket.
pub struct AdminClient {
    socket: PathBuf,
    timeout: Duration,
}

impl AdminClient {
    pub fn new(socket: PathBuf, timeout: Duration) -> Self {
        AdminClient { socket, timeout }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET path` and decodes the JSON answer.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(hyper::Method::GET, path).await
    }

    /// `POST path` (an action, such as a checkpoint) and decodes the JSON answer.
    pub async fn post<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(hyper::Method::POST, path).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: hyper::Method,
        path: &str,
    ) -> Result<T, ClientError> {
        let body = match tokio::time::timeout(self.timeout, self.fetch(method, path)).await {
            Ok(res) => res?,
            Err(_) => {
                return Err(ClientError::Timeout {
                    socket: self.socket.clone(),
                    secs: self.timeout.as_secs(),
                    daemon: describe_daemons(),
                })
            }
        };
        serde_json::from_slice(&body).map_err(|e| ClientError::BadAnswer {
            socket: self.socket.clone(),
            detail: e.to_string(),
        })
    }

    async fn fetch(&self, method: hyper::Method, path: &str) -> Result<Bytes, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| self.connect_error(e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.bad_answer(e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "ferry")
            .body(Empty::<Bytes>::new())
            .map_err(|e| self.bad_answer(e))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| self.bad_answer(e))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.bad_answer(e))?
            .to_bytes();
        if status == StatusCode::FORBIDDEN {
            return Err(ClientError::PermissionDenied {
                socket: self.socket.clone(),
            });
        }
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(ClientError::Refused {
                socket: self.socket.clone(),
                status: status.as_u16(),
                message,
            });
        }
        Ok(body)
    }

    fn bad_answer(&self, e: impl std::fmt::Display) -> ClientError {
        ClientError::BadAnswer {
            socket: self.socket.clone(),
            detail: e.to_string(),
        }
    }

    fn connect_error(&self, e: std::io::Error) -> ClientError {
        let reason = match e.kind() {
            ErrorKind::PermissionDenied => {
                return ClientError::PermissionDenied {
                    socket: self.socket.clone(),
                }
            }
            ErrorKind::NotFound => "the socket does not exist".to_string(),
            ErrorKind::ConnectionRefused => {
                "the socket exists but nothing listens on it (left by a daemon that stopped)"
                    .to_string()
            }
            _ => e.to_string(),
        };
        ClientError::Unreachable {
            socket: self.socket.clone(),
            reason,
            daemon: describe_daemons(),
        }
    }
}

/// Says whether `ferry serve` runs on this host (in any mount namespace, so a managed plugin counts), and
/// what to do in each case.
pub fn describe_daemons() -> String {
    let pids = running_daemons();
    match pids.as_slice() {
        [] => "no ferry daemon is running on this host: start it (systemctl start ferry, \
               or docker plugin enable for the managed plugin)"
            .into(),
        pids => format!(
            "a ferry daemon is running (pid {}): if it uses another state directory, point \
             --state-dir or --admin-socket at it (a managed plugin's is under its state.source)",
            pids.iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// PIDs of processes running `ferry serve`, found through /proc.
pub fn running_daemons() -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let mut args = cmdline.split(|b| *b == 0);
            let is_ferry = args
                .next()
                .map(|a0| a0.rsplit(|b| *b == b'/').next() == Some(b"ferry".as_slice()))
                .unwrap_or(false);
            is_ferry && args.any(|a| a == b"serve")
        })
        .collect();
    pids.sort_unstable();
    pids
}

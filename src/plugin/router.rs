//! One routing match from method and path to a typed request. Bad input is refused here, before anything
//! reaches the core.

use hyper::Method;
use serde::de::DeserializeOwned;

use super::wire::{CreateRequest, MountRequest, NameRequest};

/// Every endpoint Ferry serves, for error messages.
pub const ENDPOINTS: &[&str] = &[
    "/Plugin.Activate",
    "/VolumeDriver.Create",
    "/VolumeDriver.Remove",
    "/VolumeDriver.Mount",
    "/VolumeDriver.Unmount",
    "/VolumeDriver.Path",
    "/VolumeDriver.Get",
    "/VolumeDriver.List",
    "/VolumeDriver.Capabilities",
];

#[derive(Debug, PartialEq)]
pub enum Request {
    Activate,
    Create(CreateRequest),
    Remove(NameRequest),
    Mount(MountRequest),
    Unmount(MountRequest),
    Path(NameRequest),
    Get(NameRequest),
    List,
    Capabilities,
}

impl Request {
    /// The protocol method, for logs and errors.
    pub fn method(&self) -> &'static str {
        match self {
            Request::Activate => "Plugin.Activate",
            Request::Create(_) => "VolumeDriver.Create",
            Request::Remove(_) => "VolumeDriver.Remove",
            Request::Mount(_) => "VolumeDriver.Mount",
            Request::Unmount(_) => "VolumeDriver.Unmount",
            Request::Path(_) => "VolumeDriver.Path",
            Request::Get(_) => "VolumeDriver.Get",
            Request::List => "VolumeDriver.List",
            Request::Capabilities => "VolumeDriver.Capabilities",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RouteError {
    #[error("unknown endpoint {0:?}; this plugin serves {endpoints}", endpoints = ENDPOINTS.join(", "))]
    UnknownPath(String),
    #[error("method {method} is not allowed on {path}; use POST")]
    Method { method: String, path: String },
    #[error("{endpoint}: the request body is empty; send a JSON object such as {example}")]
    EmptyBody {
        endpoint: &'static str,
        example: &'static str,
    },
    #[error(
        "{endpoint}: the request body is not valid: {reason}; send a JSON object such as {example}"
    )]
    BadBody {
        endpoint: &'static str,
        reason: String,
        example: &'static str,
    },
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
}

fn decode<T: DeserializeOwned>(
    endpoint: &'static str,
    example: &'static str,
    body: &[u8],
) -> Result<T, RouteError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(RouteError::EmptyBody { endpoint, example });
    }
    serde_json::from_slice(body).map_err(|e| RouteError::BadBody {
        endpoint,
        // serde's message names the missing or mistyped field; it never quotes string values.
        reason: e.to_string(),
        example,
    })
}

const NAME: &str = r#"{"Name": "myvolume"}"#;
const CREATE: &str = r#"{"Name": "myvolume", "Opts": {"size": "1G"}}"#;
const MOUNT: &str = r#"{"Name": "myvolume", "ID": "<mount id>"}"#;

/// Decodes a request. Activate, List and Capabilities ignore their bodies: Docker sends none or `{}`.
pub fn route(method: &Method, path: &str, body: &[u8]) -> Result<Request, RouteError> {
    let known = ENDPOINTS.contains(&path);
    if !known {
        return Err(RouteError::UnknownPath(path.chars().take(100).collect()));
    }
    if method != Method::POST {
        return Err(RouteError::Method {
            method: method.to_string(),
            path: path.to_string(),
        });
    }
    Ok(match path {
        "/Plugin.Activate" => Request::Activate,
        "/VolumeDriver.Create" => Request::Create(decode("VolumeDriver.Create", CREATE, body)?),
        "/VolumeDriver.Remove" => Request::Remove(decode("VolumeDriver.Remove", NAME, body)?),
        "/VolumeDriver.Mount" => Request::Mount(decode("VolumeDriver.Mount", MOUNT, body)?),
        "/VolumeDriver.Unmount" => Request::Unmount(decode("VolumeDriver.Unmount", MOUNT, body)?),
        "/VolumeDriver.Path" => Request::Path(decode("VolumeDriver.Path", NAME, body)?),
        "/VolumeDriver.Get" => Request::Get(decode("VolumeDriver.Get", NAME, body)?),
        "/VolumeDriver.List" => Request::List,
        _ => Request::Capabilities,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_docker_payloads() {
        // Bodies as dockerd's json.Encoder writes them, trailing newline included.
        let p = Method::POST;
        assert_eq!(
            route(&p, "/Plugin.Activate", b"").unwrap(),
            Request::Activate
        );
        assert_eq!(
            route(&p, "/VolumeDriver.List", b"{}\n").unwrap(),
            Request::List
        );
        assert_eq!(
            route(&p, "/VolumeDriver.Capabilities", b"").unwrap(),
            Request::Capabilities
        );
        match route(
            &p,
            "/VolumeDriver.Create",
            b"{\"Name\":\"v\",\"Opts\":null}\n",
        )
        .unwrap()
        {
            Request::Create(c) => assert_eq!((c.name.as_str(), c.opts), ("v", None)),
            other => panic!("{other:?}"),
        }
        match route(&p, "/VolumeDriver.Create", b"{\"Name\":\"v\"}").unwrap() {
            Request::Create(c) => assert_eq!(c.opts, None),
            other => panic!("{other:?}"),
        }
        match route(
            &p,
            "/VolumeDriver.Create",
            br#"{"Name":"v","Opts":{"size":"1G"},"Extra":1}"#,
        )
        .unwrap()
        {
            Request::Create(c) => assert_eq!(c.opts.unwrap()["size"], "1G"),
            other => panic!("{other:?}"),
        }
        let id = "a".repeat(64);
        let body = format!("{{\"Name\":\"v\",\"ID\":\"{id}\"}}\n");
        match route(&p, "/VolumeDriver.Mount", body.as_bytes()).unwrap() {
            Request::Mount(m) => assert_eq!(m.id, id),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refuses_bad_requests() {
        let p = Method::POST;
        assert!(matches!(
            route(&p, "/VolumeDriver.Nope", b"{}"),
            Err(RouteError::UnknownPath(_))
        ));
        assert!(matches!(
            route(&Method::GET, "/VolumeDriver.Get", b"{}"),
            Err(RouteError::Method { .. })
        ));
        assert!(matches!(
            route(&p, "/VolumeDriver.Get", b""),
            Err(RouteError::EmptyBody { .. })
        ));
        assert!(matches!(
            route(&p, "/VolumeDriver.Get", b"\n"),
            Err(RouteError::EmptyBody { .. })
        ));
        for body in [
            &b"{"[..],
            b"[]",
            b"{}",
            b"{\"Name\":5}",
            b"null",
            b"{\"Name\":\"v\",\"Opts\":{\"a\":1}}",
        ] {
            let endpoint = if body.starts_with(b"{\"Name\":\"v\",\"Opts") {
                "/VolumeDriver.Create"
            } else {
                "/VolumeDriver.Get"
            };
            assert!(
                matches!(route(&p, endpoint, body), Err(RouteError::BadBody { .. })),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        let e = route(&p, "/VolumeDriver.Mount", br#"{"Name":"v"}"#).unwrap_err();
        assert!(e.to_string().contains("ID"), "{e}");
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever bytes arrive, routing answers with a request or an error; it never panics, and only the
        /// three body-less endpoints succeed without a JSON object.
        #[test]
        fn route_never_panics(path_idx in 0..ENDPOINTS.len() + 1, body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let path = ENDPOINTS.get(path_idx).copied().unwrap_or("/Nope");
            if let Ok(req) = route(&Method::POST, path, &body) {
                let bodiless = matches!(req, Request::Activate | Request::List | Request::Capabilities);
                prop_assert!(bodiless || serde_json::from_slice::<serde_json::Value>(&body).is_ok());
            }
        }

        #[test]
        fn names_that_pass_are_safe_path_components(name in "\\PC{0,300}") {
            if crate::spec::validate_name(&name).is_ok() {
                prop_assert!(!name.contains('/') && name != "." && name != ".." && !name.is_empty());
                prop_assert!(name.len() <= 255);
            }
        }
    }
}

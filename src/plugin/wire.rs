//! The JSON of each endpoint, with Docker's exact field names (Docker's "Volume plugins" reference, https://docs.docker.com/engine/extend/plugins_volume/, and the
//! request structs in moby's `volume/drivers/proxy.go`).
//! Unknown fields are ignored, as Go's decoder does; `Opts` may be `null`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The media type Docker's plugin clients expect; the daemon does not check it.
pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.2+json";

#[derive(Debug, Deserialize, PartialEq)]
pub struct CreateRequest {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Opts", default)]
    pub opts: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize, PartialEq)]
pub struct NameRequest {
    #[serde(rename = "Name")]
    pub name: String,
}

#[derive(Debug, Deserialize, PartialEq)]
pub struct MountRequest {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "ID")]
    pub id: String,
}

#[derive(Debug, Serialize)]
pub struct ErrResponse {
    #[serde(rename = "Err")]
    pub err: String,
}

#[derive(Debug, Serialize)]
pub struct ActivateResponse {
    #[serde(rename = "Implements")]
    pub implements: [&'static str; 1],
}

/// Mount and Path replies.
#[derive(Debug, Serialize)]
pub struct MountpointResponse {
    #[serde(rename = "Mountpoint")]
    pub mountpoint: String,
}

#[derive(Debug, Serialize)]
pub struct Volume {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Mountpoint", skip_serializing_if = "String::is_empty")]
    pub mountpoint: String,
    /// RFC 3339; omitted rather than empty, since Docker cannot parse "".
    #[serde(rename = "CreatedAt", skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(rename = "Status", skip_serializing_if = "Option::is_none")]
    pub status: Option<Map<String, Value>>,
}

#[derive(Debug, Serialize)]
pub struct GetResponse {
    #[serde(rename = "Volume")]
    pub volume: Volume,
}

#[derive(Debug, Serialize)]
pub struct ListResponse {
    #[serde(rename = "Volumes")]
    pub volumes: Vec<Volume>,
}

#[derive(Debug, Serialize)]
pub struct Scope {
    #[serde(rename = "Scope")]
    pub scope: &'static str,
}

#[derive(Debug, Serialize)]
pub struct CapabilitiesResponse {
    #[serde(rename = "Capabilities")]
    pub capabilities: Scope,
}

#[derive(Debug, Serialize)]
pub struct Empty {}

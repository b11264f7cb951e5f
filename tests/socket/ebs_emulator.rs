//! The strict EBS emulator (`tests/common/ebs_strict.rs`) itself, over raw HTTP: that it enforces the rules
//! the EBS tests rely on it for, so a client that passes against it is held to the real service's rules.

use crate::ebs_strict;

use std::sync::atomic::Ordering;

use base64::Engine;
use bytes::Bytes;
use ebs_strict::{StrictEbs, BLOCK_SIZE};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

struct Answer {
    status: u16,
    error_type: Option<String>,
    headers: hyper::HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn reason(&self) -> String {
        self.json()["Reason"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

async fn call(
    ebs: &StrictEbs,
    method: Method,
    path: &str,
    headers: &[(&str, String)],
    body: Bytes,
) -> Answer {
    let stream = tokio::net::TcpStream::connect(ebs.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", ebs.addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let resp = sender
        .send_request(req.body(Full::new(body)).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let error_type = headers
        .get("x-amzn-errortype")
        .map(|v| v.to_str().unwrap().to_string());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        error_type,
        headers,
        body,
    }
}

fn block(seed: u8) -> Bytes {
    Bytes::from(
        (0..BLOCK_SIZE)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<u8>>(),
    )
}

fn sum(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(data))
}

async fn start(ebs: &StrictEbs, parent: Option<&str>) -> String {
    let mut body = json!({ "VolumeSize": 1, "Tags": [{ "Key": "ferry:volume", "Value": "v" }] });
    if let Some(p) = parent {
        body["ParentSnapshotId"] = json!(p);
    }
    let a = call(
        ebs,
        Method::POST,
        "/snapshots",
        &[],
        Bytes::from(body.to_string()),
    )
    .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    assert_eq!(a.json()["Status"], "pending");
    assert_eq!(a.json()["BlockSize"], BLOCK_SIZE);
    a.json()["SnapshotId"].as_str().unwrap().to_string()
}

async fn put(ebs: &StrictEbs, id: &str, index: u64, data: Bytes) -> Answer {
    let headers = [
        ("x-amz-Data-Length", data.len().to_string()),
        ("x-amz-Checksum", sum(&data)),
        ("x-amz-Checksum-Algorithm", "SHA256".to_string()),
    ];
    call(
        ebs,
        Method::PUT,
        &format!("/snapshots/{id}/blocks/{index}"),
        &headers,
        data,
    )
    .await
}

async fn complete(ebs: &StrictEbs, id: &str, count: u64) -> Answer {
    call(
        ebs,
        Method::POST,
        &format!("/snapshots/completion/{id}"),
        &[("x-amz-ChangedBlocksCount", count.to_string())],
        Bytes::new(),
    )
    .await
}

/// Every (index, token) of a snapshot, following NextToken.
async fn list(ebs: &StrictEbs, id: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut path = format!("/snapshots/{id}/blocks?maxResults=100");
        if let Some(t) = &token {
            path.push_str(&format!("&pageToken={t}"));
        }
        let a = call(ebs, Method::GET, &path, &[], Bytes::new()).await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        let v = a.json();
        for b in v["Blocks"].as_array().unwrap() {
            out.push((
                b["BlockIndex"].as_u64().unwrap(),
                b["BlockToken"].as_str().unwrap().to_string(),
            ));
        }
        match v["NextToken"].as_str() {
            Some(t) => token = Some(t.to_string()),
            None => return out,
        }
    }
}

async fn get(ebs: &StrictEbs, id: &str, index: u64, token: &str) -> Answer {
    call(
        ebs,
        Method::GET,
        &format!("/snapshots/{id}/blocks/{index}?blockToken={token}"),
        &[],
        Bytes::new(),
    )
    .await
}

#[tokio::test]
async fn blocks_round_trip_through_small_pages() {
    let ebs = StrictEbs::start(2).await;
    let id = start(&ebs, None).await;
    for (index, seed) in [(0, 1), (5, 2), (9, 3), (2047, 4)] {
        let a = put(&ebs, &id, index, block(seed)).await;
        assert_eq!(a.status, 201, "{:?}", a.body);
        assert_eq!(a.headers["x-amz-checksum"], sum(&block(seed)).as_str());
    }
    assert_eq!(complete(&ebs, &id, 4).await.status, 202);
    assert!(ebs.is_completed(&id));
    let listed = list(&ebs, &id).await;
    assert_eq!(
        listed.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        vec![0, 5, 9, 2047]
    );
    assert_eq!(ebs.counters().list_pages.load(Ordering::Relaxed), 2);
    for ((index, token), seed) in listed.iter().zip([1, 2, 3, 4]) {
        let a = get(&ebs, &id, *index, token).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.body, block(seed));
        assert_eq!(a.headers["x-amz-checksum"], sum(&block(seed)).as_str());
    }
    assert_eq!(ebs.tags(&id), vec![("ferry:volume".into(), "v".into())]);
}

#[tokio::test]
async fn the_rules_moto_does_not_enforce_are_enforced() {
    let ebs = StrictEbs::start(100).await;
    let id = start(&ebs, None).await;
    let data = block(7);

    // A checksum of other data.
    let headers = [
        ("x-amz-Data-Length", BLOCK_SIZE.to_string()),
        ("x-amz-Checksum", sum(&block(8))),
        ("x-amz-Checksum-Algorithm", "SHA256".to_string()),
    ];
    let a = call(
        &ebs,
        Method::PUT,
        &format!("/snapshots/{id}/blocks/0"),
        &headers,
        data.clone(),
    )
    .await;
    assert_eq!((a.status, a.reason().as_str()), (400, "INVALID_CHECKSUM"));
    assert_eq!(a.error_type.as_deref(), Some("ValidationException"));

    // A short block.
    let a = put(&ebs, &id, 0, data.slice(..4096)).await;
    assert_eq!(
        (a.status, a.reason().as_str()),
        (400, "INVALID_DATA_LENGTH")
    );

    // Outside a 1 GiB volume.
    let a = put(&ebs, &id, 2048, data.clone()).await;
    assert_eq!((a.status, a.reason().as_str()), (400, "INVALID_BLOCK"));

    assert_eq!(put(&ebs, &id, 3, data.clone()).await.status, 201);
    // Overwriting a block in the same snapshot counts once.
    assert_eq!(put(&ebs, &id, 3, block(9)).await.status, 201);
    let a = complete(&ebs, &id, 2).await;
    assert_eq!(
        (a.status, a.reason().as_str()),
        (400, "INVALID_CHANGED_BLOCKS_COUNT")
    );
    assert!(!ebs.is_completed(&id));
    assert_eq!(complete(&ebs, &id, 1).await.status, 202);

    let a = put(&ebs, &id, 4, data.clone()).await;
    assert_eq!(
        (a.status, a.reason().as_str()),
        (400, "INVALID_SNAPSHOT_STATE")
    );

    // A token from another snapshot's listing, and a snapshot that does not exist.
    let other = start(&ebs, None).await;
    assert_eq!(put(&ebs, &other, 3, data.clone()).await.status, 201);
    assert_eq!(complete(&ebs, &other, 1).await.status, 202);
    let (_, foreign) = list(&ebs, &other).await.remove(0);
    let a = get(&ebs, &id, 3, &foreign).await;
    assert_eq!(
        (a.status, a.reason().as_str()),
        (400, "INVALID_BLOCK_TOKEN")
    );
    let a = complete(&ebs, "snap-0000000000000000", 0).await;
    assert_eq!(a.status, 404);
    assert_eq!(a.error_type.as_deref(), Some("ResourceNotFoundException"));
}

#[tokio::test]
async fn a_child_inherits_its_parents_blocks() {
    let ebs = StrictEbs::start(100).await;
    let parent = start(&ebs, None).await;
    put(&ebs, &parent, 0, block(1)).await;
    put(&ebs, &parent, 1, block(2)).await;
    // A parent still pending cannot have children.
    let a = call(
        &ebs,
        Method::POST,
        "/snapshots",
        &[],
        Bytes::from(json!({ "VolumeSize": 1, "ParentSnapshotId": parent }).to_string()),
    )
    .await;
    assert_eq!(
        (a.status, a.reason().as_str()),
        (400, "INVALID_PARENT_SNAPSHOT_ID")
    );
    complete(&ebs, &parent, 2).await;

    let child = start(&ebs, Some(&parent)).await;
    put(&ebs, &child, 1, block(3)).await;
    put(&ebs, &child, 2, block(4)).await;
    assert_eq!(complete(&ebs, &child, 2).await.status, 202);
    assert_eq!(ebs.own_blocks(&child), vec![1, 2]);

    let listed = list(&ebs, &child).await;
    let expected = [(0, block(1)), (1, block(3)), (2, block(4))];
    assert_eq!(listed.len(), expected.len());
    for ((index, token), (want_index, want)) in listed.iter().zip(expected) {
        assert_eq!(*index, want_index);
        assert_eq!(get(&ebs, &child, *index, token).await.body, want);
    }
}

#[tokio::test]
async fn throttling_and_idempotent_starts() {
    let ebs = StrictEbs::start(100).await;
    ebs.faults().throttle_every.store(2, Ordering::Relaxed);
    let body = Bytes::from(json!({ "VolumeSize": 1, "ClientToken": "t-1" }).to_string());
    let first = call(&ebs, Method::POST, "/snapshots", &[], body.clone()).await;
    assert_eq!(first.status, 201);
    let throttled = call(&ebs, Method::POST, "/snapshots", &[], body.clone()).await;
    assert_eq!(throttled.status, 400);
    assert_eq!(throttled.error_type.as_deref(), Some("ThrottlingException"));
    // The retry with the same client token gets the same snapshot, not a second one.
    let retried = call(&ebs, Method::POST, "/snapshots", &[], body).await;
    assert_eq!(retried.status, 201);
    assert_eq!(retried.json()["SnapshotId"], first.json()["SnapshotId"]);
    assert_eq!(ebs.counters().throttled.load(Ordering::Relaxed), 1);
    assert_eq!(ebs.counters().calls.load(Ordering::Relaxed), 3);
}

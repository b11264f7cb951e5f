//! `SnapshotClient`: the AWS calls the ebs backend makes, and nothing else. EBS direct APIs move blocks;
//! EC2 finds a volume's snapshots by tag and deletes them.
//!
//! It owns deadlines, retries of throttled calls (the SDK's standard retry mode) and turning AWS's error
//! codes into words. It must not know about images, block maps or the catalog. Credentials come only from
//! the standard AWS chain (environment, profile, instance role) and are never logged or put in errors.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_ebs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ebs::primitives::ByteStream;
use aws_sdk_ebs::types::{ChecksumAlgorithm, Status as EbsStatus, Tag as EbsTag};
use aws_sdk_ec2::types::{Filter, SnapshotState};
use base64::Engine;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::blockmap::BLOCK_SIZE;

/// How long one AWS call may take, retries included, before it fails.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts per call: throttling is expected under load, so more than the SDK's default of 3.
const MAX_ATTEMPTS: u32 = 8;
/// Page size of ListSnapshotBlocks (the API allows up to 10000).
const LIST_PAGE: i32 = 10_000;

/// Tag keys Ferry puts on its snapshots. A snapshot is Ferry's only if it has the namespace tag.
pub mod tags {
    pub const NAMESPACE: &str = "ferry:namespace";
    pub const VOLUME: &str = "ferry:volume";
    pub const GENERATION: &str = "ferry:generation";
    pub const PARENT: &str = "ferry:parent";
    pub const HOST: &str = "ferry:host";
    /// The volume's options (size, fs, uid, gid, mode, checkpoint) as canonical JSON, so a Create on
    /// another host can adopt the volume or refuse contradicting options.
    pub const OPTIONS: &str = "ferry:options";
    /// Prefix of "ferry:mounted:HOST_ID" = "EPOCH_SECS HOST_ID HOSTNAME", on the snapshot a host's mounted
    /// copy is based on; refreshed while mounted and deleted at unmount, so a Remove elsewhere can tell
    /// the volume is in use. One key per host: two hosts on one snapshot never overwrite or clear each
    /// other's. A bare `ferry:mounted` key (written by Ferry before it had one per host) is still read.
    pub const MOUNTED: &str = "ferry:mounted:";

    /// The key of `host_id`'s mounted tag.
    pub fn mounted_key(host_id: &str) -> String {
        format!("{MOUNTED}{host_id}")
    }
    /// Prefix of "ferry:pulling:HOST_ID" = "EPOCH_SECS", on a snapshot a host is pulling: retention leaves
    /// it alone while the tag is fresh. One key per host, so a host clears only its own.
    pub const PULLING: &str = "ferry:pulling:";
    /// The number of blocks the snapshot itself holds (its changed blocks).
    pub const BLOCKS: &str = "ferry:blocks";
}

#[derive(Debug, thiserror::Error)]
pub enum EbsError {
    #[error("EBS {op} failed for volume {volume}: {what}")]
    Api {
        op: &'static str,
        volume: String,
        what: String,
        kind: &'static str,
    },
    #[error("cannot reach AWS ({endpoint}) for {op} of volume {volume}: {reason}; check the network, [ebs] region and endpoint_url")]
    Unreachable {
        op: &'static str,
        volume: String,
        endpoint: String,
        reason: String,
    },
    #[error("no AWS credentials for EBS {op} of volume {volume}: {detail}. Ferry looks for them, for the user that runs ferry serve, in the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_WEB_IDENTITY_TOKEN_FILE), in the shared files {files} (AWS_PROFILE chooses the profile), and in the instance role through the instance metadata service; provide one of them")]
    NoCredentials {
        op: &'static str,
        volume: String,
        /// What the credential chain said, without any secret (it holds none when nothing was found).
        detail: String,
        /// The shared credentials and config files this process reads.
        files: String,
    },
    #[error("EBS {op} for volume {volume} did not finish within {secs} s")]
    Timeout {
        op: &'static str,
        volume: String,
        secs: u64,
    },
    #[error("block {index} of snapshot {snapshot} (volume {volume}) failed its SHA-256 checksum; the pull stopped and nothing was mounted")]
    Checksum {
        volume: String,
        snapshot: String,
        index: u64,
    },
    #[error("volume {volume}: {reason}")]
    Invalid { volume: String, reason: String },
    #[error("volume {volume}: this host may no longer publish it ({reason}), so its snapshot was deleted. This host's changes were not published and are kept in {image}; run `ferry ebs set-aside {volume}` to move them to a rescue directory (it prints where) and take the newest data at the next mount")]
    Fenced {
        volume: String,
        reason: String,
        image: String,
    },
    #[error("volume {volume} was changed elsewhere: EBS holds generation {newest} (snapshot {snapshot}) but this host's copy is based on generation {base}. Its local changes were kept in {image}, not shipped; run `ferry ebs set-aside {volume}` to move this copy to a rescue directory (it prints where, so you can copy out what you need) and take the newest data at the next mount")]
    Diverged {
        volume: String,
        newest: u64,
        snapshot: String,
        base: u64,
        image: String,
    },
    #[error("volume {volume}: {winner} shipped generation {generation} at the same moment as this host; by the tie rule (the smaller snapshot id wins) it was kept and this host's snapshot deleted. This host's changes were not shipped and are kept in {image}; run `ferry ebs set-aside {volume}` to move them to a rescue directory (it prints where) and take the newest data at the next mount")]
    Raced {
        volume: String,
        generation: u64,
        /// "host H (snapshot S)".
        winner: String,
        image: String,
    },
    #[error("volume {volume}: snapshot {snapshot} of generation {generation} is still being written (by host {host}); retry once it completes")]
    Pending {
        volume: String,
        snapshot: String,
        generation: u64,
        host: String,
    },
    #[error("volume {volume} already exists in EBS with {option} = {theirs}, but this create asks for {ours}; use the same options to adopt it, or another name")]
    Contradicts {
        volume: String,
        option: String,
        theirs: String,
        ours: String,
    },
    #[error("cannot {op} {path} of volume {volume}: {source}")]
    Io {
        op: &'static str,
        volume: String,
        path: String,
        source: std::io::Error,
    },
}

impl EbsError {
    /// A stable, low-cardinality name for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            EbsError::Api { kind, .. } => kind,
            EbsError::Unreachable { .. } => "ebs_unreachable",
            EbsError::NoCredentials { .. } => "ebs_no_credentials",
            EbsError::Timeout { .. } => "ebs_timeout",
            EbsError::Checksum { .. } => "ebs_checksum",
            EbsError::Invalid { .. } => "ebs_invalid",
            EbsError::Diverged { .. } => "ebs_diverged",
            EbsError::Fenced { .. } => "fenced",
            EbsError::Raced { .. } => "ebs_raced",
            EbsError::Pending { .. } => "ebs_pending",
            EbsError::Contradicts { .. } => "ebs_contradicts",
            EbsError::Io { .. } => "io",
        }
    }
}

/// Whether an SDK error, somewhere in its chain of causes, is the credential chain finding no credentials
/// (or failing to load them), and if so what it said.
fn missing_credentials(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    use aws_credential_types::provider::error::CredentialsError;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(creds) = c.downcast_ref::<CredentialsError>() {
            return Some(match creds {
                CredentialsError::CredentialsNotLoaded(_) => {
                    "the credential chain found none".to_string()
                }
                // Found a source but could not use it (a bad profile, an unreachable provider): its words.
                other => {
                    let mut text = format!("loading them failed: {other}");
                    let mut next = std::error::Error::source(other);
                    while let Some(inner) = next {
                        text.push_str(&format!(": {inner}"));
                        next = inner.source();
                    }
                    text
                }
            });
        }
        cause = c.source();
    }
    None
}

/// The shared credentials and config files the SDK reads in this process, as the operator must name them:
/// `AWS_SHARED_CREDENTIALS_FILE` and `AWS_CONFIG_FILE` when set, otherwise under `$HOME/.aws`.
fn shared_files() -> String {
    let home = std::env::var("HOME").unwrap_or_else(|_| "~".into());
    let file = |var: &str, default: &str| match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => format!("{home}/.aws/{default}"),
    };
    format!(
        "{} and {}",
        file("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
        file("AWS_CONFIG_FILE", "config")
    )
}

/// AWS's error codes in words, with what the operator can do. The code stays in parentheses so it can be
/// looked up.
fn words_for(code: &str, message: &str) -> (String, &'static str) {
    let (what, kind) = match code {
        "ThrottlingException" | "RequestThrottledException" | "RequestLimitExceeded"
        | "Throttling" => (
            "AWS kept throttling the requests after retries; lower [ebs] concurrency or try again later"
                .to_string(),
            "ebs_throttled",
        ),
        "AccessDeniedException" | "UnauthorizedOperation" | "AuthFailure"
        | "UnrecognizedClientException" | "InvalidClientTokenId" | "ExpiredToken"
        | "ExpiredTokenException" | "SignatureDoesNotMatch" => (
            "AWS refused the credentials; check the AWS credential chain (environment, profile, \
             instance role) and that it allows ebs:*Snapshot* and ec2:DescribeSnapshots/DeleteSnapshot/CreateTags/DeleteTags"
                .to_string(),
            "ebs_denied",
        ),
        "ResourceNotFoundException" | "InvalidSnapshot.NotFound" => {
            (format!("not found: {message}"), "ebs_not_found")
        }
        "ValidationException" | "InvalidParameterValue" | "InvalidParameter" => (
            format!("AWS refused the request as invalid: {message}"),
            "ebs_invalid_request",
        ),
        "ServiceQuotaExceededException" | "ConcurrentLimitExceededException" => (
            "an AWS quota was reached (snapshots in progress or stored); wait or raise the quota"
                .to_string(),
            "ebs_quota",
        ),
        "ConflictException" => (
            format!("AWS reported a conflicting request: {message}"),
            "ebs_conflict",
        ),
        "InternalServerException" | "InternalError" | "ServiceUnavailable" => (
            "AWS had an internal error; try again later".to_string(),
            "ebs_aws_internal",
        ),
        "InvalidSnapshot.InUse" => (
            format!("the snapshot is in use: {message}"),
            "ebs_in_use",
        ),
        _ => (format!("AWS answered: {message}"), "ebs_api"),
    };
    let code = if code.is_empty() { "no code" } else { code };
    (format!("{what} ({code})"), kind)
}

/// One snapshot of a volume as EC2 lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: String,
    pub state: SnapState,
    pub generation: u64,
    pub parent: Option<String>,
    pub host: String,
    /// The `ferry:options` tag, parsed; empty if absent or unreadable.
    pub options: BTreeMap<String, String>,
    /// The values of the snapshot's `ferry:mounted:*` tags (and of a bare `ferry:mounted`), as they are.
    pub mounted: Vec<String>,
    /// When the snapshot was started, in seconds since the epoch, if EC2 said.
    pub started: Option<u64>,
    /// The `ferry:blocks` tag: how many blocks this generation changed.
    pub blocks: Option<u64>,
    /// The freshest `ferry:pulling:*` tag, in seconds since the epoch.
    pub pulling: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapState {
    Pending,
    Completed,
    /// Failed or recoverable-failed: never part of a volume's history.
    Failed,
}

/// One block of a snapshot: where it is and the token that reads it.
#[derive(Clone, Debug)]
pub struct BlockRef {
    pub index: u64,
    pub token: String,
}

/// One block as GetSnapshotBlock returned it, not yet checked.
pub struct Fetched {
    volume: String,
    snapshot: String,
    index: u64,
    /// Bytes received.
    len: usize,
    /// Their SHA-256, computed as they arrived.
    digest: [u8; 32],
    expected: Option<String>,
}

impl Fetched {
    /// Checks the block's length and its SHA-256 against the checksum EBS sent; returns the digest, so
    /// the caller need not hash the block again.
    pub fn verify(self) -> Result<[u8; 32], EbsError> {
        let actual = base64::engine::general_purpose::STANDARD.encode(self.digest);
        if self.len as u64 != BLOCK_SIZE || self.expected.as_deref() != Some(actual.as_str()) {
            return Err(self.failed());
        }
        Ok(self.digest)
    }

    fn failed(self) -> EbsError {
        EbsError::Checksum {
            volume: self.volume,
            snapshot: self.snapshot,
            index: self.index,
        }
    }
}

/// The settings that shape the client.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    pub region: String,
    pub endpoint_url: Option<String>,
}

/// The AWS clients, cheap to clone.
#[derive(Clone)]
pub struct SnapshotClient {
    ebs: aws_sdk_ebs::Client,
    ec2: aws_sdk_ec2::Client,
    /// For error messages: the endpoint URL, or the region's public endpoints.
    endpoint: String,
}

impl SnapshotClient {
    /// Builds clients from the standard AWS configuration chain. Nothing is sent yet.
    pub async fn new(settings: &ClientSettings) -> SnapshotClient {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(settings.region.clone()))
            .retry_config(
                aws_config::retry::RetryConfig::standard()
                    .with_max_attempts(MAX_ATTEMPTS)
                    .with_initial_backoff(Duration::from_millis(100)),
            )
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(20))
                    .operation_timeout(CALL_TIMEOUT)
                    .build(),
            );
        if let Some(url) = &settings.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let shared = loader.load().await;
        SnapshotClient {
            ebs: aws_sdk_ebs::Client::new(&shared),
            ec2: aws_sdk_ec2::Client::new(&shared),
            endpoint: settings
                .endpoint_url
                .clone()
                .unwrap_or_else(|| format!("region {}", settings.region)),
        }
    }

    fn fail<E, R>(&self, op: &'static str, volume: &str, e: SdkError<E, R>) -> EbsError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug + 'static,
    {
        let volume = volume.to_string();
        // Credentials are resolved before the request is sent, so their absence reaches us as a dispatch
        // failure, which would otherwise blame the network.
        if let Some(detail) = missing_credentials(&e) {
            return EbsError::NoCredentials {
                op,
                volume,
                detail,
                files: shared_files(),
            };
        }
        match &e {
            SdkError::TimeoutError(_) => EbsError::Timeout {
                op,
                volume,
                secs: CALL_TIMEOUT.as_secs(),
            },
            SdkError::DispatchFailure(d) => EbsError::Unreachable {
                op,
                volume,
                endpoint: self.endpoint.clone(),
                reason: if d.is_timeout() {
                    "the connection timed out".into()
                } else if d.is_io() {
                    "the connection failed".into()
                } else {
                    "the request could not be sent".into()
                },
            },
            SdkError::ServiceError(s) => {
                let err = s.err();
                let (what, kind) = words_for(err.code().unwrap_or(""), err.message().unwrap_or(""));
                EbsError::Api {
                    op,
                    volume,
                    what,
                    kind,
                }
            }
            _ => EbsError::Api {
                op,
                volume,
                what: format!("{}", aws_sdk_ebs::error::DisplayErrorContext(&e)),
                kind: "ebs_api",
            },
        }
    }

    /// Starts a snapshot of a volume of `size` bytes. `token` makes a retried start return the same
    /// snapshot instead of a second one.
    pub async fn start_snapshot(
        &self,
        volume: &str,
        size: u64,
        parent: Option<&str>,
        tags: &[(&str, String)],
        token: &str,
    ) -> Result<String, EbsError> {
        let gib = size.div_ceil(1 << 30).max(1) as i64;
        let out = self
            .ebs
            .start_snapshot()
            .volume_size(gib)
            .set_parent_snapshot_id(parent.map(str::to_string))
            .set_tags(Some(
                tags.iter()
                    .map(|(k, v)| EbsTag::builder().key(*k).value(v.clone()).build())
                    .collect(),
            ))
            .description(format!("ferry volume {volume}"))
            .client_token(token)
            // Minutes before EBS gives up on a snapshot nobody completes: the shortest allowed, so a
            // crashed push stops blocking other hosts soon.
            .timeout(10)
            .send()
            .await
            .map_err(|e| self.fail("StartSnapshot", volume, e))?;
        out.snapshot_id()
            .map(str::to_string)
            .ok_or_else(|| EbsError::Invalid {
                volume: volume.into(),
                reason: "StartSnapshot answered without a snapshot id".into(),
            })
    }

    /// Writes one full block with its SHA-256 `digest`, which the caller already has from the scan that
    /// found the block changed (hashing 512 KiB twice is most of a push's CPU).
    pub async fn put_block(
        &self,
        volume: &str,
        snapshot: &str,
        index: u64,
        data: Bytes,
        digest: &[u8; 32],
    ) -> Result<(), EbsError> {
        debug_assert_eq!(data.len() as u64, BLOCK_SIZE);
        let checksum = base64::engine::general_purpose::STANDARD.encode(digest);
        self.ebs
            .put_snapshot_block()
            .snapshot_id(snapshot)
            .block_index(block_index(volume, index)?)
            .data_length(data.len() as i32)
            .checksum(checksum)
            .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
            .block_data(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| self.fail("PutSnapshotBlock", volume, e))?;
        Ok(())
    }

    /// Seals a snapshot, telling EBS exactly how many blocks were written; returns whether EBS already
    /// reports it completed (otherwise it is still being processed).
    pub async fn complete(
        &self,
        volume: &str,
        snapshot: &str,
        changed: u64,
    ) -> Result<bool, EbsError> {
        let out = self
            .ebs
            .complete_snapshot()
            .snapshot_id(snapshot)
            .changed_blocks_count(i32::try_from(changed).map_err(|_| EbsError::Invalid {
                volume: volume.into(),
                reason: format!(
                    "{changed} changed blocks is more than EBS accepts in one snapshot"
                ),
            })?)
            .send()
            .await
            .map_err(|e| self.fail("CompleteSnapshot", volume, e))?;
        match out.status() {
            Some(EbsStatus::Completed) => Ok(true),
            Some(EbsStatus::Error) => Err(EbsError::Api {
                op: "CompleteSnapshot",
                volume: volume.into(),
                what: format!("EBS reported snapshot {snapshot} as failed"),
                kind: "ebs_snapshot_failed",
            }),
            _ => Ok(false),
        }
    }

    /// Every block a snapshot lists, following pagination.
    pub async fn list_blocks(
        &self,
        volume: &str,
        snapshot: &str,
    ) -> Result<Vec<BlockRef>, EbsError> {
        let mut out = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let page = self
                .ebs
                .list_snapshot_blocks()
                .snapshot_id(snapshot)
                .max_results(LIST_PAGE)
                .set_next_token(next.take())
                .send()
                .await
                .map_err(|e| self.fail("ListSnapshotBlocks", volume, e))?;
            for b in page.blocks() {
                if let (Some(i), Some(t)) = (b.block_index(), b.block_token()) {
                    if i >= 0 {
                        out.push(BlockRef {
                            index: i as u64,
                            token: t.to_string(),
                        });
                    }
                }
            }
            match page.next_token() {
                Some(t) if !t.is_empty() && !page.blocks().is_empty() => next = Some(t.to_string()),
                _ => break,
            }
        }
        Ok(out)
    }

    /// The blocks written after `older` in the lineage of `newer` (EBS ListChangedBlocks), each with the
    /// token that reads it from `newer`, following pagination. Both must be completed snapshots of one
    /// lineage.
    pub async fn list_changed_blocks(
        &self,
        volume: &str,
        older: &str,
        newer: &str,
    ) -> Result<Vec<BlockRef>, EbsError> {
        let mut out = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let page = self
                .ebs
                .list_changed_blocks()
                .first_snapshot_id(older)
                .second_snapshot_id(newer)
                .max_results(LIST_PAGE)
                .set_next_token(next.take())
                .send()
                .await
                .map_err(|e| self.fail("ListChangedBlocks", volume, e))?;
            for b in page.changed_blocks() {
                let Some(i) = b.block_index().filter(|i| *i >= 0) else {
                    continue;
                };
                // Blocks are never taken out of a lineage, so every changed block is in the newer
                // snapshot; one that is not means the two are not one lineage, and a patch must not guess.
                let Some(t) = b.second_block_token() else {
                    return Err(EbsError::Invalid {
                        volume: volume.into(),
                        reason: format!(
                            "EBS listed block {i} as changed between {older} and {newer} without a token \
                             for {newer}; the two snapshots are not of one lineage"
                        ),
                    });
                };
                out.push(BlockRef {
                    index: i as u64,
                    token: t.to_string(),
                });
            }
            match page.next_token() {
                Some(t) if !t.is_empty() && !page.changed_blocks().is_empty() => {
                    next = Some(t.to_string())
                }
                _ => break,
            }
        }
        Ok(out)
    }

    /// Reads one block as EBS sends it into `into` (`BLOCK_SIZE` bytes), with the checksum EBS sends
    /// beside it. The body is hashed piece by piece as it arrives, while each piece is still in the CPU's
    /// cache, and copied straight to `into` (collecting it first and copying it whole after was a second
    /// pass over every byte). Nothing is checked yet: `Fetched::verify` does that.
    pub async fn fetch_block(
        &self,
        volume: &str,
        snapshot: &str,
        block: &BlockRef,
        into: &mut [u8],
    ) -> Result<Fetched, EbsError> {
        let out = self
            .ebs
            .get_snapshot_block()
            .snapshot_id(snapshot)
            .block_index(block_index(volume, block.index)?)
            .block_token(&block.token)
            .send()
            .await
            .map_err(|e| self.fail("GetSnapshotBlock", volume, e))?;
        let mut fetched = Fetched {
            volume: volume.into(),
            snapshot: snapshot.into(),
            index: block.index,
            len: 0,
            digest: [0; 32],
            expected: out.checksum().map(str::to_string),
        };
        let mut body = out.block_data;
        let mut sha = Sha256::new();
        loop {
            let piece = match body.try_next().await {
                Ok(Some(piece)) => piece,
                Ok(None) => break,
                Err(e) => {
                    return Err(EbsError::Unreachable {
                        op: "GetSnapshotBlock",
                        volume: volume.into(),
                        endpoint: self.endpoint.clone(),
                        reason: format!("the block's data stopped arriving: {e}"),
                    })
                }
            };
            let Some(slot) = into.get_mut(fetched.len..fetched.len + piece.len()) else {
                // Longer than a block: it cannot pass its check, whatever its checksum says.
                return Err(fetched.failed());
            };
            slot.copy_from_slice(&piece);
            sha.update(&piece);
            fetched.len += piece.len();
        }
        fetched.digest = sha.finalize().into();
        Ok(fetched)
    }

    /// Every snapshot of `namespace` carrying a `ferry:volume` tag of `volume`, or of every volume when
    /// `volume` is `None`, in no particular order.
    pub async fn find(
        &self,
        namespace: &str,
        volume: Option<&str>,
    ) -> Result<Vec<(String, SnapshotInfo)>, EbsError> {
        let label = volume.unwrap_or("*");
        let mut out = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let mut req = self
                .ec2
                .describe_snapshots()
                .owner_ids("self")
                .filters(
                    Filter::builder()
                        .name(format!("tag:{}", tags::NAMESPACE))
                        .values(namespace)
                        .build(),
                )
                .set_next_token(next.take());
            if let Some(v) = volume {
                req = req.filters(
                    Filter::builder()
                        .name(format!("tag:{}", tags::VOLUME))
                        .values(v)
                        .build(),
                );
            }
            let page = req
                .send()
                .await
                .map_err(|e| self.fail("DescribeSnapshots", label, e))?;
            for s in page.snapshots() {
                let tag = |key: &str| {
                    s.tags()
                        .iter()
                        .find(|t| t.key() == Some(key))
                        .and_then(|t| t.value())
                        .map(str::to_string)
                };
                // Filters are applied by AWS; check again, so a server that ignores one (or a
                // hand-tagged snapshot) can never mix another volume's blocks into this one.
                if tag(tags::NAMESPACE).as_deref() != Some(namespace) {
                    continue;
                }
                let Some(vol) = tag(tags::VOLUME) else {
                    continue;
                };
                if volume.is_some_and(|v| v != vol) {
                    continue;
                }
                let (Some(id), Some(generation)) = (
                    s.snapshot_id(),
                    tag(tags::GENERATION).and_then(|g| g.parse::<u64>().ok()),
                ) else {
                    continue;
                };
                let state = match s.state() {
                    Some(SnapshotState::Completed) => SnapState::Completed,
                    Some(SnapshotState::Pending) => SnapState::Pending,
                    _ => SnapState::Failed,
                };
                out.push((
                    vol,
                    SnapshotInfo {
                        id: id.to_string(),
                        state,
                        generation,
                        parent: tag(tags::PARENT).filter(|p| !p.is_empty()),
                        host: tag(tags::HOST).unwrap_or_default(),
                        options: tag(tags::OPTIONS)
                            .and_then(|o| serde_json::from_str(&o).ok())
                            .unwrap_or_default(),
                        mounted: s
                            .tags()
                            .iter()
                            .filter(|t| {
                                t.key().is_some_and(|k| {
                                    k.starts_with(tags::MOUNTED) || k == "ferry:mounted"
                                })
                            })
                            .filter_map(|t| t.value().map(str::to_string))
                            .collect(),
                        started: s.start_time().map(|t| t.secs().max(0) as u64),
                        blocks: tag(tags::BLOCKS).and_then(|b| b.parse().ok()),
                        pulling: s
                            .tags()
                            .iter()
                            .filter(|t| t.key().is_some_and(|k| k.starts_with(tags::PULLING)))
                            .filter_map(|t| t.value()?.parse::<u64>().ok())
                            .max(),
                    },
                ));
            }
            match page.next_token() {
                Some(t) if !t.is_empty() => next = Some(t.to_string()),
                _ => break,
            }
        }
        Ok(out)
    }

    /// The state of one snapshot, `None` if EC2 does not know it.
    pub async fn state(&self, volume: &str, snapshot: &str) -> Result<Option<SnapState>, EbsError> {
        let out = self
            .ec2
            .describe_snapshots()
            .snapshot_ids(snapshot)
            .send()
            .await;
        let out = match out {
            Ok(o) => o,
            Err(e) if e.code() == Some("InvalidSnapshot.NotFound") => return Ok(None),
            Err(e) => return Err(self.fail("DescribeSnapshots", volume, e)),
        };
        Ok(out.snapshots().first().map(|s| match s.state() {
            Some(SnapshotState::Completed) => SnapState::Completed,
            Some(SnapshotState::Pending) => SnapState::Pending,
            _ => SnapState::Failed,
        }))
    }

    /// Sets one tag on a snapshot (EC2 CreateTags overwrites the value of an existing key).
    pub async fn set_tag(
        &self,
        volume: &str,
        snapshot: &str,
        key: &str,
        value: &str,
    ) -> Result<(), EbsError> {
        self.ec2
            .create_tags()
            .resources(snapshot)
            .tags(
                aws_sdk_ec2::types::Tag::builder()
                    .key(key)
                    .value(value)
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.fail("CreateTags", volume, e))?;
        Ok(())
    }

    /// Deletes one tag from a snapshot whatever its value; a snapshot or tag already gone is fine.
    pub async fn delete_tag(
        &self,
        volume: &str,
        snapshot: &str,
        key: &str,
    ) -> Result<(), EbsError> {
        match self
            .ec2
            .delete_tags()
            .resources(snapshot)
            .tags(aws_sdk_ec2::types::Tag::builder().key(key).build())
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("InvalidSnapshot.NotFound") => Ok(()),
            Err(e) => Err(self.fail("DeleteTags", volume, e)),
        }
    }

    /// Deletes a snapshot; one that is already gone is fine.
    pub async fn delete(&self, volume: &str, snapshot: &str) -> Result<(), EbsError> {
        match self
            .ec2
            .delete_snapshot()
            .snapshot_id(snapshot)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("InvalidSnapshot.NotFound") => Ok(()),
            Err(e) => Err(self.fail("DeleteSnapshot", volume, e)),
        }
    }
}

fn block_index(volume: &str, index: u64) -> Result<i32, EbsError> {
    i32::try_from(index).map_err(|_| EbsError::Invalid {
        volume: volume.into(),
        reason: format!("block index {index} is beyond what EBS addresses"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_become_words_and_keep_the_code() {
        let (w, k) = words_for("ThrottlingException", "Rate exceeded");
        assert!(
            w.contains("throttling") && w.ends_with("(ThrottlingException)"),
            "{w}"
        );
        assert_eq!(k, "ebs_throttled");
        let (w, k) = words_for(
            "AccessDeniedException",
            "User: arn:aws:iam::1:user/x is not authorized",
        );
        assert!(w.contains("credential chain"), "{w}");
        assert_eq!(k, "ebs_denied");
        let (w, _) = words_for("", "something odd");
        assert!(
            w.contains("something odd") && w.contains("(no code)"),
            "{w}"
        );
    }
}

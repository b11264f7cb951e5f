//! The ebs backend's decisions, on plain data: which snapshot is the newest, what becomes of a snapshot an
//! interrupted push left, whether a Mount takes the local copy as it is, pulls, makes a fresh filesystem or
//! refuses, whether an Unmount ships, whether a push may start from the copy's base, and whether a Create
//! may adopt a volume another host shipped.
//!
//! Every function here is pure: its inputs are the local copy's record (`copy.json`), what this host's
//! catalog records as shipped, and the snapshots found in EBS by tag. `mod.rs` gathers those, asks, and
//! acts on the answer. This module must not do I/O (no files, no AWS calls, no clock). Refusals that read
//! the same wherever they happen come back as an `EbsError`; those that record a conflict against the
//! copy, and read differently at a Mount and at a push, come back as plans for `mod.rs` to word.

use std::collections::{BTreeMap, HashMap};

use super::client::{EbsError, SnapState, SnapshotInfo};
use super::copy::LocalCopy;
use crate::backend::Shipped;
use crate::spec::VolumeSpec;

/// The options that must match for a Create on another host to adopt a volume. `checkpoint` is this
/// host's choice of schedule, not a property of the data.
pub(super) const DATA_OPTIONS: &[&str] = &["size", "fs", "uid", "gid", "mode"];

/// The volume's data options, as a push tags them on its snapshot.
pub(super) fn data_options(spec: &VolumeSpec) -> BTreeMap<String, String> {
    spec.to_options()
        .into_iter()
        .filter(|(k, _)| DATA_OPTIONS.contains(&k.as_str()))
        .collect()
}

/// Refuses a Create whose data options contradict what the volume's newest snapshot was shipped with.
pub(super) fn contradiction(
    name: &str,
    newest: &SnapshotInfo,
    spec: &VolumeSpec,
) -> Result<(), EbsError> {
    let ours = data_options(spec);
    for key in DATA_OPTIONS {
        let (theirs, mine) = (newest.options.get(*key), ours.get(*key));
        if theirs != mine {
            return Err(EbsError::Contradicts {
                volume: name.into(),
                option: (*key).into(),
                theirs: theirs.cloned().unwrap_or_else(|| "unset".into()),
                ours: mine.cloned().unwrap_or_else(|| "unset".into()),
            });
        }
    }
    Ok(())
}

/// The newest completed snapshot in `list`. Refuses while another host's push of a newer generation is
/// in flight (`own_pending` is this host's own unfinished push, which is settled, not waited for).
pub(super) fn newest(
    name: &str,
    list: &[SnapshotInfo],
    own_pending: Option<&str>,
) -> Result<Option<SnapshotInfo>, EbsError> {
    // Two completed snapshots of one generation are two hosts' pushes racing: the one with the smaller
    // id wins (see `ship::resolve_twin`), and its loser deletes itself; until then, read the winner.
    let top = list
        .iter()
        .filter(|s| s.state == SnapState::Completed)
        .map(|s| s.generation)
        .max();
    let newest = list
        .iter()
        .filter(|s| s.state == SnapState::Completed && Some(s.generation) == top)
        .min_by(|a, b| a.id.cmp(&b.id))
        .cloned();
    let top = top.unwrap_or(0);
    if let Some(p) = list.iter().find(|s| {
        s.state == SnapState::Pending && s.generation > top && Some(s.id.as_str()) != own_pending
    }) {
        return Err(EbsError::Pending {
            volume: name.into(),
            snapshot: p.id.clone(),
            generation: p.generation,
            host: if p.host.is_empty() {
                "unknown".into()
            } else {
                p.host.clone()
            },
        });
    }
    Ok(newest)
}

/// Whether to wait for the snapshot an interrupted push left before settling it: once sealed, EBS may
/// still be processing it, and it may yet complete.
pub(super) fn wait_for_seal(sealed: bool, state: Option<SnapState>) -> bool {
    sealed && state == Some(SnapState::Pending)
}

/// What becomes of the snapshot an interrupted push left (`LocalCopy::pending`).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Settle {
    /// EBS completed it and lists it among the volume's snapshots: its blocks are shipped, so it becomes
    /// the copy's base (once it survives a race for its generation).
    Adopt { generation: u64 },
    /// Unfinished, failed, gone, or not among the volume's snapshots: it is deleted, and the next push
    /// ships the changes again.
    Delete,
}

/// Settles the interrupted push's snapshot from its `state` in EBS (after any wait) and its entry in the
/// volume's listing, if it has one.
pub(super) fn settle(state: Option<SnapState>, found: Option<&SnapshotInfo>) -> Settle {
    match (state, found) {
        (Some(SnapState::Completed), Some(s)) => Settle::Adopt {
            generation: s.generation,
        },
        _ => Settle::Delete,
    }
}

/// What a Mount does when the local copy's directory is gone (deleted by hand).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum MissingCopy {
    /// The local copy is a cache of what EBS holds: it is pulled again.
    Pull,
    /// Nothing was ever shipped, so the data lived only in that directory and nothing can bring it back.
    Lost,
}

/// `newest` is the newest completed snapshot, if EBS holds any.
pub(super) fn missing_copy(newest: Option<&SnapshotInfo>) -> MissingCopy {
    match newest {
        Some(_) => MissingCopy::Pull,
        None => MissingCopy::Lost,
    }
}

/// What a Mount finds, once an interrupted push is settled.
pub(super) struct AttachFacts<'a> {
    /// The local copy's record (the default one if there is no `copy.json`).
    pub copy: &'a LocalCopy,
    /// Whether the local copy's image file exists.
    pub have_image: bool,
    /// Whether the image's block map (the hash of every block) exists.
    pub have_blocks: bool,
    /// The volume's snapshots, as found by tag.
    pub list: &'a [SnapshotInfo],
    /// The newest completed snapshot in `list` (see `newest`).
    pub newest: Option<&'a SnapshotInfo>,
    /// What this host's catalog records as the volume's newest snapshot.
    pub shipped: Option<&'a Shipped>,
    /// The service's snapshots hold only their own blocks (`[ebs] keep_chain`): data is read along the
    /// chain of parents. Otherwise a snapshot lists and reads everything it inherits, as on EBS.
    pub keep_chain: bool,
}

/// Which blocks a pull reads, and from which snapshots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Blocks {
    /// Every block the newest snapshot lists: on EBS a snapshot lists and reads what it inherits, so
    /// no older snapshot is needed.
    Newest(SnapshotInfo),
    /// The blocks written after `base` in the newest snapshot's lineage (ListChangedBlocks), read from
    /// the newest.
    Changed { base: String, newest: SnapshotInfo },
    /// `[ebs] keep_chain`: the snapshots whose own blocks make up the data, newest first; a block is
    /// read from the newest one that lists it.
    Chain(Vec<SnapshotInfo>),
}

/// How a Mount gets the data to mount.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum AttachPlan {
    /// The image is based on the newest snapshot (perhaps with changes on top): mount it as it is.
    Current,
    /// Pull the newest snapshot into a new image, which is then based on it.
    Pull { newest: Shipped, blocks: Blocks },
    /// The image is a clean copy of an older generation in the newest snapshot's lineage: write into it
    /// only the blocks changed since its base, instead of pulling everything again.
    Patch { newest: Shipped, blocks: Blocks },
    /// Nothing was ever shipped and there is no image: make an empty filesystem.
    Fresh,
    /// Refused: the catalog records a newer generation than EBS holds, so snapshots were deleted elsewhere.
    CatalogAhead {
        generation: u64,
        snapshot: String,
        newest: u64,
    },
    /// Refused and recorded as the copy's conflict: the image holds changes on a base that is no longer
    /// the newest snapshot (another host shipped, or the volume was made again elsewhere).
    Diverged {
        newest: u64,
        snapshot: String,
        base: u64,
    },
    /// Refused and recorded as the copy's conflict: the image is based on a generation EBS no longer
    /// holds, so its snapshots were deleted elsewhere.
    DeletedElsewhere { base: u64, newest: u64 },
}

/// Decides how a Mount gets its data. An error means the newest snapshot's lineage is broken.
pub(super) fn attach(name: &str, f: &AttachFacts<'_>) -> Result<AttachPlan, EbsError> {
    let copy = f.copy;
    let newest_gen = f.newest.map_or(0, |n| n.generation);
    if let Some(s) = f.shipped {
        if s.generation > newest_gen {
            return Ok(AttachPlan::CatalogAhead {
                generation: s.generation,
                snapshot: s.snapshot.clone(),
                newest: newest_gen,
            });
        }
    }
    // The same generation is not enough: a volume removed and made again elsewhere starts its
    // generations anew, and an old copy must not pass for the new volume's data.
    let current = f.have_image
        && copy.generation == newest_gen
        && copy.snapshot.as_deref() == f.newest.map(|n| n.id.as_str());
    Ok(if current {
        AttachPlan::Current
    } else if f.have_image && copy.dirty && copy.generation <= newest_gen {
        AttachPlan::Diverged {
            newest: newest_gen,
            snapshot: f.newest.map(|n| n.id.clone()).unwrap_or_default(),
            base: copy.generation,
        }
    } else if f.have_image && copy.generation > newest_gen {
        AttachPlan::DeletedElsewhere {
            base: copy.generation,
            newest: newest_gen,
        }
    } else if let Some(n) = f.newest {
        // A clean copy of an older base, or no image at all: what EBS holds replaces it, patched in
        // where the copy's base is in the newest snapshot's lineage.
        let newest = Shipped {
            snapshot: n.id.clone(),
            generation: n.generation,
        };
        let base = (f.have_image && f.have_blocks && !copy.dirty)
            .then_some(copy.snapshot.as_deref())
            .flatten();
        if f.keep_chain {
            let chain = chain(name, f.list, n)?;
            let base_at = base.and_then(|b| {
                chain
                    .iter()
                    .position(|s| s.id == b && s.generation == copy.generation)
            });
            match base_at {
                Some(k) if k > 0 => AttachPlan::Patch {
                    newest,
                    blocks: Blocks::Chain(chain[..k].to_vec()),
                },
                _ => AttachPlan::Pull {
                    newest,
                    blocks: Blocks::Chain(chain),
                },
            }
        } else {
            let base = base.and_then(|b| {
                f.list.iter().find(|s| {
                    s.id == b
                        && s.state == SnapState::Completed
                        && s.generation == copy.generation
                        && s.generation < n.generation
                })
            });
            match base.filter(|b| !outside_lineage(f.list, n, b)) {
                Some(b) => AttachPlan::Patch {
                    newest,
                    blocks: Blocks::Changed {
                        base: b.id.clone(),
                        newest: n.clone(),
                    },
                },
                None => AttachPlan::Pull {
                    newest,
                    blocks: Blocks::Newest(n.clone()),
                },
            }
        }
    } else {
        AttachPlan::Fresh
    })
}

/// Whether the parent tags prove that `base` is not in `newest`'s lineage: following them from `newest`
/// passes below `base`'s generation without meeting it. Where the walk meets a deleted snapshot it proves
/// nothing, and EBS itself refuses ListChangedBlocks across lineages.
fn outside_lineage(list: &[SnapshotInfo], newest: &SnapshotInfo, base: &SnapshotInfo) -> bool {
    let mut at = newest;
    loop {
        if at.id == base.id {
            return false;
        }
        if at.generation <= base.generation {
            return true;
        }
        let Some(parent) = &at.parent else {
            return true;
        };
        match list.iter().find(|s| &s.id == parent) {
            Some(p) if p.generation < at.generation => at = p,
            _ => return false,
        }
    }
}

/// Which of the volume's snapshots retention deletes, oldest first: those of a generation at least
/// `keep` below the newest's (so the newest `keep` generations stay), and failed ones no newer than the
/// newest. Never the newest, never one named in `protected` (the local copy's base and pending push, the
/// catalog's record), never one a host has mounted or is pulling (a fresh `ferry:mounted` or
/// `ferry:pulling:*` tag), never one still being written.
pub(super) fn retire(
    list: &[SnapshotInfo],
    newest: &SnapshotInfo,
    keep: u64,
    protected: &[&str],
    now: u64,
) -> Vec<SnapshotInfo> {
    let stale = super::mounted::MOUNTED_STALE.as_secs();
    let mut out: Vec<SnapshotInfo> = list
        .iter()
        .filter(|s| s.id != newest.id && !protected.contains(&s.id.as_str()))
        .filter(|s| match s.state {
            SnapState::Completed => s.generation.saturating_add(keep) <= newest.generation,
            SnapState::Failed => s.generation <= newest.generation,
            SnapState::Pending => false,
        })
        .filter(|s| !s.mounted.iter().any(|m| super::mounted::fresh(m, now)))
        .filter(|s| s.pulling.is_none_or(|at| now.saturating_sub(at) >= stale))
        .cloned()
        .collect();
    out.sort_by(|a, b| (a.generation, &a.id).cmp(&(b.generation, &b.id)));
    out
}

/// The snapshots whose blocks make up `newest`, newest first, following each one's parent tag.
pub(super) fn chain(
    name: &str,
    list: &[SnapshotInfo],
    newest: &SnapshotInfo,
) -> Result<Vec<SnapshotInfo>, EbsError> {
    let by_id: HashMap<&str, &SnapshotInfo> = list
        .iter()
        .filter(|s| s.state == SnapState::Completed)
        .map(|s| (s.id.as_str(), s))
        .collect();
    let mut out = vec![newest.clone()];
    let mut at = newest;
    while let Some(parent) = &at.parent {
        let Some(p) = by_id.get(parent.as_str()) else {
            return Err(EbsError::Invalid {
                volume: name.into(),
                reason: format!(
                    "snapshot {} (generation {}) builds on {parent}, which is missing or not completed; \
                     the volume's history was deleted in part outside Ferry",
                    at.id, at.generation
                ),
            });
        };
        // Generations strictly decrease along the chain, so a tag loop cannot spin forever.
        if p.generation >= at.generation {
            return Err(EbsError::Invalid {
                volume: name.into(),
                reason: format!("snapshot {parent} is tagged as its own descendant"),
            });
        }
        out.push((*p).clone());
        at = p;
    }
    Ok(out)
}

/// What an Unmount does with the local copy once it is unmounted.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum DetachPlan {
    /// There is no local copy here (set aside, or deleted by hand): the catalog's record stands.
    NoCopy,
    /// Everything the copy holds is shipped: nothing to do.
    Clean,
    /// The copy may hold unshipped changes, or a push was interrupted: push (which settles it first).
    Push,
}

/// Decides from the local copy's record, `None` if its directory is gone.
pub(super) fn detach(copy: Option<&LocalCopy>) -> DetachPlan {
    match copy {
        None => DetachPlan::NoCopy,
        Some(c) if c.dirty || c.pending.is_some() => DetachPlan::Push,
        Some(_) => DetachPlan::Clean,
    }
}

/// Whether a push (at Unmount or checkpoint) may start from the copy's base.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum BaseCheck {
    /// The base is the newest completed snapshot: the push makes the next generation on top of it.
    Newest,
    /// Refused and recorded as the copy's conflict: EBS holds a newer generation (or another volume's
    /// snapshot of the same one), so shipping would silently merge two hosts' writes.
    Diverged {
        newest: u64,
        snapshot: String,
        base: u64,
    },
    /// Refused and recorded as the copy's conflict: EBS holds only older generations than the base, so
    /// its snapshots were deleted elsewhere.
    DeletedElsewhere { base: u64, newest: u64 },
}

/// Checks the copy's base (after an interrupted push is settled) against the newest completed snapshot.
pub(super) fn base(copy: &LocalCopy, newest: Option<&SnapshotInfo>) -> BaseCheck {
    let newest_gen = newest.map_or(0, |n| n.generation);
    if newest_gen == copy.generation && newest.map(|n| &n.id) == copy.snapshot.as_ref() {
        BaseCheck::Newest
    } else if newest_gen < copy.generation {
        BaseCheck::DeletedElsewhere {
            base: copy.generation,
            newest: newest_gen,
        }
    } else {
        BaseCheck::Diverged {
            newest: newest_gen,
            snapshot: newest.map(|n| n.id.clone()).unwrap_or_default(),
            base: copy.generation,
        }
    }
}

/// What a push does once its base is checked and the changed blocks are found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum PushPlan {
    /// No block changed since the base: no snapshot.
    Unchanged,
    /// Ship the changed blocks as this generation, the one after the base.
    Ship { generation: u64 },
}

/// `changed` are the indices of the blocks that differ from the block map of the copy's base.
pub(super) fn push(copy: &LocalCopy, changed: &[u64]) -> PushPlan {
    if changed.is_empty() {
        PushPlan::Unchanged
    } else {
        PushPlan::Ship {
            generation: copy.generation + 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, generation: u64, parent: Option<&str>, state: SnapState) -> SnapshotInfo {
        SnapshotInfo {
            id: id.into(),
            state,
            generation,
            parent: parent.map(str::to_string),
            host: "h".into(),
            options: Default::default(),
            mounted: Vec::new(),
            started: None,
            blocks: None,
            pulling: None,
        }
    }

    fn done(id: &str, generation: u64, parent: Option<&str>) -> SnapshotInfo {
        snap(id, generation, parent, SnapState::Completed)
    }

    fn copy(snapshot: Option<&str>, generation: u64, dirty: bool) -> LocalCopy {
        LocalCopy {
            snapshot: snapshot.map(str::to_string),
            generation,
            dirty,
            ..LocalCopy::default()
        }
    }

    fn shipped(snapshot: &str, generation: u64) -> Shipped {
        Shipped {
            snapshot: snapshot.into(),
            generation,
        }
    }

    #[test]
    fn a_clean_copy_of_an_older_generation_is_patched_with_the_newer_blocks_only() {
        let list = history();
        let facts = |record: &LocalCopy, have_blocks| {
            attach(
                "v",
                &AttachFacts {
                    copy: record,
                    have_image: true,
                    have_blocks,
                    list: &list,
                    newest: Some(&list[2]),
                    shipped: None,
                    keep_chain: true,
                },
            )
            .unwrap()
        };
        let patch = |newer: Vec<SnapshotInfo>| AttachPlan::Patch {
            newest: shipped("c", 3),
            blocks: Blocks::Chain(newer),
        };
        assert_eq!(
            facts(&copy(Some("b"), 2, false), true),
            patch(vec![list[2].clone()])
        );
        assert_eq!(
            facts(&copy(Some("a"), 1, false), true),
            patch(vec![list[2].clone(), list[1].clone()])
        );
        let pull = AttachPlan::Pull {
            newest: shipped("c", 3),
            blocks: Blocks::Chain(vec![list[2].clone(), list[1].clone(), list[0].clone()]),
        };
        // Without the block map the copy's blocks are unknown; a base outside the lineage (a volume made
        // again elsewhere) or of another generation is not this volume's history.
        assert_eq!(facts(&copy(Some("b"), 2, false), false), pull);
        assert_eq!(facts(&copy(Some("old"), 2, false), true), pull);
        assert_eq!(facts(&copy(Some("b"), 1, false), true), pull);
        // Changes on an older base are never patched over.
        assert!(matches!(
            facts(&copy(Some("b"), 2, true), true),
            AttachPlan::Diverged { .. }
        ));
    }

    /// A volume shipped three times: a <- b <- c.
    fn history() -> Vec<SnapshotInfo> {
        vec![
            done("a", 1, None),
            done("b", 2, Some("a")),
            done("c", 3, Some("b")),
        ]
    }

    fn ids(chain: &[SnapshotInfo]) -> Vec<&str> {
        chain.iter().map(|s| s.id.as_str()).collect()
    }

    #[test]
    fn the_newest_is_the_top_completed_generation_and_its_smaller_twin() {
        let id = |list: &[SnapshotInfo], own| newest("v", list, own).unwrap().map(|s| s.id);
        assert_eq!(id(&[], None), None);
        assert_eq!(id(&history(), None).as_deref(), Some("c"));
        // Failed snapshots and older pending ones never count.
        let mut list = history();
        list.push(snap("z", 9, Some("c"), SnapState::Failed));
        list.push(snap("p", 2, Some("a"), SnapState::Pending));
        assert_eq!(id(&list, None).as_deref(), Some("c"));
        // Two completed snapshots of one generation: the smaller id wins, whatever the listing order.
        let mut twins = history();
        twins.push(done("bb", 3, Some("b")));
        twins.insert(0, done("ba", 3, Some("b")));
        assert_eq!(id(&twins, None).as_deref(), Some("ba"));
    }

    #[test]
    fn another_hosts_push_in_flight_is_refused_but_our_own_is_not() {
        let mut list = history();
        list.push(snap("p", 4, Some("c"), SnapState::Pending));
        match newest("v", &list, None) {
            Err(EbsError::Pending {
                snapshot,
                generation,
                host,
                ..
            }) => assert_eq!(
                (snapshot.as_str(), generation, host.as_str()),
                ("p", 4, "h")
            ),
            other => panic!("{other:?}"),
        }
        // This host's own unfinished push is settled by the caller, not waited for.
        assert_eq!(newest("v", &list, Some("p")).unwrap().unwrap().id, "c");
        // A pending push of a generation already completed is a race's loser, not a push in flight.
        let mut list = history();
        list.push(snap("q", 3, Some("b"), SnapState::Pending));
        assert_eq!(newest("v", &list, None).unwrap().unwrap().id, "c");
        // A first push in flight, and a host that left no host tag.
        let mut first = snap("p", 1, None, SnapState::Pending);
        first.host = String::new();
        match newest("v", &[first], None) {
            Err(EbsError::Pending { host, .. }) => assert_eq!(host, "unknown"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_interrupted_push_is_adopted_only_if_completed_and_listed() {
        use SnapState::*;
        let listed = snap("p", 4, Some("c"), Pending);
        // (sealed, state as found) -> wait first?
        let waits = [
            (true, Some(Pending), true),
            (true, Some(Completed), false),
            (true, None, false),
            (false, Some(Pending), false),
            (false, Some(Completed), false),
        ];
        for (sealed, state, wait) in waits {
            assert_eq!(wait_for_seal(sealed, state), wait, "{sealed} {state:?}");
        }
        // (state after any wait, listed?) -> settled how
        let cases = [
            (Some(Completed), true, Settle::Adopt { generation: 4 }),
            // Not among the volume's snapshots (its tags are not Ferry's): never taken as its history.
            (Some(Completed), false, Settle::Delete),
            // Unsealed, or sealed and still processing after the wait (`SEAL_WAIT`): deleted.
            (Some(Pending), true, Settle::Delete),
            (Some(Failed), true, Settle::Delete),
            // Gone already: deleting it again is how the caller clears the record.
            (None, false, Settle::Delete),
        ];
        for (state, is_listed, plan) in cases {
            let found = is_listed.then_some(&listed);
            assert_eq!(settle(state, found), plan, "{state:?} {is_listed}");
        }
    }

    #[test]
    fn a_missing_copy_is_pulled_again_only_if_something_was_shipped() {
        assert_eq!(missing_copy(None), MissingCopy::Lost);
        assert_eq!(missing_copy(Some(&done("a", 1, None))), MissingCopy::Pull);
    }

    #[test]
    fn attach_decides_every_branch() {
        use AttachPlan::*;
        const IMAGE: bool = true;
        const NO_IMAGE: bool = false;
        let list = history();
        let c = Some(&list[2]);
        let plan = |record: LocalCopy, have_image, newest, catalog: Option<Shipped>| {
            let facts = AttachFacts {
                copy: &record,
                have_image,
                have_blocks: false,
                list: &list,
                newest,
                shipped: catalog.as_ref(),
                keep_chain: false,
            };
            attach("v", &facts).unwrap()
        };
        let pull_c = || Pull {
            newest: shipped("c", 3),
            blocks: Blocks::Newest(list[2].clone()),
        };
        let diverged = |base| Diverged {
            newest: 3,
            snapshot: "c".into(),
            base,
        };
        let deleted = |base, newest| DeletedElsewhere { base, newest };

        // Based on the newest snapshot: changes on top of it (a crash while mounted) are the copy's own.
        assert_eq!(plan(copy(Some("c"), 3, false), IMAGE, c, None), Current);
        let catalog = Some(shipped("c", 3));
        assert_eq!(plan(copy(Some("c"), 3, true), IMAGE, c, catalog), Current);
        // A new volume mounted before, never shipped.
        assert_eq!(plan(copy(None, 0, true), IMAGE, None, None), Current);

        // A clean copy of an older base is replaced by what EBS holds.
        let catalog = Some(shipped("b", 2));
        assert_eq!(plan(copy(Some("b"), 2, false), IMAGE, c, catalog), pull_c());
        // Changes on an older base (or never shipped while another host shipped) are never overwritten.
        assert_eq!(plan(copy(Some("b"), 2, true), IMAGE, c, None), diverged(2));
        assert_eq!(plan(copy(None, 0, true), IMAGE, c, None), diverged(0));
        // The volume was removed and made again elsewhere: the same generation, another snapshot.
        assert_eq!(
            plan(copy(Some("old"), 3, true), IMAGE, c, None),
            diverged(3)
        );
        assert_eq!(plan(copy(Some("old"), 3, false), IMAGE, c, None), pull_c());

        // Based on a generation EBS no longer holds, with changes or without.
        assert_eq!(
            plan(copy(Some("d"), 4, false), IMAGE, c, None),
            deleted(4, 3)
        );
        assert_eq!(
            plan(copy(Some("d"), 4, true), IMAGE, c, None),
            deleted(4, 3)
        );
        assert_eq!(
            plan(copy(Some("c"), 3, false), IMAGE, None, None),
            deleted(3, 0)
        );

        // Without an image the record says nothing about the data: what EBS holds is taken.
        assert_eq!(plan(copy(Some("c"), 3, true), NO_IMAGE, c, None), pull_c());
        assert_eq!(plan(copy(Some("d"), 4, true), NO_IMAGE, c, None), pull_c());
        // Set aside: an empty directory, and the catalog's record of the newest snapshot.
        let catalog = Some(shipped("c", 3));
        assert_eq!(plan(LocalCopy::default(), NO_IMAGE, c, catalog), pull_c());
        // Nothing shipped and no image: the first mount, or an image deleted before any push.
        assert_eq!(plan(LocalCopy::default(), NO_IMAGE, None, None), Fresh);
        assert_eq!(plan(copy(Some("c"), 3, false), NO_IMAGE, None, None), Fresh);

        // A recorded conflict decides nothing by itself: a copy that lost a race for generation 3 stays
        // diverged until set aside, and one whose facts changed (its rival's snapshot was deleted and
        // its base is the newest again) mounts, which clears the record.
        let conflicted = |record: LocalCopy| LocalCopy {
            conflict: Some("lost a race".into()),
            ..record
        };
        let record = conflicted(copy(Some("b"), 2, true));
        assert_eq!(plan(record, IMAGE, c, None), diverged(2));
        let record = conflicted(copy(Some("c"), 3, true));
        assert_eq!(plan(record, IMAGE, c, None), Current);

        // The catalog is checked first, whatever the copy holds.
        let ahead = |generation, snapshot: &str, newest| CatalogAhead {
            generation,
            snapshot: snapshot.into(),
            newest,
        };
        let catalog = Some(shipped("d", 4));
        let record = copy(Some("c"), 3, false);
        assert_eq!(plan(record, IMAGE, c, catalog), ahead(4, "d", 3));
        let catalog = Some(shipped("c", 3));
        let record = LocalCopy::default();
        assert_eq!(plan(record, NO_IMAGE, None, catalog), ahead(3, "c", 0));
    }

    #[test]
    fn attach_pulls_only_an_unbroken_lineage() {
        let holed = vec![done("a", 1, None), done("c", 3, Some("b"))];
        let facts = AttachFacts {
            copy: &LocalCopy::default(),
            have_image: false,
            have_blocks: false,
            list: &holed,
            newest: Some(&holed[1]),
            shipped: None,
            keep_chain: true,
        };
        let err = attach("v", &facts).unwrap_err().to_string();
        assert!(
            err.contains("builds on b") && err.contains("missing"),
            "{err}"
        );
        // A broken lineage matters only when pulling: a current copy mounts.
        let current = copy(Some("c"), 3, false);
        let facts = AttachFacts {
            copy: &current,
            have_image: true,
            ..facts
        };
        assert_eq!(attach("v", &facts).unwrap(), AttachPlan::Current);
        // On EBS the newest snapshot holds everything it inherits: deleted history is not a hole.
        let facts = AttachFacts {
            keep_chain: false,
            have_image: false,
            copy: &LocalCopy::default(),
            ..facts
        };
        assert_eq!(
            attach("v", &facts).unwrap(),
            AttachPlan::Pull {
                newest: shipped("c", 3),
                blocks: Blocks::Newest(holed[1].clone()),
            }
        );
    }

    #[test]
    fn on_ebs_an_older_clean_copy_fetches_the_blocks_changed_since_its_base() {
        // a <- b <- c <- d, with b deleted by retention; x is another lineage's generation 2.
        let list = vec![
            done("a", 1, None),
            done("c", 3, Some("b")),
            done("d", 4, Some("c")),
            done("x", 2, None),
            done("y", 3, None),
        ];
        let plan = |record: &LocalCopy| {
            attach(
                "v",
                &AttachFacts {
                    copy: record,
                    have_image: true,
                    have_blocks: true,
                    list: &list,
                    newest: Some(&list[2]),
                    shipped: None,
                    keep_chain: false,
                },
            )
            .unwrap()
        };
        let changed = |base: &str| AttachPlan::Patch {
            newest: shipped("d", 4),
            blocks: Blocks::Changed {
                base: base.into(),
                newest: list[2].clone(),
            },
        };
        let whole = AttachPlan::Pull {
            newest: shipped("d", 4),
            blocks: Blocks::Newest(list[2].clone()),
        };
        assert_eq!(plan(&copy(Some("c"), 3, false)), changed("c"));
        // Behind a deleted snapshot the tags prove nothing; EBS checks the lineage itself.
        assert_eq!(plan(&copy(Some("a"), 1, false)), changed("a"));
        assert_eq!(plan(&copy(Some("x"), 2, false)), changed("x"));
        // A base that retention deleted, or that the tags show is of another lineage, is pulled whole.
        assert_eq!(plan(&copy(Some("b"), 2, false)), whole);
        assert_eq!(plan(&copy(Some("y"), 3, false)), whole);
        assert_eq!(plan(&copy(Some("c"), 2, false)), whole);
    }

    #[test]
    fn retention_keeps_the_newest_generations_and_whatever_is_in_use() {
        let now = 1_000_000;
        let mut list: Vec<SnapshotInfo> = (1..=6)
            .map(|g| {
                let parent = (g > 1).then(|| format!("s{}", g - 1));
                done(&format!("s{g}"), g, parent.as_deref())
            })
            .collect();
        list.push(snap("f", 2, Some("s1"), SnapState::Failed));
        list.push(snap("p", 7, Some("s6"), SnapState::Pending));
        let ids = |v: Vec<SnapshotInfo>| v.into_iter().map(|s| s.id).collect::<Vec<_>>();
        let newest = list[5].clone();
        assert_eq!(
            ids(retire(&list, &newest, 3, &[], now)),
            ["s1", "f", "s2", "s3"]
        );
        assert_eq!(ids(retire(&list, &newest, 6, &[], now)), ["f"]);
        assert_eq!(
            ids(retire(&list, &newest, 1, &[], now)),
            ["s1", "f", "s2", "s3", "s4", "s5"]
        );
        // What the catalog or the local copy names, and what a host has mounted or is pulling, stays
        // while its tag is fresh.
        list[1].mounted = vec![super::super::mounted::tag_value("h2", "n2", now - 10)];
        list[2].pulling = Some(now - 5);
        list[0].pulling = Some(now - 100_000);
        assert_eq!(ids(retire(&list, &newest, 3, &["s1"], now)), ["f"]);
        assert_eq!(ids(retire(&list, &newest, 3, &[], now)), ["s1", "f"]);
    }

    #[test]
    fn the_chain_follows_parents_and_refuses_holes_and_loops() {
        let mut list = history();
        // Another host's rejected branch and a crashed push: never part of c's chain.
        list.push(snap("x", 3, Some("b"), SnapState::Failed));
        list.push(snap("p", 4, Some("c"), SnapState::Pending));
        assert_eq!(ids(&chain("v", &list, &list[2]).unwrap()), ["c", "b", "a"]);
        assert_eq!(ids(&chain("v", &list, &list[0]).unwrap()), ["a"]);

        let holed = vec![done("a", 1, None), done("c", 3, Some("b"))];
        let err = chain("v", &holed, &holed[1]).unwrap_err().to_string();
        assert!(
            err.contains("builds on b") && err.contains("missing"),
            "{err}"
        );
        // A parent that is not completed is a hole too.
        let pending_parent = vec![
            snap("a", 1, None, SnapState::Pending),
            done("b", 2, Some("a")),
        ];
        assert!(chain("v", &pending_parent, &pending_parent[1]).is_err());

        let looped = vec![done("a", 2, Some("b")), done("b", 3, Some("a"))];
        let err = chain("v", &looped, &looped[1]).unwrap_err().to_string();
        assert!(err.contains("its own descendant"), "{err}");
        let own_parent = vec![done("a", 2, Some("a"))];
        assert!(chain("v", &own_parent, &own_parent[0]).is_err());
    }

    #[test]
    fn detach_pushes_only_what_may_be_unshipped() {
        let pending = LocalCopy {
            pending: Some("p".into()),
            ..copy(Some("c"), 3, false)
        };
        let cases = [
            (None, DetachPlan::NoCopy),
            (Some(copy(Some("c"), 3, false)), DetachPlan::Clean),
            (Some(LocalCopy::default()), DetachPlan::Clean),
            (Some(copy(Some("c"), 3, true)), DetachPlan::Push),
            (Some(copy(None, 0, true)), DetachPlan::Push),
            (Some(pending), DetachPlan::Push),
        ];
        for (record, plan) in cases {
            assert_eq!(detach(record.as_ref()), plan, "{record:?}");
        }
    }

    #[test]
    fn a_push_starts_only_from_the_newest_snapshot() {
        use BaseCheck::*;
        let list = history();
        let c = Some(&list[2]);
        let diverged = |base| Diverged {
            newest: 3,
            snapshot: "c".into(),
            base,
        };
        let deleted = |base, newest| DeletedElsewhere { base, newest };
        assert_eq!(base(&copy(Some("c"), 3, true), c), Newest);
        // The first push of a new volume.
        assert_eq!(base(&copy(None, 0, true), None), Newest);
        // Another host shipped since (or first): shipping now would merge two hosts' writes.
        assert_eq!(base(&copy(Some("b"), 2, true), c), diverged(2));
        assert_eq!(base(&copy(None, 0, true), c), diverged(0));
        // The volume was removed and made again elsewhere: the same generation, another snapshot.
        assert_eq!(base(&copy(Some("old"), 3, true), c), diverged(3));
        // The base, or every snapshot, was deleted elsewhere.
        assert_eq!(base(&copy(Some("d"), 4, true), c), deleted(4, 3));
        assert_eq!(base(&copy(Some("c"), 3, true), None), deleted(3, 0));
        // A recorded conflict decides nothing by itself.
        let conflicted = LocalCopy {
            conflict: Some("lost a race".into()),
            ..copy(Some("c"), 3, true)
        };
        assert_eq!(base(&conflicted, c), Newest);
    }

    #[test]
    fn a_push_ships_the_next_generation_or_nothing() {
        assert_eq!(push(&copy(Some("c"), 3, true), &[]), PushPlan::Unchanged);
        assert_eq!(
            push(&copy(Some("c"), 3, true), &[0, 7]),
            PushPlan::Ship { generation: 4 }
        );
        assert_eq!(
            push(&LocalCopy::default(), &[1]),
            PushPlan::Ship { generation: 1 }
        );
    }

    #[test]
    fn create_adopts_only_matching_data_options() {
        let spec = |opts: &[(&str, &str)]| {
            let map: BTreeMap<String, String> = [("backend", "ebs")]
                .iter()
                .chain(opts)
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let defaults = crate::spec::SpecDefaults {
                ebs: Some(Default::default()),
                ..Default::default()
            };
            VolumeSpec::from_options(Some(&map), &defaults).unwrap()
        };
        let ours = spec(&[("size", "1G"), ("checkpoint", "5m")]);
        let mut theirs = done("c", 3, None);
        theirs.options = data_options(&spec(&[("size", "1G")]));
        // The checkpoint schedule is this host's choice, not the data's.
        assert!(contradiction("v", &theirs, &ours).is_ok());
        theirs.options = data_options(&spec(&[("size", "2G")]));
        match contradiction("v", &theirs, &ours) {
            Err(EbsError::Contradicts { option, .. }) => assert_eq!(option, "size"),
            other => panic!("{other:?}"),
        }
    }
}

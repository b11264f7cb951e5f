//! `WriteBehind`: the bookkeeping of writes that the FUSE adapter acknowledged to the kernel before the store
//! finished them, as the kernel NFS client does with its write-back.
//!
//! Without FUSE's writeback cache the kernel sends one WRITE per file and waits for its reply, so a reply
//! that waits for the server leaves the client idle for a whole round trip per MiB. The adapter therefore
//! replies once the data is copied and the store write is started, and this module keeps that honest:
//!
//! - per inode, the byte ranges still on their way, bounded in bytes and in count, so memory and the
//!   store's queue stay small and a dead server stops new writes within one deadline;
//! - writes start in arrival order, and one that overlaps an earlier one waits for it to finish, so the
//!   store sees overlapping data in the order the application wrote it;
//! - `settle` lets every request that depends on an inode's data or size wait for the writes that arrived
//!   before it (not for later ones, so a steady writer cannot starve a flush); `settle_range` does the same
//!   for a read, for the writes that overlap what it reads;
//! - the first failure of a background write is kept per inode and handed to the next write, flush or fsync,
//!   as NFS reports write-back errors.
//!
//! It must not call the store, and it never holds its lock across an await: the adapter starts the store
//! write itself and reports the outcome with `finish`. The store's deadline bounds every wait here.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

use super::store::StoreError;
use crate::sync::Recover;

/// Most bytes acknowledged but not yet written per inode: enough to keep the store busy while the kernel
/// copies the next request in (the kernel NFS client allows a few MiB per file before it throttles).
pub const MAX_BYTES_IN_FLIGHT: u64 = 8 << 20;

/// Most writes in flight per inode, whatever their size: small writes must not queue so many store calls
/// that the last ones run out of their deadline waiting for a connection.
pub const MAX_WRITES_IN_FLIGHT: usize = 16;

/// One write that arrived and has not finished: queued (waiting for its turn) or started.
#[derive(Debug)]
struct Write {
    seq: u64,
    start: u64,
    end: u64,
    started: bool,
}

impl Write {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start < end && start < self.end
    }
}

#[derive(Debug, Default)]
struct Pending {
    /// In arrival order (ascending `seq`).
    writes: Vec<Write>,
    /// Bytes of the started writes.
    bytes: u64,
    next_seq: u64,
    /// The first background failure not yet reported to the application.
    error: Option<StoreError>,
}

impl Pending {
    fn is_idle(&self) -> bool {
        self.writes.is_empty() && self.error.is_none()
    }

    /// Whether the queued write `seq` may start now: every earlier write has started (first come, first
    /// served), none of them overlaps it, and the bounds leave room.
    fn may_start(&self, seq: u64, limit: u64) -> bool {
        let Some(me) = self.writes.iter().find(|w| w.seq == seq) else {
            return false;
        };
        let earlier = || self.writes.iter().take_while(|w| w.seq < seq);
        if earlier().any(|w| !w.started || w.overlaps(me.start, me.end)) {
            return false;
        }
        let started = self.writes.iter().filter(|w| w.started).count();
        // A write bigger than the bound still goes, alone.
        started == 0
            || (started < MAX_WRITES_IN_FLIGHT && self.bytes + (me.end - me.start) <= limit)
    }
}

/// A write that `WriteBehind::begin` let start. Pass it to `finish` when the store is done with it.
#[derive(Debug)]
#[must_use = "a started write must be finished, or it blocks its inode forever"]
pub struct Ticket {
    inode: u64,
    seq: u64,
}

/// See the module documentation.
#[derive(Debug)]
pub struct WriteBehind {
    inner: Mutex<HashMap<u64, Pending>>,
    /// Woken whenever a write finishes or starts, which is when someone's wait can end.
    changed: Notify,
    limit: u64,
}

impl Default for WriteBehind {
    fn default() -> Self {
        Self::new(MAX_BYTES_IN_FLIGHT)
    }
}

/// Takes a queued write out again if its request is dropped while it waits for its turn (the session
/// cancelled it), so it cannot block the writes behind it.
struct Queued<'a> {
    wb: &'a WriteBehind,
    inode: u64,
    seq: u64,
    armed: bool,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut inner = self.wb.lock();
            if let Some(p) = inner.get_mut(&self.inode) {
                p.writes.retain(|w| w.seq != self.seq);
                if p.is_idle() {
                    inner.remove(&self.inode);
                }
            }
            drop(inner);
            self.wb.changed.notify_waiters();
        }
    }
}

impl WriteBehind {
    /// Bookkeeping that lets at most `limit` bytes per inode be in flight.
    pub fn new(limit: u64) -> Self {
        WriteBehind {
            inner: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            limit,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Pending>> {
        // Every critical section leaves the map consistent before anything can panic.
        self.inner.lock().recover()
    }

    /// Waits until a write of `len` bytes at `offset` to `inode` may start, and records it as started.
    /// Fails without starting anything if a background write of this inode failed and that has not been
    /// reported by a flush or fsync yet (the error stays for them too).
    pub async fn begin(&self, inode: u64, offset: u64, len: u64) -> Result<Ticket, StoreError> {
        let seq = {
            let mut inner = self.lock();
            let p = inner.entry(inode).or_default();
            if let Some(e) = &p.error {
                return Err(e.clone());
            }
            let seq = p.next_seq;
            p.next_seq += 1;
            p.writes.push(Write {
                seq,
                start: offset,
                end: offset.saturating_add(len),
                started: false,
            });
            seq
        };
        let mut queued = Queued {
            wb: self,
            inode,
            seq,
            armed: true,
        };
        loop {
            // Registered before the check, so a change between the check and the await still wakes us.
            let changed = self.changed.notified();
            {
                let mut inner = self.lock();
                let p = inner.entry(inode).or_default();
                if let Some(e) = &p.error {
                    // An earlier write failed while this one waited: report it now, start nothing.
                    let e = e.clone();
                    drop(inner);
                    return Err(e);
                }
                if p.may_start(seq, self.limit) {
                    if let Some(w) = p.writes.iter_mut().find(|w| w.seq == seq) {
                        w.started = true;
                        p.bytes += w.end - w.start;
                    }
                    queued.armed = false;
                    drop(inner);
                    // The next queued write may be able to start too.
                    self.changed.notify_waiters();
                    return Ok(Ticket { inode, seq });
                }
            }
            changed.await;
        }
    }

    /// Records the end of a started write. A failure is kept for the next write, flush or fsync of the inode,
    /// and logged here, once per unreported failure: later failures of the same inode before it is reported
    /// are only debug noise (with a dead server every write in flight fails the same way).
    pub fn finish(&self, ticket: Ticket, result: Result<(), StoreError>) {
        let mut inner = self.lock();
        if let Some(p) = inner.get_mut(&ticket.inode) {
            if let Some(i) = p.writes.iter().position(|w| w.seq == ticket.seq) {
                let w = p.writes.remove(i);
                p.bytes -= w.end - w.start;
            }
            if let Err(e) = result {
                if p.error.is_none() {
                    tracing::warn!(inode = ticket.inode, error = %e, "a background write failed; the next write, flush or fsync of the file reports it");
                    p.error = Some(e);
                } else {
                    tracing::debug!(inode = ticket.inode, error = %e, "another background write failed");
                }
            }
            if p.is_idle() {
                inner.remove(&ticket.inode);
            }
        }
        drop(inner);
        self.changed.notify_waiters();
    }

    /// Waits until every write of `inode` that arrived before this call has finished.
    pub async fn settle(&self, inode: u64) {
        let upto = match self.lock().get(&inode) {
            Some(p) if !p.writes.is_empty() => p.next_seq,
            _ => return,
        };
        loop {
            let changed = self.changed.notified();
            let done = self
                .lock()
                .get(&inode)
                .is_none_or(|p| p.writes.first().is_none_or(|w| w.seq >= upto));
            if done {
                return;
            }
            changed.await;
        }
    }

    /// Waits until every write of `inode` that arrived before this call and overlaps `start..end` has
    /// finished: what a read of that range depends on. Writes elsewhere in the file go on meanwhile, so a
    /// reader of one part of a file is not held up by a writer of another (random I/O on one file).
    pub async fn settle_range(&self, inode: u64, start: u64, end: u64) {
        let upto = match self.lock().get(&inode) {
            Some(p) if !p.writes.is_empty() => p.next_seq,
            _ => return,
        };
        loop {
            let changed = self.changed.notified();
            let done = self.lock().get(&inode).is_none_or(|p| {
                !p.writes
                    .iter()
                    .any(|w| w.seq < upto && w.overlaps(start, end))
            });
            if done {
                return;
            }
            changed.await;
        }
    }

    /// `settle`, then takes the failure a background write left, if any: it is reported once.
    pub async fn settle_and_take_error(&self, inode: u64) -> Option<StoreError> {
        self.settle(inode).await;
        let mut inner = self.lock();
        let p = inner.get_mut(&inode)?;
        let e = p.error.take();
        if p.is_idle() {
            inner.remove(&inode);
        }
        e
    }

    /// Waits until every write that arrived before this call, of any inode, has finished.
    pub async fn settle_all(&self) {
        let inodes: Vec<u64> = self.lock().keys().copied().collect();
        for inode in inodes {
            self.settle(inode).await;
        }
    }

    /// Drops an unreported failure of an inode nobody has open any more: there is no one left to tell.
    pub fn forget_error(&self, inode: u64) {
        let mut inner = self.lock();
        if let Some(p) = inner.get_mut(&inode) {
            p.error = None;
            if p.is_idle() {
                inner.remove(&inode);
            }
        }
    }

    /// Whether `inode` has writes queued or in flight.
    pub fn busy(&self, inode: u64) -> bool {
        self.lock()
            .get(&inode)
            .is_some_and(|p| !p.writes.is_empty())
    }

    /// Whether any inode has writes queued or in flight (a cheap check before costlier ones per name).
    pub fn any_busy(&self) -> bool {
        self.lock().values().any(|p| !p.writes.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuse::StoreErrorKind;
    use std::sync::Arc;
    use std::time::Duration;

    fn failure() -> StoreError {
        StoreError::new(StoreErrorKind::NoSpace, "full")
    }

    /// Whether a future is still pending after everything runnable has run.
    async fn pending<F: std::future::Future>(f: &mut std::pin::Pin<&mut F>) -> bool {
        tokio::time::timeout(Duration::from_millis(1), f.as_mut())
            .await
            .is_err()
    }

    #[tokio::test(start_paused = true)]
    async fn an_overlapping_write_waits_for_the_earlier_one_and_others_do_not() {
        let wb = WriteBehind::new(1 << 30);
        let first = wb.begin(1, 0, 100).await.unwrap();
        // Disjoint ranges, and other inodes, go at once.
        let disjoint = wb.begin(1, 100, 100).await.unwrap();
        let other = wb.begin(2, 0, 100).await.unwrap();
        let overlapping = wb.begin(1, 50, 10);
        tokio::pin!(overlapping);
        assert!(pending(&mut overlapping).await);
        wb.finish(disjoint, Ok(()));
        wb.finish(other, Ok(()));
        assert!(pending(&mut overlapping).await);
        wb.finish(first, Ok(()));
        let t = overlapping.await.unwrap();
        wb.finish(t, Ok(()));
        assert!(!wb.any_busy());
    }

    #[tokio::test(start_paused = true)]
    async fn writes_over_the_bound_wait_and_start_in_arrival_order() {
        let wb = WriteBehind::new(300);
        let a = wb.begin(1, 0, 200).await.unwrap();
        let b = wb.begin(1, 200, 200);
        tokio::pin!(b);
        assert!(pending(&mut b).await, "over the bound");
        // A small write that would fit must not overtake the queued one.
        let c = wb.begin(1, 400, 50);
        tokio::pin!(c);
        assert!(pending(&mut c).await, "first come, first served");
        wb.finish(a, Ok(()));
        let b = b.await.unwrap();
        let c = c.await.unwrap();
        wb.finish(b, Ok(()));
        wb.finish(c, Ok(()));
        // A write larger than the bound still goes when it is alone.
        let big = wb.begin(1, 0, 1000).await.unwrap();
        wb.finish(big, Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_count_of_writes_in_flight_is_bounded_too() {
        let wb = WriteBehind::new(1 << 30);
        let mut tickets = Vec::new();
        for i in 0..MAX_WRITES_IN_FLIGHT as u64 {
            tickets.push(wb.begin(1, i * 10, 10).await.unwrap());
        }
        let next = wb.begin(1, 1000, 10);
        tokio::pin!(next);
        assert!(pending(&mut next).await);
        wb.finish(tickets.remove(0), Ok(()));
        tickets.push(next.await.unwrap());
        for t in tickets {
            wb.finish(t, Ok(()));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn settle_waits_for_earlier_writes_only() {
        let wb = Arc::new(WriteBehind::new(1 << 30));
        let early = wb.begin(1, 0, 10).await.unwrap();
        let settle = {
            let wb = wb.clone();
            tokio::spawn(async move { wb.settle(1).await })
        };
        tokio::time::sleep(Duration::from_millis(1)).await;
        // A later write must not keep the settle waiting.
        let late = wb.begin(1, 10, 10).await.unwrap();
        assert!(!settle.is_finished());
        wb.finish(early, Ok(()));
        settle.await.unwrap();
        assert!(wb.busy(1));
        wb.finish(late, Ok(()));
        assert!(!wb.busy(1));
    }

    #[tokio::test(start_paused = true)]
    async fn settle_range_waits_for_earlier_overlapping_writes_only() {
        let wb = WriteBehind::new(1 << 30);
        let near = wb.begin(1, 0, 4096).await.unwrap();
        let far = wb.begin(1, 1 << 20, 4096).await.unwrap();
        let other = wb.begin(2, 8192, 4096).await.unwrap();
        // Nothing in flight overlaps 8 KiB..12 KiB of inode 1 (inode 2's write does not count).
        wb.settle_range(1, 8192, 12288).await;
        let settle = wb.settle_range(1, 2048, 6144);
        tokio::pin!(settle);
        assert!(pending(&mut settle).await);
        // A later write to the same range does not hold it up.
        wb.finish(far, Ok(()));
        let late = wb.begin(1, 4096, 4096).await.unwrap();
        assert!(pending(&mut settle).await);
        wb.finish(near, Ok(()));
        settle.await;
        assert!(wb.busy(1));
        wb.finish(late, Ok(()));
        wb.finish(other, Ok(()));
        assert!(!wb.any_busy());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_is_reported_to_writes_until_a_flush_takes_it() {
        let wb = WriteBehind::new(1 << 30);
        let t = wb.begin(1, 0, 10).await.unwrap();
        let queued = wb.begin(1, 5, 10);
        tokio::pin!(queued);
        assert!(pending(&mut queued).await);
        wb.finish(t, Err(failure()));
        // The write that was waiting for the failed one reports it instead of starting.
        assert_eq!(queued.await.unwrap_err(), failure());
        assert_eq!(wb.begin(1, 100, 10).await.unwrap_err(), failure());
        // Other inodes are not affected.
        let other = wb.begin(2, 0, 10).await.unwrap();
        wb.finish(other, Ok(()));
        assert_eq!(wb.settle_and_take_error(1).await, Some(failure()));
        assert_eq!(wb.settle_and_take_error(1).await, None);
        let t = wb.begin(1, 0, 10).await.unwrap();
        wb.finish(t, Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_queued_write_does_not_block_the_ones_behind_it() {
        let wb = WriteBehind::new(1 << 30);
        let first = wb.begin(1, 0, 10).await.unwrap();
        {
            let dropped = wb.begin(1, 0, 10);
            tokio::pin!(dropped);
            assert!(pending(&mut dropped).await);
        }
        let next = wb.begin(1, 100, 10).await.unwrap();
        wb.finish(first, Ok(()));
        wb.finish(next, Ok(()));
        assert!(!wb.any_busy());
        wb.settle(1).await;
    }
}

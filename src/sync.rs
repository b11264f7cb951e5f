//! Std locks that outlive a panic. A poisoned lock means a thread panicked while holding it; every
//! critical section in Ferry leaves its data valid or merely stale (caches, counters, tables rebuilt from
//! the catalog or the mount table), so the data is taken as it is instead of turning one panic into a
//! panic of every later caller.

use std::sync::{LockResult, PoisonError};

/// `lock()`, `read()` and `write()` results, recovered from poisoning.
pub trait Recover<G> {
    fn recover(self) -> G;
}

impl<G> Recover<G> for LockResult<G> {
    fn recover(self) -> G {
        self.unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn a_poisoned_lock_still_gives_its_data() {
        let m = Arc::new(Mutex::new(5));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().recover();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        *m.lock().recover() += 1;
        assert_eq!(*m.lock().recover(), 6);
    }
}

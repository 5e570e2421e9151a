//! The queues of clients waiting in `RL.ACQUIRE ... WAIT`, per key.
//!
//! A waiter has a place `(priority, arrival)` and waits on every key of its call. It
//! may be admitted only when it heads the queue of each of its keys, so waiters go
//! strictly by priority (lower first), then arrival. Places are one total order, so
//! the first waiter overall heads all its queues: the queues never deadlock.
//! Each key has at most one pending wake-up timer (a later one is not set while an
//! earlier one will fire).

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;

/// A waiter's place: priority, then arrival.
pub type Place = (i64, u64);

/// The waiters of every key.
#[derive(Debug)]
pub struct Queues<K> {
    queues: HashMap<K, BTreeSet<Place>>,
    /// The latest deadline of any waiter that queued on each key.
    deadlines: HashMap<K, u64>,
    /// When the pending wake-up timer of each key fires (ms since the epoch).
    timers: HashMap<K, u64>,
    next_arrival: u64,
    total: usize,
}

impl<K> Default for Queues<K> {
    fn default() -> Self {
        Queues {
            queues: HashMap::new(),
            deadlines: HashMap::new(),
            timers: HashMap::new(),
            next_arrival: 0,
            total: 0,
        }
    }
}

impl<K: Hash + Eq + Clone> Queues<K> {
    /// Waiters in all queues (a waiter on several keys counts once).
    pub fn total(&self) -> usize {
        self.total
    }

    /// Waiters queued on `key`.
    pub fn len(&self, key: &K) -> usize {
        self.queues.get(key).map_or(0, BTreeSet::len)
    }

    pub fn has_waiters(&self, key: &K) -> bool {
        self.len(key) > 0
    }

    /// Keys with waiters.
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.queues.keys()
    }

    /// The latest deadline of the waiters queued on `key` (it must exist until then).
    pub fn deadline(&self, key: &K) -> Option<u64> {
        self.deadlines.get(key).copied()
    }

    /// Queues a new waiter with `priority`, waiting until `deadline`, on every key of
    /// `keys`; returns its place.
    pub fn enqueue(&mut self, keys: &[K], priority: i64, deadline: u64) -> Place {
        self.next_arrival += 1;
        let place = (priority, self.next_arrival);
        for key in keys {
            self.queues.entry(key.clone()).or_default().insert(place);
            let latest = self.deadlines.entry(key.clone()).or_default();
            *latest = (*latest).max(deadline);
        }
        self.total += 1;
        place
    }

    /// Whether the waiter at `place` heads the queue of every key of `keys`.
    pub fn heads_all(&self, keys: &[K], place: Place) -> bool {
        keys.iter()
            .all(|k| self.queues.get(k).and_then(|q| q.first()) == Some(&place))
    }

    /// Takes the waiter at `place` off the queues of `keys`; false if it was not queued.
    pub fn remove(&mut self, keys: &[K], place: Place) -> bool {
        let mut removed = false;
        for key in keys {
            let Some(queue) = self.queues.get_mut(key) else {
                continue;
            };
            removed |= queue.remove(&place);
            if queue.is_empty() {
                self.queues.remove(key);
                self.timers.remove(key);
                self.deadlines.remove(key);
            }
        }
        if removed {
            self.total = self.total.saturating_sub(1);
        }
        removed
    }

    /// Whether a timer firing at `due` is needed for `key`: not if one fires sooner.
    /// Records `due` when it is.
    pub fn needs_timer(&mut self, key: &K, due: u64, now: u64) -> bool {
        match self.timers.get(key) {
            Some(&pending) if pending > now && pending <= due => false,
            _ => {
                self.timers.insert(key.clone(), due);
                true
            }
        }
    }

    /// A timer of `key` fired at `now`: forget it unless a later one replaced it.
    pub fn timer_fired(&mut self, key: &K, now: u64) {
        if self.timers.get(key).is_some_and(|&due| due <= now) {
            self.timers.remove(key);
        }
    }

    /// A timer could not be set after all.
    pub fn forget_timer(&mut self, key: &K) {
        self.timers.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiters_go_by_priority_then_arrival_on_every_key() {
        let mut q: Queues<&str> = Queues::default();
        let a = q.enqueue(&["k"], 0, 10);
        let b = q.enqueue(&["k", "org"], -1, 30);
        let c = q.enqueue(&["org"], 0, 20);
        assert_eq!(q.deadline(&"k"), Some(30));
        assert!(q.heads_all(&["k", "org"], b));
        assert!(!q.heads_all(&["k"], a));
        assert!(!q.heads_all(&["org"], c));
        assert!(q.remove(&["k", "org"], b));
        assert!(!q.remove(&["k", "org"], b));
        assert!(q.heads_all(&["k"], a) && q.heads_all(&["org"], c));
        assert_eq!(q.total(), 2);
        assert!(q.remove(&["k"], a) && q.remove(&["org"], c));
        assert_eq!((q.total(), q.len(&"k")), (0, 0));
    }

    #[test]
    fn one_pending_timer_per_key() {
        let mut q: Queues<u8> = Queues::default();
        q.enqueue(&[1], 0, 0);
        assert!(q.needs_timer(&1, 500, 100));
        assert!(!q.needs_timer(&1, 900, 100));
        assert!(q.needs_timer(&1, 300, 100));
        q.timer_fired(&1, 300);
        assert!(q.needs_timer(&1, 900, 300));
    }
}

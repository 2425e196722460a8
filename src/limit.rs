//! Adaptive concurrency for one of Proxmox's serialisation points (the
//! clones of one template, the full clones into one storage).
//!
//! AIMD, as TCP does it: start low and double while work succeeds (slow
//! start) — or, where the lock model says the work does not contend with
//! itself, start at the ceiling — then grow by one per window; halve when
//! Proxmox reports lock contention ("can't lock file … got timeout"). The configured number is a
//! ceiling, never a target, so a cluster that takes twenty clones at once
//! gets twenty, and one that cannot is not pushed into lock timeouts. It
//! decides only how many run at once; retrying is the caller's.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Where the limit starts: two at once is safe on any cluster.
const INITIAL: f64 = 2.0;

#[derive(Debug)]
pub struct AdaptiveLimit {
    ceiling: usize,
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Debug)]
struct State {
    limit: f64,
    in_flight: usize,
    slow_start: bool,
}

impl AdaptiveLimit {
    /// A limit that starts at two: for work that competes for one resource
    /// (full clones' copies share their storage's bandwidth).
    pub fn new(ceiling: usize) -> Self {
        Self::starting_at(INITIAL, ceiling)
    }

    /// A limit that starts at its ceiling: for work that takes its lock
    /// shared, so that only an outside holder can contend with it (the
    /// clones of one template, which qemu-server's `clone_vm` runs under the
    /// template's shared config lock). Contention still halves it.
    pub fn optimistic(ceiling: usize) -> Self {
        Self::starting_at(ceiling as f64, ceiling)
    }

    fn starting_at(initial: f64, ceiling: usize) -> Self {
        let ceiling = ceiling.max(1);
        AdaptiveLimit {
            ceiling,
            state: Mutex::new(State {
                limit: initial.clamp(1.0, ceiling as f64),
                in_flight: 0,
                // Already at the ceiling, an optimistic limit has no slow
                // start: after contention it grows by one per window.
                slow_start: initial < ceiling as f64,
            }),
            changed: Notify::new(),
        }
    }

    /// How many may run at once now.
    pub fn current(&self) -> usize {
        self.state.lock().expect("limit").limit as usize
    }

    /// Waits for a free slot.
    pub async fn acquire(self: &Arc<Self>) -> Slot {
        loop {
            let changed = self.changed.notified();
            {
                let mut s = self.state.lock().expect("limit");
                if s.in_flight < s.limit as usize {
                    s.in_flight += 1;
                    return Slot {
                        limit: self.clone(),
                    };
                }
            }
            changed.await;
        }
    }

    fn update(&self, f: impl FnOnce(&mut State)) -> usize {
        let now = {
            let mut s = self.state.lock().expect("limit");
            f(&mut s);
            s.limit = s.limit.clamp(1.0, self.ceiling as f64);
            s.limit as usize
        };
        self.changed.notify_waiters();
        now
    }
}

/// One unit of work running under an [`AdaptiveLimit`]; its end frees the
/// slot. Report how it went with [`Slot::succeeded`] or
/// [`Slot::contended`].
#[derive(Debug)]
pub struct Slot {
    limit: Arc<AdaptiveLimit>,
}

impl Slot {
    /// The work went through: allow more.
    pub fn succeeded(&self) {
        self.limit.update(|s| {
            s.limit += if s.slow_start { 1.0 } else { 1.0 / s.limit };
        });
    }

    /// The work hit lock contention: halve the limit. Returns the new one.
    pub fn contended(&self) -> usize {
        self.limit.update(|s| {
            s.slow_start = false;
            s.limit /= 2.0;
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limit.update(|s| s.in_flight -= 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn grows_while_work_succeeds_up_to_the_ceiling() {
        let limit = Arc::new(AdaptiveLimit::new(5));
        assert_eq!(limit.current(), 2);
        for want in [3, 4, 5, 5] {
            limit.acquire().await.succeeded();
            assert_eq!(limit.current(), want);
        }
    }

    #[tokio::test]
    async fn halves_on_contention_then_grows_by_one_per_window() {
        let limit = Arc::new(AdaptiveLimit::new(32));
        for _ in 0..6 {
            limit.acquire().await.succeeded();
        }
        assert_eq!(limit.current(), 8);
        assert_eq!(limit.acquire().await.contended(), 4);
        assert_eq!(limit.acquire().await.contended(), 2);
        // Congestion avoidance: about one more per `limit` successes.
        for _ in 0..2 {
            limit.acquire().await.succeeded();
        }
        assert_eq!(limit.current(), 2);
        limit.acquire().await.succeeded();
        assert_eq!(limit.current(), 3);
        // Never below one.
        for _ in 0..4 {
            limit.acquire().await.contended();
        }
        assert_eq!(limit.current(), 1);
    }

    #[tokio::test]
    async fn an_optimistic_limit_starts_at_its_ceiling_and_still_backs_off() {
        let limit = Arc::new(AdaptiveLimit::optimistic(64));
        assert_eq!(limit.current(), 64);
        let slots: Vec<Slot> = take_slots(&limit, 64).await;
        assert_eq!(slots[0].contended(), 32);
        assert_eq!(slots[1].contended(), 16);
        // No slow start after contention: one more per window of 16.
        for slot in &slots[2..18] {
            slot.succeeded();
        }
        assert_eq!(limit.current(), 16, "just short of a window");
        slots[18].succeeded();
        assert_eq!(limit.current(), 17);
    }

    async fn take_slots(limit: &Arc<AdaptiveLimit>, n: usize) -> Vec<Slot> {
        let mut slots = Vec::new();
        for _ in 0..n {
            slots.push(limit.acquire().await);
        }
        slots
    }

    #[tokio::test]
    async fn a_full_limit_waits_for_a_slot_to_end() {
        let limit = Arc::new(AdaptiveLimit::new(8));
        let a = limit.acquire().await;
        let _b = limit.acquire().await;
        let waiting = tokio::spawn({
            let limit = limit.clone();
            async move { limit.acquire().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "two of two slots are taken");
        drop(a);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("a freed slot is taken")
            .unwrap();
    }
}

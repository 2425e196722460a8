//! Task polling paced by what a task of that type took before.
//!
//! A blind backoff (the client used to grow its delay to 2 s) leaves a
//! 1.5 s clone unnoticed for up to a second after it ended, and that idle
//! time adds up over a fleet. The pacer learns how long each task type
//! (`qmclone`, `qmstart`, …) takes on this cluster, sleeps until shortly
//! before the expected end, then polls in small steps; past the
//! expectation it backs off in proportion to the time already waited, so a
//! long download costs few requests. Tasks of a type not seen yet (the
//! first wave of a hundred clones) wait together: one of them, the scout,
//! reads its status often; the others read theirs rarely, and the first
//! one that ends wakes them all — they started together and likely ended
//! together. A hundred clones then cost about as many status reads as one.
//! The pacer must not decide anything but *when* to ask: the task's status
//! still comes from the server.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// Shortest and longest pause between two status reads.
const MIN_STEP: Duration = Duration::from_millis(20);
const MAX_STEP: Duration = Duration::from_secs(2);
/// The first read for a task type never seen: fast tasks (config writes)
/// end within a few tens of milliseconds.
const FIRST_STEP: Duration = Duration::from_millis(50);

#[derive(Debug, Default)]
pub(crate) struct TaskPacer {
    /// Smoothed observed duration per task type.
    expected: Mutex<HashMap<String, Duration>>,
    /// Per task type: woken when the first task of that type ends.
    first_end: Mutex<HashMap<String, Arc<Notify>>>,
    /// Task types not seen yet whose scout is waiting right now.
    scouted: Mutex<HashSet<String>>,
}

/// The scout's role for one wait; ends with it (even a cancelled one).
struct Scout<'a> {
    pacer: &'a TaskPacer,
    kind: &'a str,
}

impl Drop for Scout<'_> {
    fn drop(&mut self) {
        self.pacer.scouted.lock().expect("pacer").remove(self.kind);
    }
}

impl TaskPacer {
    /// How long to wait before the next status read of a task of type
    /// `kind` that has been waited on for `elapsed`.
    pub(crate) fn next_delay(&self, kind: &str, elapsed: Duration) -> Duration {
        let expected = self.expected.lock().expect("pacer").get(kind).copied();
        match expected {
            // Wake up just before the expected end…
            Some(e) if elapsed < e.mul_f64(0.9) => (e.mul_f64(0.9) - elapsed).max(MIN_STEP),
            // …then read in tenths of it, backing off once well past it.
            Some(e) => (e / 10).max(elapsed.saturating_sub(e) / 4),
            None => FIRST_STEP.max(elapsed / 10),
        }
        .clamp(MIN_STEP, MAX_STEP)
    }

    /// Waits before the next status read of a task of type `kind` waited
    /// on for `elapsed`: [`TaskPacer::next_delay`], cut short when the
    /// first task of a type not seen yet ends.
    pub(crate) async fn pause(&self, kind: &str, elapsed: Duration) {
        let notify = self
            .first_end
            .lock()
            .expect("pacer")
            .entry(kind.to_owned())
            .or_default()
            .clone();
        let notified = notify.notified();
        let mut notified = std::pin::pin!(notified);
        // Registered before the delay is computed: a first end after this
        // point wakes this wait, one before it is in the delay already.
        notified.as_mut().enable();
        let known = self.expected.lock().expect("pacer").contains_key(kind);
        let scout = (!known && self.scouted.lock().expect("pacer").insert(kind.to_owned()))
            .then_some(Scout { pacer: self, kind });
        let delay = if known || scout.is_some() {
            self.next_delay(kind, elapsed)
        } else {
            // Another task of this type scouts; its end wakes this one.
            MAX_STEP
        };
        let _ = tokio::time::timeout(delay, notified).await;
        drop(scout);
    }

    /// Records that a task of type `kind` ended after `took`.
    pub(crate) fn observe(&self, kind: &str, took: Duration) {
        let first = {
            let mut expected = self.expected.lock().expect("pacer");
            let smoothed = match expected.get(kind) {
                Some(old) => old.mul_f64(0.7) + took.mul_f64(0.3),
                None => took,
            };
            expected.insert(kind.to_owned(), smoothed).is_none()
        };
        if first && let Some(waiting) = self.first_end.lock().expect("pacer").get(kind) {
            waiting.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn an_unknown_task_type_is_read_soon_then_less_often() {
        let p = TaskPacer::default();
        assert_eq!(p.next_delay("qmclone", Duration::ZERO), 50 * MS);
        assert_eq!(p.next_delay("qmclone", 600 * MS), 60 * MS);
        assert_eq!(p.next_delay("qmclone", Duration::from_secs(60)), MAX_STEP);
    }

    #[test]
    fn a_known_task_type_is_read_just_before_it_is_expected_to_end() {
        let p = TaskPacer::default();
        p.observe("qmclone", 1500 * MS);
        assert_eq!(p.next_delay("qmclone", Duration::ZERO), 1350 * MS);
        assert_eq!(p.next_delay("qmclone", 1400 * MS), 150 * MS);
        // Long past the expectation: back off with the time waited.
        assert_eq!(p.next_delay("qmclone", 9500 * MS), 2000 * MS);
        // Other types are not affected.
        assert_eq!(p.next_delay("qmstart", Duration::ZERO), 50 * MS);
    }

    #[tokio::test]
    async fn one_task_of_an_unknown_type_scouts_and_the_others_wait_for_it() {
        let p = Arc::new(TaskPacer::default());
        let start = std::time::Instant::now();
        let scout = tokio::spawn({
            let p = p.clone();
            async move { p.pause("qmclone", Duration::ZERO).await }
        });
        tokio::time::sleep(10 * MS).await;
        let sibling = tokio::spawn({
            let p = p.clone();
            async move { p.pause("qmclone", Duration::ZERO).await }
        });
        scout.await.unwrap();
        assert!(start.elapsed() < 500 * MS, "the scout reads soon");
        tokio::time::sleep(100 * MS).await;
        assert!(!sibling.is_finished(), "its sibling waits");
        p.observe("qmclone", 150 * MS);
        tokio::time::timeout(500 * MS, sibling)
            .await
            .expect("the first end wakes the sibling")
            .unwrap();
    }

    #[tokio::test]
    async fn a_known_task_type_is_not_woken_by_the_end_of_another() {
        let p = Arc::new(TaskPacer::default());
        p.observe("qmclone", Duration::from_secs(3));
        let start = std::time::Instant::now();
        let waiting = tokio::spawn({
            let p = p.clone();
            async move { p.pause("qmclone", Duration::ZERO).await }
        });
        tokio::time::sleep(50 * MS).await;
        p.observe("qmclone", Duration::from_secs(3));
        waiting.await.unwrap();
        assert!(start.elapsed() >= MAX_STEP, "{:?}", start.elapsed());
    }

    #[test]
    fn the_expectation_follows_what_tasks_take() {
        let p = TaskPacer::default();
        p.observe("qmstart", 1000 * MS);
        p.observe("qmstart", 2000 * MS);
        assert_eq!(p.next_delay("qmstart", Duration::ZERO), 1170 * MS);
    }
}

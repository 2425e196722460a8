//! Task polling paced by what a task of that type took before.
//!
//! A blind backoff (the client used to grow its delay to 2 s) leaves a
//! 1.5 s clone unnoticed for up to a second after it ended, and that idle
//! time adds up over a fleet. The pacer learns how long each task type
//! (`qmclone`, `qmstart`, …) takes on this cluster, sleeps until shortly
//! before the expected end, then polls in small steps; past the
//! expectation it backs off in proportion to the time already waited, so a
//! long download costs few requests. It must not decide anything but
//! *when* to ask: the task's status still comes from the server.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

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
            None => FIRST_STEP.max(elapsed / 3),
        }
        .clamp(MIN_STEP, MAX_STEP)
    }

    /// Records that a task of type `kind` ended after `took`.
    pub(crate) fn observe(&self, kind: &str, took: Duration) {
        let mut expected = self.expected.lock().expect("pacer");
        let smoothed = match expected.get(kind) {
            Some(old) => old.mul_f64(0.7) + took.mul_f64(0.3),
            None => took,
        };
        expected.insert(kind.to_owned(), smoothed);
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
        assert_eq!(p.next_delay("qmclone", 600 * MS), 200 * MS);
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

    #[test]
    fn the_expectation_follows_what_tasks_take() {
        let p = TaskPacer::default();
        p.observe("qmstart", 1000 * MS);
        p.observe("qmstart", 2000 * MS);
        assert_eq!(p.next_delay("qmstart", Duration::ZERO), 1170 * MS);
    }
}

//! Readiness: a daemon is ready only once every registered start-up task said it is done.
use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
};

/// Readiness: ready once every registered task has finished starting.
#[derive(Clone, Default)]
pub struct Readiness(Arc<Mutex<BTreeSet<&'static str>>>);

impl Readiness {
    /// Registers a start-up task; the daemon is not ready until it is done.
    pub fn register(&self, task: &'static str) -> ReadyGuard {
        if let Ok(mut s) = self.0.lock() {
            s.insert(task);
        }
        ReadyGuard {
            readiness: self.clone(),
            task,
        }
    }

    /// Whether every registered task is done.
    pub fn is_ready(&self) -> bool {
        self.0.lock().map(|s| s.is_empty()).unwrap_or(false)
    }

    /// The tasks still starting.
    pub fn pending(&self) -> Vec<&'static str> {
        self.0
            .lock()
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }
}

/// Marks its task done when [`ReadyGuard::done`] is called.
pub struct ReadyGuard {
    readiness: Readiness,
    task: &'static str,
}

impl ReadyGuard {
    /// The task is done starting.
    pub fn done(self) {
        if let Ok(mut s) = self.readiness.0.lock() {
            s.remove(self.task);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_waits_for_every_task() {
        let r = Readiness::default();
        let a = r.register("a");
        let b = r.register("b");
        assert!(!r.is_ready());
        a.done();
        assert_eq!(r.pending(), vec!["b"]);
        b.done();
        assert!(r.is_ready());
    }
}

//! One drain primitive for every daemon (the idea of istio/ztunnel's `drain`).
//!
//! [`channel`] gives a [`Trigger`] and a [`Watcher`]. Every task that must finish its work before
//! the process exits holds a clone of the watcher and ends when [`Watcher::signaled`] resolves
//! (servers stop accepting and finish what is in flight; streams end). [`Trigger::drain`] signals
//! every watcher and waits until all of them are dropped, up to a deadline: `Graceful` when they
//! all went, `Forced` when the deadline passed first (the caller then stops waiting). The
//! supervisor adds the second-signal rule: a second SIGTERM or Ctrl-C during a drain exits at
//! once.
use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// A new drain: the trigger and the first watcher.
pub fn channel() -> (Trigger, Watcher) {
    let (signal, signal_rx) = watch::channel(false);
    let (alive_tx, alive) = mpsc::channel(1);
    (
        Trigger { signal, alive },
        Watcher {
            signal: signal_rx,
            _alive: alive_tx,
        },
    )
}

/// Held by whatever must finish before the process exits.
#[derive(Clone, Debug)]
pub struct Watcher {
    signal: watch::Receiver<bool>,
    /// Dropped with the watcher; the trigger waits until every clone is gone.
    _alive: mpsc::Sender<()>,
}

impl Watcher {
    /// Resolves once the drain has started (also when the trigger is gone).
    pub async fn signaled(&self) {
        let mut rx = self.signal.clone();
        let _ = rx.wait_for(|draining| *draining).await;
    }

    /// [`Watcher::signaled`] as a future that owns this watcher (for graceful-shutdown hooks
    /// that want a `'static` future). The watcher is released when it resolves.
    pub async fn into_signaled(self) {
        self.signaled().await
    }

    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }

    /// A view of the drain signal that the drain does not wait for: for state that lives as long
    /// as the process (what the supervised tasks share), where a held watcher would keep every
    /// drain waiting for its deadline.
    pub fn signal(&self) -> Signal {
        Signal(self.signal.clone())
    }
}

/// Sees the drain start, without holding it up (see [`Watcher::signal`]).
#[derive(Clone, Debug)]
pub struct Signal(watch::Receiver<bool>);

impl Signal {
    /// Resolves once the drain has started (also when the trigger is gone).
    pub async fn signaled(&self) {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|draining| *draining).await;
    }
}

/// Starts the drain.
#[derive(Debug)]
pub struct Trigger {
    signal: watch::Sender<bool>,
    alive: mpsc::Receiver<()>,
}

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drained {
    /// Every watcher was released within the deadline.
    Graceful,
    /// The deadline passed with watchers still held.
    Forced,
}

impl Trigger {
    /// Signals every watcher without waiting.
    pub fn start(&self) {
        self.signal.send_replace(true);
    }

    /// Signals every watcher, then waits until all are released or `deadline` passed.
    pub async fn drain(mut self, deadline: Duration) -> Drained {
        self.start();
        // `recv` returns `None` once every sender (one per watcher) is dropped.
        match tokio::time::timeout(deadline, self.alive.recv()).await {
            Ok(_) => Drained::Graceful,
            Err(_) => Drained::Forced,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_every_watcher_then_reports_graceful() {
        let (trigger, watcher) = channel();
        let mut done = Vec::new();
        for i in 0..3u64 {
            let w = watcher.clone();
            done.push(tokio::spawn(async move {
                w.signaled().await;
                // Work still in flight after the signal.
                tokio::time::sleep(Duration::from_millis(20 * i)).await;
                drop(w);
            }));
        }
        drop(watcher);
        assert!(!done.iter().any(|d| d.is_finished()));
        let t = std::time::Instant::now();
        assert_eq!(
            trigger.drain(Duration::from_secs(5)).await,
            Drained::Graceful
        );
        // It waited for the slowest one (40 ms), not for the deadline.
        assert!(
            t.elapsed() >= Duration::from_millis(40),
            "{:?}",
            t.elapsed()
        );
        assert!(t.elapsed() < Duration::from_secs(5));
        for d in done {
            assert!(d.is_finished());
        }
    }

    #[tokio::test]
    async fn a_watcher_held_past_the_deadline_forces_the_drain() {
        let (trigger, watcher) = channel();
        let held = watcher.clone();
        drop(watcher);
        let t = std::time::Instant::now();
        assert_eq!(
            trigger.drain(Duration::from_millis(100)).await,
            Drained::Forced
        );
        assert!(t.elapsed() >= Duration::from_millis(100));
        assert!(held.is_draining());
    }

    #[tokio::test]
    async fn a_signal_sees_the_drain_without_holding_it_up() {
        let (trigger, watcher) = channel();
        let signal = watcher.signal();
        drop(watcher);
        let t = std::time::Instant::now();
        assert_eq!(
            trigger.drain(Duration::from_secs(5)).await,
            Drained::Graceful
        );
        assert!(t.elapsed() < Duration::from_secs(1));
        tokio::time::timeout(Duration::from_secs(1), signal.signaled())
            .await
            .expect("the signal saw the drain");
    }

    #[tokio::test]
    async fn signaled_resolves_when_the_trigger_is_dropped() {
        let (trigger, watcher) = channel();
        drop(trigger);
        tokio::time::timeout(Duration::from_secs(1), watcher.signaled())
            .await
            .expect("a dropped trigger releases the watchers");
    }
}

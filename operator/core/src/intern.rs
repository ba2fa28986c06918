//! Sharing of equal values: 50 000 pods carry a few hundred distinct label sets, service
//! accounts, node names and namespace names, and select a few hundred distinct policy lists.
//! The engine keeps one allocation of each.
use std::{collections::HashSet, hash::Hash, sync::Arc};

/// A pool of shared values. Values nobody else holds any more are dropped by a sweep that runs
/// when the pool has doubled since the last one, so interning stays amortised O(1).
pub struct Interner<T: ?Sized> {
    set: HashSet<Arc<T>>,
    sweep_at: usize,
}

impl<T: ?Sized + Eq + Hash> Default for Interner<T> {
    fn default() -> Self {
        Self {
            set: HashSet::new(),
            sweep_at: 64,
        }
    }
}

impl<T: ?Sized + Eq + Hash> Interner<T> {
    /// The pooled value equal to `v` (`v` itself if it is new).
    pub fn intern(&mut self, v: Arc<T>) -> Arc<T> {
        if let Some(x) = self.set.get(&*v) {
            return x.clone();
        }
        self.set.insert(v.clone());
        if self.set.len() >= self.sweep_at {
            self.set.retain(|a| Arc::strong_count(a) > 1);
            self.sweep_at = (self.set.len() * 2).max(64);
        }
        v
    }

    /// How many distinct values the pool holds (some may be unused until the next sweep).
    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_share_one_allocation() {
        let mut i: Interner<str> = Interner::default();
        let a = i.intern("shop".into());
        let b = i.intern("shop".into());
        assert!(Arc::ptr_eq(&a, &b));
        let c = i.intern("web".into());
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(i.len(), 2);
    }

    #[test]
    fn unused_values_are_swept() {
        let mut i: Interner<str> = Interner::default();
        let keep = i.intern("keep".into());
        for n in 0..10_000 {
            drop(i.intern(format!("gone-{n}").into()));
        }
        // Everything but `keep` and the values since the last sweep is gone.
        assert!(i.len() < 200, "{}", i.len());
        assert!(Arc::ptr_eq(&keep, &i.intern("keep".into())));
    }
}

//! A list with its repeats removed as it is built, for the short name lists of an upgrade.
//!
//! Owns how a first occurrence is told from a repeat: a scan of what is kept while the list is
//! short, so that the one to three channels most connections name cost no hash table (they are
//! built on every upgrade), and a hash set once it is long (a list may hold 1,000 names). It
//! must not know what the items are.

use std::borrow::Borrow;
use std::hash::Hash;

use rustc_hash::FxHashSet;

/// Up to this many items, a repeat is found by scanning the list.
const SCAN_UP_TO: usize = 16;

/// The distinct items pushed, in first-seen order.
pub struct Distinct<T> {
    kept: Vec<T>,
    index: Option<FxHashSet<T>>,
}

impl<T: Eq + Hash + Clone> Default for Distinct<T> {
    fn default() -> Self {
        Self {
            kept: Vec::new(),
            index: None,
        }
    }
}

impl<T: Eq + Hash + Clone> Distinct<T> {
    pub fn contains<Q>(&self, item: &Q) -> bool
    where
        T: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        match &self.index {
            Some(set) => set.contains(item),
            None => self.kept.iter().any(|k| k.borrow() == item),
        }
    }

    /// Keeps `item` unless it is a repeat; whether it was kept.
    pub fn push(&mut self, item: T) -> bool {
        if self.contains(&item) {
            return false;
        }
        if let Some(set) = &mut self.index {
            set.insert(item.clone());
        } else if self.kept.len() == SCAN_UP_TO {
            self.index = Some(self.kept.iter().cloned().chain([item.clone()]).collect());
        }
        self.kept.push(item);
        true
    }

    pub fn len(&self) -> usize {
        self.kept.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    pub fn into_vec(self) -> Vec<T> {
        self.kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_dropped_in_short_and_long_lists_alike() {
        for n in [1usize, SCAN_UP_TO, SCAN_UP_TO + 1, 200] {
            let mut d = Distinct::default();
            for round in 0..3 {
                for i in 0..n {
                    assert_eq!(d.push(i.to_string()), round == 0, "item {i} of {n}");
                }
            }
            assert_eq!(d.len(), n);
            assert!(d.contains("0") && !d.contains("x"));
            let kept = d.into_vec();
            assert_eq!(kept, (0..n).map(|i| i.to_string()).collect::<Vec<_>>());
        }
    }
}

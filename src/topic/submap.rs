//! [`SubMap`]: the `key -> value` set of one filter in the subscription tree.
//!
//! Most filters have one subscriber (a device's own command topic), a few have
//! thousands. A `BTreeMap` allocates a whole leaf of 11 slots for its first
//! entry (~500 bytes with a client id and subscription options), which made
//! one subscription cost more than an idle connection. So a filter keeps up to
//! [`FEW`] entries in a sorted `Vec` sized exactly, and moves to a `BTreeMap`
//! beyond that. Both iterate in key order, so what is built from the tree
//! (State snapshots) stays deterministic.

use std::collections::BTreeMap;
use std::fmt;

/// Entries kept in the sorted vector; one more moves them to a `BTreeMap`.
const FEW: usize = 8;

pub(crate) enum SubMap<K, V> {
    /// Sorted by key, capacity kept equal to the length.
    Few(Vec<(K, V)>),
    /// Boxed so that the map is as big as a `Vec` (it is in every tree node).
    #[allow(clippy::box_collection)]
    Many(Box<BTreeMap<K, V>>),
}

impl<K, V> Default for SubMap<K, V> {
    fn default() -> Self {
        SubMap::Few(Vec::new())
    }
}

impl<K, V> SubMap<K, V> {
    pub fn is_empty(&self) -> bool {
        match self {
            SubMap::Few(v) => v.is_empty(),
            SubMap::Many(m) => m.is_empty(),
        }
    }
}

impl<K: Ord, V> SubMap<K, V> {
    /// Adds or replaces `key`'s value; returns the previous value.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self {
            SubMap::Few(v) => match v.binary_search_by(|(k, _)| k.cmp(&key)) {
                Ok(i) => Some(std::mem::replace(&mut v[i].1, value)),
                Err(i) if v.len() < FEW => {
                    v.reserve_exact(1);
                    v.insert(i, (key, value));
                    None
                }
                Err(_) => {
                    let mut m: BTreeMap<K, V> = std::mem::take(v).into_iter().collect();
                    m.insert(key, value);
                    *self = SubMap::Many(Box::new(m));
                    None
                }
            },
            SubMap::Many(m) => m.insert(key, value),
        }
    }

    /// Removes `key`; returns its value.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        match self {
            SubMap::Few(v) => {
                let i = v.binary_search_by(|(k, _)| k.cmp(key)).ok()?;
                let (_, value) = v.remove(i);
                v.shrink_to_fit();
                Some(value)
            }
            SubMap::Many(m) => {
                let value = m.remove(key)?;
                if m.len() <= FEW / 2 {
                    let few: Vec<(K, V)> = std::mem::take(&mut **m).into_iter().collect();
                    *self = SubMap::Few(few);
                }
                Some(value)
            }
        }
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        match self {
            SubMap::Few(v) => v.binary_search_by(|(k, _)| k.cmp(key)).ok().map(|i| &v[i].1),
            SubMap::Many(m) => m.get(key),
        }
    }

    /// Every entry in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        let (few, many) = match self {
            SubMap::Few(v) => (Some(v.iter().map(|(k, v)| (k, v))), None),
            SubMap::Many(m) => (None, Some(m.iter())),
        };
        few.into_iter().flatten().chain(many.into_iter().flatten())
    }
}

impl<K: Ord + fmt::Debug, V: fmt::Debug> fmt::Debug for SubMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn one_entry_is_one_exact_allocation() {
        let mut m = SubMap::default();
        m.insert(7u32, [0u8; 40]);
        let SubMap::Few(v) = &m else { panic!("one entry is kept in the vector") };
        assert_eq!(v.capacity(), 1);
    }

    #[test]
    fn grows_into_a_btreemap_and_back() {
        let mut m = SubMap::default();
        for k in 0..=FEW as u32 {
            m.insert(k, k);
        }
        assert!(matches!(m, SubMap::Many(_)));
        for k in 0..=(FEW / 2) as u32 {
            assert_eq!(m.remove(&k), Some(k));
        }
        assert!(matches!(m, SubMap::Few(_)));
        let keys: Vec<u32> = m.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, ((FEW / 2 + 1) as u32..=FEW as u32).collect::<Vec<_>>());
    }

    proptest! {
        /// Any sequence of inserts and removes gives what a BTreeMap gives,
        /// in the same order.
        #[test]
        fn behaves_like_a_btreemap(ops in prop::collection::vec((any::<bool>(), 0u8..24, any::<u16>()), 0..200)) {
            let mut m = SubMap::default();
            let mut want = BTreeMap::new();
            for (insert, k, v) in ops {
                if insert {
                    prop_assert_eq!(m.insert(k, v), want.insert(k, v));
                } else {
                    prop_assert_eq!(m.remove(&k), want.remove(&k));
                }
                prop_assert_eq!(m.is_empty(), want.is_empty());
                prop_assert_eq!(m.get(&k), want.get(&k));
            }
            let got: Vec<(u8, u16)> = m.iter().map(|(k, v)| (*k, *v)).collect();
            let want: Vec<(u8, u16)> = want.into_iter().collect();
            prop_assert_eq!(got, want);
        }
    }
}

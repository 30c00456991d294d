//! The subscription tree: a trie over topic levels, with separate `+` and `#`
//! children per node, mapping each filter to a set of `key -> value`.
//!
//! Nodes live in one arena (`Vec`) addressed by index, so neither lookup nor
//! drop recurses: a filter may have ~32k levels (`+/+/+...`), deep enough to
//! overflow a task's stack with a recursive walk. Lookups allocate nothing
//! unless the walk needs more than [`INLINE_STACK`] pending branches.

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;

use smallvec::SmallVec;

use super::submap::SubMap;

/// Pending branches kept on the stack during a lookup before spilling to the heap.
/// Each level of the walk leaves at most one pending sibling, so this covers
/// topics of about this many levels.
const INLINE_STACK: usize = 24;

const ROOT: usize = 0;

/// A child's index in the arena: never the root (0), so `Option<ChildId>` is
/// 4 bytes. A node is one filter level (80 bytes here) and most filters end in
/// a leaf with one subscriber, so per-node bytes are per-subscription bytes.
type ChildId = NonZeroU32;

fn child_id(id: usize) -> ChildId {
    // Fewer than 2^32 nodes: each takes more than 80 bytes.
    u32::try_from(id).ok().and_then(NonZeroU32::new).expect("a child node index fits in 1..2^32")
}

struct Node<K, V> {
    parent: u32,
    plus: Option<ChildId>,
    hash: Option<ChildId>,
    /// This node's level in its parent ("+" / "#" for the wildcard children).
    level: Box<str>,
    /// Children by level; boxed (8 bytes instead of 48 in every node) and
    /// absent while empty (leaves are most nodes).
    #[allow(clippy::box_collection)]
    children: Option<Box<HashMap<Box<str>, ChildId>>>,
    /// The full filter of this node, kept while `subs` is non-empty (the
    /// callback of `matches` borrows it).
    filter: Option<Box<str>>,
    subs: SubMap<K, V>,
}

impl<K, V> Node<K, V> {
    fn new(parent: usize, level: &str) -> Self {
        Node {
            // Fewer than 2^32 nodes (see `child_id`).
            parent: u32::try_from(parent).expect("a node index fits in 32 bits"),
            plus: None,
            hash: None,
            level: level.into(),
            children: None,
            filter: None,
            subs: SubMap::default(),
        }
    }

    fn is_unused(&self) -> bool {
        self.subs.is_empty() && self.children.is_none() && self.plus.is_none() && self.hash.is_none()
    }

    fn plus(&self) -> Option<usize> {
        self.plus.map(|c| c.get() as usize)
    }

    fn hash(&self) -> Option<usize> {
        self.hash.map(|c| c.get() as usize)
    }

    fn named_child(&self, level: &str) -> Option<usize> {
        self.children.as_ref()?.get(level).map(|c| c.get() as usize)
    }

    fn child(&self, level: &str) -> Option<usize> {
        match level {
            "+" => self.plus(),
            "#" => self.hash(),
            _ => self.named_child(level),
        }
    }
}

/// Filter -> set of (K -> V). `K` is typically a client id, `V` the
/// subscription options. Each filter is inserted as given (a shared filter
/// should be inserted as its inner filter, with the group in the key).
pub struct SubscriptionTree<K: Ord + Clone, V> {
    nodes: Vec<Node<K, V>>,
    free: Vec<usize>,
    len: usize,
}

impl<K: Ord + Clone, V> Default for SubscriptionTree<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Ord + Clone + fmt::Debug, V: fmt::Debug> fmt::Debug for SubscriptionTree<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for n in &self.nodes {
            if let Some(filter) = &n.filter {
                m.entry(filter, &n.subs);
            }
        }
        m.finish()
    }
}

impl<K: Ord + Clone, V> SubscriptionTree<K, V> {
    pub fn new() -> Self {
        SubscriptionTree { nodes: vec![Node::new(ROOT, "")], free: Vec::new(), len: 0 }
    }

    /// Number of (filter, key) pairs.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Removes every subscription.
    pub fn clear(&mut self) {
        *self = Self::new();
    }

    fn alloc(&mut self, parent: usize, level: &str) -> usize {
        match self.free.pop() {
            Some(id) => {
                self.nodes[id] = Node::new(parent, level);
                id
            }
            None => {
                self.nodes.push(Node::new(parent, level));
                self.nodes.len() - 1
            }
        }
    }

    fn find(&self, filter: &str) -> Option<usize> {
        let mut id = ROOT;
        for level in filter.split('/') {
            id = self.nodes[id].child(level)?;
        }
        Some(id)
    }

    /// Adds or replaces `key`'s value under `filter`; returns the previous value.
    pub fn insert(&mut self, filter: &str, key: K, value: V) -> Option<V> {
        let mut id = ROOT;
        for level in filter.split('/') {
            id = match self.nodes[id].child(level) {
                Some(c) => c,
                None => {
                    let c = self.alloc(id, level);
                    let node = &mut self.nodes[id];
                    match level {
                        "+" => node.plus = Some(child_id(c)),
                        "#" => node.hash = Some(child_id(c)),
                        _ => {
                            node.children
                                .get_or_insert_with(Default::default)
                                .insert(level.into(), child_id(c));
                        }
                    }
                    c
                }
            };
        }
        let node = &mut self.nodes[id];
        if node.filter.is_none() {
            node.filter = Some(filter.into());
        }
        let prev = node.subs.insert(key, value);
        if prev.is_none() {
            self.len += 1;
        }
        prev
    }

    /// Removes `key` from `filter`; returns its value. Empty branches are freed.
    pub fn remove(&mut self, filter: &str, key: &K) -> Option<V> {
        let id = self.find(filter)?;
        let node = &mut self.nodes[id];
        let prev = node.subs.remove(key)?;
        self.len -= 1;
        if node.subs.is_empty() {
            node.filter = None;
        }
        self.prune(id);
        Some(prev)
    }

    /// Unlinks and frees `id` and its ancestors while they hold nothing.
    fn prune(&mut self, mut id: usize) {
        while id != ROOT && self.nodes[id].is_unused() {
            let parent = self.nodes[id].parent as usize;
            let level = std::mem::take(&mut self.nodes[id].level);
            let p = &mut self.nodes[parent];
            match &*level {
                "+" => p.plus = None,
                "#" => p.hash = None,
                _ => {
                    if let Some(children) = p.children.as_mut() {
                        children.remove(&level);
                        if children.is_empty() {
                            p.children = None;
                        }
                    }
                }
            }
            self.free.push(id);
            id = parent;
        }
    }

    /// The value of `key` under exactly `filter`.
    pub fn get(&self, filter: &str, key: &K) -> Option<&V> {
        self.nodes[self.find(filter)?].subs.get(key)
    }

    /// Calls `f(filter, key, value)` once for every (filter, key) whose filter
    /// matches `topic` (with the `$` rule of MQTT 4.7.2).
    pub fn matches<'a>(&'a self, topic: &str, mut f: impl FnMut(&'a str, &'a K, &'a V)) {
        if self.len == 0 {
            return;
        }
        let mut emit = |node: &'a Node<K, V>| {
            if let Some(filter) = &node.filter {
                for (k, v) in node.subs.iter() {
                    f(filter, k, v);
                }
            }
        };
        // (node, the rest of the topic after the levels consumed so far, first level?)
        let mut stack: SmallVec<[(usize, Option<&str>, bool); INLINE_STACK]> = SmallVec::new();
        stack.push((ROOT, Some(topic), true));
        while let Some((id, rest, first)) = stack.pop() {
            let node = &self.nodes[id];
            let Some(rest) = rest else {
                // Topic consumed: this node matches, and so does its `#` child
                // ("a/#" matches "a").
                emit(node);
                if let Some(h) = node.hash() {
                    emit(&self.nodes[h]);
                }
                continue;
            };
            let (level, next) = match rest.split_once('/') {
                Some((l, n)) => (l, Some(n)),
                None => (rest, None),
            };
            if !(first && level.starts_with('$')) {
                if let Some(h) = node.hash() {
                    emit(&self.nodes[h]);
                }
                if let Some(p) = node.plus() {
                    stack.push((p, next, false));
                }
            }
            if let Some(c) = node.named_child(level) {
                stack.push((c, next, false));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Per-subscription memory: a filter is mostly one leaf node.
    #[test]
    fn a_node_stays_small() {
        let size = std::mem::size_of::<Node<std::sync::Arc<str>, [u64; 4]>>();
        assert!(size <= 80, "Node: {size} B");
    }
    use crate::topic::matches;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn collect(t: &SubscriptionTree<u32, u32>, topic: &str) -> Vec<(String, u32, u32)> {
        let mut out = Vec::new();
        t.matches(topic, |f, k, v| out.push((f.to_string(), *k, *v)));
        out.sort();
        out
    }

    #[test]
    fn insert_match_remove() {
        let mut t = SubscriptionTree::new();
        assert_eq!(t.insert("a/+", 1, 10), None);
        assert_eq!(t.insert("a/#", 1, 11), None);
        assert_eq!(t.insert("#", 2, 20), None);
        assert_eq!(t.insert("a/b", 3, 30), None);
        assert_eq!(t.insert("a/b", 3, 31), Some(30));
        assert_eq!(t.len(), 4);
        assert_eq!(
            collect(&t, "a/b"),
            vec![("#".into(), 2, 20), ("a/#".into(), 1, 11), ("a/+".into(), 1, 10), ("a/b".into(), 3, 31)]
        );
        assert_eq!(collect(&t, "a"), vec![("#".into(), 2, 20), ("a/#".into(), 1, 11)]);
        assert_eq!(collect(&t, "$SYS/a"), vec![]);
        assert_eq!(t.get("a/b", &3), Some(&31));
        assert_eq!(t.remove("a/b", &3), Some(31));
        assert_eq!(t.remove("a/b", &3), None);
        assert_eq!(t.remove("x/y", &3), None);
        assert_eq!(t.get("a/b", &3), None);
        assert_eq!(t.len(), 3);
        assert_eq!(t.remove("a/+", &1), Some(10));
        assert_eq!(t.remove("a/#", &1), Some(11));
        assert_eq!(t.remove("#", &2), Some(20));
        assert!(t.is_empty());
        // Every branch was pruned: only the root remains live.
        assert_eq!(t.nodes.len() - t.free.len(), 1);
    }

    #[test]
    fn dollar_topics() {
        let mut t = SubscriptionTree::new();
        t.insert("$SYS/#", 1, 0);
        t.insert("+/x", 2, 0);
        t.insert("#", 3, 0);
        t.insert("$SYS/+", 4, 0);
        let mut keys: Vec<u32> = collect(&t, "$SYS/x").into_iter().map(|(_, k, _)| k).collect();
        keys.sort();
        assert_eq!(keys, vec![1, 4]);
        let mut keys: Vec<u32> = collect(&t, "a/x").into_iter().map(|(_, k, _)| k).collect();
        keys.sort();
        assert_eq!(keys, vec![2, 3]);
    }

    #[test]
    fn very_deep_filters_do_not_overflow() {
        let levels = 30_000;
        let filter = vec!["+"; levels].join("/");
        let topic = vec!["a"; levels].join("/");
        let mut t = SubscriptionTree::new();
        t.insert(&filter, 1u32, 1u32);
        t.insert("#", 2, 2);
        let mut n = 0;
        t.matches(&topic, |_, _, _| n += 1);
        assert_eq!(n, 2);
        assert_eq!(t.remove(&filter, &1), Some(1));
        assert_eq!(t.nodes.len() - t.free.len(), 2);
        // Dropping a deep tree must not recurse either.
        t.insert(&filter, 1, 1);
        drop(t);
    }

    fn level() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["a", "b", "$s", "", "c"])
    }

    fn filter() -> impl Strategy<Value = String> {
        (prop::collection::vec(prop_oneof![3 => level(), 1 => Just("+")], 1..5), any::<bool>()).prop_map(
            |(mut ls, hash)| {
                if hash {
                    ls.push("#");
                }
                ls.join("/")
            },
        )
    }

    fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(level(), 1..6).prop_map(|ls| ls.join("/"))
    }

    proptest! {
        #[test]
        fn tree_agrees_with_matches(
            subs in prop::collection::vec((filter(), 0u32..4), 0..40),
            removals in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
            topics in prop::collection::vec(topic(), 1..20),
        ) {
            let mut t = SubscriptionTree::new();
            let mut reference: BTreeSet<(String, u32)> = BTreeSet::new();
            for (f, k) in &subs {
                t.insert(f, *k, 0u32);
                reference.insert((f.clone(), *k));
            }
            for r in removals {
                if reference.is_empty() {
                    break;
                }
                let victim = reference.iter().nth(r.index(reference.len())).cloned();
                if let Some((f, k)) = victim {
                    prop_assert_eq!(t.remove(&f, &k), Some(0));
                    reference.remove(&(f, k));
                }
            }
            prop_assert_eq!(t.len(), reference.len());
            for topic in &topics {
                let mut got: Vec<(String, u32)> = Vec::new();
                t.matches(topic, |f, k, _| got.push((f.to_string(), *k)));
                let n = got.len();
                got.sort();
                got.dedup();
                prop_assert_eq!(n, got.len(), "a (filter, key) was visited twice");
                let want: Vec<(String, u32)> =
                    reference.iter().filter(|(f, _)| matches(f, topic)).cloned().collect();
                prop_assert_eq!(got, want, "topic {}", topic);
            }
        }
    }
}

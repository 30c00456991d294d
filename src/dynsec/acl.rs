//! ACL decisions (spec section 4.2) on a derived structure rebuilt after every
//! change: per user name, the roles in evaluation order (client roles by
//! priority, then each group's roles, groups by membership priority), each role
//! compiled once into one entry list per access type with its filters split
//! into levels. A check is one hash lookup and a short scan, without
//! allocation. Never serialized: rebuilt on change and on load.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::model::{by_priority, AclType, DefaultAccess, Role};
use super::{Access, Dynsec};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Lit(Box<str>),
    Plus,
}

/// A pattern split into levels, with a trailing `#` taken off.
#[derive(Debug, Clone)]
struct Filter {
    levels: Box<[Level]>,
    /// Ended in `#` (`a/#`), or is `#` itself (then `levels` is empty).
    hash: bool,
    /// The empty topic: never matches (2.0.11 accepts it as an ACL).
    never: bool,
    /// Starts with a wildcard: does not match topics starting with `$`.
    wild_first: bool,
}

impl Filter {
    fn new(t: &str) -> Filter {
        let (body, hash) = if t == "#" {
            (None, true)
        } else if let Some(b) = t.strip_suffix("/#") {
            (Some(b), true)
        } else {
            (Some(t), false)
        };
        let levels: Box<[Level]> = match body {
            None => Box::new([]),
            Some(b) => {
                b.split('/').map(|l| if l == "+" { Level::Plus } else { Level::Lit(l.into()) }).collect()
            }
        };
        let wild_first = t.starts_with('+') || t.starts_with('#');
        Filter { levels, hash, never: t.is_empty(), wild_first }
    }

    /// MQTT matching of a topic name (publish types).
    fn matches_topic(&self, topic: &str) -> bool {
        if self.never || (self.wild_first && topic.starts_with('$')) {
            return false;
        }
        let mut parts = topic.split('/');
        for l in self.levels.iter() {
            match (l, parts.next()) {
                (_, None) => return false,
                (Level::Plus, Some(_)) => {}
                (Level::Lit(s), Some(p)) => {
                    if **s != *p {
                        return false;
                    }
                }
            }
        }
        // `a/#` also matches `a` itself.
        self.hash || parts.next().is_none()
    }

    /// Whether this pattern "covers" the requested filter (section 4.2).
    fn covers(&self, requested: &str) -> bool {
        if self.never {
            return false;
        }
        if self.hash && self.levels.is_empty() {
            return true; // `#` covers everything, `$` topics included
        }
        let (body, s_hash) = if requested == "#" {
            (None, true)
        } else if let Some(b) = requested.strip_suffix("/#") {
            (Some(b), true)
        } else {
            (Some(requested), false)
        };
        if s_hash && !self.hash {
            return false;
        }
        let mut parts = body.map(|b| b.split('/'));
        let mut next = || parts.as_mut().and_then(Iterator::next);
        for l in self.levels.iter() {
            match (l, next()) {
                (_, None) => return false,
                (Level::Plus, Some(_)) => {}
                (Level::Lit(s), Some(p)) => {
                    if **s != *p {
                        return false;
                    }
                }
            }
        }
        next().is_none() || self.hash
    }
}

#[derive(Debug, Clone)]
enum Entry {
    /// subscribeLiteral / unsubscribeLiteral: exact string comparison.
    Literal(Box<str>, bool),
    /// subscribePattern / unsubscribePattern: the covers rule.
    Pattern(Filter, bool),
    /// publishClientSend / publishClientReceive: MQTT matching.
    Publish(Filter, bool),
}

/// One role's ACLs per access type (index = [`access_index`]), in
/// evaluation order: literal entries before pattern entries, each by
/// priority descending, ties in insertion order.
#[derive(Debug)]
struct CompiledRole {
    lists: [Box<[Entry]>; 4],
}

impl CompiledRole {
    fn new(role: &Role) -> CompiledRole {
        let mut lists: [Vec<Entry>; 4] = Default::default();
        // `role.acls` is sorted by type, and literal types sort before patterns.
        for a in &role.acls {
            let e = match a.acltype {
                AclType::PublishClientSend | AclType::PublishClientReceive => {
                    Entry::Publish(Filter::new(&a.topic), a.allow)
                }
                AclType::SubscribeLiteral | AclType::UnsubscribeLiteral => {
                    Entry::Literal(a.topic.as_str().into(), a.allow)
                }
                AclType::SubscribePattern | AclType::UnsubscribePattern => {
                    Entry::Pattern(Filter::new(&a.topic), a.allow)
                }
            };
            lists[type_index(a.acltype)].push(e);
        }
        CompiledRole { lists: lists.map(Vec::into_boxed_slice) }
    }

    fn check(&self, idx: usize, topic: &str) -> Option<bool> {
        for e in self.lists[idx].iter() {
            let (hit, allow) = match e {
                Entry::Literal(t, allow) => (!t.is_empty() && **t == *topic, *allow),
                Entry::Pattern(f, allow) => (f.covers(topic), *allow),
                Entry::Publish(f, allow) => (f.matches_topic(topic), *allow),
            };
            if hit {
                return Some(allow);
            }
        }
        None
    }
}

fn type_index(t: AclType) -> usize {
    match t {
        AclType::PublishClientSend => 0,
        AclType::PublishClientReceive => 1,
        AclType::SubscribeLiteral | AclType::SubscribePattern => 2,
        AclType::UnsubscribeLiteral | AclType::UnsubscribePattern => 3,
    }
}

pub(crate) fn access_index(a: Access) -> usize {
    match a {
        Access::PublishClientSend => 0,
        Access::PublishClientReceive => 1,
        Access::Subscribe => 2,
        Access::Unsubscribe => 3,
    }
}

type RoleChain = Box<[Arc<CompiledRole>]>;

/// The derived decision structure of a [`Dynsec`].
#[derive(Default)]
pub(crate) struct Compiled {
    users: HashMap<Box<str>, RoleChain>,
    anonymous: RoleChain,
    defaults: DefaultAccess,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled").field("users", &self.users.len()).finish_non_exhaustive()
    }
}

impl Compiled {
    pub(crate) fn build(d: &Dynsec) -> Compiled {
        let roles: BTreeMap<&str, Arc<CompiledRole>> =
            d.roles.iter().map(|(n, r)| (n.as_str(), Arc::new(CompiledRole::new(r)))).collect();
        let group_chain = |g: &str, out: &mut Vec<Arc<CompiledRole>>| {
            if let Some(group) = d.groups.get(g) {
                for (r, _) in by_priority(&group.roles) {
                    if let Some(c) = roles.get(r) {
                        out.push(c.clone());
                    }
                }
            }
        };
        let mut users = HashMap::with_capacity(d.clients.len());
        for (name, c) in &d.clients {
            let mut chain = Vec::new();
            // Client roles always come before any group role.
            for (r, _) in by_priority(&c.roles) {
                if let Some(cr) = roles.get(r) {
                    chain.push(cr.clone());
                }
            }
            for (g, _) in by_priority(&c.groups) {
                group_chain(g, &mut chain);
            }
            users.insert(name.as_str().into(), chain.into_boxed_slice());
        }
        let mut anonymous = Vec::new();
        if let Some(g) = &d.anonymous_group {
            group_chain(g, &mut anonymous);
        }
        Compiled { users, anonymous: anonymous.into_boxed_slice(), defaults: d.default_access }
    }

    pub(crate) fn allowed(&self, username: Option<&str>, access: Access, topic: &str) -> bool {
        let chain = match username {
            Some(u) => match self.users.get(u) {
                Some(c) => c,
                None => return false,
            },
            None => &self.anonymous,
        };
        let idx = access_index(access);
        for role in chain.iter() {
            if let Some(allow) = role.check(idx, topic) {
                return allow;
            }
        }
        self.defaults.get(idx) && !topic.starts_with("$CONTROL")
    }
}

//! ACL decisions (spec section 4.2) on a derived structure rebuilt after every
//! change: per user name, the roles in evaluation order (client roles by
//! priority, then each group's roles, groups by membership priority), each role
//! compiled once into one entry list per access type with its filters split
//! into levels. A check is one hash lookup and a short scan, without
//! allocation. Never serialized: rebuilt on change and on load.
//!
//! `%c` / `%u` (the `[dynsec] acl_substitution` key): a level that is exactly
//! `%c` or `%u` is compiled as its own [`Level`] kind; whether it stands for
//! the client id / user name or for the literal text is decided per check
//! ([`Subject`]), so one compiled structure serves both settings.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use smallvec::SmallVec;

use super::model::{by_priority, AclType, DefaultAccess, Role};
use super::{Access, Dynsec};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Lit(Box<str>),
    Plus,
    /// A level that is exactly `%c`.
    ClientId,
    /// A level that is exactly `%u`.
    Username,
}

/// Who asks, for `%c` / `%u` substitution. With substitution off (Mosquitto
/// 2.0.11) `%c` and `%u` are literal text.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Subject<'a> {
    substitute: bool,
    /// The client id, `None` when it cannot stand for a level (contains
    /// `+`, `#` or `/`): then a `%c` level matches nothing.
    client_id: Option<&'a str>,
    /// Likewise for the user name (also `None` for anonymous clients).
    username: Option<&'a str>,
}

fn level_value(s: &str) -> Option<&str> {
    (!s.contains(['+', '#', '/'])).then_some(s)
}

impl<'a> Subject<'a> {
    /// No substitution: `%c` / `%u` match only themselves.
    pub(crate) const LITERAL: Subject<'static> =
        Subject { substitute: false, client_id: None, username: None };

    pub(crate) fn new(substitute: bool, client_id: &'a str, username: Option<&'a str>) -> Subject<'a> {
        if !substitute {
            return Subject::default();
        }
        Subject { substitute, client_id: level_value(client_id), username: username.and_then(level_value) }
    }

    /// Does ACL level `l` (never `+` here) equal topic/filter level `s`?
    fn level_eq(&self, l: &Level, s: &str) -> bool {
        match l {
            Level::Lit(l) => **l == *s,
            Level::Plus => s == "+",
            Level::ClientId if self.substitute => self.client_id == Some(s),
            Level::Username if self.substitute => self.username == Some(s),
            Level::ClientId => s == "%c",
            Level::Username => s == "%u",
        }
    }
}

fn parse_level(l: &str) -> Level {
    match l {
        "+" => Level::Plus,
        "%c" => Level::ClientId,
        "%u" => Level::Username,
        _ => Level::Lit(l.into()),
    }
}

/// A topic filter of a publish ACL, split into levels for MQTT matching.
#[derive(Debug, Clone)]
struct Filter {
    /// The levels before a trailing `#`.
    levels: Box<[Level]>,
    /// Ended in `#` (`a/#`), or is `#` itself (then `levels` is empty).
    hash: bool,
    /// The empty topic: never matches (2.0.11 accepts it as an ACL).
    never: bool,
    /// Starts with a wildcard: does not match topics starting with `$`.
    wild_first: bool,
}

fn split_levels(body: &str) -> Box<[Level]> {
    body.split('/').map(parse_level).collect()
}

/// Mosquitto's `hash_check`: takes a trailing `#` or `/#` off. Note that
/// `#` becomes the empty string, which still counts as one (empty) level.
fn strip_hash(t: &str) -> (&str, bool) {
    if t == "#" {
        ("", true)
    } else if let Some(b) = t.strip_suffix("/#") {
        (b, true)
    } else {
        (t, false)
    }
}

impl Filter {
    fn new(t: &str) -> Filter {
        let (levels, hash) = match strip_hash(t) {
            (_, true) if t == "#" => (Box::default(), true),
            (body, hash) => (split_levels(body), hash),
        };
        let wild_first = t.starts_with('+') || t.starts_with('#');
        Filter { levels, hash, never: t.is_empty(), wild_first }
    }

    /// MQTT matching of a topic name (publish types).
    fn matches(&self, q: &Query, who: &Subject) -> bool {
        if self.never || (self.wild_first && q.dollar) {
            return false;
        }
        let n = self.levels.len();
        // `a/#` also matches `a` itself, so `#` needs at least n levels.
        if q.levels.len() < n || (!self.hash && q.levels.len() != n) {
            return false;
        }
        self.levels.iter().zip(q.levels.iter()).all(|(l, t)| match l {
            Level::Plus => true,
            l => who.level_eq(l, t),
        })
    }
}

/// A subscribe/unsubscribe pattern ACL, for the "covers" rule of section 4.2
/// exactly as the plugin's `sub_acl_check` computes it.
#[derive(Debug, Clone)]
struct Pattern {
    /// The pattern is exactly `#`: covers everything, `$` topics included.
    all: bool,
    /// Levels after [`strip_hash`] (at least one).
    levels: Box<[Level]>,
    hash: bool,
}

impl Pattern {
    fn new(t: &str) -> Pattern {
        let (body, hash) = strip_hash(t);
        Pattern { all: t == "#", levels: split_levels(body), hash }
    }

    fn covers(&self, q: &Query, who: &Subject) -> bool {
        if self.all {
            return true;
        }
        if q.hash && !self.hash {
            return false;
        }
        let (p, n) = (self.levels.len(), q.levels.len());
        if p > n || (n > p && !self.hash) {
            return false;
        }
        // Levels past the pattern's are covered by its `#` (checked above).
        self.levels.iter().zip(q.levels.iter()).all(|(l, s)| match l {
            Level::Plus => true,
            l => who.level_eq(l, s),
        })
    }
}

/// The topic (publish) or requested filter (subscribe), split once per check.
struct Query<'a> {
    raw: &'a str,
    levels: SmallVec<[&'a str; 16]>,
    /// Subscribe: the requested filter ended in `#` (taken off `levels`).
    hash: bool,
    dollar: bool,
}

impl<'a> Query<'a> {
    fn new(idx: usize, raw: &'a str) -> Query<'a> {
        let (body, hash) = if idx >= 2 { strip_hash(raw) } else { (raw, false) };
        Query { raw, levels: body.split('/').collect(), hash, dollar: raw.starts_with('$') }
    }
}

#[derive(Debug, Clone)]
enum Entry {
    /// subscribeLiteral / unsubscribeLiteral: exact string comparison.
    Literal(Box<str>, bool),
    /// A literal with a `%c` or `%u` level: level by level, each level
    /// compared as text (so `+` and `#` only match themselves).
    LiteralSubst(Box<[Level]>, bool),
    /// subscribePattern / unsubscribePattern: the covers rule.
    Pattern(Pattern, bool),
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
                    let levels = split_levels(&a.topic);
                    if levels.iter().any(|l| matches!(l, Level::ClientId | Level::Username)) {
                        Entry::LiteralSubst(levels, a.allow)
                    } else {
                        Entry::Literal(a.topic.as_str().into(), a.allow)
                    }
                }
                AclType::SubscribePattern | AclType::UnsubscribePattern => {
                    Entry::Pattern(Pattern::new(&a.topic), a.allow)
                }
            };
            lists[type_index(a.acltype)].push(e);
        }
        CompiledRole { lists: lists.map(Vec::into_boxed_slice) }
    }

    fn check(&self, idx: usize, q: &Query, who: &Subject) -> Option<bool> {
        for e in self.lists[idx].iter() {
            let (hit, allow) = match e {
                Entry::Literal(t, allow) => (!t.is_empty() && **t == *q.raw, *allow),
                Entry::LiteralSubst(levels, allow) => {
                    let mut parts = q.raw.split('/');
                    let same = levels.iter().all(|l| parts.next().is_some_and(|s| who.level_eq(l, s)))
                        && parts.next().is_none();
                    (same, *allow)
                }
                Entry::Pattern(f, allow) => (f.covers(q, who), *allow),
                Entry::Publish(f, allow) => (f.matches(q, who), *allow),
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

/// FxHash (rustc's): the user-name lookup runs on every message, and SipHash
/// costs more than the rest of a typical check. Keys are user names the
/// administrator created; a lookup cannot add entries, so there is no
/// hash-flooding surface.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher(u64);

impl FxHasher {
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            self.add(u64::from_le_bytes(b));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(b));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.add(i.into());
    }
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// Source of [`Compiled::version`]: unique in the process, never 0.
static NEXT_VERSION: AtomicU64 = AtomicU64::new(1);

/// The derived decision structure of a [`Dynsec`].
pub(crate) struct Compiled {
    users: HashMap<Box<str>, RoleChain, BuildHasherDefault<FxHasher>>,
    anonymous: RoleChain,
    defaults: DefaultAccess,
    /// Identifies this structure (so the decisions it gives) in the
    /// process: every build takes a new one. The key of the decision memo.
    pub(crate) version: u64,
}

impl Default for Compiled {
    fn default() -> Compiled {
        Compiled {
            users: HashMap::default(),
            anonymous: RoleChain::default(),
            defaults: DefaultAccess::default(),
            version: NEXT_VERSION.fetch_add(1, Ordering::Relaxed),
        }
    }
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
        let mut users = HashMap::with_capacity_and_hasher(d.clients.len(), Default::default());
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
        Compiled {
            users,
            anonymous: anonymous.into_boxed_slice(),
            defaults: d.default_access,
            version: NEXT_VERSION.fetch_add(1, Ordering::Relaxed),
        }
    }

    pub(crate) fn allowed(&self, who: &Subject, username: Option<&str>, access: Access, topic: &str) -> bool {
        let chain = match username {
            Some(u) => match self.users.get(u) {
                Some(c) => c,
                None => return false,
            },
            None => &self.anonymous,
        };
        let idx = access_index(access);
        let q = Query::new(idx, topic);
        for role in chain.iter() {
            if let Some(allow) = role.check(idx, &q, who) {
                return allow;
            }
        }
        self.defaults.get(idx) && !topic.starts_with("$CONTROL")
    }
}

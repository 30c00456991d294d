//! The router: every subscription of every session (persistent or not), for
//! matching a topic to the sessions that want it.
//!
//! Owns the fast-path view of subscriptions, built on `topic::SubscriptionTree`.
//! It does not decide durability: it reports, per match, whether the target
//! session lives in State, and [`Router::route`] splits a message into fast-path
//! deliveries and the part that State must apply. It must not touch State.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::protocol::{QoS, SubscriptionOptions};
use crate::topic::SubscriptionTree;

use super::session::{Mailbox, Message};

/// What the router stores per (filter, client).
#[derive(Debug, Clone)]
pub(crate) struct SubValue {
    pub opts: SubscriptionOptions,
    pub sub_id: Option<u32>,
    pub mailbox: Arc<Mailbox>,
}

/// One fast-path copy to hand to a mailbox.
#[derive(Debug)]
pub(crate) struct Target {
    pub mailbox: Arc<Mailbox>,
    /// The mailbox's session when routed ([`Mailbox::session`]).
    pub session: u32,
    pub qos: QoS,
    pub retain_as_published: bool,
    pub sub_ids: Vec<u32>,
}

/// The result of routing one message.
#[derive(Debug, Default)]
pub(crate) struct Route {
    /// Fast-path copies (non-persistent sessions, and QoS 0 copies to online persistent ones).
    pub targets: Vec<Target>,
    /// State must apply this message: it reaches a persistent session at QoS > 0
    /// (or offline at QoS 0 with `queue_qos0_offline`).
    pub needs_state: bool,
    /// Shared-group members chosen for State to deliver to (persistent members):
    /// (client id, the member's `$share/GROUP/FILTER`).
    pub shared_targets: Vec<(String, String)>,
}

#[derive(Debug, Default)]
struct SharedGroup {
    /// (client id, subscription); order of joining.
    members: Vec<(Arc<str>, SubValue)>,
    next: AtomicUsize,
}

/// See the module docs. Wrapped in a `RwLock` by the broker: publishers read it
/// concurrently, subscribe/unsubscribe write it.
#[derive(Debug, Default)]
pub(crate) struct Router {
    tree: SubscriptionTree<Arc<str>, SubValue>,
    /// Shared subscriptions: inner filter -> group name -> members.
    shared_tree: SubscriptionTree<Arc<str>, SharedGroup>,
    count: usize,
}

/// Splits `$share/GROUP/FILTER`; `None` for a plain filter.
pub(crate) fn split_shared(filter: &str) -> Option<(&str, &str)> {
    crate::topic::parse_shared(filter)
}

impl Router {
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.count
    }

    /// Adds or replaces a subscription; returns true when it already existed.
    pub fn subscribe(&mut self, client: &Arc<str>, filter: &str, value: SubValue) -> bool {
        if let Some((group, f)) = split_shared(filter) {
            let group: Arc<str> = group.into();
            // The tree has no get_mut: take the group out, change it, put it back.
            let mut g = self.shared_tree.remove(f, &group).unwrap_or_default();
            let existed = match g.members.iter_mut().find(|(c, _)| c == client) {
                Some(m) => {
                    m.1 = value;
                    true
                }
                None => {
                    g.members.push((client.clone(), value));
                    self.count += 1;
                    false
                }
            };
            self.shared_tree.insert(f, group, g);
            existed
        } else {
            let existed = self.tree.insert(filter, client.clone(), value).is_some();
            if !existed {
                self.count += 1;
            }
            existed
        }
    }

    /// Removes a subscription; returns true when it existed.
    pub fn unsubscribe(&mut self, client: &Arc<str>, filter: &str) -> bool {
        self.remove_if(client, filter, |_| true)
    }

    /// Removes a subscription only if it routes to `mailbox`: a session that
    /// has ended must not take away a later session's subscription to the
    /// same filter (entries are keyed by client id, and a client id may have
    /// a new mailbox by now).
    pub fn unsubscribe_for(&mut self, mailbox: &Arc<Mailbox>, filter: &str) -> bool {
        self.remove_if(&mailbox.client_id, filter, |v| Arc::ptr_eq(&v.mailbox, mailbox))
    }

    fn remove_if(&mut self, client: &Arc<str>, filter: &str, owned: impl Fn(&SubValue) -> bool) -> bool {
        if let Some((group, f)) = split_shared(filter) {
            let group: Arc<str> = group.into();
            let Some(mut g) = self.shared_tree.remove(f, &group) else { return false };
            let before = g.members.len();
            g.members.retain(|(c, v)| !(c == client && owned(v)));
            let removed = g.members.len() != before;
            if !g.members.is_empty() {
                self.shared_tree.insert(f, group, g);
            }
            if removed {
                self.count -= 1;
            }
            removed
        } else {
            if !self.tree.get(filter, client).is_some_and(owned) {
                return false;
            }
            let removed = self.tree.remove(filter, client).is_some();
            if removed {
                self.count -= 1;
            }
            removed
        }
    }

    /// Routes `msg` (see [`Route`]). `queue_qos0_offline` mirrors the State limit.
    pub fn route(&self, msg: &Message, queue_qos0_offline: bool) -> Route {
        let mut route = Route::default();
        let mut filters_hit = 0usize;
        let mut last_filter: *const u8 = std::ptr::null();
        // Non-shared matches; several filters of one session may match (overlap).
        self.tree.matches(&msg.topic, |filter, _client, v| {
            if v.opts.no_local && v.mailbox.id() == msg.publisher {
                return;
            }
            if filter.as_ptr() != last_filter {
                last_filter = filter.as_ptr();
                filters_hit += 1;
            }
            route.targets.push(Target {
                session: v.mailbox.session(),
                mailbox: v.mailbox.clone(),
                qos: v.opts.qos.min(msg.qos),
                retain_as_published: v.opts.retain_as_published,
                sub_ids: v.sub_id.into_iter().collect(),
            });
        });
        if filters_hit > 1 && route.targets.len() > 1 {
            merge_overlaps(&mut route.targets);
        }
        // Decide per session: persistent sessions get QoS > 0 through State.
        route.targets.retain(|t| {
            if !t.mailbox.is_managed() {
                return true;
            }
            if t.qos > QoS::AtMostOnce {
                route.needs_state = true;
                return false;
            }
            if t.mailbox.is_online() {
                return true;
            }
            if queue_qos0_offline {
                route.needs_state = true;
            }
            false
        });
        // Shared groups: one member per group.
        self.shared_tree.matches(&msg.topic, |filter, group, g| {
            let n = g.members.len();
            if n == 0 {
                return;
            }
            // Round robin over online members; the next turn starts after the chosen one.
            let start = g.next.load(Ordering::Relaxed);
            let pick = |want: &dyn Fn(&SubValue) -> bool| {
                (0..n).map(|i| (start + i) % n).find(|&i| want(&g.members[i].1))
            };
            let Some(i) = pick(&|v| v.mailbox.is_online()).or_else(|| pick(&|v| v.mailbox.is_managed()))
            else {
                return;
            };
            g.next.store(i + 1, Ordering::Relaxed);
            let (client, v) = &g.members[i];
            let qos = v.opts.qos.min(msg.qos);
            if v.mailbox.is_managed() && (qos > QoS::AtMostOnce || !v.mailbox.is_online()) {
                if qos > QoS::AtMostOnce || queue_qos0_offline {
                    route.needs_state = true;
                    route.shared_targets.push((client.to_string(), format!("$share/{group}/{filter}")));
                }
                return;
            }
            route.targets.push(Target {
                session: v.mailbox.session(),
                mailbox: v.mailbox.clone(),
                qos,
                retain_as_published: v.opts.retain_as_published,
                sub_ids: v.sub_id.into_iter().collect(),
            });
        });
        route
    }
}

/// One copy per session: the highest QoS, every subscription identifier,
/// retain-as-published if any matching subscription asks for it.
fn merge_overlaps(targets: &mut Vec<Target>) {
    targets.sort_by_key(|t| t.mailbox.id());
    let mut out: Vec<Target> = Vec::with_capacity(targets.len());
    for t in targets.drain(..) {
        match out.last_mut() {
            Some(prev) if prev.mailbox.id() == t.mailbox.id() => {
                prev.qos = prev.qos.max(t.qos);
                prev.retain_as_published |= t.retain_as_published;
                prev.sub_ids.extend(t.sub_ids);
            }
            _ => out.push(t),
        }
    }
    *targets = out;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::PublishProperties;
    use bytes::Bytes;

    fn mb(id: &str, online: bool, managed: bool) -> Arc<Mailbox> {
        let m = Arc::new(Mailbox::new(id.into()));
        if online {
            assert!(m.attach(1).is_ok());
        }
        m.set_managed(managed);
        m
    }

    fn sub(m: &Arc<Mailbox>, qos: QoS, sub_id: Option<u32>) -> SubValue {
        SubValue { opts: SubscriptionOptions { qos, ..Default::default() }, sub_id, mailbox: m.clone() }
    }

    fn msg(topic: &str, qos: QoS, publisher: usize) -> Message {
        Message {
            topic: topic.into(),
            payload: Bytes::from_static(b"p"),
            qos,
            retain: false,
            props: PublishProperties::default(),
            expires_at_ms: 0,
            publisher,
        }
    }

    #[test]
    fn an_ended_session_removes_only_its_own_subscriptions() {
        let mut r = Router::default();
        let old = mb("x", false, false);
        let new = mb("x", true, false);
        let id = new.client_id.clone();
        for f in ["t", "$share/g/t"] {
            assert!(!r.subscribe(&id, f, sub(&new, QoS::AtMostOnce, None)));
            // The old mailbox of the same client id does not own them.
            assert!(!r.unsubscribe_for(&old, f), "{f}");
        }
        assert_eq!(r.len(), 2);
        let route = r.route(&msg("t", QoS::AtMostOnce, 0), false);
        assert_eq!(route.targets.len(), 2);
        assert!(route.targets.iter().all(|t| Arc::ptr_eq(&t.mailbox, &new)));
        for f in ["t", "$share/g/t"] {
            assert!(r.unsubscribe_for(&new, f), "{f}");
        }
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn overlapping_subscriptions_give_one_copy_with_all_ids() {
        let mut r = Router::default();
        let a = mb("a", true, false);
        let ca: Arc<str> = "a".into();
        assert!(!r.subscribe(&ca, "x/+", sub(&a, QoS::AtMostOnce, Some(1))));
        assert!(!r.subscribe(&ca, "x/#", sub(&a, QoS::ExactlyOnce, Some(2))));
        assert!(r.subscribe(&ca, "x/#", sub(&a, QoS::AtLeastOnce, Some(2))));
        assert_eq!(r.len(), 2);
        let route = r.route(&msg("x/y", QoS::ExactlyOnce, 0), false);
        assert_eq!(route.targets.len(), 1);
        assert_eq!(route.targets[0].qos, QoS::AtLeastOnce);
        let mut ids = route.targets[0].sub_ids.clone();
        ids.sort_unstable();
        assert_eq!(ids, vec![1, 2]);
        assert!(!route.needs_state);
    }

    #[test]
    fn no_local_skips_the_publisher() {
        let mut r = Router::default();
        let a = mb("a", true, false);
        let ca: Arc<str> = "a".into();
        let mut v = sub(&a, QoS::AtMostOnce, None);
        v.opts.no_local = true;
        r.subscribe(&ca, "t", v);
        assert!(r.route(&msg("t", QoS::AtMostOnce, a.id()), false).targets.is_empty());
        assert_eq!(r.route(&msg("t", QoS::AtMostOnce, 0), false).targets.len(), 1);
    }

    #[test]
    fn persistent_sessions_need_state_for_qos_above_zero() {
        let mut r = Router::default();
        let p = mb("p", true, true);
        let cp: Arc<str> = "p".into();
        r.subscribe(&cp, "t", sub(&p, QoS::AtLeastOnce, None));
        let q1 = r.route(&msg("t", QoS::AtLeastOnce, 0), false);
        assert!(q1.needs_state);
        assert!(q1.targets.is_empty());
        let q0 = r.route(&msg("t", QoS::AtMostOnce, 0), false);
        assert!(!q0.needs_state);
        assert_eq!(q0.targets.len(), 1);
        p.detach(1);
        let off = r.route(&msg("t", QoS::AtMostOnce, 0), false);
        assert!(!off.needs_state && off.targets.is_empty());
        assert!(r.route(&msg("t", QoS::AtMostOnce, 0), true).needs_state);
    }

    #[test]
    fn shared_group_round_robin_over_online_members() {
        let mut r = Router::default();
        let a = mb("a", true, false);
        let b = mb("b", true, false);
        let c = mb("c", false, false);
        for (id, m) in [("a", &a), ("b", &b), ("c", &c)] {
            let k: Arc<str> = id.into();
            r.subscribe(&k, "$share/g/t/#", sub(m, QoS::AtMostOnce, None));
        }
        let mut got = Vec::new();
        for _ in 0..4 {
            let route = r.route(&msg("t/1", QoS::AtMostOnce, 0), false);
            assert_eq!(route.targets.len(), 1);
            got.push(route.targets[0].mailbox.client_id.to_string());
        }
        assert_eq!(got.iter().filter(|x| *x == "a").count(), 2);
        assert_eq!(got.iter().filter(|x| *x == "b").count(), 2);
        assert!(r.unsubscribe(&"a".into(), "$share/g/t/#"));
        assert!(!r.unsubscribe(&"a".into(), "$share/g/t/#"));
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn shared_group_without_online_member_goes_to_persistent_member() {
        let mut r = Router::default();
        let p = mb("p", false, true);
        let k: Arc<str> = "p".into();
        r.subscribe(&k, "$share/g/t", sub(&p, QoS::AtLeastOnce, None));
        let route = r.route(&msg("t", QoS::AtLeastOnce, 0), false);
        assert!(route.needs_state);
        assert_eq!(route.shared_targets, vec![("p".to_string(), "$share/g/t".to_string())]);
    }
}

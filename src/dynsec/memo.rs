//! A per-thread memo of recent ACL decisions, behind
//! [`super::Dynsec::allowed_cached`]: the broker asks the same question many
//! times (a client publishing to a few topics; every delivery of them), and a
//! hit costs a hash of the inputs and a few string comparisons instead of a
//! role scan.
//!
//! Never changes a decision: an entry is keyed by every input of the decision
//! (the access type, user name, client id when substitution is on, topic,
//! substitution flag) and by the version of the compiled ACLs it was computed
//! from, which is unique in the process and new after every change; so a
//! change applies to the very next check, as Mosquitto's uncached plugin
//! does. Direct-mapped, fixed size, strings reused: no allocation once warm,
//! and long inputs bypass it, so its memory stays bounded.
//!
//! Also owns the process-wide ACL epoch ([`acl_epoch`]): a counter bumped
//! after every change of any published dynamic-security state, so callers
//! that remember their own last decision (a connection publishing to one
//! topic, `auth::LastDecision`) know when to ask again without loading the
//! state at all.

use std::cell::RefCell;
use std::hash::Hasher;
use std::sync::atomic::{AtomicU64, Ordering};

use super::acl::FxHasher;

static ACL_EPOCH: AtomicU64 = AtomicU64::new(1);

/// The current ACL epoch. A decision computed after reading epoch `e` may be
/// reused for the same inputs while `acl_epoch()` still returns `e`.
pub fn acl_epoch() -> u64 {
    // Acquire pairs with the Release in `acl_changed`: whoever sees the new
    // epoch then sees the new state.
    ACL_EPOCH.load(Ordering::Acquire)
}

/// Called after a new dynamic-security state is published (stored where
/// readers load it): every remembered decision is stale from now on.
pub fn acl_changed() {
    ACL_EPOCH.fetch_add(1, Ordering::Release);
}

/// Entries per thread (a power of two: the slot is the hash's top bits).
const SLOTS: usize = 128;
const SLOT_BITS: u32 = SLOTS.trailing_zeros();
/// Inputs longer than this are not remembered (memory stays bounded).
const MAX_LEN: usize = 256;

#[derive(Default)]
struct Slot {
    /// 0 = empty (versions start at 1).
    version: u64,
    /// Access index, substitution flag and "has a user name", packed.
    kind: u8,
    allowed: bool,
    username: String,
    client_id: String,
    topic: String,
}

thread_local! {
    static MEMO: RefCell<Box<[Slot]>> = RefCell::new((0..SLOTS).map(|_| Slot::default()).collect());
}

/// The decision for these inputs: remembered, or `compute()` (then remembered).
pub(crate) fn cached(
    version: u64,
    access: usize,
    substitute: bool,
    client_id: &str,
    username: Option<&str>,
    topic: &str,
    compute: impl FnOnce() -> bool,
) -> bool {
    // Without substitution the client id plays no part in the decision.
    let client_id = if substitute { client_id } else { "" };
    let user = username.unwrap_or("");
    if topic.len() > MAX_LEN || user.len() > MAX_LEN || client_id.len() > MAX_LEN {
        return compute();
    }
    let kind = (access as u8) | (u8::from(substitute) << 3) | (u8::from(username.is_some()) << 4);
    let mut h = FxHasher::default();
    h.write(topic.as_bytes());
    h.write_u8(kind);
    h.write(user.as_bytes());
    h.write_u8(0xff);
    h.write(client_id.as_bytes());
    let idx = (h.finish() >> (64 - SLOT_BITS)) as usize;
    MEMO.with(|memo| {
        let Ok(mut memo) = memo.try_borrow_mut() else { return compute() };
        let Some(slot) = memo.get_mut(idx) else { return compute() };
        if slot.version == version
            && slot.kind == kind
            && slot.topic == topic
            && slot.username == user
            && slot.client_id == client_id
        {
            return slot.allowed;
        }
        let allowed = compute();
        slot.version = version;
        slot.kind = kind;
        slot.allowed = allowed;
        for (field, value) in
            [(&mut slot.topic, topic), (&mut slot.username, user), (&mut slot.client_id, client_id)]
        {
            field.clear();
            field.push_str(value);
        }
        allowed
    })
}

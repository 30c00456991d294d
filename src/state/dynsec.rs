//! The dynamic-security part of [`State`]: applying `DynsecControl` and
//! `DynsecSet`, and the lock-free view the authenticator reads.
//!
//! The [`Dynsec`] value is immutable once published: apply clones it, changes
//! the clone and swaps it in (copy on write), so a connection checking an ACL
//! never waits for apply and never sees half a change.

use std::sync::Arc;

use arc_swap::ArcSwapOption;

use super::{pb, Applied, Event, State, StateError};
use crate::dynsec::Dynsec;

/// The dynamic-security state as the authenticator reads it; `None` until
/// `raftmq ctl dynsec init` (or an import) initialises it. Clones share one
/// slot. Every store bumps the process-wide ACL epoch
/// ([`crate::dynsec::acl_epoch`]) after the new value is visible, so
/// decisions remembered by connections are asked again.
#[derive(Clone, Default)]
pub struct DynsecView(Arc<ArcSwapOption<Dynsec>>);

impl DynsecView {
    /// The current state (cheap: no reference count change).
    pub fn load(&self) -> arc_swap::Guard<Option<Arc<Dynsec>>> {
        self.0.load()
    }

    pub fn load_full(&self) -> Option<Arc<Dynsec>> {
        self.0.load_full()
    }

    /// Publishes `value` to every reader, then bumps the ACL epoch.
    pub fn store(&self, value: Option<Arc<Dynsec>>) {
        self.0.store(value);
        crate::dynsec::acl_changed();
    }
}

impl std::fmt::Debug for DynsecView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("DynsecView").field(&self.0.load().is_some()).finish()
    }
}

/// The error text answered for every command while dynamic security is not
/// initialised.
pub const NOT_INITIALISED: &str = "Dynamic security is not initialised (run raftmq ctl dynsec init)";

impl State {
    /// The view shared with the authenticator: it follows every change,
    /// including a snapshot installed with [`State::adopt_dynsec_view`].
    pub fn dynsec_view(&self) -> DynsecView {
        self.dynsec.clone()
    }

    /// The current dynamic-security state, if initialised.
    pub fn dynsec(&self) -> Option<Arc<Dynsec>> {
        self.dynsec.load_full()
    }

    /// Makes `view` (the one readers already hold) carry this State's
    /// dynamic-security state from now on. Used when a snapshot replaces the
    /// State wholesale.
    pub fn adopt_dynsec_view(&mut self, view: DynsecView) {
        view.store(self.dynsec.load_full());
        self.dynsec = view;
    }

    pub(super) fn dynsec_control(&mut self, c: &pb::DynsecControl, out: &mut Applied) {
        let Some(current) = self.dynsec.load_full() else {
            out.dynsec_response = Some(unavailable_response(&c.request, NOT_INITIALISED));
            return;
        };
        let mut next = (*current).clone();
        let outcome = next.apply_control(&c.request);
        if outcome.changed {
            self.dynsec.store(Some(Arc::new(next)));
        }
        if !outcome.kicks.usernames.is_empty() || outcome.kicks.anonymous {
            out.events.push(Event::DynsecKick { kicks: outcome.kicks });
        }
        out.dynsec_response = Some(outcome.response);
    }

    pub(super) fn dynsec_set(&mut self, c: &pb::DynsecSet, out: &mut Applied) -> Result<(), StateError> {
        let p = c.state.as_ref().ok_or(StateError::MissingField("state"))?;
        let d = Dynsec::from_proto(p).map_err(|e| StateError::InvalidDynsec(e.to_string()))?;
        let initialised = self.dynsec.load().is_some();
        out.existed.push(initialised);
        if c.only_if_uninitialised && initialised {
            return Ok(());
        }
        self.dynsec.store(Some(Arc::new(d)));
        Ok(())
    }
}

/// A response document answering every command of `request` with `error`
/// (names and correlationData echoed), in the shape of the control API, for
/// requests that cannot be executed at all. Mirrors the envelope errors of
/// the control API for payloads that are not a command list.
pub fn unavailable_response(request: &[u8], error: &str) -> Vec<u8> {
    use serde_json::{json, Map, Value};
    let one = |command: &str| json!({"command": command, "error": error});
    let responses: Vec<Value> = match serde_json::from_slice::<Value>(request) {
        Ok(Value::Object(doc)) => {
            let commands = doc.iter().find(|(k, _)| k.eq_ignore_ascii_case("commands")).map(|(_, v)| v);
            match commands {
                Some(Value::Array(cmds)) => cmds
                    .iter()
                    .map(|c| {
                        let Value::Object(o) = c else { return one("Unknown command") };
                        let get =
                            |key: &str| o.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v);
                        let name = get("command").and_then(Value::as_str).unwrap_or("Unknown command");
                        let mut r = Map::new();
                        r.insert("command".into(), Value::from(name));
                        r.insert("error".into(), Value::from(error));
                        if let Some(Value::String(cd)) = get("correlationData") {
                            r.insert("correlationData".into(), Value::from(cd.as_str()));
                        }
                        Value::Object(r)
                    })
                    .collect(),
                _ => vec![one("Unknown command")],
            }
        }
        _ => vec![one("Unknown command")],
    };
    serde_json::to_vec(&json!({ "responses": responses })).unwrap_or_default()
}

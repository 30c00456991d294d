//! Dynamic security compatible with Mosquitto's plugin (spec:
//! ../shared/spec/dynsec.md): the model (clients, groups, roles, ACLs, default
//! access, anonymous group), the `$CONTROL/dynamic-security/v1` commands with
//! Mosquitto's JSON shapes and error texts, authentication (PBKDF2-SHA512
//! hashes as Mosquitto writes them), ACL decisions, and the
//! `dynamic-security.json` file format.
//!
//! Owns: [`Dynsec`] and everything in it. Deterministic: [`Dynsec::apply_control`]
//! reads no clock and no randomness (passwords are hashed beforehand by
//! [`prepare_request`] on the node that received the request), iterates ordered
//! collections only, so every replica that applies the same prepared requests
//! holds the same state.
//!
//! Must not touch: sockets, the broker, the Raft log. `state::State` holds a
//! `Dynsec` and applies replicated commands to it; the broker asks it for
//! decisions through the authenticator.
//!
//! Layout: `model` (the types and their ordering rules), `commands` (the
//! control API and [`prepare_request`]), `acl` (the derived decision
//! structure behind [`Dynsec::allowed`]), `memo` (a per-thread memo of
//! recent decisions, keyed by the compiled structure's version), `hash` (PBKDF2), `file` (Mosquitto's
//! JSON file, `dynsec init`, protobuf, merge), `json` (an order-keeping JSON
//! value with cJSON's case-insensitive lookup).
//!
//! Passwords in prepared requests: [`prepare_request`] replaces every value of
//! a `password` key (any case) of createClient, setClientPassword and
//! modifyClient by `{"pbkdf2Sha512":B64,"salt":B64,"iterations":101,"empty":B}`
//! when it was a string, and by `null` otherwise (so a client cannot pass a
//! ready-made hash). Apply accepts only that object; a plain string reaching
//! apply (a request that skipped prepare) is treated like a non-string
//! password ("Invalid/missing password"; ignored by modifyClient).

pub mod pb {
    //! Generated from proto/dynsec.proto.
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/raftmq.dynsec.rs"));
}

mod acl;
pub mod bench;
mod commands;
mod file;
mod hash;
mod json;
mod memo;
pub mod model;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

pub use hash::{HASH_LEN, ITERATIONS, SALT_LEN};
pub use memo::{acl_changed, acl_epoch};
pub use model::{Acl, AclType, Client, DefaultAccess, Group, Role};

/// The request topic of the control API.
pub const CONTROL_TOPIC: &str = "$CONTROL/dynamic-security/v1";
/// Where responses are published (QoS 0, not retained, to every subscriber
/// allowed to receive them).
pub const RESPONSE_TOPIC: &str = "$CONTROL/dynamic-security/v1/response";

/// The four access types a decision is asked for (the generic types of
/// `defaultACLAccess`; subscribe/unsubscribe consult the literal and pattern
/// ACL types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    PublishClientSend,
    PublishClientReceive,
    Subscribe,
    Unsubscribe,
}

/// Errors loading state (snapshot, backup, dynamic-security.json).
#[derive(thiserror::Error, Debug)]
pub enum DynsecError {
    #[error("invalid dynamic-security JSON: {0}")]
    Json(String),
    #[error("invalid dynamic-security state: {0}")]
    Invalid(String),
}

/// A stored password: PBKDF2-HMAC-SHA512, 64-byte hash, 12-byte salt.
/// (`new`, `verify` and the Base64 helpers are in `hash.rs`.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordHash {
    pub hash: Vec<u8>,
    pub salt: Vec<u8>,
    pub iterations: u32,
}

/// Who must be disconnected after a command (spec section 5).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Kicks {
    pub usernames: BTreeSet<String>,
    /// Every client without a user name.
    pub anonymous: bool,
}

/// The result of applying one control request message.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ControlOutcome {
    /// The response document `{"responses":[...]}` to publish on
    /// [`RESPONSE_TOPIC`].
    pub response: Vec<u8>,
    pub kicks: Kicks,
    /// Whether the state changed.
    pub changed: bool,
}

/// The dynamic-security state. See the module docs.
///
/// Invariants: every role/group name referenced by a client or group exists;
/// `Group::clients` mirrors `Client::groups`; `compiled` is derived from the
/// rest (rebuilt after every change, never serialized, not part of equality).
#[derive(Debug, Clone, Default)]
pub struct Dynsec {
    clients: BTreeMap<String, Client>,
    groups: BTreeMap<String, Group>,
    roles: BTreeMap<String, Role>,
    default_access: DefaultAccess,
    anonymous_group: Option<String>,
    compiled: Arc<acl::Compiled>,
}

impl PartialEq for Dynsec {
    fn eq(&self, o: &Dynsec) -> bool {
        self.clients == o.clients
            && self.groups == o.groups
            && self.roles == o.roles
            && self.default_access == o.default_access
            && self.anonymous_group == o.anonymous_group
    }
}

impl Dynsec {
    /// What `mosquitto_ctrl dynsec init FILE admin` writes: the admin client
    /// with role `admin` and its ACLs, and the default access of init.
    pub fn initial(admin: &str, password: PasswordHash) -> Dynsec {
        Dynsec::initial_impl(admin, password)
    }

    /// CONNECT of a client with a user name: enabled, client id binding, and
    /// password (in that order). `false` = MQTT 5 0x87 / 3.1.1 code 5.
    pub fn authenticate(&self, username: &str, password: Option<&[u8]>, client_id: &str) -> bool {
        let Some(c) = self.clients.get(username) else { return false };
        if c.disabled {
            return false;
        }
        if c.clientid.as_deref().is_some_and(|id| id != client_id) {
            return false;
        }
        match (&c.password, password) {
            // An empty password never logs in, even when the stored hash is
            // that of "" (createClient with "password":""): observed on
            // Mosquitto 2.0.11 with a raw CONNECT.
            (Some(hash), Some(pw)) if !pw.is_empty() => hash.verify(pw),
            _ => false, // no password set, or none given: cannot log in
        }
    }

    /// The ACL decision for a client (`None` = anonymous) on `topic` (a topic
    /// name for publish types, a filter for subscribe/unsubscribe). Fast: it
    /// runs on every PUBLISH and every delivery.
    pub fn allowed(&self, username: Option<&str>, access: Access, topic: &str) -> bool {
        self.compiled.allowed(&acl::Subject::LITERAL, username, access, topic)
    }

    /// [`Dynsec::allowed`] for the client `client_id`. With `substitute`
    /// (`[dynsec] acl_substitution`, as Mosquitto after 2.0.11 does), an ACL
    /// topic level that is exactly `%c` stands for the client id and `%u` for
    /// the user name, in ACLs of every type; a client id or user name holding
    /// `+`, `#` or `/` never matches such a level, and `%u` never matches for
    /// an anonymous client. Without it, the same decision as `allowed`
    /// (Mosquitto 2.0.11: `%c` / `%u` are literal text).
    pub fn allowed_client(
        &self,
        client_id: &str,
        username: Option<&str>,
        access: Access,
        topic: &str,
        substitute: bool,
    ) -> bool {
        let who = acl::Subject::new(substitute, client_id, username);
        self.compiled.allowed(&who, username, access, topic)
    }

    /// [`Dynsec::allowed_client`] through a per-thread memo of recent
    /// decisions (`memo.rs`), keyed by every input and by the version of the
    /// compiled ACLs: the same decision, a change applies at once, and a
    /// repeated question (every PUBLISH of a client to its topics, every
    /// delivery of them) skips the role scan. What the broker calls.
    pub fn allowed_cached(
        &self,
        client_id: &str,
        username: Option<&str>,
        access: Access,
        topic: &str,
        substitute: bool,
    ) -> bool {
        let idx = acl::access_index(access);
        memo::cached(self.compiled.version, idx, substitute, client_id, username, topic, || {
            self.allowed_client(client_id, username, access, topic, substitute)
        })
    }

    /// Applies one prepared control request (see [`prepare_request`]).
    pub fn apply_control(&mut self, prepared: &[u8]) -> ControlOutcome {
        self.apply_control_impl(prepared)
    }

    pub fn to_proto(&self) -> pb::DynsecState {
        self.to_proto_impl()
    }

    pub fn from_proto(p: &pb::DynsecState) -> Result<Dynsec, DynsecError> {
        Dynsec::from_proto_impl(p)
    }

    /// Reads Mosquitto's `dynamic-security.json` (hashes carried over).
    pub fn from_mosquitto_json(bytes: &[u8]) -> Result<Dynsec, DynsecError> {
        Dynsec::from_mosquitto_json_impl(bytes)
    }

    /// Writes Mosquitto's `dynamic-security.json`.
    pub fn to_mosquitto_json(&self) -> Vec<u8> {
        self.to_mosquitto_json_impl()
    }

    /// Live restore (merge) of a backup: adds the clients, groups and roles of
    /// `other` that do not exist here; existing entries are kept unchanged.
    /// Returns how many entries were added. (Membership rules: see `file.rs`.)
    pub fn merge_keep_existing(&mut self, other: &Dynsec) -> usize {
        self.merge_impl(other)
    }

    /// Clients by user name.
    pub fn clients(&self) -> &BTreeMap<String, Client> {
        &self.clients
    }

    /// Groups by name.
    pub fn groups(&self) -> &BTreeMap<String, Group> {
        &self.groups
    }

    /// Roles by name.
    pub fn roles(&self) -> &BTreeMap<String, Role> {
        &self.roles
    }

    pub fn default_access(&self) -> DefaultAccess {
        self.default_access
    }

    pub fn anonymous_group(&self) -> Option<&str> {
        self.anonymous_group.as_deref()
    }

    /// Whether there is nothing configured (no clients, groups or roles).
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty() && self.groups.is_empty() && self.roles.is_empty()
    }

    /// Recomputes the derived decision structure.
    fn rebuild(&mut self) {
        self.compiled = Arc::new(acl::Compiled::build(self));
    }
}

/// Turns a control request payload, as a client sent it, into the form that
/// is replicated and given to [`Dynsec::apply_control`]: every plaintext
/// password is replaced by its hash (fresh random salt). Runs once, on the
/// node that received the request; never inside apply.
pub fn prepare_request(payload: &[u8]) -> Vec<u8> {
    commands::prepare(payload)
}

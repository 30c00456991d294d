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

pub mod pb {
    //! Generated from proto/dynsec.proto.
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/raftmq.dynsec.rs"));
}

use std::collections::BTreeSet;

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordHash {
    pub hash: Vec<u8>,
    pub salt: Vec<u8>,
    pub iterations: u32,
}

impl PasswordHash {
    /// Hashes `password` with a fresh random salt and 101 iterations, as the
    /// plugin does.
    pub fn new(_password: &[u8]) -> PasswordHash {
        todo!("dynsec helper")
    }

    /// Constant-time check of `password` against this hash.
    pub fn verify(&self, _password: &[u8]) -> bool {
        todo!("dynsec helper")
    }
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
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dynsec {}

impl Dynsec {
    /// What `mosquitto_ctrl dynsec init FILE admin` writes: the admin client
    /// with role `admin` and its ACLs, and the default access of init.
    pub fn initial(_admin: &str, _password: PasswordHash) -> Dynsec {
        todo!("dynsec helper")
    }

    /// CONNECT of a client with a user name: enabled, client id binding, and
    /// password (in that order). `false` = MQTT 5 0x87 / 3.1.1 code 5.
    pub fn authenticate(&self, _username: &str, _password: Option<&[u8]>, _client_id: &str) -> bool {
        todo!("dynsec helper")
    }

    /// The ACL decision for a client (`None` = anonymous) on `topic` (a topic
    /// name for publish types, a filter for subscribe/unsubscribe). Fast: it
    /// runs on every PUBLISH and every delivery.
    pub fn allowed(&self, _username: Option<&str>, _access: Access, _topic: &str) -> bool {
        todo!("dynsec helper")
    }

    /// Applies one prepared control request (see [`prepare_request`]).
    pub fn apply_control(&mut self, _prepared: &[u8]) -> ControlOutcome {
        todo!("dynsec helper")
    }

    pub fn to_proto(&self) -> pb::DynsecState {
        todo!("dynsec helper")
    }

    pub fn from_proto(_p: &pb::DynsecState) -> Result<Dynsec, DynsecError> {
        todo!("dynsec helper")
    }

    /// Reads Mosquitto's `dynamic-security.json` (hashes carried over).
    pub fn from_mosquitto_json(_bytes: &[u8]) -> Result<Dynsec, DynsecError> {
        todo!("dynsec helper")
    }

    /// Writes Mosquitto's `dynamic-security.json`.
    pub fn to_mosquitto_json(&self) -> Vec<u8> {
        todo!("dynsec helper")
    }

    /// Live restore (merge) of a backup: adds the clients, groups and roles of
    /// `other` that do not exist here; existing entries are kept unchanged.
    /// Returns how many entries were added.
    pub fn merge_keep_existing(&mut self, _other: &Dynsec) -> usize {
        todo!("dynsec helper")
    }
}

/// Turns a control request payload, as a client sent it, into the form that
/// is replicated and given to [`Dynsec::apply_control`]: every plaintext
/// password is replaced by its hash (fresh random salt). Runs once, on the
/// node that received the request; never inside apply.
pub fn prepare_request(_payload: &[u8]) -> Vec<u8> {
    todo!("dynsec helper")
}

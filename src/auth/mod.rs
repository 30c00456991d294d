//! Authentication and authorization hook called by the broker.
//!
//! Owns: the [`Authenticator`] trait (the single hook the broker calls on CONNECT
//! and, for authorization, on PUBLISH / SUBSCRIBE / delivery), the default
//! authenticator built from the `[mqtt]` keys `allow_anonymous` and
//! `password_file`, and the Mosquitto `mosquitto_passwd` password file format
//! (see [`passwd`]).
//!
//! Must not touch: sockets, the broker's sessions or the replicated state
//! (dynamic security is read through the lock-free view the state publishes;
//! see [`dynsec`]). The broker only ever sees `Arc<dyn Authenticator>`.

pub mod dynsec;
mod last_decision;
pub mod passwd;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

pub use dynsec::{DynsecAuthenticator, DynsecConfig};
pub use last_decision::LastDecision;
pub use passwd::{constant_time_eq, hash_password_pbkdf2, PasswordFile, PasswordHash};

/// What the broker knows about a client when it asks [`Authenticator::authenticate`].
#[derive(Debug, Clone, Copy)]
pub struct AuthRequest<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    /// Raw bytes of the MQTT password field.
    pub password: Option<&'a [u8]>,
    pub peer: SocketAddr,
}

/// The outcome of authentication, mapped by the broker onto CONNACK codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthDecision {
    Allow,
    /// MQTT 5 reason 0x86 "Bad User Name or Password"; MQTT 3.1.1 return code 4.
    BadCredentials,
    /// MQTT 5 reason 0x87 "Not authorized"; MQTT 3.1.1 return code 5.
    NotAuthorized,
}

impl AuthDecision {
    /// MQTT 5 CONNACK reason code (0x00 for `Allow`).
    pub fn reason_code(self) -> u8 {
        match self {
            AuthDecision::Allow => 0x00,
            AuthDecision::BadCredentials => 0x86,
            AuthDecision::NotAuthorized => 0x87,
        }
    }

    /// MQTT 3.1.1 CONNACK return code (0 for `Allow`).
    pub fn v311_return_code(self) -> u8 {
        match self {
            AuthDecision::Allow => 0,
            AuthDecision::BadCredentials => 4,
            AuthDecision::NotAuthorized => 5,
        }
    }
}

/// The hook the broker calls. Implementations must be cheap and non-blocking:
/// they run on the connection task (no I/O; load files at start-up).
pub trait Authenticator: Send + Sync + 'static {
    /// Called once per CONNECT, before the session is opened.
    fn authenticate(&self, req: &AuthRequest<'_>) -> AuthDecision;

    /// May this client publish to `topic`? Default: yes.
    fn can_publish(&self, _client_id: &str, _username: Option<&str>, _topic: &str) -> bool {
        true
    }

    /// May this client subscribe to `filter`? Default: yes.
    fn can_subscribe(&self, _client_id: &str, _username: Option<&str>, _filter: &str) -> bool {
        true
    }

    /// May this client unsubscribe from `filter`? Default: yes.
    fn can_unsubscribe(&self, _client_id: &str, _username: Option<&str>, _filter: &str) -> bool {
        true
    }

    /// May a message on `topic` be delivered to this client? Default: yes.
    fn can_receive(&self, _client_id: &str, _username: Option<&str>, _topic: &str) -> bool {
        true
    }

    /// A counter that only grows and changes whenever any `can_*` answer may
    /// change. While it returns the same value, a caller may reuse an answer
    /// for the same inputs ([`LastDecision`]); read it *before* asking.
    /// `None` (the default): answers may change at any time, never reuse one.
    fn decision_epoch(&self) -> Option<u64> {
        None
    }
}

/// Errors while building an authenticator at start-up.
#[derive(thiserror::Error, Debug)]
pub enum AuthError {
    #[error("cannot read password file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("password file {path}, line {line}: {reason}")]
    BadLine { path: PathBuf, line: usize, reason: String },
    #[error("{0}")]
    Config(String),
}

/// The authentication keys of the `[mqtt]` section. No `deny_unknown_fields`: the
/// configuration may `#[serde(flatten)]` this into its `[mqtt]` struct.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct AuthConfig {
    /// Clients without a user name may connect.
    pub allow_anonymous: bool,
    /// Optional Mosquitto `mosquitto_passwd` file.
    pub password_file: Option<PathBuf>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig { allow_anonymous: true, password_file: None }
    }
}

/// Builds the authenticator for `cfg`: loads and checks the password file (a bad
/// line refuses start-up).
pub fn from_config(cfg: &AuthConfig) -> Result<Arc<dyn Authenticator>, AuthError> {
    let passwords = match &cfg.password_file {
        Some(path) => Some(PasswordFile::load(path)?),
        None => None,
    };
    Ok(Arc::new(StaticAuthenticator { allow_anonymous: cfg.allow_anonymous, passwords }))
}

/// The authenticator of a single node without dynamic security: anonymous access
/// per `allow_anonymous`, named users checked against the password file.
#[derive(Debug)]
pub struct StaticAuthenticator {
    allow_anonymous: bool,
    passwords: Option<PasswordFile>,
}

impl StaticAuthenticator {
    pub fn new(allow_anonymous: bool, passwords: Option<PasswordFile>) -> Self {
        StaticAuthenticator { allow_anonymous, passwords }
    }
}

impl Authenticator for StaticAuthenticator {
    fn authenticate(&self, req: &AuthRequest<'_>) -> AuthDecision {
        let Some(username) = req.username else {
            // Mosquitto 2 semantics: anonymous means "no user name"; a password without a
            // user name is refused by the codec already (MQTT 3.1.1) or is meaningless.
            return if self.allow_anonymous { AuthDecision::Allow } else { AuthDecision::NotAuthorized };
        };
        match &self.passwords {
            Some(file) => {
                if file.verify(username, req.password.unwrap_or_default()) {
                    AuthDecision::Allow
                } else {
                    AuthDecision::BadCredentials
                }
            }
            // No password file: a user name is just a label, as in Mosquitto; access then
            // depends on allow_anonymous only.
            None => {
                if self.allow_anonymous {
                    AuthDecision::Allow
                } else {
                    AuthDecision::NotAuthorized
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;

//! The authenticator in front of dynamic security: once the replicated
//! dynamic-security state is initialised it decides every CONNECT and every
//! publish, subscribe, unsubscribe and delivery (Mosquitto's plugin rules,
//! src/dynsec); before that, the static authenticator of the configuration
//! (`allow_anonymous`, `password_file`) decides.
//!
//! Reads the state through a lock-free view (`arc_swap`) that apply replaces
//! on every change, so a decision never waits for the state machine and a
//! change applies to the very next operation on every connection. Decisions
//! go through `Dynsec::allowed_cached` (a per-thread memo keyed by the ACL
//! version, so the same decisions at a fraction of the cost when a client
//! repeats a topic). Its `decision_epoch` is the process-wide ACL epoch that
//! every published change bumps (`DynsecView::store`), so connections may
//! keep their last answer ([`super::LastDecision`]) until the rules change.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use super::{AuthDecision, AuthRequest, Authenticator};
use crate::dynsec::{Access, Dynsec};
use crate::state::DynsecView;

/// The `[dynsec]` section: bootstrap of dynamic security from the
/// configuration, the alternative to `raftmq ctl dynsec init`. Used once:
/// when the cluster has no dynamic-security state, the leader creates this
/// admin (role `admin`, as `mosquitto_ctrl dynsec init` does); afterwards the
/// keys change nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DynsecConfig {
    /// User name of the first admin.
    pub init_admin: Option<String>,
    /// Its password (prefer `RAFTMQ_DYNSEC__INIT_PASSWORD` or a file).
    pub init_password: Option<String>,
    /// A file whose first line is the password.
    pub init_password_file: Option<PathBuf>,
    /// `%c` / `%u` in ACL topics: `false` (the default) matches them
    /// literally, as Mosquitto 2.0.11 does; `true` substitutes the client id
    /// and user name for a level that is exactly `%c` / `%u`, as later
    /// Mosquitto versions do. A node setting, not replicated: give every node
    /// the same value.
    pub acl_substitution: bool,
}

impl DynsecConfig {
    /// The admin and password to bootstrap with, if configured.
    pub fn init_admin(&self) -> Result<Option<(String, String)>, super::AuthError> {
        let Some(admin) = self.init_admin.clone().filter(|a| !a.is_empty()) else { return Ok(None) };
        let password = match (&self.init_password, &self.init_password_file) {
            (Some(p), _) => p.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|source| super::AuthError::Read { path: path.clone(), source })?
                .lines()
                .next()
                .unwrap_or_default()
                .to_string(),
            (None, None) => String::new(),
        };
        if password.is_empty() {
            return Err(super::AuthError::Config(
                "[dynsec] init_admin needs init_password, RAFTMQ_DYNSEC__INIT_PASSWORD or init_password_file"
                    .into(),
            ));
        }
        Ok(Some((admin, password)))
    }
}

/// See the module docs.
pub struct DynsecAuthenticator {
    fallback: Arc<dyn Authenticator>,
    view: DynsecView,
    allow_anonymous: bool,
    acl_substitution: bool,
}

impl DynsecAuthenticator {
    /// `view` is the replicated state's (`State::dynsec_view`); `fallback`
    /// decides while it is `None`. `allow_anonymous` admits clients without a
    /// user name under dynamic security (their rights come from the anonymous
    /// group and the default access), as Mosquitto's listener option does.
    pub fn new(
        fallback: Arc<dyn Authenticator>,
        view: DynsecView,
        allow_anonymous: bool,
    ) -> DynsecAuthenticator {
        DynsecAuthenticator { fallback, view, allow_anonymous, acl_substitution: false }
    }

    /// Sets `[dynsec] acl_substitution` (see [`DynsecConfig`]).
    pub fn with_acl_substitution(mut self, on: bool) -> DynsecAuthenticator {
        self.acl_substitution = on;
        self
    }

    fn allowed(
        &self,
        d: &Dynsec,
        client_id: &str,
        username: Option<&str>,
        access: Access,
        topic: &str,
    ) -> bool {
        d.allowed_cached(client_id, username, access, topic, self.acl_substitution)
    }
}

/// Mosquitto's broker rules that come before any plugin: clients never
/// publish to `$SYS` (but for the bridge state topic) nor to `$share`.
fn broker_denies_publish(topic: &str) -> bool {
    if let Some(rest) = topic.strip_prefix("$SYS/") {
        let bridge_state = rest
            .strip_prefix("broker/connection/")
            .and_then(|r| r.strip_suffix("/state"))
            .is_some_and(|name| !name.is_empty() && !name.contains('/'));
        return !bridge_state;
    }
    topic.starts_with("$share/")
}

impl Authenticator for DynsecAuthenticator {
    fn decision_epoch(&self) -> Option<u64> {
        if self.view.load().is_none() {
            return self.fallback.decision_epoch();
        }
        // Every published change bumps it (after the change is visible), so
        // an answer computed after reading it holds until it moves.
        Some(crate::dynsec::acl_epoch())
    }

    fn authenticate(&self, req: &AuthRequest<'_>) -> AuthDecision {
        let guard = self.view.load();
        let Some(d) = guard.as_ref() else { return self.fallback.authenticate(req) };
        let allowed = match req.username {
            None => self.allow_anonymous,
            Some(username) => d.authenticate(username, req.password, req.client_id),
        };
        // Mosquitto answers every refusal under dynamic security with "not
        // authorized" (0x87 / 3.1.1 code 5), never "bad user name or password".
        if allowed {
            AuthDecision::Allow
        } else {
            AuthDecision::NotAuthorized
        }
    }

    fn can_publish(&self, client_id: &str, username: Option<&str>, topic: &str) -> bool {
        let guard = self.view.load();
        let Some(d) = guard.as_ref() else { return self.fallback.can_publish(client_id, username, topic) };
        !broker_denies_publish(topic)
            && self.allowed(d, client_id, username, Access::PublishClientSend, topic)
    }

    fn can_subscribe(&self, client_id: &str, username: Option<&str>, filter: &str) -> bool {
        let guard = self.view.load();
        let Some(d) = guard.as_ref() else { return self.fallback.can_subscribe(client_id, username, filter) };
        self.allowed(d, client_id, username, Access::Subscribe, filter)
    }

    fn can_unsubscribe(&self, client_id: &str, username: Option<&str>, filter: &str) -> bool {
        let guard = self.view.load();
        let Some(d) = guard.as_ref() else {
            return self.fallback.can_unsubscribe(client_id, username, filter);
        };
        self.allowed(d, client_id, username, Access::Unsubscribe, filter)
    }

    fn can_receive(&self, client_id: &str, username: Option<&str>, topic: &str) -> bool {
        let guard = self.view.load();
        let Some(d) = guard.as_ref() else { return self.fallback.can_receive(client_id, username, topic) };
        self.allowed(d, client_id, username, Access::PublishClientReceive, topic)
    }
}

#[cfg(test)]
mod tests {
    use super::broker_denies_publish;

    #[test]
    fn broker_rules_before_dynsec() {
        assert!(broker_denies_publish("$SYS/broker/uptime"));
        assert!(!broker_denies_publish("$SYS/broker/connection/bridge1/state"));
        assert!(broker_denies_publish("$SYS/broker/connection/a/b/state"));
        assert!(broker_denies_publish("$share/g/t"));
        assert!(!broker_denies_publish("a/b"));
        assert!(!broker_denies_publish("$CONTROL/dynamic-security/v1"));
    }
}

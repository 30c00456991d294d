//! The dynamic-security model: clients, groups, roles and their ACLs, kept in
//! ordered collections so iteration (and so every response and encoding) is
//! deterministic.

use std::collections::{BTreeMap, BTreeSet};

use super::PasswordHash;

/// Priority of a role or group membership when none is given.
pub const DEFAULT_PRIORITY: i32 = -1;

/// The six ACL types a role can hold, in the order Mosquitto lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AclType {
    PublishClientSend,
    PublishClientReceive,
    SubscribeLiteral,
    SubscribePattern,
    UnsubscribeLiteral,
    UnsubscribePattern,
}

impl AclType {
    pub const ALL: [AclType; 6] = [
        AclType::PublishClientSend,
        AclType::PublishClientReceive,
        AclType::SubscribeLiteral,
        AclType::SubscribePattern,
        AclType::UnsubscribeLiteral,
        AclType::UnsubscribePattern,
    ];

    /// The canonical camelCase name.
    pub fn name(self) -> &'static str {
        match self {
            AclType::PublishClientSend => "publishClientSend",
            AclType::PublishClientReceive => "publishClientReceive",
            AclType::SubscribeLiteral => "subscribeLiteral",
            AclType::SubscribePattern => "subscribePattern",
            AclType::UnsubscribeLiteral => "unsubscribeLiteral",
            AclType::UnsubscribePattern => "unsubscribePattern",
        }
    }

    /// Case-insensitive parse of a role ACL type (not the generic
    /// `subscribe`/`unsubscribe` of default access).
    pub fn parse(s: &str) -> Option<AclType> {
        AclType::ALL.into_iter().find(|t| t.name().eq_ignore_ascii_case(s))
    }
}

/// One ACL of a role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    pub acltype: AclType,
    pub topic: String,
    pub priority: i32,
    pub allow: bool,
}

/// A dynsec client (a user name that can log in).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Client {
    /// `None`: created without a password, cannot log in.
    pub password: Option<PasswordHash>,
    pub clientid: Option<String>,
    pub textname: Option<String>,
    pub textdescription: Option<String>,
    pub disabled: bool,
    /// Role name -> priority.
    pub roles: BTreeMap<String, i32>,
    /// Group name -> membership priority (the group's `clients` set mirrors it).
    pub groups: BTreeMap<String, i32>,
}

/// A group of clients sharing roles.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Group {
    pub textname: Option<String>,
    pub textdescription: Option<String>,
    /// Role name -> priority.
    pub roles: BTreeMap<String, i32>,
    /// Member user names (back-reference of `Client::groups`).
    pub clients: BTreeSet<String>,
}

/// A role: a list of ACLs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Role {
    pub textname: Option<String>,
    pub textdescription: Option<String>,
    /// Kept grouped by type in [`AclType::ALL`] order, then by priority
    /// descending, ties in insertion order: the evaluation order.
    pub acls: Vec<Acl>,
}

impl Role {
    /// Inserts keeping the evaluation order (after equal priorities).
    pub fn insert_acl(&mut self, acl: Acl) {
        let pos = self
            .acls
            .iter()
            .position(|a| a.acltype > acl.acltype || (a.acltype == acl.acltype && a.priority < acl.priority))
            .unwrap_or(self.acls.len());
        self.acls.insert(pos, acl);
    }

    /// Replaces all ACLs, sorting them stably into evaluation order.
    pub fn set_acls(&mut self, mut acls: Vec<Acl>) {
        acls.sort_by(|a, b| a.acltype.cmp(&b.acltype).then(b.priority.cmp(&a.priority)));
        self.acls = acls;
    }
}

/// The default decision per generic access type when no ACL matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DefaultAccess {
    pub publish_client_send: bool,
    pub publish_client_receive: bool,
    pub subscribe: bool,
    pub unsubscribe: bool,
}

impl DefaultAccess {
    /// What `mosquitto_ctrl dynsec init` writes.
    pub const INIT: DefaultAccess = DefaultAccess {
        publish_client_send: false,
        publish_client_receive: true,
        subscribe: false,
        unsubscribe: true,
    };

    pub const NAMES: [&'static str; 4] =
        ["publishClientSend", "publishClientReceive", "subscribe", "unsubscribe"];

    pub fn get(&self, i: usize) -> bool {
        match i {
            0 => self.publish_client_send,
            1 => self.publish_client_receive,
            2 => self.subscribe,
            _ => self.unsubscribe,
        }
    }

    pub fn set(&mut self, i: usize, v: bool) {
        match i {
            0 => self.publish_client_send = v,
            1 => self.publish_client_receive = v,
            2 => self.subscribe = v,
            _ => self.unsubscribe = v,
        }
    }
}

/// Role (or group) names in evaluation order: priority descending, then name.
pub fn by_priority(map: &BTreeMap<String, i32>) -> Vec<(&str, i32)> {
    let mut v: Vec<(&str, i32)> = map.iter().map(|(k, p)| (k.as_str(), *p)).collect();
    // BTreeMap iteration is already by name; a stable sort keeps it for ties.
    v.sort_by_key(|x| std::cmp::Reverse(x.1));
    v
}

/// Mosquitto's `mosquitto_validate_utf8` on top of Rust's UTF-8 guarantee:
/// no U+0000, no control characters, no non-characters.
pub fn valid_utf8_name(s: &str) -> bool {
    s.chars().all(|c| {
        let u = c as u32;
        !(u <= 0x1F || (0x7F..=0x9F).contains(&u) || (0xFDD0..=0xFDEF).contains(&u) || (u & 0xFFFE) == 0xFFFE)
    })
}

/// `mosquitto_sub_topic_check` plus the plugin's limits: `+`/`#` whole
/// levels, `#` last, at most 65535 bytes and 200 `/`. The empty topic is
/// accepted (2.0.11 quirk; it never matches).
pub fn valid_acl_topic(t: &str) -> bool {
    if t.len() > 65535 || t.bytes().filter(|b| *b == b'/').count() > 200 {
        return false;
    }
    let levels: Vec<&str> = t.split('/').collect();
    let n = levels.len();
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == n - 1,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

//! Conversions of the whole state: Mosquitto's `dynamic-security.json`
//! (section 6.1), the content of `mosquitto_ctrl dynsec init` (section 6.2),
//! the protobuf form used in snapshots and backups, and the merge of a backup.

use std::collections::{BTreeMap, BTreeSet};

use super::commands::acl_json;
use super::json::{obj, J};
use super::model::{by_priority, Acl, AclType, Client, DefaultAccess, Group, Role, DEFAULT_PRIORITY};
use super::{pb, Dynsec, DynsecError, PasswordHash};

/// The ACLs of the `admin` role `mosquitto_ctrl dynsec init` writes, in its
/// order (all priority 0).
const INIT_ACLS: [(AclType, &str); 8] = [
    (AclType::PublishClientSend, "$CONTROL/dynamic-security/#"),
    (AclType::PublishClientReceive, "$CONTROL/dynamic-security/#"),
    (AclType::SubscribePattern, "$CONTROL/dynamic-security/#"),
    (AclType::PublishClientReceive, "$SYS/#"),
    (AclType::SubscribePattern, "$SYS/#"),
    (AclType::PublishClientReceive, "#"),
    (AclType::SubscribePattern, "#"),
    (AclType::UnsubscribePattern, "#"),
];

fn text(j: &J, key: &str) -> Option<String> {
    j.str_field(key).map(str::to_string)
}

/// A `[{"<key>": name, "priority": p}]` list; entries naming nothing in
/// `exists` are dropped, the first of duplicates wins.
fn ref_list(j: &J, list: &str, key: &str, exists: impl Fn(&str) -> bool) -> BTreeMap<String, i32> {
    let mut out = BTreeMap::new();
    for e in j.get(list).and_then(J::as_array).unwrap_or_default() {
        if let Some(n) = e.str_field(key).filter(|n| exists(n)) {
            out.entry(n.to_string()).or_insert(e.int_field("priority", DEFAULT_PRIORITY));
        }
    }
    out
}

fn prio_refs(map: &BTreeMap<String, i32>, key: &str) -> J {
    J::Arr(
        by_priority(map)
            .into_iter()
            .map(|(n, p)| {
                let mut o = vec![(key, J::str(n))];
                if p != DEFAULT_PRIORITY {
                    o.push(("priority", J::Int(p.into())));
                }
                obj(o)
            })
            .collect(),
    )
}

fn proto_refs(map: &BTreeMap<String, i32>) -> Vec<pb::Ref> {
    map.iter().map(|(n, p)| pb::Ref { name: n.clone(), priority: *p }).collect()
}

fn acltype_to_pb(t: AclType) -> pb::AclType {
    match t {
        AclType::PublishClientSend => pb::AclType::PublishClientSend,
        AclType::PublishClientReceive => pb::AclType::PublishClientReceive,
        AclType::SubscribeLiteral => pb::AclType::SubscribeLiteral,
        AclType::SubscribePattern => pb::AclType::SubscribePattern,
        AclType::UnsubscribeLiteral => pb::AclType::UnsubscribeLiteral,
        AclType::UnsubscribePattern => pb::AclType::UnsubscribePattern,
    }
}

fn acltype_from_pb(t: pb::AclType) -> AclType {
    match t {
        pb::AclType::PublishClientSend => AclType::PublishClientSend,
        pb::AclType::PublishClientReceive => AclType::PublishClientReceive,
        pb::AclType::SubscribeLiteral => AclType::SubscribeLiteral,
        pb::AclType::SubscribePattern => AclType::SubscribePattern,
        pb::AclType::UnsubscribeLiteral => AclType::UnsubscribeLiteral,
        pb::AclType::UnsubscribePattern => AclType::UnsubscribePattern,
    }
}

impl Dynsec {
    pub(crate) fn initial_impl(admin: &str, password: PasswordHash) -> Dynsec {
        let mut role = Role::default();
        role.set_acls(
            INIT_ACLS
                .iter()
                .map(|(t, topic)| Acl { acltype: *t, topic: topic.to_string(), priority: 0, allow: true })
                .collect(),
        );
        let client = Client {
            password: Some(password),
            textname: Some("Dynsec admin user".into()),
            roles: BTreeMap::from([("admin".to_string(), DEFAULT_PRIORITY)]),
            ..Client::default()
        };
        let mut d = Dynsec {
            clients: BTreeMap::from([(admin.to_string(), client)]),
            roles: BTreeMap::from([("admin".to_string(), role)]),
            default_access: DefaultAccess::INIT,
            ..Dynsec::default()
        };
        d.rebuild();
        d
    }

    /// Section 6.1 load rules: case-insensitive keys; bad password fields skip
    /// the client; unknown references are dropped; duplicates: first wins.
    pub(crate) fn from_mosquitto_json_impl(bytes: &[u8]) -> Result<Dynsec, DynsecError> {
        let tree = J::parse(bytes).ok_or_else(|| DynsecError::Json("not valid JSON".into()))?;
        if !tree.is_object() {
            return Err(DynsecError::Json("top level is not an object".into()));
        }
        let mut d = Dynsec::default();
        if let Some(da) = tree.get("defaultACLAccess") {
            for (i, n) in DefaultAccess::NAMES.iter().enumerate() {
                d.default_access.set(i, da.bool_field(n, false));
            }
        }
        for r in tree.get("roles").and_then(J::as_array).unwrap_or_default() {
            let Some(name) = r.str_field("rolename") else { continue };
            if d.roles.contains_key(name) {
                continue;
            }
            let acls = r
                .get("acls")
                .and_then(J::as_array)
                .unwrap_or_default()
                .iter()
                .filter_map(|a| {
                    Some(Acl {
                        acltype: AclType::parse(a.str_field("acltype")?)?,
                        topic: a.str_field("topic")?.to_string(),
                        priority: a.int_field("priority", 0),
                        allow: a.bool_field("allow", false),
                    })
                })
                .collect();
            let mut role = Role {
                textname: text(r, "textname"),
                textdescription: text(r, "textdescription"),
                acls: vec![],
            };
            role.set_acls(acls);
            d.roles.insert(name.to_string(), role);
        }
        for c in tree.get("clients").and_then(J::as_array).unwrap_or_default() {
            let Some(name) = c.str_field("username").filter(|n| !n.is_empty()) else { continue };
            if d.clients.contains_key(name) {
                continue;
            }
            let password =
                match (c.str_field("password"), c.str_field("salt"), c.get("iterations").and_then(J::as_int))
                {
                    (Some(h), Some(s), Some(i)) => match PasswordHash::from_b64(h, s, i.into()) {
                        Some(p) => Some(p),
                        None => continue, // skipped entirely, as Mosquitto does
                    },
                    _ => None,
                };
            let client = Client {
                password,
                clientid: text(c, "clientid"),
                textname: text(c, "textname"),
                textdescription: text(c, "textdescription"),
                disabled: c.bool_field("disabled", false),
                roles: ref_list(c, "roles", "rolename", |r| d.roles.contains_key(r)),
                groups: BTreeMap::new(),
            };
            d.clients.insert(name.to_string(), client);
        }
        for g in tree.get("groups").and_then(J::as_array).unwrap_or_default() {
            let Some(name) = g.str_field("groupname") else { continue };
            if d.groups.contains_key(name) {
                continue;
            }
            let members = ref_list(g, "clients", "username", |u| d.clients.contains_key(u));
            let group = Group {
                textname: text(g, "textname"),
                textdescription: text(g, "textdescription"),
                roles: ref_list(g, "roles", "rolename", |r| d.roles.contains_key(r)),
                clients: members.keys().cloned().collect(),
            };
            for (u, p) in members {
                if let Some(c) = d.clients.get_mut(&u) {
                    c.groups.insert(name.to_string(), p);
                }
            }
            d.groups.insert(name.to_string(), group);
        }
        d.anonymous_group =
            tree.str_field("anonymousGroup").filter(|g| d.groups.contains_key(*g)).map(str::to_string);
        d.rebuild();
        Ok(d)
    }

    pub(crate) fn to_mosquitto_json_impl(&self) -> Vec<u8> {
        let da =
            DefaultAccess::NAMES.iter().enumerate().map(|(i, n)| (*n, J::Bool(self.default_access.get(i))));
        let clients = self
            .clients
            .iter()
            .map(|(u, c)| {
                let mut o = vec![("username", J::str(u))];
                if let Some(id) = &c.clientid {
                    o.push(("clientid", J::str(id)));
                }
                if let Some(t) = &c.textname {
                    o.push(("textname", J::str(t)));
                }
                if let Some(t) = &c.textdescription {
                    o.push(("textdescription", J::str(t)));
                }
                if c.disabled {
                    o.push(("disabled", J::Bool(true)));
                }
                o.push(("roles", prio_refs(&c.roles, "rolename")));
                if let Some(p) = &c.password {
                    o.push(("password", J::Str(p.hash_b64())));
                    o.push(("salt", J::Str(p.salt_b64())));
                    o.push(("iterations", J::Int(p.iterations.into())));
                }
                obj(o)
            })
            .collect();
        let groups = self
            .groups
            .iter()
            .map(|(n, g)| {
                let mut o = vec![("groupname", J::str(n))];
                if let Some(t) = &g.textname {
                    o.push(("textname", J::str(t)));
                }
                if let Some(t) = &g.textdescription {
                    o.push(("textdescription", J::str(t)));
                }
                o.push(("roles", prio_refs(&g.roles, "rolename")));
                let members = g
                    .clients
                    .iter()
                    .map(|u| {
                        let mut m = vec![("username", J::str(u))];
                        let p = self
                            .clients
                            .get(u)
                            .and_then(|c| c.groups.get(n))
                            .copied()
                            .unwrap_or(DEFAULT_PRIORITY);
                        if p != DEFAULT_PRIORITY {
                            m.push(("priority", J::Int(p.into())));
                        }
                        obj(m)
                    })
                    .collect();
                o.push(("clients", J::Arr(members)));
                obj(o)
            })
            .collect();
        let roles = self
            .roles
            .iter()
            .map(|(n, r)| {
                let mut o = vec![("rolename", J::str(n))];
                if let Some(t) = &r.textname {
                    o.push(("textname", J::str(t)));
                }
                if let Some(t) = &r.textdescription {
                    o.push(("textdescription", J::str(t)));
                }
                o.push(("acls", J::Arr(r.acls.iter().map(acl_json).collect())));
                obj(o)
            })
            .collect();
        let mut top = vec![
            ("defaultACLAccess", obj(da.collect())),
            ("clients", J::Arr(clients)),
            ("groups", J::Arr(groups)),
        ];
        if let Some(g) = &self.anonymous_group {
            top.push(("anonymousGroup", J::str(g)));
        }
        top.push(("roles", J::Arr(roles)));
        obj(top).to_pretty().into_bytes()
    }

    pub(crate) fn to_proto_impl(&self) -> pb::DynsecState {
        pb::DynsecState {
            clients: self
                .clients
                .iter()
                .map(|(u, c)| pb::Client {
                    username: u.clone(),
                    password: c.password.as_ref().map(|p| pb::Password {
                        hash: p.hash.clone().into(),
                        salt: p.salt.clone().into(),
                        iterations: p.iterations,
                    }),
                    clientid: c.clientid.clone(),
                    textname: c.textname.clone(),
                    textdescription: c.textdescription.clone(),
                    disabled: c.disabled,
                    roles: proto_refs(&c.roles),
                    groups: proto_refs(&c.groups),
                })
                .collect(),
            groups: self
                .groups
                .iter()
                .map(|(n, g)| pb::Group {
                    groupname: n.clone(),
                    textname: g.textname.clone(),
                    textdescription: g.textdescription.clone(),
                    roles: proto_refs(&g.roles),
                })
                .collect(),
            roles: self
                .roles
                .iter()
                .map(|(n, r)| pb::Role {
                    rolename: n.clone(),
                    textname: r.textname.clone(),
                    textdescription: r.textdescription.clone(),
                    acls: r
                        .acls
                        .iter()
                        .map(|a| pb::Acl {
                            acltype: acltype_to_pb(a.acltype).into(),
                            topic: a.topic.clone(),
                            priority: a.priority,
                            allow: a.allow,
                        })
                        .collect(),
                })
                .collect(),
            default_access: Some(pb::DefaultAccess {
                publish_client_send: self.default_access.publish_client_send,
                publish_client_receive: self.default_access.publish_client_receive,
                subscribe: self.default_access.subscribe,
                unsubscribe: self.default_access.unsubscribe,
            }),
            anonymous_group: self.anonymous_group.clone(),
        }
    }

    /// Strict: the proto is only ever written by [`Dynsec::to_proto`], so a
    /// duplicate name, a reference to an unknown role or group, a malformed
    /// password or an unknown ACL type means corruption and is an error.
    pub(crate) fn from_proto_impl(p: &pb::DynsecState) -> Result<Dynsec, DynsecError> {
        let invalid = |m: String| Err(DynsecError::Invalid(m));
        let mut d = Dynsec::default();
        for r in &p.roles {
            let mut acls = Vec::with_capacity(r.acls.len());
            for a in &r.acls {
                let Ok(t) = pb::AclType::try_from(a.acltype) else {
                    return invalid(format!("role {:?}: unknown ACL type {}", r.rolename, a.acltype));
                };
                acls.push(Acl {
                    acltype: acltype_from_pb(t),
                    topic: a.topic.clone(),
                    priority: a.priority,
                    allow: a.allow,
                });
            }
            let mut role = Role {
                textname: r.textname.clone(),
                textdescription: r.textdescription.clone(),
                acls: vec![],
            };
            role.set_acls(acls);
            if d.roles.insert(r.rolename.clone(), role).is_some() {
                return invalid(format!("duplicate role {:?}", r.rolename));
            }
        }
        let refs = |list: &[pb::Ref], known: &dyn Fn(&str) -> bool, what: &str| {
            let mut m = BTreeMap::new();
            for x in list {
                if !known(&x.name) {
                    return Err(DynsecError::Invalid(format!("unknown {what} {:?}", x.name)));
                }
                if m.insert(x.name.clone(), x.priority).is_some() {
                    return Err(DynsecError::Invalid(format!("duplicate {what} {:?}", x.name)));
                }
            }
            Ok(m)
        };
        for g in &p.groups {
            let group = Group {
                textname: g.textname.clone(),
                textdescription: g.textdescription.clone(),
                roles: refs(&g.roles, &|r| d.roles.contains_key(r), "role")?,
                clients: BTreeSet::new(),
            };
            if d.groups.insert(g.groupname.clone(), group).is_some() {
                return invalid(format!("duplicate group {:?}", g.groupname));
            }
        }
        for c in &p.clients {
            let password = match &c.password {
                None => None,
                Some(pw) => {
                    let h = PasswordHash {
                        hash: pw.hash.to_vec(),
                        salt: pw.salt.to_vec(),
                        iterations: pw.iterations,
                    };
                    if !h.is_well_formed() {
                        return invalid(format!("client {:?}: malformed password hash", c.username));
                    }
                    Some(h)
                }
            };
            let client = Client {
                password,
                clientid: c.clientid.clone(),
                textname: c.textname.clone(),
                textdescription: c.textdescription.clone(),
                disabled: c.disabled,
                roles: refs(&c.roles, &|r| d.roles.contains_key(r), "role")?,
                groups: refs(&c.groups, &|g| d.groups.contains_key(g), "group")?,
            };
            for g in client.groups.keys() {
                if let Some(group) = d.groups.get_mut(g) {
                    group.clients.insert(c.username.clone());
                }
            }
            if d.clients.insert(c.username.clone(), client).is_some() {
                return invalid(format!("duplicate client {:?}", c.username));
            }
        }
        if let Some(g) = &p.anonymous_group {
            if !d.groups.contains_key(g) {
                return invalid(format!("unknown anonymous group {g:?}"));
            }
            d.anonymous_group = Some(g.clone());
        }
        if let Some(a) = &p.default_access {
            d.default_access = DefaultAccess {
                publish_client_send: a.publish_client_send,
                publish_client_receive: a.publish_client_receive,
                subscribe: a.subscribe,
                unsubscribe: a.unsubscribe,
            };
        }
        d.rebuild();
        Ok(d)
    }

    /// Adds what `other` has and this lacks. Roles first (so added clients
    /// and groups can reference them), then groups, then clients. A role
    /// reference is kept when the role exists after the merge; a membership
    /// (client, group) of `other` is added when at least one side was added
    /// by this merge and both exist afterwards (a restored user gets its
    /// groups back, a restored group its members). Default access stays; the
    /// anonymous group is taken from `other` only when none is set here.
    pub(crate) fn merge_impl(&mut self, other: &Dynsec) -> usize {
        let mut added_roles = 0;
        for (n, r) in &other.roles {
            if !self.roles.contains_key(n) {
                self.roles.insert(n.clone(), r.clone());
                added_roles += 1;
            }
        }
        let new_groups: BTreeSet<String> =
            other.groups.keys().filter(|g| !self.groups.contains_key(*g)).cloned().collect();
        let new_clients: BTreeSet<String> =
            other.clients.keys().filter(|c| !self.clients.contains_key(*c)).cloned().collect();
        for g in &new_groups {
            let src = &other.groups[g];
            let roles = src
                .roles
                .iter()
                .filter(|(r, _)| self.roles.contains_key(*r))
                .map(|(r, p)| (r.clone(), *p))
                .collect();
            let group = Group {
                textname: src.textname.clone(),
                textdescription: src.textdescription.clone(),
                roles,
                clients: BTreeSet::new(),
            };
            self.groups.insert(g.clone(), group);
        }
        for u in &new_clients {
            let src = &other.clients[u];
            let mut c = src.clone();
            c.roles.retain(|r, _| self.roles.contains_key(r));
            c.groups.clear();
            self.clients.insert(u.clone(), c);
        }
        // Memberships from `other` where one side is new.
        for (u, src) in &other.clients {
            for (g, p) in &src.groups {
                let relevant = new_clients.contains(u) || new_groups.contains(g);
                if !relevant || !self.groups.contains_key(g) {
                    continue;
                }
                if let Some(c) = self.clients.get_mut(u) {
                    c.groups.entry(g.clone()).or_insert(*p);
                    if let Some(group) = self.groups.get_mut(g) {
                        group.clients.insert(u.clone());
                    }
                }
            }
        }
        if self.anonymous_group.is_none() {
            if let Some(g) = other.anonymous_group.as_ref().filter(|g| self.groups.contains_key(*g)) {
                self.anonymous_group = Some(g.clone());
            }
        }
        let added = added_roles + new_groups.len() + new_clients.len();
        self.rebuild();
        added
    }
}

//! The `$CONTROL/dynamic-security/v1` commands (spec sections 1 and 2):
//! envelope handling, every command with Mosquitto's check order and error
//! texts, the response shapes, and who is kicked (section 5).
//!
//! Also [`prepare_request`], which replaces plaintext passwords by hashes
//! before a request is replicated.

use std::collections::{BTreeMap, BTreeSet};

use super::json::{obj, J};
use super::model::{
    by_priority, valid_acl_topic, valid_utf8_name, Acl, AclType, Client, DefaultAccess, Group, Role,
    DEFAULT_PRIORITY,
};
use super::{ControlOutcome, Dynsec, Kicks, PasswordHash};

/// Canonical command names; requests match them ignoring ASCII case.
const COMMANDS: [&str; 31] = [
    "setDefaultACLAccess",
    "getDefaultACLAccess",
    "setAnonymousGroup",
    "getAnonymousGroup",
    "createClient",
    "deleteClient",
    "setClientPassword",
    "setClientId",
    "addClientRole",
    "removeClientRole",
    "enableClient",
    "disableClient",
    "getClient",
    "listClients",
    "modifyClient",
    "createGroup",
    "deleteGroup",
    "addGroupClient",
    "removeGroupClient",
    "addGroupRole",
    "removeGroupRole",
    "getGroup",
    "listGroups",
    "modifyGroup",
    "createRole",
    "deleteRole",
    "getRole",
    "listRoles",
    "modifyRole",
    "addRoleACL",
    "removeRoleACL",
];

/// Commands whose `password` field [`prepare_request`] hashes.
const PASSWORD_COMMANDS: [&str; 3] = ["createClient", "setClientPassword", "modifyClient"];

/// Keys of the hashed password object [`prepare_request`] puts in place of
/// the plaintext (the value of `password` becomes this object).
const PW_HASH: &str = "pbkdf2Sha512";
const PW_SALT: &str = "salt";
const PW_ITERATIONS: &str = "iterations";
const PW_EMPTY: &str = "empty";

type Reply = Result<Option<J>, &'static str>;

/// Side effects collected while applying one request message.
#[derive(Default)]
struct Effects {
    kicks: Kicks,
    changed: bool,
}

/// The `password` field of a prepared command.
enum Password {
    Absent,
    /// Present but not usable (not a string in the original request, or not
    /// prepared).
    Invalid,
    Hashed {
        hash: PasswordHash,
        empty: bool,
    },
}

enum ListError {
    NotFound,
    Invalid,
}

fn password_field(c: &J) -> Password {
    let Some(v) = c.get("password") else { return Password::Absent };
    let (Some(hash), Some(salt), Some(J::Int(iterations))) =
        (v.str_field(PW_HASH), v.str_field(PW_SALT), v.get(PW_ITERATIONS))
    else {
        return Password::Invalid;
    };
    match PasswordHash::from_b64(hash, salt, *iterations) {
        Some(hash) => Password::Hashed { hash, empty: v.bool_field(PW_EMPTY, false) },
        None => Password::Invalid,
    }
}

/// A required name field: missing/not a string, then the UTF-8 rule.
fn name<'a>(c: &'a J, key: &str, missing: &'static str, bad: &'static str) -> Result<&'a str, &'static str> {
    let s = c.str_field(key).ok_or(missing)?;
    if valid_utf8_name(s) {
        Ok(s)
    } else {
        Err(bad)
    }
}

fn username(c: &J) -> Result<&str, &'static str> {
    name(c, "username", "Invalid/missing username", "Username not valid UTF-8")
}

fn groupname(c: &J) -> Result<&str, &'static str> {
    name(c, "groupname", "Invalid/missing groupname", "Group name not valid UTF-8")
}

fn rolename(c: &J) -> Result<&str, &'static str> {
    name(c, "rolename", "Invalid/missing rolename", "Role name not valid UTF-8")
}

/// An optional string field: absent = `None`, another type = `err`.
fn opt_str<'a>(c: &'a J, key: &str, err: &'static str) -> Result<Option<&'a str>, &'static str> {
    match c.get(key) {
        None => Ok(None),
        Some(J::Str(s)) => Ok(Some(s)),
        Some(_) => Err(err),
    }
}

fn opt_string(s: Option<&str>) -> Option<String> {
    s.map(str::to_string)
}

fn prio_list(map: &BTreeMap<String, i32>, key: &str) -> J {
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

fn push_text(o: &mut Vec<(&'static str, J)>, textname: &Option<String>, textdescription: &Option<String>) {
    if let Some(t) = textname {
        o.push(("textname", J::str(t)));
    }
    if let Some(t) = textdescription {
        o.push(("textdescription", J::str(t)));
    }
}

pub(crate) fn client_json(username: &str, c: &Client) -> J {
    let mut o = vec![("username", J::str(username))];
    if let Some(id) = &c.clientid {
        o.push(("clientid", J::str(id)));
    }
    push_text(&mut o, &c.textname, &c.textdescription);
    if c.disabled {
        o.push(("disabled", J::Bool(true)));
    }
    o.push(("roles", prio_list(&c.roles, "rolename")));
    o.push(("groups", prio_list(&c.groups, "groupname")));
    obj(o)
}

pub(crate) fn group_json(groupname: &str, g: &Group) -> J {
    let mut o = vec![("groupname", J::str(groupname))];
    push_text(&mut o, &g.textname, &g.textdescription);
    o.push(("clients", J::Arr(g.clients.iter().map(|u| obj(vec![("username", J::str(u))])).collect())));
    o.push(("roles", prio_list(&g.roles, "rolename")));
    obj(o)
}

pub(crate) fn acl_json(a: &Acl) -> J {
    obj(vec![
        ("acltype", J::str(a.acltype.name())),
        ("topic", J::str(&a.topic)),
        ("priority", J::Int(a.priority.into())),
        ("allow", J::Bool(a.allow)),
    ])
}

pub(crate) fn role_json(rolename: &str, r: &Role) -> J {
    let mut o = vec![("rolename", J::str(rolename))];
    push_text(&mut o, &r.textname, &r.textdescription);
    o.push(("acls", J::Arr(r.acls.iter().map(acl_json).collect())));
    obj(o)
}

/// ACLs of a `createRole`/`modifyRole` array: entries with an unknown type or
/// without a string topic are dropped, topics are not validated (2.0.11).
fn parse_acls(v: &J) -> Vec<Acl> {
    v.as_array()
        .unwrap_or_default()
        .iter()
        .filter_map(|e| {
            let acltype = AclType::parse(e.str_field("acltype")?)?;
            let topic = e.str_field("topic")?.to_string();
            Some(Acl {
                acltype,
                topic,
                priority: e.int_field("priority", 0),
                allow: e.bool_field("allow", false),
            })
        })
        .collect()
}

/// Paging of the list commands (section 2.5).
fn page<T>(items: impl Iterator<Item = T>, c: &J) -> Vec<T> {
    let offset = c.int_field("offset", 0).max(0) as usize;
    let count = c.int_field("count", -1);
    let take = match count {
        n if n < 0 => usize::MAX,
        0 => 1, // Mosquitto quirk: count 0 returns one item
        n => n as usize,
    };
    items.skip(offset).take(take).collect()
}

impl Dynsec {
    /// Applies one prepared request message; see [`Dynsec::apply_control`].
    pub(crate) fn apply_control_impl(&mut self, prepared: &[u8]) -> ControlOutcome {
        let mut fx = Effects::default();
        let responses = self.run_commands(prepared, &mut fx);
        if fx.changed {
            self.rebuild();
        }
        let response = obj(vec![("responses", J::Arr(responses))]).to_compact().into_bytes();
        ControlOutcome { response, kicks: fx.kicks, changed: fx.changed }
    }

    fn run_commands(&mut self, prepared: &[u8], fx: &mut Effects) -> Vec<J> {
        let error =
            |command: &str, error: &str| obj(vec![("command", J::str(command)), ("error", J::str(error))]);
        let Some(tree) = J::parse(prepared) else {
            return vec![error("Unknown command", "Payload not valid JSON")];
        };
        let Some(commands) = tree.get("commands").and_then(J::as_array) else {
            return vec![error("Unknown command", "Invalid/missing commands")];
        };
        let mut responses = Vec::with_capacity(commands.len());
        for c in commands {
            if !c.is_object() {
                responses.push(error("Unknown command", "Command not an object"));
                continue;
            }
            let Some(sent) = c.str_field("command") else {
                responses.push(error("Unknown command", "Missing command"));
                continue;
            };
            let correlation = match c.get("correlationData") {
                None => None,
                Some(J::Str(s)) => Some(s.as_str()),
                Some(_) => {
                    // Mosquitto stops processing the message here.
                    responses.push(error(sent, "Invalid correlationData data type."));
                    break;
                }
            };
            let (command, reply) = match COMMANDS.iter().find(|n| n.eq_ignore_ascii_case(sent)) {
                Some(canonical) => (*canonical, self.dispatch(canonical, c, fx)),
                None => (sent, Err("Unknown command")),
            };
            let mut o = vec![("command", J::str(command))];
            match reply {
                Ok(None) => {}
                Ok(Some(data)) => o.push(("data", data)),
                Err(e) => o.push(("error", J::str(e))),
            }
            if let Some(cd) = correlation {
                o.push(("correlationData", J::str(cd)));
            }
            responses.push(obj(o));
        }
        responses
    }

    fn dispatch(&mut self, command: &str, c: &J, fx: &mut Effects) -> Reply {
        match command {
            "setDefaultACLAccess" => self.set_default_acl_access(c, fx),
            "getDefaultACLAccess" => Ok(Some(self.default_access_json())),
            "setAnonymousGroup" => self.set_anonymous_group(c, fx),
            "getAnonymousGroup" => {
                let g = self.anonymous_group.as_deref().unwrap_or("");
                Ok(Some(obj(vec![("group", obj(vec![("groupname", J::str(g))]))])))
            }
            "createClient" => self.create_client(c, fx),
            "deleteClient" => self.delete_client(c, fx),
            "setClientPassword" => self.set_client_password(c, fx),
            "setClientId" => self.set_client_id(c, fx),
            "addClientRole" => self.add_client_role(c, fx),
            "removeClientRole" => self.remove_client_role(c, fx),
            "enableClient" => self.set_client_disabled(c, fx, false),
            "disableClient" => self.set_client_disabled(c, fx, true),
            "getClient" => {
                let u = username(c)?;
                let client = self.clients.get(u).ok_or("Client not found")?;
                Ok(Some(obj(vec![("client", client_json(u, client))])))
            }
            "listClients" => {
                let verbose = c.bool_field("verbose", false);
                let items = page(self.clients.iter(), c)
                    .into_iter()
                    .map(|(n, cl)| if verbose { client_json(n, cl) } else { J::str(n) })
                    .collect();
                Ok(Some(obj(vec![
                    ("totalCount", J::Int(self.clients.len() as i64)),
                    ("clients", J::Arr(items)),
                ])))
            }
            "modifyClient" => self.modify_client(c, fx),
            "createGroup" => self.create_group(c, fx),
            "deleteGroup" => self.delete_group(c, fx),
            "addGroupClient" => self.add_group_client(c, fx),
            "removeGroupClient" => self.remove_group_client(c, fx),
            "addGroupRole" => self.add_group_role(c, fx),
            "removeGroupRole" => self.remove_group_role(c, fx),
            "getGroup" => {
                let g = groupname(c)?;
                let group = self.groups.get(g).ok_or("Group not found")?;
                Ok(Some(obj(vec![("group", group_json(g, group))])))
            }
            "listGroups" => {
                let verbose = c.bool_field("verbose", false);
                let items = page(self.groups.iter(), c)
                    .into_iter()
                    .map(|(n, g)| if verbose { group_json(n, g) } else { J::str(n) })
                    .collect();
                Ok(Some(obj(vec![
                    ("totalCount", J::Int(self.groups.len() as i64)),
                    ("groups", J::Arr(items)),
                ])))
            }
            "modifyGroup" => self.modify_group(c, fx),
            "createRole" => self.create_role(c, fx),
            "deleteRole" => self.delete_role(c, fx),
            "getRole" => {
                let r = rolename(c)?;
                let role = self.roles.get(r).ok_or("Role not found")?;
                Ok(Some(obj(vec![("role", role_json(r, role))])))
            }
            "listRoles" => {
                let verbose = c.bool_field("verbose", false);
                let items = page(self.roles.iter(), c)
                    .into_iter()
                    .map(|(n, r)| if verbose { role_json(n, r) } else { J::str(n) })
                    .collect();
                Ok(Some(obj(vec![("totalCount", J::Int(self.roles.len() as i64)), ("roles", J::Arr(items))])))
            }
            "modifyRole" => self.modify_role(c, fx),
            "addRoleACL" => self.add_role_acl(c, fx),
            "removeRoleACL" => self.remove_role_acl(c, fx),
            _ => Err("Unknown command"),
        }
    }

    // ---- kicks --------------------------------------------------------

    fn kick_group(&self, g: &str, fx: &mut Effects) {
        if let Some(group) = self.groups.get(g) {
            fx.kicks.usernames.extend(group.clients.iter().cloned());
        }
        if self.anonymous_group.as_deref() == Some(g) {
            fx.kicks.anonymous = true;
        }
    }

    fn kick_role(&self, r: &str, fx: &mut Effects) {
        for (u, c) in &self.clients {
            if c.roles.contains_key(r) {
                fx.kicks.usernames.insert(u.clone());
            }
        }
        for (g, group) in &self.groups {
            if group.roles.contains_key(r) {
                self.kick_group(g, fx);
            }
        }
    }

    // ---- default access and anonymous group ---------------------------

    fn default_access_json(&self) -> J {
        let acls = DefaultAccess::NAMES
            .iter()
            .enumerate()
            .map(|(i, n)| obj(vec![("acltype", J::str(n)), ("allow", J::Bool(self.default_access.get(i)))]))
            .collect();
        obj(vec![("acls", J::Arr(acls))])
    }

    fn set_default_acl_access(&mut self, c: &J, fx: &mut Effects) -> Reply {
        let acls = c.get("acls").and_then(J::as_array).ok_or("Missing/invalid actions array")?;
        for e in acls {
            let Some(i) = e
                .str_field("acltype")
                .and_then(|t| DefaultAccess::NAMES.iter().position(|n| n.eq_ignore_ascii_case(t)))
            else {
                continue;
            };
            // `allow` as the plugin reads it; `access` as mosquitto_ctrl 2.0.11
            // sends it (spec 2.1 recommends accepting both).
            let allow = match (e.get("allow").and_then(J::as_bool), e.str_field("access")) {
                (Some(b), _) => b,
                (None, Some(a)) if a.eq_ignore_ascii_case("allow") => true,
                (None, Some(a)) if a.eq_ignore_ascii_case("deny") => false,
                _ => continue,
            };
            if self.default_access.get(i) != allow {
                self.default_access.set(i, allow);
                fx.changed = true;
            }
        }
        Ok(None)
    }

    fn set_anonymous_group(&mut self, c: &J, fx: &mut Effects) -> Reply {
        let g = groupname(c)?;
        if !self.groups.contains_key(g) {
            return Err("Group not found");
        }
        if self.anonymous_group.as_deref() != Some(g) {
            self.anonymous_group = Some(g.to_string());
            fx.changed = true;
        }
        fx.kicks.anonymous = true;
        Ok(None)
    }

    // ---- clients ------------------------------------------------------

    fn role_list(&self, c: &J) -> Result<Option<BTreeMap<String, i32>>, ListError> {
        let Some(v) = c.get("roles") else { return Ok(None) };
        let arr = v.as_array().ok_or(ListError::Invalid)?;
        let mut out = BTreeMap::new();
        for e in arr {
            let r = e.str_field("rolename").ok_or(ListError::Invalid)?;
            if !self.roles.contains_key(r) {
                return Err(ListError::NotFound);
            }
            out.entry(r.to_string()).or_insert(e.int_field("priority", DEFAULT_PRIORITY));
        }
        Ok(Some(out))
    }

    /// Role list of createClient/modifyClient/modifyGroup with their texts.
    fn role_list_reply(
        &self,
        c: &J,
        invalid: &'static str,
    ) -> Result<Option<BTreeMap<String, i32>>, &'static str> {
        self.role_list(c).map_err(|e| match e {
            ListError::NotFound => "Role not found",
            ListError::Invalid => invalid,
        })
    }

    fn create_client(&mut self, c: &J, fx: &mut Effects) -> Reply {
        let u = username(c)?;
        let password = match password_field(c) {
            Password::Absent => None,
            Password::Invalid => return Err("Invalid/missing password"),
            Password::Hashed { hash, .. } => Some(hash),
        };
        let clientid = opt_str(c, "clientid", "Invalid/missing client id")?;
        if clientid.is_some_and(|id| !valid_utf8_name(id)) {
            return Err("Client ID not valid UTF-8");
        }
        let textname = opt_str(c, "textname", "Invalid/missing textname")?;
        let textdescription = opt_str(c, "textdescription", "Invalid/missing textdescription")?;
        if self.clients.contains_key(u) {
            return Err("Client already exists");
        }
        let roles =
            self.role_list_reply(c, "'roles' not an array or missing/invalid rolename")?.unwrap_or_default();
        let mut groups = BTreeMap::new();
        for e in c.get("groups").and_then(J::as_array).unwrap_or_default() {
            let Some(g) = e.str_field("groupname") else { continue };
            if !self.groups.contains_key(g) {
                return Err("Group not found");
            }
            groups.entry(g.to_string()).or_insert(e.int_field("priority", DEFAULT_PRIORITY));
        }
        for g in groups.keys() {
            if let Some(group) = self.groups.get_mut(g) {
                group.clients.insert(u.to_string());
            }
        }
        let client = Client {
            password,
            clientid: clientid.filter(|id| !id.is_empty()).map(str::to_string),
            textname: opt_string(textname),
            textdescription: opt_string(textdescription),
            disabled: false,
            roles,
            groups,
        };
        self.clients.insert(u.to_string(), client);
        fx.changed = true;
        Ok(None)
    }

    fn delete_client(&mut self, c: &J, fx: &mut Effects) -> Reply {
        let u = c.str_field("username").ok_or("Invalid/missing username")?;
        let client = self.clients.remove(u).ok_or("Client not found")?;
        for g in client.groups.keys() {
            if let Some(group) = self.groups.get_mut(g) {
                group.clients.remove(u);
            }
        }
        fx.changed = true;
        fx.kicks.usernames.insert(u.to_string());
        Ok(None)
    }

    fn set_client_password(&mut self, c: &J, fx: &mut Effects) -> Reply {
        let u = username(c)?;
        let hash = match password_field(c) {
            Password::Absent | Password::Invalid => return Err("Invalid/missing password"),
            Password::Hashed { empty: true, .. } => return Err("Empty password is not allowed"),
            Password::Hashed { hash, .. } => hash,
        };
        let client = self.clients.get_mut(u).ok_or("Client not found")?;
        client.password = Some(hash);
        fx.changed = true;
        fx.kicks.usernames.insert(u.to_string());
        Ok(None)
    }

    fn set_client_id(&mut self, c: &J, fx: &mut Effects) -> Reply {
        let u = username(c)?;
        let id = opt_str(c, "clientid", "Invalid/missing client ID")?;
        if id.is_some_and(|id| !valid_utf8_name(id)) {
            return Err("Client ID not valid UTF-8");
        }
        let client = self.clients.get_mut(u).ok_or("Client not found")?;
        let id = id.filter(|id| !id.is_empty()).map(str::to_string);
        if client.clientid != id {
            client.clientid = id;
            fx.changed = true;
        }
        fx.kicks.usernames.insert(u.to_string());
        Ok(None)
    }

    fn add_client_role(&mut self, c: &J, fx: &mut Effects) -> Reply {
        let u = username(c)?;
        let r = rolename(c)?;
        let priority = c.int_field("priority", DEFAULT_PRIORITY);
        if !self.clients.contains_key(u) {
            return Err("Client not found");
        }
        if !self.roles.contains_key(r) {
            return Err("Role not found");
        }
        let client = self.clients.get_mut(u).ok_or("Client not found")?;
        if client.roles.contains_key(r) {
            return Err("Internal error"); // Mosquitto's text for "already has the role"
        }
        client.roles.insert(r.to_string(), priority);
        fx.changed = true;
        fx.kicks.usernames.insert(u.to_string());
        Ok(None)
    }

    fn remove_client_role(&mut self, c: &J, fx: &mut Effects) -> Reply {
        let u = username(c)?;
        let r = rolename(c)?;
        if !self.clients.contains_key(u) {
            return Err("Client not found");
        }
        if !self.roles.contains_key(r) {
            return Err("Role not found");
        }
        let client = self.clients.get_mut(u).ok_or("Client not found")?;
        if client.roles.remove(r).is_some() {
            fx.changed = true;
        }
        fx.kicks.usernames.insert(u.to_string());
        Ok(None)
    }

    fn set_client_disabled(&mut self, c: &J, fx: &mut Effects, disabled: bool) -> Reply {
        let u = username(c)?;
        let client = self.clients.get_mut(u).ok_or("Client not found")?;
        if client.disabled != disabled {
            client.disabled = disabled;
            fx.changed = true;
        }
        if disabled {
            fx.kicks.usernames.insert(u.to_string());
        }
        Ok(None)
    }

    fn modify_client(&mut self, c: &J, fx: &mut Effects) -> Reply {
        let u = username(c)?;
        // Mosquitto kicks the user name after most replies, errors included.
        fx.kicks.usernames.insert(u.to_string());
        if !self.clients.contains_key(u) {
            return Err("Client not found");
        }
        // All-or-nothing (Mosquitto >= 2.0.15): validate everything first.
        let roles = self.role_list_reply(c, "'roles' not an array or missing/invalid rolename")?;
        let mut groups: Option<BTreeMap<String, i32>> = None;
        if let Some(arr) = c.get("groups").and_then(J::as_array) {
            let mut m = BTreeMap::new();
            for e in arr.iter().filter(|e| e.is_object()) {
                let g = e
                    .str_field("groupname")
                    .ok_or("'groups' contains an object with an invalid 'groupname'")?;
                if !self.groups.contains_key(g) {
                    return Err("'groups' contains an object with a 'groupname' that does not exist");
                }
                m.entry(g.to_string()).or_insert(e.int_field("priority", DEFAULT_PRIORITY));
            }
            groups = Some(m);
        }
        let password = match password_field(c) {
            Password::Hashed { hash, empty: false } => Some(hash),
            _ => None, // "" is ignored, as is a non-string
        };
        let clientid = c.str_field("clientid");
        let textname = c.str_field("textname");
        let textdescription = c.str_field("textdescription");

        let before = self.clients.get(u).cloned();
        if let Some(new_groups) = &groups {
            let old: Vec<String> =
                self.clients.get(u).map(|cl| cl.groups.keys().cloned().collect()).unwrap_or_default();
            for g in old {
                if let Some(group) = self.groups.get_mut(&g) {
                    group.clients.remove(u);
                }
            }
            for g in new_groups.keys() {
                if let Some(group) = self.groups.get_mut(g) {
                    group.clients.insert(u.to_string());
                }
            }
        }
        let client = self.clients.get_mut(u).ok_or("Client not found")?;
        if let Some(id) = clientid {
            client.clientid = Some(id).filter(|id| !id.is_empty()).map(str::to_string);
        }
        if let Some(p) = password {
            client.password = Some(p);
        }
        if let Some(t) = textname {
            client.textname = Some(t.to_string());
        }
        if let Some(t) = textdescription {
            client.textdescription = Some(t.to_string());
        }
        if let Some(r) = roles {
            client.roles = r;
        }
        if let Some(g) = groups {
            client.groups = g;
        }
        if before.as_ref() != Some(client) {
            fx.changed = true;
        }
        Ok(None)
    }

    // ---- groups -------------------------------------------------------

    fn create_group(&mut self, c: &J, fx: &mut Effects) -> Reply {
        let g = groupname(c)?;
        let textname = opt_str(c, "textname", "Invalid/missing textname")?;
        let textdescription = opt_str(c, "textdescription", "Invalid/missing textdescription")?;
        if self.groups.contains_key(g) {
            return Err("Group already exists");
        }
        let roles = self.role_list_reply(c, "Internal error")?.unwrap_or_default();
        let group = Group {
            textname: opt_string(textname),
            textdescription: opt_string(textdescription),
            roles,
            clients: BTreeSet::new(),
        };
        self.groups.insert(g.to_string(), group);
        fx.changed = true;
        Ok(None)
    }

    fn delete_group(&mut self, c: &J, fx: &mut Effects) -> Reply {
        let g = groupname(c)?;
        if !self.groups.contains_key(g) {
            return Err("Group not found");
        }
        // 2.0.11 crashes here; >= 2.0.15 refuses (spec 2.3).
        if self.anonymous_group.as_deref() == Some(g) {
            return Err("Deleting the anonymous group is forbidden");
        }
        self.kick_group(g, fx);
        if let Some(group) = self.groups.remove(g) {
            for u in &group.clients {
                if let Some(client) = self.clients.get_mut(u) {
                    client.groups.remove(g);
                }
            }
        }
        fx.changed = true;
        Ok(None)
    }

    fn add_group_client(&mut self, c: &J, fx: &mut Effects) -> Reply {
        let u = username(c)?;
        let g = groupname(c)?;
        let priority = c.int_field("priority", DEFAULT_PRIORITY);
        fx.kicks.usernames.insert(u.to_string());
        let client = self.clients.get_mut(u).ok_or("Client not found")?;
        let group = self.groups.get_mut(g).ok_or("Group not found")?;
        if client.groups.contains_key(g) {
            return Err("Client is already in this group");
        }
        client.groups.insert(g.to_string(), priority);
        group.clients.insert(u.to_string());
        fx.changed = true;
        Ok(None)
    }

    fn remove_group_client(&mut self, c: &J, fx: &mut Effects) -> Reply {
        let u = username(c)?;
        let g = groupname(c)?;
        fx.kicks.usernames.insert(u.to_string());
        let client = self.clients.get_mut(u).ok_or("Client not found")?;
        let group = self.groups.get_mut(g).ok_or("Group not found")?;
        if client.groups.remove(g).is_some() {
            fx.changed = true;
        }
        group.clients.remove(u);
        Ok(None)
    }

    fn add_group_role(&mut self, c: &J, fx: &mut Effects) -> Reply {
        let g = groupname(c)?;
        let r = rolename(c)?;
        let priority = c.int_field("priority", DEFAULT_PRIORITY);
        if !self.groups.contains_key(g) {
            return Err("Group not found");
        }
        if !self.roles.contains_key(r) {
            return Err("Role not found");
        }
        let group = self.groups.get_mut(g).ok_or("Group not found")?;
        if group.roles.contains_key(r) {
            return Err("Group is already in this role");
        }
        group.roles.insert(r.to_string(), priority);
        fx.changed = true;
        self.kick_group(g, fx);
        Ok(None)
    }

    fn remove_group_role(&mut self, c: &J, fx: &mut Effects) -> Reply {
        let g = groupname(c)?;
        let r = rolename(c)?;
        if !self.groups.contains_key(g) {
            return Err("Group not found");
        }
        if !self.roles.contains_key(r) {
            return Err("Role not found");
        }
        let group = self.groups.get_mut(g).ok_or("Group not found")?;
        if group.roles.remove(r).is_some() {
            fx.changed = true;
        }
        self.kick_group(g, fx);
        Ok(None)
    }

    fn modify_group(&mut self, c: &J, fx: &mut Effects) -> Reply {
        let g = groupname(c)?;
        if !self.groups.contains_key(g) {
            return Err("Group not found");
        }
        let roles = self.role_list_reply(c, "'roles' not an array or missing/invalid rolename")?;
        let mut members: Option<BTreeMap<String, i32>> = None;
        if let Some(arr) = c.get("clients").and_then(J::as_array) {
            let mut m = BTreeMap::new();
            for e in arr.iter().filter(|e| e.is_object()) {
                let u = e
                    .str_field("username")
                    .ok_or("'clients' contains an object with an invalid 'username'")?;
                if !self.clients.contains_key(u) {
                    return Err("'clients' contains an object with a 'username' that does not exist");
                }
                m.entry(u.to_string()).or_insert(e.int_field("priority", DEFAULT_PRIORITY));
            }
            members = Some(m);
        }
        // Old members are kicked too: they may have lost rights.
        self.kick_group(g, fx);
        let before = self.groups.get(g).cloned();
        if let Some(members) = &members {
            let old: Vec<String> =
                self.groups.get(g).map(|gr| gr.clients.iter().cloned().collect()).unwrap_or_default();
            for u in old {
                if let Some(client) = self.clients.get_mut(&u) {
                    client.groups.remove(g);
                }
            }
            for (u, p) in members {
                if let Some(client) = self.clients.get_mut(u) {
                    client.groups.insert(g.to_string(), *p);
                }
                fx.kicks.usernames.insert(u.clone());
            }
            // Membership priorities live on the clients; compare them too.
            fx.changed = true;
        }
        let group = self.groups.get_mut(g).ok_or("Group not found")?;
        if let Some(t) = c.str_field("textname") {
            group.textname = Some(t.to_string());
        }
        if let Some(t) = c.str_field("textdescription") {
            group.textdescription = Some(t.to_string());
        }
        if let Some(r) = roles {
            group.roles = r;
        }
        if let Some(m) = members {
            group.clients = m.into_keys().collect();
        }
        if before.as_ref() != Some(group) {
            fx.changed = true;
        }
        Ok(None)
    }

    // ---- roles --------------------------------------------------------

    fn create_role(&mut self, c: &J, fx: &mut Effects) -> Reply {
        let r = rolename(c)?;
        let textname = opt_str(c, "textname", "Invalid/missing textname")?;
        let textdescription = opt_str(c, "textdescription", "Invalid/missing textdescription")?;
        if self.roles.contains_key(r) {
            return Err("Role already exists");
        }
        let mut role = Role {
            textname: opt_string(textname),
            textdescription: opt_string(textdescription),
            acls: Vec::new(),
        };
        if let Some(acls) = c.get("acls") {
            role.set_acls(parse_acls(acls));
        }
        self.roles.insert(r.to_string(), role);
        fx.changed = true;
        Ok(None)
    }

    fn delete_role(&mut self, c: &J, fx: &mut Effects) -> Reply {
        let r = rolename(c)?;
        if !self.roles.contains_key(r) {
            return Err("Role not found");
        }
        self.kick_role(r, fx);
        self.roles.remove(r);
        for client in self.clients.values_mut() {
            client.roles.remove(r);
        }
        for group in self.groups.values_mut() {
            group.roles.remove(r);
        }
        fx.changed = true;
        Ok(None)
    }

    fn modify_role(&mut self, c: &J, fx: &mut Effects) -> Reply {
        let r = rolename(c)?;
        let role = self.roles.get_mut(r).ok_or("Role does not exist")?;
        let before = role.clone();
        if let Some(t) = c.str_field("textname") {
            role.textname = Some(t.to_string());
        }
        if let Some(t) = c.str_field("textdescription") {
            role.textdescription = Some(t.to_string());
        }
        if let Some(acls) = c.get("acls").filter(|a| a.as_array().is_some()) {
            role.set_acls(parse_acls(acls));
        }
        if *role != before {
            fx.changed = true;
        }
        // No kick (Mosquitto): the new ACLs apply to the next operation anyway.
        Ok(None)
    }

    /// The checks shared by addRoleACL and removeRoleACL, in their order.
    fn acl_target<'a>(&self, c: &'a J) -> Result<(&'a str, AclType, &'a str), &'static str> {
        let r = rolename(c)?;
        if !self.roles.contains_key(r) {
            return Err("Role not found");
        }
        let t = c.str_field("acltype").ok_or("Invalid/missing acltype")?;
        let acltype = AclType::parse(t).ok_or("Unknown acltype")?;
        let topic = c.str_field("topic").ok_or("Invalid/missing topic")?;
        if !valid_utf8_name(topic) {
            return Err("Topic not valid UTF-8");
        }
        if !valid_acl_topic(topic) {
            return Err("Invalid ACL topic");
        }
        Ok((r, acltype, topic))
    }

    fn add_role_acl(&mut self, c: &J, fx: &mut Effects) -> Reply {
        let (r, acltype, topic) = self.acl_target(c)?;
        let role = self.roles.get_mut(r).ok_or("Role not found")?;
        if role.acls.iter().any(|a| a.acltype == acltype && a.topic == topic) {
            return Err("ACL with this topic already exists");
        }
        role.insert_acl(Acl {
            acltype,
            topic: topic.to_string(),
            priority: c.int_field("priority", 0),
            allow: c.bool_field("allow", false),
        });
        fx.changed = true;
        self.kick_role(r, fx);
        Ok(None)
    }

    fn remove_role_acl(&mut self, c: &J, fx: &mut Effects) -> Reply {
        let (r, acltype, topic) = self.acl_target(c)?;
        let role = self.roles.get_mut(r).ok_or("Role not found")?;
        let i =
            role.acls.iter().position(|a| a.acltype == acltype && a.topic == topic).ok_or("ACL not found")?;
        role.acls.remove(i);
        fx.changed = true;
        self.kick_role(r, fx);
        Ok(None)
    }
}

/// See [`super::prepare_request`].
pub(crate) fn prepare(payload: &[u8]) -> Vec<u8> {
    let Some(mut tree) = J::parse(payload) else { return payload.to_vec() };
    let J::Obj(top) = &mut tree else { return payload.to_vec() };
    // The same lookup apply uses: the first `commands` key, any case.
    let Some((_, J::Arr(commands))) = top.iter_mut().find(|(k, _)| k.eq_ignore_ascii_case("commands")) else {
        return payload.to_vec();
    };
    for c in commands.iter_mut() {
        let is_pw_command = c
            .str_field("command")
            .is_some_and(|n| PASSWORD_COMMANDS.iter().any(|p| p.eq_ignore_ascii_case(n)));
        let J::Obj(fields) = c else { continue };
        if !is_pw_command {
            continue;
        }
        // Every `password` key (any case) is replaced: a string by its hash, any
        // other value (a client trying to pass a ready-made hash object) by null,
        // which apply treats as a non-string password.
        for (k, v) in fields.iter_mut() {
            if !k.eq_ignore_ascii_case("password") {
                continue;
            }
            *v = match v {
                J::Str(pw) => {
                    let h = PasswordHash::new(pw.as_bytes());
                    obj(vec![
                        (PW_HASH, J::Str(h.hash_b64())),
                        (PW_SALT, J::Str(h.salt_b64())),
                        (PW_ITERATIONS, J::Int(h.iterations.into())),
                        (PW_EMPTY, J::Bool(pw.is_empty())),
                    ])
                }
                _ => J::Null,
            };
        }
    }
    tree.to_compact().into_bytes()
}

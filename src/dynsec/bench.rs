//! Synthetic dynamic-security configurations for benchmarks (the issue's
//! "1,000 clients, 100 roles, 10 ACLs each"), as control requests so they
//! can go through the normal replicated path, plus a timing helper for
//! [`Dynsec::allowed`]. Not used by the broker itself. tests/bench/gen_dynsec.py
//! writes the same configuration as Mosquitto's dynamic-security.json.

use std::time::{Duration, Instant};

use super::json::{obj, J};
use super::{Access, Dynsec};

/// The shape of a synthetic configuration.
#[derive(Debug, Clone, Copy)]
pub struct Synthetic {
    pub clients: usize,
    pub roles: usize,
    pub acls_per_role: usize,
    pub roles_per_client: usize,
}

impl Synthetic {
    /// The issue's benchmark shape: 1,000 clients, 100 roles of 10 ACLs,
    /// 10 roles per client.
    pub const ISSUE: Synthetic =
        Synthetic { clients: 1000, roles: 100, acls_per_role: 10, roles_per_client: 10 };

    /// User name of client `i`: `bench-<i>`.
    pub fn username(i: usize) -> String {
        format!("bench-{i}")
    }

    /// One control request creating everything (unprepared: give it to
    /// [`super::prepare_request`]). Role `r` holds ACLs on
    /// `bench/r<r>/a<k>/#` alternating publishClientSend and
    /// publishClientReceive, subscribePattern `bench/p2p/#`, plus, as its
    /// last ACLs, allow both ways on `bench/p2p/#` — so a p2p check scans every ACL of every role of the
    /// client before it matches (the worst case). Client `i` holds roles
    /// `(i + j) % roles` for `j < roles_per_client`, with `password`.
    pub fn request(&self, password: &str) -> Vec<u8> {
        let mut commands = Vec::new();
        for r in 0..self.roles {
            let mut acls = Vec::new();
            for k in 0..self.acls_per_role.saturating_sub(3) {
                let t = if k % 2 == 0 { "publishClientSend" } else { "publishClientReceive" };
                acls.push(obj(vec![
                    ("acltype", J::str(t)),
                    ("topic", J::Str(format!("bench/r{r}/a{k}/#"))),
                    ("allow", J::Bool(true)),
                ]));
            }
            acls.push(obj(vec![
                ("acltype", J::str("subscribePattern")),
                ("topic", J::str("bench/p2p/#")),
                ("allow", J::Bool(true)),
            ]));
            for t in ["publishClientSend", "publishClientReceive"] {
                acls.push(obj(vec![
                    ("acltype", J::str(t)),
                    ("topic", J::str("bench/p2p/#")),
                    ("priority", J::Int(-1)),
                    ("allow", J::Bool(true)),
                ]));
            }
            commands.push(obj(vec![
                ("command", J::str("createRole")),
                ("rolename", J::Str(format!("bench-role-{r}"))),
                ("acls", J::Arr(acls)),
            ]));
        }
        for i in 0..self.clients {
            let roles = (0..self.roles_per_client.min(self.roles))
                .map(|j| obj(vec![("rolename", J::Str(format!("bench-role-{}", (i + j) % self.roles)))]))
                .collect();
            commands.push(obj(vec![
                ("command", J::str("createClient")),
                ("username", J::Str(Synthetic::username(i))),
                ("password", J::str(password)),
                ("roles", J::Arr(roles)),
            ]));
        }
        obj(vec![("commands", J::Arr(commands))]).to_compact().into_bytes()
    }
}

/// Average time of one [`Dynsec::allowed`] call over `n` calls for user
/// `username` on `topic` (the decision is returned too, so it cannot be
/// optimized away).
pub fn time_allowed(d: &Dynsec, username: &str, access: Access, topic: &str, n: u32) -> (Duration, bool) {
    let start = Instant::now();
    let mut allowed = true;
    for _ in 0..n {
        allowed &= std::hint::black_box(d).allowed(Some(std::hint::black_box(username)), access, topic);
    }
    (start.elapsed() / n.max(1), allowed)
}

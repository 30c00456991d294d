#!/usr/bin/env python3
"""Writes Mosquitto's dynamic-security.json for the dynamic-security benchmark
(issue 4: 1,000 clients, 100 roles, 10 ACLs each), independently of raftmq,
so both brokers load the very same file (raftmq with `raftmq ctl dynsec
import`, Mosquitto as its plugin's `plugin_opt_config_file`).

The shape is that of `raftmq::dynsec::bench::Synthetic::ISSUE`: role r holds
7 ACLs on bench/r<r>/a<k>/# (alternating publishClientSend and
publishClientReceive), subscribePattern bench/p2p/# and, last (priority -1),
allow both ways on bench/p2p/#, so a p2p check scans every ACL of a role before it matches;
client bench-<i> holds roles (i + j) % roles for j < roles_per_client.
Passwords are PBKDF2-HMAC-SHA512 with a 12-byte salt and 101 iterations, as
the plugin writes them. The file also has the admin of `mosquitto_ctrl
dynsec init` (role admin) and init's default access.

usage: gen_dynsec.py OUT.json [--clients 1000] [--roles 100] [--acls 10]
                              [--roles-per-client 10] [--password benchpw]
                              [--admin admin --admin-password adminpass]
"""

import argparse
import base64
import hashlib
import json
import os

ITERATIONS = 101


def hashed(password):
    salt = os.urandom(12)
    key = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS, 64)
    return {
        "password": base64.b64encode(key).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": ITERATIONS,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--roles", type=int, default=100)
    ap.add_argument("--acls", type=int, default=10)
    ap.add_argument("--roles-per-client", type=int, default=10)
    ap.add_argument("--password", default="benchpw")
    ap.add_argument("--admin", default="admin")
    ap.add_argument("--admin-password", default="adminpass")
    a = ap.parse_args()

    roles = []
    for r in range(a.roles):
        acls = []
        for k in range(max(a.acls - 3, 0)):
            t = "publishClientSend" if k % 2 == 0 else "publishClientReceive"
            acls.append({"acltype": t, "topic": f"bench/r{r}/a{k}/#", "priority": 0, "allow": True})
        acls.append({"acltype": "subscribePattern", "topic": "bench/p2p/#", "priority": 0, "allow": True})
        for t in ("publishClientSend", "publishClientReceive"):
            acls.append({"acltype": t, "topic": "bench/p2p/#", "priority": -1, "allow": True})
        roles.append({"rolename": f"bench-role-{r}", "acls": acls})
    admin_acls = [
        ("publishClientSend", "$CONTROL/dynamic-security/#"),
        ("publishClientReceive", "$CONTROL/dynamic-security/#"),
        ("subscribePattern", "$CONTROL/dynamic-security/#"),
        ("publishClientReceive", "$SYS/#"),
        ("subscribePattern", "$SYS/#"),
        ("publishClientReceive", "#"),
        ("subscribePattern", "#"),
        ("unsubscribePattern", "#"),
    ]
    roles.append(
        {"rolename": "admin", "acls": [{"acltype": t, "topic": p, "allow": True} for t, p in admin_acls]}
    )

    clients = [{"username": a.admin, "textName": "Dynsec admin user", **hashed(a.admin_password),
                "roles": [{"rolename": "admin"}]}]
    for i in range(a.clients):
        n = min(a.roles_per_client, a.roles)
        clients.append({
            "username": f"bench-{i}",
            **hashed(a.password),
            "roles": [{"rolename": f"bench-role-{(i + j) % a.roles}"} for j in range(n)],
        })

    doc = {
        "clients": clients,
        "roles": roles,
        "groups": [],
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": True,
            "subscribe": False,
            "unsubscribe": True,
        },
    }
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()

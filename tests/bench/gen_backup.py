#!/usr/bin/env python3
"""Writes a synthetic raftmq backup (format version 1, see proto/backup.proto
and src/backup/format.rs) for the backup benchmark: RETAINED retained messages
(topic bench/r/<i>, PAYLOAD bytes, QoS 1) and SESSIONS persistent MQTT 5
sessions (client id bench-s-<i>, expiry 1 day, one subscription bench/s/<i>/#).

Protobuf is encoded by hand (no dependency): only varint and
length-delimited fields are needed.

usage: gen_backup.py OUT.tar.gz RETAINED SESSIONS [PAYLOAD]
"""
import hashlib
import io
import os
import sys
import tarfile
import tempfile
import time


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def fv(field, n):
    return varint(field << 3) + varint(n) if n else b""


def fb(field, data):
    if isinstance(data, str):
        data = data.encode()
    return varint((field << 3) | 2) + varint(len(data)) + data


class Part:
    def __init__(self, folder, name):
        self.name = name
        self.path = os.path.join(folder, name)
        self.f = open(self.path, "wb")
        self.h = hashlib.sha256()
        self.records = 0
        self.bytes = 0

    def record(self, rec):
        b = varint(len(rec)) + rec
        self.f.write(b)
        self.h.update(b)
        self.records += 1
        self.bytes += len(b)

    def close(self):
        self.f.close()
        return fb(1, self.name) + fv(2, self.records) + fv(3, self.bytes) + fb(4, self.h.hexdigest())


def main():
    out, retained, sessions = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    payload = b"x" * int(sys.argv[4] if len(sys.argv) > 4 else 64)
    now = int(time.time() * 1000)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out))) as tmp:
        s = Part(tmp, "sessions.pbd")
        for i in range(sessions):
            sub = fb(1, f"bench/s/{i}/#") + fv(2, 1)
            s.record(
                fb(1, f"bench-s-{i}")  # client_id
                + fv(2, 5)  # protocol_version
                + fv(3, 86400)  # session_expiry_s
                + fv(4, 65535)  # receive_maximum
                + fv(6, now)  # disconnected_at_ms
                + fb(8, sub)  # subscriptions
                + fv(14, 1)  # next_packet_id
                + fv(17, now)  # created_at_ms
            )
        r = Part(tmp, "retained.pbd")
        for i in range(retained):
            msg = fb(1, f"bench/r/{i}") + fb(2, payload) + fv(3, 1) + fv(4, 1)
            r.record(fb(1, msg) + fv(2, now))
        c = Part(tmp, "cluster.pbd")
        c.record(b"")
        g = Part(tmp, "config.pbd")
        g.record(fb(1, "synthetic (tests/bench/gen_backup.py)"))
        parts = [s, r, c, g]
        manifest = (
            fb(1, "raftmq-backup")
            + fv(2, 1)
            + fb(3, "synthetic")
            + fv(6, 1)
            + fv(7, 1)
            + fv(8, now)
            + fb(10, "gen_backup.py")
            + b"".join(fb(11, p.close()) for p in parts)
            + fv(12, now)
            + fb(14, "synthetic")
        )
        with tarfile.open(out, "w:gz", compresslevel=1, format=tarfile.GNU_FORMAT) as tar:
            info = tarfile.TarInfo("manifest.pb")
            info.size = len(manifest)
            info.mtime = now // 1000
            tar.addfile(info, io.BytesIO(manifest))
            for p in parts:
                tar.add(p.path, arcname=p.name)


if __name__ == "__main__":
    main()

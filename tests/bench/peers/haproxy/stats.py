#!/usr/bin/env python3
"""Print HAProxy's per-server counters as JSON, read from the stats socket.

    stats.py --dir DIR        (the dir given to start.sh)

Output: {"w1": {"addr": "127.0.0.1:9001", "scur": 10, "stot": 12, "smax": 10,
"status": "no check"}, ..., "frontend": {"scur": 20, "stot": 24}}
scur = current connections, stot = total since start, smax = peak.
Python standard library only.
"""

import argparse
import csv
import io
import json
import os
import socket
import sys


def show_stat(sock_path, timeout=5.0):
    """Return the rows of HAProxy's 'show stat' as dicts."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(b"show stat\n")
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    text = b"".join(chunks).decode()
    if text.startswith("# "):
        text = text[2:]
    return list(csv.DictReader(io.StringIO(text)))


def server_counters(sock_path, backend="workers", frontend="ws_in"):
    out = {}
    for row in show_stat(sock_path):
        if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND"):
            out[row["svname"]] = {
                "addr": row.get("addr", ""),
                "scur": int(row["scur"] or 0),
                "stot": int(row["stot"] or 0),
                "smax": int(row["smax"] or 0),
                "status": row.get("status", ""),
            }
        elif row["pxname"] == frontend and row["svname"] == "FRONTEND":
            out["frontend"] = {"scur": int(row["scur"] or 0), "stot": int(row["stot"] or 0)}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True)
    args = parser.parse_args()
    sock_path = os.path.join(args.dir, "haproxy.sock")
    try:
        counters = server_counters(sock_path)
    except OSError as err:
        print("cannot read %s: %s" % (sock_path, err), file=sys.stderr)
        return 1
    json.dump(counters, sys.stdout, indent=1, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

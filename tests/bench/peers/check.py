#!/usr/bin/env python3
"""Smoke test of the benchmark peers: nchan, Pushpin and HAProxy.

For nchan and Pushpin (each with permessage-deflate off, then on): start the
server in a temp dir on free ports, connect SUBSCRIBERS WebSocket subscribers
to channel "hot", publish MESSAGES JSON messages of ~500 bytes carrying a
sequence number and a publish timestamp, check that every subscriber got all
of them in order, print the median latency, stop the server and check that
none of its processes is left.

For HAProxy (leastconn, then roundrobin): start two WebSocket echo servers A
and B, relay 20 connections through HAProxy (10, then close 4 of A's, then 10
more), check from the echo replies and from HAProxy's stats socket that they
were split as the algorithm says (leastconn refills A first, roundrobin keeps
alternating), stop everything.

Needs Python 3 with the `websockets` package (>= 13, asyncio API), plus the
Debian packages nginx-light, libnginx-mod-nchan, pushpin and haproxy.
Everything binds 127.0.0.1. Ends with a "N passed, N failed" line.
"""

import argparse
import asyncio
import collections
import contextlib
import http.client
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

HERE = os.path.dirname(os.path.abspath(__file__))
CHANNEL = "hot"
START_TIMEOUT = 90  # s, for a start.sh
STOP_TIMEOUT = 40  # s, for a stop.sh
PHASE_TIMEOUT = 30  # s, for connecting, the barrier, and the deliveries

# ---------------------------------------------------------------- helpers


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid):
    """True if the process exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def procs_mentioning(text):
    """Live processes (other than this one) whose command line contains text."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and alive(int(entry)):
            found.append((int(entry), cmdline.strip()))
    return found


def run_script(args, timeout):
    """Run a start/stop script; return its stdout; raise with its output on failure."""
    proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError("%s exited %d\nstdout:\n%s\nstderr:\n%s" % (
            " ".join(args), proc.returncode, proc.stdout, proc.stderr))
    return proc.stdout


def parse_pids(out):
    """'role pid' lines -> [(role, pid)]."""
    pids = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            pids.append((parts[0], int(parts[1])))
    return pids


def wait_gone(pids, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return []
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


PAD = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod "
       "tempor incididunt ut labore et dolore magna aliqua ") * 8


def make_payload(seq, size=500):
    """A JSON message of `size` bytes with seq and publish time (µs since epoch)."""
    msg = {"seq": seq, "ts": time.time_ns() // 1000, "channel": CHANNEL, "pad": ""}
    room = size - len(json.dumps(msg, separators=(",", ":")))
    msg["pad"] = PAD[:max(room, 0)]
    return json.dumps(msg, separators=(",", ":"))


# Count compressed frames the clients receive (evidence that deflate is used).
COMPRESSED = collections.Counter()
try:
    from websockets.extensions import permessage_deflate as _pmd

    _orig_decode = _pmd.PerMessageDeflate.decode

    def _counting_decode(self, frame, *args, **kwargs):
        if frame.rsv1:
            COMPRESSED["frames"] += 1
            COMPRESSED["wire_bytes"] += len(frame.data)
        return _orig_decode(self, frame, *args, **kwargs)

    _pmd.PerMessageDeflate.decode = _counting_decode
    COUNTING = True
except (ImportError, AttributeError):
    COUNTING = False


# ---------------------------------------------------------------- publishers


class HttpPublisher:
    """One persistent HTTP/1.1 connection, reopened if the server closes it."""

    def __init__(self, port):
        self.port = port
        self.conn = None

    def post(self, path, body, headers):
        for attempt in range(3):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                self.conn.request("POST", path, body=body.encode(), headers=headers)
                resp = self.conn.getresponse()
                data = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self.close()
                return resp.status, data
            except (http.client.HTTPException, OSError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class Nchan:
    name = "nchan"
    script_dir = os.path.join(HERE, "nchan")

    def __init__(self, deflate):
        self.deflate = deflate
        self.port = free_port()

    def start_args(self, d):
        return ["--dir", d, "--port", str(self.port), "--deflate", self.deflate]

    def ws_url(self):
        return "ws://127.0.0.1:%d/sub/%s" % (self.port, CHANNEL)

    def publisher(self):
        pub = HttpPublisher(self.port)

        def publish(text):
            status, body = pub.post("/pub/" + CHANNEL, text, {"Content-Type": "application/json"})
            if status not in (201, 202):
                raise RuntimeError("nchan publish: HTTP %d %r" % (status, body[:200]))

        return publish, pub.close


class Pushpin:
    name = "pushpin"
    script_dir = os.path.join(HERE, "pushpin")

    def __init__(self, deflate):
        self.deflate = deflate
        self.port = free_port()
        self.publish_port = free_port()
        while self.publish_port == self.port:
            self.publish_port = free_port()

    def start_args(self, d):
        return ["--dir", d, "--port", str(self.port), "--publish-port", str(self.publish_port),
                "--deflate", self.deflate]

    def ws_url(self):
        return "ws://127.0.0.1:%d/sub/%s" % (self.port, CHANNEL)

    def publisher(self):
        pub = HttpPublisher(self.publish_port)

        def publish(text):
            body = json.dumps({"items": [{"channel": CHANNEL,
                                          "formats": {"ws-message": {"content": text}}}]})
            status, data = pub.post("/publish/", body, {"Content-Type": "application/json"})
            if status != 200:
                raise RuntimeError("pushpin publish: HTTP %d %r" % (status, data[:200]))

        return publish, pub.close


# ---------------------------------------------------------------- fan-out check


class Sub:
    def __init__(self):
        self.seqs = []
        self.latencies_us = []
        self.probed = asyncio.Event()
        self.done = asyncio.Event()
        self.extensions = None


async def read_messages(ws, sub, messages):
    async for raw in ws:
        now_us = time.time_ns() // 1000
        msg = json.loads(raw)
        if "probe" in msg:
            sub.probed.set()
            continue
        sub.seqs.append(msg["seq"])
        sub.latencies_us.append(now_us - msg["ts"])
        if len(sub.seqs) >= messages:
            sub.done.set()
            return


async def fanout(peer, compression, subscribers, messages):
    """Subscribe, barrier, publish, collect. Returns (subs, publish_seconds)."""
    subs = [Sub() for _ in range(subscribers)]
    conns = []
    readers = []
    publish, close_publisher = peer.publisher()
    try:
        async def open_one(sub):
            ws = await connect(peer.ws_url(), compression=compression, ping_interval=None,
                               open_timeout=10, max_size=2 ** 20)
            sub.extensions = ws.response.headers.get("Sec-WebSocket-Extensions")
            return ws

        conns = await asyncio.wait_for(
            asyncio.gather(*(open_one(s) for s in subs)), PHASE_TIMEOUT)
        readers = [asyncio.create_task(read_messages(ws, s, messages))
                   for ws, s in zip(conns, subs)]

        # Barrier: a subscription may become active a little after the
        # handshake (Pushpin subscribes asynchronously), so publish probes
        # until every subscriber has seen one.
        deadline = time.monotonic() + PHASE_TIMEOUT
        probes = 0
        while not all(s.probed.is_set() for s in subs):
            if time.monotonic() > deadline:
                missing = sum(not s.probed.is_set() for s in subs)
                raise AssertionError("%d subscribers saw no probe after %d probes" % (missing, probes))
            await asyncio.to_thread(publish, json.dumps({"probe": probes}))
            probes += 1
            await asyncio.sleep(0.1)

        started = time.monotonic()
        for seq in range(messages):
            await asyncio.to_thread(publish, make_payload(seq))
            await asyncio.sleep(0.02)
        published = time.monotonic() - started

        await asyncio.wait_for(asyncio.gather(*(s.done.wait() for s in subs)), PHASE_TIMEOUT)
        return subs, probes, published
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)
        close_publisher()


class PeerRun:
    """One start-to-stop run of a peer in its own temp dir. On leaving, the peer is stopped
    if the run did not stop it (a failed check), and the dir is removed unless kept."""

    def __init__(self, label, prefix, stop_sh, keep):
        self.label, self.stop_sh, self.keep = label, stop_sh, keep
        self.dir = tempfile.mkdtemp(prefix=prefix)
        self.stopped = False

    def __enter__(self):
        return self

    def stop_and_check(self, pids):
        """Stop the peer and assert that none of its processes is left."""
        run_script([self.stop_sh, "--dir", self.dir], STOP_TIMEOUT)
        self.stopped = True
        left = wait_gone([p for _, p in pids], 10) + [p for p, _ in procs_mentioning(self.dir)]
        if left:
            raise AssertionError("processes left after stop: %r" % left)
        print("  %s: stopped, no process left" % self.label, flush=True)

    def __exit__(self, *exc):
        if not self.stopped:
            with contextlib.suppress(Exception):
                run_script([self.stop_sh, "--dir", self.dir], STOP_TIMEOUT)
        if self.keep:
            print("  kept %s" % self.dir)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        return False


def check_fanout(peer, compression, subscribers, messages, keep):
    label = "%s deflate=%s client=%s" % (peer.name, peer.deflate, compression or "plain")
    start_sh = os.path.join(peer.script_dir, "start.sh")
    stop_sh = os.path.join(peer.script_dir, "stop.sh")
    with PeerRun(label, "peer-%s-" % peer.name, stop_sh, keep) as run:
        d = run.dir
        pids = parse_pids(run_script([start_sh] + peer.start_args(d), START_TIMEOUT))
        if not pids:
            raise AssertionError("start.sh printed no pids")
        print("  %s: started %s" % (label, " ".join("%s=%d" % rp for rp in pids)), flush=True)
        COMPRESSED.clear()
        subs, probes, published = asyncio.run(fanout(peer, compression, subscribers, messages))

        for i, s in enumerate(subs):
            if s.seqs != list(range(messages)):
                raise AssertionError("subscriber %d got %r" % (i, s.seqs))
        lat_ms = [us / 1000 for s in subs for us in s.latencies_us]
        extensions = collections.Counter(s.extensions for s in subs)
        print("  %s: %d subscribers x %d messages in order (%d probes), median latency %.2f ms, "
              "max %.2f ms; server extensions %s; compressed frames received %s" % (
                  label, subscribers, messages, probes, statistics.median(lat_ms), max(lat_ms),
                  dict(extensions), COMPRESSED["frames"] if COUNTING else "n/a"), flush=True)
        offered = compression == "deflate"
        if offered and peer.deflate == "on":
            if extensions.get("permessage-deflate", 0) != subscribers:
                raise AssertionError("permessage-deflate not negotiated by all: %r" % extensions)
            if COUNTING and COMPRESSED["frames"] < subscribers * messages:
                raise AssertionError("only %d compressed frames" % COMPRESSED["frames"])
        if peer.deflate == "off" and COUNTING and COMPRESSED["frames"]:
            raise AssertionError("%d compressed frames with deflate off" % COMPRESSED["frames"])

        run.stop_and_check(pids)
        return True


# ---------------------------------------------------------------- HAProxy check


def load_stats_module():
    spec = importlib.util.spec_from_file_location("haproxy_stats",
                                                  os.path.join(HERE, "haproxy", "stats.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def haproxy_relay(balance, d, connections):
    """Relay `connections` WebSockets through HAProxy to two echo servers A and B.

    Phase 1 opens half of them (split evenly by either algorithm), then 4 of
    A's are closed, then phase 2 opens the other half. leastconn sends the
    first new ones to A until it catches up; roundrobin keeps alternating.
    Returns (pids, replies per server, current connections per server from the
    stats socket, total per server from the stats socket, frontend total).
    """
    stats = load_stats_module()

    def echo_handler(name):
        async def handler(ws):
            async for msg in ws:
                await ws.send("%s:%s" % (name, msg))
        return handler

    async with serve(echo_handler("A"), "127.0.0.1", 0) as server_a, \
            serve(echo_handler("B"), "127.0.0.1", 0) as server_b:
        addr = {"127.0.0.1:%d" % server_a.sockets[0].getsockname()[1]: "A",
                "127.0.0.1:%d" % server_b.sockets[0].getsockname()[1]: "B"}
        port = free_port()
        start_sh = os.path.join(HERE, "haproxy", "start.sh")
        args = [start_sh, "--dir", d, "--port", str(port), "--balance", balance]
        for a in addr:
            args += ["--server", a]
        pids = parse_pids(await asyncio.to_thread(run_script, args, START_TIMEOUT))
        sock = os.path.join(d, "haproxy.sock")

        async def by_server():
            counters = await asyncio.to_thread(stats.server_counters, sock)
            cur = {addr[v["addr"]]: v["scur"] for k, v in counters.items() if k != "frontend"}
            tot = {addr[v["addr"]]: v["stot"] for k, v in counters.items() if k != "frontend"}
            return cur, tot, counters["frontend"]["stot"]

        open_conns = []  # (server name, ws)
        replies = collections.Counter()
        try:
            async def open_some(n):
                for _ in range(n):
                    ws = await connect("ws://127.0.0.1:%d/" % port, open_timeout=10,
                                       ping_interval=None)
                    await ws.send("hello %d" % len(open_conns))
                    name = (await asyncio.wait_for(ws.recv(), 10)).split(":", 1)[0]
                    replies[name] += 1
                    open_conns.append((name, ws))

            half = connections // 2
            await open_some(half)
            on_a = [ws for name, ws in open_conns if name == "A"]
            if len(on_a) < 4:
                raise AssertionError("phase 1 put only %d of %d on A" % (len(on_a), half))
            for ws in on_a[:4]:
                await ws.close()
            open_conns = [(n, ws) for n, ws in open_conns if ws not in on_a[:4]]
            # HAProxy notices the closes asynchronously; wait (bounded) for them.
            deadline = time.monotonic() + 10
            while True:
                cur, _, _ = await by_server()
                if cur.get("A") == len(on_a) - 4 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            await open_some(connections - half)
            cur, tot, front = await by_server()
            return pids, replies, cur, tot, front
        finally:
            await asyncio.gather(*(ws.close() for _, ws in open_conns), return_exceptions=True)


def check_haproxy(balance, connections, keep):
    label = "haproxy balance=%s" % balance
    stop_sh = os.path.join(HERE, "haproxy", "stop.sh")
    with PeerRun(label, "peer-haproxy-", stop_sh, keep) as run:
        d = run.dir
        pids, replies, cur, tot, front = asyncio.run(haproxy_relay(balance, d, connections))
        print("  %s: started %s; relayed %d connections, echo replies by server %s; "
              "after closing 4 on A, stats show current %s, total %s, frontend total %d" % (
                  label, " ".join("%s=%d" % rp for rp in pids), sum(replies.values()),
                  dict(replies), cur, tot, front), flush=True)
        half = connections // 2
        second = connections - half
        # Phase 1 splits evenly; 4 of A's are closed: A = half/2 - 4, B = half/2.
        a0, b0 = half // 2 - 4, half - half // 2
        if balance == "leastconn":
            # A catches up first, the rest alternate.
            catch_up = min(b0 - a0, second)
            rest = second - catch_up
            expected = {"A": a0 + catch_up + rest // 2, "B": b0 + rest - rest // 2}
            if abs(expected["A"] - cur["A"]) > 1 or expected["A"] + expected["B"] != cur["A"] + cur["B"]:
                raise AssertionError("leastconn: current %r, expected about %r" % (cur, expected))
        else:
            expected = {"A": a0 + second // 2, "B": b0 + second - second // 2}
            if sorted(cur.values()) != sorted(expected.values()):
                raise AssertionError("roundrobin: current %r, expected %r" % (cur, expected))
        if front != connections or sum(tot.values()) != connections:
            raise AssertionError("totals: frontend %d, servers %r, expected %d" % (front, tot, connections))
        run.stop_and_check(pids)
        return True


# ---------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="nchan,pushpin,haproxy",
                        help="comma-separated subset of nchan,pushpin,haproxy")
    parser.add_argument("--subscribers", type=int, default=50)
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--connections", type=int, default=20,
                        help="HAProxy relayed connections (at least 16)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs (logs, configs)")
    args = parser.parse_args()
    only = set(args.only.split(","))

    cases = []
    for cls in (Nchan, Pushpin):
        if cls.name in only:
            cases.append(("%s plain" % cls.name,
                          lambda cls=cls: check_fanout(cls("off"), None, args.subscribers,
                                                       args.messages, args.keep)))
            cases.append(("%s deflate" % cls.name,
                          lambda cls=cls: check_fanout(cls("on"), "deflate", args.subscribers,
                                                       args.messages, args.keep)))
    if "haproxy" in only:
        for balance in ("leastconn", "roundrobin"):
            cases.append(("haproxy %s" % balance,
                          lambda b=balance: check_haproxy(b, args.connections, args.keep)))

    passed = failed = 0
    for name, case in cases:
        print("%s:" % name, flush=True)
        try:
            case()
            passed += 1
            print("  PASS", flush=True)
        except Exception:
            failed += 1
            print("  FAIL", flush=True)
            traceback.print_exc(file=sys.stdout)
    print("%d passed, %d failed" % (passed, failed))
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())

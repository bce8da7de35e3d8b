#!/usr/bin/env python3
"""Minimal GRIP WebSocket-over-HTTP backend for the Pushpin benchmark peer.

Pushpin turns each client WebSocket's activity into HTTP POSTs to this backend
(route option over_http). The body is a list of events:

    TYPE[ <hex length>]\\r\\n[content\\r\\n]

This backend:
- OPEN  -> accepts (OPEN) and subscribes the connection to the channel named by
           the request path /sub/<channel> with the GRIP control message
           c:{"type":"subscribe","channel":"<channel>"}.
- TEXT, BINARY -> ignored (subscribers only listen).
- PING  -> PONG with the same payload.
- PONG  -> nothing.
- CLOSE -> CLOSE with the same code (completes the close handshake).
- DISCONNECT -> nothing (Pushpin forgets the connection).
- plain GET (no WebSocket) -> 200 "ok", used as a readiness probe through Pushpin.

Python standard library only. Binds 127.0.0.1; --port 0 picks a free port and
--port-file records the one chosen.
"""

import argparse
import http.server
import json
import os
import re
import signal
import sys
import threading
from urllib.parse import unquote

EVENTS_TYPE = "application/websocket-events"
SUB_PATH = re.compile(r"^/sub/([^/?#]+)")


def decode_events(body: bytes):
    """Parse a WebSocket-over-HTTP event list into [(type, content or None)]."""
    events = []
    pos = 0
    while pos < len(body):
        end = body.find(b"\r\n", pos)
        if end < 0:
            raise ValueError("event line without CRLF")
        line = body[pos:end]
        pos = end + 2
        if b" " in line:
            etype, hexlen = line.split(b" ", 1)
            size = int(hexlen, 16)
            content = body[pos:pos + size]
            if len(content) != size or body[pos + size:pos + size + 2] != b"\r\n":
                raise ValueError("truncated event content")
            pos += size + 2
            events.append((etype.decode("ascii"), content))
        else:
            events.append((line.decode("ascii"), None))
    return events


def encode_event(etype: str, content=None) -> bytes:
    if content is None:
        return etype.encode("ascii") + b"\r\n"
    return b"%s %x\r\n%s\r\n" % (etype.encode("ascii"), len(content), content)


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}

    def add(self, key):
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + 1


STATS = Stats()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive with Pushpin's HTTP client
    server_version = "grip-backend"
    # TCP_NODELAY: without it the body, written after the headers, waits for
    # a delayed ACK (~40 ms per client connect).
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):  # no per-request logging
        pass

    def _reply(self, code, body=b"", ctype="text/plain", headers=()):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_GET(self):
        if self.path == "/stats":
            with STATS.lock:
                body = json.dumps(STATS.counts, sort_keys=True).encode()
            self._reply(200, body, "application/json")
            return
        self._reply(200, b"ok\n")

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.headers.get("Content-Type", "").split(";")[0].strip() != EVENTS_TYPE:
            self._reply(200, b"ok\n")
            return
        try:
            events = decode_events(body)
        except ValueError as err:
            STATS.add("bad_request")
            self._reply(400, ("bad events: %s\n" % err).encode())
            return

        out = []
        headers = []
        for etype, content in events:
            STATS.add(etype)
            if etype == "OPEN":
                match = SUB_PATH.match(self.path)
                if not match:
                    # Not a subscriber path: refuse the WebSocket.
                    self._reply(404, b"subscribe at /sub/<channel>\n")
                    return
                channel = unquote(match.group(1))
                control = json.dumps({"type": "subscribe", "channel": channel},
                                     separators=(",", ":"))
                out.append(encode_event("OPEN"))
                out.append(encode_event("TEXT", b"c:" + control.encode()))
                # Enables GRIP control messages ("c:" prefix) on this connection.
                headers.append(("Sec-WebSocket-Extensions", "grip"))
            elif etype == "PING":
                out.append(encode_event("PONG", content if content else None))
            elif etype == "CLOSE":
                out.append(encode_event("CLOSE", content if content else None))
            # TEXT, BINARY, PONG, DISCONNECT: nothing to answer.
        self._reply(200, b"".join(out), EVENTS_TYPE, headers)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 4096
    allow_reuse_address = True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0 = any free port")
    parser.add_argument("--port-file", help="write the bound port here")
    args = parser.parse_args()

    server = Server(("127.0.0.1", args.port), Handler)
    port = server.server_address[1]
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write("%d\n" % port)
        os.replace(tmp, args.port_file)

    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("grip backend on 127.0.0.1:%d" % port, file=sys.stderr, flush=True)
    server.serve_forever(poll_interval=0.5)
    server.server_close()


if __name__ == "__main__":
    main()

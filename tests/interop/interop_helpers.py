"""Helpers for the ZeroMQ / WebSocket interop tests (the fixtures are in conftest.py).

Every wait here has a deadline: conditions are polled every 50 ms up to a bounded time, and
nothing sleeps to "let things settle". Every process started here is killed in teardown.
Everything binds 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Optional, Union

import pytest
import zmq
from websockets.asyncio.client import connect as ws_connect

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_WORKER_BIN = REPO / "target" / "debug" / "worker"
PUBLISHER_SCRIPT = HERE / "pushfleet_publisher.py"
SUBPROTOCOL = "pushfleet.v1"
POLL_S = 0.05

# A payload object carrying this key is a synchronisation probe (see `sync_topic`); the
# helpers that collect messages skip such messages.
SYNC_KEY = "__sync__"


def worker_bin() -> Path:
    return Path(os.environ.get("WORKER_BIN") or DEFAULT_WORKER_BIN)


# --------------------------------------------------------------------------------------------
# Deadlines
# --------------------------------------------------------------------------------------------


def wait_until_sync(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    """Polls ``cond()`` every 50 ms until it returns something truthy (returned), or fails
    after ``timeout`` seconds naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(POLL_S)


async def wait_until(
    cond: Callable[[], Union[Any, Awaitable[Any]]],
    timeout: float,
    what: Union[str, Callable[[], str]],
) -> Any:
    """Async version of `wait_until_sync`; ``cond`` may be sync or async. ``what`` may be a
    callable producing a description (e.g. with the last value seen) for the failure."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            desc = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {desc}")
        await asyncio.sleep(POLL_S)


def run(coro: Awaitable[Any], timeout: float = 20.0) -> Any:
    """Runs one test's async body with a hard deadline for the whole of it."""

    async def bounded() -> Any:
        try:
            return await asyncio.wait_for(coro, timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"test body exceeded its {timeout:.0f}s deadline") from None

    return asyncio.run(bounded())


# --------------------------------------------------------------------------------------------
# Prometheus text
# --------------------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Parses Prometheus text exposition into ``(name, labels, value)`` samples."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels_text, value = m.groups()
        labels = {
            k: v.replace(r"\"", '"').replace(r"\n", "\n").replace("\\\\", "\\")
            for k, v in _LABEL.findall(labels_text or "")
        }
        try:
            samples.append((name, labels, float(value)))
        except ValueError:
            continue
    return samples


def metric_sum(text: str, name: str, **labels: str) -> Optional[float]:
    """Sum of all samples of ``name`` whose labels include ``labels``; None if there is none."""
    values = [
        v
        for n, ls, v in parse_metrics(text)
        if n == name and all(ls.get(k) == want for k, want in labels.items())
    ]
    return sum(values) if values else None


# --------------------------------------------------------------------------------------------
# The worker process
# --------------------------------------------------------------------------------------------


class Worker:
    """One worker subprocess on ephemeral loopback ports; its stdout+stderr go to a file."""

    def __init__(self, tmp_path: Path, name: str, publishers: Iterable[str], extra: Iterable[str]):
        self.name = name
        self.publishers = list(publishers)
        self.announce = tmp_path / f"{name}.announce.json"
        self.log_path = tmp_path / f"{name}.log"
        binary = worker_bin()
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            pytest.fail(
                f"worker binary {binary} not found or not executable: build it "
                f"(cargo build -p pushfleet-worker) or set WORKER_BIN",
                pytrace=False,
            )
        self.argv = [
            str(binary),
            "--id", name,
            "--listen", "127.0.0.1:0",
            "--admin-listen", "127.0.0.1:0",
            "--announce-file", str(self.announce),
        ]
        for endpoint in self.publishers:
            self.argv += ["--publisher", endpoint]
        self.argv += list(extra)
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        env.setdefault("RUST_BACKTRACE", "1")
        # The WORKER_* variables would override nothing we pass, but could add settings.
        for key in [k for k in env if k.startswith("WORKER_") and k != "WORKER_BIN"]:
            del env[key]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(tmp_path),
        )
        self.ws_addr: Optional[str] = None
        self.admin_addr: Optional[str] = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def wait_announced(self, timeout: float = 15.0) -> None:
        def ready() -> Optional[dict]:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"worker exited with {self.proc.returncode} before announcing its ports\n"
                    f"argv: {' '.join(self.argv)}\n--- log ---\n{self.log_tail()}"
                )
            try:
                data = json.loads(self.announce.read_text())
            except (FileNotFoundError, ValueError):
                return None  # not written yet, or written only partly
            return data if isinstance(data, dict) and data.get("ws") and data.get("admin") else None

        try:
            data = wait_until_sync(ready, timeout, f"{self.announce} to hold the bound ports")
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- worker log ---\n{self.log_tail()}") from None
        self.ws_addr = data["ws"]
        self.admin_addr = data["admin"]

    @property
    def ws_url(self) -> str:
        return f"ws://{self.ws_addr}/ws"

    def http_get(self, path: str, timeout: float = 3.0) -> tuple[int, str]:
        """GET on the admin port; returns (status, body) for any HTTP status."""
        try:
            with self._opener.open(f"http://{self.admin_addr}{path}", timeout=timeout) as r:
                return r.status, r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", "replace")

    def metrics(self) -> str:
        status, body = self.http_get("/metrics")
        assert status == 200, f"GET /metrics answered {status}: {body[:500]}"
        return body

    async def ametrics(self) -> str:
        return await asyncio.to_thread(self.metrics)

    async def metric(self, name: str, **labels: str) -> Optional[float]:
        return metric_sum(await self.ametrics(), name, **labels)

    async def wait_metric(
        self,
        name: str,
        pred: Callable[[Optional[float]], bool],
        timeout: float,
        what: str,
        **labels: str,
    ) -> Optional[float]:
        """Polls ``name{labels}`` (summed) until ``pred(value)``; returns the value."""
        seen: list[Optional[float]] = [None]

        async def check() -> bool:
            seen[0] = await self.metric(name, **labels)
            return pred(seen[0])

        await wait_until(check, timeout, lambda: f"{what} (last {name}{labels} = {seen[0]})")
        return seen[0]

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = 200) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 3 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


# --------------------------------------------------------------------------------------------
# ZeroMQ side
# --------------------------------------------------------------------------------------------


def bind_random(ctx: zmq.Context, kind: int, **opts: int) -> tuple[zmq.Socket, str]:
    """A socket of ``kind`` bound to a random loopback port; returns (socket, endpoint)."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in opts.items():
        sock.setsockopt(getattr(zmq, name), value)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, f"tcp://127.0.0.1:{port}"


class XpubEvents:
    """Collects the subscription events an XPUB socket reads (b"\\x01topic" / b"\\x00topic")."""

    def __init__(self, sock: zmq.Socket):
        self.sock = sock
        self.events: list[bytes] = []

    def drain(self) -> list[bytes]:
        while True:
            try:
                frame = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return self.events
            self.events.append(frame)

    def seen(self, event: bytes) -> bool:
        self.drain()
        return event in self.events

    def index(self, event: bytes) -> int:
        self.drain()
        return self.events.index(event)


class PublisherProcess:
    """``pushfleet_publisher.py`` run as a subprocess; reads its ``bound``/``epoch`` lines."""

    def __init__(self, name: str, args: list[str]):
        self.name = name
        self.argv = [sys.executable, str(PUBLISHER_SCRIPT), *args]
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._buf = b""
        self.lines: list[str] = []

    def _read_available(self) -> None:
        out = self.proc.stdout
        while out is not None and select.select([out], [], [], 0)[0]:
            chunk = os.read(out.fileno(), 65536)
            if not chunk:
                break
            self._buf += chunk
        *complete, self._buf = self._buf.split(b"\n")
        self.lines += [c.decode("utf-8", "replace") for c in complete]

    def wait_line(self, prefix: str, timeout: float = 10.0) -> str:
        def find() -> Optional[str]:
            self._read_available()
            for line in self.lines:
                if line.startswith(prefix):
                    return line[len(prefix):].strip()
            if self.proc.poll() is not None:
                self._read_available()
                raise AssertionError(
                    f"publisher {self.name} exited with {self.proc.returncode}:\n"
                    + "\n".join(self.lines)
                )
            return None

        return wait_until_sync(find, timeout, f"publisher {self.name} to print {prefix!r}")

    def output_text(self) -> str:
        try:
            self._read_available()
        except (OSError, ValueError):
            pass
        return "\n".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def close(self) -> None:
        self.kill()
        if self.proc.stdout:
            self.proc.stdout.close()


# --------------------------------------------------------------------------------------------
# WebSocket side
# --------------------------------------------------------------------------------------------


def is_sync(msg: dict) -> bool:
    payload = msg.get("payload")
    return isinstance(payload, dict) and SYNC_KEY in payload


class Client:
    """A pushfleet.v1 WebSocket client. Pushes that arrive while waiting for a reply are kept
    in a backlog and returned by `next_message` in order."""

    def __init__(self, conn: Any, label: str):
        self.conn = conn
        self.label = label
        self.welcome: dict = {}
        self.backlog: deque[dict] = deque()
        self._next_id = 0

    @classmethod
    async def connect(cls, worker: Worker, label: str = "client", **kwargs: Any) -> "Client":
        options = dict(
            subprotocols=[SUBPROTOCOL],
            proxy=None,  # never route loopback test traffic through an HTTP(S)_PROXY
            open_timeout=5,
            close_timeout=2,
            max_size=None,
        )
        options.update(kwargs)
        conn = await ws_connect(worker.ws_url, **options)
        client = cls(conn, label)
        assert conn.subprotocol == SUBPROTOCOL, f"negotiated subprotocol {conn.subprotocol!r}"
        welcome = await client.recv_json(5)
        assert welcome.get("type") == "welcome", f"first message is not a welcome: {welcome}"
        assert welcome.get("protocol") == SUBPROTOCOL, welcome
        assert welcome.get("worker") == worker.name, welcome
        assert isinstance(welcome.get("connection"), int), welcome
        client.welcome = welcome
        return client

    async def recv_json(self, timeout: float) -> dict:
        try:
            frame = await asyncio.wait_for(self.conn.recv(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"{self.label}: nothing received within {timeout:.1f}s") from None
        assert isinstance(frame, str), f"{self.label}: binary frame on pushfleet.v1: {frame[:64]!r}"
        return json.loads(frame)

    async def send(self, obj: dict) -> None:
        await self.conn.send(json.dumps(obj))

    async def request(self, op: str, timeout: float = 5.0, **fields: Any) -> dict:
        """Sends ``{"op": op, "id": n, **fields}`` and returns the reply with that id."""
        self._next_id += 1
        rid = self._next_id
        await self.send({"op": op, "id": rid, **fields})
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.label}: no reply to {op} id={rid} within {timeout}s")
            msg = await self.recv_json(left)
            if msg.get("type") in ("ack", "error", "pong") and msg.get("id") == rid:
                return msg
            if msg.get("type") == "message":
                self.backlog.append(msg)
            else:
                raise AssertionError(f"{self.label}: unexpected frame while awaiting reply: {msg}")

    async def subscribe(self, topic: Optional[str] = None, prefix: Optional[str] = None) -> dict:
        field = {"topic": topic} if topic is not None else {"prefix": prefix}
        reply = await self.request("subscribe", **field)
        assert reply == {"type": "ack", "id": self._next_id, "op": "subscribe", **field}, reply
        return reply

    async def unsubscribe(self, topic: Optional[str] = None, prefix: Optional[str] = None) -> dict:
        field = {"topic": topic} if topic is not None else {"prefix": prefix}
        reply = await self.request("unsubscribe", **field)
        assert reply == {"type": "ack", "id": self._next_id, "op": "unsubscribe", **field}, reply
        return reply

    async def poll_message(self, timeout: float, include_sync: bool = False) -> Optional[dict]:
        """The next push within ``timeout`` (None if there is none); sync probes are skipped
        unless ``include_sync``."""
        deadline = time.monotonic() + timeout
        while True:
            if self.backlog:
                msg = self.backlog.popleft()
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                try:
                    frame = await asyncio.wait_for(self.conn.recv(), left)
                except asyncio.TimeoutError:
                    return None
                assert isinstance(frame, str), f"{self.label}: binary frame {frame[:64]!r}"
                msg = json.loads(frame)
            assert msg.get("type") == "message", f"{self.label}: unexpected frame {msg}"
            if include_sync or not is_sync(msg):
                return msg

    async def next_message(self, timeout: float = 5.0) -> dict:
        msg = await self.poll_message(timeout)
        assert msg is not None, f"{self.label}: no message within {timeout:.1f}s"
        return msg

    async def messages_until(self, is_last: Callable[[dict], bool], timeout: float = 5.0) -> list[dict]:
        """Collects (non-sync) pushes up to and including the first one for which
        ``is_last(msg)``; fails if that one does not arrive within ``timeout``."""
        got: list[dict] = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            msg = await self.poll_message(max(left, 0))
            if msg is None:
                raise AssertionError(
                    f"{self.label}: sentinel not received within {timeout:.1f}s; got {got}"
                )
            got.append(msg)
            if is_last(msg):
                return got

    async def close(self) -> None:
        await self.conn.close()


async def sync_topic(
    send: Callable[[bytes, bytes], None],
    clients: list[Client],
    topic: str,
    timeout: float = 10.0,
) -> None:
    """Proves the path publisher → worker → client is live for ``topic``: publishes a probe
    ``{"__sync__": n}`` on it every 50 ms until every client has received one (ZeroMQ
    subscriptions propagate asynchronously, so a message published right after the
    subscribe ack may be dropped by the PUB socket). Later reads skip leftover probes.

    ``send(topic_bytes, payload_bytes)`` publishes one message."""
    pending = list(clients)
    deadline = time.monotonic() + timeout
    n = 0
    while pending:
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"no message published on {topic!r} reached {[c.label for c in pending]} "
                f"within {timeout:.1f}s (is the worker subscribed and connected upstream?)"
            )
        n += 1
        send(topic.encode(), json.dumps({SYNC_KEY: n}).encode())
        still = []
        for client in pending:
            got = False
            per_client = POLL_S / len(pending)
            while True:
                msg = await client.poll_message(per_client, include_sync=True)
                if msg is None:
                    break
                if is_sync(msg):
                    if msg["topic"] == topic:
                        got = True
                        break
                else:
                    raise AssertionError(f"{client.label}: unexpected message during sync: {msg}")
            if not got:
                still.append(client)
        pending = still


def plain_sender(sock: zmq.Socket) -> Callable[[bytes, bytes], None]:
    """A ``send`` for `sync_topic` publishing two-frame messages on ``sock``."""
    return lambda topic, payload: sock.send_multipart([topic, payload])

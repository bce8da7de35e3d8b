"""Interop tests for history: the real worker binary, the Python example publisher
(``pushfleet_publisher.Publisher`` on a pyzmq PUB socket) and real WebSocket clients.

They cover what PROTOCOL.md sections 1-3 promise across process boundaries: catch-up with
``last``, position checks sent by libzmq, gap notices, resume on another worker whose history
came from a peer, repair of a message lost on the way to one worker, and the peer
``GET /history`` body.

Every worker here keeps history for ``hist.*`` and so subscribes to ``hist.`` upstream for
good. ZeroMQ's slow joiner (a PUB socket drops what it sends before the subscription has
reached it) is handled by `warm_up`: plain messages on ``hist.warmup`` until the worker counts
one. After that every stamped message reaches the worker, since its upstream subscription
never changes.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple, Optional

import zmq

from interop_helpers import POLL_S, Client, Worker, bind_random, run, wait_until
from pushfleet_publisher import META_LEN, Publisher, decode_meta, encode_meta

HISTORY = ("--history", "hist.*")
WARMUP_TOPIC = "hist.warmup"

UPSTREAM_MESSAGES = "worker_upstream_messages_total"
UPSTREAM_MALFORMED = "worker_upstream_malformed_total"
LOST_MESSAGES = "worker_stream_lost_messages_total"
REPAIRED_MESSAGES = "worker_stream_repaired_messages_total"
STREAM_REPAIRS = "worker_stream_repairs_total"
STREAM_EVENTS = "worker_stream_events_total"
PEER_FETCHES = "worker_peer_fetches_total"
PEER_SERVED = "worker_peer_history_served_total"
REPLAYED = "worker_replayed_messages_total"
HISTORY_REQUESTS = "worker_history_requests_total"

HISTORY_CONTENT_TYPE = "application/x-pushfleet-history"
HISTORY_MAGIC = b"PFH\x01"

Stamped = tuple[int, int, Optional[int]]  # what Publisher.publish returns: (epoch, offset, ts)


# --------------------------------------------------------------------------------------------
# The peer history body (PROTOCOL.md section 3)
# --------------------------------------------------------------------------------------------


class HistoryEntry(NamedTuple):
    topic: str
    epoch: int
    offset: int
    published_at_us: Optional[int]
    payload: bytes
    meta: bytes


def decode_history(body: bytes) -> list[HistoryEntry]:
    """Reads a ``GET /history`` body: ``"PFH" 0x01`` then entries of
    ``topic_len u16 | topic | meta (28 bytes) | payload_len u32 | payload``, big-endian.
    Raises ValueError for anything else (a truncated entry, an entry without a position, a
    position check)."""
    if body[:4] != HISTORY_MAGIC:
        raise ValueError(f"body does not start with {HISTORY_MAGIC!r}: {body[:8]!r}")
    entries: list[HistoryEntry] = []
    at = 4

    def take(n: int) -> bytes:
        nonlocal at
        if at + n > len(body):
            raise ValueError(f"body truncated inside entry {len(entries)}")
        chunk = body[at:at + n]
        at += n
        return chunk

    while at < len(body):
        (topic_len,) = struct.unpack(">H", take(2))
        topic = take(topic_len).decode("utf-8")
        meta = take(META_LEN)
        (payload_len,) = struct.unpack(">I", take(4))
        payload = take(payload_len)
        epoch, offset, ts, check = decode_meta(meta)
        if epoch is None or offset is None or check:
            raise ValueError(f"entry {len(entries)} is not a positioned message: {meta.hex()}")
        entries.append(HistoryEntry(topic, epoch, offset, ts, payload, meta))
    return entries


def encode_history_entry(topic: str, meta: bytes, payload: bytes) -> bytes:
    """One entry of a history body, as the worker must write it."""
    t = topic.encode("utf-8")
    return struct.pack(">H", len(t)) + t + meta + struct.pack(">I", len(payload)) + payload


_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def admin_get(worker: Worker, path: str) -> tuple[int, str, bytes]:
    """GET on the worker's admin port: (status, content type, raw body) for any status."""
    try:
        with _opener.open(f"http://{worker.admin_addr}{path}", timeout=3) as r:
            return r.status, r.headers.get("content-type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", ""), e.read()


def history_path(topic: str, **params: object) -> str:
    return "/history?" + urllib.parse.urlencode({"topic": topic, **params})


async def wait_history(
    worker: Worker, topic: str, pred: Callable[[list[HistoryEntry]], bool], timeout: float = 5
) -> list[HistoryEntry]:
    """Polls the worker's ``GET /history?topic=..`` until its entries satisfy ``pred`` (a 404
    means none yet); returns them."""
    last: list[object] = [None]

    async def check() -> Optional[list[HistoryEntry]]:
        status, _, body = await asyncio.to_thread(admin_get, worker, history_path(topic))
        if status == 404:
            last[0] = "404"
            return None
        assert status == 200, f"GET /history on {worker.name}: {status} {body[:200]!r}"
        entries = decode_history(body)
        last[0] = [e.offset for e in entries]
        return entries if pred(entries) else None

    return await wait_until(
        check, timeout, lambda: f"history of {topic!r} on {worker.name} (last seen: {last[0]})"
    )


# --------------------------------------------------------------------------------------------
# Publishing
# --------------------------------------------------------------------------------------------


async def warm_up(sock: zmq.Socket, workers: list[Worker], endpoint: str, timeout: float = 10) -> None:
    """Publishes plain messages on ``hist.warmup`` (inside every worker's history prefix, so
    covered by its permanent upstream subscription) every 50 ms until each worker has counted
    one from ``endpoint``. Plain messages carry no position, so they create no history."""
    pending = list(workers)
    deadline = time.monotonic() + timeout
    n = 0
    while pending:
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"no warm-up message from {endpoint} reached {[w.name for w in pending]} "
                f"within {timeout:.0f}s (is the worker connected and subscribed to 'hist.'?)"
            )
        n += 1
        sock.send_multipart([WARMUP_TOPIC.encode(), json.dumps({"warmup": n}).encode()])
        await asyncio.sleep(POLL_S)
        pending = [w for w in pending if not (await w.metric(UPSTREAM_MESSAGES, endpoint=endpoint) or 0) > 0]


@contextmanager
def publishing_via(pub: Publisher, sock: zmq.Socket) -> Iterator[None]:
    """Messages published inside go out on ``sock`` instead of the publisher's own socket,
    but still take the publisher's next offsets: to the workers not listening on ``sock``
    they are lost on the way, and the publisher's later messages and checks say so."""
    own = pub.socket
    pub.socket = sock
    try:
        yield
    finally:
        pub.socket = own


# --------------------------------------------------------------------------------------------
# Receiving
# --------------------------------------------------------------------------------------------


async def next_push(client: Client, timeout: float = 5.0) -> dict:
    """The next frame pushed to ``client`` (a message or a notice), in order."""
    if client.backlog:
        return client.backlog.popleft()
    return await client.recv_json(timeout)


async def next_messages(client: Client, n: int, timeout: float = 5.0) -> list[dict]:
    """The next ``n`` pushes, each of which must be a message (not a notice)."""
    got = []
    for _ in range(n):
        msg = await next_push(client, timeout)
        assert msg.get("type") == "message", f"{client.label}: expected a message, got {msg}; before it: {got}"
        got.append(msg)
    return got


def assert_stamped(got: list[dict], topic: str, sent: list[Stamped], payload_of: Callable[[int], object]) -> None:
    """``got`` are exactly the messages ``sent`` on ``topic``, in order, as stamped."""
    assert [m["position"]["offset"] for m in got] == [o for _, o, _ in sent], got
    for msg, (epoch, offset, ts) in zip(got, sent):
        assert msg == {
            "type": "message",
            "topic": topic,
            "position": {"epoch": f"{epoch:016x}", "offset": offset},
            "ts": ts,
            "payload": payload_of(offset),
        }, msg


def numbered(offset: int) -> dict:
    return {"n": offset}


async def subscribe_with_history(client: Client, topic: str, **history: object) -> dict:
    """Subscribes with ``last``/``since``; checks the ack's shape and returns its ``history``."""
    ack = await client.request("subscribe", topic=topic, **history)
    assert set(ack) == {"type", "id", "op", "topic", "history"}, ack
    assert (ack["type"], ack["op"], ack["topic"]) == ("ack", "subscribe", topic), ack
    return ack["history"]


async def metric_or_zero(worker: Worker, name: str, **labels: str) -> float:
    return await worker.metric(name, **labels) or 0


# --------------------------------------------------------------------------------------------
# a. catch-up with `last`
# --------------------------------------------------------------------------------------------


def test_catch_up_replays_exactly_the_last_messages_then_live(zctx, start_worker):
    sock, endpoint = bind_random(zctx, zmq.PUB)
    worker = start_worker([endpoint], "--history", "hist.*,messages=100", "--max-replay", "12")
    pub = Publisher(sock)
    topic = "hist.catchup"

    async def body() -> None:
        await warm_up(sock, [worker], endpoint)
        sent = [pub.publish(topic, numbered(i)) for i in range(20)]
        await wait_history(worker, topic, lambda es: bool(es) and es[-1].offset == 19)
        tail = {"epoch": pub.epoch_hex, "offset": 19}

        client = await Client.connect(worker, "last-5")
        capped = await Client.connect(worker, "last-1000")
        try:
            assert await subscribe_with_history(client, topic, last=5) == {"replayed": 5, "position": tail}
            assert_stamped(await next_messages(client, 5), topic, sent[15:], numbered)

            # More than max_replay (12) asked: the last 12 come.
            assert await subscribe_with_history(capped, topic, last=1000) == {"replayed": 12, "position": tail}
            assert_stamped(await next_messages(capped, 12), topic, sent[8:], numbered)

            # Live messages follow the replay, with nothing between and nothing twice.
            live = [pub.publish(topic, numbered(i)) for i in (20, 21)]
            assert_stamped(await next_messages(client, 2), topic, live, numbered)
            assert_stamped(await next_messages(capped, 2), topic, live, numbered)

            assert await worker.metric(REPLAYED) == 17
            assert await worker.metric(HISTORY_REQUESTS, outcome="last") == 2
        finally:
            await client.close()
            await capped.close()

    run(body())


# --------------------------------------------------------------------------------------------
# b. position checks from libzmq; a lost tail becomes a gap notice when no peer can help
# --------------------------------------------------------------------------------------------


def test_position_checks_are_accepted_and_lost_messages_without_peers_become_gap_notices(
    zctx, start_worker
):
    sock, endpoint = bind_random(zctx, zmq.PUB)
    # A PUB socket no worker listens to: what is published on it is lost on the way.
    void, _ = bind_random(zctx, zmq.PUB)
    worker = start_worker([endpoint], *HISTORY)
    pub = Publisher(sock)
    topic = "hist.checks"

    async def body() -> None:
        await warm_up(sock, [worker], endpoint)
        client = await Client.connect(worker, "checks")
        try:
            await client.subscribe(topic=topic)
            sent = [pub.publish(topic, numbered(i)) for i in range(5)]
            assert_stamped(await next_messages(client, 5), topic, sent, numbered)

            # Two checks announcing the position the worker has (one sent directly, one as
            # a due check): received, not malformed, not delivered, no gap.
            before = await worker.metric(UPSTREAM_MESSAGES, endpoint=endpoint)
            assert pub.send_check(topic) == (pub.epoch, 4)
            assert pub.send_due_checks(0) == 1
            got = await worker.wait_metric(
                UPSTREAM_MESSAGES, lambda v: v is not None and v >= before + 2, 5,
                "the two position checks to reach the worker", endpoint=endpoint,
            )
            assert got == before + 2
            assert await metric_or_zero(worker, UPSTREAM_MALFORMED) == 0, await worker.ametrics()
            sent = [pub.publish(topic, numbered(5))]
            assert_stamped(await next_messages(client, 1), topic, sent, numbered)

            # The tail is lost: offsets 6..8 never reach the worker, then a check says 8 was
            # sent. No peer to ask, so the worker gives up at once.
            with publishing_via(pub, void):
                for i in range(6, 9):
                    pub.publish(topic, numbered(i))
            assert pub.send_check(topic) == (pub.epoch, 8)
            gap = await next_push(client, timeout=3)
            assert gap == {"type": "gap", "topic": topic, "epoch": pub.epoch_hex, "from": 6, "to": 8}, gap
            assert await metric_or_zero(worker, LOST_MESSAGES) == 3

            # The stream goes on after the gap.
            sent = [pub.publish(topic, numbered(9))]
            assert_stamped(await next_messages(client, 1), topic, sent, numbered)

            # A message lost in the middle shows when the next one arrives: gap, then it.
            with publishing_via(pub, void):
                pub.publish(topic, numbered(10))
            sent = [pub.publish(topic, numbered(11))]
            gap = await next_push(client, timeout=3)
            assert gap == {"type": "gap", "topic": topic, "epoch": pub.epoch_hex, "from": 10, "to": 10}, gap
            assert_stamped(await next_messages(client, 1), topic, sent, numbered)
            assert await metric_or_zero(worker, LOST_MESSAGES) == 4
            assert await metric_or_zero(worker, UPSTREAM_MALFORMED) == 0

            # History restarted after the last gap: a resume from before it is too old, and
            # the fallback `last` replays only what follows the hole.
            late = await Client.connect(worker, "late")
            try:
                reply = await subscribe_with_history(
                    late, topic, since={"epoch": pub.epoch_hex, "offset": 9}, last=5
                )
                assert reply == {
                    "recovered": False,
                    "reason": "too_old",
                    "replayed": 1,
                    "position": {"epoch": pub.epoch_hex, "offset": 11},
                }, reply
                assert_stamped(await next_messages(late, 1), topic, sent, numbered)
            finally:
                await late.close()
        finally:
            await client.close()

    run(body())


# --------------------------------------------------------------------------------------------
# c. two workers: a late worker fills its history from a peer; repair from a peer
# --------------------------------------------------------------------------------------------


def test_resume_on_a_late_worker_that_filled_its_history_from_a_peer(zctx, start_worker):
    sock, endpoint = bind_random(zctx, zmq.PUB)
    a = start_worker([endpoint], *HISTORY, name="hist-a")
    pub = Publisher(sock)
    topic = "hist.resume"
    quiet = "hist.quiet"

    async def body() -> None:
        await warm_up(sock, [a], endpoint)
        quiet_sent = [pub.publish(quiet, numbered(i)) for i in range(5)]
        await wait_history(a, quiet, lambda es: [e.offset for e in es] == list(range(5)))
        on_a = await Client.connect(a, "client-on-a")
        on_b: Optional[Client] = None
        try:
            await on_a.subscribe(topic=topic)
            sent = [pub.publish(topic, numbered(i)) for i in range(10)]
            seen = await next_messages(on_a, 10)
            assert_stamped(seen, topic, sent, numbered)
            # The client processed up to offset 5, then lost its connection.
            resume_from = seen[5]["position"]

            # B starts after offsets 0..9 were published: it can only have them from A.
            b = await asyncio.to_thread(
                start_worker, [endpoint], *HISTORY, "--peer", a.admin_addr, name="hist-b"
            )
            await warm_up(sock, [b], endpoint)
            sent += [pub.publish(topic, numbered(i)) for i in range(10, 15)]
            assert_stamped(await next_messages(on_a, 5), topic, sent[10:], numbered)

            entries = await wait_history(b, topic, lambda es: [e.offset for e in es] == list(range(15)))
            assert [json.loads(e.payload) for e in entries] == [numbered(i) for i in range(15)]
            assert await metric_or_zero(b, STREAM_EVENTS, event="filled") == 1
            assert await metric_or_zero(b, PEER_FETCHES, result="ok") >= 1
            assert await metric_or_zero(a, PEER_SERVED, result="ok") >= 1

            on_b = await Client.connect(b, "client-on-b")
            reply = await subscribe_with_history(on_b, topic, since=resume_from)
            assert reply == {
                "recovered": True,
                "replayed": 9,
                "position": {"epoch": pub.epoch_hex, "offset": 14},
            }, reply
            assert_stamped(await next_messages(on_b, 9), topic, sent[6:], numbered)

            live = [pub.publish(topic, numbered(15))]
            assert_stamped(await next_messages(on_b, 1), topic, live, numbered)
            assert_stamped(await next_messages(on_a, 1), topic, live, numbered)

            # A topic published only before B started, and quiet since: the resume itself
            # makes B fetch it from A, and the answer waits for that.
            quiet_client = await Client.connect(b, "client-on-b-quiet")
            try:
                reply = await subscribe_with_history(
                    quiet_client, quiet, since={"epoch": pub.epoch_hex, "offset": 1}
                )
                assert reply == {
                    "recovered": True,
                    "replayed": 3,
                    "position": {"epoch": pub.epoch_hex, "offset": 4},
                }, reply
                assert_stamped(await next_messages(quiet_client, 3), quiet, quiet_sent[2:], numbered)
            finally:
                await quiet_client.close()
            assert await metric_or_zero(b, STREAM_EVENTS, event="filled") == 2
            assert await metric_or_zero(b, LOST_MESSAGES) == 0
        finally:
            await on_a.close()
            if on_b is not None:
                await on_b.close()

    run(body())


def test_messages_lost_on_the_way_to_one_worker_are_repaired_from_its_peer(zctx, start_worker):
    shared, shared_ep = bind_random(zctx, zmq.PUB)
    # A second PUB socket only A listens to: what goes out on it is lost on the way to B.
    only_a, only_a_ep = bind_random(zctx, zmq.PUB)
    a = start_worker([shared_ep, only_a_ep], *HISTORY, name="hist-a")
    b = start_worker([shared_ep], *HISTORY, "--peer", a.admin_addr, name="hist-b")
    pub = Publisher(shared)
    topic = "hist.repair"

    async def body() -> None:
        await warm_up(shared, [a, b], shared_ep)
        await warm_up(only_a, [a], only_a_ep)
        on_a = await Client.connect(a, "client-on-a")
        on_b = await Client.connect(b, "client-on-b")
        try:
            await on_a.subscribe(topic=topic)
            await on_b.subscribe(topic=topic)
            sent = [pub.publish(topic, numbered(i)) for i in range(3)]
            assert_stamped(await next_messages(on_a, 3), topic, sent, numbered)
            assert_stamped(await next_messages(on_b, 3), topic, sent, numbered)

            # Offset 3 reaches A only. Waiting for A's client to have it keeps A from seeing
            # offset 4 (on the other connection) first.
            with publishing_via(pub, only_a):
                sent.append(pub.publish(topic, numbered(3)))
            assert_stamped(await next_messages(on_a, 1), topic, sent[3:], numbered)
            # Offset 4 shows B the hole; B fetches 3 from A and delivers 3, 4 in order.
            sent.append(pub.publish(topic, numbered(4)))
            assert_stamped(await next_messages(on_a, 1), topic, sent[4:], numbered)
            assert_stamped(await next_messages(on_b, 2), topic, sent[3:], numbered)

            # The last message (5) reaches A only; the publisher's position check tells B.
            with publishing_via(pub, only_a):
                sent.append(pub.publish(topic, numbered(5)))
            assert_stamped(await next_messages(on_a, 1), topic, sent[5:], numbered)
            assert pub.send_check(topic) == (pub.epoch, 5)
            assert_stamped(await next_messages(on_b, 1), topic, sent[5:], numbered)

            assert await metric_or_zero(b, REPAIRED_MESSAGES) == 2
            assert await metric_or_zero(b, STREAM_REPAIRS, result="ok") == 2
            assert await metric_or_zero(b, LOST_MESSAGES) == 0
            assert await metric_or_zero(a, LOST_MESSAGES) == 0
            assert await metric_or_zero(a, PEER_SERVED, result="ok") >= 2
            assert await metric_or_zero(b, UPSTREAM_MALFORMED) == 0
            entries = await wait_history(b, topic, lambda es: [e.offset for e in es] == list(range(6)))
            assert [json.loads(e.payload) for e in entries] == [numbered(i) for i in range(6)]

            # Nothing else is pending for either client: the next push is the next message.
            live = [pub.publish(topic, numbered(6))]
            assert_stamped(await next_messages(on_b, 1), topic, live, numbered)
            assert_stamped(await next_messages(on_a, 1), topic, live, numbered)
        finally:
            await on_a.close()
            await on_b.close()

    run(body())


# --------------------------------------------------------------------------------------------
# d. the peer history endpoint
# --------------------------------------------------------------------------------------------


def test_history_endpoint_body_is_what_was_published(zctx, start_worker):
    sock, endpoint = bind_random(zctx, zmq.PUB)
    worker = start_worker([endpoint], *HISTORY)
    pub = Publisher(sock)
    # Characters that must be URL-encoded in the query.
    topic = "hist.body a&b=c/é?%"
    payloads = [
        b'{"n":0}',
        "ünïcode, not JSON {".encode("utf-8"),
        b"\xff\x00\xfe binary \x80",
        b"",
        bytes(range(256)) * 400,  # 100 KiB: a payload length past 16 bits
        b"[1,2,3]",
    ]

    async def body() -> None:
        await warm_up(sock, [worker], endpoint)
        published: list[tuple[bytes, bytes]] = []  # (meta, payload) as sent
        for i, payload in enumerate(payloads):
            pub.stamp_time = i != 2  # one message without a publish time
            epoch, offset, ts = pub.publish(topic, payload)
            published.append((encode_meta(epoch, offset, ts), payload))
            if i == 3:
                pub.publish_plain(topic, b"live only: never kept")
        await wait_history(worker, topic, lambda es: bool(es) and es[-1].offset == len(payloads) - 1)

        def expected_body(first: int, last: int) -> bytes:
            return HISTORY_MAGIC + b"".join(
                encode_history_entry(topic, meta, payload) for meta, payload in published[first:last + 1]
            )

        status, content_type, raw = await asyncio.to_thread(admin_get, worker, history_path(topic))
        assert (status, content_type) == (200, HISTORY_CONTENT_TYPE), (status, content_type, raw[:200])
        entries = decode_history(raw)
        assert [(e.topic, e.epoch, e.offset) for e in entries] == [
            (topic, pub.epoch, i) for i in range(len(payloads))
        ]
        assert [e.payload for e in entries] == payloads
        assert entries[2].published_at_us is None and entries[0].published_at_us is not None
        # Exactly what the publisher sent: the meta frames byte for byte.
        assert [e.meta for e in entries] == [meta for meta, _ in published]
        assert raw == expected_body(0, len(payloads) - 1)

        async def get(**params: object) -> tuple[int, bytes]:
            status, _, raw = await asyncio.to_thread(admin_get, worker, history_path(**params))
            return status, raw

        assert await get(topic=topic, epoch=pub.epoch_hex, **{"from": 2}, limit=3) == (200, expected_body(2, 4))
        assert await get(topic=topic, limit=2) == (200, expected_body(4, 5))
        assert await get(topic=topic, epoch=pub.epoch_hex, **{"from": 4}) == (200, expected_body(4, 5))

        # Unknown topics: one no rule covers, one covered but never published.
        for unknown in ("nope", "hist.never"):
            status, raw = await get(topic=unknown)
            assert status == 404, (unknown, status, raw)
        # Another epoch than the one kept.
        other = f"{pub.epoch ^ 1:016x}"
        status, raw = await get(topic=topic, epoch=other)
        assert status == 409 and pub.epoch_hex.encode() in raw, (status, raw)
        # Bad parameters are named in the body.
        for params, named in [
            ({"topic": topic, "epoch": "zz"}, b"epoch"),
            ({"topic": topic, "epoch": "1" * 17}, b"epoch"),
            ({"topic": topic, "from": "-1"}, b"from"),
            ({"topic": topic, "limit": "many"}, b"limit"),
        ]:
            status, raw = await get(**params)
            assert status == 400 and named in raw, (params, status, raw)
        status, _, raw = await asyncio.to_thread(admin_get, worker, "/history?epoch=" + pub.epoch_hex)
        assert status == 400 and b"topic" in raw, (status, raw)

    run(body())

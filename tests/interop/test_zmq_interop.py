"""Interop tests: the real worker binary against real libzmq publishers (pyzmq) and real
WebSocket clients (the `websockets` library).

Each test starts its own worker on ephemeral loopback ports and its own publisher sockets.
See README.md in this directory for how to run them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time

import zmq

from interop_helpers import (
    Client,
    XpubEvents,
    bind_random,
    metric_sum,
    plain_sender,
    run,
    sync_topic,
    wait_until,
)
from pushfleet_publisher import Publisher, encode_meta, now_us

UPSTREAM_MESSAGES = "worker_upstream_messages_total"
UPSTREAM_CONNECTED = "worker_upstream_connected"
UPSTREAM_SILENT = "worker_upstream_silent"
UPSTREAM_MALFORMED = "worker_upstream_malformed_total"
FANOUT_DELIVERIES = "worker_fanout_deliveries_total"


def payloads(msgs: list[dict]) -> list:
    return [m.get("payload") for m in msgs]


# --------------------------------------------------------------------------------------------
# a. plain [topic, payload] messages
# --------------------------------------------------------------------------------------------


def test_plain_two_frame_message_reaches_subscriber_and_other_topics_do_not(zctx, start_worker):
    pub, endpoint = bind_random(zctx, zmq.PUB)
    worker = start_worker([endpoint])

    async def body() -> None:
        client = await Client.connect(worker)
        try:
            await client.subscribe(topic="match.1")
            await sync_topic(plain_sender(pub), [client], "match.1")

            pub.send_multipart([b"news.1", b'{"headline":"not for you"}'])
            pub.send_multipart([b"match.1", b'{"goal":1,"team":"A","scorers":["x","y"]}'])
            pub.send_multipart([b"match.2", b'{"goal":1,"team":"B"}'])
            pub.send_multipart([b"match.1", b'{"sentinel":true}'])

            got = await client.messages_until(lambda m: m.get("payload") == {"sentinel": True})
            assert [m["topic"] for m in got] == ["match.1", "match.1"], got
            assert payloads(got) == [
                {"goal": 1, "team": "A", "scorers": ["x", "y"]},
                {"sentinel": True},
            ]
            for m in got:
                # Unstamped (two-frame) messages carry neither a position nor a time.
                assert "position" not in m and "ts" not in m, m
                assert "payload_base64" not in m, m

            # The counters saw at least what the client received (sync probes included).
            text = await worker.ametrics()
            upstream = metric_sum(text, UPSTREAM_MESSAGES, endpoint=endpoint)
            assert upstream is not None and upstream >= 2, upstream
            deliveries = metric_sum(text, FANOUT_DELIVERIES)
            assert deliveries is not None and deliveries >= 2, deliveries
            await worker.wait_metric(UPSTREAM_CONNECTED, lambda v: v == 1, 2,
                                     "upstream connected", endpoint=endpoint)
            status, _ = await asyncio.to_thread(worker.http_get, "/healthz")
            assert status == 200
        finally:
            await client.close()

    run(body())


def test_plain_payload_encodings_text_and_binary(zctx, start_worker):
    """Non-JSON UTF-8 arrives as a JSON string; non-UTF-8 arrives as payload_base64."""
    pub, endpoint = bind_random(zctx, zmq.PUB)
    worker = start_worker([endpoint])

    async def body() -> None:
        client = await Client.connect(worker)
        try:
            await client.subscribe(topic="raw")
            await sync_topic(plain_sender(pub), [client], "raw")
            text = 'plain "text" – ünïcode, not JSON {'
            binary = b"\xff\x00\xfe binary \x80"
            pub.send_multipart([b"raw", text.encode("utf-8")])
            pub.send_multipart([b"raw", binary])
            pub.send_multipart([b"raw", b"[1,2,3]"])
            got = await client.messages_until(lambda m: m.get("payload") == [1, 2, 3])
            assert len(got) == 3, got
            assert got[0]["payload"] == text and "payload_base64" not in got[0], got[0]
            assert "payload" not in got[1], got[1]
            assert base64.b64decode(got[1]["payload_base64"]) == binary, got[1]
        finally:
            await client.close()

    run(body())


# --------------------------------------------------------------------------------------------
# b. [topic, meta, payload]: stamped positions, malformed meta
# --------------------------------------------------------------------------------------------


def test_meta_frame_position_and_ts_arrive_as_stamped_and_malformed_meta_is_dropped(
    zctx, start_worker
):
    sock, endpoint = bind_random(zctx, zmq.PUB)
    worker = start_worker([endpoint])
    # High bit set, so the full u64 range of the epoch is exercised.
    pub = Publisher(sock, epoch=secrets.randbits(64) | (1 << 63))

    async def body() -> None:
        client = await Client.connect(worker)
        try:
            await client.subscribe(topic="score.7")
            await sync_topic(plain_sender(sock), [client], "score.7")
            baseline = await worker.metric(UPSTREAM_MALFORMED, endpoint=endpoint) or 0

            stamped = [pub.publish("score.7", {"n": i}) for i in range(3)]  # offsets 0, 1, 2
            # Position only, then time only.
            sock.send_multipart([b"score.7", encode_meta(pub.epoch, 3), b'{"n":"pos-only"}'])
            ts_only = now_us()
            sock.send_multipart([b"score.7", encode_meta(published_at_us=ts_only), b'{"n":"ts-only"}'])
            # Malformed metas: each must be dropped and counted.
            good = encode_meta(pub.epoch, 99, now_us())
            bad_metas = {
                "short": good[:27],
                "long": good + b"\x00",
                "magic": b"XX" + good[2:],
                "version": good[:2] + b"\x09" + good[3:],
            }
            for reason, meta in bad_metas.items():
                sock.send_multipart([b"score.7", meta, json.dumps({"malformed": reason}).encode()])
            sock.send_multipart([b"score.7", b'{"sentinel":true}'])

            got = await client.messages_until(lambda m: m.get("payload") == {"sentinel": True})
            assert not [m for m in got if isinstance(m.get("payload"), dict) and "malformed" in m["payload"]], got
            assert payloads(got) == [{"n": 0}, {"n": 1}, {"n": 2}, {"n": "pos-only"}, {"n": "ts-only"}, {"sentinel": True}]
            for msg, (epoch, offset, ts) in zip(got[:3], stamped):
                assert msg["topic"] == "score.7"
                assert msg["position"] == {"epoch": f"{epoch:016x}", "offset": offset}, msg
                assert msg["ts"] == ts, msg
            assert got[0]["position"]["epoch"] == pub.epoch_hex
            assert len(got[0]["position"]["epoch"]) == 16
            assert got[3]["position"] == {"epoch": pub.epoch_hex, "offset": 3} and "ts" not in got[3], got[3]
            assert got[4]["ts"] == ts_only and "position" not in got[4], got[4]
            assert "position" not in got[5] and "ts" not in got[5], got[5]

            counted = await worker.wait_metric(
                UPSTREAM_MALFORMED,
                lambda v: v is not None and v >= baseline + len(bad_metas),
                5,
                "the malformed metas to be counted",
                endpoint=endpoint,
            )
            assert counted == baseline + len(bad_metas), counted
        finally:
            await client.close()

    run(body())


# --------------------------------------------------------------------------------------------
# c. prefix and exact filtering
# --------------------------------------------------------------------------------------------


def test_prefix_subscription_and_exact_topic_filtering(zctx, start_worker):
    pub, endpoint = bind_random(zctx, zmq.PUB)
    worker = start_worker([endpoint])
    send = plain_sender(pub)

    async def body() -> None:
        prefix_client = await Client.connect(worker, "prefix-client")
        exact_client = await Client.connect(worker, "exact-client")
        try:
            await prefix_client.subscribe(prefix="match.")
            # A topic only the prefix matches proves the prefix subscription is live upstream.
            await sync_topic(send, [prefix_client], "match.sync")
            await exact_client.subscribe(topic="match.1")
            await sync_topic(send, [exact_client, prefix_client], "match.1")

            for topic in ["match.1", "match.10", "news.1", "match.2", "matchX", "match"]:
                pub.send_multipart([topic.encode(), json.dumps({"on": topic}).encode()])
            pub.send_multipart([b"match.1", b'{"sentinel":true}'])

            def last(m: dict) -> bool:
                return m.get("payload") == {"sentinel": True}

            got_prefix = await prefix_client.messages_until(last)
            got_exact = await exact_client.messages_until(last)
            assert [m["topic"] for m in got_prefix] == ["match.1", "match.10", "match.2", "match.1"], got_prefix
            assert payloads(got_prefix)[:3] == [{"on": "match.1"}, {"on": "match.10"}, {"on": "match.2"}]
            # "match.1" is a ZeroMQ prefix of "match.10": the worker itself must filter exactly.
            assert [m["topic"] for m in got_exact] == ["match.1", "match.1"], got_exact
            assert payloads(got_exact) == [{"on": "match.1"}, {"sentinel": True}]
        finally:
            await prefix_client.close()
            await exact_client.close()

    run(body())


# --------------------------------------------------------------------------------------------
# d. upstream subscriptions follow client interest (seen from a libzmq XPUB)
# --------------------------------------------------------------------------------------------


def test_upstream_subscriptions_follow_client_interest(zctx, start_worker):
    # XPUB_VERBOSE passes every subscribe upstream; XPUB_VERBOSER also every unsubscribe, so
    # an unsubscribe the worker should not have sent is seen even if others remain.
    xpub, endpoint = bind_random(zctx, zmq.XPUB, XPUB_VERBOSE=1, XPUB_VERBOSER=1)
    events = XpubEvents(xpub)
    worker = start_worker([endpoint])
    t, u, v = "match.42", "match.43", "match.44"
    sub = lambda topic: b"\x01" + topic.encode()  # noqa: E731
    unsub = lambda topic: b"\x00" + topic.encode()  # noqa: E731

    async def body() -> None:
        await worker.wait_metric(UPSTREAM_CONNECTED, lambda x: x == 1, 10,
                                 "the worker to connect to the XPUB", endpoint=endpoint)
        c1 = await Client.connect(worker, "c1")
        c2 = await Client.connect(worker, "c2")
        c3 = await Client.connect(worker, "c3")
        try:
            # Connected clients without subscriptions create no upstream interest.
            pong = await c1.request("ping")
            assert pong["type"] == "pong", pong
            events.drain()
            assert not [e for e in events.events if e[:1] == b"\x01"], events.events

            await c1.subscribe(topic=t)
            await wait_until(lambda: events.seen(sub(t)), 10, f"XPUB to see subscribe {t}")
            await c2.subscribe(topic=t)
            # Messages on t reach both clients.
            await sync_topic(plain_sender(xpub), [c1, c2], t)

            # One of two local subscribers leaves: no upstream unsubscribe. Ordering proof:
            # a later subscription (u) reaches the XPUB, and no unsubscribe of t precedes it,
            # nor follows within a further second.
            await c2.unsubscribe(topic=t)
            await c2.subscribe(topic=u)
            await wait_until(lambda: events.seen(sub(u)), 10, f"XPUB to see subscribe {u}")
            assert unsub(t) not in events.events, events.events
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                assert not events.seen(unsub(t)), f"worker unsubscribed {t} upstream while c1 still holds it: {events.events}"
                await asyncio.sleep(0.05)
            # c1 still receives t; c2 no longer does (it gets u only).
            xpub.send_multipart([t.encode(), b'{"still":"here"}'])
            xpub.send_multipart([u.encode(), b'{"sentinel":"u"}'])
            m = await c1.next_message()
            assert (m["topic"], m["payload"]) == (t, {"still": "here"}), m
            got2 = await c2.messages_until(lambda m: m.get("payload") == {"sentinel": "u"})
            assert [m["topic"] for m in got2] == [u], got2

            # The last local subscriber unsubscribes: the worker unsubscribes upstream.
            await c1.unsubscribe(topic=t)
            await wait_until(lambda: events.seen(unsub(t)), 10, f"XPUB to see unsubscribe {t}")

            # The last local subscriber disconnects: the worker unsubscribes upstream too.
            await c3.subscribe(topic=v)
            await wait_until(lambda: events.seen(sub(v)), 10, f"XPUB to see subscribe {v}")
            assert not events.seen(unsub(v))
            await c3.close()
            await wait_until(lambda: events.seen(unsub(v)), 10,
                             f"XPUB to see unsubscribe {v} after its only client disconnected")
            # u is still wanted by c2.
            assert unsub(u) not in events.events, events.events
            # Nothing ever subscribed to everything.
            assert b"\x01" not in events.events, events.events
        finally:
            for c in (c1, c2, c3):
                await c.close()

    run(body())


# --------------------------------------------------------------------------------------------
# e. large payloads
# --------------------------------------------------------------------------------------------


def test_one_mebibyte_payload_arrives_intact_compressed_and_not(zctx, start_worker):
    pub, endpoint = bind_random(zctx, zmq.PUB)
    worker = start_worker([endpoint], "--outbound-queue-bytes", "8388608")
    # A JSON string of exactly 1 MiB (quotes included); hex, so it compresses only ~2:1.
    big = secrets.token_hex((1024 * 1024 - 2) // 2)
    wire = json.dumps(big).encode()
    assert len(wire) == 1024 * 1024

    async def body() -> None:
        deflate = await Client.connect(worker, "deflate-client", compression="deflate")
        plain = await Client.connect(worker, "plain-client", compression=None)
        try:
            for c in (deflate, plain):
                await c.subscribe(topic="big")
            await sync_topic(plain_sender(pub), [deflate, plain], "big")
            pub.send_multipart([b"big", wire])
            pub.send_multipart([b"big", b'{"sentinel":true}'])
            for c in (deflate, plain):
                got = await c.messages_until(lambda m: m.get("payload") == {"sentinel": True}, timeout=10)
                assert len(got) == 2, [(m["topic"], str(m.get("payload"))[:40]) for m in got]
                received = got[0]["payload"]
                assert isinstance(received, str) and len(received) == len(big), (c.label, len(received))
                assert received == big, f"{c.label}: 1 MiB payload corrupted"
        finally:
            await deflate.close()
            await plain.close()

    run(body())


# --------------------------------------------------------------------------------------------
# f. publisher restart on the same port
# --------------------------------------------------------------------------------------------


def test_worker_reconnects_and_resubscribes_after_publisher_restart(start_worker, start_publisher_process):
    topic = "match.restart"
    pub1 = start_publisher_process(
        "--bind", "tcp://127.0.0.1:*", "--topic", topic, "--rate", "20", name="pub-before"
    )
    endpoint = pub1.wait_line("bound ")
    epoch1 = pub1.wait_line("epoch ")
    assert endpoint.startswith("tcp://127.0.0.1:"), endpoint
    worker = start_worker([endpoint])

    async def from_epoch(client: Client, epoch: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = await client.poll_message(0.05)
            if m is not None and m.get("position", {}).get("epoch") == epoch:
                return m
        raise AssertionError(f"no message of epoch {epoch} within {timeout:.0f}s")

    async def body() -> None:
        client = await Client.connect(worker)
        try:
            await client.subscribe(topic=topic)
            first = await from_epoch(client, epoch1, 10)
            assert first["topic"] == topic and first["payload"]["epoch"] == epoch1, first
            await worker.wait_metric(UPSTREAM_CONNECTED, lambda v: v == 1, 5,
                                     "upstream connected", endpoint=endpoint)

            pub1.kill()
            await worker.wait_metric(UPSTREAM_CONNECTED, lambda v: v == 0, 10,
                                     "the worker to notice the publisher is gone", endpoint=endpoint)

            # A new publisher process on the same port; it keeps publishing (bounded: it is
            # killed in teardown, and we wait at most 15 s) until the client gets its messages.
            pub2 = start_publisher_process(
                "--bind", endpoint, "--topic", topic, "--rate", "20", name="pub-after"
            )
            assert await asyncio.to_thread(pub2.wait_line, "bound ") == endpoint
            epoch2 = await asyncio.to_thread(pub2.wait_line, "epoch ")
            assert epoch2 != epoch1
            m = await from_epoch(client, epoch2, 15)
            assert m["topic"] == topic and m["payload"]["epoch"] == epoch2, m
            # Positions keep increasing within the new epoch.
            m2 = await from_epoch(client, epoch2, 5)
            assert m2["position"]["offset"] > m["position"]["offset"], (m, m2)
            await worker.wait_metric(UPSTREAM_CONNECTED, lambda v: v == 1, 5,
                                     "upstream connected again", endpoint=endpoint)
        finally:
            await client.close()

    run(body(), timeout=35)


# --------------------------------------------------------------------------------------------
# g. silent publisher
# --------------------------------------------------------------------------------------------


def test_silent_publisher_is_reported_and_recovers(zctx, start_worker):
    pub, endpoint = bind_random(zctx, zmq.PUB)
    worker = start_worker([endpoint], "--publisher-silence", "1s")
    send = plain_sender(pub)

    async def body() -> None:
        client = await Client.connect(worker)
        try:
            await client.subscribe(topic="heartbeat")
            await sync_topic(send, [client], "heartbeat")
            before = await worker.metric(UPSTREAM_MESSAGES, endpoint=endpoint)
            assert before is not None and before >= 1, before
            log_start = len(worker.log_text())

            # Publishing has stopped: within a few seconds the endpoint is reported silent.
            await worker.wait_metric(UPSTREAM_SILENT, lambda v: v == 1, 6,
                                     "the publisher to be reported silent", endpoint=endpoint)
            await wait_until(lambda: "silent" in worker.log_text()[log_start:].lower(), 3,
                             "a log line saying the publisher is silent")

            # New messages end the silence. Keep publishing (every 50 ms, bounded by the
            # deadline) so the 1 s silence cannot come back while we look.
            n = 0

            async def heartbeat_and_check() -> bool:
                nonlocal n
                n += 1
                pub.send_multipart([b"heartbeat", json.dumps({"alive": n}).encode()])
                return await worker.metric(UPSTREAM_SILENT, endpoint=endpoint) == 0

            await wait_until(heartbeat_and_check, 5, "the silence to end after new messages")
            m = await client.next_message(5)
            assert m["topic"] == "heartbeat" and "alive" in m["payload"], m
            after = await worker.metric(UPSTREAM_MESSAGES, endpoint=endpoint)
            assert after is not None and after > before, (before, after)
        finally:
            await client.close()

    run(body())

#!/usr/bin/env python3
"""A tiny pushfleet publisher: how a backend hands messages to the workers over ZeroMQ.

Wire format (a ZeroMQ PUB/SUB multipart message, see ``protocol/src/publish.rs``)::

    [topic, payload]          any ZeroMQ publisher; delivered live, never replayed
    [topic, meta, payload]    meta = 28 bytes, big-endian:
        0..2   magic  b"PF"
        2      version = 1
        3      flags  bit 0: epoch/offset present, bit 1: publish time present,
                      bit 2: position check (others 0)
        4..12  epoch   u64
        12..20 offset  u64
        20..28 publish time, microseconds since the Unix epoch, u64

The topic comes first so that ZeroMQ's prefix filtering works on it; it must be non-empty
UTF-8 without control characters.

A :class:`Publisher` stamps positions the way the protocol expects: it picks a random u64
*epoch* when it starts, and counts an *offset* per topic from 0, one per message. A restarted
publisher therefore starts a new epoch, and clients can tell the two streams apart.

A **position check** ``[topic, meta(flags: position|check), b""]`` is not a message: it
carries the position of the last message published on the topic. A publisher sends one for
each topic that has been quiet (no message, no check) for ``check_interval`` (1 s by default),
and again every ``check_interval`` while the topic stays quiet, so that a worker that lost
the last message of a quiet topic notices the gap and repairs it. Call
:meth:`Publisher.send_due_checks` regularly (a tenth of the interval is plenty) from the
publishing loop. The Rust publisher (``protocol/publisher``, command ``pushfleet-publish``)
does the same.

Library use::

    import zmq
    from pushfleet_publisher import Publisher

    with Publisher(bind="tcp://127.0.0.1:5556") as pub:
        pub.publish("match.1", {"goal": 1})         # [topic, meta, payload], stamped
        pub.publish_plain("match.1", "hello")        # [topic, payload], live only
        pub.send_due_checks(1.0)                     # position checks for quiet topics

Command line (publishes a JSON object per message on each topic at the given rate)::

    python pushfleet_publisher.py --bind tcp://127.0.0.1:5556 --topic match.1 --rate 5

``--bind tcp://127.0.0.1:*`` picks a free port; the CLI prints ``bound <endpoint>`` and
``epoch <16 hex digits>`` on stdout once it is bound (tests read these lines). It sends
position checks for quiet topics every ``--check-interval`` seconds (default 1, 0 disables),
and a final round of checks when it stops.
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import struct
import sys
import time
from typing import Any, NamedTuple, Optional, Union

import zmq

META_LEN = 28
META_MAGIC = b"PF"
META_VERSION = 1
FLAG_POSITION = 1
FLAG_TIME = 2
FLAG_CHECK = 4
_META = struct.Struct(">2sBBQQQ")
assert _META.size == META_LEN

Payload = Union[bytes, bytearray, memoryview, str, Any]


def now_us() -> int:
    """Current wall-clock time in microseconds since the Unix epoch (the meta frame's clock)."""
    return time.time_ns() // 1000


def encode_meta(
    epoch: Optional[int] = None,
    offset: Optional[int] = None,
    published_at_us: Optional[int] = None,
) -> bytes:
    """Builds the 28-byte meta frame.

    ``epoch`` and ``offset`` go together (both or neither); ``published_at_us`` is optional.
    Fields that are absent are written as zero with their flag bit clear.
    """
    if (epoch is None) != (offset is None):
        raise ValueError("epoch and offset must be given together")
    flags = 0
    if epoch is not None:
        flags |= FLAG_POSITION
    if published_at_us is not None:
        flags |= FLAG_TIME
    return _META.pack(
        META_MAGIC,
        META_VERSION,
        flags,
        epoch or 0,
        offset or 0,
        published_at_us or 0,
    )


def encode_check(topic: Union[str, bytes], epoch: int, offset: int) -> list[bytes]:
    """The frames of a position check: ``[topic, meta, b""]``, where meta carries the position
    of the last message published on ``topic`` with flag bits 0 (position) and 2 (check) set
    (flags byte ``0x05``) and no publish time."""
    meta = bytearray(encode_meta(epoch, offset))
    meta[3] |= FLAG_CHECK
    return [encode_topic(topic), bytes(meta), b""]


class Meta(NamedTuple):
    """A decoded meta frame; absent fields are None. Unpacks as a 4-tuple."""

    epoch: Optional[int]
    offset: Optional[int]
    published_at_us: Optional[int]
    check: bool
    """True for a position check (flag bit 2): the frame is not a message, and the position
    is that of the topic's last message."""


def decode_meta(meta: bytes) -> Meta:
    """Parses a meta frame into ``Meta(epoch, offset, published_at_us, check)``.

    Raises ValueError for a malformed frame (the worker drops and counts those), including a
    position check without a position. (A position check must also have an empty payload;
    that is a property of the whole message, not of the meta frame.)
    """
    if len(meta) != META_LEN:
        raise ValueError(f"meta frame must be {META_LEN} bytes, got {len(meta)}")
    magic, version, flags, epoch, offset, ts = _META.unpack(meta)
    if magic != META_MAGIC:
        raise ValueError("meta frame must start with b'PF'")
    if version != META_VERSION:
        raise ValueError(f"unsupported meta version {version}")
    if flags & ~(FLAG_POSITION | FLAG_TIME | FLAG_CHECK):
        raise ValueError(f"unknown flag bits {flags:#04x}")
    has_pos = bool(flags & FLAG_POSITION)
    has_ts = bool(flags & FLAG_TIME)
    check = bool(flags & FLAG_CHECK)
    if check and not has_pos:
        raise ValueError("a position check needs a position (flag bit 0)")
    return Meta(
        epoch if has_pos else None,
        offset if has_pos else None,
        ts if has_ts else None,
        check,
    )


def encode_payload(payload: Payload) -> bytes:
    """Bytes are sent as they are, str as UTF-8, anything else as compact JSON.

    The worker embeds a payload that is valid JSON as JSON in the client message, sends other
    UTF-8 as a JSON string, and anything else base64-encoded in ``payload_base64``.
    """
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode("utf-8")
    return json.dumps(payload, separators=(",", ":")).encode("utf-8")


def encode_topic(topic: Union[str, bytes]) -> bytes:
    return topic.encode("utf-8") if isinstance(topic, str) else bytes(topic)


class Publisher:
    """A ZeroMQ PUB socket that stamps pushfleet positions.

    Give either an existing ``socket`` (PUB or XPUB, owned by the caller) or ``bind`` /
    ``connect`` endpoints (the publisher then owns and closes its socket).

    * ``epoch``: the stream id; a random u64 by default, fixed for the publisher's lifetime.
    * offsets: per topic, starting at 0, incremented by every stamped message.
    * ``stamp_time``: also stamp the publish time (microseconds) in each meta frame.
    * position checks: :meth:`send_due_checks` sends one for each topic quiet for the
      interval (clock: ``time.monotonic()``), :meth:`send_check` one for a topic at once.
    """

    def __init__(
        self,
        socket: Optional[zmq.Socket] = None,
        *,
        bind: Optional[str] = None,
        connect: Optional[str] = None,
        context: Optional[zmq.Context] = None,
        epoch: Optional[int] = None,
        stamp_time: bool = True,
        linger_ms: int = 0,
    ) -> None:
        if (socket is None) == (bind is None and connect is None):
            raise ValueError("give either socket, or bind/connect")
        self._owns_socket = socket is None
        if socket is None:
            socket = (context or zmq.Context.instance()).socket(zmq.PUB)
            socket.setsockopt(zmq.LINGER, linger_ms)
            if bind is not None:
                socket.bind(bind)
            if connect is not None:
                socket.connect(connect)
        self.socket = socket
        self.epoch = secrets.randbits(64) if epoch is None else epoch
        if not 0 <= self.epoch < 2**64:
            raise ValueError("epoch must be a u64")
        self.stamp_time = stamp_time
        self._offsets: dict[bytes, int] = {}
        # When workers last heard each topic's position (its last message or its last check),
        # in time.monotonic() seconds.
        self._told_at: dict[bytes, float] = {}

    @property
    def endpoint(self) -> str:
        """The last endpoint bound or connected (with the real port after binding ``:*``)."""
        value = self.socket.getsockopt(zmq.LAST_ENDPOINT)
        return value.decode() if isinstance(value, bytes) else str(value)

    @property
    def epoch_hex(self) -> str:
        """The epoch as clients see it in ``position.epoch``: 16 lowercase hex digits."""
        return f"{self.epoch:016x}"

    def next_offset(self, topic: Union[str, bytes]) -> int:
        """The offset the next stamped message on ``topic`` will carry."""
        return self._offsets.get(encode_topic(topic), 0)

    def last_position(self, topic: Union[str, bytes]) -> Optional[tuple[int, int]]:
        """``(epoch, offset)`` of the last stamped message on ``topic``, None before the first."""
        offset = self._offsets.get(encode_topic(topic))
        return None if offset is None else (self.epoch, offset - 1)

    def publish(
        self, topic: Union[str, bytes], payload: Payload, *, flags: int = 0
    ) -> tuple[int, int, Optional[int]]:
        """Sends ``[topic, meta, payload]`` stamped with this publisher's epoch, the topic's
        next offset and (if ``stamp_time``) the publish time. Returns ``(epoch, offset, ts)``.

        ``flags`` is passed to ``send_multipart`` (e.g. ``zmq.NOBLOCK``); a PUB socket never
        blocks anyway, it drops messages no subscriber wants.
        """
        t = encode_topic(topic)
        offset = self._offsets.get(t, 0)
        ts = now_us() if self.stamp_time else None
        meta = encode_meta(self.epoch, offset, ts)
        self.socket.send_multipart([t, meta, encode_payload(payload)], flags=flags)
        self._offsets[t] = offset + 1
        self._told_at[t] = time.monotonic()
        return self.epoch, offset, ts

    def send_check(self, topic: Union[str, bytes]) -> tuple[int, int]:
        """Sends a position check for ``topic`` now, carrying its last stamped position;
        returns ``(epoch, offset)``. Raises ValueError before the topic's first message."""
        t = encode_topic(topic)
        last = self.last_position(t)
        if last is None:
            raise ValueError(f"no message stamped on {t!r} yet: nothing to check")
        self.socket.send_multipart(encode_check(t, *last))
        self._told_at[t] = time.monotonic()
        return last

    def send_due_checks(self, interval_s: float, now: Optional[float] = None) -> int:
        """Sends a position check for every topic that has been quiet (no message, no check)
        for at least ``interval_s`` seconds at ``now`` (default ``time.monotonic()``), in topic
        order; they count as checked at ``now``. Returns how many were sent.

        ``interval_s == 0`` checks every topic (a final round before exiting). Topics that
        never had a stamped message get no checks.
        """
        if now is None:
            now = time.monotonic()
        due = sorted(t for t, told in self._told_at.items() if now - told >= interval_s)
        for t in due:
            self.socket.send_multipart(encode_check(t, self.epoch, self._offsets[t] - 1))
            self._told_at[t] = now
        return len(due)

    def publish_plain(self, topic: Union[str, bytes], payload: Payload, *, flags: int = 0) -> None:
        """Sends a plain two-frame ``[topic, payload]`` message (live only, no position)."""
        self.socket.send_multipart([encode_topic(topic), encode_payload(payload)], flags=flags)

    def close(self) -> None:
        """Closes the socket if this publisher created it."""
        if self._owns_socket and not self.socket.closed:
            self.socket.close(linger=0)

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _bind_with_retry(socket: zmq.Socket, endpoint: str, retry_s: float) -> None:
    """Binds, retrying for up to ``retry_s`` seconds while the address is still in use
    (a publisher restarted on the same port right after the old one died)."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            socket.bind(endpoint)
            return
        except zmq.ZMQError as e:
            if e.errno != zmq.EADDRINUSE or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Publish stamped pushfleet messages on a ZeroMQ PUB socket.",
    )
    parser.add_argument("--bind", default="tcp://127.0.0.1:5556",
                        help="endpoint to bind (tcp://127.0.0.1:* picks a free port)")
    parser.add_argument("--topic", action="append", required=True,
                        help="topic to publish on (repeatable)")
    parser.add_argument("--rate", type=float, default=1.0,
                        help="messages per second on each topic (default 1)")
    parser.add_argument("--count", type=int, default=0,
                        help="stop after this many messages per topic (0 = until killed)")
    parser.add_argument("--epoch", default=None,
                        help="epoch as hex (default: random u64)")
    parser.add_argument("--plain", action="store_true",
                        help="send unstamped two-frame [topic, payload] messages")
    parser.add_argument("--no-time", action="store_true",
                        help="do not stamp the publish time")
    parser.add_argument("--bind-retry", type=float, default=5.0,
                        help="seconds to retry binding while the address is in use (default 5)")
    parser.add_argument("--check-interval", type=float, default=1.0,
                        help="send a position check for each topic quiet this many seconds, and "
                             "again at this interval while it stays quiet (default 1, 0 disables)")
    args = parser.parse_args(argv)
    if args.rate <= 0:
        parser.error("--rate must be positive")
    if args.check_interval < 0:
        parser.error("--check-interval must be 0 (disabled) or positive")
    check_interval = args.check_interval or None
    # Quiet topics are looked at ten times per interval, so checks are at most 10% late.
    check_tick = max(check_interval / 10, 0.01) if check_interval else None

    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    linger_ms = 0
    try:
        _bind_with_retry(sock, args.bind, args.bind_retry)
        pub = Publisher(
            sock,
            epoch=int(args.epoch, 16) if args.epoch else None,
            stamp_time=not args.no_time,
        )
        print(f"bound {pub.endpoint}", flush=True)
        print(f"epoch {pub.epoch_hex}", flush=True)
        interval = 1.0 / args.rate
        next_at = time.monotonic()
        sent = 0
        while not stop and (args.count == 0 or sent < args.count):
            for topic in args.topic:
                body = {"topic": topic, "seq": sent, "epoch": pub.epoch_hex, "sent_at_us": now_us()}
                if args.plain:
                    pub.publish_plain(topic, body)
                else:
                    pub.publish(topic, body)
            sent += 1
            # Pacing only: keep the rate without drifting. While waiting for the next round,
            # quiet topics get their position checks.
            next_at += interval
            if next_at <= time.monotonic():
                next_at = time.monotonic()
            while not stop:
                if check_interval:
                    pub.send_due_checks(check_interval)
                delay = next_at - time.monotonic()
                if delay <= 0:
                    break
                time.sleep(min(delay, check_tick) if check_tick else delay)
        if check_interval:
            # A final round: workers learn every topic's last position now, not never. The
            # short linger lets these frames leave before the socket closes.
            if pub.send_due_checks(0):
                linger_ms = 500
        return 0
    finally:
        sock.close(linger=linger_ms)
        ctx.term()


if __name__ == "__main__":
    sys.exit(main())

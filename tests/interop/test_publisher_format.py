"""The Python example publisher on its own (no worker needed): position-check frames are
byte-for-byte the Rust encoding, ``decode_meta`` reports the check bit, ``send_due_checks``
follows the same rules as the Rust ``Stamper::due_checks``, and the CLI sends checks for
quiet topics and a final round when it stops.
"""

from __future__ import annotations

import time

import pytest
import zmq

import pushfleet_publisher
from interop_helpers import wait_until_sync
from pushfleet_publisher import (
    FLAG_CHECK,
    Meta,
    Publisher,
    decode_meta,
    encode_check,
    encode_meta,
)

# The same vector is asserted in protocol/publisher/src/publisher.rs against the Rust
# `protocol::publish::encode_check`: topic "t", epoch 0x0102030405060708, offset 9.
GOLDEN_CHECK_META = bytes.fromhex(
    "5046" "01" "05" "0102030405060708" "0000000000000009" "0000000000000000"
)


class RecordingSocket:
    """Stands in for a PUB socket: records what would be sent."""

    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []

    def send_multipart(self, frames: list[bytes], flags: int = 0) -> None:
        self.sent.append(list(frames))


class FakeTime:
    """The ``time`` module as pushfleet_publisher sees it, with a hand-driven monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.time_ns = time.time_ns

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(pushfleet_publisher, "time", fake)
    return fake


def checks(sock: RecordingSocket) -> list[tuple[bytes, Meta]]:
    """The position checks recorded so far (and clears the record)."""
    out = []
    for frames in sock.sent:
        if len(frames) == 3 and decode_meta(frames[1]).check:
            assert frames[2] == b""
            out.append((frames[0], decode_meta(frames[1])))
    sock.sent.clear()
    return out


def test_encode_check_matches_the_rust_encoding() -> None:
    assert FLAG_CHECK == 4
    topic, meta, payload = encode_check("t", 0x0102030405060708, 9)
    assert topic == b"t"
    assert meta == GOLDEN_CHECK_META
    assert meta[3] == 0x05
    assert payload == b""
    assert encode_check(b"t", 0x0102030405060708, 9) == [b"t", GOLDEN_CHECK_META, b""]


def test_decode_meta_reports_the_check_bit() -> None:
    assert decode_meta(GOLDEN_CHECK_META) == Meta(0x0102030405060708, 9, None, True)
    epoch, offset, ts, check = decode_meta(encode_meta(7, 3, 123))
    assert (epoch, offset, ts, check) == (7, 3, 123, False)
    assert decode_meta(encode_meta(published_at_us=5)) == Meta(None, None, 5, False)


def test_decode_meta_rejects_a_check_without_position_and_unknown_bits() -> None:
    no_position = bytearray(encode_meta())
    no_position[3] |= FLAG_CHECK
    with pytest.raises(ValueError, match="position"):
        decode_meta(bytes(no_position))
    unknown = bytearray(GOLDEN_CHECK_META)
    unknown[3] |= 0x08
    with pytest.raises(ValueError, match="unknown flag"):
        decode_meta(bytes(unknown))


def test_due_checks_follow_quiet_topics(clock: FakeTime) -> None:
    sock = RecordingSocket()
    pub = Publisher(sock, epoch=5)
    assert pub.send_due_checks(0) == 0, "no topic stamped yet"
    pub.publish("b", {})
    pub.publish("a", {})
    pub.publish("a", {})
    sock.sent.clear()
    assert pub.last_position("a") == (5, 1)
    assert pub.last_position("zzz") is None

    clock.now += 0.999
    assert pub.send_due_checks(1.0) == 0
    clock.now += 0.001  # quiet for exactly the interval: due
    assert pub.send_due_checks(1.0) == 2
    assert checks(sock) == [(b"a", Meta(5, 1, None, True)), (b"b", Meta(5, 0, None, True))]

    # Checked just now: due again one interval later, while the topic stays quiet.
    clock.now += 0.5
    assert pub.send_due_checks(1.0) == 0
    clock.now += 0.5
    assert pub.send_due_checks(1.0) == 2
    sock.sent.clear()

    # A message postpones its topic's next check.
    clock.now += 0.6
    pub.publish("a", {})
    sock.sent.clear()
    clock.now += 0.4
    assert pub.send_due_checks(1.0) == 1
    assert checks(sock) == [(b"b", Meta(5, 0, None, True))]
    clock.now += 0.6
    assert pub.send_due_checks(1.0) == 1
    assert checks(sock) == [(b"a", Meta(5, 2, None, True))]

    # Interval 0: every topic at once (the final round).
    assert pub.send_due_checks(0) == 2


def test_send_check_carries_the_last_position(clock: FakeTime) -> None:
    sock = RecordingSocket()
    pub = Publisher(sock, epoch=9)
    with pytest.raises(ValueError):
        pub.send_check("t")
    pub.publish("t", "x")
    sock.sent.clear()
    assert pub.send_check("t") == (9, 0)
    assert checks(sock) == [(b"t", Meta(9, 0, None, True))]
    # It counts as telling workers the position: no check due one tick later.
    clock.now += 0.5
    assert pub.send_due_checks(1.0) == 0


class StreamReader:
    """Receives from a SUB socket subscribed to everything on ``endpoint`` and checks the
    stream as it goes: one epoch, contiguous offsets, every check naming the last message
    seen before it (one PUB socket to one SUB keeps order)."""

    def __init__(self, zctx: zmq.Context, endpoint: str, epoch: int) -> None:
        self.sub = zctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(endpoint)
        self.epoch = epoch
        self.messages: list[int] = []
        self.checks: list[int] = []

    def drain(self) -> None:
        while self.sub.poll(0):
            _topic, meta, payload = self.sub.recv_multipart()
            m = decode_meta(meta)
            assert m.epoch == self.epoch
            if m.check:
                assert payload == b""
                if self.messages:
                    assert m.offset == self.messages[-1], "a check names the last message"
                self.checks.append(m.offset)
            else:
                if self.messages:
                    assert m.offset == self.messages[-1] + 1, "offsets are contiguous"
                self.messages.append(m.offset)


def start_cli(start_publisher_process, zctx: zmq.Context, *args: str):
    pub = start_publisher_process("--bind", "tcp://127.0.0.1:*", "--topic", "q", *args)
    endpoint = pub.wait_line("bound ")
    epoch = int(pub.wait_line("epoch "), 16)
    # Joining after the start: the stream is checked from the first message seen.
    return pub, StreamReader(zctx, endpoint, epoch)


def test_cli_sends_checks_while_a_topic_is_quiet(start_publisher_process, zctx) -> None:
    # Messages 0.5 s apart, checks after 0.1 s of quiet: several checks between messages.
    pub, stream = start_cli(
        start_publisher_process, zctx, "--rate", "2", "--check-interval", "0.1"
    )

    def two_checks_after_a_message() -> bool:
        stream.drain()
        last = stream.messages[-1] if stream.messages else None
        return last is not None and stream.checks[-2:] == [last, last]

    wait_until_sync(two_checks_after_a_message, 10, "two checks after a message")
    assert pub.proc.poll() is None


def test_cli_sends_a_final_round_of_checks_when_it_stops(start_publisher_process, zctx) -> None:
    # The topic is never quiet for 5 s: the only check is the final round after --count.
    pub, stream = start_cli(
        start_publisher_process, zctx, "--rate", "20", "--count", "20", "--check-interval", "5"
    )
    assert pub.proc.wait(timeout=10) == 0

    def final_check() -> bool:
        stream.drain()
        return bool(stream.checks)

    wait_until_sync(final_check, 5, "the final check")
    assert stream.messages[-1] == 19
    assert stream.checks == [19]

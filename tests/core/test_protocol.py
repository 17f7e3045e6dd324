"""Wire messages, topics and chunk framing / reassembly (pure: no broker)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import subprocess
import sys

import pytest

from core import chunks
from core import protocol as proto
from core.errors import ProtocolError

SHA = "ab" * 32

EXAMPLES: list[proto.Message] = [
    proto.DeviceState(device_id="d1", online=True, model_name="digits", model_version="1.2.0", variant="int8",
                      variants=("fp32", "int8"), variant_latency_ms={"fp32": 2.5}, hardware={"cpus": 4}),
    proto.Telemetry(device_id="d1", seq=3, inferences=10, latency_p50_ms=1.5, queue_depth=2),
    proto.DriftReportMsg(device_id="d1", seq=1, window=200, n=200, scores={"psi": 0.3}, thresholds={"psi": 0.2},
                         flags={"psi": True}, risk=0.7, alarm=True, class_counts=(1, 2, 3)),
    proto.JobStatus(device_id="d1", job_id="j1", version="2", step="health_check", progress=0.5),
    proto.Feedback(sample_id="s1", label="7"),
    proto.DeployCommand(job_id="j1", name="digits", version="2", size=100, sha256=SHA, delivery="mqtt"),
    proto.DeployCommand(job_id="j1", name="digits", version="2", size=100, sha256=SHA, url="http://x/b.elb"),
    proto.RollbackCommand(job_id="j2", reason="accuracy"),
    proto.BundleRequest(device_id="d1", job_id="j1", version="2", start=4),
]


def test_public_names() -> None:
    for name in proto.__all__:
        assert hasattr(proto, name), name
    for name in chunks.__all__:
        assert getattr(proto, name) is getattr(chunks, name)  # re-exported, not copied


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: m.TYPE)
def test_every_message_round_trips(msg: proto.Message) -> None:
    wire = msg.encode()
    assert proto.decode(wire) == msg
    assert json.loads(wire)["schema_version"] == proto.PROTOCOL_SCHEMA_VERSION
    assert type(msg).from_dict(msg.to_dict()) == msg


@pytest.mark.parametrize("payload, needle", [
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"type": "nope", "schema_version": 1}', "unknown message type"),
    (b'{"type": "rollback", "schema_version": 2, "job_id": "j", "reason": "r"}', "schema_version"),
    (b'{"type": "rollback", "schema_version": 1, "job_id": "j", "reason": "r", "extra": 1}', "unknown fields"),
    (b'{"type": "rollback", "schema_version": 1, "job_id": "j"}', "invalid rollback"),
    (b'{"type": "rollback", "schema_version": 1, "job_id": 5, "reason": "r"}', "rollback.job_id"),
    (b'{"type": "telemetry", "schema_version": 1, "device_id": "d", "seq": true}', "telemetry.seq"),
    (b'{"type": "telemetry", "schema_version": 1, "device_id": "d/../x", "seq": 1}', "invalid device id"),
    (b'{"type": "drift", "schema_version": 1, "device_id": "d", "seq": 1, "window": 1, "n": 1,'
     b' "scores": {"a": "high"}}', "drift.scores.a"),
    (b'{"type": "job", "schema_version": 1, "device_id": "d", "job_id": "j", "version": "1", "step": "x"}',
     "unknown job step"),
    (b'{"type": "deploy", "schema_version": 1, "job_id": "j", "name": "n", "version": "1", "size": 1,'
     b' "sha256": "' + SHA.encode() + b'", "delivery": "http"}', "no url"),
])
def test_malformed_messages_raise_protocol_error(payload: bytes, needle: str) -> None:
    with pytest.raises(ProtocolError, match=needle):
        proto.decode(payload)


def test_nan_is_refused_on_encode() -> None:
    with pytest.raises(ProtocolError, match="NaN"):
        proto.Telemetry(device_id="d", seq=1, latency_p50_ms=float("nan")).encode()


def test_decode_as_checks_the_type() -> None:
    with pytest.raises(ProtocolError, match="expected a deploy"):
        proto.decode_as(EXAMPLES[-2].encode(), proto.DeployCommand)


def test_topics_build_and_parse() -> None:
    t = proto.TopicScheme("fleet-a/edgeloop/v1")
    assert t.device("pi-7", "drift") == "fleet-a/edgeloop/v1/devices/pi-7/drift"
    assert t.parse(t.device("pi-7", "drift")) == ("pi-7", "drift")
    assert t.parse(t.command("pi-7", "deploy")) == ("pi-7", "cmd/deploy")
    assert t.device_commands("pi-7") == "fleet-a/edgeloop/v1/devices/pi-7/cmd/#"
    for bad in ("other/devices/pi-7/drift", "fleet-a/edgeloop/v1/devices/pi-7/cmd/x",
                "fleet-a/edgeloop/v1/devices/a+b/drift"):
        with pytest.raises(ProtocolError):
            t.parse(bad)
    for prefix in ("", "a/#", "a//b", "$SYS/x"):
        with pytest.raises(ProtocolError):
            proto.TopicScheme(prefix)
    with pytest.raises(ProtocolError):
        t.device("a/b", "state")


def test_routes_put_control_before_reports_before_samples() -> None:
    assert proto.route(EXAMPLES[0]) == proto.Route("state", proto.PRIORITY_CONTROL, True)
    assert proto.route(EXAMPLES[3]).priority == proto.PRIORITY_CONTROL
    assert proto.route(EXAMPLES[1]).priority == proto.PRIORITY_REPORT < proto.PRIORITY_SAMPLES
    with pytest.raises(ValueError):
        proto.route(EXAMPLES[-2])  # commands are not sent by devices


# --------------------------------------------------------------------------- chunks


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 250_000])
def test_split_respects_the_frame_size_and_round_trips(size: int) -> None:
    data = payload(size)
    frames = chunks.split("t-1", data, chunk_size=1000, kind="samples", meta={"device_id": "d1"})
    assert all(len(f) <= 1000 for f in frames)
    parsed = [chunks.parse_frame(f) for f in frames]
    assert {p.total for p in parsed} == {len(frames)} and [p.index for p in parsed] == list(range(len(frames)))
    assert b"".join(p.data for p in parsed) == data
    assert parsed[0].sha256 == hashlib.sha256(data).hexdigest() and parsed[0].meta == {"device_id": "d1"}


def test_default_chunk_size_is_128_kib() -> None:
    frames = chunks.split("t", payload(300_000))
    assert len(frames) == 3 and max(map(len, frames)) <= 128 * 1024


def test_chunk_size_too_small_for_the_header() -> None:
    with pytest.raises(ProtocolError, match="no room"):
        chunks.split("t", b"abc", chunk_size=40)


@pytest.mark.parametrize("wire, needle", [
    (b"", "only 0 bytes"),
    (b"XXXX\x00\x02{}", "magic"),
    (b"ELC1\x00\xff{}", "does not fit"),
    (b"ELC1\x00\x02[]", "not a JSON object"),
    (b"ELC1\x00\x02{x", "not JSON"),
    (b"ELC1\x00\x02{}", "lacks"),
])
def test_parse_frame_rejects_garbage(wire: bytes, needle: str) -> None:
    with pytest.raises(ProtocolError, match=needle):
        chunks.parse_frame(wire)


def test_parse_frame_rejects_inconsistent_headers() -> None:
    good = chunks.parse_frame(chunks.split("t", b"hello")[0])
    for change in ({"index": 1}, {"total": 0}, {"sha256": "xyz"}, {"transfer_id": "../etc"},
                   {"size": 2}, {"index": -1}):
        with pytest.raises(ProtocolError):
            chunks.parse_frame(dataclasses.replace(good, **change).encode())


@pytest.mark.parametrize("depth", [33, 8000])
def test_parse_frame_refuses_a_deeply_nested_header(depth: int) -> None:
    # The header goes through the same size/depth-limited JSON parser as every message:
    # nesting past MAX_JSON_DEPTH (or past Python's recursion limit) is a malformed frame.
    header = b'{"meta":' + b"[" * depth + b"]" * depth + b"}"
    wire = chunks.CHUNK_MAGIC + len(header).to_bytes(2, "big") + header
    with pytest.raises(ProtocolError, match="nested more than"):
        chunks.parse_frame(wire)


def test_over_budget_error_is_a_protocol_error_from_core_errors() -> None:
    from core import errors

    assert chunks.OverBudgetError is errors.OverBudgetError
    assert issubclass(chunks.OverBudgetError, ProtocolError)


def test_reassembly_tolerates_reordering_and_duplicates() -> None:
    data = payload(50_000, seed=3)
    frames = chunks.split("bundle-1", data, chunk_size=4096, kind="bundle", meta={"v": "2"})
    shuffled = frames + frames[:5]
    random.Random(4).shuffle(shuffled)
    r = chunks.Reassembler()
    results = [r.add(f) for f in shuffled]
    done = [x for x in results if x is not None]
    assert len(done) == 1
    assert done[0].data == data and done[0].kind == "bundle" and done[0].meta == {"v": "2"}
    assert len(r) == 0 and r.buffered_bytes == 0
    assert r.add(frames[0]) is None and len(r) == 0  # a late duplicate does not reopen it


def test_corrupted_chunk_drops_the_transfer_with_a_reason() -> None:
    data = payload(20_000, seed=5)
    frames = [chunks.parse_frame(f) for f in chunks.split("s-9", data, chunk_size=4096)]
    bad = bytearray(frames[2].data)
    bad[10] ^= 0xFF
    frames[2] = dataclasses.replace(frames[2], data=bytes(bad))
    dropped: list[chunks.Dropped] = []
    r = chunks.Reassembler(on_drop=dropped.append)
    for f in frames[:-1]:
        assert r.add(f) is None
    with pytest.raises(ProtocolError, match="corrupt"):
        r.add(frames[-1])
    assert [d.reason for d in dropped] == ["corrupt"] and list(r.dropped) == dropped
    assert len(r) == 0 and r.buffered_bytes == 0
    # The sender resends it correctly: delivered.
    done = [r.add(f) for f in chunks.split("s-9", data, chunk_size=4096)]
    assert done[-1] is not None and done[-1].data == data


def test_missing_reports_what_to_ask_for() -> None:
    frames = chunks.split("b", payload(10_000), chunk_size=2048)
    r = chunks.Reassembler()
    assert r.missing("b") is None
    r.add(frames[0])
    r.add(frames[3])
    assert r.missing("b") == tuple(i for i in range(len(frames)) if i not in (0, 3))


def test_memory_is_bounded_by_count_bytes_and_age() -> None:
    now = [0.0]
    r = chunks.Reassembler(max_transfers=2, max_bytes=7_000, ttl_s=60, clock=lambda: now[0])
    a, b, c = (chunks.split(t, payload(6000, i), chunk_size=2048) for i, t in enumerate("abc"))
    r.add(a[0])
    r.add(b[0])
    r.add(c[0])  # third transfer: the oldest ("a") goes
    assert "a" not in r and "b" in r and "c" in r
    for f in c[1:]:  # "c" grows past max_bytes with "b": "b" is evicted, "c" completes
        r.add(f)
    assert [d.reason for d in r.dropped] == ["evicted", "evicted"] and r.buffered_bytes == 0
    r.add(b[1])
    now[0] = 61.0
    r.expire()
    assert len(r) == 0 and r.dropped[-1].reason == "expired"
    with pytest.raises(ProtocolError, match="exceeds"):
        r.add(chunks.split("huge", payload(20_000), chunk_size=4096)[0])


def test_a_resent_transfer_with_new_content_replaces_the_old_one() -> None:
    r = chunks.Reassembler()
    old = chunks.split("t", payload(5000, 1), chunk_size=2048)
    new = chunks.split("t", payload(5000, 2), chunk_size=2048)
    r.add(old[0])
    done = [r.add(f) for f in new]
    assert done[-1] is not None and done[-1].data == payload(5000, 2)
    assert r.dropped[-1].reason == "inconsistent"


def test_importing_the_protocol_stack_pulls_no_heavy_framework() -> None:
    code = ("import sys, core.protocol, edge_agent.outbox, core.mqtt; "
            "bad = [m for m in ('torch', 'train', 'export', 'fleet') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)

"""Property-based fuzz of what the fleet and the agent read from the wire (issue 16 §7):
``protocol.decode``, the chunk reassembler and the bundle reader.  Hostile bytes give the
module's own error (``ProtocolError`` / ``BundleError``), never another exception, and never
corrupt state another sender relies on.  Budgets stay small enough for CI (``deadline=None``:
a loaded 2-core machine must not fail a case on time)."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import chunks
from core.bundle import open_bundle
from core.errors import BundleError, ProtocolError
from core.protocol import decode

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                     max_leaves=20)
_TYPES = ["telemetry", "drift", "job", "feedback", "bundle-req", "state", "deploy", "rollback", "receipt", "x"]


@FUZZ
@given(st.one_of(st.binary(max_size=512),
                 _json.map(lambda v: json.dumps(v).encode()),
                 st.fixed_dictionaries({"type": st.sampled_from(_TYPES), "schema_version": st.integers(0, 3)},
                                       optional={"device_id": _json, "seq": _json, "ts": _json, "job_id": _json,
                                                 "sample_id": _json, "label": _json, "ids": _json, "step": _json})
                 .map(lambda d: json.dumps(d).encode())))
def test_decode_raises_only_protocol_errors(payload: bytes) -> None:
    try:
        decode(payload)
    except ProtocolError:
        pass


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.binary(max_size=300)), max_size=30),
       st.binary(min_size=1, max_size=3000))
def test_the_reassembler_survives_hostile_frames_and_still_delivers(junk: list[tuple[str, bytes]], data: bytes) -> None:
    r = chunks.Reassembler(max_transfers=4, max_bytes=64 * 1024, max_transfers_per_owner=2)
    good = chunks.split("t1", data, chunk_size=256)
    out = r.add(good[0], owner="victim")
    for owner, raw in junk:  # garbage, and real frames mangled, from two other owners
        for payload in (raw, chunks.CHUNK_MAGIC + raw, *(g[: len(raw) % len(g)] + raw for g in good[:1])):
            try:
                r.add(payload, owner=owner)
            except ProtocolError:
                pass
    for f in good[1:]:
        out = r.add(f, owner="victim") or out
    assert out is not None and out.data == data  # the victim's transfer was never touched


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, content in members.items():
            zf.writestr(name, content)
    return buf.getvalue()


@FUZZ
@given(st.one_of(
    st.binary(max_size=2048),
    st.dictionaries(st.sampled_from(["manifest.json", "signature.json", "model.onnx", "labels.txt", "../x", "/abs"]),
                    st.binary(max_size=256) | _json.map(lambda v: json.dumps(v).encode()), max_size=4).map(_zip)))
def test_the_bundle_reader_refuses_hostile_files(tmp_path_factory: pytest.TempPathFactory, blob: bytes) -> None:
    p = Path(tmp_path_factory.mktemp("b")) / f"{hashlib.sha256(blob).hexdigest()[:12]}.elb"
    p.write_bytes(blob)
    with pytest.raises(BundleError):
        open_bundle(p, require_signature=False)

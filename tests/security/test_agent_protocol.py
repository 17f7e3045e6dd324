"""What the device accepts from the wire (issue 16 §4), without a broker: size and depth
limits of ``protocol.decode``, names that could become paths, deploy URL schemes."""

from __future__ import annotations

import json

import pytest

from core import protocol as proto
from core.errors import ProtocolError

_GOOD = proto.DeployCommand(job_id="ro-1-w0-cam-00", name="m", version="1.1.0", size=10, sha256="a" * 64,
                            url="http://fleet:8080/b.elb")


def _with(**override: object) -> bytes:
    return json.dumps(_GOOD.to_dict() | override).encode()


@pytest.mark.parametrize("payload", [
    b"[" * 100_000 + b"]" * 100_000,  # RecursionError inside json
    b'{"a":' * 5_000 + b"1" + b"}" * 5_000,
    _with(rollout_id=None, ts=1.0, name=json.loads("[" * 40 + "]" * 40)),  # parses, but too deep to accept
    b'{"type":"deploy","pad":"' + b"x" * (proto.MAX_MESSAGE_BYTES + 1) + b'"}',
    b'{"type":"deploy","size":' + b"9" * 10_000 + b"}",  # an int over Python's digit limit
    b"\xff\xfe not utf-8",
])
def test_malformed_payloads_are_one_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        proto.decode(payload)


def test_depth_and_size_limits_leave_real_messages_alone() -> None:
    assert proto.decode(_GOOD.encode()) == _GOOD
    state = proto.DeviceState(device_id="cam-00", online=True, hardware={"a": {"b": {"c": [1, [2, [3]]]}}})
    assert proto.decode(state.encode()) == state
    with pytest.raises(ProtocolError, match="nested"):
        proto.parse_json(b"[" * 33 + b"]" * 33)
    assert proto.parse_json(b"[" * 32 + b"]" * 32) is not None


@pytest.mark.parametrize("job_id", ["../x", "a/b", "..", ".hidden", "", "a b", "x" * 201, "ok\n"])
def test_job_ids_that_could_become_paths_are_refused(job_id: str) -> None:
    for payload in (_with(job_id=job_id),
                    json.dumps(proto.RollbackCommand(job_id="r", reason="x").to_dict() | {"job_id": job_id}).encode(),
                    json.dumps(proto.BundleRequest(device_id="d", job_id="j", version="1").to_dict()
                               | {"job_id": job_id}).encode()):
        with pytest.raises(ProtocolError, match="job id"):
            proto.decode(payload)
    with pytest.raises(ProtocolError):
        proto.validate_name(job_id)


@pytest.mark.parametrize("device_id", ["cam\n", "../cam", "a/b", ""])
def test_device_ids_that_could_become_paths_or_topics_are_refused(device_id: str) -> None:
    with pytest.raises(ProtocolError, match="device id"):
        proto.validate_device_id(device_id)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://fleet/b.elb", "data:,x", "http://", "//fleet/b",
                                 "gopher://fleet/b"])
def test_deploy_urls_are_http_or_https_only(url: str) -> None:
    with pytest.raises(ProtocolError, match="http"):
        proto.decode(_with(url=url))
    assert proto.decode(_with(url="https://fleet/b.elb")).url == "https://fleet/b.elb"
    assert proto.decode(_with(url=None, delivery="mqtt")).delivery == "mqtt"  # the fleet's own MQTT transfer

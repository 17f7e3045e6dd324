"""Shared builders for the agent tests: a tiny real model on real digits, in a real signed bundle.

No torch: a two-layer MLP is trained on scikit-learn's 8x8 digits with numpy in a
fraction of a second and written as an ONNX graph with ``onnx.helper``, so the agent
tests run real ONNX Runtime on a real bundle (signature, baseline, reference) without
waiting for the train/export fixtures.  Imported by the ``test_agent_*`` modules.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from core.agent_config import AgentConfig, parse_config
from core.bundle import write_bundle
from core.manifest import InputSpec, Manifest, OutputSpec, Preprocessing, Variant
from core.signing import save_keypair

SPEC = Preprocessing(size=(8, 8), channels=1, mean=(0.5,), std=(0.5,), scale=1.0 / 255.0)


@dataclass(frozen=True)
class Digits:
    train_x: np.ndarray  # uint8 images (N, 8, 8)
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


@functools.lru_cache(maxsize=1)
def digits() -> Digits:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(d.images * 16.0, 0, 255).astype(np.uint8)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(images))
    tr, te = idx[:1000], idx[1000:]
    return Digits(images[tr], d.target[tr], images[te], d.target[te])


def _prep(images: np.ndarray) -> np.ndarray:
    from core.preprocess import preprocess

    return preprocess(images, SPEC)


@functools.lru_cache(maxsize=1)
def trained_weights() -> tuple[np.ndarray, ...]:
    """A 64-32-10 MLP trained with full-batch gradient descent (numpy, deterministic)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # BLAS threads on a shared 2-core box make this 30x slower
        return _train()


def _train() -> tuple[np.ndarray, ...]:
    d = digits()
    x = _prep(d.train_x).reshape(len(d.train_x), -1).astype(np.float64)
    y = np.eye(10)[d.train_y]
    rng = np.random.default_rng(1)
    w1 = rng.normal(0, 0.2, (64, 32))
    b1 = np.zeros(32)
    w2 = rng.normal(0, 0.2, (32, 10))
    b2 = np.zeros(10)
    for _ in range(300):
        h = np.maximum(x @ w1 + b1, 0)
        z = h @ w2 + b2
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - y) / len(x)
        gw2, gb2 = h.T @ g, g.sum(0)
        gh = (g @ w2.T) * (h > 0)
        gw1, gb1 = x.T @ gh, gh.sum(0)
        for w, gw in ((w1, gw1), (b1, gb1), (w2, gw2), (b2, gb2)):
            w -= 0.5 * gw
    return tuple(a.astype(np.float32) for a in (w1, b1, w2, b2))


def onnx_model(*, slow: bool = False, broken: bool = False) -> bytes:
    """The MLP as ONNX (outputs ``logits`` and ``embedding``).

    ``slow`` adds a chain of large matrix products whose result is multiplied by zero
    and added to the logits (so ORT cannot prune it): same outputs, much slower.
    ``broken`` flips the sign of the output layer: a model that loads and runs but is wrong.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w1, b1, w2, b2 = trained_weights()
    if broken:
        w2, b2 = -w2, -b2
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    inits.append(numpy_helper.from_array(np.array([-1, 64], np.int64), "flat_shape"))
    nodes = [
        helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w1", "b1"], ["pre"]),
        helper.make_node("Relu", ["pre"], ["embedding"]),
        helper.make_node("Gemm", ["embedding", "w2", "b2"], ["logits_raw" if slow else "logits"]),
    ]
    if slow:
        # input-dependent work, so ORT cannot fold it into a constant: ~8 M multiply-adds
        rng = np.random.default_rng(2)
        inits += [numpy_helper.from_array(rng.normal(0, 0.01, (64, 1024)).astype(np.float32), "wide"),
                  numpy_helper.from_array(rng.normal(0, 0.01, (1024, 1024)).astype(np.float32), "big"),
                  numpy_helper.from_array(np.zeros(1, np.float32), "zero")]
        nodes.append(helper.make_node("MatMul", ["flat", "wide"], ["mm_in"]))
        prev = "mm_in"
        for i in range(8):
            nodes.append(helper.make_node("MatMul", [prev, "big"], [f"mm{i}"]))
            prev = f"mm{i}"
        nodes += [helper.make_node("ReduceSum", [prev], ["s"], keepdims=1),
                  helper.make_node("Mul", ["s", "zero"], ["s0"]),
                  helper.make_node("Add", ["logits_raw", "s0"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 32])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _forward(x: np.ndarray, broken: bool = False) -> tuple[np.ndarray, np.ndarray]:
    w1, b1, w2, b2 = trained_weights()
    if broken:
        w2, b2 = -w2, -b2
    h = np.maximum(x.reshape(len(x), -1) @ w1 + b1, 0).astype(np.float32)
    return (h @ w2 + b2).astype(np.float32), h


@functools.lru_cache(maxsize=1)
def baseline_bytes() -> bytes:
    from core.drift import compute_baseline
    from edge_agent.inference import softmax

    d = digits()
    x = _prep(d.test_x)
    logits, emb = _forward(x)
    probs = softmax(logits)
    half = len(x) // 2
    b = compute_baseline(x[:half], probs[:half], emb[:half], x[half:], probs[half:], emb[half:],
                         window=(50, 100), n_boot=300, seed=0)
    return b.to_bytes()


def reference_bytes(*, wrong: bool = False) -> bytes:
    import io

    d = digits()
    x = _prep(d.test_x[:32])
    logits, _ = _forward(x, broken=wrong)
    buf = io.BytesIO()
    np.savez(buf, x=x, logits=logits, labels=d.test_y[:32])
    return buf.getvalue()


@dataclass(frozen=True)
class Keys:
    private: Path
    public: Path


@functools.lru_cache(maxsize=1)
def keys() -> Keys:
    import hashlib

    from core.signing import PrivateKey

    # a fixed test key, so a subprocess (the kill -9 tests) trusts the same bundles
    d = Path(tempfile.mkdtemp(prefix="edgeloop-agent-keys-"))
    paths = save_keypair(d / "fleet", PrivateKey(hashlib.sha256(b"edgeloop agent tests").digest()))
    return Keys(paths.private, paths.public)


def accuracy(x_images: np.ndarray, y: np.ndarray) -> float:
    logits, _ = _forward(_prep(x_images))
    return float(np.mean(np.argmax(logits, 1) == y))


def make_bundle(out: Path, version: str = "1.0.0", *, slow_variant: bool = False, over_budget_variant: bool = False,
                wrong_reference: bool = False, broken_model: bool = False, sign: bool = True,
                signing_key: Path | None = None, channels: int = 1, name: str = "tiny-mlp") -> Path:
    """Write a signed bundle ``out`` of the tiny MLP (plus optional extra variants)."""
    from core.signing import load_private_key

    d = digits()
    acc = accuracy(d.test_x, d.test_y)
    files: dict[str, bytes | Path] = {"models/onnx-fp32.onnx": onnx_model(broken=broken_model),
                                      "baseline.npz": baseline_bytes(),
                                      "reference.npz": reference_bytes(wrong=wrong_reference),
                                      "metrics.json": b"{}"}
    variants = [Variant(id="onnx-fp32", format="onnx", precision="fp32", file="models/onnx-fp32.onnx",
                        test_accuracy=acc, accuracy_drop=0.0)]
    if slow_variant:
        # listed first, and "int8": auto must measure, not assume quantized is faster
        files["models/onnx-int8-static.onnx"] = onnx_model(slow=True)
        variants.insert(0, Variant(id="onnx-int8-static", format="onnx", precision="int8-static",
                                   file="models/onnx-int8-static.onnx", test_accuracy=acc, accuracy_drop=0.0))
    if over_budget_variant:
        files["models/onnx-int8-dynamic.onnx"] = onnx_model()
        variants.append(Variant(id="onnx-int8-dynamic", format="onnx", precision="int8-dynamic",
                                file="models/onnx-int8-dynamic.onnx", test_accuracy=acc - 0.05, accuracy_drop=5.0))
    spec = SPEC if channels == 1 else dataclasses.replace(SPEC, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    manifest = Manifest(
        name=name, version=version, created="2025-01-01T00:00:00Z", labels=tuple(str(i) for i in range(10)),
        input=InputSpec(name="x", shape=(-1, channels, 8, 8)), outputs=OutputSpec(embedding_dim=32),
        preprocessing=spec, variants=tuple(variants), reference_accuracy=acc, accuracy_budget=0.5,
    )
    key = load_private_key(signing_key or keys().private) if sign else None
    return write_bundle(out, manifest, files, signing_key=key)


def agent_config(state_dir: Path, **sections: dict) -> AgentConfig:
    """A config for tests: no broker, HTTP on a free port, the test key trusted."""
    data: dict = {
        "agent": {"device_id": "dev-test", "state_dir": str(state_dir), "trusted_key": str(keys().public)},
        "broker": {"enabled": False},
        "http": {"enabled": False, "port": 0},
        "model": {"benchmark_runs": 5},
        "update": {"min_free_mb": 0.0},
    }
    for name, keys_ in sections.items():
        data.setdefault(name, {}).update(keys_)
    return parse_config(data, source="<string>")


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Signed bundles of the tiny MLP: v1, v2, a tampered copy, a failing-health one, an unsigned one."""
    d = tmp_path_factory.mktemp("agent-bundles")
    out = {
        "v1": make_bundle(d / "tiny-1.0.0.elb", "1.0.0"),
        "v2": make_bundle(d / "tiny-1.1.0.elb", "1.1.0"),
        "v0": make_bundle(d / "tiny-0.9.0.elb", "0.9.0"),
        "broken": make_bundle(d / "tiny-2.0.0-broken.elb", "2.0.0", broken_model=True),
        "unsigned": make_bundle(d / "tiny-1.2.0-unsigned.elb", "1.2.0", sign=False),
        "rgb": make_bundle(d / "tiny-1.3.0-rgb.elb", "1.3.0", channels=3),
        "multi": make_bundle(d / "tiny-1.4.0-multi.elb", "1.4.0", slow_variant=True, over_budget_variant=True),
    }
    other = save_keypair(d / "other")
    out["wrong_key"] = make_bundle(d / "tiny-1.5.0-otherkey.elb", "1.5.0", signing_key=other.private)
    tampered = d / "tiny-1.1.0-tampered.elb"
    data = bytearray(out["v2"].read_bytes())
    # flip one byte inside the stored (uncompressed) ONNX model: the member hash must catch it
    pos = data.find(b"tiny_mlp")
    data[pos] ^= 0x01
    tampered.write_bytes(bytes(data))
    out["tampered"] = tampered
    return out

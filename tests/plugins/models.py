"""The real third-party models of ../shared/models as bundles, built once per session from the CLI.

Each model is bundled exactly as docs/models.md tells a user to (``MODEL_FLAGS``), signed
with the agent tests' key.  Tests skip with a reason when ../shared/models is absent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

__all__ = ["MODELS_DIR", "SharedModel", "SHARED", "cli", "agent_toml", "require_models"]

MODELS_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "models"


@dataclass(frozen=True)
class SharedModel:
    key: str
    folder: str
    file: str
    flags: tuple[str, ...]
    labels: tuple[str, ...] = ()  # written to a labels file when the folder has none

    @property
    def dir(self) -> Path:
        return (MODELS_DIR / self.folder).resolve()

    @property
    def path(self) -> Path:
        return self.dir / self.file

    def expected(self) -> dict:
        return json.loads((self.dir / "expected.json").read_text())


SHARED = {m.key: m for m in (
    SharedModel("ssd", "01_ssd_mobilenet_v1_coco_quant_tflite", "coco_ssd_mobilenet_v1_1.0_quant_2018_06_29.tflite",
                ("--labels", "{dir}/coco_labels.txt")),
    SharedModel("yolox", "02_yolox_nano_onnx", "yolox_nano.onnx",
                ("--labels", "{dir}/coco_classes.txt", "--detector", "yolox", "--channel-order", "BGR", "--range", "pixel",
                 "--fit", "letterbox", "--anchor", "top-left", "--pad-value", "114", "--resize", "bilinear-cv")),
    SharedModel("mobilenet", "03_mobilenet_v1_0.25_224_float_tflite", "mobilenet_v1_0.25_224_1_metadata_1.tflite",
                ("--range", "signed")),
    SharedModel("ppocr", "04_ppocr_textline_cls_onnx", "ch_ppocr_mobile_v2.0_cls_infer.onnx",
                ("--size", "48", "192", "--channel-order", "BGR", "--range", "signed", "--fit", "height",
                 "--pad-value", "127.5", "--resize", "bilinear-cv"), labels=("0", "180")),
    SharedModel("kws", "05_micro_speech_tflite", "micro_speech_quantized.tflite", (),
                labels=("silence", "unknown", "yes", "no")),
    SharedModel("toycar", "06_toycar_anomaly_autoencoder_tflite", "ad01_int8.tflite",
                ("--task", "tensor", "--score", "reconstruction-mse")),
)}


def require_models() -> None:
    if not (MODELS_DIR / "README.md").is_file():
        pytest.skip(f"no shared models at {MODELS_DIR.resolve()} (the third-party development set is not checked out)")


def cli(argv: list[str], capsys: pytest.CaptureFixture[str] | None = None) -> tuple[int, str]:
    """Run ``edgeloop ARGV`` in-process; (exit status, stdout)."""
    from edgeloop.cli import main

    if capsys is not None:
        capsys.readouterr()
    rc = main([str(a) for a in argv])
    if capsys is None:
        return rc, ""
    cap = capsys.readouterr()
    return rc, cap.out if rc == 0 else cap.out + cap.err


def agent_toml(path: Path, state: Path, trusted: Path, *, http_port: int | None = None, variant: str = "auto") -> Path:
    """An agent config file for the CLI: no broker, the test key trusted; ``variant``: pin one (no timing)."""
    http = f"enabled = true\nport = {http_port}" if http_port is not None else "enabled = false\nport = 0"
    path.write_text(f"""[agent]
device_id = "dev-models"
state_dir = "{state}"
trusted_key = "{trusted}"

[broker]
enabled = false

[http]
{http}

[model]
variant = "{variant}"
benchmark_runs = 3

[update]
min_free_mb = 0.0
""")
    return path


@pytest.fixture(scope="session")
def shared_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every shared model bundled with ``edgeloop bundle create`` (once per session)."""
    require_models()
    from tests.plugins.agent_kit import keys

    d = tmp_path_factory.mktemp("shared-bundles")
    out = {}
    for m in SHARED.values():
        flags = [f.replace("{dir}", str(m.dir)) for f in m.flags]
        if m.labels:
            (d / f"{m.key}.labels").write_text("\n".join(m.labels) + "\n")
            flags += ["--labels", str(d / f"{m.key}.labels")]
        rc, _ = cli(["bundle", "create", "--model", m.path, "--name", m.key, "--version", "1.0.0", *flags,
                     "--sign", keys().private, "--out", d / f"{m.key}.elb"])
        assert rc == 0, f"bundle create {m.key} failed"
        out[m.key] = d / f"{m.key}.elb"
    return out


def npy(path: Path, arr: np.ndarray) -> Path:
    np.save(path, arr)
    return path

"""train: models, loop determinism, checkpoint self-description, evaluation, fine-tuning, tuning, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import ConfigError, TrainError
from core.manifest import Preprocessing
from edgeloop.cli import main
from train.api import LoadedRun, TrainConfig, load_run, train_run
from train.evaluate import EvalReport, evaluate_logits
from train.models import ModelArgs, build_model, count_params, freeze_backbone, load_weights

# A run small enough to train twice in a test: 16x16 digits, one epoch.
QUICK = dict(dataset="digits", model="tiny-cnn", image_size=16, epochs=1, threads=1, width=0.5)


# ---------------------------------------------------------------------------- models


@pytest.mark.parametrize("name,size,emb", [("tiny-cnn", 32, 64), ("mobilenet_v3_small", 64, 1024),
                                           ("mobilenet_v2", 64, 1280), ("resnet18", 64, 512)])
def test_models_expose_logits_and_embedding(name: str, size: int, emb: int) -> None:
    ch = 1 if name == "tiny-cnn" else 3
    model = build_model(ModelArgs(name, 7, in_channels=ch)).eval()
    x = torch.zeros(2, ch, size, size)
    logits, e = model.forward_with_embedding(x)
    assert logits.shape == (2, 7) and e.shape == (2, emb)
    torch.testing.assert_close(model(x), logits)


def test_tiny_cnn_is_small_and_has_batchnorm() -> None:
    model = build_model(ModelArgs("tiny-cnn", 10))
    assert count_params(model) < 100_000
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_weights_load_strict_except_head(tmp_path: Path) -> None:
    src = build_model(ModelArgs("mobilenet_v3_small", 10, in_channels=3))
    torch.save(src.net.state_dict(), tmp_path / "tv.pth")  # torchvision-style keys, no "net." prefix
    dst = build_model(ModelArgs("mobilenet_v3_small", 3, in_channels=3))
    skipped = load_weights(dst, tmp_path / "tv.pth")
    assert skipped == ["net.classifier.3.weight", "net.classifier.3.bias"]
    torch.testing.assert_close(dst.net.features[0][0].weight, src.net.features[0][0].weight)
    other = build_model(ModelArgs("mobilenet_v3_small", 3, in_channels=3, width=0.5))
    with pytest.raises(TrainError, match="do not fit"):
        load_weights(other, tmp_path / "tv.pth")
    freeze_backbone(dst)
    assert {n for n, p in dst.named_parameters() if p.requires_grad} == set(skipped)


# ---------------------------------------------------------------------------- evaluation


def test_evaluate_logits_on_known_values() -> None:
    y = np.array([0, 0, 1, 1, 2, 2])
    logits = np.zeros((6, 3))
    logits[np.arange(6), [0, 1, 1, 1, 2, 0]] = 5.0  # two mistakes: 0->1 and 2->0
    r = evaluate_logits(logits, y, ["a", "b", "c"])
    assert r.accuracy == pytest.approx(4 / 6) and r.n == 6
    assert r.confusion == ((1, 1, 0), (0, 2, 0), (1, 0, 1))
    a, b, c = r.per_class
    assert (a.precision, a.recall) == (0.5, 0.5)
    assert (b.precision, b.recall) == (pytest.approx(2 / 3), 1.0)
    assert (c.precision, c.recall, c.support) == (1.0, 0.5, 2)
    assert r.macro_f1 == pytest.approx(np.mean([0.5, 0.8, 2 / 3]))
    assert 0.5 < r.roc_auc <= 1.0  # type: ignore[operator]
    assert EvalReport.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    perfect = evaluate_logits(np.eye(3)[[0, 1, 2, 1]] * 3, np.array([0, 1, 2, 1]), ["a", "b", "c"])
    assert perfect.accuracy == 1.0 and perfect.roc_auc == 1.0 and perfect.loss < 0.2


# ---------------------------------------------------------------------------- the session run


@pytest.mark.slow
def test_run_directory_and_self_describing_checkpoint(digits_run: Path) -> None:
    for f in ("params.json", "metrics.json", "checkpoint.pt", "split.json", "train.log", "confusion.png"):
        assert (digits_run / f).is_file(), f
    ckpt = torch.load(digits_run / "checkpoint.pt", weights_only=True)
    assert ckpt["model"] == {"name": "tiny-cnn", "num_classes": 10, "in_channels": 1, "width": 1.0, "dropout": 0.2}
    assert ckpt["labels"] == list("0123456789")
    assert Preprocessing(**ckpt["preprocessing"]) == Preprocessing(size=(32, 32), channels=1, mean=(0.5,), std=(0.5,))
    assert ckpt["config"]["seed"] == 0 and ckpt["epoch"] >= 1
    assert ckpt["best_metric"]["name"] == "val_accuracy" and set(ckpt["model_state"]) >= {"head.weight"}
    metrics = json.loads((digits_run / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.93
    assert "epoch" in (digits_run / "train.log").read_text()


@pytest.mark.slow
def test_load_run_contract(digits_loaded: LoadedRun, digits_run: Path) -> None:
    run = digits_loaded
    assert not run.model.training and run.labels == tuple("0123456789")
    assert run.preprocessing.size == (32, 32) and run.run_id == "digits-tiny-cnn"
    assert run.dataset.name == "digits" and len(run.data_hash) == 64
    x, y = run.arrays("test")
    assert x.dtype == np.float32 and x.shape == (len(run.split.test), 1, 32, 32) and y.dtype == np.int64
    with torch.no_grad():
        logits, emb = run.model.forward_with_embedding(torch.from_numpy(x))
    acc = float((logits.argmax(1).numpy() == y).mean())
    assert acc == pytest.approx(run.metrics["test_accuracy"])
    assert emb.shape == (len(y), 64)
    assert run.params["seed"] == 0 and run.params["dataset"] == "digits"


@pytest.mark.slow
def test_eval_cli_on_run(digits_run: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["eval", str(digits_run), "--json", "--confusion-png", str(tmp_path / "cm.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    metrics = json.loads((digits_run / "metrics.json").read_text())
    assert out["results"]["checkpoint"]["accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_fine_tune_from_parent_with_extra_samples(digits_run: Path, tmp_path: Path) -> None:
    parent = load_run(digits_run)
    rng = np.random.default_rng(0)
    extra = rng.integers(0, 256, (20, 40, 40), dtype=np.uint8)  # other camera size: resized to 32x32
    labels = [str(i % 10) for i in range(20)]
    child = train_run(TrainConfig(init_from=str(digits_run), epochs=1, lr=1e-4, out_dir=str(tmp_path), threads=1),
                      extra_images=extra, extra_labels=labels)
    run = load_run(child)
    assert run.params["parent"]["run_id"] == "digits-tiny-cnn" and run.params["extra_samples"] == 20
    n = len(parent.dataset)
    assert run.split.test[:len(parent.split.test)] == parent.split.test  # parent's test set stays unseen
    assert len(run.dataset) == n + 20 and run.dataset.images.shape[1:] == (32, 32)
    assert run.preprocessing == parent.preprocessing and run.model.args == parent.model.args
    # The train part must include the new samples.
    assert any(i >= n for i in run.split.train)
    with pytest.raises(ConfigError, match="resnet18"):
        train_run(TrainConfig(init_from=str(digits_run), model="resnet18", out_dir=str(tmp_path)))


# ---------------------------------------------------------------------------- determinism, tuning


@pytest.mark.slow
def test_same_seed_same_data_same_metrics(tmp_path: Path) -> None:
    a = train_run(TrainConfig(**QUICK, out_dir=str(tmp_path), run_name="a"))
    b = train_run(TrainConfig(**QUICK, out_dir=str(tmp_path), run_name="b"))
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    for m in (ma, mb):
        for h in m["train"]["history"]:
            h.pop("seconds")
        m["train"].pop("train_seconds")
    assert ma == mb
    sa, sb = (torch.load(r / "checkpoint.pt", weights_only=True)["model_state"] for r in (a, b))
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.slow
def test_optuna_two_trials(tmp_path: Path) -> None:
    run = train_run(TrainConfig(**QUICK, trials=2, out_dir=str(tmp_path)))
    study = json.loads((run / "study.json").read_text())
    assert study["n_trials"] == 2 and len(study["trials"]) == 2
    params = json.loads((run / "params.json").read_text())
    assert params["config"]["lr"] == study["best_params"]["lr"]
    assert json.loads((run / "metrics.json").read_text())["tuning"]["best_trial"] == study["best_trial"]


# ---------------------------------------------------------------------------- config and CLI errors


@pytest.mark.parametrize("bad", [dict(model="vgg"), dict(lr=0), dict(epochs=0), dict(dropout=1.0),
                                 dict(weights="a", init_from="b"), dict(val_fraction=0.6, test_fraction=0.5)])
def test_config_validation(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        TrainConfig(**bad)  # type: ignore[arg-type]
    cfg = TrainConfig(epochs=3)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="unknown key"):
        TrainConfig.from_dict({"epochz": 3})


@pytest.mark.parametrize("argv,words", [
    (["train", "--data", "/nonexistent/imgs", "--epochs", "1"], "/nonexistent/imgs: no such folder"),
    (["train", "--epochs", "0"], "epochs: expected an integer"),
    (["train", "--dataset", "digits", "--data", "/x"], "conflicts"),
    (["train", "--init-from", "/nonexistent/run"], "no checkpoint"),
    (["train", "--weights", "/nonexistent/w.pt", "--epochs", "1"], "no such weights file"),
    (["eval", "/nonexistent/run"], "no such run directory or bundle"),
])
def test_cli_errors_exit_2_with_one_line(argv: list[str], words: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    if argv[0] == "train":
        argv = [*argv, "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgeloop: error:") and words in err and "\n" not in err


def test_incomplete_run_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "params.json").write_text("{}")
    assert main(["eval", str(tmp_path)]) == 2
    assert "incomplete run" in capsys.readouterr().err


def test_cli_module_imports_no_torch() -> None:
    code = "import sys, train.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_eval_bundle_through_the_edge_runtime(digits_loaded: LoadedRun, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A hand-made one-variant bundle (plain ONNX export) scores what the checkpoint scores."""
    pytest.importorskip("onnxruntime")
    from core.bundle import write_bundle
    from core.manifest import InputSpec, Manifest, OutputSpec, Variant

    run = digits_loaded

    class WithEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = run.model

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.m.forward_with_embedding(x)

    onnx_path = tmp_path / "m.onnx"
    with warnings.catch_warnings():  # the legacy exporter is deprecated, and quick: fine for a test bundle
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(WithEmbedding().eval(), (torch.zeros(1, 1, 32, 32),), str(onnx_path), dynamo=False,
                          input_names=["input"], output_names=["logits", "embedding"],
                          dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}, "embedding": {0: "n"}})
    manifest = Manifest(
        name="digits", version="1.0.0", created="2026-01-01T00:00:00Z", labels=run.labels,
        input=InputSpec("input", (-1, 1, 32, 32)), outputs=OutputSpec(embedding_dim=64),
        preprocessing=run.preprocessing, variants=(Variant("onnx-fp32", "onnx", "fp32", "models/onnx-fp32.onnx"),),
        baseline=None, health=None, lineage=run.lineage())
    bundle = write_bundle(tmp_path / "digits-1.0.0.elb", manifest, {"models/onnx-fp32.onnx": onnx_path})
    assert main(["eval", str(bundle), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["results"]["onnx-fp32"]["accuracy"] == pytest.approx(run.metrics["test_accuracy"], abs=1e-9)

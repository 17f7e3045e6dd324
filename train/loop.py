"""The training loop: AdamW, warm-up + cosine, light augmentation, early stopping.

Works on preprocessed float tensors held in memory (the datasets here are small), so one
epoch is a few tensor slices rather than a DataLoader with worker processes.  Same seed,
same data and same thread count give bit-identical results.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from core.progress import Progress

from .models import EdgeModel

__all__ = ["FitParams", "EpochStats", "FitResult", "fit", "predict", "deterministic", "set_train_mode"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitParams:
    """The knobs of one optimisation (a subset of :class:`train.config.TrainConfig`)."""

    epochs: int
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    seed: int = 0
    patience: int = 8
    augment: bool = True
    warmup_epochs: float = 1.0
    precise_bn: bool = False  # re-estimate BatchNorm statistics on the train set before each validation


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    seconds: float


@dataclass
class FitResult:
    """What :func:`fit` learned; the model itself is left holding the best weights."""

    history: list[EpochStats]
    best_epoch: int
    best_val_accuracy: float
    best_val_loss: float
    stopped_early: bool
    seconds: float
    best_state: dict[str, Tensor] = field(repr=False, default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "best_val_accuracy": self.best_val_accuracy,
                "best_val_loss": self.best_val_loss, "epochs_run": len(self.history),
                "stopped_early": self.stopped_early, "train_seconds": round(self.seconds, 3),
                "history": [asdict(h) for h in self.history]}


@contextlib.contextmanager
def deterministic(seed: int, threads: int | None = None) -> Iterator[int]:
    """Seed torch, fix the thread count and ask for deterministic kernels; restore afterwards.

    Restoring matters: tests and the fleet run training inside a process that does other
    work.  Yields the thread count used (recorded in params.json).
    """
    n = threads or os.cpu_count() or 1
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_rng = torch.get_rng_state()
    torch.set_num_threads(n)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    try:
        yield n
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)
        torch.set_rng_state(prev_rng)


def set_train_mode(model: nn.Module) -> None:
    """``model.train()``, except BatchNorm layers whose parameters are frozen keep their statistics."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and not m.weight.requires_grad:
            m.eval()


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Small random rotation (+-10 deg), scale (0.9-1.1) and shift (+-10%): one grid_sample per batch."""
    n = x.shape[0]
    u = torch.rand(n, 4, generator=gen) * 2 - 1
    angle, scale, shift = u[:, 0] * math.radians(10), 1 + u[:, 1] * 0.1, u[:, 2:] * 0.2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    # "border" repeats the edge pixels: the background of a camera frame, not a black bar.
    return nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


@torch.inference_mode()
def predict(model: EdgeModel, x: Tensor | np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(logits, embeddings) as numpy arrays, model in eval mode."""
    was_training = model.training
    model.eval()
    xt = torch.as_tensor(x)
    logits, embs = [], []
    for i in range(0, len(xt), batch_size):
        lg, emb = model.forward_with_embedding(xt[i:i + batch_size])
        logits.append(lg.float().numpy())
        embs.append(emb.float().numpy())
    model.train(was_training)
    return np.concatenate(logits), np.concatenate(embs)


@torch.no_grad()
def _recalibrate_bn(model: EdgeModel, x: Tensor, batch_size: int) -> None:
    """Replace BatchNorm running statistics with exact averages over ``x`` ("precise BN").

    torchvision's MobileNetV3 trained from scratch on a few hundred steps has running
    statistics that lag its fast-moving weights so badly that the eval-mode model predicts
    one class (measured: 10% val accuracy while train-mode accuracy was 77%).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size])
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom


def _val_metrics(model: EdgeModel, x: Tensor, y: Tensor) -> tuple[float, float]:
    logits, _ = predict(model, x)
    lt = torch.from_numpy(logits)
    return float(nn.functional.cross_entropy(lt, y)), float((lt.argmax(1) == y).float().mean())


def fit(model: EdgeModel, x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor, params: FitParams, *,
        on_epoch: Callable[[EpochStats], None] | None = None, progress: bool = False) -> FitResult:
    """Train ``model`` in place; it ends holding the weights of its best validation epoch.

    Early stopping watches validation accuracy (ties broken by validation loss) with
    ``params.patience``.  ``on_epoch`` sees every epoch's stats and may raise to stop
    (Optuna's pruning does).  Call inside :func:`deterministic` for reproducible runs.
    """
    gen = torch.Generator().manual_seed(params.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay)
    n = len(x_train)
    steps = max(1, n // params.batch_size)  # drop the last partial batch: BatchNorm dislikes tiny ones
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(params.epochs * steps, max(1, int(params.warmup_epochs * steps))))
    loss_fn = nn.CrossEntropyLoss()
    history: list[EpochStats] = []
    best = (-1.0, math.inf)
    best_epoch, best_state, since_best, stopped = 0, copy.deepcopy(model.state_dict()), 0, False
    t_start = time.perf_counter()
    with Progress("training", params.epochs, enabled=progress) as bar:
        for epoch in range(1, params.epochs + 1):
            t0 = time.perf_counter()
            set_train_mode(model)
            perm = torch.randperm(n, generator=gen)
            tot_loss, tot_correct, seen = 0.0, 0, 0
            for s in range(steps):
                idx = perm[s * params.batch_size:(s + 1) * params.batch_size] if n >= params.batch_size else perm
                xb, yb = x_train[idx], y_train[idx]
                if params.augment:
                    xb = _augment(xb, gen)
                logits = model(xb)
                loss = loss_fn(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                tot_loss += float(loss.detach()) * len(yb)
                tot_correct += int((logits.detach().argmax(1) == yb).sum())
                seen += len(yb)
            if params.precise_bn:
                _recalibrate_bn(model, x_train, max(params.batch_size, 64))
            val_loss, val_acc = _val_metrics(model, x_val, y_val)
            stats = EpochStats(epoch, tot_loss / seen, tot_correct / seen, val_loss, val_acc,
                               opt.param_groups[0]["lr"], time.perf_counter() - t0)
            history.append(stats)
            log.info("epoch %d/%d train_loss %.4f train_acc %.4f val_loss %.4f val_acc %.4f lr %.2e (%.1fs)",
                     epoch, params.epochs, stats.train_loss, stats.train_accuracy, val_loss, val_acc, stats.lr,
                     stats.seconds)
            if (val_acc, -val_loss) > (best[0], -best[1]):
                best, best_epoch, since_best = (val_acc, val_loss), epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                since_best += 1
            bar.advance(status=f"val_acc {val_acc:.3f} (best {best[0]:.3f} @ epoch {best_epoch})")
            if on_epoch is not None:
                on_epoch(stats)
            if since_best >= params.patience:
                stopped = True
                log.info("early stop: no val improvement for %d epochs", params.patience)
                break
    model.load_state_dict(best_state)
    model.eval()
    return FitResult(history, best_epoch, best[0], best[1], stopped, time.perf_counter() - t_start, best_state)

"""Hyper-parameter search with Optuna (TPE sampler, median pruner on per-epoch val accuracy).

Trials train in memory on the run's train split and are scored on its val split; the
test split is never looked at.  The caller retrains the best configuration and saves
``study.json`` in the run.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from core.errors import TrainError

from .config import TrainConfig
from .loop import EpochStats, deterministic, fit
from .prepare import Prepared, build, fit_params

__all__ = ["tune", "search_space"]

log = logging.getLogger("train")


def search_space(trial: Any, config: TrainConfig, *, has_width: bool) -> TrainConfig:
    """The config a trial proposes: lr, weight decay, dropout, width (where the model has one), epochs."""
    base_epochs = int(config.epochs or 10)
    changes: dict[str, Any] = {
        "lr": trial.suggest_float("lr", 3e-4, 1e-2, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True),
        "dropout": trial.suggest_float("dropout", 0.0, 0.5),
        "epochs": trial.suggest_int("epochs", max(1, math.ceil(base_epochs / 2)), base_epochs),
    }
    if has_width:
        changes["width"] = trial.suggest_categorical("width", [0.5, 0.75, 1.0])
    return config.replace(**changes)


def tune(prep: Prepared, n_trials: int, *, progress: bool = False) -> tuple[TrainConfig, dict[str, Any]]:
    """Run ``n_trials`` and return (the best trial's config, a JSON-able study summary)."""
    try:
        import optuna
    except ImportError:
        raise TrainError("tuning needs Optuna", hint="pip install optuna") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = prep.config
    # Fine-tunes keep the parent's architecture, so width is not searched for them.
    has_width = prep.model_args.name != "resnet18" and prep.parent_ckpt is None
    x_tr, y_tr = prep.arrays("train")
    x_va, y_va = prep.arrays("val")

    def objective(trial: Any) -> float:
        cfg = search_space(trial, base, has_width=has_width)

        def report(stats: EpochStats) -> None:
            trial.report(stats.val_accuracy, stats.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        with deterministic(cfg.seed, cfg.threads):
            model = build(prep, width=cfg.width if has_width else None, dropout=cfg.dropout)
            result = fit(model, x_tr, y_tr, x_va, y_va, fit_params(cfg), on_epoch=report)
        log.info("trial %d: val_acc %.4f params %s", trial.number, result.best_val_accuracy, trial.params)
        return result.best_val_accuracy

    sampler = optuna.samplers.TPESampler(seed=base.seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=min(5, max(1, n_trials // 4)), n_warmup_steps=2)
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    study.optimize(objective, n_trials=n_trials, show_progress_bar=False)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise TrainError(f"all {n_trials} tuning trials were pruned or failed", hint="run more trials")
    best = study.best_trial
    best_cfg = base.replace(**{k: v for k, v in best.params.items()}, trials=n_trials)
    summary = {
        "n_trials": n_trials, "best_trial": best.number, "best_value": best.value, "best_params": best.params,
        "sampler": "TPESampler", "pruner": "MedianPruner", "objective": "val_accuracy",
        "trials": [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                    "intermediate": {str(k): v for k, v in t.intermediate_values.items()}} for t in study.trials],
    }
    log.info("tuning: best trial %d val_acc %.4f %s", best.number, best.value, best.params)
    return best_cfg, summary

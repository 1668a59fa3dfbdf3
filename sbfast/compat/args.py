"""The release's ``args``: main.py's argparse defaults as a namespace, for code that calls the
engine functions without main.py's parser."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["RELEASE_DEFAULTS", "release_args"]

# main.py's parser, attribute names and defaults as argparse stores them
RELEASE_DEFAULTS: dict[str, Any] = {
    "data": "cifar10",
    "data_path": None,
    "train_idx_path": "dataset/train_idx.npy",
    "val_idx_path": "dataset/valid_idx.npy",
    "model": "resnet18",
    "width": 64,
    "epochs": 200,
    "lr": 0.1,
    "lrsche": "multistep",
    "batch_size": 128,
    "momentum": 0.9,
    "weight_decay": 0.0005,
    "save_path": None,
    "resume": None,
    "evaluate": False,
    "print_freq": 50,
    "num_workers": 4,
    "bench": False,
    "save_features": False,
    "initial_epochs": -1,
    "flat_trial": 1,
    "rho": 0.05,
    "flat_ratio": 0.0,
    "seed": None,
    "current_seed": 17,
    "sam": "False",
    "random": "False",
    "is_resume": False,
    "sharpness_type": "fisher",
    "data_selection_type": "sharpbalance",
    "train_subset": "boosting",
}


def release_args(**overrides: Any) -> argparse.Namespace:
    """main.py's ``args`` with its defaults, updated by ``overrides``.

    Raises:
        TypeError: an override that main.py's parser does not define (a typo would otherwise
            be ignored by the functions that read ``args``); ``eval_batch_size`` (read by the
            release's ``evaluate_c`` only) is allowed.
    """
    unknown = set(overrides) - set(RELEASE_DEFAULTS) - {"eval_batch_size", "start_epoch"}
    if unknown:
        raise TypeError(f"release_args: main.py has no argument(s) {sorted(unknown)}")
    return argparse.Namespace(**{**RELEASE_DEFAULTS, **overrides})

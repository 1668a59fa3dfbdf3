"""Small on-disk data in the release's layout for the sbfast.compat tests: a CIFAR-10 python
archive folder of a few images and the release's train/valid index files."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from sbfast.compat import release_args


def write_cifar10(root: Path, per_batch: int = 8, test: int = 10, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py`` with 5 train batches of ``per_batch`` random images, a test
    batch and the meta file (str keys, python int labels, as a re-pickled archive)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)

    def batch(n: int) -> dict:
        return {
            "data": rng.randint(0, 256, (n, 3072), dtype=np.uint8),
            "labels": [int(v) for v in rng.randint(0, 10, n)],
        }

    for b in range(1, 6):
        (folder / f"data_batch_{b}").write_bytes(pickle.dumps(batch(per_batch)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(test)))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))
    return root


def cifar_args(root: Path, n_train: int, per_batch: int = 8, **overrides):
    """Fake CIFAR-10 under ``root`` and main.py-style args: the first ``n_train`` of a fixed
    permutation of the training images are the train subset, the rest validation."""
    write_cifar10(root, per_batch)
    perm = np.random.RandomState(1).permutation(5 * per_batch)
    np.save(root / "train_idx.npy", perm[:n_train])
    np.save(root / "valid_idx.npy", perm[n_train:])
    defaults = dict(
        data="cifar10",
        data_path=str(root),
        train_idx_path=str(root / "train_idx.npy"),
        val_idx_path=str(root / "valid_idx.npy"),
        num_workers=0,
        print_freq=1000,
    )
    return release_args(**{**defaults, **overrides})

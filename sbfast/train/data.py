"""The data of a run: its splits (``load_data``) and their tensors on the training device
(``DeviceData``: a batch is one gather, no DataLoader)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from sbfast.data import (
    IndexedTensorDataset,
    load_cifar10,
    load_cifar100,
    load_cifar_c,
    load_digits_splits,
    make_corrupted_sets,
    make_synthetic_images,
    normalize,
)
from sbfast.train.config import SUBSET_SEED, SYNTHETIC_SIZES, TrainConfig, as_config


@dataclass
class TrainData:
    """The data of a run: train and test splits (no transform) and a cache of corrupted test sets.

    Build with :func:`load_data`; pass the same object to several runs to load once.
    """

    name: str
    train: IndexedTensorDataset
    test: IndexedTensorDataset
    num_classes: int
    corruption_root: str | None = None
    _corrupted: dict[tuple[str, int], IndexedTensorDataset] = field(default_factory=dict, repr=False)

    def corrupted(self, names: Sequence[str], severities: Sequence[int]) -> dict[tuple[str, int], IndexedTensorDataset]:
        """{(name, severity): corrupted copy of ``test``}; built (or read) once and cached."""
        keys = [(n, int(s)) for n in names for s in severities]
        missing = [k for k in keys if k not in self._corrupted]
        if missing:
            miss_names = list(dict.fromkeys(k[0] for k in missing))
            miss_sev = sorted({k[1] for k in missing})
            if self.corruption_root is not None:
                stats = dict(mean=self.test.mean, std=self.test.std) if self.test.mean is not None else {}
                sets = load_cifar_c(
                    self.corruption_root, miss_names, miss_sev, lazy=False, num_classes=self.num_classes, **stats
                )
            else:
                sets = make_corrupted_sets(self.test, miss_names, miss_sev, seed=0)
            for k in missing:
                self._corrupted[k] = sets[k]
        return {k: self._corrupted[k] for k in keys}


def fixed_subset(ds: IndexedTensorDataset, n: int | None) -> IndexedTensorDataset:
    if n is None or n >= len(ds):
        return ds
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(SUBSET_SEED))
    return ds.subset(perm[:n].sort().values)


def load_data(config: TrainConfig) -> TrainData:
    """Train and test splits of ``config.dataset`` (digits' validation split is not used)."""
    config = as_config(config)
    if config.dataset == "digits":
        splits = load_digits_splits(seed=0)
        train, test = splits["train"], splits["test"]
    elif config.dataset == "synthetic":
        n_train, n_test = SYNTHETIC_SIZES
        full = make_synthetic_images(n_train + n_test, 10, (1, 8, 8), seed=0)
        train, test = full.subset(range(n_train)), full.subset(range(n_train, n_train + n_test))
    else:
        loader = load_cifar10 if config.dataset == "cifar10" else load_cifar100
        train, test = loader(config.data_root, train=True), loader(config.data_root, train=False)
    train = fixed_subset(train, config.train_subset)
    test = fixed_subset(test, config.test_subset)
    num_classes = max(train.num_classes, test.num_classes)
    return TrainData(config.dataset, train, test, num_classes, corruption_root=config.corruption_root)


class DeviceData:
    """A data set's tensors on the training device, and batch fetching as one gather.

    ``fetch(idx)`` is exactly ``IndexedTensorDataset.__getitem__(idx)``'s x (uint8 -> /255 ->
    normalise, float storage as is), computed on the device, in float32; callers cast after
    augmentation, in the same order as the reference's loader, so the values are the same bits.
    """

    def __init__(self, ds: IndexedTensorDataset, device: torch.device) -> None:
        self.n = len(ds)
        self.x = ds.x.to(device)
        self.y = ds.y.to(device)
        self.mean, self.std = ds.mean, ds.std
        self.device = device

    def fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.x[idx]
        if raw.dtype == torch.uint8:
            x = raw.to(torch.float32).div_(255.0)
            if self.mean is not None:
                x = normalize(x, self.mean, self.std)
        else:
            x = raw
        return x, self.y[idx]

    def slices(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.n, batch_size):
            yield self.fetch(torch.arange(start, min(start + batch_size, self.n), device=self.device))


class DeviceBatches:
    """Re-iterable (index, x float32, y) batches of a :class:`DeviceData` in sample order, all on
    its device: what a scorer's loader yields, without a DataLoader."""

    def __init__(self, data: DeviceData, batch_size: int) -> None:
        self.data, self.batch_size = data, batch_size

    def __len__(self) -> int:
        return -(-self.data.n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for start in range(0, self.data.n, self.batch_size):
            idx = torch.arange(start, min(start + self.batch_size, self.data.n), device=self.data.device)
            x, y = self.data.fetch(idx)
            yield idx, x, y


def augment_fill(ds: IndexedTensorDataset) -> float | tuple[float, ...]:
    """Border value of the crop: normalised black, as ``RandomCropFlip`` (the release pads raw pixels)."""
    if ds.mean is not None and ds.std is not None:
        return tuple(-m / s for m, s in zip(ds.mean, ds.std, strict=True))
    return 0.0

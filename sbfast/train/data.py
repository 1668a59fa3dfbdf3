"""The data of a run: its splits (``load_data``), their tensors on the training device (``DeviceData``: a batch is one gather, no DataLoader), each member's batch order and seeds, and the static batches of the mixed phase (``static_batch_plan``, ``StaticBatcher``: every batch of a member has the same SAM/normal composition)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import RandomSampler

from sbfast.data import (
    IMAGE_FOLDER_DATASETS,
    IndexedTensorDataset,
    StreamingImageDataset,
    corrupted_test_sets,
    load_cifar10,
    load_cifar100,
    load_cifar_c,
    load_digits_splits,
    load_image_splits,
    make_corrupted_sets,
    make_synthetic_images,
    normalize,
)
from sbfast.train.config import AUG_SEED_OFFSET, SUBSET_SEED, SYNTHETIC_SIZES, TrainConfig, as_config, is_int


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
    info: dict = field(default_factory=dict)  # image folders: ImageSplits.run_info(), saved with the run
    _corrupted: dict[tuple[str, int], IndexedTensorDataset] = field(default_factory=dict, repr=False)

    def corrupted(self, names: Sequence[str], severities: Sequence[int]) -> dict[tuple[str, int], IndexedTensorDataset]:
        """{(name, severity): corrupted copy of ``test``}; built (or read) once and cached."""
        keys = [(n, int(s)) for n in names for s in severities]
        missing = [k for k in keys if k not in self._corrupted]
        if missing:
            miss_names = list(dict.fromkeys(k[0] for k in missing))
            miss_sev = sorted({k[1] for k in missing})
            if self.name in IMAGE_FOLDER_DATASETS:
                sets = corrupted_test_sets(self.test, miss_names, miss_sev, self.corruption_root)
            elif self.corruption_root is not None:
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
    info: dict = {}
    if config.dataset == "digits":
        splits = load_digits_splits(seed=0)
        train, test = splits["train"], splits["test"]
    elif config.dataset == "synthetic":
        n_train, n_test = SYNTHETIC_SIZES
        full = make_synthetic_images(n_train + n_test, 10, (1, 8, 8), seed=0)
        train, test = full.subset(range(n_train)), full.subset(range(n_train, n_train + n_test))
    elif config.dataset in IMAGE_FOLDER_DATASETS:
        splits = load_image_splits(
            config.dataset,
            config.data_root,
            image_size=config.image_size,
            mean=config.data_mean,
            std=config.data_std,
            storage=config.data_storage,
            device=config.resolved_device(),
        )
        train, test, info = splits.train, splits.test, splits.run_info()
    else:
        loader = load_cifar10 if config.dataset == "cifar10" else load_cifar100
        train, test = loader(config.data_root, train=True), loader(config.data_root, train=False)
    for name, split, n in (("train_subset", train, config.train_subset), ("test_subset", test, config.test_subset)):
        if n is not None and n > len(split):  # a subset larger than the split would silently be all of it
            raise ValueError(
                f"{name} {n} is larger than {config.dataset}'s {len(split)} {name[:-7]} samples; expected at most {len(split)}"
            )
    train = fixed_subset(train, config.train_subset)
    test = fixed_subset(test, config.test_subset)
    num_classes = max(train.num_classes, test.num_classes)
    return TrainData(config.dataset, train, test, num_classes, corruption_root=config.corruption_root, info=info)


def device_data(ds, device: torch.device):
    """The split's on-device view: tensors on the device, or decoded per batch when streamed."""
    return ds.on_device(device) if isinstance(ds, StreamingImageDataset) else DeviceData(ds, device)


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


@dataclass(frozen=True)
class StaticPlan:
    """How a member's epoch of phase 2 is cut into batches.

    ``full_batches`` batches of exactly (``n_sam``, ``n_normal``) samples (n_sam + n_normal =
    batch size), then ``tail``: the leftover of both parts, as a few batches of at most the batch
    size each, listed as (n_sam, n_normal). Every sample is in exactly one batch per epoch.
    """

    n_sam: int
    n_normal: int
    full_batches: int
    tail: tuple[tuple[int, int], ...]

    @property
    def batch_size(self) -> int:
        return self.n_sam + self.n_normal

    @property
    def num_batches(self) -> int:
        return self.full_batches + len(self.tail)


def static_batch_plan(n_sam: int, n_normal: int, batch_size: int) -> StaticPlan:
    """Pick the per-batch composition of a member's phase-2 batches.

    Among compositions (k, b - k) with b = min(batch_size, N), take the one that fills the most
    full batches F = min(n_sam // k, n_normal // (b - k)) (a part with 0 per batch does not
    limit F), ties to the k closest to b * n_sam / N. The maximum is always at floor or ceil of
    b * n_sam / N, so the full batches carry the member's SAM share to within one sample. The
    leftover N - F b forms the tail: t = ceil(leftover / b) batches of near-equal size, each with
    a near-equal share of the leftover SAM samples. With the release's batch of 128 the tail is
    about one batch (the analogue of the release's last partial batch); with tiny batches and a
    share far from a multiple of 1/b it can be many batches of another composition (b = 4 and a
    20% share: 4 of every 5 batches are (1, 3), the rest (0, 4)), which ``StaticBatcher``
    interleaves with the full ones. Every sample is used once per epoch, so an epoch's summed
    gradient is the release's; per batch, the expected gradient matches random batches up to
    the rounding of the SAM share. The shapes are the same every epoch (a handful in all), so
    compiled code and captured graphs are reused.
    """
    for name, v in (("n_sam", n_sam), ("n_normal", n_normal)):
        if not is_int(v) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    n = n_sam + n_normal
    if n == 0:
        raise ValueError("no samples to batch (n_sam + n_normal = 0)")
    b = min(batch_size, n)
    target = b * n_sam / n
    best: tuple[int, float, int] | None = None
    for k in range(b + 1):
        f_s = n_sam // k if k else n  # n bounds every F, standing in for infinity
        f_n = n_normal // (b - k) if b - k else n
        f = min(f_s, f_n, n // b)
        key = (-f, abs(k - target), k)
        if best is None or key < best:
            best = key
    assert best is not None
    f, k = -best[0], best[2]
    rs, rn = n_sam - f * k, n_normal - f * (b - k)
    left = rs + rn
    tail: list[tuple[int, int]] = []
    if left:
        t = -(-left // b)
        for i in range(t):
            # batch i holds positions [lo, hi) of the leftover laid out with its SAM samples evenly
            # spaced (position q is SAM where floor(q rs / left) steps up), so 0 <= s <= hi - lo
            lo, hi = left * i // t, left * (i + 1) // t
            s = rs * hi // left - rs * lo // left
            tail.append((s, hi - lo - s))
    return StaticPlan(k, b - k, f, tuple(tail))


class StaticBatcher:
    """Per epoch: shuffle a member's SAM indices and normal indices separately and zip them into
    batches of ``plan`` (:func:`static_batch_plan`), then visit the batches in a random order, so
    the tail batches (other compositions) do not all come at the end of the epoch.

    Args:
        sam_idx, normal_idx: int64 [n_sam], [n_normal] sample indices (disjoint).
        batch_size: the run's batch size. generator: CPU generator for the shuffles.
        device: where the yielded index tensors live (moved once per epoch).
    Yields (per ``epoch()``): (sam indices [k_s], normal indices [k_n]) per batch.
    """

    def __init__(
        self,
        sam_idx: torch.Tensor,
        normal_idx: torch.Tensor,
        batch_size: int,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
    ) -> None:
        self.sam_idx = sam_idx.detach().to("cpu", torch.int64)
        self.normal_idx = normal_idx.detach().to("cpu", torch.int64)
        self.plan = static_batch_plan(len(self.sam_idx), len(self.normal_idx), batch_size)
        self.generator = generator
        self.device = torch.device(device)

    def __len__(self) -> int:
        return self.plan.num_batches

    def epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = self.generator
        sam = self.sam_idx[torch.randperm(len(self.sam_idx), generator=g)].to(self.device, non_blocking=True)
        nor = self.normal_idx[torch.randperm(len(self.normal_idx), generator=g)].to(self.device, non_blocking=True)
        p = self.plan
        cuts = [(i * p.n_sam, p.n_sam, i * p.n_normal, p.n_normal) for i in range(p.full_batches)]
        s0, n0 = p.full_batches * p.n_sam, p.full_batches * p.n_normal
        for ks, kn in p.tail:
            cuts.append((s0, ks, n0, kn))
            s0, n0 = s0 + ks, n0 + kn
        for i in torch.randperm(len(cuts), generator=g).tolist() if p.tail else range(len(cuts)):
            s, ks, n, kn = cuts[i]
            yield sam[s : s + ks], nor[n : n + kn]


def member_seeds(config: TrainConfig, j: int) -> dict[str, int]:
    """Seeds of member j: model init, batch order, augmentation."""
    s = config.seed + j
    return {"init": s, "order": s, "augment": s + AUG_SEED_OFFSET}


def release_order(n: int, generator: torch.Generator) -> torch.Tensor:
    """One epoch's sample order as the release's shuffled DataLoader draws it.

    ``RandomSampler(generator=g)`` calls ``randperm(n, g)`` twice per epoch (the second for a
    zero-length tail), so the generator must be consumed the same way to reproduce its batches.
    """
    return torch.tensor(list(RandomSampler(range(n), generator=generator)), dtype=torch.int64)

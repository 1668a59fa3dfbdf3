"""The common container, the embedded data sets, batching and augmentation.

Every data set in sbfast yields ``(index, x, y)``: ``index`` a stable int64 position 0..N-1 (the
key of the per-sample scores and SAM masks), ``x`` a float32 CHW image, ``y`` an int64 label.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from sbfast.data.checks import check_seed

# Per-channel statistics of the public release (utils.create_dataset), in [0, 1] pixel units.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
TINY_IMAGENET_MEAN = (0.480, 0.448, 0.397)
TINY_IMAGENET_STD = (0.276, 0.269, 0.282)

Stats = tuple[float, ...]
Transform = Callable[[torch.Tensor], torch.Tensor]


def _stats_tensor(v: Sequence[float] | float, channels: int, like: torch.Tensor, what: str) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float32, device=like.device).flatten()
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"{what} has {t.numel()} values, expected 1 or {channels} (one per channel)")
    return t.to(like.dtype).view(channels, 1, 1)


def normalize(x: torch.Tensor, mean: Sequence[float] | float, std: Sequence[float] | float) -> torch.Tensor:
    """Pixel space -> model space: ``(x - mean) / std`` per channel.

    Args:
        x: [C, H, W] or [B, C, H, W] floating, pixel values in [0, 1].
        mean, std: one value per channel (or one for all), in [0, 1] pixel units.
    Returns:
        A new tensor of x's shape and dtype.
    """
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be [C, H, W] or [B, C, H, W], got shape {tuple(x.shape)}")
    c = x.shape[-3]
    m, s = _stats_tensor(mean, c, x, "mean"), _stats_tensor(std, c, x, "std")
    if bool((s <= 0).any()):
        raise ValueError(f"std must be > 0, got {std!r}")
    return (x - m) / s


def denormalize(x: torch.Tensor, mean: Sequence[float] | float, std: Sequence[float] | float) -> torch.Tensor:
    """Model space -> pixel space: ``x * std + mean`` per channel (inverse of :func:`normalize`).

    Args:
        x: [C, H, W] or [B, C, H, W] floating.
    Returns:
        A new tensor of x's shape and dtype (not clamped: round-off can leave it a hair outside
        [0, 1]; :func:`sbfast.data.corrupt` clamps).
    """
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be [C, H, W] or [B, C, H, W], got shape {tuple(x.shape)}")
    c = x.shape[-3]
    return x * _stats_tensor(std, c, x, "std") + _stats_tensor(mean, c, x, "mean")


class IndexedTensorDataset(Dataset):
    """In-memory image set that yields ``(index, x, y)``.

    Storage, two kinds (both give float32 out):
      * ``x`` uint8 [N, C, H, W]: raw pixels 0..255 (CIFAR, CIFAR-C, image folders). A fetch
        returns ``normalize(x / 255, mean, std)`` (just ``x / 255`` when mean/std are None). A
        quarter of the memory of float storage: CIFAR-10's train set is 150 MB, not 600 MB.
      * ``x`` floating [N, C, H, W]: already model-ready (digits, synthetic); returned as float32
        unchanged. ``mean``/``std`` then only record how it was normalised, so that pixel space
        can be recovered (:meth:`pixels`) for corruptions.

    Indexing: ``ds[i]`` (int) gives one sample ``(index: int64 0-d, x: [C, H, W], y: int64 0-d)``;
    ``ds[idx]`` (list / 1-D tensor / slice) gives a whole batch ``(index [B], x [B, C, H, W], y [B])``
    in one tensor gather, which :func:`make_loader` uses instead of per-sample collation.
    ``transform`` (optional) is applied to the float x as fetched, so it sees [C, H, W] for one
    sample and [B, C, H, W] for a batch; :class:`RandomCropFlip` accepts both.

    Args:
        x: [N, C, H, W] uint8 or floating.
        y: [N] integer labels (stored as int64).
        transform: callable on float x, see above.
        mean, std: per-channel normalisation in [0, 1] pixel units, both or neither.
        classes: optional class names, ``classes[y]``.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        transform: Transform | None = None,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        x = torch.as_tensor(x)
        y = torch.as_tensor(y)
        if x.dim() != 4:
            raise ValueError(f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise TypeError(f"x must be uint8 (pixels) or floating, got {x.dtype}")
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"y must be [N] with N = {x.shape[0]}, got shape {tuple(y.shape)}")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"y must hold integer labels, got {y.dtype}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        c = x.shape[1]
        if mean is not None and std is not None:
            mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
            if len(mean) != c or len(std) != c:
                raise ValueError(f"mean/std need {c} values (one per channel), got {len(mean)} and {len(std)}")
            if min(std) <= 0:
                raise ValueError(f"std must be > 0, got {std}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        self.x = x if x.dtype == torch.uint8 else x.to(torch.float32)
        self.y = y.to(torch.int64)
        self.transform = transform
        self.mean: Stats | None = mean
        self.std: Stats | None = std
        self.classes = list(classes) if classes is not None else None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_classes(self) -> int:
        """len(classes) if known, else max label + 1 (0 for an empty set)."""
        if self.classes is not None:
            return len(self.classes)
        return int(self.y.max()) + 1 if len(self) else 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def _float(self, raw: torch.Tensor) -> torch.Tensor:
        if raw.dtype != torch.uint8:
            return raw
        out = raw.to(torch.float32).div_(255.0)
        return normalize(out, self.mean, self.std) if self.mean is not None else out

    def __getitem__(self, i: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(i, (int, np.integer)) or (isinstance(i, torch.Tensor) and i.dim() == 0):
            i = int(i)
            n = len(self)
            if not -n <= i < n:
                raise IndexError(f"index {i} out of range for a data set of {n} samples")
            i %= n
            x = self._float(self.x[i])
            if self.transform is not None:
                x = self.transform(x)
            return torch.tensor(i, dtype=torch.int64), x, self.y[i]
        if isinstance(i, slice):
            idx = torch.arange(len(self))[i]
        elif isinstance(i, torch.Tensor) and i.dtype == torch.bool:
            if i.shape != (len(self),):
                raise IndexError(f"a boolean mask must have shape ({len(self)},), got {tuple(i.shape)}")
            idx = i.nonzero().flatten()
        else:
            idx = torch.as_tensor(i, dtype=torch.int64).flatten()
            idx = torch.where(idx < 0, idx + len(self), idx)
        x = self._float(self.x[idx])
        if self.transform is not None:
            x = self.transform(x)
        return idx, x, self.y[idx]

    def pixels(self, idx: Any = None) -> torch.Tensor:
        """Images in [0, 1] pixel space (before normalisation, no transform).

        Returns:
            float32 [B, C, H, W] for the given indices (all samples when idx is None).
        """
        raw = self.x if idx is None else self.x[idx]
        if raw.dtype == torch.uint8:
            return raw.to(torch.float32) / 255.0
        if self.mean is None or self.std is None:
            return raw.clone()
        return denormalize(raw, self.mean, self.std)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> IndexedTensorDataset:
        """A new data set of the chosen samples, re-indexed 0..len(indices)-1 (same transform)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return IndexedTensorDataset(
            self.x[idx], self.y[idx], self.transform, mean=self.mean, std=self.std, classes=self.classes
        )

    def with_transform(self, transform: Transform | None) -> IndexedTensorDataset:
        """The same storage (shared, not copied) with another transform."""
        return IndexedTensorDataset(self.x, self.y, transform, mean=self.mean, std=self.std, classes=self.classes)

    def __repr__(self) -> str:
        return (
            f"IndexedTensorDataset(n={len(self)}, image_shape={self.image_shape}, storage={self.x.dtype}, "
            f"num_classes={self.num_classes}, transform={self.transform!r})"
        )


# --------------------------------------------------------------------------------------------
# Augmentation: the release's RandomCrop(padding=4) + RandomHorizontalFlip, as batched tensor ops
# --------------------------------------------------------------------------------------------


def augment_batch(
    x: torch.Tensor,
    generator: torch.Generator | None,
    pad: int = 4,
    *,
    flip: bool = True,
    fill: float | Sequence[float] = 0.0,
) -> torch.Tensor:
    """Random crop with constant padding ``pad`` and random horizontal flip, per sample.

    Each sample gets its own crop offset (uniform over the 2*pad+1 positions on each axis) and
    its own coin for the flip (p = 0.5), all drawn from ``generator`` (crops first, then flips),
    so the same generator state gives the same batch.

    Args:
        x: [B, C, H, W] (or [C, H, W], treated as B = 1) floating.
        generator: torch.Generator on x's device (None: the global RNG).
        pad: padding on every side, >= 0.
        flip: also flip horizontally.
        fill: padding value in x's own space (scalar or per channel). The release pads the raw
            image with black before normalising; for normalised x that is ``-mean / std``, which
            :class:`RandomCropFlip` passes for you.
    Returns:
        Tensor of x's shape, dtype and device.
    """
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be an int >= 0, got {pad!r}")
    if x.dim() == 3:
        return augment_batch(x.unsqueeze(0), generator, pad, flip=flip, fill=fill).squeeze(0)
    if x.dim() != 4:
        raise ValueError(f"x must be [B, C, H, W] or [C, H, W], got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    dev = x.device
    if pad > 0:
        xp = x.new_empty(b, c, h + 2 * pad, w + 2 * pad)
        xp[:] = _stats_tensor(fill, c, x, "fill")
        xp[:, :, pad : pad + h, pad : pad + w] = x
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, :, None]  # [B, H, 1]
        cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, :]  # [B, 1, W]
        bi = torch.arange(b, device=dev)[:, None, None]
        # Channels last so one advanced index picks every crop: [B, H, W, C] -> [B, C, H, W].
        out = xp.permute(0, 2, 3, 1)[bi, rows, cols].permute(0, 3, 1, 2).contiguous()
    else:
        out = x.clone()
    if flip:
        coin = torch.rand(b, generator=generator, device=dev) < 0.5
        out = torch.where(coin[:, None, None, None], out.flip(-1), out)
    return out


class RandomCropFlip:
    """Picklable transform for :class:`IndexedTensorDataset`: :func:`augment_batch` with its own
    seeded generator (CPU), so a loader's augmentation is reproducible from ``seed``.

    Args:
        pad: crop padding, an int >= 0. seed: generator seed, an int in [0, 2**63).
        flip: random horizontal flip.
        mean, std: if given (the data set's normalisation), pad with normalised black
            ``-mean / std`` as the release does; else pad with 0.
    """

    def __init__(
        self,
        pad: int = 4,
        seed: int = 0,
        *,
        flip: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise ValueError(f"pad must be an int >= 0, got {pad!r}")
        self.pad, self.flip, self.seed = pad, flip, check_seed(seed)
        if mean is not None and std is not None:
            self.fill: float | tuple[float, ...] = tuple(-m / s for m, s in zip(mean, std, strict=True))
        else:
            self.fill = 0.0
        self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gen = self.generator if x.device.type == "cpu" else None
        return augment_batch(x, gen, self.pad, flip=self.flip, fill=self.fill)

    def __repr__(self) -> str:
        return f"RandomCropFlip(pad={self.pad}, seed={self.seed}, flip={self.flip})"


def train_transform_for(dataset: IndexedTensorDataset, seed: int = 0, pad: int = 4) -> RandomCropFlip:
    """The release's training augmentation for ``dataset`` (crop pad 4 with black border + flip)."""
    return RandomCropFlip(pad, seed, mean=dataset.mean, std=dataset.std)


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def _as_batch(batch: Any) -> Any:
    return batch


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A single-process DataLoader that yields ``(index [B] int64, x [B, C, H, W] float32, y [B] int64)``.

    For an :class:`IndexedTensorDataset` each batch is one tensor gather (``dataset[indices]``)
    rather than B per-sample fetches and a collate, which is what makes CPU training on small
    images fast; any other map-style data set yielding (index, x, y) is batched the usual way.
    With ``shuffle`` the order comes from a torch.Generator seeded with ``seed``: the same seed
    gives the same sequence of epochs, each epoch a new permutation.

    Args:
        dataset: map-style data set of (index, x, y).
        batch_size: > 0. shuffle: random order each epoch. seed: order seed, an int in [0, 2**63).
        drop_last: drop the last incomplete batch.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be an int > 0, got {batch_size!r}")
    gen = torch.Generator().manual_seed(check_seed(seed))
    if isinstance(dataset, IndexedTensorDataset):
        sampler = RandomSampler(dataset, generator=gen) if shuffle else SequentialSampler(dataset)
        batches = BatchSampler(sampler, batch_size, drop_last)
        # batch_size=None: each item the sampler yields is a list of indices -> dataset[list].
        return DataLoader(dataset, sampler=batches, batch_size=None, collate_fn=_as_batch, num_workers=0)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, drop_last=drop_last, num_workers=0
    )


# --------------------------------------------------------------------------------------------
# Embedded data sets (no download)
# --------------------------------------------------------------------------------------------

# Sizes of load_digits_splits() with the default fractions, for the docs and the tests.
DIGITS_SPLIT_SIZES = {"train": 1257, "val": 180, "test": 360}


def load_digits_splits(
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> dict[str, IndexedTensorDataset]:
    """scikit-learn's embedded digits (1,797 real 8x8 grey images, 10 classes), split and normalised.

    The 17 grey levels 0..16 are mapped to [0, 1] (``/ 16``), then normalised with the mean and
    std of the TRAIN split's pixels (one channel, so one number each; recorded on every split as
    ``mean``/``std`` so :meth:`IndexedTensorDataset.pixels` recovers [0, 1]). The split is
    stratified by class and fixed by ``seed``: test = ceil(1797 * test_fraction) samples, val =
    ceil(1797 * val_fraction) of the rest, train = the remainder. Defaults: train 1,257 / val 180
    / test 360 (``DIGITS_SPLIT_SIZES``). Each split is indexed 0..n-1 in its own order.
    ``seed`` is an int in [0, 2**32): scikit-learn's split draws from a 32-bit-seeded RandomState.

    Returns:
        {"train", "val", "test"} -> IndexedTensorDataset of float32 [n, 1, 8, 8], int64 labels.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    seed = check_seed(seed, limit=2**32)
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < float(f) < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {f!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # [1797, 8, 8] in [0, 1]
    target = digits.target.astype(np.int64)
    n = len(target)
    all_idx = np.arange(n)
    n_test = math.ceil(n * test_fraction)
    n_val = math.ceil(n * val_fraction)
    rest, test_idx = train_test_split(all_idx, test_size=n_test, random_state=seed, stratify=target)
    train_idx, val_idx = train_test_split(rest, test_size=n_val, random_state=seed, stratify=target[rest])
    # Sorted so that a sample's index within its split does not depend on sklearn's shuffle order.
    splits = {"train": np.sort(train_idx), "val": np.sort(val_idx), "test": np.sort(test_idx)}
    mean = float(images[splits["train"]].mean())
    std = float(images[splits["train"]].std())
    out = {}
    for name, idx in splits.items():
        x = torch.from_numpy((images[idx] - mean) / std).unsqueeze(1)
        out[name] = IndexedTensorDataset(
            x, torch.from_numpy(target[idx]), mean=(mean,), std=(std,), classes=[str(k) for k in range(10)]
        )
    return out


def make_synthetic_images(
    n: int,
    num_classes: int,
    shape: tuple[int, int, int] = (3, 8, 8),
    seed: int = 0,
    *,
    noise: float = 0.5,
) -> IndexedTensorDataset:
    """A deterministic, learnable image set for tests.

    Each class has a fixed random prototype image (smooth-ish: a random low-resolution pattern
    upsampled to the image size, unit scale); a sample is its class prototype plus Gaussian noise
    of std ``noise``. Labels cycle 0, 1, ..., C-1, 0, ... so every class is present when n >= C.
    Everything comes from a generator seeded with ``seed``, an int in [0, 2**63) (same seed, same
    tensors, any machine).

    Returns:
        IndexedTensorDataset of float32 [n, *shape] (no mean/std recorded: treat x as model
        space; its pixel space is itself), int64 labels.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be (C, H, W) with positive sizes, got {shape!r}")
    c, h, w = (int(s) for s in shape)
    gen = torch.Generator().manual_seed(check_seed(seed))
    low = torch.randn(num_classes, c, max(1, (h + 1) // 2), max(1, (w + 1) // 2), generator=gen)
    protos = torch.nn.functional.interpolate(low, size=(h, w), mode="nearest")
    y = torch.arange(n, dtype=torch.int64) % num_classes
    x = protos[y] + noise * torch.randn(n, c, h, w, generator=gen)
    return IndexedTensorDataset(x, y, classes=[str(k) for k in range(num_classes)])

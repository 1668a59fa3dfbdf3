"""The release's ``utils.py``: data sets, models and checkpoints, with the release's names and
signatures, on sbfast's readers and models. Nothing is ever downloaded.

- ``create_dataset(args, is_fisher=False)``: CIFAR-10 / CIFAR-100 from the python-pickle
  archives under ``args.data_path`` (:mod:`sbfast.data.readers`), any other ``args.data`` from
  the image folders ``args.data_path + '/train'`` and ``'/val'``; the release's index files
  (``args.train_idx_path``, ``args.val_idx_path``) pick the train and validation subsets of the
  training set. Samples are ``(x, y)`` as torchvision's, transformed as the release's
  torchvision pipelines, draw for draw: RandomCrop(padding 4) then RandomHorizontalFlip take
  ``torch.randint``, ``torch.randint``, ``torch.rand`` per sample from torch's global RNG, then
  ToTensor (``/ 255`` in torch's default dtype) and Normalize, so a seeded run yields the same
  tensors as the release's.
- ``create_model(args, num_classes, softmax=False)``: :mod:`sbfast.models` (the release's
  module names and initialisation order, so state dicts and seeded weights match), pooled with
  the release's fixed-size average pooling so that logits match bit for bit.
- ``save_model`` / ``load_model``: the release's checkpoint layout and file names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sbfast.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    TINY_IMAGENET_MEAN,
    TINY_IMAGENET_STD,
    load_cifar10,
    load_cifar100,
    load_image_folder,
)
from sbfast.models import ResNet18, TinyImageNetResNet18, WideResNet

__all__ = [
    "CustomDataset",
    "ImageArrayDataset",
    "ReleaseTransform",
    "create_dataset",
    "create_model",
    "load_model",
    "save_model",
]


class CustomDataset(torch.utils.data.Dataset):
    """Wraps a data set of ``(x, y)`` samples to yield ``(i, x, y)`` (the release's)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __getitem__(self, i: int) -> tuple[int, Any, Any]:
        x, y = self.dataset[i]
        return i, x, y

    def __len__(self) -> int:
        return len(self.dataset)


class ReleaseTransform:
    """The release's torchvision pipeline on a uint8 HWC image, with torch ops.

    ``crop`` (train): pad ``pad`` zero pixels on every side, crop ``crop`` x ``crop`` at
    ``(torch.randint(0, H + 2 pad - crop + 1), torch.randint(0, W + 2 pad - crop + 1))``, then
    flip left-right if ``torch.rand(1) < 0.5``: torchvision's RandomCrop + RandomHorizontalFlip,
    the same draws in the same order. Then ToTensor (CHW, ``/ 255`` in torch's default dtype)
    and Normalize(mean, std).

    Args:
        mean, std: per channel, [0, 1] units. crop: output size for training, None for the
            test pipeline (no crop, no flip). pad: the crop's zero padding.
    Call: uint8 numpy or tensor [H, W, C] -> float [C, H', W'].
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], crop: int | None = None, pad: int = 4) -> None:
        self.mean, self.std, self.crop, self.pad = tuple(mean), tuple(std), crop, pad

    def __call__(self, img: Any) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(img))
        if x.dim() == 2:
            x = x.unsqueeze(-1)
        if x.dim() != 3 or x.dtype != torch.uint8:
            raise ValueError(f"expected a uint8 [H, W, C] image, got {x.dtype} {tuple(x.shape)}")
        x = x.permute(2, 0, 1)
        if self.crop is not None:
            x = F.pad(x, (self.pad, self.pad, self.pad, self.pad))
            h, w = x.shape[1:]
            if h < self.crop or w < self.crop:
                raise ValueError(f"crop {self.crop} larger than the padded image {h}x{w}")
            if h != self.crop or w != self.crop:
                i = torch.randint(0, h - self.crop + 1, size=(1,)).item()
                j = torch.randint(0, w - self.crop + 1, size=(1,)).item()
                x = x[:, i : i + self.crop, j : j + self.crop]
            if torch.rand(1) < 0.5:
                x = x.flip(-1)
        x = x.contiguous().to(dtype=torch.get_default_dtype()).div(255)
        mean = torch.as_tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype).view(-1, 1, 1)
        return x.sub(mean).div(std)

    def __repr__(self) -> str:
        return f"ReleaseTransform(mean={self.mean}, std={self.std}, crop={self.crop}, pad={self.pad})"


class ImageArrayDataset(torch.utils.data.Dataset):
    """torchvision's CIFAR data set layout: ``data`` uint8 numpy [N, H, W, C], ``targets`` [N]
    (list or tensor), ``transform``; ``ds[i]`` = ``(transform(data[i]), targets[i])``. The
    release's ``evaluate_c`` swaps ``data`` and ``targets`` for each corruption."""

    def __init__(self, data: np.ndarray, targets: Any, transform: Any = None, classes: list[str] | None = None) -> None:
        if data.ndim != 4 or data.dtype != np.uint8:
            raise ValueError(f"data must be uint8 [N, H, W, C], got {data.dtype} {data.shape}")
        if len(targets) != data.shape[0]:
            raise ValueError(f"targets has {len(targets)} labels for {data.shape[0]} images")
        self.data, self.targets, self.transform, self.classes = data, targets, transform, classes

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        img, target = self.data[index], self.targets[index]
        if self.transform is not None:
            img = self.transform(img)
        return img, target

    def __len__(self) -> int:
        return len(self.data)


def _stats(data: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if data == "cifar10":
        return CIFAR10_MEAN, CIFAR10_STD
    if data == "cifar100":
        return CIFAR100_MEAN, CIFAR100_STD
    return TINY_IMAGENET_MEAN, TINY_IMAGENET_STD


def _array_set(stored: Any, transform: ReleaseTransform) -> ImageArrayDataset:
    hwc = stored.x.permute(0, 2, 3, 1).contiguous().numpy()
    return ImageArrayDataset(hwc, stored.y.tolist(), transform, stored.classes)


def create_dataset(args: Any, is_fisher: bool = False) -> Any:
    """The release's ``create_dataset``, reading local files only.

    Args:
        args: ``data`` ('cifar10', 'cifar100', or an image-folder set such as 'tiny_imgnet'),
            ``data_path`` (the folder holding ``cifar-10-batches-py`` / ``cifar-100-python`` or
            their .tar.gz; for image folders the folder holding ``train/`` and ``val/``),
            ``train_idx_path``, ``val_idx_path`` (numpy index files, as the release's
            ``dataset/train_idx.npy``).
        is_fisher: True: only the training subset, with the test transform (for scoring).
    Returns:
        ``is_fisher``: the training subset. Else ``(train, val, test, num_classes)``: CIFAR's
        train and val are Subsets of the training set by the index files (train augmented),
        test is the test set; image folders: train/, val/ and val/ again (as the release),
        200 classes.
    Raises:
        FileNotFoundError: the data or an index file is missing (the release would download
            CIFAR; sbfast never does).
    """
    mean, std = _stats(args.data)
    cifar = args.data in ("cifar10", "cifar100")
    crop = 32 if args.data in ("cifar10", "cifar100", "pets", "flowers") else 64
    train_transform = ReleaseTransform(mean, std, crop=crop)
    test_transform = ReleaseTransform(mean, std)
    for attr in ("train_idx_path", "val_idx_path"):
        if not Path(getattr(args, attr)).is_file():
            raise FileNotFoundError(
                f"args.{attr} = {getattr(args, attr)!r} is not a file (a numpy index file "
                "such as the release's dataset/train_idx.npy)"
            )
    train_idx = np.load(args.train_idx_path)
    val_idx = np.load(args.val_idx_path)
    if args.data_path is None:
        raise FileNotFoundError("args.data_path is None: point it at the local data (sbfast never downloads)")

    if cifar:
        reader = load_cifar10 if args.data == "cifar10" else load_cifar100
        stored_train = reader(args.data_path, train=True)
        n = len(stored_train)
        for name, ix in (("train", train_idx), ("val", val_idx)):
            if ix.size and (int(ix.min()) < -n or int(ix.max()) >= n):
                raise ValueError(f"the {name} index file holds indices outside the {n} training images")
        if is_fisher:
            return torch.utils.data.Subset(_array_set(stored_train, test_transform), indices=train_idx)
        train_data = torch.utils.data.Subset(_array_set(stored_train, train_transform), indices=train_idx)
        val_data = torch.utils.data.Subset(_array_set(stored_train, test_transform), indices=val_idx)
        test_data = _array_set(reader(args.data_path, train=False), test_transform)
        return train_data, val_data, test_data, (10 if args.data == "cifar10" else 100)

    root = args.data_path
    train_folder = load_image_folder(root + "/train")
    if is_fisher:
        return _array_set(train_folder, test_transform)
    val_folder = load_image_folder(root + "/val", classes=train_folder.classes)
    train_data = _array_set(train_folder, train_transform)
    val_data = _array_set(val_folder, test_transform)
    test_data = _array_set(val_folder, test_transform)
    return train_data, val_data, test_data, 200


class _ReleaseResNet18(ResNet18):
    """sbfast's ResNet18 pooled as the release pools it: ``avg_pool2d(out, 4)`` on the 4x4 map
    of a 32x32 input (sbfast's adaptive pooling sums in another order: last-bit differences
    that training amplifies), so a seeded run gives the release's numbers bit for bit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.view(out.size(0), -1))


class _ReleaseResNet18Softmax(_ReleaseResNet18):
    """The release's ResNet18_softmax: the same network, softmax probabilities out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(super().forward(x), dim=1)


class _ReleaseWideResNet(WideResNet):
    """sbfast's WRN-40-2 pooled as the release pools it (``avg_pool2d(out, 8)``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.avg_pool2d(F.relu(self.bn1(out)), 8)
        return self.fc(out.view(out.size(0), -1))


def create_model(args: Any, num_classes: int, softmax: bool = False) -> nn.Module:
    """The release's ``create_model``: ``args.model`` 'resnet18' (width ``args.width``; with
    ``softmax`` its probabilities; for ``args.data == 'tiny_imgnet'`` the release's
    models/resnet_imgnet.py ResNet18, ``sbfast.models.TinyImageNetResNet18``, always width 64) or 'wrn-40-2'.

    Raises:
        ValueError: another model name (the release fails with UnboundLocalError), or
            ``args.save_features`` / ``args.bench`` set for wrn-40-2 (the release's sparse-
            training instrumentation is not part of sbfast).
    """
    if args.model == "wrn-40-2":
        if getattr(args, "save_features", False) or getattr(args, "bench", False):
            raise ValueError(
                "create_model: save_features / bench (the release's sparse-training instrumentation) are not supported"
            )
        return _ReleaseWideResNet(40, 2, num_classes, 0.0)
    if args.model == "resnet18" and softmax:
        return _ReleaseResNet18Softmax(num_classes, args.width)
    if args.model == "resnet18" and args.data == "tiny_imgnet":
        return TinyImageNetResNet18(num_classes, 64)
    if args.model == "resnet18":
        return _ReleaseResNet18(num_classes, args.width)
    raise ValueError(f"create_model: unknown args.model {args.model!r}; expected 'resnet18' or 'wrn-40-2'")


def save_model(
    args: Any,
    model: nn.Module,
    epoch: int,
    best_acc: float,
    optimizer: Any,
    first_stage: bool = False,
    save_init: bool = False,
) -> None:
    """Write the release's checkpoint dict (epoch, dataset, model, state_dict, best_acc,
    optimizer) to ``args.save_path``: ``checkpoint.pth.tar``; with ``first_stage``,
    ``checkpoint-<epoch>.pth.tar`` (``save_init``) or ``checkpoint_startepoch.pth.tar``."""
    checkpoint = {
        "epoch": epoch,
        "dataset": args.data,
        "model": args.model,
        "state_dict": model.state_dict(),
        "best_acc": best_acc,
        "optimizer": optimizer.state_dict(),
    }
    if not first_stage:
        save_path = os.path.join(args.save_path, "checkpoint.pth.tar")
    elif save_init:
        save_path = os.path.join(args.save_path, f"checkpoint-{epoch}.pth.tar")
    else:
        save_path = os.path.join(args.save_path, "checkpoint_startepoch.pth.tar")
    torch.save(checkpoint, save_path)


def load_model(args: Any, model: nn.Module, optimizer: Any) -> None:
    """Restore ``model`` and ``optimizer`` from ``args.resume`` and set ``args.start_epoch`` =
    saved epoch + 1, printing it (the release's ``load_model``).

    Raises:
        FileNotFoundError: ``args.resume`` is not a file (the release: an AssertionError).
    """
    if not os.path.isfile(args.resume):
        raise FileNotFoundError(f"args.resume = {args.resume!r}: resume should be a file")
    checkpoint = torch.load(args.resume)
    args.start_epoch = checkpoint["epoch"] + 1
    model.load_state_dict(checkpoint["state_dict"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    print("Model restored from epoch:", args.start_epoch)

"""The release's ``engine.py`` (haiquanlu/SharpBalance): same names, signatures, argument
order, return types and side effects (prints included), backed by sbfast.

- ``mix_step`` / ``train_one_epoch``: the per-sample ``indice[i].item() in idx`` scan becomes a
  cached boolean lookup (:mod:`sbfast.compat.membership`) and a split of the batch by index
  tensors, with no device synchronisation; the optimizer phases are those of the optimizer
  given (with ``sbfast.compat.NSAM`` over SGD: the fused :class:`sbfast.optim.SharpBalanceSAM`).
  The arithmetic is the release's, operation for operation: weights |normal|/b and |SAM|/b,
  ``third_step`` when a batch has no SAM part.
- ``test_fisher`` / ``main_fisher``: :func:`sbfast.sharpness.fisher_scores` (one forward and
  one backward per batch instead of vmap over per-sample gradients), ``flat_trial`` passes.
- The split functions come from :mod:`sbfast.compat.split` (re-exported here, as the release
  defines them in this module).

What differs from the release, and why, is listed in docs/compat.md; in short: returned losses
are detached (the release keeps every step's autograd graph alive through ``loss_ema``), the
accuracy count of ``mix_step`` is taken once per call instead of once per part, ``evaluate``
synchronises once per call, ``evaluate_c`` works (the release calls ``evaluate`` with the wrong
arguments), ``main_fisher`` runs on a CPU-only machine, and inputs are cast to the model's
dtype instead of float32.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from sbfast.compat.membership import normal_lookup, split_batch
from sbfast.compat.split import (
    boosting_sam_split,
    boosting_sam_split_boost,
    random_subset,
    sam_idx_complemetary,
    same_subset,
)
from sbfast.compat.utils import CustomDataset, create_dataset
from sbfast.sharpness import fisher_scores

__all__ = [
    "CORRUPTIONS",
    "boosting_sam_split",
    "boosting_sam_split_boost",
    "evaluate",
    "evaluate_c",
    "main_fisher",
    "main_sharpness_loss",
    "mix_step",
    "random_subset",
    "sam_idx_complemetary",
    "same_subset",
    "test_fisher",
    "test_sharpness_loss",
    "train_one_epoch",
]

CORRUPTIONS = [
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
]


def _dataset_size(loader: Any) -> int | None:
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


def _model_dtype(net: nn.Module) -> torch.dtype:
    for p in net.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _on(pos: torch.Tensor, device: torch.device) -> torch.Tensor:
    return pos if device.type == "cpu" else pos.to(device, non_blocking=True)


def _mix_step(
    net: nn.Module, indice: torch.Tensor, data: torch.Tensor, target: torch.Tensor, lookup: torch.Tensor, optimizer: Any
) -> tuple[torch.Tensor | int, torch.Tensor | int]:
    """The release's mix_step on a lookup table; returns (correct as a device tensor, detached
    total loss) without synchronising."""
    b = data.shape[0]
    if b == 0:
        raise ValueError("mix_step: the batch is empty; the release would take an SGD step on stale gradients")
    if target.shape[0] != b:
        raise ValueError(f"mix_step: target has {target.shape[0]} entries but data has {b} samples")
    normal_pos, flat_pos = split_batch(indice, lookup, b)
    n_normal, n_flat = normal_pos.shape[0], flat_pos.shape[0]
    criterion = nn.CrossEntropyLoss()
    correct: torch.Tensor | int = 0
    total_loss: torch.Tensor | int = 0
    if n_normal > 0:
        pos = _on(normal_pos, data.device)
        normal_data, normal_target = data[pos], target[pos]
        normal_ratio = n_normal / b
        output = net(normal_data)
        loss = criterion(output, normal_target)
        pred = output.argmax(dim=1, keepdim=True)
        correct = correct + pred.eq(normal_target.view_as(pred)).sum()
        loss = loss * normal_ratio
        total_loss = total_loss + loss.detach()
        loss.backward()
        optimizer.normal_step(zero_grad=True)
    if n_flat > 0:
        pos = _on(flat_pos, data.device)
        flat_data, flat_target = data[pos], target[pos]
        flat_ratio = n_flat / b
        output = net(flat_data)
        pred = output.argmax(dim=1, keepdim=True)
        correct = correct + pred.eq(flat_target.view_as(pred)).sum()
        loss = criterion(output, flat_target)
        total_loss = total_loss + loss.detach() * flat_ratio
        loss.backward()
        optimizer.first_step(zero_grad=True)
        loss = criterion(net(flat_data), flat_target) * flat_ratio
        loss.backward()
        optimizer.second_step(zero_grad=False)
    else:
        optimizer.third_step(zero_grad=False)
    return correct, total_loss


def mix_step(
    args: Any,
    net: nn.Module,
    indice: torch.Tensor,
    data: torch.Tensor,
    target: torch.Tensor,
    idx: Any,
    optimizer: Any,
    epoch: int,
    device: torch.device | str,
) -> tuple[int, torch.Tensor]:
    """One SharpBalance step on a batch: samples whose index is in ``idx`` are normal, the rest
    SAM (the release's ``mix_step``, same arithmetic).

    Args:
        args, epoch, device: unused (the release's signature).
        indice: int64 [b] sample indices (CPU, as the loader yields them).
        data: [b, ...] inputs on the model's device; target: int64 [b].
        idx: the member's normal indices (list / numpy array / tensor; ``[-1]``: none), cached
            as a boolean table per object (see :mod:`sbfast.compat.membership`).
        optimizer: has ``normal_step``, ``first_step``, ``second_step``, ``third_step`` (the
            release's NSAM interface; ``sbfast.compat.NSAM`` runs them fused).
    Returns:
        (correct, total_loss): the int count of correct predictions (one host sync) and the
        0-d batch loss at w, sum of |normal|/b * mean normal loss and |SAM|/b * mean SAM loss
        (detached; the release's still carries its graph).
    Raises:
        ValueError: an empty batch, sizes that differ, a negative sample index, an index in
            ``idx`` below -1 or non-integral (the release silently never matches those).
    """
    lookup = normal_lookup(idx)
    correct, total_loss = _mix_step(net, indice, data, target, lookup, optimizer)
    return int(correct), total_loss  # type: ignore[return-value]


def train_one_epoch(
    args: Any,
    net: nn.Module,
    train_loader: Iterable,
    optimizer: Any,
    normal_indice: Any,
    scheduler: Any,
    epoch: int,
    device: torch.device | str,
) -> torch.Tensor | float:
    """Train for one epoch (the release's ``train_one_epoch``).

    ``args.sam == 'False'``: plain ``optimizer.step()`` per batch; anything else: :func:`mix_step`
    with ``normal_indice`` (checked once, against ``len(train_loader.dataset)`` when the loader
    has a data set). Prints the running loss every ``args.print_freq`` batches, as the release.

    Args:
        args: needs ``sam`` (str) and ``print_freq`` (int). scheduler, epoch: unused.
        train_loader: yields (indice [b], images [b, ...], targets [b]).
    Returns:
        the sum over batches of the batch losses (a detached 0-d tensor; 0.0 for no batches).
    Raises:
        ValueError: an index in ``normal_indice`` outside the data set (the release silently
            trains those samples with SAM), or see :func:`mix_step`.
    """
    net.train()
    loss_ema: torch.Tensor | float = 0.0
    criterion = nn.CrossEntropyLoss()
    sam = args.sam != "False"
    lookup = normal_lookup(normal_indice, _dataset_size(train_loader)) if sam else None
    for i, (indice, images, targets) in enumerate(train_loader):
        images, targets = images.to(device), targets.to(device)
        optimizer.zero_grad()
        if not sam:
            loss = criterion(net(images), targets)
            loss.backward()
            optimizer.step()
            loss = loss.detach()
        else:
            _, loss = _mix_step(net, indice, images, targets, lookup, optimizer)
        loss_ema += loss
        if i % args.print_freq == 0:
            min_lr = 100
            for group in optimizer.param_groups:
                min_lr = min(min_lr, group["lr"])
            print(f"Iter {i:d}/{len(train_loader):d}, Train Loss {loss_ema:.3f}, lr {min_lr:.5f}")
    return loss_ema


def evaluate(
    args: Any, net: nn.Module, test_loader: Any, device: torch.device | str | None = None
) -> tuple[float, float]:
    """Evaluate on a loader of (images, targets) (the release's ``evaluate``).

    Returns:
        (sum of batch-mean losses / len(dataset), accuracy): python floats, the release's
        numbers (its loss is summed in float64 one batch at a time; so is this one, on the
        device, read once at the end instead of once per batch).
    ``device`` defaults to the model's (the release requires it; its own ``args.evaluate`` path
    calls ``evaluate`` without it).
    """
    if device is None:
        device = next(net.parameters()).device
    net.eval()
    total_loss: torch.Tensor | float = 0.0
    total_correct: torch.Tensor | int = 0
    with torch.no_grad():
        for batch in test_loader:
            if len(batch) != 2:
                raise ValueError(f"evaluate: test_loader must yield (images, targets) pairs, got {len(batch)} items")
            images, targets = batch
            images, targets = images.to(device), targets.to(device)
            logits = net(images)
            loss = F.cross_entropy(logits, targets)
            pred = logits.data.max(1)[1]
            # float64 adds one batch at a time, as the release's python float sum, kept on the
            # device: one read at the end instead of two per batch
            total_loss = total_loss + loss.double()
            total_correct = total_correct + pred.eq(targets.data).sum()
    n = len(test_loader.dataset)
    return float(total_loss) / n, int(total_correct) / n


def evaluate_c(args: Any, net: nn.Module, test_data: Any, base_path: str) -> tuple[np.floating, dict[str, float]]:
    """Evaluate on every corruption of CIFAR-10-C / CIFAR-100-C (the release's ``evaluate_c``).

    Mutates ``test_data.data`` and ``test_data.targets`` (as the release) with
    ``base_path + <corruption> + '.npy'`` and ``base_path + 'labels.npy'``, prints each result.
    Batches of ``args.eval_batch_size`` (``args.batch_size`` when the namespace lacks it, as
    main.py's does), ``args.num_workers`` workers.

    Returns:
        (mean accuracy over corruptions as a numpy float64, {corruption: accuracy}).
    Raises:
        TypeError: ``test_data`` without ``data`` / ``targets`` (e.g. a Subset: the release
            would silently evaluate the unchanged clean set 15 times).
    """
    if not (hasattr(test_data, "data") and hasattr(test_data, "targets")):
        raise TypeError(
            f"evaluate_c: test_data must have .data and .targets (a CIFAR-style data set), got "
            f"{type(test_data).__name__}"
        )
    batch_size = getattr(args, "eval_batch_size", None) or args.batch_size
    labels = torch.LongTensor(np.load(base_path + "labels.npy"))
    corruption_accs = []
    corruption_accs_dict = {}
    for corruption in CORRUPTIONS:
        test_data.data = np.load(base_path + corruption + ".npy")
        test_data.targets = labels
        test_loader = torch.utils.data.DataLoader(
            test_data,
            batch_size=batch_size,
            shuffle=False,
            num_workers=args.num_workers,
            pin_memory=torch.cuda.is_available(),
        )
        test_loss, test_acc = evaluate(args, net, test_loader)
        corruption_accs.append(test_acc)
        corruption_accs_dict[corruption] = test_acc
        print(f"{corruption}\n\tTest Loss {test_loss:.3f} | Test Error {100 - 100.0 * test_acc:.3f}")
    return np.mean(corruption_accs), corruption_accs_dict


def test_fisher(net: nn.Module, train_loader: Any, flat_trial: int, device: torch.device | str) -> np.ndarray:
    """Per-sample Fisher score ||grad_w CE(f_w(x_i), y_i)||^2 (the release's ``test_fisher``).

    By :func:`sbfast.sharpness.fisher_scores` in eval mode, averaged over ``flat_trial``
    passes; the model is left in eval mode, as the release leaves it.

    Args:
        train_loader: yields (idx [b], data [b, ...], target [b]); ``len(train_loader.dataset)``
            is N.
        flat_trial: passes over the loader (>= 1).
    Returns:
        numpy [N] in torch's default dtype (float32 unless changed), the release's type.
    Raises:
        ValueError: flat_trial < 1 (the release returns NaNs), a sample of the data set that the
            loader never yields (the release silently scores it 0, the flattest of all).
    """
    n = len(train_loader.dataset)
    scores = fisher_scores(net, train_loader, device=device, trials=flat_trial, num_samples=n, progress=True)
    net.eval()
    unseen = torch.isnan(scores)
    if bool(unseen.any()):
        first = int(unseen.nonzero()[0, 0])
        raise ValueError(
            f"test_fisher: {int(unseen.sum())} of {n} samples were never yielded by the loader "
            f"(e.g. sample {first}); every sample of the data set needs a score"
        )
    # the release accumulates in torch's default dtype (torch.zeros(N)): return that type
    return scores.to(device="cpu", dtype=torch.get_default_dtype()).numpy()


def _process_device(process_id: int) -> torch.device:
    # the release's rule (member k on GPU k mod count); CPU where there is no GPU, where the
    # release divides by zero
    count = torch.cuda.device_count()
    return torch.device(f"cuda:{process_id % count}" if torch.cuda.is_available() and count else "cpu")


def _scoring_loader(args: Any, batch_size: int) -> torch.utils.data.DataLoader:
    train_data = CustomDataset(create_dataset(args, is_fisher=True))
    return torch.utils.data.DataLoader(
        train_data,
        batch_size=batch_size,
        shuffle=False,
        num_workers=args.num_workers,
        pin_memory=torch.cuda.is_available(),
    )


def main_fisher(args: Any, process_id: int, dict_to_share: Any, model: nn.Module) -> np.ndarray:
    """Score the training set with this member's model and share the scores (the release's
    ``main_fisher``): ``dict_to_share[process_id] = test_fisher(...)``, returned.

    The training set is ``create_dataset(args, is_fisher=True)`` (no augmentation); batches of
    256 (the release: 16, which its per-sample-gradient vmap needs; the scores do not depend on
    it beyond float rounding). ``args``: data, data_path, train_idx_path, val_idx_path,
    num_workers, flat_trial.
    """
    device = _process_device(process_id)
    print(f"device will be chosen as {device} for this run.")
    loader = _scoring_loader(args, 256)
    dict_to_share[process_id] = test_fisher(model, loader, args.flat_trial, device)
    return dict_to_share[process_id]


def test_sharpness_loss(
    model: nn.Module, train_loader: Any, optimizer: Any, criterion: nn.Module, device: torch.device | str
) -> torch.Tensor:
    """Per-sample SAM loss gap l_i(w + e) - l_i(w), e from the batch's mean loss (the release's
    ``test_sharpness_loss``): ``optimizer.first_step`` then ``optimizer.back_step`` per batch,
    the model in whatever mode it is in (as the release). ``criterion`` must not reduce
    (``reduction='none'``). Accumulated on the device, copied to the CPU once.

    Returns:
        float [N] CPU tensor in torch's default dtype (the release's), N = len(dataset).
    """
    n = len(train_loader.dataset)
    dtype = _model_dtype(model)
    sharpness = torch.zeros(n, device=device)
    for idx, batch, targets in tqdm(train_loader):
        batch, targets = batch.to(device, dtype=dtype), targets.to(device)
        optimizer.zero_grad()
        loss_erm = criterion(model(batch), targets)
        if loss_erm.dim() != 1:
            raise ValueError(
                f"test_sharpness_loss: criterion must give per-sample losses [b] (reduction='none'), "
                f"got shape {tuple(loss_erm.shape)}"
            )
        torch.mean(loss_erm).backward()
        optimizer.first_step(zero_grad=True)
        with torch.no_grad():
            loss_sam = criterion(model(batch), targets)
        optimizer.back_step()
        pos = idx.to(device)
        sharpness[pos] += (loss_sam - loss_erm).detach()
    return sharpness.cpu()


def main_sharpness_loss(
    args: Any, process_id: int, dict_to_share: Any, model: nn.Module, optimizer: Any
) -> torch.Tensor:
    """The release's ``main_sharpness_loss``: :func:`test_sharpness_loss` on the unaugmented
    training set (batches of 128), shared as ``dict_to_share[process_id]`` and returned."""
    device = _process_device(process_id)
    print(f"device will be chosen as {device} for this run.")
    criterion = nn.CrossEntropyLoss(reduction="none")
    loader = _scoring_loader(args, 128)
    dict_to_share[process_id] = test_sharpness_loss(model, loader, optimizer, criterion, device)
    return dict_to_share[process_id]

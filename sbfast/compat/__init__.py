"""The release's names and signatures (haiquanlu/SharpBalance), backed by sbfast's fast paths.

A user of the release gets sbfast's speed by changing import lines only::

    from sbfast.compat import NSAM                      # was: from sam.sam import NSAM
    from sbfast.compat.utils import create_dataset, create_model, CustomDataset, save_model, load_model
    from sbfast.compat.engine import train_one_epoch, evaluate, evaluate_c, main_fisher, ...

or with one line at the top of the release's ``main.py``: ``import sbfast.compat.release``
(registers ``engine``, ``sam.sam`` and, where safe, ``utils`` as aliases of these modules).

| module | the release's | backed by |
|---|---|---|
| ``nsam`` | ``sam/sam.py``: ``NSAM`` | ``sbfast.optim.SharpBalanceSAM`` (fused) |
| ``engine`` | ``engine.py``: ``train_one_epoch``, ``mix_step``, ``evaluate``, ``evaluate_c``, ``test_fisher``, ``main_fisher``, ``test_sharpness_loss``, ``main_sharpness_loss`` | cached membership lookup, ``sbfast.sharpness.fisher_scores`` |
| ``split`` | ``engine.py``: ``boosting_sam_split``, ``boosting_sam_split_boost``, ``sam_idx_complemetary``, ``random_subset``, ``same_subset`` | ``sbfast.select`` |
| ``utils`` | ``utils.py``: ``CustomDataset``, ``create_dataset``, ``create_model``, ``save_model``, ``load_model`` | ``sbfast.data`` readers, ``sbfast.models`` |
| ``args`` | main.py's argparse defaults, as ``release_args(**overrides)`` | |

Differences from the release, and why: docs/compat.md.
"""

from sbfast.compat.args import release_args
from sbfast.compat.engine import (
    CORRUPTIONS,
    evaluate,
    evaluate_c,
    main_fisher,
    main_sharpness_loss,
    mix_step,
    test_fisher,
    test_sharpness_loss,
    train_one_epoch,
)
from sbfast.compat.nsam import NSAM, FusedNSAM, ReferenceNSAM
from sbfast.compat.split import (
    boosting_sam_split,
    boosting_sam_split_boost,
    random_subset,
    sam_idx_complemetary,
    same_subset,
)
from sbfast.compat.utils import CustomDataset, create_dataset, create_model, load_model, save_model

__all__ = [
    "CORRUPTIONS",
    "NSAM",
    "CustomDataset",
    "FusedNSAM",
    "ReferenceNSAM",
    "boosting_sam_split",
    "boosting_sam_split_boost",
    "create_dataset",
    "create_model",
    "evaluate",
    "evaluate_c",
    "load_model",
    "main_fisher",
    "main_sharpness_loss",
    "mix_step",
    "random_subset",
    "release_args",
    "sam_idx_complemetary",
    "same_subset",
    "save_model",
    "test_fisher",
    "test_sharpness_loss",
    "train_one_epoch",
]

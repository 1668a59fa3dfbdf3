"""The ensemble trainer: de, de_sam and SharpBalance end to end (docs/algorithm.md).

``train_ensemble(TrainConfig(...))`` trains M members on one data set, following section 6:

* ``de``: plain SGD for every member, every epoch.
* ``de_sam``: SAM on every sample, every epoch.
* ``sharpbalance``: SAM on every sample in epochs 0..T_d (``swap_epoch``); at the start of epoch
  T_d + 1 every member scores the whole training set (Fisher scores, eval mode, no augmentation),
  the scores [M, N] are shared, ``select_sam_masks`` gives each member its SAM set, and from then
  on every step is a mixed step (section 5).

Then it evaluates the ensemble: member/ensemble accuracy, NLL, ECE, disagreement, DER, EIR on the
test split (``metrics.ensemble_metrics``), the members' mean pairwise KL and CKA of the logits
from the same prediction pass (``evaluate.diversity_measures``), accuracy on corrupted test sets
(``metrics.ood_metrics``) and each member's mean Fisher score on a fixed training subset
(``fisher_mean``, a cheap proxy for sharpness).

What makes it fast (``backend="fast"``):

* the fused ``sbfast.optim.SharpBalanceSAM``, ``sbfast.sharpness.fisher_scores`` and
  ``sbfast.select.select_sam_masks`` (``backend="reference"`` swaps in the plain-PyTorch twins,
  by choice only; ``EnsembleResult.components`` records which ran);
* the data sets live on the training device as tensors; a batch is one gather plus augmentation
  as batched tensor ops with a per-member generator on that device (no DataLoader, no collation);
* no host synchronisation inside an epoch on the static path (losses accumulate on the device);
* ``batching="static"``: in phase 2 each member shuffles its SAM set and its normal set apart and
  zips them into batches of one fixed composition (n_sam, n_normal) proportional to its SAM share;
  the leftover forms a tail of a few batches (usually one, like the release's last partial batch)
  whose shapes are also the same every epoch (``static_batch_plan``, ``StaticBatcher``). So the
  steps see a handful of fixed shapes for the whole phase, which lets ``compile`` (torch.compile
  of the model) and ``cuda_graphs`` (one captured CUDA graph per full-size step) work without
  recompiles or host syncs. ``batching="exact"`` keeps the release's random batches.

``train_ensemble_reference`` is the plain twin (reference SAM over torch.optim.SGD, one
DataLoader per member, reference scoring and selection); with ``backend="reference"`` and
``batching="exact"`` the two give the same parameters (tests/test_train.py holds them to it).

Seeds: member j uses ``seed + j`` for its initialisation (``torch.manual_seed`` inside a forked
RNG, so the caller's global RNG is left alone), its batch order (a CPU generator, consumed as the
release's ``RandomSampler`` does) and, offset by ``AUG_SEED_OFFSET``, its augmentation generator.

The modules, bottom to top (each imports only the ones above it in this table;
``tests/test_layout.py`` holds them to it):

| module | what |
|---|---|
| ``config`` | ``TrainConfig`` (each field's help, accepted names and checks in its metadata), presets, accepted names, the thread limit |
| ``data`` | ``load_data``, ``TrainData``, ``DeviceData`` (tensors on the training device); member seeds and batch order; ``static_batch_plan``, ``StaticBatcher`` (static shapes in the mixed phase) |
| ``steps`` | ``sgd_step``, ``sam_step``, ``mixed_step_static``, ``mixed_step_exact``; the CUDA graph of a step; ``StepRunner`` (a member's batches and steps over an epoch); the fast or reference optimizer, scorer, selector (``get_components``) |
| ``evaluate`` | ``predict_probs``, ``predict_outputs`` (probabilities and logits of one pass), ``diversity_measures``, ``evaluate_ensemble`` |
| ``plots`` | ``plot_comparison``, ``plot_learning_curves``, ``plot_sharpness_diversity``, ``plot_run_records``: figures from plain run records |
| ``results`` | ``EnsembleResult``, run records, strict JSON, ``plot_results`` |
| ``checkpoint`` | checkpoint files (atomic checksummed write, safe read, ``load_latest``); ``RunLock``: one writer per run folder (``run.lock`` names its holder; a stale one is taken over) |
| ``run_folder`` | ``check_output_dir``, ``default_run_dir``, config.json, log.csv, ``RunFolder`` (what a run writes; a full disk is one ``RunFolderFull`` line); ``RESUME_SAFE_FIELDS``, ``PHASE1_FIELDS`` (what a resume or fork may change); a finished run used again: ``load_ensemble``, ``evaluate_run`` (docs/runs.md) |
| ``run_state`` | ``Member`` (built from the config), ``build_member``, ``make_lr_scheduler``; ``RunState`` (position, history, clocks, scores, masks); what watches a run: ``Callback``, ``RunInterrupted`` and the SIGINT/SIGTERM handling, ``RunDiverged`` (a member's loss not finite, or all its steps skipped), the progress bar |
| ``reference_trainer`` | ``train_ensemble_reference`` (the slow twin) |
| ``trainer`` | ``EnsembleTrainer`` (one member loop, for one process and torchrun alike) |
| ``run`` | ``train_ensemble``: prepare the run (``prepare_run``: config, device, starting checkpoint, a resume's checkpoint checked against config.json; ``claim_folder``: rank 0 creates and locks the folder), join its world, run the trainer |
| ``compare`` | ``run_comparison``, ``Comparison`` (several methods over several seeds: mean ± std, paired differences) |
| ``tradeoff`` | ``run_tradeoff``, ``Tradeoff`` (de, de_sam over a sweep of rho, sharpbalance: worst-case sharpness against diversity, resumable) |
"""

from sbfast.train.checkpoint import CheckpointError, RunFolderLocked, load_checkpoint
from sbfast.train.compare import Comparison, run_comparison
from sbfast.train.config import (
    BACKENDS,
    BATCHINGS,
    COMPILE_BACKENDS,
    DATASETS,
    DEFAULT_CORRUPTIONS,
    DTYPES,
    LR_SCHEDULES,
    METHODS,
    PRESETS,
    TrainConfig,
    as_config,
)
from sbfast.train.data import (
    DeviceBatches,
    DeviceData,
    StaticBatcher,
    StaticPlan,
    TrainData,
    load_data,
    member_seeds,
    release_order,
    static_batch_plan,
)
from sbfast.train.evaluate import evaluate_ensemble, predict_probs
from sbfast.train.plots import plot_comparison, plot_learning_curves, plot_sharpness_diversity
from sbfast.train.reference_trainer import train_ensemble_reference
from sbfast.train.results import EnsembleResult, plot_results
from sbfast.train.run import train_ensemble
from sbfast.train.run_folder import (
    PHASE1_FIELDS,
    RESUME_SAFE_FIELDS,
    RunFolderFull,
    check_output_dir,
    default_run_dir,
    evaluate_run,
    load_ensemble,
)
from sbfast.train.run_state import Callback, RunDiverged, RunInterrupted, build_member, make_lr_scheduler
from sbfast.train.steps import Components, get_components, mixed_step_exact, mixed_step_static, sam_step, sgd_step
from sbfast.train.tradeoff import Tradeoff, run_tradeoff
from sbfast.train.trainer import EnsembleTrainer

__all__ = [
    "BACKENDS",
    "BATCHINGS",
    "COMPILE_BACKENDS",
    "DATASETS",
    "DEFAULT_CORRUPTIONS",
    "DTYPES",
    "LR_SCHEDULES",
    "METHODS",
    "PHASE1_FIELDS",
    "PRESETS",
    "RESUME_SAFE_FIELDS",
    "Callback",
    "Comparison",
    "Tradeoff",
    "CheckpointError",
    "Components",
    "DeviceBatches",
    "DeviceData",
    "EnsembleResult",
    "EnsembleTrainer",
    "RunDiverged",
    "RunFolderFull",
    "RunFolderLocked",
    "RunInterrupted",
    "StaticBatcher",
    "StaticPlan",
    "TrainConfig",
    "TrainData",
    "as_config",
    "build_member",
    "check_output_dir",
    "default_run_dir",
    "evaluate_run",
    "evaluate_ensemble",
    "get_components",
    "load_checkpoint",
    "load_data",
    "load_ensemble",
    "make_lr_scheduler",
    "member_seeds",
    "mixed_step_exact",
    "mixed_step_static",
    "plot_comparison",
    "plot_learning_curves",
    "plot_results",
    "plot_sharpness_diversity",
    "predict_probs",
    "release_order",
    "run_comparison",
    "run_tradeoff",
    "sam_step",
    "sgd_step",
    "static_batch_plan",
    "train_ensemble",
    "train_ensemble_reference",
]

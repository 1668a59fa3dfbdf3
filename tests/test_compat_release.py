"""sbfast.compat driven exactly as the release's main.py drives its engine (phase 1 with SAM,
main_fisher into a shared dict at T_d, the split, phase 2 with train_one_epoch, evaluate,
save_model), against the plain-PyTorch reference (sbfast.reference: SAM, mixed_step via
train_member_epoch, fisher_scores, select_sam_masks) in float64; and the one-line switch
``import sbfast.compat.release``."""

from __future__ import annotations

import copy
import importlib
import os
import sys
import warnings

import numpy as np
import pytest
import torch
from compat_helpers import cifar_args

from sbfast import compat, reference
from sbfast.compat import engine, nsam, utils

pytestmark = pytest.mark.usefixtures("one_thread")

# float64: the fused optimizer equals the reference bit for bit; the fisher scores come from
# different algorithms (one backward per batch vs vmap of per-sample gradients)
PARAM_TOL = 1e-10
SCORE_RTOL = 1e-6


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the release's ToTensor then yields float64 too
    yield
    torch.set_default_dtype(old)


def _loader(data, args, seed):
    torch.manual_seed(seed)  # shuffling and crops/flips: the same batches for both sides
    return torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, num_workers=0)


@pytest.mark.usefixtures("float64_default")
def test_main_py_flow_matches_the_reference(tmp_path, capsys):
    m, n_train = 3, 24
    args = cifar_args(
        tmp_path,
        n_train,
        width=2,
        sam="True",
        rho=0.2,
        flat_ratio=0.5,
        initial_epochs=0,
        epochs=2,
        batch_size=8,
        save_path=str(tmp_path / "run") + "/",
    )
    train_data, val_data, test_data, num_classes = compat.create_dataset(args)
    train_data = compat.CustomDataset(train_data)
    val_loader = torch.utils.data.DataLoader(val_data, batch_size=args.batch_size, shuffle=False)
    fisher_loader = torch.utils.data.DataLoader(
        compat.CustomDataset(compat.create_dataset(args, is_fisher=True)), batch_size=16, shuffle=False
    )
    members = []
    for pid in range(m):
        torch.manual_seed(10 + pid)
        model = compat.create_model(args, num_classes)
        twin = copy.deepcopy(model)
        # main.py: NSAM over SGD, built before model.to(device), scheduler on base_optimizer
        opt = compat.NSAM(
            model.parameters(),
            torch.optim.SGD,
            rho=args.rho,
            lr=args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
        )
        model = model.to("cpu")
        milestones = [int(args.epochs / 2), int(args.epochs * 3 / 4)]
        sched = torch.optim.lr_scheduler.MultiStepLR(opt.base_optimizer, milestones=milestones, last_epoch=-1)
        ref = reference.SAM(
            twin.parameters(),
            torch.optim.SGD,
            rho=args.rho,
            lr=args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
        )
        ref_sched = torch.optim.lr_scheduler.MultiStepLR(ref.base_optimizer, milestones=milestones)
        members.append(
            dict(
                model=model,
                opt=opt,
                sched=sched,
                twin=twin,
                ref=ref,
                ref_sched=ref_sched,
                normal=np.array([-1]),
                sam_mask=torch.ones(n_train, dtype=torch.bool),
            )
        )
    dict_to_share = {}
    for epoch in range(args.epochs):
        if (epoch - 1) == args.initial_epochs and args.sam == "True" and args.flat_ratio != 0:
            for pid, mb in enumerate(members):  # every member scores before any selects (the barrier)
                scores = engine.main_fisher(args, pid, dict_to_share, mb["model"])
                assert isinstance(scores, np.ndarray) and scores.dtype == np.float64 and scores.shape == (n_train,)
            ref_scores = torch.stack(
                [reference.fisher_scores(mb["twin"], fisher_loader, num_samples=n_train) for mb in members]
            )
            ours = torch.from_numpy(np.stack([dict_to_share[pid] for pid in range(m)]))
            torch.testing.assert_close(ours, ref_scores.double(), rtol=SCORE_RTOL, atol=0)
            ref_masks = reference.select_sam_masks(ref_scores, args.flat_ratio, "boost")
            for pid, mb in enumerate(members):
                mb["normal"] = compat.boosting_sam_split_boost(args, dict_to_share, pid, ascend=True)
                mb["sam_mask"] = ref_masks[pid]
                assert [int(i) for i in mb["normal"]] == torch.nonzero(~ref_masks[pid]).flatten().tolist()
        for pid, mb in enumerate(members):
            loss = compat.train_one_epoch(
                args,
                mb["model"],
                _loader(train_data, args, 100 * epoch + pid),
                mb["opt"],
                mb["normal"],
                mb["sched"],
                epoch,
                "cpu",
            )
            assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad
            ref_loss = reference.train_member_epoch(
                mb["twin"],
                mb["ref"],
                _loader(train_data, args, 100 * epoch + pid),
                "mixed",
                sam_mask=mb["sam_mask"],
                dtype=torch.float64,
            )
            n_batches = -(-n_train // args.batch_size)
            assert float(loss) / n_batches == pytest.approx(ref_loss, rel=1e-12)
            test_loss, test_acc = compat.evaluate(args, mb["model"], val_loader, "cpu")
            assert isinstance(test_loss, float) and isinstance(test_acc, float)
            mb["sched"].step()
            mb["ref_sched"].step()
            os.makedirs(args.save_path + f"seed_{pid}", exist_ok=True)
            member_args = copy.copy(args)
            member_args.save_path = args.save_path + f"seed_{pid}"
            compat.save_model(member_args, mb["model"], epoch, test_acc, mb["opt"])
    for mb in members:
        for p, q in zip(mb["model"].parameters(), mb["twin"].parameters(), strict=True):
            assert (p - q).abs().max().item() <= PARAM_TOL
        assert mb["opt"].param_groups[0]["lr"] == mb["ref"].param_groups[0]["lr"] == pytest.approx(args.lr * 0.01)
    # the checkpoint of the last epoch restores the trained member
    restored = compat.create_model(args, num_classes)
    opt = compat.NSAM(restored.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    resume_args = copy.copy(args)
    resume_args.resume = os.path.join(args.save_path + "seed_2", "checkpoint.pth.tar")
    compat.load_model(resume_args, restored, opt)
    assert resume_args.start_epoch == args.epochs
    for p, q in zip(restored.parameters(), members[2]["model"].parameters(), strict=True):
        assert torch.equal(p, q)
    assert "device will be chosen as cpu" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# The one-line switch
# --------------------------------------------------------------------------------------------


@pytest.fixture
def clean_modules():
    names = ("engine", "sam", "sam.sam", "utils", "sbfast.compat.release")
    saved = {k: sys.modules.get(k) for k in names}
    for k in names:
        sys.modules.pop(k, None)
    yield
    for k, v in saved.items():
        if v is None:
            sys.modules.pop(k, None)
        else:
            sys.modules[k] = v


def _release_utils_source() -> str:
    # the definitions that identify the release's utils.py (bodies irrelevant: never executed)
    return (
        "class CustomDataset:\n    pass\ndef create_dataset(args, is_fisher=False):\n    raise RuntimeError\n"
        "def create_model(args, num_classes):\n    raise RuntimeError\ndef save_model():\n    pass\n"
        "def load_model():\n    pass\n"
    )


@pytest.mark.usefixtures("clean_modules")
def test_one_line_switch_aliases_the_release_modules(tmp_path, monkeypatch):
    (tmp_path / "utils.py").write_text(_release_utils_source())
    monkeypatch.syspath_prepend(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        release = importlib.import_module("sbfast.compat.release")
    try:
        assert release.registered.keys() == {"engine", "sam", "sam.sam", "utils"}
        # main.py's import lines, unchanged
        from engine import boosting_sam_split_boost, main_fisher, train_one_epoch  # noqa: F401
        from sam.sam import NSAM
        from utils import CustomDataset, create_dataset

        assert NSAM is nsam.NSAM and train_one_epoch is engine.train_one_epoch
        assert create_dataset is utils.create_dataset and CustomDataset is utils.CustomDataset
        assert sys.modules["engine"] is engine and sys.modules["sam.sam"] is nsam
        assert release.register().keys() == release.registered.keys()  # idempotent
    finally:
        release.unregister()
    assert "engine" not in sys.modules and "sam.sam" not in sys.modules and "utils" not in sys.modules


@pytest.mark.usefixtures("clean_modules")
def test_one_line_switch_leaves_a_foreign_utils_alone(tmp_path, monkeypatch):
    (tmp_path / "utils.py").write_text("def helper():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(RuntimeWarning, match="'utils' module that is not the release's"):
        release = importlib.import_module("sbfast.compat.release")
    try:
        assert "utils" not in release.registered
        import utils as user_utils

        assert user_utils.helper() == 1
        assert sys.modules["engine"] is engine
    finally:
        release.unregister()


@pytest.mark.usefixtures("clean_modules")
def test_one_line_switch_warns_when_imported_after_the_release(monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "engine", types.ModuleType("engine"))
    with pytest.warns(RuntimeWarning, match="'engine' was already imported"):
        release = importlib.import_module("sbfast.compat.release")
    try:
        assert sys.modules["engine"] is engine
    finally:
        release.unregister()

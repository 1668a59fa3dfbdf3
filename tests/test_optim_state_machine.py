"""SharpBalanceSAM against sbfast.reference.SAM under random sequences of calls (hypothesis).

Each example builds one set of parameters (float64 and float32, in two param groups with their
own lr, momentum, dampening, nesterov, weight decay, rho and ASAM flag), one fused optimizer in
``nonfinite="error"`` or ``"skip"`` mode and one reference SAM over torch.optim.SGD, and then
runs a random sequence of: gradients (accumulated as backward does, for every parameter, or a
fresh set after ``zero_grad(set_to_none=True)``), NaN / +-inf injected into any gradient,
``normal_step`` / ``first_step`` / ``second_step`` / ``third_step`` / ``restore`` (with and
without ``zero_grad``), ``zero_grad``, state-dict round trips (the fused optimizer loading its own state
dict or the reference's), LR changes, a negative LR that must be refused, and calls out of
order that must be refused.

After every rule: parameters, gradients, momentum buffers (through ``state_dict()``: the same
set of started buffers, equal values), ``has_normal`` and ``skipped_steps`` agree. float64
bit for bit; float32 bit for bit too (the fused kernels round as torch's ops do on CPU).

The reference has no ``nonfinite`` handling, so the machine plays its part where the fused
optimizer refuses or skips a step (what the module docstring promises): a non-finite first norm
raises in both (``"error"``) or, in ``"skip"`` mode, leaves the fused parameters unusable until
``second_step`` restores w and counts the skip; a non-finite gradient in ``second_step`` /
``third_step`` restores w, drops the step (normal gradients included) and leaves momentum
untouched. A refused call leaves both optimizers and the parameters exactly as they were.

Where the fused optimizer's gradients are zero views and the reference's are None (its
documented departure: ``zero_grad`` attaches zeroed views, as ``torch.optim.SGD`` with
``set_to_none=False`` would keep zeros), the machine checks the views are zero and gives the
reference zero gradients too. A ``first_step`` with no backward since the gradients were last
zeroed is refused by the fused optimizer (where the reference, holding zeros, would take a zero
perturbation); the machine tracks when that is so and leaves the reference unmoved too.

Cost: ``EXAMPLES`` (150) examples of up to ``STEPS`` (30) rules, a ``training_step`` rule being up
to eight calls: about 12 s of one core (22 s wall on a busy 2-core machine).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from sbfast import reference
from sbfast.optim import SharpBalanceSAM

EXAMPLES = 150
STEPS = 30
SHAPES = [
    ((3, 4), torch.float64),
    ((4,), torch.float64),
    ((2, 3), torch.float32),
    ((5,), torch.float32),
    ((1,), torch.float64),
]
GROUPS = [[0, 1, 2], [3, 4]]  # a group mixes dtypes; a dtype spans groups
POISON = [float("nan"), float("inf"), float("-inf")]

hyper = st.fixed_dictionaries(
    {
        "lr": st.sampled_from([0.0, 0.01, 0.1, 0.5]),
        "momentum": st.sampled_from([0.0, 0.5, 0.9]),
        "dampening": st.sampled_from([0.0, 0.3]),
        "nesterov": st.booleans(),
        "weight_decay": st.sampled_from([0.0, 1e-3, 0.1]),
        "rho": st.sampled_from([0.0, 0.05, 0.5]),
        "adaptive": st.booleans(),
    }
)


def _valid(h: dict) -> dict:
    if h["nesterov"] and (h["momentum"] == 0 or h["dampening"] != 0):
        h = dict(h, nesterov=False)
    return h


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, NaN included."""
    return bool(torch.equal(a.isnan(), b.isnan())) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _finite(t: torch.Tensor | None) -> bool:
    return t is None or bool(torch.isfinite(t).all())


class SAMMachine(RuleBasedStateMachine):
    """The fused optimizer and the reference side by side (see the module docstring)."""

    @initialize(seed=st.integers(0, 2**16), h0=hyper, h1=hyper, nonfinite=st.sampled_from(["error", "skip"]))
    def build(self, seed, h0, h1, nonfinite):
        torch.manual_seed(seed)
        values = [torch.randn(shape, dtype=torch.float64).to(dtype) for shape, dtype in SHAPES]
        self.fast_p = [torch.nn.Parameter(v.clone()) for v in values]
        self.ref_p = [torch.nn.Parameter(v.clone()) for v in values]
        hs = [_valid(h0), _valid(h1)]
        groups = lambda ps: [dict(params=[ps[i] for i in g], **h) for g, h in zip(GROUPS, hs, strict=True)]  # noqa: E731
        self.fast = SharpBalanceSAM(groups(self.fast_p), lr=0.1, nonfinite=nonfinite)
        self.ref = reference.SAM(groups(self.ref_p), torch.optim.SGD, lr=0.1)
        self.nonfinite = nonfinite
        self.skipped = 0
        self.perturbed: set[int] = set()  # between first_step and second_step: ids of the perturbed params
        self.poisoned: list[torch.Tensor] | None = None  # skip mode: masks of a non-finite first norm
        # the fused gradient buffer as the last zeroing left it, no backward since: True / False,
        # None where a phase's hand-over of .grad may or may not have written into it
        self.zeroed: bool | None = True
        for p in self.fast_p + self.ref_p:
            p.grad = None

    # ---- helpers -----------------------------------------------------------------------

    def _ref_grads_follow_fast(self) -> None:
        """A fused .grad that exists where the reference's is None is a zeroed view: check it is
        zero and give the reference zeros (the documented departure)."""
        for f, r in zip(self.fast_p, self.ref_p, strict=True):
            if f.grad is not None and r.grad is None:
                assert not bool(f.grad.any()), "a gradient appeared that no backward made"
                r.grad = torch.zeros_like(r)
            assert (f.grad is None) == (r.grad is None)

    def _snapshot(self) -> dict:
        return dict(
            params=[p.detach().clone() for p in self.fast_p + self.ref_p],
            grads=[None if p.grad is None else p.grad.clone() for p in self.fast_p + self.ref_p],
            fast_sd=copy.deepcopy(self.fast.state_dict()),
            ref_sd=copy.deepcopy(self.ref.state_dict()),
            skipped=int(self.fast.skipped_steps),
            has_normal=self.fast.has_normal,
        )

    def _assert_unchanged(self, before: dict) -> None:
        after = self._snapshot()
        for a, b in zip(after["params"], before["params"], strict=True):
            assert _same(a, b)
        for a, b in zip(after["grads"], before["grads"], strict=True):
            assert (a is None) == (b is None)
            assert a is None or _same(a, b)
        assert after["skipped"] == before["skipped"] and after["has_normal"] == before["has_normal"]
        for sd_a, sd_b in ((after["fast_sd"], before["fast_sd"]), (after["ref_sd"], before["ref_sd"])):
            assert sd_a["param_groups"] == sd_b["param_groups"]
            assert sd_a["state"].keys() == sd_b["state"].keys()

    def _used_grads_finite(self, second: bool) -> bool:
        """Whether every gradient that the coming update reads is finite (the reference's view)."""
        for p in self.ref_p:
            state = self.ref.state.get(p, {})
            normal = state.get("normal_g") if self.ref.has_normal else None
            if second and not _finite(p.grad):
                return False
            if not second and normal is None and not _finite(p.grad):
                return False
            if not _finite(normal):
                return False
        return True

    def _ref_drop_step(self, leave_normal_grads: bool) -> None:
        """The reference's side of a refused or skipped update: w restored, no SGD step,
        normal gradients dropped (a parameter with only g_n keeps it as .grad when the fused
        optimizer's skip path hands it over)."""
        for p in self.ref_p:
            state = self.ref.state.get(p, {})
            old = state.pop("old_p", None)
            if old is not None:
                with torch.no_grad():
                    p.copy_(old)
            normal = state.pop("normal_g", None)
            if leave_normal_grads and self.ref.has_normal and normal is not None:
                p.grad = normal if p.grad is None else p.grad
        self.ref.has_normal = False

    # ---- rules -------------------------------------------------------------------------

    @rule(data=st.data(), poison=st.booleans())
    def backward(self, data, poison):
        """A backward pass: a gradient for every parameter (accumulated into an existing one)
        except some that have none yet (outside this forward); optionally one non-finite
        element."""
        seed = data.draw(st.integers(0, 2**16), label="grad seed")
        g = torch.Generator().manual_seed(seed)
        scale = data.draw(st.sampled_from([1e-3, 1.0, 10.0]), label="scale")
        absent = data.draw(st.sets(st.integers(0, len(SHAPES) - 1)), label="outside the forward")
        target = data.draw(st.integers(0, len(SHAPES) - 1), label="poisoned param") if poison else None
        bad = data.draw(st.sampled_from(POISON), label="poison value") if poison else None
        for i, (f, r) in enumerate(zip(self.fast_p, self.ref_p, strict=True)):
            if i in absent and r.grad is None and i != target:
                continue
            v = (torch.randn(f.shape, generator=g, dtype=torch.float64) * scale).to(f.dtype)
            if i == target:
                v.view(-1)[seed % v.numel()] = bad
            for p in (f, r):
                if p.grad is None:
                    p.grad = v.clone()
                else:
                    p.grad.add_(v)
            self.zeroed = False

    @rule(
        data=st.data(),
        kind=st.sampled_from(["sam", "mixed", "normal only"]),
        poison=st.sampled_from([None, "normal", "first", "second"]),
        zero_grad=st.booleans(),
    )
    def training_step(self, data, kind, poison, zero_grad):
        """A whole step as a training loop makes it (the mixed step of docs/algorithm.md), built from the
        rules above, so that long runs of full steps, with a non-finite gradient in any pass,
        come up as often as the odd orders."""

        def then(phase, *args):  # each part as its own rule, the invariant after each
            phase(*args)
            self.agree()

        then(self.zero_grad, data.draw(st.booleans(), label="set_to_none"))
        if kind != "sam":
            then(self.backward, data, poison == "normal")
            if kind == "normal only":
                if data.draw(st.booleans(), label="keep g_n"):
                    then(self.normal_step, zero_grad)
                then(self.third_step, zero_grad)
                return
            then(self.normal_step, True)
        then(self.backward, data, poison == "first")
        then(self.first_step, True)
        then(self.backward, data, poison == "second")
        self.second_step(zero_grad)

    @rule(set_to_none=st.booleans())
    def zero_grad(self, set_to_none):
        self.fast.zero_grad(set_to_none=set_to_none)
        self.ref.zero_grad(set_to_none=set_to_none)
        self.zeroed = True

    @rule(zero_grad=st.booleans())
    def normal_step(self, zero_grad):
        if self.perturbed:
            before = self._snapshot()
            with pytest.raises(ValueError, match="normal_step after first_step"):
                self.fast.normal_step(zero_grad=zero_grad)
            self._assert_unchanged(before)
            return
        self.fast.normal_step(zero_grad=zero_grad)
        self.ref.normal_step(zero_grad=zero_grad)
        if zero_grad:
            self.zeroed = True

    @rule(zero_grad=st.booleans())
    def first_step(self, zero_grad):
        before = self._snapshot()
        if self.perturbed:
            with pytest.raises(ValueError, match="twice"):
                self.fast.first_step(zero_grad=zero_grad)
            self._assert_unchanged(before)
            return
        if all(p.grad is None for p in self.ref_p):
            for opt in (self.fast, self.ref):
                with pytest.raises(ValueError, match="no parameter has a gradient"):
                    opt.first_step(zero_grad=zero_grad)
            self._assert_unchanged(before)
            return
        if self.zeroed is None:  # the hand-over may have written: ask, and check what it says
            self.zeroed = not self.fast._grads_written()
        if self.zeroed:
            assert all(p.grad is None or not bool(p.grad.any()) for p in self.fast_p)
            with pytest.raises(ValueError, match="no backward since the last zero_grad"):
                self.fast.first_step(zero_grad=zero_grad)
            self._assert_unchanged(before)
            return
        finite = all(_finite(p.grad) for p in self.ref_p)
        if not finite and self.nonfinite == "error":
            for opt in (self.fast, self.ref):
                with pytest.raises(ValueError, match="not finite"):
                    opt.first_step(zero_grad=zero_grad)
            self._assert_unchanged(before)
            return
        perturbed = {id(p) for p in self.ref_p if p.grad is not None}
        if not finite:  # skip mode: the fused step goes on device-side, the reference cannot
            self.poisoned = [
                ~torch.isfinite(p.grad) if p.grad is not None else torch.zeros_like(p, dtype=torch.bool)
                for p in self.ref_p
            ]
            self.fast.first_step(zero_grad=zero_grad)
            if zero_grad:
                self.ref.zero_grad()
        else:
            self.fast.first_step(zero_grad=zero_grad)
            self.ref.first_step(zero_grad=zero_grad)
        self.perturbed = perturbed
        if zero_grad:
            self.zeroed = True

    @rule(zero_grad=st.booleans())
    def second_step(self, zero_grad):
        good = self.poisoned is None and self._used_grads_finite(second=True)
        if good:
            self.fast.second_step(zero_grad=zero_grad)
            self.ref.second_step(zero_grad=zero_grad)
        elif self.nonfinite == "error":
            with pytest.raises(ValueError, match="restored"):
                self.fast.second_step(zero_grad=zero_grad)
            self._ref_drop_step(leave_normal_grads=False)
            zero_grad = False  # raised before zeroing anything
        else:
            self.fast.second_step(zero_grad=zero_grad)
            self._ref_drop_step(leave_normal_grads=not zero_grad)
            if zero_grad:
                self.ref.zero_grad()
            self.skipped += 1
        self.perturbed = set()
        self.poisoned = None
        self.zeroed = True if zero_grad else None

    @rule(zero_grad=st.booleans())
    def third_step(self, zero_grad):
        if self.perturbed:
            before = self._snapshot()
            with pytest.raises(ValueError, match="third_step after first_step"):
                self.fast.third_step(zero_grad=zero_grad)
            self._assert_unchanged(before)
            return
        if self._used_grads_finite(second=False):
            self.fast.third_step(zero_grad=zero_grad)
            self.ref.third_step(zero_grad=zero_grad)
        elif self.nonfinite == "error":
            with pytest.raises(ValueError, match="no update"):
                self.fast.third_step(zero_grad=zero_grad)
            self._ref_drop_step(leave_normal_grads=False)
            zero_grad = False  # raised before zeroing anything
        else:
            self.fast.third_step(zero_grad=zero_grad)
            # the reference's hand-over of g_n to .grad, without its SGD step
            if self.ref.has_normal:
                for p in self.ref_p:
                    state = self.ref.state.get(p)
                    if state and "normal_g" in state:
                        p.grad = state.pop("normal_g")
            self.ref.has_normal = False
            if zero_grad:
                self.ref.zero_grad()
            self.skipped += 1
        self.zeroed = True if zero_grad else None

    @rule(zero_grad=st.booleans())
    def restore(self, zero_grad):
        """Back from w + e to w without an update (the release's back_step, as
        compat.ReferenceNSAM does it on the reference); a no-op when not perturbed. In skip mode
        after a non-finite first norm the reference never moved, and the fused step's skip flag
        must go with the dropped step."""
        self.fast.restore(zero_grad=zero_grad)
        for p in self.ref_p:
            old = self.ref.state.get(p, {}).pop("old_p", None)
            if old is not None:
                with torch.no_grad():
                    p.copy_(old)
        if zero_grad:
            self.ref.zero_grad()
            self.zeroed = True
        self.perturbed = set()
        self.poisoned = None

    @rule(group=st.integers(0, 1), lr=st.sampled_from([0.0, 0.02, 0.3]))
    def set_lr(self, group, lr):
        self.fast.param_groups[group]["lr"] = lr
        self.ref.param_groups[group]["lr"] = lr

    @rule(group=st.integers(0, 1), phase=st.sampled_from(["second_step", "third_step"]))
    def negative_lr_is_refused(self, group, phase):
        """A broken schedule: lr < 0 in a group that the phase updates is refused before any
        change (the step stays pending)."""
        if phase == "third_step" and self.perturbed:
            return  # refused for another reason (see third_step)

        def updated(p: torch.Tensor) -> bool:
            state = self.ref.state.get(p, {})
            return (
                p.grad is not None
                or (self.ref.has_normal and "normal_g" in state)
                or (phase == "second_step" and id(p) in self.perturbed)
            )

        if not any(updated(p) for p in self.ref.param_groups[group]["params"]):
            return  # the phase reads no lr of this group
        saved = self.fast.param_groups[group]["lr"]
        self.fast.param_groups[group]["lr"] = -1.0
        before = self._snapshot()
        with pytest.raises(ValueError, match=f"param group {group}: lr must be a finite float >= 0"):
            getattr(self.fast, phase)()
        self._assert_unchanged(before)
        self.fast.param_groups[group]["lr"] = saved

    @rule(source=st.sampled_from(["fast", "reference"]))
    def state_dict_round_trip(self, source):
        if self.perturbed or self.fast.has_normal:
            before = self._snapshot()
            with pytest.raises(ValueError, match="middle of a SAM step"):
                self.fast.load_state_dict(copy.deepcopy(self.fast.state_dict()))
            self._assert_unchanged(before)
            return
        sd = self.fast.state_dict() if source == "fast" else self.ref.state_dict()
        self.fast.load_state_dict(copy.deepcopy(sd))
        self.ref.load_state_dict(copy.deepcopy(self.ref.state_dict()))

    # ---- invariants --------------------------------------------------------------------

    @invariant()
    def agree(self):
        self._ref_grads_follow_fast()
        for i, (f, r) in enumerate(zip(self.fast_p, self.ref_p, strict=True)):
            if self.poisoned is not None:  # skip mode, w + 0 * (non-finite g) until second_step
                keep = ~self.poisoned[i]
                assert torch.equal(f.detach()[keep], r.detach()[keep]), i
            else:
                assert torch.equal(f, r), (i, (f - r).abs().max())
            if f.grad is not None:
                assert _same(f.grad, r.grad), i
        fast_state = self.fast.state_dict()["state"]
        ref_state = self.ref.base_optimizer.state_dict()["state"]
        started = {k for k, v in ref_state.items() if v.get("momentum_buffer") is not None}
        assert set(fast_state) == started, (sorted(fast_state), sorted(started))
        for k in started:
            assert torch.equal(fast_state[k]["momentum_buffer"], ref_state[k]["momentum_buffer"]), k
        assert self.fast.has_normal == self.ref.has_normal
        assert int(self.fast.skipped_steps) == (self.skipped if self.nonfinite == "skip" else 0)


SAMMachine.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestSAMMachine = pytest.mark.usefixtures("one_thread")(SAMMachine.TestCase)

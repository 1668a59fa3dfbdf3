"""sbfast.compat's split functions (the release's engine.py selection) on hand-made scores whose
answers are worked out below, against sbfast.reference.select_sam_masks on random scores, and
their one-line errors."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
import torch

from sbfast import compat, reference

# 3 members x 9 samples, r = 0.34 -> k = int(9 * 0.34) = 3 flattest per member:
# F_0 = {0, 1, 2}, F_1 = {1, 2, 3}, F_2 = {2, 4, 5}; U = {0..5}; R = {6, 7, 8}, R_i = R[i::3] = {6 + i}
# A_0 = F_1 | F_2 = {1..5}, A_1 = F_0 | F_2 = {0, 1, 2, 4, 5}, A_2 = F_0 | F_1 = {0..3}
FLATS = {
    0: np.array([0.1, 0.2, 0.3, 5, 6, 7, 8, 9, 10], np.float32),
    1: np.array([5, 0.1, 0.2, 0.3, 6, 7, 8, 9, 10], np.float32),
    2: np.array([5, 6, 0.1, 7, 0.2, 0.3, 8, 9, 10], np.float32),
}
ARGS = compat.release_args(flat_ratio=0.34)
BALANCE_NORMAL = {0: [0, 7, 8], 1: [3, 6, 8], 2: [4, 5, 6, 7]}  # outside A_i | R_i
BOOST_NORMAL = {0: [0, 6], 1: [3, 7], 2: [4, 5, 8]}  # outside A_i | (R minus R_i)


@pytest.mark.parametrize(
    "fn,want", [(compat.boosting_sam_split, BALANCE_NORMAL), (compat.boosting_sam_split_boost, BOOST_NORMAL)]
)
@pytest.mark.parametrize("i", [0, 1, 2])
def test_boosting_splits_hand_made(fn, want, i):
    normal = fn(ARGS, FLATS, i, ascend=True)
    assert type(normal) is list and all(type(v) is np.int64 for v in normal)
    assert normal == want[i]


def test_boosting_split_descending():
    # k = 3 largest per member: every member's are {6, 7, 8} = U; R = {0..5}, R_i = R[i::3]
    assert compat.boosting_sam_split(ARGS, FLATS, 0, ascend=False) == [1, 2, 4, 5]  # SAM: U | {0, 3}
    assert compat.boosting_sam_split_boost(ARGS, FLATS, 0, ascend=False) == [0, 3]  # SAM: U | R minus {0, 3}


def test_ties_break_by_ascending_index_and_tiny_ratios_keep_the_release_counts():
    flat = {j: np.ones(6, np.float32) for j in range(2)}  # all tied: F_j = the first k
    args = compat.release_args(flat_ratio=0.5)
    # F_0 = F_1 = {0, 1, 2}; R = {3, 4, 5}, R_0 = {3, 5}, R_1 = {4}; A_i = {0, 1, 2}
    assert compat.boosting_sam_split(args, flat, 0, ascend=True) == [4]
    assert compat.boosting_sam_split(args, flat, 1, ascend=True) == [3, 5]
    tiny = compat.release_args(flat_ratio=0.1)  # k = int(0.6) = 0
    # ascending: no flat sample, R = everything; descending: the release's argsort[-0:] is all
    assert compat.boosting_sam_split(tiny, flat, 0, ascend=True) == [1, 3, 5]
    assert compat.boosting_sam_split(tiny, flat, 0, ascend=False) == []


@pytest.mark.parametrize("n", [1, 7, 129])
@pytest.mark.parametrize("variant", ["balance", "boost"])
def test_boosting_splits_equal_the_reference_selection(n, variant):
    g = torch.Generator().manual_seed(n)
    scores = torch.randn(4, n, generator=g).exp()
    flats = {j: scores[j].numpy() for j in range(4)}
    ratio = 0.5
    k = int(n * ratio)
    masks = reference.select_sam_masks(scores, k / n if n else 0.0, variant)
    fn = compat.boosting_sam_split if variant == "balance" else compat.boosting_sam_split_boost
    for i in range(4):
        assert (
            fn(compat.release_args(flat_ratio=ratio), flats, i, ascend=True)
            == torch.nonzero(~masks[i]).flatten().tolist()
        )


def test_sam_idx_complemetary_hand_made(capsys):
    # intersection of F_0, F_1, F_2 = {2}; then [i::3]
    out = [compat.sam_idx_complemetary(ARGS, FLATS, i) for i in range(3)]
    assert all(isinstance(o, np.ndarray) and o.dtype == np.int64 for o in out)
    assert [o.tolist() for o in out] == [[2], [], []]
    # descending: all three have {6, 7, 8}
    assert compat.sam_idx_complemetary(ARGS, FLATS, 1, ascend=False).tolist() == [7]
    assert compat.sam_idx_complemetary(compat.release_args(flat_ratio=0.0), FLATS, 0).tolist() == [-1]
    assert capsys.readouterr().out.split() == [
        "0",
        "3",
        "3",
        "3",
        "1",
        "3",
        "3",
        "3",
        "2",
        "3",
        "3",
        "3",
        "1",
        "3",
        "3",
        "3",
        "0",
    ]


def test_random_and_same_subsets_are_the_release_draws():
    args = compat.release_args(flat_ratio=0.34)
    np.random.seed(5)
    a = compat.random_subset(args, FLATS, 0)
    np.random.seed(5)
    want = np.random.choice(np.arange(9), size=int(9 * (1 - 0.34)), replace=False)
    assert isinstance(a, np.ndarray) and a.dtype == np.int64 and a.shape == (5,)
    assert np.array_equal(a, want) and len(set(a.tolist())) == 5
    s = [compat.same_subset(args, FLATS, i) for i in range(3)]
    assert all(np.array_equal(s[0], t) for t in s)
    assert np.array_equal(s[0], np.random.RandomState(0).choice(np.arange(9), size=5, replace=False))


def test_splits_read_a_manager_dict_as_main_py_shares_it():
    with multiprocessing.Manager() as manager:
        shared = manager.dict()
        for k, v in FLATS.items():
            shared[k] = v
        assert compat.boosting_sam_split_boost(ARGS, shared, 1, ascend=True) == BOOST_NORMAL[1]


@pytest.mark.parametrize(
    "flats,i,ratio,err,match",
    [
        ({0: np.ones(4), 1: np.ones(5)}, 0, 0.5, ValueError, r"flats\[1\] has shape \(5,\) but flats\[0\] has 4"),
        ({0: np.ones(4), 2: np.ones(4)}, 0, 0.5, ValueError, "member ids 0..1"),
        ({0: np.ones(4), 1: np.ones(4)}, 2, 0.5, ValueError, "member i = 2"),
        ({0: np.array([1.0, np.nan, 2.0]), 1: np.ones(3)}, 0, 0.5, ValueError, "NaN"),
        ({0: np.ones(4), 1: np.ones(4)}, 0, 1.5, ValueError, r"flat_ratio must be a number in \[0, 1\]"),
        ({0: np.ones((2, 2))}, 0, 0.5, ValueError, "1-D per-sample scores"),
        ({1: np.ones(4)}, 1, 0.5, KeyError, "0"),  # the release reads flats[0] first
    ],
)
def test_split_errors(flats, i, ratio, err, match):
    for fn in (compat.boosting_sam_split, compat.boosting_sam_split_boost):
        with pytest.raises(err, match=match):
            fn(compat.release_args(flat_ratio=ratio), flats, i, ascend=True)


def test_subset_errors():
    with pytest.raises(ValueError, match="flats\\[1\\] has shape"):
        compat.random_subset(ARGS, {0: np.ones(3), 1: np.ones(4)}, 0)
    with pytest.raises(ValueError, match="flat_ratio"):
        compat.same_subset(compat.release_args(flat_ratio=-0.1), FLATS, 0)

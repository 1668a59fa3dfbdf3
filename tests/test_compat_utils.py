"""sbfast.compat.utils (the release's utils.py) and release_args on hand-made cases: local
files only, torchvision's transform draws reproduced by hand, the release's models and
checkpoint layout."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from compat_helpers import cifar_args

from sbfast import compat, models
from sbfast.compat.utils import ImageArrayDataset, ReleaseTransform
from sbfast.data import CIFAR10_MEAN, CIFAR10_STD

pytestmark = pytest.mark.usefixtures("one_thread")


def _normalise(u8_chw: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(3, 1, 1)
    return (u8_chw.float() / 255 - mean) / std


def test_custom_dataset_yields_index_x_y():
    ds = compat.CustomDataset([("a", 1), ("b", 2)])
    assert len(ds) == 2 and ds[1] == (1, "b", 2)


def test_release_transform_test_pipeline():
    img = np.random.RandomState(0).randint(0, 256, (5, 7, 3)).astype(np.uint8)
    out = ReleaseTransform(CIFAR10_MEAN, CIFAR10_STD)(img)
    assert out.dtype == torch.float32 and out.shape == (3, 5, 7)
    torch.testing.assert_close(out, _normalise(torch.from_numpy(img).permute(2, 0, 1)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_release_transform_train_pipeline_takes_torchvisions_draws(seed):
    img = np.random.RandomState(seed).randint(0, 256, (32, 32, 3)).astype(np.uint8)
    torch.manual_seed(seed)
    out = ReleaseTransform(CIFAR10_MEAN, CIFAR10_STD, crop=32)(img)
    state_after = torch.get_rng_state()
    torch.manual_seed(seed)  # RandomCrop(32, padding=4): randint row, randint column; then flip
    i = torch.randint(0, 9, size=(1,)).item()
    j = torch.randint(0, 9, size=(1,)).item()
    flip = bool(torch.rand(1) < 0.5)
    assert torch.equal(torch.get_rng_state(), state_after)  # the same draws, no more
    padded = torch.zeros(3, 40, 40, dtype=torch.uint8)
    padded[:, 4:36, 4:36] = torch.from_numpy(img).permute(2, 0, 1)
    want = padded[:, i : i + 32, j : j + 32]
    want = want.flip(-1) if flip else want
    torch.testing.assert_close(out, _normalise(want), rtol=0, atol=1e-6)


def test_release_transform_rejects_non_pixels():
    with pytest.raises(ValueError, match="uint8"):
        ReleaseTransform(CIFAR10_MEAN, CIFAR10_STD)(np.zeros((4, 4, 3), np.float32))


def test_create_dataset_cifar10_from_local_files(tmp_path):
    args = cifar_args(tmp_path, n_train=30)
    train, val, test, num_classes = compat.create_dataset(args)
    assert num_classes == 10 and (len(train), len(val), len(test)) == (30, 10, 10)
    train_idx = np.load(args.train_idx_path)
    raw = np.concatenate(
        [pickle.loads((tmp_path / "cifar-10-batches-py" / f"data_batch_{b}").read_bytes())["data"] for b in range(1, 6)]
    ).reshape(-1, 3, 32, 32)
    labels = sum(
        (
            pickle.loads((tmp_path / "cifar-10-batches-py" / f"data_batch_{b}").read_bytes())["labels"]
            for b in range(1, 6)
        ),
        [],
    )
    fisher = compat.create_dataset(args, is_fisher=True)
    for k in (0, 7, 29):
        x, y = fisher[k]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == labels[train_idx[k]]
        torch.testing.assert_close(x, _normalise(torch.from_numpy(raw[train_idx[k]])), rtol=0, atol=1e-6)
    x, y = train[3]  # augmented: a shifted, maybe flipped window of the same image
    assert x.shape == (3, 32, 32) and y == labels[train_idx[3]]
    assert isinstance(test, ImageArrayDataset) and test.data.shape == (10, 32, 32, 3)


def test_create_dataset_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.RandomState(0)
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.fromarray(rng.randint(0, 256, (64, 64, 3)).astype(np.uint8)).save(tmp_path / split / cls / "a.png")
    np.save(tmp_path / "tr.npy", np.arange(2))
    np.save(tmp_path / "va.npy", np.arange(2))
    args = compat.release_args(
        data="tiny_imgnet",
        data_path=str(tmp_path),
        train_idx_path=str(tmp_path / "tr.npy"),
        val_idx_path=str(tmp_path / "va.npy"),
    )
    train, val, test, num_classes = compat.create_dataset(args)
    assert num_classes == 200 and len(train) == len(val) == len(test) == 2
    assert train[0][0].shape == (3, 64, 64) and val[1][1] == 1


def test_create_dataset_never_downloads(tmp_path):
    args = cifar_args(tmp_path, n_train=30)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        compat.create_dataset(compat.release_args(**{**vars(args), "data_path": str(tmp_path / "nothing")}))
    with pytest.raises(FileNotFoundError, match="train_idx_path"):
        compat.create_dataset(compat.release_args(**{**vars(args), "train_idx_path": str(tmp_path / "no.npy")}))
    with pytest.raises(FileNotFoundError, match="data_path is None"):
        compat.create_dataset(compat.release_args(**{**vars(args), "data_path": None}))
    np.save(tmp_path / "bad.npy", np.array([0, 40]))
    with pytest.raises(ValueError, match="outside the 40 training images"):
        compat.create_dataset(compat.release_args(**{**vars(args), "val_idx_path": str(tmp_path / "bad.npy")}))


def test_create_model_the_release_models():
    args = compat.release_args(width=2)
    torch.manual_seed(0)
    net = compat.create_model(args, 10)
    torch.manual_seed(0)
    plain = models.create_model("resnet18", 10, width=2)
    assert isinstance(net, models.ResNet18) and list(net.state_dict()) == list(plain.state_dict())
    assert "layer1.0.conv1.weight" in net.state_dict() and "linear.weight" in net.state_dict()
    x = torch.randn(3, 3, 32, 32)
    net.eval()
    plain.eval()
    torch.testing.assert_close(net(x), plain(x), rtol=1e-5, atol=1e-6)  # fixed 4x4 pool == global pool on 32x32
    probs = compat.create_model(args, 10, softmax=True).eval()(x)
    torch.testing.assert_close(probs.sum(1), torch.ones(3))
    assert isinstance(compat.create_model(compat.release_args(model="wrn-40-2"), 100), models.WideResNet)
    tiny = compat.create_model(compat.release_args(data="tiny_imgnet", width=8), 200)
    assert isinstance(tiny, models.TinyImageNetResNet18)  # models/resnet_imgnet.py's, not the CIFAR one
    assert tiny.fc.in_features == 512  # the release's Tiny-ImageNet model ignores width
    with pytest.raises(ValueError, match="unknown args.model 'vgg'"):
        compat.create_model(compat.release_args(model="vgg"), 10)
    with pytest.raises(ValueError, match="save_features"):
        compat.create_model(compat.release_args(model="wrn-40-2", save_features=True), 10)


def test_save_and_load_model_the_release_layout(tmp_path, capsys):
    args = compat.release_args(width=2, save_path=str(tmp_path))
    net = compat.create_model(args, 10)
    opt = compat.NSAM(net.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    F.cross_entropy(net(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2])).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(net(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2])).backward()
    opt.second_step(zero_grad=True)
    compat.save_model(args, net, 4, 0.5, opt)
    compat.save_model(args, net, 4, 0.5, opt, first_stage=True)
    compat.save_model(args, net, 4, 0.5, opt, first_stage=True, save_init=True)
    assert sorted(os.listdir(tmp_path)) == [
        "checkpoint-4.pth.tar",
        "checkpoint.pth.tar",
        "checkpoint_startepoch.pth.tar",
    ]
    ckpt = torch.load(tmp_path / "checkpoint.pth.tar")
    assert list(ckpt) == ["epoch", "dataset", "model", "state_dict", "best_acc", "optimizer"]
    assert (ckpt["epoch"], ckpt["dataset"], ckpt["model"], ckpt["best_acc"]) == (4, "cifar10", "resnet18", 0.5)
    other = compat.create_model(args, 10)
    opt2 = compat.NSAM(other.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    args.resume = str(tmp_path / "checkpoint.pth.tar")
    compat.load_model(args, other, opt2)
    assert args.start_epoch == 5 and "Model restored from epoch: 5" in capsys.readouterr().out
    for p, q in zip(net.parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])
    args.resume = str(tmp_path / "missing.pth.tar")
    with pytest.raises(FileNotFoundError, match="resume should be a file"):
        compat.load_model(args, other, opt2)


def test_release_args():
    args = compat.release_args(sam="True", flat_ratio=0.5)
    assert (args.sam, args.flat_ratio, args.print_freq, args.num_workers, args.initial_epochs) == (
        "True",
        0.5,
        50,
        4,
        -1,
    )
    with pytest.raises(TypeError, match="flat_raito"):
        compat.release_args(flat_raito=0.5)

"""Data for sbfast: every data set yields ``(index, x, y)`` with a stable int64 index.

* :mod:`sbfast.data.datasets`: the container (:class:`IndexedTensorDataset`), the embedded
  digits set and a synthetic set, batching (:func:`make_loader`), augmentation, normalisation.
* :mod:`sbfast.data.readers`: CIFAR-10/100 and CIFAR-10-C/100-C already on disk (nothing is
  ever downloaded).
* image folders: :mod:`sbfast.data.layouts` (which files, which labels: class folders,
  Tiny-ImageNet's annotated val, Tiny-ImageNet-C), :mod:`sbfast.data.images` (headers, decoding,
  channel statistics), :mod:`sbfast.data.image_folders` (one split in memory),
  :mod:`sbfast.data.image_splits` (a run's train + test and corrupted test sets) and
  :mod:`sbfast.data.streaming` (sets too large for memory, decoded per batch).
* :mod:`sbfast.data.corruptions`: CIFAR-10-C corruptions for any image set.
* :mod:`sbfast.data.checks`: :class:`DataError` (a ValueError naming the file that is truncated,
  corrupted or holds the wrong contents) and :func:`check_seed` (seeds are ints in [0, 2**63)).
* :mod:`sbfast.data.files`: the byte-level readers behind the loaders.
"""

from sbfast.data.checks import DataError, check_seed
from sbfast.data.corruptions import (
    CIFAR_C_BENCHMARK,
    CORRUPTIONS,
    NOT_IMPLEMENTED,
    corrupt,
    corruption_seed,
    make_corrupted_sets,
)
from sbfast.data.datasets import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    DIGITS_SPLIT_SIZES,
    TINY_IMAGENET_MEAN,
    TINY_IMAGENET_STD,
    IndexedTensorDataset,
    RandomCropFlip,
    augment_batch,
    denormalize,
    load_digits_splits,
    make_loader,
    make_synthetic_images,
    normalize,
    train_transform_for,
)
from sbfast.data.image_folders import load_image_folder, load_tiny_imagenet
from sbfast.data.image_splits import (
    IMAGE_FOLDER_DATASETS,
    TINY_IMAGENET_SIZE,
    ImageSplits,
    check_corruption_folder,
    corrupted_test_sets,
    load_corruption_folder,
    load_image_splits,
    spatial_scale_for,
)
from sbfast.data.images import ChannelStats, channel_stats
from sbfast.data.layouts import ImageFiles
from sbfast.data.readers import (
    LazyMapping,
    list_cifar_c,
    load_cifar10,
    load_cifar100,
    load_cifar_c,
)
from sbfast.data.streaming import (
    MEMORY_FRACTION,
    STORAGES,
    StreamingDeviceData,
    StreamingImageDataset,
    choose_storage,
    memory_budget,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR_C_BENCHMARK",
    "CORRUPTIONS",
    "DataError",
    "DIGITS_SPLIT_SIZES",
    "IMAGE_FOLDER_DATASETS",
    "MEMORY_FRACTION",
    "STORAGES",
    "TINY_IMAGENET_SIZE",
    "ChannelStats",
    "ImageFiles",
    "ImageSplits",
    "StreamingDeviceData",
    "StreamingImageDataset",
    "channel_stats",
    "check_corruption_folder",
    "choose_storage",
    "corrupted_test_sets",
    "load_corruption_folder",
    "load_image_splits",
    "memory_budget",
    "spatial_scale_for",
    "NOT_IMPLEMENTED",
    "TINY_IMAGENET_MEAN",
    "TINY_IMAGENET_STD",
    "IndexedTensorDataset",
    "LazyMapping",
    "RandomCropFlip",
    "augment_batch",
    "check_seed",
    "corrupt",
    "corruption_seed",
    "denormalize",
    "list_cifar_c",
    "load_cifar10",
    "load_cifar100",
    "load_cifar_c",
    "load_digits_splits",
    "load_image_folder",
    "load_tiny_imagenet",
    "make_corrupted_sets",
    "make_loader",
    "make_synthetic_images",
    "normalize",
    "train_transform_for",
]

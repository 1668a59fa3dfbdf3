"""CIFAR-10-C style corruptions (Hendrycks & Dietterich, ICLR 2019) as batched tensor ops.

Why our own code rather than a library:
  * ``imagecorruptions`` (1.1.2, last release 2020) needs OpenCV, scikit-image and SciPy, uses
    ``np.float_`` (removed in NumPy 2, which sbfast runs on), ``scipy.ndimage.interpolation`` and
    ``pkg_resources``, draws from NumPy's global RNG (no seed argument), works on one HxWx3 uint8
    image at a time, and carries the ImageNet-C parameters (224 px), not CIFAR-10-C's.
  * ``torch-uncertainty``'s corruption transforms import torchvision (ruled out here), einops,
    kornia and OpenCV, and pull Lightning as a core dependency.
Both would add heavy dependencies for a few dozen lines of array code each, so the corruptions
below follow the published CIFAR-10-C generator (``make_cifar_c.py``) formula by formula, with
its CIFAR (32 px) severity parameters, on float batches in any device, with a torch.Generator.

Input and output live in [0, 1] PIXEL space. For normalised data use ``denormalize`` first and
``normalize`` after, or let :func:`make_corrupted_sets` do both from the data set's mean/std.

Implemented (CORRUPTIONS): the CIFAR-10-C benchmark's 15 families except ``frost`` (it blends
in photographs of frost that ship with the original generator, which we cannot ship), plus the
generator's four extras except ``spatter`` (OpenCV Canny/distance-transform pipeline).
Known departures, all small: no intermediate uint8 rounding inside glass blur and snow (the
original rounds to uint8 between steps); ImageMagick's motion blur is re-implemented (same
one-sided Gaussian taps, edge replication); the elastic affine warp uses bilinear sampling with
reflect-101 borders like OpenCV's default but not its fixed-point arithmetic.

Files: :mod:`~sbfast.data.corruptions.apply` (:func:`corrupt`, :func:`corruption_seed`,
:func:`make_corrupted_sets`), :mod:`~sbfast.data.corruptions.catalogue` (names, severity
parameters, the function of each), the families :mod:`~sbfast.data.corruptions.noise`,
:mod:`~sbfast.data.corruptions.blur`, :mod:`~sbfast.data.corruptions.weather` and
:mod:`~sbfast.data.corruptions.digital`, and the image primitives they share,
:mod:`~sbfast.data.corruptions.filters`.
"""

from sbfast.data.corruptions.apply import corrupt, corruption_seed, make_corrupted_sets
from sbfast.data.corruptions.catalogue import CIFAR_C_BENCHMARK, CORRUPTIONS, NOT_IMPLEMENTED

__all__ = ["CIFAR_C_BENCHMARK", "CORRUPTIONS", "NOT_IMPLEMENTED", "corrupt", "corruption_seed", "make_corrupted_sets"]

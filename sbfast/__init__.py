"""sbfast: kernel-accelerated SharpBalance (flat and diverse deep ensembles).

Importing sbfast never needs a GPU and never fails because the C++ extension is missing
(it warns once and falls back to the plain-PyTorch reference on CPU and Triton on CUDA).
"""

from sbfast import ops, reference
from sbfast._ops import backends

__version__ = "0.1.0"

__all__ = ["backends", "ops", "reference", "__version__"]

"""Triton kernels of sbfast, installed as ``sbfast.kernels``.

One module per op. Each module holds the ``@triton.jit`` kernels and a launcher written only
with PyTorch ops and :func:`sbfast.kernels.launch.launch` calls (``wrap_triton`` underneath),
so that ``torch.library.triton_op`` can register it and ``torch.compile`` can see the kernels.
Offsets are int64 throughout (:mod:`sbfast.kernels.indexing`). Under ``TRITON_INTERPRET=1`` the
launchers also run on CPU tensors, with the GPU's grids and BLOCK sizes, which is how CI tests
them; ``scripts/triton_aot_check.py`` compiles every specialisation those tests launch for the GPU.
"""

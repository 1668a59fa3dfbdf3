"""Triton kernels of sbfast, installed as ``sbfast.kernels``.

One module per op. Each module holds the ``@triton.jit`` kernels and a launcher written
only with PyTorch ops and ``wrap_triton`` calls, so that ``torch.library.triton_op`` can
register it and ``torch.compile`` can see the kernels. Under ``TRITON_INTERPRET=1`` the
launchers also run on CPU tensors, which is how CI tests them.
"""

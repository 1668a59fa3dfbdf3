"""Per-sample sharpness scores (docs/algorithm.md section 3), fast.

``fisher_scores`` gives the same numbers as :func:`sbfast.reference.fisher_scores`,
s_i = ||grad_w CE(f_w(x_i), y_i)||^2 over every trainable parameter, from ONE forward and ONE
backward pass per batch instead of a vmap over per-sample gradients:

* the loss is the batch's SUM of per-sample losses, so the gradient that reaches a layer's
  output for sample i is sample i's own gradient (as long as the model does not mix samples);
* forward hooks keep each layer's input a; tensor hooks on its output receive the output
  gradient g during the backward, and the layer's per-sample squared gradient norm is computed
  right there, from a and g, and a is released (memory stays near one training step's);
* the backward computes activation gradients only: parameters enter the forward detached, so no
  weight gradient is ever formed (the identities below replace that work).

Per layer, for sample i (T = sequence or spatial positions, a_t in R^d, g_t in R^p):

* Linear on [B, d]: ||a||^2 ||g||^2, bias ||g||^2. On [B, ..., d]: ||sum_t g_t a_t^T||_F^2 by
  the direct product or by the Gram identity sum_{t,s} (a_t . a_s)(g_t . g_s)
  (``sbfast::per_sample_grad_sq_norm_direct`` / ``_gram``; :func:`choose_form` picks the
  cheaper), bias ||sum_t g_t||^2.
* Conv1d/Conv2d (any stride, padding, padding mode, dilation, groups): the input unfolded to
  [B, T, C_in/groups * k] per group is a 3-D Linear per group; bias ||sum_t g_t||^2. The direct
  form is ``sbfast::per_sample_conv_grad_sq_norm``: on CPU each sample is unfolded alone in a
  per-thread buffer (the batch's unfold is never formed), on CUDA the Triton direct kernel reads
  the unfold; the Gram form unfolds and calls the Gram op. Either way the batch is taken in
  chunks whose unfold and Gram matrices fit ``sbfast.sharpness.linear_conv.TRANSIENT_BUDGET_BYTES``
  (128 MiB), so that scoring needs about a training step's memory, not that plus a whole-batch
  unfold (0.6 GB per CIFAR ResNet18 stage-1 layer at batch 256); the Gram form of a Linear on
  [B, T, d] is chunked the same way.
* BatchNorm (eval: running statistics), LayerNorm, GroupNorm, RMSNorm: the per-sample weight
  gradient is sum over the non-normalised positions of g * x_hat, the bias gradient sum of g.
* Embedding: ||sum_t onehot(tok_t) g_t^T||^2 = sum of ||sum of g_t over equal tokens||^2
  (padding_idx rows get no gradient).
* A module called several times in one forward (shared weights) has one gradient per sample:
  its calls are concatenated along T before the norm, never summed as separate norms.
* Anything else with directly-owned trainable parameters (a custom module's nn.Parameter such as
  a ViT's class token and positional embedding, a subclass that overrides ``forward``,
  weight-norm parametrisations, parameters shared between modules, a layer whose batch dimension
  is not first, a layer that never runs although its parameters reach the loss): those
  parameters only are scored with ``torch.func`` vmap(grad) over a functional call of the whole
  model, with one warning per call naming the module types. On the first batch, such a parameter
  is also tried as per-sample copies [B, ...] in the main pass (a leading 1 replaced by B, else B
  prepended): where the copies give vmap's numbers exactly (a parameter only broadcast over the
  batch, like a positional embedding), later batches take it from the single backward instead.

Also handled: a layer input modified in place after the layer read it (detected by version
counter; that input is copied from then on), a batch that runs out of memory (halved until it
fits, for the rest of the call).

What cannot be detected, and is assumed: the model's forward treats samples independently in
eval mode (no cross-sample attention, batch statistics or in-batch negatives; BatchNorm is put in
eval mode and one with ``track_running_stats=False`` is refused), every layer's first input and
output have the batch dimension first (a sequence-first layer is caught only when T != B), and a
parameter of a layer that runs is used only through that layer's forward (not also read directly
elsewhere, e.g. ``F.linear(x, self.fc.weight)`` next to ``self.fc(x)``).
"""

from __future__ import annotations

from sbfast.sharpness.fisher import fisher_scores, sample_fisher_scores
from sbfast.sharpness.linear_conv import FORMS, choose_form
from sbfast.sharpness.loss_gap import sam_loss_gap_scores

__all__ = ["FORMS", "choose_form", "fisher_scores", "sam_loss_gap_scores", "sample_fisher_scores"]

"""Which per-layer rule serves which module (anything else goes to the vmap fallback)."""

from __future__ import annotations

from torch import nn

from sbfast.sharpness.layer_rule import Rule
from sbfast.sharpness.linear_conv import ConvRule, LinearRule
from sbfast.sharpness.norm_embedding import BatchNormRule, EmbeddingRule, GroupNormRule, LayerNormRule, RMSNormRule

__all__ = ["RULES", "rule_for"]

RULES: list[tuple[type, Rule]] = [
    (nn.Linear, LinearRule()),
    (nn.Conv1d, ConvRule()),
    (nn.Conv2d, ConvRule()),
    (nn.modules.batchnorm._BatchNorm, BatchNormRule()),
    (nn.LayerNorm, LayerNormRule()),
    (nn.GroupNorm, GroupNormRule()),
    (nn.Embedding, EmbeddingRule()),
]
if hasattr(nn, "RMSNorm"):
    RULES.append((nn.RMSNorm, RMSNormRule()))


def rule_for(module: nn.Module, names: frozenset[str]) -> Rule | None:
    """The rule for ``module`` if its forward is the stock one and it owns only the parameters
    the rule knows; None sends the module to the vmap fallback."""
    for base, rule in RULES:
        if isinstance(module, base):
            if type(module).forward is not base.forward:
                return None
            if not names <= set(rule.params):
                return None
            if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq):
                return None  # max_norm rewrites weights in the forward; freq scaling mixes samples
            if isinstance(module, (nn.Conv1d, nn.Conv2d)) and getattr(module, "transposed", False):
                return None
            return rule
    return None

"""Inner update rules: one rule over a tensor and its state, knowing nothing of projections."""

from lowmem_optim.rules.adafactor import AdafactorRule
from lowmem_optim.rules.adam import AdamRule
from lowmem_optim.rules.adam8bit import Adam8bitRule
from lowmem_optim.rules.base import Rule, SubspaceChange

RULES: dict[str, type] = {"adam": AdamRule, "adafactor": AdafactorRule, "adam8bit": Adam8bitRule}

__all__ = ["Rule", "SubspaceChange", "AdamRule", "AdafactorRule", "Adam8bitRule", "RULES"]

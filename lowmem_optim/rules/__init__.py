"""Inner update rules: one rule over a tensor and its state, knowing nothing of projections."""

from lowmem_optim.rules.adafactor import AdafactorRule
from lowmem_optim.rules.adam import AdamRule
from lowmem_optim.rules.adam8bit import Adam8bitRule
from lowmem_optim.rules.multinorm import ChannelNormalizedRule, SinkhornRule
from lowmem_optim.rules.normalized import AuONRule, HybridAuONRule, MuonRule

RULES: dict[str, type] = {
    "adam": AdamRule,
    "adafactor": AdafactorRule,
    "adam8bit": Adam8bitRule,
    "auon": AuONRule,
    "hybrid_auon": HybridAuONRule,
    "muon": MuonRule,
    "sinkhorn": SinkhornRule,
    "channel_normalized": ChannelNormalizedRule,
}

__all__ = [
    "AdamRule",
    "AdafactorRule",
    "Adam8bitRule",
    "AuONRule",
    "ChannelNormalizedRule",
    "HybridAuONRule",
    "MuonRule",
    "RULES",
    "SinkhornRule",
]

"""Pure torch modules and the math of the layers. Imports nothing from the rest of the project.

`import model` does not import deepspeed: model.moe imports it when an MoE layer is built.
"""

from model.config import ModelConfig, MoEConfig, PeerConfig, PKMConfig
from model.flops import ModelCounts, count_model, format_counts
from model.lm import LMOutput, TransformerLM, build_model
from model.moe import MoEFeedForward, init_moe_process_groups
from model.peer import PEER
from model.pkm import PKM
from model.product_keys import product_key_topk

__all__ = [
    "LMOutput",
    "MoEConfig",
    "MoEFeedForward",
    "ModelConfig",
    "ModelCounts",
    "PEER",
    "PeerConfig",
    "PKM",
    "PKMConfig",
    "TransformerLM",
    "build_model",
    "count_model",
    "format_counts",
    "init_moe_process_groups",
    "product_key_topk",
]

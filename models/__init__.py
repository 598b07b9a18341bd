"""The project's one decoder definition (dense and MoE) and its MoE helpers."""
from models.model import (Attention, Block, FeedForward, ModelOutput, RMSNorm, Transformer, build_model,
                          model_holding)
from models.generate import generate
from models.moe import (MoEFeedForward, expert_load, load_balancing_loss, load_entropy, route, router_z_loss,
                        set_expert_impl)

__all__ = [
    "generate", "Attention", "Block", "FeedForward", "ModelOutput", "RMSNorm", "Transformer", "build_model",
    "model_holding",
    "MoEFeedForward", "expert_load", "load_balancing_loss", "load_entropy", "route", "router_z_loss", "set_expert_impl",
]

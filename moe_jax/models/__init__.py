"""Pure-functional Flax Linen modules of the MoE language model."""
from moe_jax.models.moe import MoEBlock
from moe_jax.models.router import (Routing, RouterWeights, route, route_tokens,
                                   update_router_bias)
from moe_jax.models.sharing import SharingPlan, make_plan
from moe_jax.models.transformer import Transformer, moe_layer_sets

__all__ = ["MoEBlock", "RouterWeights", "Routing", "route", "route_tokens", "update_router_bias",
           "SharingPlan", "make_plan", "Transformer", "moe_layer_sets"]

"""Backbone-agnostic Mixture-of-Experts: (N, D) -> (N, D) plus one routing record.

Notation used throughout `moe/`: N tokens, D model dim, H expert hidden size, E experts,
K experts per token. The forward reads route -> dispatch -> compute -> combine.
"""

from moectl.moe.layer import MoELayer
from moectl.moe.losses import LOSS_NAMES, load_balancing_loss, router_z_loss, routing_losses
from moectl.moe.record import RoutingRecord
from moectl.moe.router import make_router

__all__ = [
    "LOSS_NAMES",
    "MoELayer",
    "RoutingRecord",
    "load_balancing_loss",
    "make_router",
    "router_z_loss",
    "routing_losses",
]

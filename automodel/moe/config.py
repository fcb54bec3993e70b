"""The `moe` config section (torch-free: validated before anything is built)."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass
class MoEConfig:
    """The `moe` section: how a mixture-of-experts model's routers are trained (ignored for dense models)."""

    aux_loss_coef: Optional[float] = None  # load-balancing loss weight; null: the model config's router_aux_loss_coef; 0: off
    z_loss_coef: Optional[float] = None  # router z-loss weight; null: the model config's router_z_loss_coef (0 if none)
    bias_update_rate: float = 0.001  # routers with a correction bias (DeepSeek-V3): per-step update size; 0: off

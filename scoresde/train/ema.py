"""Exponential moving average of a network's weights, with a warm-up of the decay."""
from __future__ import annotations

import torch


class EMA:
    """Shadow copies of the parameters (and buffers) of `net`.

    decay_n = min(decay, (1 + n) / (10 + n)) after n updates when `warmup` is on: early averages
    forget the random initialisation quickly (the schedule of Song et al.'s score_sde code base).
    """

    def __init__(self, net: torch.nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay={decay!r}: expected a float in [0, 1)")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        live = net.state_dict()  # references to the network's own tensors: build after .to(device)
        self.shadow = {k: v.detach().clone() for k, v in live.items()}
        floats = [k for k, v in live.items() if v.is_floating_point()]
        self._float_live = [live[k] for k in floats]
        self._float_shadow = [self.shadow[k] for k in floats]
        self._other = [(self.shadow[k], v) for k, v in live.items() if not v.is_floating_point()]

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self):
        """shadow <- decay shadow + (1 - decay) live, in one fused call over every tensor."""
        torch._foreach_lerp_(self._float_shadow, self._float_live, 1.0 - self.current_decay())
        for shadow, live in self._other:
            shadow.copy_(live)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state: dict, num_updates: int):
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the network: keys {sorted(missing)[:5]} differ")
        for name, value in state.items():
            self.shadow[name].copy_(value)
        self.num_updates = num_updates

    def copy_to(self, net: torch.nn.Module):
        """Load the averaged weights into `net` (for sampling or export)."""
        net.load_state_dict(self.shadow)

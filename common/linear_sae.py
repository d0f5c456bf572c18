"""sae-lens's standard SAE without the ReLU (f = z): what sae_training's `activation: none` trains.

Registered with sae-lens as architecture "linear" on import, so that `SAE.load_from_disk` reads
the project's own linear SAEs wherever SAEs are loaded (common/saes.py imports it there).
"""

import torch
from sae_lens import StandardSAE, StandardSAEConfig, register_sae_class


class LinearSAEConfig(StandardSAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return "linear"


class LinearSAE(StandardSAE):
    def get_activation_fn(self):
        return torch.nn.Identity()


register_sae_class("linear", LinearSAE, LinearSAEConfig)

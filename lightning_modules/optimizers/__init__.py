"""Optimizers that no well-kept package provides as the paper used them.

- ``AdamWScale`` (``adamw_scale.py``): nanoT5's AdamW with RMS learning-rate scaling (the paper's T5).
- ``Lion`` (``lion.py``; Chen et al. 2023, arXiv:2302.06675; No Train No Gain section 6): sign of an
  interpolated momentum.
- ``SophiaG`` (``sophia.py``; Liu et al. 2023, arXiv:2305.14342; No Train No Gain section 6): momentum
  clipped by a Gauss-Newton-Bartlett estimate of the Hessian diagonal.
- ``MuonWithAdamW`` (``muon.py``): ``torch.optim.Muon`` (Jordan et al. 2024; torch 2.9 and later) on the
  hidden weight matrices, AdamW on everything else, as one optimizer object.

Lion and Sophia take ``rms_scale=True`` for the T5 variant the paper ran (the learning rate of each
tensor multiplied by ``max(1e-3, RMS(theta))``, as ``AdamWScale``; weight decay uses the unscaled rate).
``common.py`` holds what they share: ``step(closure)``, the per-tensor loop, the fusability checks and
the RMS scale. Configs name the classes by these paths (``lightning_modules.optimizers.Lion``).
"""

from lightning_modules.optimizers.adamw_scale import AdamWScale
from lightning_modules.optimizers.common import cpu_fused_adamw_fits, fusable, rms_scale, rms_scaled_lr
from lightning_modules.optimizers.lion import Lion
from lightning_modules.optimizers.muon import MuonWithAdamW
from lightning_modules.optimizers.sophia import SophiaG

__all__ = [
    "AdamWScale",
    "Lion",
    "MuonWithAdamW",
    "SophiaG",
    "cpu_fused_adamw_fits",
    "fusable",
    "rms_scale",
    "rms_scaled_lr",
]

"""adapt-bnb test configuration."""

from __future__ import annotations

import warnings

import torch

# Tiny models: one thread is as fast and keeps results independent of the machine.
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")

"""adapt-torchao test configuration."""

from __future__ import annotations

import torch

# Tiny models: one thread is as fast and keeps results independent of the machine.
torch.set_num_threads(1)

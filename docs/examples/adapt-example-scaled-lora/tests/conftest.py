"""adapt-example-scaled-lora test configuration."""

from __future__ import annotations

import torch

# The models here are tiny: one intra-op thread is as fast, keeps results independent of the
# machine's core count, and leaves the other CPUs to other test runs.
torch.set_num_threads(1)

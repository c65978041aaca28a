"""adapt-vera test configuration."""

from __future__ import annotations

import torch

# The models here are tiny: one intra-op thread is as fast, keeps results independent of the
# machine's core count, and avoids OpenMP spin-waiting when other test runs share the CPUs.
torch.set_num_threads(1)

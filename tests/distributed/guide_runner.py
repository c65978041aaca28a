"""Runs scripts of docs/guides/distributed.md in turn in one torchrun process (each rank runs
this), each in its own folder: ``guide_runner.py DIR NAME.py[:ARG] ...``.

A launch costs ~15 s on 2 cores, so the scripts share one, and one process group (each
script's ``init_process_group`` after the first and its ``destroy_process_group`` do nothing). DeepSpeed's shared-memory CPU
all-reduce, a C++ op it compiles on first use (minutes), is turned off: DeepSpeed then uses
torch.distributed's gloo, with the same numbers.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path


def main() -> None:
    root, scripts = Path(sys.argv[1]), sys.argv[2:]
    try:
        import deepspeed

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except ImportError:
        pass
    import torch.distributed as dist

    init, destroy = dist.init_process_group, dist.destroy_process_group

    def init_once(*args: object, **kwargs: object) -> None:
        # one process group for all the scripts: a second one after destroy_process_group
        # hangs under torchrun (its rendezvous store is set up once per launch)
        if not dist.is_initialized():
            init(*args, **kwargs)  # type: ignore[arg-type]

    dist.init_process_group = init_once  # type: ignore[assignment]
    dist.destroy_process_group = lambda *a, **k: None  # type: ignore[assignment]
    for spec in scripts:
        name, _, arg = spec.partition(":")
        folder = root / f"{Path(name).stem}-{arg or 'default'}"
        folder.mkdir(parents=True, exist_ok=True)
        os.chdir(folder)
        sys.argv = [name, *([arg] if arg else [])]
        print(f"=== {spec} (rank {os.environ.get('RANK')})", flush=True)
        runpy.run_path(str(root / "scripts" / name), run_name="__main__")
        dist.barrier()
    if dist.is_initialized():
        destroy()


if __name__ == "__main__":
    main()

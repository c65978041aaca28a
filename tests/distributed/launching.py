"""One torchrun launch of a worker script on 2 CPU ranks, with a timeout (so a hang fails),
shared by the distributed tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

WORLD_SIZE = 2


@dataclass
class Launch:
    out: Path
    returncode: int
    output: str  # stdout and stderr
    seconds: float
    stdout: str = ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun(script: Path, args: list[str], out: Path, timeout: float) -> Launch:
    """``python -m torch.distributed.run ... script *args`` on localhost (one thread per rank,
    offline, DeepSpeed on the CPU), in ``script``'s folder; the free port is retried when it
    was taken between probing and binding."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    start = time.perf_counter()
    for _ in range(3):
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "1", "--nproc_per_node", str(WORLD_SIZE),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            str(script), *args,
        ]  # fmt: skip
        # its own session, so that a timeout kills the workers too, not torchrun alone
        proc = subprocess.Popen(
            cmd, cwd=script.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True,
        )  # fmt: skip
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            output = f"{stdout}\n{stderr}"
            return Launch(out, -1, f"timed out after {timeout} s\n{output}", timeout, stdout)
        output = stdout + stderr
        if proc.returncode == 0 or "address already in use" not in output.lower():
            break
    return Launch(out, int(proc.returncode), output, time.perf_counter() - start, stdout)

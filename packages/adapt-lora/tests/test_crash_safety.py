"""A save killed at any point leaves the old adapter or the new one, never a mix or a
truncated file: a subprocess saves adapters of two different shapes in a loop and is killed
with SIGKILL at random moments; after every kill the folder must load as one whole save."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from adapt.core import AdaptedModel
from adapt.core.checkpoint import JOURNAL_NAME, recover

WRITER = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from adapt.core import adapt
    from adapt.lora import LoraConfig

    folder = sys.argv[1]
    models = {}
    for r in (4, 16):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512))
        models[r] = adapt(net, LoraConfig(r=r, target_modules=["0", "1"]))
    i = 0
    print("ready", flush=True)
    while True:
        i += 1
        r = 4 if i % 2 else 16
        model = models[r]
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.fill_(float(i))  # every tensor of save i holds the value i
        model.save_pretrained(folder)
    """
)


def fresh_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512))


def check_whole(folder: Path) -> int:
    """Load the adapter; return the save number its tensors carry (all the same)."""
    from adapt.core.checkpoint import read_config

    model = AdaptedModel.from_pretrained(fresh_net(), folder)  # shapes must match the config
    values = {float(v) for n, p in model.named_parameters() if "lora_" in n for v in p.unique()}
    assert len(values) == 1, f"tensors from different saves: {sorted(values)}"
    save = int(values.pop())
    assert read_config(folder)["r"] == (4 if save % 2 else 16), "config from another save"
    return save


CRASHER = textwrap.dedent(
    """
    import os, sys, torch
    from pathlib import Path
    from torch import nn
    from adapt.core import adapt
    from adapt.lora import LoraConfig

    folder, crash_at = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512))
    model = adapt(net, LoraConfig(r=16, target_modules=["0", "1"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.fill_(2.0)
    events = 0

    def crash_point(real):
        def wrapped(*args, **kwargs):
            global events
            events += 1
            if events == crash_at:
                os._exit(137)  # the process dies here, mid-save
            return real(*args, **kwargs)
        return wrapped

    os.replace = crash_point(os.replace)
    os.fsync = crash_point(os.fsync)
    os.unlink = crash_point(os.unlink)
    Path.unlink = crash_point(Path.unlink)
    model.save_pretrained(folder)
    print(events)
    """
)


@pytest.mark.crash
def test_a_crash_at_every_step_of_a_save(tmp_path: Path) -> None:
    """Die at each file-system step of a save in turn (fsync, rename, unlink): the folder
    always loads as the old adapter or the new one."""
    import shutil

    from adapt.core import adapt
    from adapt.lora import LoraConfig

    old = tmp_path / "old"
    model = adapt(fresh_net(), LoraConfig(r=4, target_modules=["0", "1"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.fill_(1.0)
    model.save_pretrained(old)
    script = tmp_path / "crasher.py"
    script.write_text(CRASHER)
    outcomes = []
    for crash_at in range(1, 40):
        folder = tmp_path / f"run{crash_at}"
        shutil.copytree(old, folder)
        proc = subprocess.run(
            [sys.executable, str(script), str(folder), str(crash_at)],
            capture_output=True, text=True,
        )  # fmt: skip
        outcomes.append(check_whole(folder))
        if proc.returncode == 0:  # the save finished before reaching this step
            assert outcomes[-1] == 2
            break
        assert proc.returncode == 137, proc.stderr
    else:
        raise AssertionError("the save never completed")
    assert 1 in outcomes and 2 in outcomes
    print(f"crashed at each of {len(outcomes) - 1} steps of a save: loaded {outcomes}")


@pytest.mark.crash
@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_killed_saves_leave_a_whole_adapter(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(0)
    seen: list[int] = []
    for _ in range(8):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(folder)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not (folder / "adapter_config.json").exists() and not (folder / JOURNAL_NAME).exists():
            continue  # killed before the first save finished: nothing was there to keep
        seen.append(check_whole(folder))
        recover(folder)  # what the next save does first
        assert JOURNAL_NAME not in os.listdir(folder)
        assert not [p for p in os.listdir(folder) if p.endswith(".tmp")]
        seen[-1] = check_whole(folder)
    assert len(seen) >= 5, seen
    print(f"killed 8 writers mid-loop; every folder loaded whole (saves {seen})")


def test_an_interrupted_commit_is_completed_by_readers(tmp_path: Path) -> None:
    """A save cut off between its two renames: the reader sees the new adapter whole."""
    from adapt.core.checkpoint import CONFIG_NAME, WEIGHTS_NAME
    from adapt.lora import LoraConfig

    def saved(r: int, value: float, where: Path) -> None:
        from adapt.core import adapt

        model = adapt(fresh_net(), LoraConfig(r=r, target_modules=["0", "1"]))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.fill_(value)
        model.save_pretrained(where)

    folder = tmp_path / "a"
    saved(4, 1.0, folder)  # the old adapter
    saved(16, 2.0, tmp_path / "b")  # the new one, written elsewhere
    # simulate: both temp files written, commit record written, only the weights renamed
    os.replace(tmp_path / "b" / WEIGHTS_NAME, folder / WEIGHTS_NAME)
    (tmp_path / "b" / CONFIG_NAME).rename(folder / ".adapter_config.json.x.tmp")
    (folder / JOURNAL_NAME).write_text(
        json.dumps(
            {
                "renames": [
                    [".adapter_model.safetensors.y.tmp", WEIGHTS_NAME],
                    [".adapter_config.json.x.tmp", CONFIG_NAME],
                ]
            }
        )
    )
    assert check_whole(folder) == 2
    os.chmod(folder, 0o555)  # readers do not need to write
    try:
        assert check_whole(folder) == 2
    finally:
        os.chmod(folder, 0o755)
    recover(folder)
    assert json.loads((folder / CONFIG_NAME).read_text())["r"] == 16

"""torch.compile: adapted forwards add no graph break, adapter switches recompile at most once,
mixed batches run correctly (eagerly, at one documented place), per-call routing is per thread,
and compiled training steps (inductor, CPU) equal eager ones."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
import torch._dynamo as dynamo
from lora_testutils import ids, tiny_llama
from torch._dynamo.testing import CompileCounter

from adapt.core import adapt
from adapt.lora import LoraConfig

pytestmark = pytest.mark.compile

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _breaks(model: Any, grad: bool) -> int:
    dynamo.reset()
    with torch.set_grad_enabled(grad):
        explained = dynamo.explain(model)(input_ids=ids(), use_cache=False)
    return int(explained.graph_break_count)


def _two_adapters(targets: list[str]) -> Any:
    model = adapt(tiny_llama(), LoraConfig(r=4, target_modules=targets))
    model.add_adapter("b", LoraConfig(r=4, target_modules=targets))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    return model


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ALL_LINEAR], ids=["qv", "all_linear"])
def test_no_graph_break_beyond_the_base_models(targets: list[str], grad: bool) -> None:
    base = _breaks(tiny_llama(), grad)
    adapted = _breaks(adapt(tiny_llama(), LoraConfig(r=4, target_modules=targets)), grad)
    assert adapted == base, f"adapted forward: {adapted} graph breaks, base model: {base}"
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        assert adapted == 0


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ALL_LINEAR], ids=["qv", "all_linear"])
def test_switching_adapters_recompiles_at_most_once(targets: list[str]) -> None:
    dynamo.reset()
    model = _two_adapters(targets)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = ids()
    eager: dict[str, torch.Tensor] = {}

    def run() -> torch.Tensor:
        with torch.no_grad():
            out: torch.Tensor = compiled(input_ids=x, use_cache=False).logits
        return out

    run()
    steps = [
        ("set_adapter('b')", lambda: model.set_adapter("b")),
        ("set_adapter('default')", lambda: model.set_adapter("default")),
        ("disable_adapter_layers()", model.disable_adapter_layers),
        ("enable_adapter_layers()", model.enable_adapter_layers),
    ]
    for label, switch in steps:
        before = counter.frame_count
        switch()
        got = run()
        assert counter.frame_count - before <= 1, (
            f"{label}: {counter.frame_count - before} compiles"
        )
        with torch.no_grad():
            eager[label] = model(input_ids=x, use_cache=False).logits
        torch.testing.assert_close(got, eager[label], rtol=1e-5, atol=1e-5)
    before = counter.frame_count
    with model.disable_adapter():
        run()
    assert counter.frame_count - before <= 1
    assert not torch.allclose(eager["set_adapter('b')"], eager["set_adapter('default')"])
    assert counter.frame_count <= 4  # far from dynamo's recompile limit (8)


def test_mixed_batch_under_compile_is_correct() -> None:
    dynamo.reset()
    model = _two_adapters(["q_proj", "v_proj"])
    x = ids(batch=3)
    names = ["default", "b", "__base__"]
    with torch.no_grad():
        want = model(input_ids=x, adapter_names=names, use_cache=False).logits
        got = torch.compile(model)(input_ids=x, adapter_names=names, use_cache=False).logits
        singles = []
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    singles.append(model(input_ids=x[i : i + 1], use_cache=False).logits)
            else:
                model.set_adapter(name)
                singles.append(model(input_ids=x[i : i + 1], use_cache=False).logits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(want, torch.cat(singles), rtol=1e-5, atol=1e-5)


def test_per_call_routing_is_per_thread() -> None:
    model = _two_adapters(["q_proj", "v_proj"])
    x = ids(batch=2)
    plans = {"t1": ["default", "b"], "t2": ["b", "__base__"]}
    with torch.no_grad():
        want = {
            k: model(input_ids=x, adapter_names=v, use_cache=False).logits for k, v in plans.items()
        }
    got: dict[str, list[torch.Tensor]] = {k: [] for k in plans}
    barrier = threading.Barrier(2)

    def worker(key: str) -> None:
        barrier.wait()
        for _ in range(20):
            with torch.no_grad():
                got[key].append(
                    model(input_ids=x, adapter_names=plans[key], use_cache=False).logits
                )

    threads = [threading.Thread(target=worker, args=(k,)) for k in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key, outs in got.items():
        assert len(outs) == 20
        for out in outs:
            assert torch.equal(out, want[key]), key
    # and a plain forward in between sees no routing
    with torch.no_grad():
        plain = model(input_ids=x, use_cache=False).logits
    model.set_adapter("default")
    with torch.no_grad():
        assert torch.equal(plain, model(input_ids=x, use_cache=False).logits)


def test_compiled_training_steps_equal_eager() -> None:
    def train(compiled: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
        dynamo.reset()
        base = tiny_llama()
        base.model.layers = base.model.layers[:1]  # one decoder layer: inductor compiles less
        model = adapt(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.5)
        step_model = torch.compile(model, backend="inductor") if compiled else model
        x = ids(batch=2, length=8)
        losses = []
        for _ in range(2):
            loss = step_model(input_ids=x, labels=x, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
        state = {k: v.detach().clone() for k, v in model.adapter_state_dict("default").items()}
        return losses, state

    eager_losses, eager_state = train(False)
    compiled_losses, compiled_state = train(True)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-6)
    assert eager_losses[1] != eager_losses[0]
    for key, value in eager_state.items():
        torch.testing.assert_close(compiled_state[key], value, rtol=1e-4, atol=1e-6)

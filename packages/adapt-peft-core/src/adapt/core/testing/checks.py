"""The checks of :func:`~adapt.core.testing.check_layer`, one function each, over the
:class:`Subject` they share. Each raises (an ``AssertionError`` saying what is wrong) or
returns; the names below are what the report shows."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable

import torch
from torch import nn

from ..config import AdapterConfig
from ..layer import AdapterLayer
from ..model import AdaptedModel
from ..routing import BASE
from .asserts import (
    assert_merge_roundtrip,
    assert_mixed_batch_matches,
    check_close,
    forward_no_grad,
    output_tensor,
)
from .models import SingleTargetModel, randomise_adapter


def batch_size(x: torch.Tensor | tuple[torch.Tensor, ...]) -> int:
    """The number of samples of an input (a tuple of inputs: its first one's)."""
    return int((x[0] if isinstance(x, tuple) else x).shape[0])


BUILD = "the registry picks the layer class for the base module"
IDENTITY = "a new adapter starts as the identity"
TRAINABLE = "only the adapter's tensors are trainable, and they get gradients"
NAMES = "state-dict names follow the checkpoint convention"
DELTA_SHAPE = "delta_weight has the base weight's shape"
MERGED_SHAPE = "the merged weight has the base weight's shape"  # a layer with merge hooks
FORWARD_ONE = "forward with one adapter changes the output"
MERGE = "merged output equals unmerged, merge→unmerge restores the weight"
SEVERAL = "forward with several adapters (and their merge)"
DISABLED = "disable_adapter() gives the base output"
MIXED = "a mixed batch routes each sample to its adapter"
MIXED_SKIPPED = "a mixed batch"
ROUND_TRIP = "save_pretrained → from_pretrained gives the same output"
DELETE = "delete_adapter removes the adapter's tensors"

#: where the base module sits in the model under test, and its state-dict prefix
_PREFIX = "base_model.model.target."


@dataclasses.dataclass
class Subject:
    """What the checks share: the adapted one-module model, its layer under test, the input
    and the base module's output on it, and the settings of :func:`check_layer`."""

    model: AdaptedModel
    layer: AdapterLayer
    x: torch.Tensor | tuple[torch.Tensor, ...]
    base_out: torch.Tensor
    other_cfg: AdapterConfig  # the second adapter's config (for inference)
    make_base: Callable[[], nn.Module]
    atol: float
    tmp_dir: str | None
    #: relative tolerance for lossy (quantised) bases, 0 otherwise (see check_layer)
    rtol: float = 0.0


def build(
    host: SingleTargetModel, cfg: AdapterConfig, layer_cls: type[AdapterLayer]
) -> tuple[AdaptedModel, AdapterLayer]:
    """Adapt ``host`` (check :data:`BUILD`); the model, in eval mode, and its layer."""
    model = AdaptedModel(host, cfg, "default", is_trainable=True)
    model.eval()
    layer = model.model.target
    if type(layer) is not layer_cls:
        raise AssertionError(
            f"the registry wrapped the base module in {type(layer).__name__}, not "
            f"{layer_cls.__name__} (check `method` and `base_types`)"
        )
    return model, layer


def identity(s: Subject) -> None:
    # lossy bases: bitsandbytes' CPU 4-bit layer repacks its codes at the first inference
    # forward, changing its weight slightly, and an adapter that reads W (DoRA's norms) sees that
    check_close(
        forward_no_grad(s.model, s.x), s.base_out, s.atol, "output of a new adapter vs base",
        s.rtol,
    )  # fmt: skip


def trainable(s: Subject) -> None:
    own = {id(t) for t in s.layer.adapter_tensors("default").values()}
    params = [(n, p) for n, p in s.model.named_parameters() if p.requires_grad]
    if not params:
        raise AssertionError("no parameter is trainable after adapt()")
    strangers = [n for n, p in params if id(p) not in own]
    if strangers:
        raise AssertionError(f"trainable parameters outside the adapter: {strangers}")
    s.model.zero_grad()
    out = s.model(*s.x) if isinstance(s.x, tuple) else s.model(s.x)
    loss = output_tensor(out).float().pow(2).mean()
    torch.autograd.backward(loss)
    missing = [n for n, p in params if p.grad is None]
    if missing:
        raise AssertionError(f"adapter parameters without a gradient: {missing}")
    s.model.zero_grad()


def names(s: Subject) -> None:
    keys = list(s.model.adapter_state_dict("default", include_shared=False))
    if not keys:
        raise AssertionError("adapter_state_dict() is empty")
    for key in keys:
        if not key.startswith(_PREFIX):
            raise AssertionError(f"{key!r} does not start with {_PREFIX!r}")
        suffix = key.removeprefix(_PREFIX)
        if suffix.split(".")[0] not in s.layer.adapter_layer_names:
            raise AssertionError(
                f"{key!r}: {suffix.split('.')[0]!r} is not in the class's "
                f"adapter_layer_names {s.layer.adapter_layer_names}"
            )
        if ".default" in f".{suffix}":
            raise AssertionError(f"{key!r} contains the adapter name; PEFT keys do not")


def delta_shape(s: Subject) -> None:
    weight = s.layer.backend.get_weight(s.layer.base_layer)
    merged = s.layer.merged_weight(["default"])  # W + ΔW, or the layer's own merge_weight
    if tuple(merged.shape) != tuple(weight.shape):
        raise AssertionError(
            f"merging gives a weight of shape {tuple(merged.shape)}, the base weight (canonical "
            f"layout) is {tuple(weight.shape)} (check delta_weight or merge_weight)"
        )


def forward_one(s: Subject) -> None:
    out = forward_no_grad(s.model, s.x)
    diff = (out - s.base_out).abs().max().item()
    if not diff > s.atol:
        raise AssertionError("a randomised adapter does not change the output")


def merge(s: Subject) -> None:
    assert_merge_roundtrip(s.model, lambda: s.x, s.atol, rtol=s.rtol)


def several(s: Subject) -> None:
    # a second adapter for inference (methods such as AdaLoRA train one at a time)
    s.model.add_adapter("other", s.other_cfg)
    randomise_adapter(s.layer, "other", seed=2)
    s.model.set_adapter("default")
    one = forward_no_grad(s.model, s.x)
    s.model.set_adapter(["default", "other"])
    both = forward_no_grad(s.model, s.x)
    if not (both - one).abs().max().item() > s.atol:
        raise AssertionError("a second active adapter does not change the output")
    assert_merge_roundtrip(s.model, lambda: s.x, s.atol, rtol=s.rtol)
    s.model.set_adapter("default")


def disabled(s: Subject) -> None:
    with s.model.disable_adapter():
        check_close(
            forward_no_grad(s.model, s.x),
            s.base_out,
            s.atol,
            "output inside disable_adapter()",
            s.rtol,
        )
    if not (forward_no_grad(s.model, s.x) - s.base_out).abs().max().item() > s.atol:
        raise AssertionError("the adapter stays off after disable_adapter() exits")


def mixed(s: Subject) -> None:
    """``"default"``, ``"other"`` and the base model in turn over the samples of the input."""
    n = batch_size(s.x)
    routing = ["default", "other", BASE] * (n // 3 + 1)
    assert_mixed_batch_matches(s.model, s.x, routing[:n], s.atol, s.rtol)


def round_trip(s: Subject) -> None:
    s.model.set_adapter("default")
    want = forward_no_grad(s.model, s.x)
    with tempfile.TemporaryDirectory(dir=s.tmp_dir) as folder:
        s.model.save_pretrained(folder, selected_adapters=["default"])
        loaded = AdaptedModel.from_pretrained(SingleTargetModel(s.make_base()), folder).eval()
        check_close(forward_no_grad(loaded, s.x), want, s.atol, "output after save/load", s.rtol)


def delete(s: Subject) -> None:
    if "other" not in s.model.peft_config:
        s.model.add_adapter("other", s.other_cfg)
    s.model.delete_adapter("other")
    if "other" in s.layer.adapter_names:
        raise AssertionError("the layer still lists 'other' after delete_adapter")
    left = [k for k, _ in s.layer.named_parameters() if ".other" in f".{k}" or k.endswith("other")]
    if left:
        raise AssertionError(f"tensors of the deleted adapter remain: {left}")

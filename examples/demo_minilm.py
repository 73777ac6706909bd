"""Convert the real pretrained all-MiniLM-L6-v2, grow it, check that its outputs did not change, print the summary.

    python examples/demo_minilm.py [--dendrites 2] [--targets all-linear]
"""

import argparse

import torch
from transformers import AutoModel, AutoTokenizer

from hf_dendrites import DendriteConfig, get_dendritic_model
from hf_dendrites.example_data import minilm_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dendrites", type=int, default=2, help="dendrites per target layer")
    parser.add_argument("--targets", default=None, help="'all-linear', a regex, or omit for the BERT defaults")
    args = parser.parse_args()

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tokenizer(["Dendrites add capacity to each neuron.", "The film was a delight."], padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).last_hidden_state

    dm = get_dendritic_model(model, DendriteConfig(target_modules=args.targets, dendrite_seed=0))
    dm.add_dendrites(args.dendrites)
    with torch.no_grad():
        after = dm(**batch).last_hidden_state
    print(dm.dendrite_summary())
    print(f"outputs identical after adding {args.dendrites} dendrites per layer: {torch.equal(before, after)}")


if __name__ == "__main__":
    main()

"""A tiny Llama with a word-level tokenizer, saved as a model folder, and small SFT / DPO data sets, for the TRL
trainer tests (tests/test_trl.py, tests/scripts/ddp_sft.py). Built offline, in seconds."""

from __future__ import annotations

import os
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

WORDS = [f"w{i}" for i in range(40)]
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]


def tiny_llama(seed: int = 0, vocab_size: int = len(SPECIAL) + len(WORDS)) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    return transformers.LlamaForCausalLM(config)


def tiny_llama_folder(path: str | os.PathLike, seed: int = 0) -> str:
    """A tiny Llama and its tokenizer saved in `path`: a model folder TRL loads from its path, as from a Hub id."""
    vocab = {w: i for i, w in enumerate([*SPECIAL, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(path)
    tiny_llama(seed, len(vocab)).save_pretrained(path)
    return os.fspath(path)


def sft_data(n: int, seed: int):
    """Runs of 8 consecutive words from a random start: learnable next-token prediction."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(WORDS) - 8, (n,), generator=g).tolist()
    return Dataset.from_list([{"text": " ".join(WORDS[s : s + 8])} for s in starts])


def dpo_data(n: int, seed: int):
    """Prompts of 4 consecutive words; the chosen completion continues the run, the rejected one goes backwards."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(4, len(WORDS) - 8, (n,), generator=g).tolist()
    return Dataset.from_list(
        [
            {"prompt": " ".join(WORDS[s : s + 4]), "chosen": " ".join(WORDS[s + 4 : s + 7]),
             "rejected": " ".join(WORDS[s - 3 : s][::-1])}
            for s in starts
        ]
    )


def trl_args(kind: str, output_dir: str, **overrides: Any):
    """Fast CPU arguments for DendriticSFTConfig / DendriticDPOConfig: evaluation every 4 steps, no reporting."""
    from hf_dendrites import DendriticDPOConfig, DendriticSFTConfig

    kwargs: dict[str, Any] = {
        "output_dir": output_dir, "eval_strategy": "steps", "eval_steps": 4, "save_strategy": "no", "logging_steps": 4,
        "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16, "learning_rate": 3e-3,
        "lr_scheduler_type": "constant", "num_train_epochs": 100, "dendrite_patience": [2],
        "dendrite_improvement_threshold": [0.01], "max_dendrite_cycles": 1, "max_dendrite_tries": 2, "report_to": [],
        "disable_tqdm": True, "use_cpu": True, "bf16": False, "seed": 0, "dataloader_num_workers": 0,
        "max_length": 16,
    }
    kwargs.update(overrides)
    return (DendriticSFTConfig if kind == "sft" else DendriticDPOConfig)(**kwargs)

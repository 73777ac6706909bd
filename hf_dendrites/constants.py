"""Names and tables shared by the whole library (file names, format versions, default targets).

The standard transformers file names (`config.json`, `model.safetensors`, ...) are not repeated here: the code uses
`transformers.utils.CONFIG_NAME`, `SAFE_WEIGHTS_NAME` and `SAFE_WEIGHTS_INDEX_NAME`.
"""

# Files written next to the standard transformers files by `DendriticModel.save_pretrained`.
DENDRITE_CONFIG_NAME = "dendrite_config.json"
DENDRITE_WEIGHTS_NAME = "dendrite_model.safetensors"
# In an adapter-only checkpoint (no base weight files): the base model's entries that training changes (trainable
# parameters such as a task head or adapters, and the persistent buffers), under their transformers names.
DENDRITE_TRAINED_BASE_NAME = "dendrite_base_trained.safetensors"

# Written by `DendriticTrainer`: into every Trainer checkpoint (schedule state; the weights the schedule may restore)
# and, at the end of training, into `output_dir` (one CSV row per evaluation; the plot of the score over training).
DENDRITE_SCHEDULE_NAME = "dendrite_schedule.json"
DENDRITE_SCHEDULE_WEIGHTS_NAME = "dendrite_schedule_weights.safetensors"
DENDRITE_EVAL_CSV_NAME = "dendrite_evaluations.csv"
DENDRITE_CURVE_NAME = "dendrite_training_curve.png"

# Written by `DendriticModel.save_pretrained` beside the weights: the model card, rendered from the template
# `model_cards/dendritic_model_card.md` (shipped inside the package as `hf_dendrites/model_cards/`), and the training
# curve it shows when the model comes from `DendriticTrainer`.
MODEL_CARD_NAME = "README.md"
MODEL_CARD_TEMPLATE_NAME = "dendritic_model_card.md"
TRAINING_CURVE_NAME = "training_curve.png"
LIBRARY_NAME = "hf_dendrites"
DEFAULT_MODEL_CARD_TAGS = ("hf_dendrites", "dendrites", "artificial-dendrites")

# Base weight files that transformers' `save_pretrained` writes (single file, shards, index): a new save replaces
# them, and a push deletes the remote ones the new save does not have (so a repo never mixes two saves' shards).
BASE_WEIGHT_FILE_PATTERN = r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?"
BASE_WEIGHT_FILE_GLOBS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")

# Version of the on-disk layout of `dendrite_config.json` / `dendrite_model.safetensors`.
# Bump it when a checkpoint written by a newer library could not be read correctly by an older one.
# 2: the base weights hold the plain-load notice tensor (`PLAIN_LOAD_NOTICE_KEY`); format 1 folders still load.
CHECKPOINT_FORMAT_VERSION = 2
# 3: an adapter-only checkpoint: no base weight files but `DENDRITE_TRAINED_BASE_NAME`, and in `dendrite_config.json`
# a reference to the base model and a fingerprint of its frozen weights. Written for adapter-only checkpoints only
# (full checkpoints stay format 2, which older releases read); this library reads formats up to this one.
ADAPTER_ONLY_FORMAT_VERSION = 3

# A one-element tensor that `DendriticModel.save_pretrained` adds to the base weights (`model.safetensors` or a
# shard) under this name. No transformers model has such a parameter, so a plain `AutoModelFor*.from_pretrained`
# of a dendritic folder or Hub repo lists it as UNEXPECTED in transformers' load report, which is logged at WARNING
# (shown by default): the key's name is the notice that the dendrites were not loaded, and how to load them. Every
# base weight is still loaded. hf_dendrites' own loaders expect and skip it (docs/checkpoints.md).
PLAIN_LOAD_NOTICE_KEY = "DENDRITES_NOT_LOADED.load_with.hf_dendrites.DendriticModel.from_pretrained"

# Per-architecture default targets (attention projections and MLP layers), keyed by `config.model_type`.
# Entries follow the list semantics of `DendriteConfig.target_modules`: exact name or dotted suffix.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "xlm-roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "electra": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    # transformers 5 names ViT layers q_proj/k_proj/v_proj/o_proj/fc1/fc2 (4.x: query/key/value/dense).
    "vit": ["q_proj", "k_proj", "v_proj", "o_proj", "mlp.fc1", "mlp.fc2", "query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "gpt2": ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
    "gpt_neox": ["query_key_value", "attention.dense", "dense_h_to_4h", "dense_4h_to_h"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "t5": ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    # Gemma 3 with its vision tower: the same names also select the tower's q/k/v projections.
    "gemma3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    # Mixture-of-experts models (docs/moe.md): `experts` is the fused experts module (every expert gets dendrites on
    # its gate_up_proj and down_proj); gate_proj / up_proj / down_proj are shared experts' and dense layers' Linears.
    # Routers and gates are never targets.
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj", "experts"],
    "qwen2_moe": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "experts"],
    "qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj", "experts"],
    "qwen3_next": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "experts"],
    "gpt_oss": ["q_proj", "k_proj", "v_proj", "o_proj", "experts"],
    "olmoe": ["q_proj", "k_proj", "v_proj", "o_proj", "experts"],
    "phimoe": ["q_proj", "k_proj", "v_proj", "o_proj", "experts"],
    "granitemoe": ["q_proj", "k_proj", "v_proj", "o_proj", "experts"],
    "jamba": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "experts"],
    "deepseek_v2": ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "experts"],
    "deepseek_v3": ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "experts"],
}

# Module names (any component of the dotted path) that hold task heads. "all-linear" never targets them:
# they are freshly initialised by `AutoModelFor*` classes and are not part of the pretrained network.
HEAD_MODULE_NAMES = frozenset(
    {
        "lm_head",
        "classifier",
        "score",
        "qa_outputs",
        "cls",
        "pre_classifier",
        "vocab_projector",
        "vocab_transform",
        "head",
        "heads",
        "seq_relationship",
    }
)

ACTIVATIONS = ("sigmoid", "tanh", "relu", "gelu", "silu")
LEARNING_RULES = ("gd", "correlation")

# PEFT adapters in a checkpoint of a PEFT model with dendrites (hf_dendrites/peft_support.py, docs/peft.md): PEFT's own
# file names, in a sub-folder so that transformers' from_pretrained of the folder never loads them by itself.
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_ADAPTER_DIR = "peft_adapter"
# The adapter files a checkpoint's manifest may list ("default" in PEFT_ADAPTER_DIR, others in a sub-folder).
PEFT_ADAPTER_FILE_PATTERN = rf"{PEFT_ADAPTER_DIR}/([A-Za-z0-9_.-]+/)?({ADAPTER_CONFIG_NAME}|{ADAPTER_WEIGHTS_NAME})"

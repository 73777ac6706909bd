"""Models for `compare`: loading or random init, width scaling, layer truncation, the DSN shape, and the
models of the `wider` and `lora` arms with parameter counts matched to the dendrites."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..config import DendriteConfig
from ..model import get_dendritic_model
from .settings import CompareSettings

logger = logging.getLogger(__name__)

# Config attribute names of the MLP width, by architecture family (the first one a config has is used).
INTERMEDIATE_KEYS = ("intermediate_size", "n_inner", "d_ff", "ffn_dim", "encoder_ffn_dim")


class MeanPooledClassifier(nn.Module):
    """The DSN shape (`--layers 0`): a transformers base model cut to its embeddings, and a linear head on the
    mean of its token (or patch) states, masked by the attention mask. With `--pooling mean` the same head sits on
    the mean of the last hidden states of a base model with layers.

    Without encoder layers a [CLS] / pooler head sees the same vector for every input (the [CLS] embedding
    plus position 0), so the head must pool over positions. The head is `classifier`, the default (and usual)
    dendrite target of this shape. Works with any `AutoModel` base returning `last_hidden_state`.
    """

    def __init__(self, base: nn.Module, num_labels: int):
        super().__init__()
        self.base = base
        if getattr(base, "pooler", None) is not None:
            base.pooler = None  # the pooler reads [CLS] only; unused here, so not counted or trained
        self.config = base.config
        self.num_labels = num_labels
        self.classifier = nn.Linear(base.config.hidden_size, num_labels)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, pixel_values=None, labels=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        if pixel_values is not None:
            hidden = self.base(pixel_values=pixel_values).last_hidden_state
            pooled = hidden.mean(1)
        else:
            kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
            hidden = self.base(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
            mask = torch.ones(hidden.shape[:2], device=hidden.device) if attention_mask is None else attention_mask
            mask = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        logits = self.classifier(pooled)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


# ---------------------------------------------------------------------------------------------- config
def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


def scale_width(config, scale: float) -> None:
    """Multiply the hidden and MLP sizes of `config` by `scale` (in place), keeping head counts valid.

    The new hidden size is round(hidden * scale). Where the head count does not divide it, the head count is
    lowered to the largest count below it that does (and key/value heads to a divisor of that), so every head
    keeps an integer size. A config that states `head_dim` gets hidden // heads.
    """
    if scale == 1.0:
        return
    hidden = getattr(config, "hidden_size", None)
    if hidden is None:
        raise ValueError(f"--width-scale: {type(config).__name__} has no hidden_size to scale.")
    new_hidden = max(1, int(round(hidden * scale)))
    config.hidden_size = new_hidden
    heads = getattr(config, "num_attention_heads", None)
    if heads:
        new_heads = _largest_divisor_at_most(new_hidden, heads)
        if new_heads != heads:
            logger.info("--width-scale: hidden size %d -> %d; attention heads %d -> %d", hidden, new_hidden, heads, new_heads)
        config.num_attention_heads = new_heads
        kv = getattr(config, "num_key_value_heads", None)
        if kv:
            config.num_key_value_heads = _largest_divisor_at_most(new_heads, kv)
        if getattr(config, "head_dim", None):
            config.head_dim = new_hidden // new_heads
    for key in INTERMEDIATE_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int):
            setattr(config, key, max(1, int(round(value * scale))))
            break
    else:
        if hasattr(config, "n_inner"):  # GPT-2: None means 4 * hidden
            config.n_inner = max(1, int(round(4 * hidden * scale)))


def intermediate_key(config) -> str | None:
    for key in INTERMEDIATE_KEYS:
        if isinstance(getattr(config, key, None), int):
            return key
    return None


def build_config(s: CompareSettings, num_labels: int, extra_mlp: int = 0):
    """The model config: --layers, --width-scale (from scratch), the label count, and `extra_mlp` more MLP units."""
    from transformers import AutoConfig

    kwargs = {} if s.task == "causal-lm" else {"num_labels": num_labels}
    config = AutoConfig.from_pretrained(s.model, **kwargs)
    if s.from_scratch:
        scale_width(config, s.width_scale)
    if s.layers is not None:
        total = getattr(config, "num_hidden_layers", None)
        if total is None:
            raise ValueError(f"--layers: {type(config).__name__} has no num_hidden_layers.")
        if s.layers > total:
            raise ValueError(f"--layers {s.layers} is more than the {total} layers of {s.model}.")
        config.num_hidden_layers = s.layers
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = config.layer_types[: s.layers]
    if extra_mlp:
        key = intermediate_key(config)
        setattr(config, key, getattr(config, key) + extra_mlp)
    return config


def mean_pooled(s: CompareSettings) -> bool:
    """Whether the model is a `MeanPooledClassifier` (--layers 0, or --pooling mean; never for causal-lm)."""
    return s.task != "causal-lm" and (s.layers == 0 or s.pooling == "mean")


def build_model(s: CompareSettings, num_labels: int, extra_mlp: int = 0) -> nn.Module:
    """The arm's starting model (call after seeding: a random init depends on the seed).

    Pretrained: the checkpoint's weights (a new head for `num_labels` classes). `--from-scratch`: random init
    from the (scaled) config. `--layers 0`: a `MeanPooledClassifier` on the base model's embeddings.
    """
    from transformers import AutoModel

    config = build_config(s, num_labels, extra_mlp)
    if mean_pooled(s):
        base = AutoModel.from_config(config) if s.from_scratch else AutoModel.from_pretrained(s.model, config=config)
        return MeanPooledClassifier(base, num_labels)
    auto = auto_class(s.task)
    if s.from_scratch:
        return auto.from_config(config)
    return auto.from_pretrained(s.model, config=config, ignore_mismatched_sizes=True)


def build_model_on_meta(s: CompareSettings, num_labels: int) -> nn.Module:
    """The model's shape without memory or weights (for parameter counting)."""
    from transformers import AutoModel

    config = build_config(s, num_labels)
    with torch.device("meta"):
        if mean_pooled(s):
            return MeanPooledClassifier(AutoModel.from_config(config), num_labels)
        return auto_class(s.task).from_config(config)


def auto_class(task: str):
    """The transformers Auto class of a task."""
    import transformers

    return getattr(transformers, {"text-classification": "AutoModelForSequenceClassification",
                                  "image-classification": "AutoModelForImageClassification",
                                  "causal-lm": "AutoModelForCausalLM"}[task])


# ---------------------------------------------------------------------------------------------- targets
def head_module_names(model: nn.Module) -> list[str]:
    """Linear layers outside the transformers base model: the task head (e.g. `classifier`, `score`)."""
    base = getattr(model, "base_model", None)
    if isinstance(model, MeanPooledClassifier):
        base = model.base
    if not isinstance(base, nn.Module) or base is model:
        return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in ("classifier", "score")]
    inside = {id(m) for m in base.modules()}
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in inside]


@dataclass
class MlpLayout:
    """The MLP of every block: the input projections (hidden -> width; two for gated MLPs) and the output one."""

    blocks: list[tuple[list[tuple[str, nn.Linear]], tuple[str, nn.Linear]]]
    width: int

    @property
    def params_per_unit(self) -> int:
        """Parameters one more MLP unit adds in every block together (input rows + biases + output column)."""
        total = 0
        for ins, (_, out) in self.blocks:
            total += sum(m.in_features + (1 if m.bias is not None else 0) for _, m in ins) + out.out_features
        return total

    def names(self) -> list[str]:
        return [n for ins, out in self.blocks for n, _ in [*ins, out]]


def find_mlp(model: nn.Module) -> MlpLayout:
    """Locate the MLP layers by shape: per block, the Linear layers mapping to the config's intermediate size and
    the one mapping back from it. Raises ValueError ("arm does not apply") where that is not unambiguous."""
    config = getattr(model, "config", None)
    key = intermediate_key(config) if config is not None else None
    width = getattr(config, key) if key else None
    hidden = getattr(config, "hidden_size", None)
    if not width or width == hidden:
        raise ValueError(
            f"{type(model).__name__} has no MLP width this command can find (config.{key or 'intermediate_size'}"
            f"={width}, hidden_size={hidden})."
        )
    groups: dict[str, tuple[list, list]] = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or name.split(".")[-1] in ("classifier", "score", "lm_head"):
            continue
        block = name.rsplit(".", 2)[0]
        if module.out_features == width and module.in_features == hidden:
            groups.setdefault(block, ([], []))[0].append((name, module))
        elif module.in_features == width and module.out_features == hidden:
            groups.setdefault(block, ([], []))[1].append((name, module))
    blocks = []
    for block, (ins, outs) in groups.items():
        if not ins or len(outs) != 1:
            raise ValueError(f"{type(model).__name__}: cannot tell the MLP layers of block {block!r} apart.")
        blocks.append((ins, outs[0]))
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no MLP layers (Linear {hidden} -> {width} -> {hidden}).")
    return MlpLayout(blocks, width)


def resolve_targets(s: CompareSettings, model: nn.Module):
    """DendriteConfig.target_modules for --targets (None = the library's per-architecture defaults)."""
    t = s.targets
    if t == "default":
        return head_module_names(model) if s.layers == 0 else None  # no layers: the head is the only target
    if t == "mlp":
        try:
            return find_mlp(model).names()
        except ValueError as err:
            raise ValueError(f"--targets mlp: {err}") from err
    if t == "all-linear" or set(t) & set("*+?[](){}|^$\\"):
        return t
    return [v.strip() for v in t.split(",") if v.strip()]


def dendrite_config(s: CompareSettings, model: nn.Module, seed: int, **overrides) -> DendriteConfig:
    kw = dict(target_modules=resolve_targets(s, model), dendrites_per_cycle=s.dendrites_per_cycle, rank=s.rank,
              activation=s.activation, dendrite_seed=seed)
    kw.update(overrides)
    return DendriteConfig(**kw)


def dendrite_params_added(model: nn.Module, config: DendriteConfig, growths: int) -> int:
    """Exact number of parameters `growths` growths add to `model` (counted on a meta copy: no memory used)."""
    if growths == 0:
        return 0
    dm = get_dendritic_model(copy.deepcopy(model) if not _on_meta(model) else model, config)
    before = dm.dendrite_summary().total_params
    for _ in range(growths):
        dm.add_dendrites()
    return dm.dendrite_summary().total_params - before


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


# ---------------------------------------------------------------------------------------------- wider
def wider_units(layout: MlpLayout, target_params: int) -> int:
    """MLP units to add to every block so the added parameters are closest to `target_params` (at least 1)."""
    return max(1, int(round(target_params / layout.params_per_unit)))


def widen_mlp(model: nn.Module, extra: int, generator: torch.Generator | None = None) -> nn.Module:
    """Add `extra` units to every block's MLP in place, without changing what the model computes.

    The new units' input weights are drawn like the layer's existing ones (normal with the std of the existing
    weights; biases zero) and their output weights are zero, so the function is unchanged at the start and the
    new units learn from the first step (their output weights get gradients through the nonzero inputs).
    """
    layout = find_mlp(model)
    for ins, (out_name, out) in layout.blocks:
        for name, layer in ins:
            w = layer.weight.detach()
            new_rows = torch.randn(extra, w.shape[1], generator=generator, dtype=torch.float32).to(w) * w.float().std().to(w)
            bigger = nn.Linear(layer.in_features, layer.out_features + extra, bias=layer.bias is not None, dtype=w.dtype, device=w.device)
            with torch.no_grad():
                bigger.weight.copy_(torch.cat([w, new_rows], 0))
                if layer.bias is not None:
                    bigger.bias.copy_(torch.cat([layer.bias.detach(), layer.bias.new_zeros(extra)]))
            _set(model, name, bigger)
        w = out.weight.detach()
        bigger = nn.Linear(out.in_features + extra, out.out_features, bias=out.bias is not None, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            bigger.weight.copy_(torch.cat([w, w.new_zeros(w.shape[0], extra)], 1))
            if out.bias is not None:
                bigger.bias.copy_(out.bias.detach())
        _set(model, out_name, bigger)
    key = intermediate_key(model.config)
    setattr(model.config, key, getattr(model.config, key) + extra)
    return model


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


# ---------------------------------------------------------------------------------------------- frozen base
def freeze_base(model: nn.Module, keep: list[str]) -> None:
    """requires_grad False everywhere except in the modules named in `keep` (the task head)."""
    keep_ids = {id(p) for name in keep for p in model.get_submodule(name).parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep_ids)


# LoRA's own Linear layers (down and up projection), the targets of Perforated AI's PEFT recipe (docs/peft.md).
LORA_LAYERS = ("lora_A", "lora_B")


def lora_rank_for(model: nn.Module, target_names: list[str], target_params: int, per_rank_only: bool = False) -> int:
    """LoRA rank whose trainable parameters (r * (in + out) per target Linear) are closest to `target_params`
    (`per_rank_only`: the parameters of one rank, r = 1)."""
    modules = dict(model.named_modules())
    per_rank = 0
    for name in target_names:
        m = modules[name]
        if not isinstance(m, nn.Linear):
            raise ValueError(f"lora: target {name!r} is a {type(m).__name__}; this command matches LoRA on Linear layers only.")
        per_rank += m.in_features + m.out_features
    if per_rank_only:
        return per_rank
    return max(1, int(round(target_params / per_rank)))


def lora_module_names(model: nn.Module) -> list[str]:
    """The names of LoRA's own layers in `model` (the `lora_A` / `lora_B` containers of every LoRA layer)."""
    return [n for n, _ in model.named_modules() if n.split(".")[-1] in LORA_LAYERS]


def add_lora(model: nn.Module, target_names: list[str], rank: int) -> nn.Module:
    """Inject PEFT LoRA of `rank` into `target_names` (in place; B starts at zero, so outputs are unchanged)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as err:
        raise ImportError("The lora arm needs PEFT: `pip install peft` (or leave lora out of --arms).") from err
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(target_names))
    return inject_adapter_in_model(config, model)

"""Dendrites on quantized frozen bases: bitsandbytes 4-bit / 8-bit Llama loaded with a BitsAndBytesConfig (CPU)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from dendritic_task import ScriptedMetric, make_args, state_of, task_data
from test_trainer import _CrashAfterFirstGrowth, _Interrupted, decisions
from torch import nn

from hf_dendrites import CheckpointError, DendriteConfig, DendriticModel, DendriticTrainer, get_dendritic_model
from hf_dendrites.constants import DENDRITE_CONFIG_NAME, DENDRITE_TRAINED_BASE_NAME
from hf_dendrites.layers import parameter_count, unsupported_reason

try:
    import bitsandbytes as bnb
except ImportError:
    if os.environ.get("CI"):  # CI installs the test extra, which has bitsandbytes: missing there is a failure
        raise
    pytest.skip('bitsandbytes is not installed (pip install "hf_dendrites[quantization]")', allow_module_level=True)

QUANT = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "int8": {"load_in_8bit": True},
}
KIND = {"nf4": bnb.nn.Linear4bit, "fp4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}
IDS = torch.randint(0, 99, (2, 9), generator=torch.Generator().manual_seed(0))
PROJECTIONS = 14  # 2 layers x (q, k, v, o, gate, up, down); lm_head stays a plain Linear (bitsandbytes skips it)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random Llama saved in full precision (hidden size 64: bitsandbytes' 4-bit blocks hold 64 values)."""
    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=99, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def load(base_dir, quant):
    config = transformers.BitsAndBytesConfig(**QUANT[quant])
    return transformers.AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=config, device_map="cpu")


def logits(model, grad=False):
    with torch.set_grad_enabled(grad):
        return model(input_ids=IDS).logits.detach()


def quantized_state(model):
    """Every state dict entry of the quantized layers (packed weights and quantization state), as bytes."""
    names = {n for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if "dendrite_" not in k and any(k.startswith(name + ".") for name in names)}


@pytest.mark.parametrize("quant", ["nf4", "int8"])
@pytest.mark.parametrize("rank", [None, 4])
def test_quantized_layers_get_dendrites_that_train_on_a_byte_identical_base(tmp_path, base_dir, quant, rank):
    model = load(base_dir, quant)
    frozen = quantized_state(model)
    # bitsandbytes' own path, as training runs it (with gradients; see docs/quantization.md for its CPU eval kernel)
    expected = logits(model, grad=True)
    assert len(frozen) >= PROJECTIONS
    dm = get_dendritic_model(model, DendriteConfig(target_modules="all-linear", rank=rank, dendrite_seed=0))
    layers = dict(dm.dendritic_layers())
    assert len(layers) == PROJECTIONS and all(isinstance(layer, KIND[quant]) for layer in layers.values())
    q_proj = dm.model.model.layers[0].self_attn.q_proj
    weight = q_proj.weight
    dm.add_dendrites(2)
    assert q_proj.weight is weight and not weight.requires_grad  # the packed weight, as it was
    assert {p.dtype for p in dm.dendrite_parameters()} == {torch.float32}  # the compute dtype / the model's dtype
    assert torch.equal(logits(dm), expected) and torch.equal(logits(dm, grad=True), expected)  # identity

    # Real sizes: the packed 4-bit weight counts the values it encodes.
    summary = dm.dendrite_summary()
    layer = next(s for s in summary.layers if s.name.endswith("layers.0.self_attn.q_proj"))
    assert layer.base_params == 64 * 64 and layer.kind == KIND[quant].__name__
    per_layer = 2 * 64 * 64 + 2 * 64 * 2 if rank is None else 2 * 4 * 64 + 2 * 64 * 4 + 2 * 64 * 2
    assert layer.dendrite_params == per_layer
    assert summary.base_params == 2 * 99 * 64 + 5 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)

    # Training moves the dendrites (and the float base parameters), never the quantized weights.
    dm.train()
    optimizer = torch.optim.AdamW([p for p in dm.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in dm.named_parameters() if "dendrite" in n}
    for _ in range(3):
        loss = dm(input_ids=IDS, labels=IDS).loss
        loss.backward()
        assert all(p.grad is not None for p in dm.dendrite_parameters())
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(p, before[n]) for n, p in dm.named_parameters() if n.endswith("dendrite_out"))
    dm.eval()
    trained = logits(dm)
    assert not torch.equal(trained, expected)
    now = quantized_state(dm.model)
    assert now.keys() == frozen.keys() and all(torch.equal(now[k], frozen[k]) for k in frozen)
    ratios = dm.dendrite_weight_ratios()
    assert len(ratios) == PROJECTIONS and all(0 < r < float("inf") for r in ratios.values())

    # Adapter-only checkpoint: the quantized weights are fingerprinted, not stored; reloading quantizes the base again.
    dm.save_pretrained(str(tmp_path / "adapter"), adapter_only=True)
    meta = json.loads((tmp_path / "adapter" / DENDRITE_CONFIG_NAME).read_text())
    fingerprinted = set(meta["base_model"]["fingerprint"]["tensors"])
    assert set(frozen) <= fingerprinted and "model.layers.0.self_attn.q_proj.weight" in fingerprinted
    loaded = DendriticModel.from_pretrained(str(tmp_path / "adapter"))
    assert isinstance(loaded.model.model.layers[0].self_attn.q_proj, KIND[quant])
    assert torch.equal(logits(loaded.eval()), trained)
    # A full save holds the quantized base (without the dendrites) and reloads exactly too.
    dm.save_pretrained(str(tmp_path / "full"))
    assert "model.safetensors" in os.listdir(tmp_path / "full")
    full = DendriticModel.from_pretrained(str(tmp_path / "full"))
    assert torch.equal(logits(full.eval()), trained)
    with pytest.raises(CheckpointError, match="cannot be loaded in place into a quantized model.*adapter_only=True"):
        dm.load_dendritic_state(str(tmp_path / "full"))
    plain = dm.unload()
    assert type(plain.model.layers[0].self_attn.q_proj) is KIND[quant]


def test_dendrite_dtype_follows_the_compute_dtype_or_the_config(base_dir):
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=config, device_map="cpu")
    expected = logits(model, grad=True)
    dm = get_dendritic_model(model, DendriteConfig(target_modules=["q_proj", "v_proj"], rank=2))
    dm.add_dendrites(1)
    assert {p.dtype for p in dm.dendrite_parameters()} == {torch.bfloat16}
    assert torch.equal(logits(dm), expected) and torch.equal(logits(dm, grad=True), expected)
    # the 4-bit layers left plain do not repack their weights for bitsandbytes' CPU inference kernel either
    assert not any(m.support_avx512bf16_for_cpu for m in dm.modules() if isinstance(m, bnb.nn.Linear4bit))
    dm.unload()
    dm = get_dendritic_model(model, DendriteConfig(target_modules=["q_proj"], dendrite_dtype="float16"))
    dm.add_dendrites(1)
    assert {p.dtype for p in dm.dendrite_parameters()} == {torch.float16}
    with torch.no_grad():
        dm.model.model.layers[0].self_attn.q_proj.dendrite_out.fill_(0.5)
    assert logits(dm).dtype == expected.dtype and not torch.equal(logits(dm), expected)
    dm.unload()
    with pytest.raises(ValueError, match="dendrite_dtype='float16'.*no selected layer is one"):
        get_dendritic_model(model, DendriteConfig(target_modules=["lm_head"], dendrite_dtype="float16"))


def test_the_correlation_rule_trains_candidates_on_a_quantized_base(base_dir):
    from hf_dendrites.learning_rules import CorrelationRule

    dm = get_dendritic_model(load(base_dir, "nf4"), DendriteConfig(target_modules="all-linear", learning_rule="correlation"))
    expected = logits(dm, grad=True)
    frozen = quantized_state(dm.model)
    rule = CorrelationRule(dm, pool_size=2, generator=torch.Generator().manual_seed(0))
    rule.start()
    scores = []
    for _ in range(3):
        dm(input_ids=IDS, labels=IDS).loss.backward()
        rule.accumulate()
        scores.append(rule.step())
    assert scores[-1] > scores[0] > 0  # the candidates climb S
    rule.install(1)
    assert set(dm.dendrite_counts().values()) == {1} and torch.equal(logits(dm, grad=True), expected)
    now = quantized_state(dm.model)
    assert all(torch.equal(now[k], frozen[k]) for k in frozen)


def lm_data(n, seed):
    return [{"input_ids": r["input_ids"], "labels": r["input_ids"]} for r in task_data(n, seed)]


SCORES = [1.0, 1.0, 1.0, 0.9, 0.9, 0.9, 0.95, 0.95, 0.95]  # one per evaluation: grow, grow, discard (retry), complete


def quantized_trainer(output_dir, base_dir, quant, callbacks=None, evaluations_done=0, **overrides):
    """A trainer whose schedule sees SCORES; `evaluations_done`: a resumed run's metric goes on where it stopped."""
    args = {"metric_for_best_model": "scripted", "greater_is_better": False, "learning_rate": 1e-2,
            "save_strategy": "steps", "save_steps": 4, "per_device_train_batch_size": 8, "gradient_checkpointing": True}
    args.update(overrides)
    return DendriticTrainer(
        load(base_dir, quant),
        make_args(str(output_dir), **args),
        train_dataset=lm_data(64, 1),
        eval_dataset=lm_data(16, 2),
        dendrite_config=DendriteConfig(target_modules="all-linear", rank=4, dendrite_seed=0),
        compute_metrics=ScriptedMetric(SCORES[evaluations_done:]),
        callbacks=callbacks,
    )


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_dendritic_trainer_grows_discards_and_resumes_exactly_on_a_quantized_base(tmp_path, base_dir, quant):
    frozen = quantized_state(load(base_dir, quant))
    reference = quantized_trainer(tmp_path / "reference", base_dir, quant)
    reference.train()
    assert reference.model.model.is_gradient_checkpointing
    actions = [a for _, a in decisions(reference)]
    assert "grow" in actions and "retry" in actions and actions[-1] == "complete"
    assert set(reference.model.dendrite_counts().values()) == {1}  # cycle 1 kept, cycle 2 discarded
    now = quantized_state(reference.model.model)
    assert all(torch.equal(now[k], frozen[k]) for k in frozen)

    crash = _CrashAfterFirstGrowth()
    crashing = quantized_trainer(tmp_path / "run", base_dir, quant, callbacks=[crash])
    crash.trainer = crashing
    with pytest.raises(_Interrupted):
        crashing.train()
    checkpoint = tmp_path / "run" / f"checkpoint-{crash.crashed_at}"
    files = os.listdir(checkpoint)
    assert DENDRITE_TRAINED_BASE_NAME in files and not any(f.startswith("model") for f in files)  # adapter-only
    resumed = quantized_trainer(tmp_path / "run", base_dir, quant, evaluations_done=crash.crashed_at // 4)  # eval_steps 4
    resumed.train(resume_from_checkpoint=True)
    assert decisions(resumed) == decisions(reference)
    expected, got = state_of(reference.model), state_of(resumed.model)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)

    reference.save_model(str(tmp_path / "final"))  # a full save of the quantized base
    final = DendriticModel.from_pretrained(str(tmp_path / "final"))
    assert torch.equal(logits(final.eval()), logits(reference.model.eval()))


class PackedLinear(nn.Module):
    """Stands for a quantized linear layer of another package: a packed integer weight."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(8, 2, dtype=torch.uint8), requires_grad=False)

    def forward(self, x):
        return x


def test_unsupported_quantized_layers_are_named_and_listed_by_all_linear():
    hqq = type("HQQLinear", (PackedLinear,), {"__module__": "hqq.core.quantize"})
    awq = type("WQLinear_GEMM", (PackedLinear,), {"__module__": "awq.modules.linear.gemm"})
    params4 = type("Params4bit", (nn.Parameter,), {})
    for module in (hqq(), awq()):
        reason = unsupported_reason(module)
        assert f"{type(module).__module__}.{type(module).__name__} is a quantized linear layer" in reason
        assert "bitsandbytes 4-bit / 8-bit" in reason
    own = PackedLinear()
    own.weight = params4(torch.zeros(8, 2, dtype=torch.uint8), requires_grad=False)
    assert "is a quantized linear layer" in unsupported_reason(own)

    class Quantized(transformers.PreTrainedModel):
        config_class = transformers.PretrainedConfig

        def __init__(self, config):
            super().__init__(config)
            self.q_proj, self.v_proj, self.lm_head = hqq(), awq(), nn.Linear(4, 4)
            self.post_init()

        def get_output_embeddings(self):
            return self.lm_head

    model = Quantized(transformers.PretrainedConfig())
    with pytest.raises(ValueError, match=r"matched no layer.*skipped 2 quantized linear layer\(s\).*"
                                         r"hqq\.core\.quantize\.HQQLinear.*`q_proj`, `v_proj`"):
        get_dendritic_model(model, DendriteConfig(target_modules="all-linear"))
    with pytest.raises(TypeError, match="'q_proj'.*HQQLinear is a quantized linear layer"):
        get_dendritic_model(model, DendriteConfig(target_modules=["q_proj"]))


def test_quantized_weight_counts_the_values_it_encodes():
    layer = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4")._quantize("cpu")
    assert layer.weight.numel() == 32 * 64 // 2 and parameter_count(layer.weight) == 32 * 64


def test_the_core_imports_without_bitsandbytes_and_names_the_extra():
    """Without bitsandbytes (simulated: `import bitsandbytes` fails), hf_dendrites converts as before and asking for
    the bitsandbytes kinds raises an ImportError naming the `quantization` extra."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["bitsandbytes"] = None
        import torch
        import hf_dendrites
        from hf_dendrites import DendriteConfig, get_dendritic_model
        from hf_dendrites.quantized import register_bitsandbytes_kinds
        dm = get_dendritic_model(torch.nn.Sequential(torch.nn.Linear(3, 3)), DendriteConfig(target_modules=["0"]))
        dm.add_dendrites(1)
        try:
            register_bitsandbytes_kinds()
        except ImportError as err:
            print("OK", err)
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("OK ") and 'pip install "hf_dendrites[quantization]"' in done.stdout


def test_a_kind_package_too_old_to_register_is_named_when_its_layers_are_refused(monkeypatch):
    """A lazily registered kind whose package cannot be used (e.g. bitsandbytes older than the floor): conversion of
    other layers goes on; its quantized layers are refused with the loader's message (which names the extra)."""
    from hf_dendrites import layers

    def loader():
        raise ImportError('fakequant 0.1 is older than hf_dendrites supports: pip install "hf_dendrites[quantization]"')

    monkeypatch.setitem(sys.modules, "fakequant", type(sys)("fakequant"))
    monkeypatch.setitem(layers._LAZY_KINDS, "fakequant", loader)
    monkeypatch.setattr(layers, "_LAZY_ERRORS", {})
    old = type("Linear4bit", (PackedLinear,), {"__module__": "fakequant.nn"})
    model = nn.Sequential(nn.Linear(2, 2), old())
    dm = get_dendritic_model(model, DendriteConfig(target_modules=["0"]))  # the loader fails; nn.Linear converts
    assert "fakequant" not in layers._LAZY_KINDS and len(list(dm.dendritic_layers())) == 1
    reason = unsupported_reason(old())
    assert "fakequant.nn.Linear4bit is a quantized linear layer, but fakequant 0.1 is older" in reason
    assert 'pip install "hf_dendrites[quantization]"' in reason


def test_a_quantized_checkpoint_loaded_by_transformers_gets_its_dendrites_back(tmp_path, base_dir):
    """The drop-in path: `AutoModelForCausalLM.from_pretrained(full checkpoint)` loads the quantized base, and
    `get_dendritic_model` with a config that leaves the structure at its defaults restores the dendrites (in their
    saved dtype) exactly."""
    config = DendriteConfig(target_modules="all-linear", rank=4, dendrite_dtype="bfloat16", dendrite_seed=0)
    dm = get_dendritic_model(load(base_dir, "nf4"), config)
    dm.add_dendrites(1)
    with torch.no_grad():
        for p in dm.dendrite_parameters():
            p.normal_(0, 0.1)
    expected = logits(dm.eval())
    dm.save_pretrained(str(tmp_path / "full"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "full"), device_map="cpu")
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    restored = get_dendritic_model(model, DendriteConfig(target_modules="all-linear"))
    assert restored.dendrite_config.rank == 4 and restored.dendrite_config.dendrite_dtype == "bfloat16"
    assert {p.dtype for p in restored.dendrite_parameters()} == {torch.bfloat16}
    assert torch.equal(logits(restored.eval()), expected)

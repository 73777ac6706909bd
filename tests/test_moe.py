"""Dendrites on the fused experts of transformers' mixture-of-experts models (hf_dendrites/moe.py, docs/moe.md).

Tiny random configs of real MoE architectures on the CPU. Sizes are multiples of 4 (float32 rows of 16 bytes), as
torch's CPU grouped_mm needs for its backward pass (the plain models need it too).
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
import transformers
from dendritic_task import ScriptedMetric, make_args
from torch import nn

from hf_dendrites import DendriteConfig, DendriticModel, DendriticTrainer, get_dendritic_model
from hf_dendrites.moe import DendriticExperts, is_fused_experts

_COMMON = dict(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    pad_token_id=0, bos_token_id=1, eos_token_id=1,
)
# model_type -> config overrides; every one has experts stored as fused 3-D parameters (use_experts_implementation).
MOE_CONFIGS = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=16),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=8, head_dim=8),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=8),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),
    "qwen3_next": dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=16, head_dim=8,
        linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, full_attention_interval=2,
    ),
    "deepseek_v3": dict(
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=8, first_k_dense_replace=1, n_group=1,
        topk_group=1, q_lora_rank=8, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4, num_key_value_heads=2,
    ),
    "granitemoe": dict(num_local_experts=8, num_experts_per_tok=2),
    "jamba": dict(num_experts=8, num_experts_per_tok=2, expert_layer_period=1, expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1),
    "phimoe": dict(num_local_experts=8, num_experts_per_tok=2),
}


def tiny_moe(model_type: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(model_type, **{**_COMMON, **MOE_CONFIGS[model_type]})
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # some architectures initialise their routers at zero: random routing for the tests
        for name, p in model.named_parameters():
            if p.dim() >= 2 and ("gate" in name or "router" in name) and p.abs().sum() == 0:
                p.normal_(0, 0.5)
    return model


def ids(seed: int = 0, batch: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def experts_of(dm: DendriticModel) -> dict[str, DendriticExperts]:
    return {n: m for n, m in dm.dendritic_layers() if isinstance(m, DendriticExperts)}


def randomize_dendrites(dm: DendriticModel) -> None:
    """Nonzero output weights, biases and cascade weights (new dendrites start at zero and compute nothing)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in dm.dendrite_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


# ---------------------------------------------------------------------------------------------- every architecture
@pytest.mark.parametrize("model_type", sorted(MOE_CONFIGS))
def test_every_expert_gets_dendrites_exactly_trains_and_reloads(model_type, tmp_path):
    model = tiny_moe(model_type)
    x = ids()
    with torch.no_grad():
        before = model(x).logits
    plain_experts = [n for n, m in model.named_modules() if is_fused_experts(m)]
    assert plain_experts
    dm = get_dendritic_model(model, DendriteConfig(target_modules="all-linear", dendrite_seed=0))
    experts = experts_of(dm)
    assert sorted(experts) == sorted(plain_experts)  # every experts module of the model, nothing but Linears besides
    assert all(isinstance(m, nn.Linear) for n, m in dm.dendritic_layers() if n not in experts)
    dm.add_dendrites(2)
    with torch.no_grad():
        assert torch.equal(dm(x).logits, before)  # identity at insertion, bit for bit
    for layer in experts.values():  # one set of dendrites per expert and projection
        for proj in layer.projections:
            assert getattr(layer, f"{proj}_dendrite_out").shape[:2] == (layer.num_experts, 2)

    # A backward pass reaches the dendrites of exactly the experts that tokens were routed to.
    randomize_dendrites(dm)
    routed: dict[str, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(lambda m, args, out, n=n: routed.__setitem__(n, args[1].unique()))
             for n, layer in experts.items()]
    dm.train()
    logits = dm(x[:1, :2]).logits  # every position gets an error (a causal LM loss leaves the last one out)
    logits.backward(torch.randn(logits.shape, generator=torch.Generator().manual_seed(3)))
    for hook in hooks:
        hook.remove()
    for name, layer in experts.items():
        reached = set(routed[name].tolist())
        assert 0 < len(reached) < layer.num_experts  # two tokens, two experts each: some experts get no token
        for pname in layer.dendrite_param_names:
            p = getattr(layer, pname)
            if p is None:
                continue
            per_expert = p.grad.flatten(1).abs().sum(1)
            assert {e for e in range(layer.num_experts) if per_expert[e] > 0} == reached, (name, pname)

    # save / reload exact
    dm.eval()
    with torch.no_grad():
        expected = dm(x).logits
    dm.save_pretrained(tmp_path)
    loaded = DendriticModel.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, expected)
    assert loaded.dendrite_counts() == dm.dendrite_counts()


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("rank,cascade", [(None, False), (4, False), (3, True)])
def test_experts_compute_a_dendritic_linear_per_expert(model_type, rank, cascade):
    """The grouped computation equals, token by token, each expert's MLP with the dendrite formula on both
    projections (rank 3 takes the looped path: its rows are not 16-byte aligned for grouped_mm)."""
    model = tiny_moe(model_type)
    dm = get_dendritic_model(model, DendriteConfig(target_modules=["experts"], rank=rank, cascade=cascade, dendrite_seed=0))
    dm.add_dendrites(3)
    randomize_dendrites(dm)
    layer = next(iter(experts_of(dm).values()))
    T, E = 9, layer.num_experts
    g = torch.Generator().manual_seed(2)
    x = torch.randn(T, 16, generator=g)
    index = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)])
    weights = torch.rand(T, 2, generator=g)
    layer.disable_dendrites([1])

    def proj(p: str, e: int, v: torch.Tensor) -> torch.Tensor:
        w = getattr(layer, p)[e]
        y = v @ w if layer.is_transposed else v @ w.t()
        if layer.has_bias:
            y = y + getattr(layer, f"{p}_bias")[e]
        K, N = layer.num_dendrites, y.shape[-1]
        if rank is None:
            d = getattr(layer, f"{p}_dendrite_weight")[e]
            z = (v @ d if layer.is_transposed else v @ d.t()).view(K, N)
        else:
            a = getattr(layer, f"{p}_dendrite_lora_A")[e]
            h = (v @ a if layer.is_transposed else v @ a.t()).view(K, rank)
            z = torch.einsum("knr,kr->kn", getattr(layer, f"{p}_dendrite_lora_B")[e], h)
        z = z + getattr(layer, f"{p}_dendrite_bias")[e].view(K, N)
        out = getattr(layer, f"{p}_dendrite_out")[e].clone()
        out[1] = 0  # switched off
        c = getattr(layer, f"{p}_dendrite_cascade")
        acts = []
        for k in range(K):
            zk = z[k]
            for j in range(k):
                if cascade and j != 1:
                    zk = zk + c[e, k * (k - 1) // 2 + j] * acts[j]
            acts.append(torch.tanh(zk))
        return y + sum(out[k] * acts[k] for k in range(K))

    with torch.no_grad():
        got = layer(x, index, weights)
        want = torch.zeros_like(x)
        for t in range(T):
            for slot in range(2):
                e = int(index[t, slot])
                h = layer._apply_gate(proj(layer.projections[0], e, x[t]))
                want[t] += weights[t, slot] * proj("down_proj", e, h)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    layer.enable_dendrites()
    with torch.no_grad():
        assert not torch.allclose(layer(x, index, weights), got)


# ---------------------------------------------------------------------------------------------- the protocol
def test_growth_truncation_masks_and_low_rank_reload(tmp_path):
    model = tiny_moe("qwen2_moe")
    x = ids()
    dm = get_dendritic_model(model, DendriteConfig(target_modules=["experts", "q_proj"], cascade=True, dendrite_seed=0))
    dm.add_dendrites(1)
    randomize_dendrites(dm)
    with torch.no_grad():
        one = dm(x).logits
    dm.add_dendrites(2)
    with torch.no_grad():
        assert torch.equal(dm(x).logits, one)  # growth keeps the earlier dendrites and adds zero
    randomize_dendrites(dm)
    with torch.no_grad():
        three = dm(x).logits
        with dm.dendrites_disabled(growths=[2]):
            assert not torch.equal(dm(x).logits, three)
        assert torch.equal(dm(x).logits, three)  # switching back on is exact
    shapes = {n: layer.expected_dendrite_shapes(3) for n, layer in experts_of(dm).items()}
    for name, layer in experts_of(dm).items():
        assert {p: tuple(getattr(layer, p).shape) for p in shapes[name]} == shapes[name]
    dm.save_pretrained(tmp_path)
    loaded = DendriticModel.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, three)
    dm.set_dendrite_counts(1)
    with torch.no_grad():
        assert not torch.equal(dm(x).logits, three)
    # The dendrites of the first growth keep their values: the model equals one that never grew past one.
    layer = next(iter(experts_of(dm).values()))
    assert layer.down_proj_dendrite_out.shape == (layer.num_experts, 1, 16) and layer.down_proj_dendrite_cascade is None
    summary = dm.dendrite_summary()
    assert summary.dendrite_params == sum(p.numel() for p in dm.dendrite_parameters())
    assert {row.kind for row in summary.layers} >= {"Qwen2MoeExperts", "Linear"}
    ratios = dm.dendrite_weight_ratios()
    assert all(ratios[n] > 0 for n in experts_of(dm))
    plain = dm.unload()
    assert not any(isinstance(m, DendriticExperts) for m in plain.modules())
    assert not any("dendrite" in k for k in plain.state_dict())

    # Low rank: insertion exact, save / reload exact.
    model = tiny_moe("qwen2_moe")
    with torch.no_grad():
        before = model(x).logits
    dm = get_dendritic_model(model, DendriteConfig(target_modules=["experts"], rank=4, dendrite_seed=0))
    dm.add_dendrites(2)
    with torch.no_grad():
        assert torch.equal(dm(x).logits, before)
    randomize_dendrites(dm)
    with torch.no_grad():
        expected = dm(x).logits
    dm.save_pretrained(tmp_path / "rank")
    loaded = DendriticModel.from_pretrained(tmp_path / "rank")
    assert next(iter(experts_of(loaded).values())).gate_up_proj_dendrite_lora_B.shape == (8, 2, 16, 4)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, expected)


def test_correlation_rule_and_fusion_say_they_do_not_apply(caplog):
    model = tiny_moe("mixtral")
    with pytest.raises(ValueError, match="correlation.*does not apply to dendritic experts"):
        get_dendritic_model(model, DendriteConfig(target_modules=["experts"], learning_rule="correlation"))
    assert not any(isinstance(m, DendriticExperts) for m in model.modules())  # the model is left as it was
    dm = get_dendritic_model(model, DendriteConfig(target_modules=["experts", "q_proj"]))
    dm.add_dendrites()
    with caplog.at_level(logging.WARNING, logger="hf_dendrites"):
        dm.fuse_for_inference()
    assert "fusion does not apply to dendritic experts" in caplog.text
    fused = {n: layer.is_fused for n, layer in dm.dendritic_layers()}
    assert fused["model.layers.0.self_attn.q_proj"] and not fused["model.layers.0.mlp.experts"]
    with torch.no_grad():
        dm(ids())


def test_other_experts_implementations_get_the_same_function_and_a_warning(caplog):
    model = tiny_moe("qwen3_moe")
    model.set_experts_implementation("eager")
    x = ids()
    with torch.no_grad():
        before = model(x).logits
    with caplog.at_level(logging.WARNING, logger="hf_dendrites"):
        dm = get_dendritic_model(model, DendriteConfig(target_modules=["experts"]))
    assert "experts_implementation='eager'" in caplog.text and "within float rounding" in caplog.text
    dm.add_dendrites()
    with torch.no_grad():
        torch.testing.assert_close(dm(x).logits, before, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- targets
def test_routers_and_gates_are_never_dendritic():
    for model_type in ("qwen2_moe", "qwen3_next", "gpt_oss", "mixtral"):
        for targets in ("all-linear", None):
            dm = get_dendritic_model(tiny_moe(model_type), DendriteConfig(target_modules=targets))
            names = [n for n, _ in dm.dendritic_layers()]
            assert experts_of(dm), (model_type, targets)
            assert not [n for n in names if re.search(r"(^|\.)(gate|router|shared_expert_gate)$", n)], names
    # The shared expert's own MLP stays a target (only the one-output gate beside it is excluded).
    dm = get_dendritic_model(tiny_moe("qwen2_moe"), DendriteConfig(target_modules="all-linear"))
    assert "model.layers.0.mlp.shared_expert.gate_proj" in dict(dm.dendritic_layers())
    assert "model.layers.0.mlp.shared_expert_gate" not in dict(dm.dendritic_layers())


def test_a_pattern_naming_the_experts_parameter_is_an_error_naming_the_module():
    with pytest.raises(ValueError, match=r"'gate_up_proj' names a parameter, not a module.*MixtralExperts.*target_modules=\['experts'\]"):
        get_dendritic_model(tiny_moe("mixtral"), DendriteConfig(target_modules=["q_proj", "gate_up_proj"]))
    with pytest.raises(ValueError, match="names a parameter, not a module"):
        get_dendritic_model(tiny_moe("mixtral"), DendriteConfig(target_modules=r".*experts\.down_proj"))


def test_unsupported_experts_layout_warns_with_the_share_of_parameters(caplog):
    torch.manual_seed(0)
    config = transformers.JetMoeConfig(**{**_COMMON, "num_local_experts": 4, "num_experts_per_tok": 2, "kv_channels": 8})
    model = transformers.AutoModelForCausalLM.from_config(config)
    experts = [m for m in model.modules() if type(m).__name__ == "JetMoeParallelExperts"]
    share = sum(p.numel() for m in experts for p in m.parameters()) / sum(p.numel() for p in model.parameters())
    with caplog.at_level(logging.WARNING, logger="hf_dendrites"):
        dm = get_dendritic_model(model, DendriteConfig(target_modules="all-linear"))
    names = [n for n, _ in dm.dendritic_layers()]
    assert "model.layers.0.self_attention.kv_proj" in names
    assert not [n for n in names if ".router." in n]  # JetMoE's router Linears (`router.layer`) stay plain
    message = " ".join(r.getMessage() for r in caplog.records if "experts layout" in r.getMessage())
    assert f"{100 * share:.1f} %" in message and "JetMoeParallelExperts" in message, message


def test_default_targets_cover_the_common_decoder_families():
    from hf_dendrites.constants import DEFAULT_TARGET_MODULES

    for model_type in ("gemma", "gemma2", "gemma3_text", "phi3", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss"):
        assert model_type in DEFAULT_TARGET_MODULES
    for model_type, kw in [("gemma2", {"head_dim": 8}), ("phi3", {}), ("gemma3_text", {"head_dim": 8})]:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **{**_COMMON, **kw}))
        dm = get_dendritic_model(model, DendriteConfig())
        per_layer = {n.split(".", 3)[3] for n, _ in dm.dendritic_layers()}
        assert len(per_layer) == len(DEFAULT_TARGET_MODULES[model_type]), (model_type, per_layer)


# ---------------------------------------------------------------------------------------------- trainer
def test_dendritic_trainer_grows_the_experts(tmp_path):
    model = tiny_moe("mixtral")
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": (row := torch.randint(0, 64, (8,), generator=g).tolist()), "labels": row} for _ in range(32)]
    trainer = DendriticTrainer(
        model,
        make_args(str(tmp_path), metric_for_best_model="scripted", greater_is_better=True, max_dendrite_cycles=1,
                  per_device_train_batch_size=8, eval_steps=2, logging_steps=2, num_train_epochs=4),
        train_dataset=data,
        eval_dataset=data[:8],
        dendrite_config=DendriteConfig(target_modules=["experts"], dendrite_seed=0),
        compute_metrics=ScriptedMetric([1.0, 1.0, 1.0, 2.0, 2.0, 2.0]),
    )
    trainer.train()
    decisions = [r["decision"] for r in trainer.dendrite_history]
    assert "grow" in decisions
    counts = trainer.model.dendrite_counts()
    assert counts and all(k == 1 for k in counts.values())
    layer = next(iter(experts_of(trainer.model).values()))
    assert layer.gate_up_proj_dendrite_out.abs().sum() > 0  # the grown dendrites trained


def test_peft_model_all_linear_gets_the_experts_and_never_the_routers():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_moe("qwen2_moe"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    dm = get_dendritic_model(model, DendriteConfig(target_modules="all-linear"))
    names = [n for n, _ in dm.dendritic_layers()]
    assert any(n.endswith("mlp.experts") for n in names)
    assert not [n for n in names if "shared_expert_gate" in n]

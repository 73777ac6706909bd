"""`hf-dendrites compare`'s adapter arms (issue 21): LoRA with dendrites on LoRA's own layers (Perforated AI's PEFT
recipe), the same LoRA with that run's restarts replayed, LoRA of a higher rank at the same parameter count, LoRA plus
dendrites on the base layers, and each arm's LR chosen on validation from one grid."""

import pytest
import transformers
from conftest import compare_data, cue_word_csv

from hf_dendrites.compare import CompareSettings, compare
from hf_dendrites.compare import models as M
from hf_dendrites.compare.runner import arm_model, build_context, choose_learning_rates

pytest.importorskip("peft")

FAST = dict(eval_steps=4, patience=[1], max_steps=60, batch_size=16, max_cycles=1, threads=1, layers=1,
            targets="query,value", lora_rank=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare_lora")
    return compare_data(root)


def _settings(data, **kw) -> CompareSettings:
    base = dict(model=str(data["model"]), train_file=str(data["train"]), validation_file=str(data["validation"]),
                test_file=str(data["test"]), output_dir=str(data["root"] / "unused"), learning_rate=1e-2, **FAST)
    base.update(kw)
    return CompareSettings(**base)


def _trainable(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


def test_lora_arms_put_dendrites_where_asked_and_lora_wider_matches_within_one_rank_step(data):
    s = _settings(data, max_cycles=2)
    ctx = build_context(s)
    assert {"lora", "lora-restarts", "lora-dendrites", "lora-wider", "lora-base-dendrites"} <= set(ctx.arms)
    models = {arm: arm_model(ctx, arm, 0) for arm in ("lora", "lora-dendrites", "lora-wider", "lora-base-dendrites")}
    head = M.head_module_names(M.build_model(s, 2))
    for arm, (dm, _, extra) in models.items():
        trainable = [n for n, p in dm.named_parameters() if p.requires_grad]
        # the base is frozen: only LoRA and the task head train (dendrites join them when they grow)
        assert trainable and all("lora_" in n or any(h in n for h in head) for n in trainable), arm
        assert extra["lora_rank"] == (ctx.budgets["lora_wider_rank"] if arm == "lora-wider" else 2)
    on_lora, _, _ = models["lora-dendrites"]
    start = _trainable(on_lora)
    assert start == _trainable(models["lora"][0])  # the same LoRA and head before any growth
    for _ in range(s.max_cycles):  # lora-dendrites' largest count: every cycle kept
        on_lora.add_dendrites()
    layers = [n for n, _ in on_lora.dendritic_layers() if on_lora.dendrite_counts().get(n)]
    assert layers and all(n.split(".")[-2] in ("lora_A", "lora_B") for n in layers)  # Perforated AI's recipe
    largest = _trainable(on_lora)
    step = ctx.budgets["lora_rank_step"]
    assert largest - start == ctx.budgets["lora_dendrite_params"] > 0
    assert abs(_trainable(models["lora-wider"][0]) - largest) <= step  # within one rank step
    assert ctx.budgets["lora_wider_rank"] > 2
    base, _, _ = models["lora-base-dendrites"]
    base.add_dendrites()
    grown = [n for n, c in base.dendrite_counts().items() if c]
    assert grown and all(n.endswith(("query.base_layer", "value.base_layer")) for n in grown)
    # recipes: Perforated AI's control stops at its first plateau; the wider LoRA restarts at its own plateaus
    assert models["lora"][1] == {"max_dendrite_cycles": 0}
    assert models["lora-wider"][1].get("dendrite_restarts_only") is True


def test_lr_is_chosen_on_validation_only():
    def run(arm, seed, lr, val_loss, test):
        return {"arm": arm, "seed": seed, "learning_rate": lr, "validation_loss": val_loss, "validation_score": 1 - val_loss,
                "test_score": test, "test_loss": 1 - test}

    # the LR with the better test score has the worse mean validation loss: validation decides
    records = [run("a", 0, 1e-3, 0.40, 0.60), run("a", 1, 1e-3, 0.44, 0.60), run("a", 0, 1e-2, 0.45, 0.90),
               run("a", 1, 1e-2, 0.41, 0.90), run("b", 0, 1e-3, 0.5, 0.7), run("b", 0, 1e-2, 0.5, 0.8)]
    choice = choose_learning_rates(records, ["a", "b"], "loss")
    assert choice["a"]["chosen"] == 1e-3 and choice["a"]["validation"] == pytest.approx({1e-3: 0.42, 1e-2: 0.43})
    assert choice["b"]["chosen"] == 1e-3  # a tie keeps the grid's first LR
    assert choose_learning_rates(records, ["a"], "accuracy")["a"]["chosen"] == 1e-3
    changed = [dict(r, test_score=1 - r["test_score"], test_loss=r["test_score"]) for r in records]
    assert choose_learning_rates(changed, ["a", "b"], "loss") == choice  # test numbers play no part


def test_lora_restarts_replays_the_lora_dendrites_run_at_its_chosen_lr(data, tmp_path):
    grid = [3e-3, 3e-2]
    results = compare(_settings(data, output_dir=str(tmp_path / "out"), arms=["lora-dendrites", "lora-restarts"],
                                seeds=1, max_tries=1, lr_grid=grid, metric="loss"))
    choice = results["lr_choice"]
    every = results["runs"] + results["lr_grid_runs"]
    assert len(every) == 4 and {(r["arm"], r["learning_rate"]) for r in every} == {
        (a, lr) for a in ("lora-dendrites", "lora-restarts") for lr in grid}
    for arm in ("lora-dendrites", "lora-restarts"):  # each arm reported at the LR with its best validation loss
        val = {r["learning_rate"]: r["validation_loss"] for r in every if r["arm"] == arm}
        assert choice[arm]["chosen"] == min(val, key=val.get)
        assert [r["learning_rate"] for r in results["runs"] if r["arm"] == arm] == [choice[arm]["chosen"]]
    source = next(r for r in every if r["arm"] == "lora-dendrites" and r["learning_rate"] == choice["lora-dendrites"]["chosen"])
    assert source["growth_steps"], "the lora-dendrites run never grew; the replay would be vacuous"
    for control in (r for r in every if r["arm"] == "lora-restarts"):  # at every LR of the grid
        assert control["replayed_arm"] == "lora-dendrites"
        assert control["replayed_learning_rate"] == source["learning_rate"]
        assert control["growth_steps"] == source["growth_steps"]  # the same restart steps
        assert control["steps"] == source["steps"]  # the same total steps
        assert control["dendrites_kept"] == 0
    assert "LR chosen per arm on mean validation loss" in results["table"]
    assert results["reference"] == "lora-restarts"  # the paired column: against the same restarts without dendrites
    with pytest.raises(ValueError, match="lora-restarts replays the growth and retry steps.*add lora-dendrites"):
        build_context(_settings(data, arms=["lora-restarts"]))


def test_lora_arms_of_a_causal_lm_train_only_lora_and_dendrites(tmp_path):
    from hf_dendrites.example_data import small_lm_folder

    csv = {split: cue_word_csv(tmp_path / f"{split}.csv", n, seed) for split, n, seed in
           (("train", 120, 0), ("validation", 40, 1), ("test", 40, 2))}
    texts = [row.split(",")[0] for row in csv["train"].read_text().splitlines()[1:]]
    model = small_lm_folder(tmp_path / "lm", texts, vocab_size=120, hidden_size=16, intermediate_size=40,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    transformers.set_seed(0)  # the "pretrained" weights: a random init saved beside the config
    transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(model)).save_pretrained(model)
    s = CompareSettings(model=model, task="causal-lm", train_file=str(csv["train"]), validation_file=str(csv["validation"]),
                        test_file=str(csv["test"]), output_dir=str(tmp_path / "out"), max_length=16, eval_steps=4,
                        patience=[1], max_steps=40, batch_size=8, max_cycles=1, max_tries=1, metric="loss", seeds=1,
                        learning_rate=1e-2, lora_rank=2, targets="mlp", threads=1,
                        arms=["lora", "lora-dendrites", "lora-restarts", "lora-wider"])
    ctx = build_context(s)
    for arm in ("lora", "lora-dendrites", "lora-wider"):
        dm, _, _ = arm_model(ctx, arm, 0)
        trainable = [n for n, p in dm.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable), (arm, trainable)  # the LM head stays frozen
    results = compare(s)
    by = {r["arm"]: r for r in results["runs"]}
    assert sorted(by) == ["lora", "lora-dendrites", "lora-restarts", "lora-wider"]
    assert all(r["test_perplexity"] is not None for r in by.values())
    assert by["lora-restarts"]["steps"] == by["lora-dendrites"]["steps"]
    assert by["lora-restarts"]["growth_steps"] == by["lora-dendrites"]["growth_steps"]
    with pytest.raises(ValueError, match="do not apply.*frozen-dendrites.*causal-lm has none"):
        build_context(CompareSettings(**{**s.to_dict(), "arms": ["frozen-dendrites"]}))

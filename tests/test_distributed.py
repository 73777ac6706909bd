"""DendriticTrainer under DDP: two real CPU processes (gloo) launched with torch.distributed.run."""

import os

from conftest import run_two_processes

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "ddp_train.py")


def test_two_processes_decide_together_and_stay_identical(tmp_path):
    results = run_two_processes(SCRIPT, tmp_path)

    for res in results:
        assert res["world_size"] == 2 and res["distributed_type"].endswith("MULTI_CPU")
        assert res["done"]
        # Grown dendrites were identical on both ranks before DDP broadcast anything (growth, growth, retry).
        assert res["growth_checks"] == [True, True, True]
        # After every event and at the end, every parameter is identical on both ranks, and so is the log.
        events = res["events"]
        assert [e["event"] for e in events] == [1, 3, 1, 3, 2, 3, 4]  # grow, switch, grow, switch, retry, switch, complete
        assert all(e["params_identical"] for e in events) and res["final_params_identical"]
        assert res["history_identical"] and res["schedule_identical"]
        # A new DDP wrapper around the same DendriticModel after every rebuild; no stale optimizer or wrapper left.
        assert all(e["wrapper"] == "DistributedDataParallel" and e["wraps_model"] for e in events)
        assert all(e["new_wrapper"] for e in events)
        # Growths fell mid-epoch: the rest of such an epoch ran on the new wrapper, in place of the loop's stale one.
        assert res["stale_wrapper_steps"] > 0
        assert all(e["optimizer_matches"] and e["prepared_optimizers"] == 1 and e["prepared_models"] == 1 for e in events)
        # Dendrites-only phases trained the dendrite parameters alone.
        assert events[0]["trainable"] < events[1]["trainable"]
        assert res["dendrite_counts"] == [2]
    assert results[0]["history"] == results[1]["history"]
    assert [r["decision"] for r in results[0]["history"]].count("continue") == 7
    # Both kept cycles with dendrites were evaluated once more without them, by both ranks together (issue 23).
    assert [r["decision"] for r in results[0]["history"] if "ablation_score" in r] == ["grow", "complete"]


def test_correlation_rule_on_two_processes_installs_identical_candidates(tmp_path):
    results = run_two_processes(os.path.join(os.path.dirname(SCRIPT), "ddp_correlation.py"), tmp_path)
    for res in results:
        assert res["world_size"] == 2
        assert "install" in res["decisions"]  # at least one candidate phase ran to installation
        # candidates stayed identical on both ranks after every candidate step (all-reduced statistics)
        assert res["candidate_steps"] > 0 and all(res["candidates_identical"])
        # parameters identical after every event (growth starts, installation, completion) and at the end
        assert res["events"] and all(e["params_identical"] for e in res["events"]) and res["final_params_identical"]
        assert res["history_identical"]
        # the candidate phase runs on the bare model, the neuron phases under DDP again
        assert {"DistributedDataParallel"} <= {e["wrapper"] for e in res["events"]}
    assert results[0]["dendrite_counts"] == results[1]["dendrite_counts"]
    assert results[0]["decisions"] == results[1]["decisions"]

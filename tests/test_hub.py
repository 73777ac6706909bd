"""Hub round trips against a real HTTP server on 127.0.0.1 (tests/hub_server.py) speaking the Hub API.

The push runs in this process with huggingface_hub's endpoint constants pointed at the server; loading is tested
in a fresh Python process started with HF_ENDPOINT set, as a user on another machine would load the model.
"""

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import torch
import transformers
from conftest import make_tiny, minilm_dir, tiny_inputs
from hub_server import HubServer
from huggingface_hub import HfApi, ModelCard
from huggingface_hub import constants as hub_constants
from test_saving import PNG_1X1, dendritic, outputs, training_summary, transformers_records

from hf_dendrites import CheckpointError, DendriteConfig, DendriticModel, get_dendritic_model
from hf_dendrites.constants import PLAIN_LOAD_NOTICE_KEY

# huggingface_hub's LFS upload passes a file object as `data=`, which httpx deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

TOKEN = "hf_test_token"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with HubServer(str(tmp_path_factory.mktemp("hub"))) as server:
        yield server


@pytest.fixture
def hub_env(hub, tmp_path, monkeypatch):
    """Point huggingface_hub (already imported) at the test server, and refuse any non-loopback connection."""
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_XET": "1",  # plain HTTP (LFS) uploads and downloads
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf_home"),
        "NO_PROXY": "127.0.0.1,localhost",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(hub_constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(
        hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    # transformers keeps one shared HfApi (Trainer.push_to_hub uses it) that holds the endpoint it was built with:
    # a fresh one per test, so that it talks to this test's server, not to an earlier module's stopped one.
    import transformers.utils.hub as transformers_hub

    monkeypatch.setattr(transformers_hub, "_hf_api", None, raising=False)

    real_create_connection = socket.create_connection

    def loopback_only(address, *args, **kwargs):
        assert address[0] in LOOPBACK, f"test tried to reach {address}"
        return real_create_connection(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", loopback_only)
    return env


# Loads the model from the Hub in a fresh process and saves its outputs; the socket guard proves that nothing but
# the test server is contacted.
LOAD_SCRIPT = textwrap.dedent(
    """
    import socket, sys, json
    _connect = socket.create_connection
    def _loopback_only(address, *args, **kwargs):
        assert address[0] in ("127.0.0.1", "localhost", "::1"), address
        return _connect(address, *args, **kwargs)
    socket.create_connection = _loopback_only

    import torch
    from safetensors.torch import load_file, save_file
    from hf_dendrites import CheckpointError, DendriticModel, get_dendritic_model

    repo_id, revision, inputs_path, out_path, token = sys.argv[1:6]
    dm = DendriticModel.from_pretrained(repo_id, revision=None if revision == "-" else revision, token=token)
    with torch.no_grad():
        logits = dm(**load_file(inputs_path)).logits
    save_file({"logits": logits.contiguous()}, out_path)
    print(json.dumps({"counts": dm.dendrite_counts(), "growth_count": dm.growth_count, "class": type(dm.model).__name__,
                      "name_or_path": dm.model.config._name_or_path}))
    """
)


def load_in_fresh_process(env, tmp_path, repo_id, inputs, revision="-"):
    from safetensors.torch import load_file, save_file

    script = tmp_path / "load_from_hub.py"
    script.write_text(LOAD_SCRIPT)
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    out = tmp_path / "outputs.safetensors"
    repo_root = str(Path(__file__).resolve().parents[1])
    proc_env = {
        **os.environ,
        **env,
        "PYTHONPATH": os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH")) if p),
    }
    proc = subprocess.run(
        [sys.executable, str(script), repo_id, revision, str(tmp_path / "inputs.safetensors"), str(out), TOKEN],
        env=proc_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return load_file(str(out))["logits"], json.loads(proc.stdout.strip().splitlines()[-1])


def test_push_then_load_in_a_fresh_process(hub, hub_env, tmp_path):
    curve = tmp_path / "curve.png"
    curve.write_bytes(PNG_1X1)
    dm = dendritic("bert", grow=(1, 1))
    dm.training_summary = training_summary(str(curve))
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())

    info = dm.push_to_hub(
        "tester/tiny-dendritic-bert",
        private=True,
        token=TOKEN,
        commit_message="Add dendrites",
        processing_class=tokenizer,
    )
    assert info.oid == hub.state.repos["tester/tiny-dendritic-bert"].branches["main"]

    # One commit holding everything; weights went through LFS; our model card is the README that landed.
    commits = [c for c in hub.commits if c[0] == "tester/tiny-dendritic-bert"]
    assert len(commits) == 1 and commits[0][2] == "Add dendrites"
    files = hub.files("tester/tiny-dendritic-bert")
    expected = {
        "README.md",
        "config.json",
        "model.safetensors",
        "dendrite_config.json",
        "dendrite_model.safetensors",
        "training_curve.png",
        "tokenizer.json",
    }
    assert expected <= set(files)
    assert len(hub.lfs_uploads) >= 2
    readme = hub.file("tester/tiny-dendritic-bert", "README.md").decode()
    assert (
        "library_name: hf_dendrites" in readme
        and 'DendriticModel.from_pretrained("tester/tiny-dendritic-bert")' in readme
    )
    assert hub.state.repos["tester/tiny-dendritic-bert"].private

    inputs = tiny_inputs("bert")
    logits, meta = load_in_fresh_process(hub_env, tmp_path, "tester/tiny-dendritic-bert", inputs)
    assert torch.equal(logits, outputs(dm))
    assert meta == {
        "counts": dm.dendrite_counts(),
        "growth_count": 2,
        "class": "BertForSequenceClassification",
        "name_or_path": "tester/tiny-dendritic-bert",
    }

    # The card's metadata reads back from the Hub.
    card = ModelCard.load("tester/tiny-dendritic-bert", token=TOKEN)
    assert card.data.library_name == "hf_dendrites" and "dendrites" in card.data.tags
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {"accuracy": 0.7525, "loss": 0.51}
    assert card.data.pipeline_tag == "text-classification"


def test_private_repo_needs_the_token(hub, hub_env, tmp_path):
    dendritic("bert").push_to_hub("tester/private-model", private=True, token=TOKEN)
    with pytest.raises(huggingface_hub.errors.RepositoryNotFoundError):
        DendriticModel.from_pretrained("tester/private-model", token=False, cache_dir=str(tmp_path / "cache"))


def test_branches_pull_requests_and_stale_shards(hub, hub_env, tmp_path):
    repo = "tester/tiny-dendritic-gpt2"
    first = dendritic("gpt2", grow=(1,))
    first.push_to_hub(repo, token=TOKEN, max_shard_size="20KB")
    shards = [f for f in hub.files(repo) if f.startswith("model-")]
    assert len(shards) > 1 and "model.safetensors.index.json" in hub.files(repo)

    # A second push replaces the sharded base: stale shards are deleted in the same commit.
    second = dendritic("gpt2", grow=(2,), seed=3)
    second.push_to_hub(repo, token=TOKEN)
    assert not any(f.startswith("model-") or f == "model.safetensors.index.json" for f in hub.files(repo))
    cache = str(tmp_path / "cache")
    assert torch.equal(
        outputs(DendriticModel.from_pretrained(repo, token=TOKEN, cache_dir=cache), "gpt2"), outputs(second, "gpt2")
    )

    # A branch, created on the fly; main keeps the second model.
    third = dendritic("gpt2", grow=(3,), seed=4)
    third.push_to_hub(repo, token=TOKEN, revision="experiment", commit_message="3 dendrites")
    loaded = DendriticModel.from_pretrained(repo, revision="experiment", token=TOKEN, cache_dir=cache)
    assert torch.equal(outputs(loaded, "gpt2"), outputs(third, "gpt2"))
    assert torch.equal(
        outputs(DendriticModel.from_pretrained(repo, token=TOKEN, cache_dir=cache), "gpt2"), outputs(second, "gpt2")
    )

    # A pull request leaves main alone.
    info = first.push_to_hub(repo, token=TOKEN, create_pr=True)
    assert info.pr_url is not None and info.pr_revision == "refs/pr/1"
    loaded = DendriticModel.from_pretrained(repo, revision="refs/pr/1", token=TOKEN, cache_dir=cache)
    assert torch.equal(outputs(loaded, "gpt2"), outputs(first, "gpt2"))


def test_save_pretrained_with_push_to_hub(hub, hub_env, tmp_path):
    dm = dendritic("llama")
    folder = tmp_path / "my-llama-dendrites"
    folder.mkdir()
    (folder / "optimizer.pt").write_bytes(b"training state, not for the Hub")  # e.g. a Trainer output folder
    dm.save_pretrained(folder, push_to_hub=True, token=TOKEN, repo_id="tester/my-llama-dendrites")
    assert (folder / "dendrite_config.json").exists()
    assert set(hub.files("tester/my-llama-dendrites")) == set(os.listdir(folder)) - {"optimizer.pt"} | {
        ".gitattributes"
    }
    assert hub.file("tester/my-llama-dendrites", "README.md") == (folder / "README.md").read_bytes()


def test_hub_download_never_fetches_pickles(hub, hub_env, tmp_path):
    repo = "tester/with-pickles"
    dm = dendritic("bert")
    dm.push_to_hub(repo, token=TOKEN)
    api = HfApi(token=TOKEN)
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt"):
        api.upload_file(path_or_fileobj=b"not a real pickle", path_in_repo=name, repo_id=repo)
    before = len(hub.downloads)
    loaded = DendriticModel.from_pretrained(repo, token=TOKEN, cache_dir=str(tmp_path / "cache"))
    fetched = {path for repo_id, path in hub.downloads[before:] if repo_id == repo}
    assert fetched == {"config.json", "model.safetensors", "dendrite_config.json", "dendrite_model.safetensors"}
    assert torch.equal(outputs(loaded), outputs(dm))


def test_hub_errors(hub, hub_env, tmp_path):
    cache = str(tmp_path / "cache")
    with pytest.raises(huggingface_hub.errors.RepositoryNotFoundError):
        DendriticModel.from_pretrained("tester/does-not-exist", token=TOKEN, cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a valid Hub repo id"):
        DendriticModel.from_pretrained(str(tmp_path / "no" / "such" / "folder"), cache_dir=cache)
    # A plain transformers model on the Hub is not a dendritic checkpoint.
    HfApi(token=TOKEN).create_repo("tester/plain-bert")
    plain = tmp_path / "plain"
    make_tiny("bert").save_pretrained(plain)
    HfApi(token=TOKEN).upload_folder(folder_path=plain, repo_id="tester/plain-bert")
    with pytest.raises(CheckpointError, match="tester/plain-bert.*not a complete hf_dendrites checkpoint"):
        DendriticModel.from_pretrained("tester/plain-bert", token=TOKEN, cache_dir=cache)


def test_get_dendritic_model_restores_a_hub_checkpoint(hub, hub_env, tmp_path):
    """A script that loads a dendritic repo with `AutoModelFor...` and converts it keeps the dendrites."""
    repo = "tester/dendritic-for-scripts"
    dm = dendritic("bert", grow=(1, 1))
    dm.push_to_hub(repo, token=TOKEN)
    with transformers_records() as records:
        plain = transformers.AutoModelForSequenceClassification.from_pretrained(repo).eval()
    # The plain load from the Hub says that the dendrites were not loaded (transformers' load report, a WARNING).
    assert any(PLAIN_LOAD_NOTICE_KEY in r.getMessage() and r.levelno == logging.WARNING for r in records)
    restored = get_dendritic_model(plain)
    assert restored.dendrite_counts() == dm.dendrite_counts() and restored.growth_count == 2
    assert torch.equal(outputs(restored), outputs(dm))
    # A plain transformers repo stays plain.
    HfApi(token=TOKEN).create_repo("tester/plain-for-scripts")
    make_tiny("bert").save_pretrained(tmp_path / "plain")
    HfApi(token=TOKEN).upload_folder(folder_path=tmp_path / "plain", repo_id="tester/plain-for-scripts")
    plain = transformers.AutoModelForSequenceClassification.from_pretrained("tester/plain-for-scripts")
    assert set(get_dendritic_model(plain).dendrite_counts().values()) == {0}


def test_adapter_only_push_loads_its_base_from_the_hub(hub, hub_env, tmp_path):
    """Issue 18: an adapter-only checkpoint on the Hub references a base that is itself on the Hub (at the commit it
    was loaded from); a fresh process loads both and gets bit-identical outputs."""
    from hf_dendrites.constants import DENDRITE_CONFIG_NAME, DENDRITE_TRAINED_BASE_NAME

    api = HfApi(token=TOKEN)
    api.create_repo("tester/frozen-base")
    make_tiny("bert").save_pretrained(tmp_path / "base")
    api.upload_folder(folder_path=tmp_path / "base", repo_id="tester/frozen-base")
    base = transformers.AutoModelForSequenceClassification.from_pretrained("tester/frozen-base", token=TOKEN)
    commit = hub.state.repos["tester/frozen-base"].branches["main"]
    for name, param in base.named_parameters():
        param.requires_grad_(name.startswith("classifier."))
    dm = dendritic_from(base)

    repo = "tester/frozen-base-dendrites"
    dm.push_to_hub(repo, token=TOKEN, adapter_only=True)
    files = set(hub.files(repo))
    assert DENDRITE_TRAINED_BASE_NAME in files and not any(f.startswith("model") for f in files)
    reference = json.loads(hub.file(repo, DENDRITE_CONFIG_NAME))["base_model"]["reference"]
    assert reference == {"name_or_path": "tester/frozen-base", "revision": commit, "dtype": "float32"}

    inputs = tiny_inputs("bert")
    logits, meta = load_in_fresh_process(hub_env, tmp_path, repo, inputs)
    assert torch.equal(logits, outputs(dm)) and meta["counts"] == dm.dendrite_counts()

    # A later commit of the base changes its weights: the checkpoint still loads the commit it was trained on ...
    make_tiny("bert", seed=4).save_pretrained(tmp_path / "base2")
    api.upload_folder(folder_path=tmp_path / "base2", repo_id="tester/frozen-base")
    cache = str(tmp_path / "cache2")
    assert torch.equal(outputs(DendriticModel.from_pretrained(repo, token=TOKEN, cache_dir=cache)), outputs(dm))
    # ... and refuses the new one when asked for it.
    with pytest.raises(CheckpointError, match="fingerprint mismatch"):
        DendriticModel.from_pretrained(repo, token=TOKEN, cache_dir=cache, base_model="tester/frozen-base")

    # A full push over it replaces the adapter-only files (and the other way round).
    dm.push_to_hub(repo, token=TOKEN)
    assert "model.safetensors" in hub.files(repo) and DENDRITE_TRAINED_BASE_NAME not in hub.files(repo)


def dendritic_from(model):
    """`model` converted with grown, non-zero dendrites and a changed head (as after training)."""
    dm = get_dendritic_model(model, DendriteConfig(target_modules="all-linear", dendrite_seed=0, rank=4))
    dm.add_dendrites(2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in dm.dendrite_parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.3)
        dm.model.classifier.weight.add_(1.0)
    return dm.eval()

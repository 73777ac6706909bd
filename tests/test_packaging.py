"""The built wheel: what it declares and what it ships, used from outside the source tree.

Editable installs read the source tree, so a file missing from the wheel (the model card template reaches the package
through a link), a broken console script or metadata that disagrees with pyproject.toml would go unnoticed by every
other test. Here a real wheel is built, installed into its own folder and used by a separate process.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11")

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = "model_cards/dendritic_model_card.md"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the files a source distribution holds (the checkout stays untouched)."""
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"building needs setuptools>=77 (pyproject.toml [build-system]); found {setuptools.__version__}")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("hf_dendrites", "model_cards"):  # symlinks=True: hf_dendrites/model_cards stays a link, as in git
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    # No build isolation: nothing is downloaded; the setuptools that torch requires builds it.
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (built,) = (tmp / "dist").glob("hf_dendrites-*.whl")
    return built


def _read(wheel: Path, suffix: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(suffix)]
        return z.read(name).decode()


def test_wheel_metadata_matches_pyproject(wheel):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    metadata = _read(wheel, ".dist-info/METADATA").splitlines()
    requires = [line.split(": ", 1)[1] for line in metadata if line.startswith("Requires-Dist: ") and "extra ==" not in line]
    assert requires == project["dependencies"]
    assert "License-Expression: Apache-2.0" in metadata
    extras = {line.split(": ", 1)[1] for line in metadata if line.startswith("Provides-Extra: ")}
    assert extras == set(project["optional-dependencies"])
    assert "hf-dendrites = hf_dendrites.compare:main" in _read(wheel, ".dist-info/entry_points.txt")


def test_wheel_ships_the_package_and_the_card_template_only(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert z.read(f"hf_dendrites/{TEMPLATE}") == (ROOT / TEMPLATE).read_bytes()
    top = {n.split("/")[0] for n in names}
    assert "hf_dendrites" in top and len(top) == 2, top  # the package and its .dist-info, nothing else
    assert not [n for n in names if "/tests/" in n or "/benchmarks/" in n or n.endswith(".pyc")]


def test_installed_wheel_saves_loads_and_runs_its_console_script(wheel, tmp_path):
    target = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # PYTHONPATH comes before site-packages, where an editable install of the checkout may be: the wheel must win.
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    script = textwrap.dedent(
        """
        import json, sys
        import torch, transformers
        import hf_dendrites
        from hf_dendrites import DendriteConfig, DendriticModel, get_dendritic_model

        torch.manual_seed(0)
        model = transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37))
        dm = get_dendritic_model(model, DendriteConfig(target_modules=["intermediate.dense"], dendrite_seed=0))
        dm.add_dendrites()
        dm.save_pretrained("saved")
        loaded = DendriticModel.from_pretrained("saved")
        print(json.dumps({"file": hf_dendrites.__file__, "counts": loaded.dendrite_counts(),
                          "card": open("saved/README.md").read()}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(result["file"]).resolve().is_relative_to(target.resolve())
    assert result["counts"] == {"bert.encoder.layer.0.intermediate.dense": 1}
    assert "library_name: hf_dendrites" in result["card"]

    console = subprocess.run(
        [str(target / "bin" / "hf-dendrites"), "compare", "--help"], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=300,
    )
    assert console.returncode == 0, console.stdout[-3000:] + console.stderr[-3000:]
    assert "hf-dendrites compare" in console.stdout and "--model" in console.stdout


def test_docs_links_and_cited_files_exist():
    """docs/ is read on GitHub: every relative link and every repository file it names must exist, and the index
    must link every page."""
    import re

    docs = ROOT / "docs"
    pages = sorted(docs.glob("*.md"))
    assert (docs / "index.md") in pages
    missing = []
    for page in pages:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in target and not (docs / target).exists():
                missing.append(f"{page.name}: link {target}")
        for path in re.findall(r"`((?:hf_dendrites|tests|benchmarks|examples|model_cards|docs)/[\w./-]+)`", text):
            if not (ROOT / path).exists():
                missing.append(f"{page.name}: file {path}")
    assert not missing, missing
    linked = set(re.findall(r"\]\(([\w-]+\.md)\)", (docs / "index.md").read_text()))
    assert {p.name for p in pages} - {"index.md"} <= linked

"""`pipeline(task, model=dendritic_model)`: the dendritic model runs in transformers' pipelines for the tasks of the
model it wraps, with the outputs of its own forward / generate, and without an error-level message."""

import logging

import numpy as np
import pytest
import torch
import transformers
from conftest import make_tiny
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from hf_dendrites import DendriteConfig, get_dendritic_model

WORDS = ["good", "great", "bad", "awful", "the", "movie", "plot", "was", "very", "and"]


def tokenizer(with_cls: bool):
    """A word-level fast tokenizer over WORDS (ids below the tiny models' vocabulary of 99), built offline."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] if with_cls else ["<pad>", "<unk>"]
    vocab = {w: i for i, w in enumerate([*specials, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if with_cls:
        return transformers.PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
        )
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


def grown(name: str):
    """A tiny model with dendrites whose output weights are non-zero (so they change what the model computes)."""
    dm = get_dendritic_model(make_tiny(name), DendriteConfig(target_modules="all-linear", dendrite_seed=0))
    dm.add_dendrites(1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in dm.dendritic_layers():
            for p in layer.dendrite_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return dm.eval()


class Records(logging.Handler):
    """What transformers logs at its default verbosity (WARNING); the test session runs it at ERROR."""

    def __enter__(self):
        self.records, self.verbosity = [], transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_warning()
        logging.getLogger("transformers").addHandler(self)  # transformers' loggers do not propagate to the root
        return self

    def __exit__(self, *exc):
        logging.getLogger("transformers").removeHandler(self)
        transformers.logging.set_verbosity(self.verbosity)

    def emit(self, record):
        self.records.append(record)

    def errors(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.ERROR]


def test_text_generation_pipeline_generates_what_generate_does():
    dm, tok = grown("gpt2"), tokenizer(with_cls=False)
    with Records() as log:
        pipe = transformers.pipeline("text-generation", model=dm, tokenizer=tok, device="cpu")
        out = pipe("the movie was", max_new_tokens=6, do_sample=False, return_tensors=True)
    assert not log.errors(), log.errors()[0][:300]
    ids = tok("the movie was", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = dm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        # the same weights without the dendrites generate something else: the pipeline ran the dendrites
        base = make_tiny("gpt2").generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert out[0]["generated_token_ids"] == expected[0].tolist()
    assert base[0].tolist() != expected[0].tolist()


def test_text_classification_pipeline_scores_what_forward_does():
    dm, tok = grown("bert"), tokenizer(with_cls=True)
    text = "the plot was very good"
    with Records() as log:
        pipe = transformers.pipeline("text-classification", model=dm, tokenizer=tok, device="cpu")
        out = pipe(text, top_k=None)
    assert not log.errors(), log.errors()[0][:300]
    with torch.no_grad():
        probs = dm(**tok(text, return_tensors="pt")).logits.softmax(-1)[0]
        base = make_tiny("bert")(**tok(text, return_tensors="pt")).logits.softmax(-1)[0]
    scores = {r["label"]: r["score"] for r in out}
    assert scores == pytest.approx({dm.config.id2label[i]: float(p) for i, p in enumerate(probs)}, abs=1e-6)
    assert not torch.allclose(probs, base, atol=1e-3)  # the dendrites change the scores the pipeline gave


def test_image_classification_pipeline_scores_what_forward_does():
    dm = grown("vit")
    processor = transformers.ViTImageProcessor(size={"height": 16, "width": 16})
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8))
    with Records() as log:
        pipe = transformers.pipeline("image-classification", model=dm, image_processor=processor, device="cpu")
        out = pipe(image, top_k=3)
    assert not log.errors(), log.errors()[0][:300]
    with torch.no_grad():
        pixels = processor(image, return_tensors="pt").pixel_values
        probs = dm(pixel_values=pixels).logits.softmax(-1)[0]
        base = make_tiny("vit")(pixel_values=pixels).logits.softmax(-1)[0]
    scores = {r["label"]: r["score"] for r in out}
    assert scores == pytest.approx({dm.config.id2label[i]: float(p) for i, p in enumerate(probs)}, abs=1e-6)
    assert not torch.allclose(probs, base, atol=1e-3)


def test_a_task_the_wrapped_model_does_not_support_is_still_an_error():
    """Only the false error goes: a dendritic image classifier in a text-classification pipeline is named in it."""
    with Records() as log:
        transformers.pipeline("text-classification", model=grown("vit"), tokenizer=tokenizer(with_cls=True), device="cpu")
    assert any(
        "'DendriticModel' wraps a 'ViTForImageClassification', which is not supported for text-classification" in m
        for m in log.errors()
    ), log.errors()

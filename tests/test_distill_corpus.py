"""Issue 18 item 4: the generated distillation corpus (no held-out text in it), layer selection, and distillation
with the in-batch ranking term and resumable checkpoints, on a tiny random 4-layer BERT. Quality on MiniLM is
measured by a real run (README), not here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ecomserve.export.distill import _tensors, distill, distill_loss, ranking_loss
from ecomserve.export.distill_corpus import distillation_texts, normalise, training_texts
from ecomserve.export.pooled_encoder import PooledEncoder, load_encoder
from ecomserve.paths import corpus_texts
from ecomserve.spec import DistillSpec, EncoderSpec
from ecomserve.tokenization import TOKENIZER_FILE, TextTokenizer

DATA = Path(__file__).resolve().parents[1] / "src/ecomserve/data"
BUNDLED = "bundled:all-MiniLM-L6-v2"


def eval_and_parity_texts() -> list[str]:
    """Read here from the files themselves, so the test does not trust the generator's own list."""
    texts = [line for line in (DATA / "parity_texts.txt").read_text().splitlines() if line.strip()]
    for name in ("relevance.json", "typed.json"):
        data = json.loads((DATA / "eval" / name).read_text())
        texts += [p["title"] for p in data["products"]] + [q["text"] for q in data["queries"]]
    return texts


# ---------------------------------------------------------------------------------------------------------------
# The corpus


def test_the_generator_is_seeded_distinct_and_sized():
    texts = distillation_texts(5000, seed=3)
    assert len(texts) == 5000
    assert len({normalise(t) for t in texts}) == 5000
    assert distillation_texts(5000, seed=3) == texts
    assert distillation_texts(2000, seed=3) == texts[:2000]  # a smaller corpus is a prefix of a larger one
    assert distillation_texts(5000, seed=4) != texts


def test_generated_queries_are_short_and_there_are_far_more_texts_than_shipped():
    shipped = {normalise(t) for t in corpus_texts()}
    generated = [t for t in distillation_texts(20_000) if normalise(t) not in shipped]
    assert len(generated) > 18_000
    queries = [t for t in generated if t == t.lower()]
    titles = [t for t in generated if t != t.lower()]
    assert len(queries) > 4000 and len(titles) > 4000
    assert all(2 <= len(q.split()) <= 8 for q in queries)


def test_no_held_out_text_enters_either_corpus():
    held_out = eval_and_parity_texts()
    assert len(held_out) > 150
    exact = {t.casefold() for t in held_out}
    normalised = {normalise(t) for t in held_out}
    for texts in (distillation_texts(), training_texts(DistillSpec())):
        assert not [t for t in texts if t.casefold() in exact or normalise(t) in normalised]
    # The shipped corpus does hold some (a parity query, an eval title with other punctuation): the filter matters.
    assert [t for t in corpus_texts() if normalise(t) in normalised]


# ---------------------------------------------------------------------------------------------------------------
# Choosing layers


def test_layer_indices_are_validated_and_exclusive_with_keep_layers():
    EncoderSpec(name="s", source="x", layer_indices=[0, 2, 5], distill=DistillSpec(corpus_size=1000))
    for bad in ([2, 1], [0, 0], [-1, 2], []):
        with pytest.raises(ValueError, match="layer_indices"):
            EncoderSpec(name="s", source="x", layer_indices=bad)
    with pytest.raises(ValueError, match="set one"):
        EncoderSpec(name="s", source="x", keep_layers=2, layer_indices=[0, 1])
    with pytest.raises(ValueError, match="distill needs keep_layers or layer_indices"):
        EncoderSpec(name="s", source="x", distill=DistillSpec())


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory) -> Path:
    """A 4-layer, 32-wide random BERT with MiniLM's tokenizer. Initialised 10x wider than BERT's default: with
    the default, random layers barely move mean-pooled vectors and a 2-layer copy already matches the full model."""
    from transformers import BertConfig, BertModel

    from ecomserve.spec import resolve_source

    directory = tmp_path_factory.mktemp("tiny4")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        initializer_range=0.2,
    )
    BertModel(config).save_pretrained(directory)
    for name in (TOKENIZER_FILE, "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy2(resolve_source(BUNDLED) / name, directory / name)
    return directory


def test_load_encoder_keeps_the_chosen_layers(tiny4):
    full = load_encoder(tiny4, None)
    student = load_encoder(tiny4, None, [0, 3])
    assert len(student.encoder.layer) == 2 and student.config.num_hidden_layers == 2
    for kept, source in zip(student.encoder.layer, (full.encoder.layer[0], full.encoder.layer[3])):
        assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(), source.state_dict().values()))
    with pytest.raises(ValueError, match=r"layer_indices \[4\] but the model has only 4 layers"):
        load_encoder(tiny4, None, [0, 4])


# ---------------------------------------------------------------------------------------------------------------
# Distillation


def test_the_ranking_term_is_zero_only_for_the_teachers_ranking_and_differentiable():
    torch.manual_seed(0)
    target = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    assert ranking_loss(target, target, 0.05).item() == pytest.approx(0.0, abs=1e-6)
    vectors = torch.nn.functional.normalize(torch.randn(8, 16), dim=1).requires_grad_()
    loss = ranking_loss(vectors, target, 0.05)
    loss.backward()
    assert loss.item() > 0.01 and vectors.grad is not None and vectors.grad.abs().sum() > 0


def _models(directory: Path) -> tuple[PooledEncoder, PooledEncoder, TextTokenizer]:
    student = PooledEncoder(load_encoder(directory, None, [0, 3]), "mean")
    teacher = PooledEncoder(load_encoder(directory, None), "mean")
    return student, teacher, TextTokenizer(directory / TOKENIZER_FILE, 32)


def _mean_loss(student, teacher, tokenizer, texts, spec) -> float:
    batches = [_tensors(tokenizer, texts[i : i + spec.batch_size]) for i in range(0, len(texts), spec.batch_size)]
    with torch.no_grad():
        return sum(distill_loss(student(*b), teacher(*b), spec).item() for b in batches) / len(batches)


def test_distillation_learns_checkpoints_and_resumes(tiny4, tmp_path):
    texts = distillation_texts(320, seed=1)
    spec = DistillSpec(
        epochs=1, batch_size=16, learning_rate=1e-3, ranking_weight=1.0, checkpoint_dir=str(tmp_path / "ckpt")
    )
    student, teacher, tokenizer = _models(tiny4)
    before = _mean_loss(student, teacher, tokenizer, texts, spec)
    with torch.no_grad():
        ranking = ranking_loss(
            student(*_tensors(tokenizer, texts[:16])), teacher(*_tensors(tokenizer, texts[:16])), 0.05
        )
    assert ranking.item() > 0  # the untrained student does not rank as the teacher does
    first = distill(student, teacher, tokenizer, texts, spec)
    assert first.resumed_epochs == 0 and len(first.losses) == 1
    assert _mean_loss(student, teacher, tokenizer, texts, spec) < before
    assert len(list((tmp_path / "ckpt").glob("distill-*.pt"))) == 1
    assert len(list((tmp_path / "ckpt").glob("teacher-*.pt"))) == 1

    # A longer run of the same student, spec and corpus starts after the finished epoch.
    longer = spec.model_copy(update={"epochs": 2})
    resumed, _, _ = _models(tiny4)
    second = distill(resumed, teacher, tokenizer, texts, longer)
    assert second.resumed_epochs == 1 and second.losses[0] == first.losses[0] and len(second.losses) == 2

    # Everything asked for is in the checkpoint: no training, the saved student comes back.
    again, _, _ = _models(tiny4)
    third = distill(again, teacher, tokenizer, texts, longer)
    assert third.resumed_epochs == 2 and third.losses == second.losses
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), resumed.state_dict().values()))

    # Another corpus is another run: nothing is resumed.
    fresh, _, _ = _models(tiny4)
    assert distill(fresh, teacher, tokenizer, texts[:160], spec).resumed_epochs == 0


def test_a_distilled_student_of_chosen_layers_builds_as_static_int8_through_the_same_gates(tiny4, tmp_path):
    from ecomserve.export.parity import MIN_COSINE
    from ecomserve.export.pipeline import export_encoder
    from ecomserve.runtime import load_runner

    distill_spec = DistillSpec(epochs=1, corpus_size=600, ranking_weight=1.0, checkpoint_dir=str(tmp_path / "ckpt"))
    encoder = EncoderSpec(
        name="student", source=str(tiny4), max_seq_len=32, precision="int8", layer_indices=[0, 3], distill=distill_spec
    )
    report = export_encoder(encoder, tiny4, tmp_path / "out")
    assert [stage["stage"] for stage in report["stages"]] == ["onnx fp32", "onnxruntime int8 static"]
    assert report["stages"][-1]["min_cosine"] >= MIN_COSINE["int8"]
    assert len(report["distill_losses"]) == 1 and list((tmp_path / "ckpt").glob("distill-*.pt"))
    # The exported graph is the 2-layer student: it answers as the distilled PyTorch model does, not the teacher.
    tokenizer = TextTokenizer(tiny4 / TOKENIZER_FILE, 32)
    batch = tokenizer.encode(["stainless steel water bottle 750ml", "Norvik Wireless Earbuds, Black"])
    exported = load_runner("onnxruntime", tmp_path / "out" / "model.onnx")(batch.input_ids, batch.attention_mask)
    teacher = PooledEncoder(load_encoder(tiny4, None), "mean")
    with torch.no_grad():
        full = teacher(torch.as_tensor(batch.input_ids), torch.as_tensor(batch.attention_mask)).numpy()
    assert exported.shape == (2, 32) and abs(exported - full).max() > 1e-3

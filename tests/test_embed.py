"""Description embeddings: MiniLM and LLM pooling, the on-disk cache."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

import lightning_modules.embed as embed
from tests.conftest import compose_run

TEXTS = [
    "The name of this location is \"Joe's Pizza\" and its POI category is Pizza Place, belonging to the parent category Food.",
    "The name of this location is \"Tony's Pizzeria\" and its POI category is Pizza Place, belonging to the parent category Food.",
    "The name of this location is \"Grand Central\" and its POI category is Train Station, belonging to the parent category Travel & Transport.",
]


def test_minilm_embeddings_are_normalised_and_semantic(tmp_path) -> None:
    vectors = embed.embed_texts(TEXTS, "minilm", None, tmp_path, progress=False)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sim = vectors @ vectors.T
    assert sim[0, 1] > sim[0, 2]  # two pizza places are closer than a pizza place and a station


def test_llm_mean_pooling_and_cache(model_cache, monkeypatch) -> None:
    llm = compose_run(["llm=tiny_random"]).llm
    # Texts new to the cache, so the first call must compute them.
    texts = [f"{t} ({uuid.uuid4().hex})" for t in TEXTS]
    first = embed.embed_texts(texts, "llm", llm, model_cache, progress=False)
    assert first.shape == (3, llm.hidden_size) and np.isfinite(first).all()
    assert not np.allclose(first[0], first[2])

    def no_model(*args, **kwargs):
        raise AssertionError("cached embeddings must not load a model")

    monkeypatch.setattr(embed, "_Encoder", no_model)
    again = embed.embed_texts(list(reversed(texts)), "llm", llm, model_cache, progress=False)
    assert np.array_equal(again, first[::-1])
    assert embed.cache_key("llm", llm, 1024) != embed.cache_key("minilm", llm, 1024)


def test_unknown_embedder(tmp_path) -> None:
    with pytest.raises(ValueError, match="embedder"):
        embed.embed_texts(["x"], "word2vec", None, tmp_path, progress=False)


def test_interrupted_run_keeps_its_progress(tmp_path, monkeypatch) -> None:
    """A killed embedding run (hours for an LLM on a CPU) resumes where it stopped."""
    embedded: list[str] = []
    fail_after = {"batches": 1}

    class Flaky:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def __call__(self, texts: list[str]) -> np.ndarray:
            if fail_after["batches"] == 0:
                raise RuntimeError("killed")
            fail_after["batches"] -= 1
            embedded.extend(texts)
            return np.ones((len(texts), 4), dtype=np.float32)

    monkeypatch.setattr(embed, "_Encoder", Flaky)
    texts = [f"text {i}" for i in range(4)]
    with pytest.raises(RuntimeError, match="killed"):
        embed.embed_texts(texts, "minilm", None, tmp_path, batch_size=2, flush_seconds=0, progress=False)
    assert len(embedded) == 2
    fail_after["batches"] = 10
    vectors = embed.embed_texts(texts, "minilm", None, tmp_path, batch_size=2, flush_seconds=0, progress=False)
    # Only the two texts not saved before the kill were embedded again.
    assert len(embedded) == 4 and sorted(embedded) == sorted(texts)
    assert vectors.shape == (4, 4)


def test_concurrent_runs_do_not_drop_each_others_vectors(tmp_path, monkeypatch) -> None:
    """Two runs sharing a cache (a sweep, a test beside a long experiment) each write what they
    embedded; the second write merges instead of replacing the first run's vectors."""
    monkeypatch.setattr(embed, "_Encoder", lambda *a, **k: (lambda texts: np.ones((len(texts), 3), np.float32)))
    path = tmp_path / "embeddings" / f"{embed.cache_key('minilm', None, 256)}.parquet"
    embed.embed_texts(["only in run A"], "minilm", None, tmp_path, max_length=256, progress=False)
    # Run B read the (empty) cache before A wrote, so its in-memory dict lacks A's vector.
    embed._write_cache(path, {embed.text_hash("only in run B"): np.zeros(3, np.float32)})
    merged = embed._read_cache(path)
    assert set(merged) == {embed.text_hash("only in run A"), embed.text_hash("only in run B")}


def test_a_random_llm_cache_is_keyed_by_its_seed(model_cache) -> None:
    """Regression: the key lacked the seed, so a warm cache returned another seed's vectors (and other codes)."""
    llm = compose_run(["llm=tiny_random"]).llm
    texts = [f"{t} ({uuid.uuid4().hex})" for t in TEXTS]
    assert embed.cache_key("llm", llm, 1024, seed=1) != embed.cache_key("llm", llm, 1024, seed=2)
    cold_1 = embed.embed_texts(texts, "llm", llm, model_cache, seed=1, progress=False)
    cold_2 = embed.embed_texts(texts, "llm", llm, model_cache, seed=2, progress=False)
    warm_1 = embed.embed_texts(texts, "llm", llm, model_cache, seed=1, progress=False)
    assert not np.allclose(cold_1, cold_2), "two seeds, two models, two sets of vectors"
    assert np.array_equal(warm_1, cold_1), "a warm cache gives what a cold one computes"


def test_minilm_reads_at_most_its_512_positions(tmp_path, caplog) -> None:
    """Regression: embed_max_length=1024 with MiniLM died on the first description over 512 tokens."""
    assert embed.effective_max_length("minilm", None, 1024) == 512
    assert embed.effective_max_length("minilm", None, 256) == 256
    assert embed.cache_key("minilm", None, embed.effective_max_length("minilm", None, 1024)).endswith("-512")
    long_text = " ".join(["Coffee Shop, 71(avg: 63);"] * 300)  # far over 512 word pieces
    with caplog.at_level("INFO"):
        vectors = embed.embed_texts([long_text, TEXTS[0]], "minilm", None, tmp_path, max_length=1024, progress=False)
    assert vectors.shape == (2, 384) and np.isfinite(vectors).all()
    assert any("512 positions" in r.getMessage() for r in caplog.records)

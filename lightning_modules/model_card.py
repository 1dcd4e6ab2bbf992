"""The model card (``model/README.md``) of an aligned model: what a person who was sent the folder
needs to know to trust and reload it.

The alignment stage writes it with what it knows (base model, data, tokenizer, objectives, training
settings, the command); the test stage rewrites it with the test metrics and their intervals. The
card is left out of the folder's manifest, so completing it never makes the model look edited.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datamodules.artifacts import write_text_atomic
from lightning_modules.results import results_markdown

CARD = "README.md"


def _front_matter(meta: dict[str, Any]) -> str:
    lines = ["---", "library_name: peft", "pipeline_tag: text-generation", "tags: [qt-mob, mobility, location-tokens, lora]"]
    if meta.get("base_model_hub"):
        lines.append(f"base_model: {meta['base_model_hub']}")
    return "\n".join(lines + ["---", ""])


def _metrics_section(results: dict[str, Any] | None) -> list[str]:
    if not results:
        return ["## Results", "", "Not tested yet: `stage=test` of the same command writes the metrics here.", ""]

    body = results_markdown(results).split("\n", 1)[1].strip()  # the test stage's results.md without its title
    return ["## Results", "", f"Test split of `{results.get('dataset')}`, constrained beam search ({results.get('num_beams')} beams), "
            "the model and every baseline on the same cases.", "", body, ""]


def model_card(meta: dict[str, Any], results: dict[str, Any] | None = None) -> str:
    """The card's Markdown.

    Args:
        meta: ``qtmob.json`` of the folder (base model, training settings, command).
        results: ``results.json`` of the test stage, when there is one.
    """
    train = meta.get("training", {})
    base = meta.get("base_model_hub") or meta.get("base_model")
    source = meta.get("base_weights") or "the base model's own weights"
    lines = [
        _front_matter(meta),
        f"# QT-Mob location tokens for {meta.get('llm', base)} — {meta.get('dataset', '?')}",
        "",
        "A LoRA adapter (with the embedding rows of the new location tokens) that teaches the base model "
        "a few discrete tokens per place, learned by an RQ-VAE over place descriptions (QT-Mob, arXiv 2506.11109). "
        "The model answers next-location and trajectory-recovery questions with a place's tokens.",
        "",
        "## Base model",
        "",
        f"- `{base}`; trained on {source}.",
        f"- Quantisation during training: `{meta.get('quantization')}`; new tokens trained as `{meta.get('new_tokens_mode')}` "
        f"({meta.get('trainable_params', 0):,} trainable parameters).",
        "",
        "## Data and tokenizer",
        "",
        f"- Dataset: `{meta.get('dataset', '?')}`, {meta.get('locations', '?')} places.",
        f"- Location tokenizer: `{meta.get('tokenizer', '?')}`, {meta.get('code_levels', '?')} levels × "
        f"{meta.get('codebook_size', '?')} codes; `codes.parquet` and `index.json` map every place to its tokens.",
        "",
        "## Training",
        "",
        f"- Objectives: {', '.join(train.get('tasks', [])) or '?'}" + (f" (weights {train['weights']})" if train.get("weights") else ""),
        f"- {train.get('steps', '?')} steps, batch {train.get('batch_size', '?')}, lr {train.get('lr', '?')}, "
        f"LoRA r={train.get('lora_r', '?')} α={train.get('lora_alpha', '?')} on {', '.join(train.get('lora_targets', []))}"
        + (f" of the top {train['lora_layers']} layers only" if train.get("lora_layers") else "") + ", "
        f"max_length {train.get('max_length', '?')}, prompt format `{meta.get('prompt_format')}`, visits written `{meta.get('visit_text', 'official')}`, precision {train.get('precision', '?')}.",
        f"- Made with: `{meta.get('command', 'python run.py')}`",
        "",
        *_metrics_section(results),
        "## Use",
        "",
        "Load the base model, resize its embeddings to the tokenizer of this folder, then attach the adapter "
        "(`PeftModel.from_pretrained`); decode with a prefix constraint so that every answer is a valid place "
        "(`location_tokenizers.trie.CodeTrie.prefix_allowed_tokens_fn`). `qtmob.json` holds the prompt layout and an "
        "example prompt; the suite's README has a 20-line example.",
        *([
            "",
            "This model was trained with `align.code_softmax=level`: each code token's probability is normalised over "
            "the code tokens of its level, not the vocabulary. `generate` scores beams over the vocabulary, so its "
            "ranking can differ from the suite's; `lightning_modules.constrained_decoding.beam_search(..., "
            "code_softmax=\"level\")` ranks as the test did.",
        ] if train.get("code_softmax") == "level" else []),
        "",
    ]
    return "\n".join(lines)


def write_model_card(folder: str | Path, meta: dict[str, Any], results: dict[str, Any] | None = None) -> Path:
    """Write ``<folder>/README.md`` (via a temporary file and a rename)."""

    path = Path(folder) / CARD
    write_text_atomic(path, model_card(meta, results))
    return path


__all__ = ["CARD", "model_card", "write_model_card"]

"""The aligned model as a file others can use: save it (adapter, tokenizer, codes, ``qtmob.json``,
model card), load it back with plain transformers + peft, and look at what it writes (greedy samples
for the dashboards)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lightning_modules.model_card import write_model_card
from location_tokenizers.codes import CodeTable


def greedy_generate(model: torch.nn.Module, encoder: Any, prompts: list[str], max_new_tokens: int = 48) -> list[str]:
    """Unconstrained greedy continuations of chat-formatted prompts (for the TensorBoard samples)."""
    was_training = model.training
    model.eval()
    try:
        batch = encoder.prompt_batch(prompts, device=next(model.parameters()).device)
        with torch.no_grad():
            out = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=encoder.pad_id,
                eos_token_id=encoder.tokenizer.convert_tokens_to_ids(encoder.end) if encoder.end else None,
            )
        new = out[:, batch["input_ids"].shape[1] :]
        return [encoder.tokenizer.decode(row, skip_special_tokens=False).replace(encoder.tokenizer.pad_token, "") for row in new]
    finally:
        model.train(was_training)


def save_aligned(folder: Path, model: Any, tokenizer: Any, table: CodeTable, info: dict[str, Any], encoder: Any,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Adapter + tokenizer + code table + ``qtmob.json`` + model card in one folder; returns the
    ``qtmob.json`` content.

    Made to be sent: ``adapter_config.json`` names the base by its Hub id (not this machine's cache
    folder); with ``align.new_tokens=rows`` only the trained rows of the new tokens are saved (peft's
    ``trainable_tokens_delta``), not the whole resized embedding matrix that peft saves by default
    after a vocabulary resize (236 MB instead of ~8 MB for SmolLM2). ``frozen`` keeps peft's default:
    its new rows are the seeded initial ones, which a reload could not rebuild otherwise.
    """

    peft_cfg = model.peft_config[model.active_adapter]
    local = peft_cfg.base_model_name_or_path
    if info.get("base_model_hub"):
        peft_cfg.base_model_name_or_path = info["base_model_hub"]
    try:
        model.save_pretrained(folder, save_embedding_layers="auto" if info.get("new_tokens_mode") == "frozen" else False)
    finally:
        peft_cfg.base_model_name_or_path = local
    tokenizer.save_pretrained(folder)
    table.write_parquet(folder / "codes.parquet")
    table.to_index_json(folder / "index.json")
    meta = {
        **{k: v for k, v in info.items() if k not in ("new_token_ids", "base_model")},
        # The Hub id where there is one; a random test model has only its local folder.
        "base_model": info.get("base_model_hub") or info.get("base_model"),
        "vocab_size": len(tokenizer),
        "code_levels": table.num_levels, "codebook_size": table.codebook_size, "locations": len(table),
        "system_prompt": encoder.system_prompt,
        "prompt_format": encoder.prompt_format,
        "chat": {"head": encoder.head, "tail": encoder.tail, "end": encoder.end},
        **(extra or {}),
    }
    (folder / "qtmob.json").write_text(json.dumps(meta, indent=2) + "\n")
    write_model_card(folder, meta)
    return meta


def load_aligned(folder: str | Path, base_model: str | None = None, **kwargs: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Reload an aligned model with plain transformers + peft: base → resize → adapter.

    Args:
        folder: The stage's ``model/`` folder.
        base_model: Base model folder or Hub id (default: the one recorded in ``qtmob.json``, a Hub id
            for hub and packaged models). The suite passes its local copy, so nothing is downloaded.
        **kwargs: Passed to the base model's ``from_pretrained`` (``dtype``, ``quantization_config``).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    meta = json.loads((folder / "qtmob.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(base_model or meta["base_model"], **kwargs)
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return PeftModel.from_pretrained(base, folder), tokenizer, meta

"""Alignment stage: chat encoding, label masking, batching, trainable parameters, NF4 on CPU,
learning on a fixed batch, trainable-only checkpoints, and a saved folder that plain
transformers + peft reload to the same logits."""

from __future__ import annotations

import json
import logging
from collections import Counter

import numpy as np
import polars as pl
import pytest
import torch

from datamodules.mobility_datamodule import LengthGroupedBatchSampler, TaskMixtureSampler
from lightning_modules.alignment_module import OBJECTIVE
from tests.conftest import compose_cfg, compose_run, run_pipeline


@pytest.fixture(scope="module")
def smoke_art(tmp_path_factory, model_cache):
    """Data and tokenizer artefacts of experiment=smoke (tiny random LLM, synthetic city)."""
    from pipeline.data import run_data_stage
    from pipeline.tokenizer import run_tokenizer_stage

    art = tmp_path_factory.mktemp("align_art")
    cfg = compose_cfg(["experiment=smoke", f"paths.artifacts={art}", f"paths.cache={model_cache}", "tokenizer.progress_bar=false"])
    run_data_stage(cfg)
    run_tokenizer_stage(cfg)
    return art


def smoke_cfg(art, model_cache, *overrides: str):
    return compose_run(["experiment=smoke", f"paths.artifacts={art}", f"paths.cache={model_cache}", *overrides])


@pytest.fixture(scope="module")
def parts(smoke_art, model_cache):
    from pipeline.align import build_alignment

    return build_alignment(smoke_cfg(smoke_art, model_cache))


def test_labels_cover_the_answer_only(parts) -> None:
    enc, dm, tok = parts["encoder"], parts["datamodule"], parts["tokenizer"]
    samples = dm.samples("train")
    encoded = dm.encoded("train")
    rows = [0, len(samples) // 2, len(samples) - 1]
    batch = enc.collate([(*encoded.sample(i), i, encoded.task[i]) for i in rows])
    for r, i in enumerate(rows):
        labelled = batch["labels"][r][batch["labels"][r] != -100]
        text = tok.decode(labelled)
        assert text == samples["target"][i] + enc.end, "labels must be exactly the answer and the end-of-turn token"
        mask = batch["attention_mask"][r].bool()
        prompt = tok.decode(batch["input_ids"][r][mask][: len(batch["input_ids"][r][mask]) - len(labelled)])
        assert prompt.startswith(enc.head) and prompt.endswith(samples["response_prefix"][i])
        assert (batch["labels"][r][~mask] == -100).all()


def test_chat_template_and_code_tokens_are_single_tokens(parts) -> None:
    tok, table = parts["tokenizer"], parts["table"]
    code = table.strings()["code"][0]
    ids = tok(code, add_special_tokens=False)["input_ids"]
    assert len(ids) == table.num_levels, f"{code} should be {table.num_levels} tokens, got {tok.convert_ids_to_tokens(ids)}"
    assert parts["encoder"].head.startswith("<|im_start|>system")


def test_only_intended_parameters_train(smoke_art, model_cache, parts) -> None:
    from pipeline.align import build_alignment

    def trainable(model):
        return [n for n, p in model.named_parameters() if p.requires_grad]

    rows = trainable(parts["model"])
    assert rows and all(("lora_" in n) or ("trainable_tokens_delta" in n) for n in rows)
    assert sum("trainable_tokens_delta" in n for n in rows) == 1
    targets = set(parts["model"].peft_config["default"].target_modules)
    assert {n.split(".")[-4] for n in rows if "lora_" in n} == targets
    modules = build_alignment(smoke_cfg(smoke_art, model_cache, "align.new_tokens=modules"))["model"]
    names = trainable(modules)
    assert {n for n in names if "lora_" not in n} == {
        "base_model.model.model.embed_tokens.modules_to_save.default.weight",
        "base_model.model.lm_head.modules_to_save.default.weight",
    }
    # The base weights themselves stay frozen in both modes.
    assert not any(n.endswith("base_layer.weight") for n in rows + names)


def test_task_mixture_proportions_hold_through_length_grouping() -> None:
    tasks = ["next"] * 700 + ["recovery_single"] * 200 + ["translation"] * 100
    lengths = np.random.default_rng(0).integers(50, 900, size=len(tasks))
    natural = LengthGroupedBatchSampler(TaskMixtureSampler(tasks, seed=3), lengths, batch_size=8, group_batches=16)
    drawn = [i for b in natural for i in b]
    assert sorted(drawn) == list(range(len(tasks))), "natural proportions: every sample exactly once per epoch"
    weights = {"next": 1.0, "recovery_single": 1.0, "translation": 2.0}
    mixed = LengthGroupedBatchSampler(TaskMixtureSampler(tasks, weights, num_samples=8000, seed=3), lengths, 8, 16)
    counts = Counter(tasks[i] for b in mixed for i in b)
    for task, w in weights.items():
        assert counts[task] / 8000 == pytest.approx(w / 4, abs=0.02)


def test_length_grouping_keeps_padding_low(parts) -> None:
    dm = parts["datamodule"]
    loader = dm.train_dataloader()
    real = total = 0
    for batch in loader:
        real += int(batch["attention_mask"].sum())
        total += batch["attention_mask"].numel()
    assert 1 - real / total < 0.10, f"padding share {1 - real / total:.3f}"


def test_ddp_ranks_split_batches() -> None:
    lengths = np.arange(100)
    ranks = [LengthGroupedBatchSampler(TaskMixtureSampler(["next"] * 100, seed=1), lengths, 4, 5, rank=r, world_size=2) for r in (0, 1)]
    a, b = ([i for batch in s for i in batch] for s in ranks)
    assert len(list(ranks[0])) == len(list(ranks[1])) == len(ranks[0]) and not set(a) & set(b)


def test_loss_falls_on_a_fixed_batch(parts) -> None:
    module, dm = parts["module"], parts["datamodule"]
    torch.manual_seed(0)
    batch = next(iter(dm.train_dataloader()))
    params = [p for p in module.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3)
    module.model.train()
    losses = []
    for _ in range(25):
        loss = module.model_step(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


def test_model_step_matches_the_hf_loss(parts) -> None:
    """Applying the head at answer positions only gives the same loss as the full forward."""
    module, dm = parts["module"], parts["datamodule"]
    batch = next(iter(dm.val_dataloader()))
    module.model.eval()
    module.hparams.loss_reduction = "token"  # HF's loss is the token mean
    try:
        with torch.no_grad():
            ours = module.model_step(batch)
            hf = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    finally:
        module.hparams.loss_reduction = "sample"
    assert float(ours["loss"]) == pytest.approx(float(hf), rel=1e-4)
    assert set(batch["task"]) <= set(OBJECTIVE)


def test_over_long_samples_lose_their_oldest_visits_in_every_split(parts) -> None:
    """The data module applies the length rule with the model's tokenizer: no sample is cut by tokens,
    the history is, and validation prompts follow the same rule as training."""
    from datamodules.mobility_datamodule import MobilityDataModule
    from datamodules.prompts import SYSTEM_PROMPT
    from lightning_modules.chat_encoding import ChatEncoder

    base, tok = parts["datamodule"], parts["tokenizer"]
    enc = ChatEncoder(tok, SYSTEM_PROMPT, max_length=720)  # the profile alone is ~450 tokens
    dm = MobilityDataModule(base.data_dir, codes=base.codes, tasks=["next", "recovery_single"], encoder=enc,
                            sample_cfg=base.sample_cfg, eval_per_task=16)
    full = base.samples("train").filter(pl.col("task") == "next")
    for split in ("train", "valid"):
        encoded = dm.encoded(split)
        assert encoded.truncated == 0 and encoded.lengths.max() <= 720
        assert dm.cut_history[split]["next"] > 0
    fitted = dm.samples("train").filter(pl.col("task") == "next")
    assert fitted["target"].to_list() == full["target"].to_list()
    shorter = [(a, b) for a, b in zip(full["prompt"].to_list(), fitted["prompt"].to_list()) if a != b]
    assert len(shorter) == dm.cut_history["train"]["next"]
    for old, new in shorter:
        assert new.startswith(old[: old.index("Here is the current trajectory")]), "the profile stays"
        assert new.endswith(old[old.rindex("Given this trajectory") :]), "the question stays"
        assert old.endswith(new[new.index("At time") :]), "the most recent visits stay"


def test_official_inst_layout(parts) -> None:
    """align.prompt_format=inst: "<bos>[INST] system + prompt [/INST] prefix" + answer + <eos>, labels on
    the answer and <eos> only."""
    from datamodules.prompts import SYSTEM_PROMPT
    from lightning_modules.chat_encoding import ChatEncoder

    tok, dm = parts["tokenizer"], parts["datamodule"]
    enc = ChatEncoder(tok, SYSTEM_PROMPT, max_length=4096, prompt_format="inst")
    sample = dm.samples("train").filter(pl.col("task") == "next").head(1)
    text = enc.prompt_texts(sample)[0]
    assert text.startswith(f"{tok.bos_token}[INST] {SYSTEM_PROMPT}\n") and " [/INST] " in text
    assert text.endswith(" [/INST] " + sample["response_prefix"][0])
    encoded = enc.encode(sample)
    batch = enc.collate([(*encoded.sample(0), 0, "next")])
    labelled = batch["labels"][0][batch["labels"][0] != -100]
    assert tok.decode(labelled) == sample["target"][0] + tok.eos_token
    with pytest.raises(ValueError, match="prompt_format"):
        ChatEncoder(tok, SYSTEM_PROMPT, prompt_format="alpaca")


def test_loss_reduction_gives_each_sample_the_same_weight(parts) -> None:
    """A 5-token and a 500-token answer: with ``sample`` each is half the loss; with ``token`` the long
    one dominates. A short batch (the last one, or a rank's under DDP) keeps the per-sample weight."""
    from lightning_modules.alignment_module import AlignmentModule

    enc, model = parts["encoder"], parts["model"]
    rng = np.random.default_rng(0)
    prompt = rng.integers(10, 1000, size=20)
    short = (np.concatenate([prompt, rng.integers(10, 1000, size=5)]).astype(np.int32), 20, 0, "next")
    long = (np.concatenate([prompt, rng.integers(10, 1000, size=500)]).astype(np.int32), 20, 1, "index2loc")
    batch = enc.collate([short, long])
    sample = AlignmentModule(model, tasks=["next", "index2loc"], loss_reduction="sample", batch_size=2)
    token = AlignmentModule(model, tasks=["next", "index2loc"], loss_reduction="token", batch_size=2)
    model.eval()
    with torch.no_grad():
        out = sample.model_step(batch)
        means = out["sample_loss"] / out["sample_tokens"]
        assert out["sample_tokens"].tolist() == [5, 500]
        assert float(out["loss"]) == pytest.approx(0.5 * float(means[0]) + 0.5 * float(means[1]), rel=1e-5)
        tok = token.model_step(batch)
        assert float(tok["loss"]) == pytest.approx((5 * float(means[0]) + 500 * float(means[1])) / 505, rel=1e-5)
        # The short sample alone in a batch of nominal size 2: the same weight (1/2) as beside the long one.
        alone = sample.model_step(enc.collate([short]))
        assert float(alone["loss"]) == pytest.approx(0.5 * float(means[0]), rel=1e-4)
    with pytest.raises(ValueError, match="loss_reduction"):
        AlignmentModule(model, tasks=["next"], loss_reduction="median")


def test_nf4_path_runs_on_cpu(smoke_art, model_cache) -> None:
    import bitsandbytes as bnb

    from pipeline.align import build_alignment

    p = build_alignment(smoke_cfg(smoke_art, model_cache, "align.quantization=nf4", "align.gradient_checkpointing=true"))
    layers = [m for m in p["model"].modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and layers[0].weight.quant_type == "nf4" and layers[0].weight.quant_state.nested
    module, dm = p["module"], p["datamodule"]
    module.model.train()
    batch = next(iter(dm.train_dataloader()))
    loss = module.model_step(batch)["loss"]
    loss.backward()
    grads = [q.grad for q in module.model.parameters() if q.requires_grad]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)


def adapted_layers(model: torch.nn.Module) -> set[str]:
    """The indices of the decoder layers that hold LoRA adapters."""
    return {n.split(".layers.")[1].split(".")[0] for n, _ in model.named_parameters() if "lora_A" in n}


@pytest.mark.parametrize("lora_layers", [0, 1])
def test_stage_saves_a_folder_that_plain_peft_reloads(smoke_art, model_cache, lora_layers) -> None:
    """Trained, saved, reloaded with transformers + peft alone: the same logits and rankings. With
    align.lora_layers=1 (the quick start's setting on the 2-layer tiny Llama) the adapter config keeps
    the layers it transforms, so the reload puts the adapters where training had them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.align import build_alignment, run_align_stage

    name = f"reload{lora_layers}"
    cfg = smoke_cfg(smoke_art, model_cache, "align.train_samples=32", "align.num_generations=1", f"run_name={name}",
                    f"align.lora_layers={lora_layers}")
    result = run_align_stage(cfg)
    folder = smoke_art / "synthetic" / name / "model"
    assert result["steps"] == 4 and (folder / "adapter_model.safetensors").is_file()
    adapter_cfg = json.loads((folder / "adapter_config.json").read_text())
    assert adapter_cfg["layers_to_transform"] == ([1] if lora_layers else None)
    ckpt = torch.load(smoke_art / "synthetic" / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert all(("lora_" in k) or ("trainable_tokens" in k) for k in ckpt["state_dict"]), "checkpoint holds trainable parameters only"
    # Reload with transformers + peft alone, as a user of the folder would.
    meta = json.loads((folder / "qtmob.json").read_text())
    tok = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(meta["base_model"], dtype=torch.float32)
    base.resize_token_embeddings(len(tok), mean_resizing=False)
    reloaded = PeftModel.from_pretrained(base, folder).eval()
    assert adapted_layers(reloaded) == ({"1"} if lora_layers else {"0", "1"})
    # The trained model: rebuild and load the final weights from the checkpoint.
    trained = build_alignment(cfg)["module"]
    trained.load_state_dict(ckpt["state_dict"], strict=False)
    trained.model.eval()
    ids = tok(["<|im_start|>user\nWhere next? " + "".join(next(iter(json.loads((folder / "index.json").read_text()).values())))], return_tensors="pt")
    with torch.no_grad():
        a = reloaded(**ids).logits
        b = trained.model(**ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # ... and to the same rankings under the suite's constrained beam search.
    from lightning_modules.chat_encoding import ChatEncoder
    from lightning_modules.ranking import rank_prompts
    from location_tokenizers.codes import CodeTable
    from location_tokenizers.trie import CodeTrie

    trie = CodeTrie(CodeTable.read_parquet(folder / "codes.parquet"), tok, vocab_size=int(base.config.vocab_size))
    encoder = ChatEncoder(tok, meta["system_prompt"], max_length=1024, prompt_format=meta["prompt_format"])
    prompts = [meta["example"]["prompt"]] * 2
    with torch.no_grad():
        ranked_reloaded, _ = rank_prompts(reloaded, encoder, trie, prompts, 5, 2)
        ranked_trained, _ = rank_prompts(trained.model, encoder, trie, prompts, 5, 2)
    np.testing.assert_array_equal(ranked_reloaded, ranked_trained)
    # A second run of the same config reuses the artefacts.
    assert run_align_stage(cfg)["fingerprint"] == result["fingerprint"]


def test_the_saved_folder_can_be_shared(smoke_art, model_cache) -> None:
    """Only the new rows (not the resized embedding matrix), readable files, a filled model card, and
    an example prompt; the adapter of the quick start's SmolLM2 settings is under 20 MB."""
    import stat

    from safetensors import safe_open

    from lightning_modules.aligned_model import save_aligned
    from lightning_modules.llm import base_identity

    cfg = smoke_cfg(smoke_art, model_cache, "align.train_samples=8", "align.num_generations=0", "eval.val_cases=0", "run_name=share")
    from pipeline.align import run_align_stage

    run_align_stage(cfg)
    folder = smoke_art / "synthetic" / "share" / "model"
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert not any(k.endswith("embed_tokens.weight") or k.endswith("lm_head.weight") for k in shapes), shapes
    assert [v for k, v in shapes.items() if "trainable_tokens" in k] == [(256, 128)], "4 x 64 new token rows of width 128"
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    card = (folder / "README.md").read_text()
    assert "library_name: peft" in card and "Objectives: next" in card and "python run.py" in card
    meta = json.loads((folder / "qtmob.json").read_text())
    assert meta["example"]["prompt"].endswith(meta["example"]["prompt"][-20:]) and meta["example"]["target_loc"] >= 0
    # SmolLM2 with the quick start's adapter settings: the Hub id in the adapter config, <= 20 MB.
    qs = compose_cfg(["experiment=quickstart", f"paths.artifacts={smoke_art}", f"paths.cache={model_cache}"])
    assert base_identity(qs.llm)["base_model_hub"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    from datamodules.prompts import SYSTEM_PROMPT
    from lightning_modules.chat_encoding import ChatEncoder
    from lightning_modules.llm import build_peft_model
    from location_tokenizers.codes import all_code_tokens
    from pipeline.paths import load_codes

    table = load_codes(cfg)  # the smoke city's 4 x 64 codes: the quick start's shape
    model, tokenizer, info = build_peft_model(qs.llm, qs.align, model_cache, all_code_tokens(4, 64), seed=0)
    out = smoke_art / "smollm2_adapter"
    out.mkdir()
    save_aligned(out, model, tokenizer, table, info, ChatEncoder(tokenizer, SYSTEM_PROMPT))
    size = (out / "adapter_model.safetensors").stat().st_size
    assert size <= 20 * 2**20, f"{size / 2**20:.1f} MB"
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert json.loads((out / "qtmob.json").read_text())["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.slow
def test_ten_smollm2_steps_on_nyc_samples(nyc_release, tmp_path, model_cache) -> None:
    """SmolLM2-135M, NF4 + checkpointing, on the release's own samples and index (tokenizer=released)."""
    cfg = compose_cfg([
        "experiment=nyc_qlora_cpu", f"data.root={nyc_release}", f"paths.artifacts={tmp_path}", f"paths.cache={model_cache}",
        "tokenizer=released", "align.quantization=nf4", "align.new_tokens=rows", "align.gradient_checkpointing=true",
        "align.batch_size=2", "align.max_length=512", "align.eval_per_task=2", "align.num_generations=1",
        "eval.val_cases=2", "trainer.max_steps=10", "trainer.val_check_interval=10", "trainer.log_every_n_steps=2",
    ])
    res = run_pipeline(cfg, "align")  # the data and tokenizer stages first, as run.py does
    assert res["steps"] == 10 and res["llm"] == "smollm2_135m" and res["quantization"] == "nf4"
    m = res["metrics"]
    assert np.isfinite(m["align/train/loss"]) and np.isfinite(m["align/val/loss"]) and "align/val/acc@1" in m
    # next-location: one sample per trajectory chunk (nyc_qlora_cpu's next_format=trajectory), 32,845 per prefix
    assert res["train_samples"] == 8_852 + 14_509 + 7_599 + 2 * 5_765 + 7_599, "every NYC training sample is encoded"
    assert (tmp_path / "nyc" / "nyc_qlora_cpu" / "model" / "adapter_model.safetensors").is_file()


def test_a_crashed_run_resumes_from_last_ckpt_to_the_same_weights(smoke_art, model_cache, monkeypatch) -> None:
    from lightning_modules import alignment_module
    from pipeline.align import run_align_stage

    common = ["align.train_samples=64", "align.checkpoint_every_n_steps=3", "align.num_generations=0", "eval.val_cases=0"]
    straight = run_align_stage(smoke_cfg(smoke_art, model_cache, *common, "run_name=straight"))
    original = alignment_module.AlignmentModule.on_train_batch_end

    def crash(self, outputs, batch, batch_idx):
        original(self, outputs, batch, batch_idx)
        if self.global_step == 5:
            raise RuntimeError("simulated crash")

    cfg = smoke_cfg(smoke_art, model_cache, *common, "run_name=crashed")
    monkeypatch.setattr(alignment_module.AlignmentModule, "on_train_batch_end", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_align_stage(cfg)
    assert not (smoke_art / "synthetic" / "crashed" / "model").exists(), "no final model after a crash"
    monkeypatch.setattr(alignment_module.AlignmentModule, "on_train_batch_end", original)
    resumed = run_align_stage(cfg)
    assert resumed["resumed_from"] and resumed["steps"] == straight["steps"] == 8

    def weights(run):
        ckpt = torch.load(smoke_art / "synthetic" / run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        return ckpt["state_dict"]

    a, b = weights("straight"), weights("crashed")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", [["align.train_samples=40"], ["align.train_samples=64", "trainer.max_steps=5"]],
                         ids=["5-step epoch", "max_steps ends an 8-step epoch"])
def test_the_last_step_is_validated_when_the_interval_does_not_divide_the_steps(schedule, smoke_art, model_cache, monkeypatch) -> None:
    """5 steps at val_check_interval=2: validations at steps 2, 4 and 5, the decoding metrics from the last
    (Lightning alone validates at 2 and 4, and the run ends without its final figures)."""
    from lightning_modules import alignment_module
    from pipeline.align import run_align_stage

    seen: list[tuple[int, bool]] = []
    original = alignment_module.AlignmentModule.on_validation_epoch_end

    def record(self):
        original(self)
        seen.append((self.global_step, "align/val/acc@1" in self.trainer.callback_metrics))

    monkeypatch.setattr(alignment_module.AlignmentModule, "on_validation_epoch_end", record)
    res = run_align_stage(smoke_cfg(smoke_art, model_cache, f"run_name=uneven{len(schedule)}", *schedule, "align.batch_size=8",
                                    "trainer.val_check_interval=2", "eval.val_cases=2", "eval.val_every=100",
                                    "align.num_generations=0"))
    assert res["steps"] == 5
    assert [step for step, _ in seen] == [2, 4, 5]
    assert seen[-1][1] and not seen[0][1], "decoding at the last validation only (val_every=100)"
    assert "align/val/acc@1" in res["metrics"] and np.isfinite(res["metrics"]["align/val/loss"])


def test_more_val_cases_than_the_validation_set_holds_are_reported(smoke_art, model_cache, caplog) -> None:
    """eval.val_cases above what align.eval_per_task keeps: a warning naming both keys, and val/cases tells the truth."""
    from pipeline.align import build_alignment

    with caplog.at_level(logging.WARNING, logger="pipeline.align"):
        p = build_alignment(smoke_cfg(smoke_art, model_cache, "eval.val_cases=50", "align.eval_per_task=3", "eval.val_beams=1"))
    warned = [r.getMessage() for r in caplog.records if "eval.val_cases=50" in r.getMessage()]
    assert len(warned) == 1 and "align.eval_per_task=3 caps it" in warned[0], caplog.text
    assert p["module"].evaluator(p["module"].model)["cases"] <= 3
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.align"):
        build_alignment(smoke_cfg(smoke_art, model_cache, "eval.val_cases=2", "align.eval_per_task=3"))
    assert "eval.val_cases" not in caplog.text


def test_int8_path_runs_on_cpu(smoke_art, model_cache) -> None:
    import bitsandbytes as bnb

    from pipeline.align import build_alignment

    p = build_alignment(smoke_cfg(smoke_art, model_cache, "align.quantization=int8"))
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in p["model"].modules())
    batch = next(iter(p["datamodule"].train_dataloader()))
    p["module"].model.train()
    loss = p["module"].model_step(batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("llm", ["llama3_2_1b", "qwen2_5_1_5b", "tinyllama"])
def test_hub_models_fail_at_once_offline_naming_the_alternative(llm, tmp_path, monkeypatch) -> None:
    from lightning_modules.llm import ModelUnavailableError, model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without internet, whatever this one has
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    cfg = compose_run([f"llm={llm}", f"paths.cache={tmp_path}"])
    with pytest.raises(ModelUnavailableError, match=rf"{cfg.llm.hf_id}.*llm=smollm2_135m.*llm=tiny_random"):
        model_path(cfg.llm, cfg.paths.cache)


def test_vocab_init_starts_new_tokens_as_distinct_existing_tokens(smoke_art, model_cache) -> None:
    """align.new_token_init=vocab: every new row copies a different existing row (seeded), instead of
    mean-resized rows that all sit near the average embedding."""
    from lightning_modules.llm import build_peft_model
    from location_tokenizers.codes import all_code_tokens

    cfg = smoke_cfg(smoke_art, model_cache, "align.new_token_init=vocab")
    tokens = all_code_tokens(4, 64)
    rows = []
    for _ in range(2):
        model, tok, info = build_peft_model(cfg.llm, cfg.align, cfg.paths.cache, tokens, seed=int(cfg.seed))
        emb = model.get_input_embeddings().weight.detach()
        rows.append(emb[info["base_vocab"]:].clone())
    new, old = rows[0], emb[: info["base_vocab"]]
    assert new.shape[0] == len(tokens) and torch.equal(rows[0], rows[1])
    # Each new row is one of the old rows, and no two new rows are the same.
    matches = (torch.cdist(new, old, compute_mode="donot_use_mm_for_euclid_dist") < 1e-6).sum(dim=1)
    assert (matches >= 1).all()
    assert torch.unique(new, dim=0).shape[0] == len(tokens)


@pytest.mark.parametrize("visit_text,hints", [("official", 0), ("compact", 0), ("compact", 1), ("compact", 3)])
def test_a_whole_trajectory_sample_has_the_mean_loss_of_its_prefixes(parts, visit_text, hints) -> None:
    """next_format=trajectory: one forward pass over a trajectory gives, at every trained visit's code,
    the loss that visit's per-prefix sample (next_format=continuation, same prompt) has on its code;
    the sample loss is their mean, and a batch weighs the trajectory as that many answers. With visit hints
    (and the user memory) in the prompt, the labels are the visits' codes, never a hint's places."""
    from datamodules.config import SampleConfig
    from datamodules.rendering import sample_renderer
    from datamodules.samples import build_sample_index
    from lightning_modules.chat_encoding import ChatEncoder

    dm, enc, module, model = parts["datamodule"], parts["encoder"], parts["module"], parts["model"]
    dm.setup()
    codes = parts["table"].strings()
    # A train trajectory of one chunk (<= max_history + 1 visits): its prefixes' histories are whole.
    lengths = dm.checkins.filter(pl.col("split") == "train").group_by("traj_id").len()
    traj = lengths.filter(pl.col("len").is_between(5, 21)).sort("traj_id")["traj_id"][0]
    visits = dm.checkins.filter(pl.col("traj_id") == traj)

    def render(fmt: str) -> pl.DataFrame:
        cfg = SampleConfig(next_format=fmt, visit_text=visit_text, add_profile=False, visit_hints=hints,
                           visit_hint_counts=hints > 1, user_places=2 if hints else 0)
        index = build_sample_index(visits, None, cfg, tasks=("next",)).filter(pl.col("split") == "train")
        return sample_renderer(dm.checkins, codes, None, None, cfg)(index)  # hints and memory: the user's other trajectories

    whole, prefixes = render("trajectory"), render("continuation")
    assert whole.height == 1 and prefixes.height == visits.height - 2
    if hints:
        assert whole["target"][0].count("(usually") >= 2 and "often visits" in whole["prompt"][0]
    else:
        assert whole["labelled_runs"][0].to_list() == list(range(2, visits.height))
    enc_whole, enc_prefix = enc.encode(whole), enc.encode(prefixes)
    ids, _ = enc_whole.sample(0)
    mask = enc_whole.label_mask(0)
    levels = parts["table"].num_levels
    assert mask.sum() == levels * prefixes.height
    # The labelled tokens are the targets' codes, in order.
    assert ids[mask].tolist() == [t for i in range(len(enc_prefix)) for t in enc_prefix.sample(i)[0][enc_prefix.sample(i)[1]:][:levels]]
    items = []
    for i in range(len(enc_prefix)):
        p_ids, plen = enc_prefix.sample(i)
        assert (ids[:plen] == p_ids[:plen]).all(), "the prompts agree token for token"
        code_only = np.zeros(len(p_ids), dtype=bool)
        code_only[plen:plen + levels] = True  # the code, not the end-of-turn token after it
        items.append((p_ids, plen, i, "next", code_only))
    was_training, nominal = model.training, module.hparams.batch_size
    model.eval()
    try:
        with torch.no_grad():
            module.hparams.batch_size = 1
            per_prefix = module.model_step(enc.collate(items))
            one_pass = module.model_step(enc.collate([(ids, 0, 0, "next", mask)]))
            # the prefixes one by one, averaged
            singles = [float(module.model_step(enc.collate([item]))["loss"]) for item in items]
            # A trajectory run's validation samples are these per-prefix ones, encoded with next_end=False:
            # labelled on the code alone, so their loss is the training loss, not that plus an untrained end token.
            code_enc = ChatEncoder(enc.tokenizer, enc.system_prompt, max_length=enc.max_length, next_end=False)
            valid = code_enc.encode(prefixes)
            assert all(len(valid.sample(i)[0]) - valid.sample(i)[1] == levels for i in range(len(valid)))
            as_valid = module.model_step(code_enc.collate([(*valid.sample(i), i, "next") for i in range(len(valid))]))
            with_end = module.model_step(enc.collate([(*enc_prefix.sample(i), i, "next") for i in range(len(enc_prefix))]))
    finally:
        module.hparams.batch_size = nominal
        model.train(was_training)
    torch.testing.assert_close(one_pass["loss"], per_prefix["loss"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(float(one_pass["loss"]), sum(singles) / len(singles), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(as_valid["loss"], one_pass["loss"], rtol=1e-4, atol=1e-5)
    # the end token's loss moves the mean (by 0.09 % on one random model: still far outside the tolerance above)
    assert not torch.isclose(with_end["loss"], one_pass["loss"], rtol=3e-4)
    assert float(one_pass["mean_loss"]) == pytest.approx(float(one_pass["loss"]), rel=1e-5)


@pytest.mark.parametrize("visit_text,hints,counts", [("official", 2, False), ("compact", 2, False), ("compact", 3, True)])
def test_whole_trajectory_samples_label_their_targets_codes_in_every_chunk(parts, visit_text, hints, counts) -> None:
    """With visit hints (places separated by a space or by counts) and the user memory, trajectories cut into
    chunks (``max_history=3``: windows that start after visit 0) label exactly their targets' codes: over all
    whole-trajectory samples, in order, the labelled tokens are the codes the per-prefix samples answer."""
    from datamodules.config import SampleConfig
    from datamodules.rendering import sample_renderer
    from datamodules.samples import build_sample_index

    dm, enc = parts["datamodule"], parts["encoder"]
    dm.setup()
    codes = parts["table"].strings()
    levels = parts["table"].num_levels
    lengths = dm.checkins.filter(pl.col("split") == "train").group_by("traj_id").len()
    trajs = lengths.filter(pl.col("len") >= 9).sort("traj_id")["traj_id"].head(3)
    visits = dm.checkins.filter(pl.col("traj_id").is_in(trajs.implode()))

    def render(fmt: str) -> pl.DataFrame:
        cfg = SampleConfig(next_format=fmt, visit_text=visit_text, add_profile=False, max_history=3, visit_hints=hints,
                           visit_hint_counts=counts, user_places=2)
        index = build_sample_index(visits, None, cfg, tasks=("next",)).filter(pl.col("split") == "train")
        return sample_renderer(dm.checkins, codes, None, None, cfg)(index).sort("traj_id", "sample_id")

    whole, prefixes = render("trajectory"), render("continuation")
    assert whole.height > trajs.len(), "trajectories of 9+ visits make several chunks of max_history + 1 visits"
    assert whole["target"].str.count_matches(r"\(usually").sum() >= whole.height
    enc_whole, enc_prefix = enc.encode(whole), enc.encode(prefixes)
    labelled = [t for i in range(len(enc_whole)) for t in enc_whole.sample(i)[0][enc_whole.label_mask(i)].tolist()]
    answered = [t for i in range(len(enc_prefix)) for t in enc_prefix.sample(i)[0][enc_prefix.sample(i)[1]:][:levels].tolist()]
    assert len(answered) == levels * prefixes.height and labelled == answered


def test_first_code_weight_weighs_the_codes_first_tokens_in_training_only(smoke_art, model_cache, parts) -> None:
    """align.first_code_weight=w: in the training loss each labelled first-level code token weighs w against 1
    for the other labelled tokens, rescaled so that the batch's total weight is that of the plain loss; the
    validation loss, ``mean_loss`` and the per-sample sums stay unweighted; w=1 keeps the fingerprint."""
    import torch.nn.functional as F

    from location_tokenizers.codes import level_token
    from lightning_modules.alignment_module import AlignmentModule
    from pipeline.paths import align_fingerprint

    enc, dm, model, tok = parts["encoder"], parts["datamodule"], parts["model"], parts["tokenizer"]
    first_ids = tok.convert_tokens_to_ids([level_token(0, c) for c in range(parts["table"].codebook_size)])
    encoded = dm.encoded("train")
    rows = [i for i in range(len(encoded)) if encoded.task[i] in ("next", "loc2index", "index2loc")][:3]
    batch = enc.collate([(*encoded.sample(i), i, encoded.task[i]) for i in rows])
    plain = AlignmentModule(model, tasks=["next", "index2loc", "loc2index"], batch_size=4)
    weighted = AlignmentModule(model, tasks=["next", "index2loc", "loc2index"], batch_size=4,
                               first_code_weight=4.0, first_code_ids=first_ids)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            p_val, p_train = plain.model_step(batch), plain.model_step(batch, train=True)
            w_val, w_train = weighted.model_step(batch), weighted.model_step(batch, train=True)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    finally:
        model.train(was_training)
    labels = batch["labels"][:, 1:]
    where = labels != -100
    ce = F.cross_entropy(logits[where], labels[where], reduction="none")
    weight = batch["label_weight"][:, 1:][where]
    first = torch.isin(labels[where], torch.tensor(first_ids))
    assert 0 < int(first.sum()) < int(where.sum()), "the batch labels first code tokens and others"
    scaled = weight * torch.where(first, 4.0, 1.0)
    scaled = scaled * weight.sum() / scaled.sum()
    divisor = max(4, int(batch["units"].sum()))
    assert float(w_train["loss"]) == pytest.approx(float((ce * scaled).sum()) / divisor, rel=1e-4)
    assert float(p_train["loss"]) == pytest.approx(float((ce * weight).sum()) / divisor, rel=1e-4)
    assert abs(float(w_train["loss"]) - float(p_train["loss"])) > 1e-4  # a random model: close, but not equal
    # validation and the logged means are the plain loss
    for out in (w_val, p_train):
        assert float(out["loss"]) == pytest.approx(float(p_val["loss"]), rel=1e-6)
    for key in ("mean_loss", "sample_loss"):
        torch.testing.assert_close(w_train[key], p_val[key])
    # the token mean is weighted alike (mean of the token losses with the same relative weights)
    token = AlignmentModule(model, tasks=["next", "index2loc", "loc2index"], loss_reduction="token",
                            first_code_weight=4.0, first_code_ids=first_ids)
    with torch.no_grad():
        model.eval()
        try:
            t_train, t_val = token.model_step(batch, train=True), token.model_step(batch)
        finally:
            model.train(was_training)
    flat = torch.where(first, 4.0, 1.0)
    assert float(t_train["loss"]) == pytest.approx(float((ce * flat).sum() / flat.sum()), rel=1e-4)
    assert float(t_val["loss"]) == pytest.approx(float(ce.mean()), rel=1e-4)
    with pytest.raises(ValueError, match="first_code_ids"):
        AlignmentModule(model, tasks=["next"], first_code_weight=4.0)
    base = smoke_cfg(smoke_art, model_cache)
    assert align_fingerprint(smoke_cfg(smoke_art, model_cache, "align.first_code_weight=1")) == align_fingerprint(base)
    assert align_fingerprint(smoke_cfg(smoke_art, model_cache, "align.first_code_weight=4")) != align_fingerprint(base)
    with pytest.raises(Exception, match="first_code_weight"):
        smoke_cfg(smoke_art, model_cache, "align.first_code_weight=0")


@pytest.mark.parametrize("code_softmax,decay", [("vocab", 1.0), ("level", 1.0), ("level", 0.5)])
def test_hint_smoothing_trains_each_visits_first_code_towards_its_own_hints(smoke_art, model_cache, parts, code_softmax,
                                                                             decay) -> None:
    """align.hint_smoothing=λ: at the first token of each trained visit's code the batch carries the first tokens of
    that visit's hinted places (read here from the text: the places between its "(usually" and its code), and the
    training loss adds λ times their mean cross-entropy (over the vocabulary or the first level, as the label's; the
    k-th place weighing hint_smoothing_decay^k); validation losses and the logged means stay plain; 0 keeps the
    fingerprint; it is refused without hints."""
    import re

    import torch.nn.functional as F

    from datamodules.config import SampleConfig
    from datamodules.rendering import sample_renderer
    from datamodules.samples import build_sample_index
    from lightning_modules.alignment_module import AlignmentModule
    from datamodules.config import ConfigError
    from location_tokenizers.codes import level_token
    from pipeline.paths import align_fingerprint

    dm, enc, model, tok, table = parts["datamodule"], parts["encoder"], parts["model"], parts["tokenizer"], parts["table"]
    dm.setup()
    lengths = dm.checkins.filter(pl.col("split") == "train").group_by("traj_id").len()
    trajs = lengths.filter(pl.col("len") >= 6).sort("traj_id")["traj_id"].head(3)
    visits = dm.checkins.filter(pl.col("traj_id").is_in(trajs.implode()))
    cfg = SampleConfig(next_format="trajectory", visit_text="compact", add_profile=False, max_history=4, visit_hints=3,
                       visit_hint_counts=True, user_places=2)
    index = build_sample_index(visits, None, cfg, tasks=("next",)).filter(pl.col("split") == "train")
    samples = sample_renderer(dm.checkins, table.strings(), None, None, cfg)(index)
    encoded = enc.encode(samples)
    items = [(*encoded.sample(i), i, "next", encoded.label_mask(i), encoded.hint_mask(i)) for i in range(len(encoded))]
    batch = enc.collate(items)
    hint_ids = batch["hint_ids"]
    # beside a sample without hints (a per-prefix one), the same hints and none for it
    mixed = enc.collate([*items, (items[0][0], 5, 99, "next")])
    assert (mixed["hint_ids"][-1] == -1).all()
    torch.testing.assert_close(mixed["hint_ids"][:-1, : hint_ids.shape[1]], hint_ids)
    checked = 0
    for row, (ids, *_rest) in enumerate(items):
        mask = items[row][4]
        starts = [s for s in range(len(ids)) if mask[s] and (s == 0 or not mask[s - 1])]
        for start in starts:
            text = tok.decode(ids[:start].tolist())
            assert text.rstrip().endswith(")"), "hints come right before a trained code"
            written = re.findall(r"<a_\d+>", text[text.rindex("(usually"):])
            got = hint_ids[row, start][hint_ids[row, start] >= 0].tolist()
            assert tok.convert_ids_to_tokens(got) == written and 1 <= len(written) <= 3
            checked += 1
        others = torch.ones(hint_ids.shape[1], dtype=torch.bool)
        others[starts] = False
        assert (hint_ids[row, others] == -1).all(), "hints sit at trained codes' first tokens only"
    assert checked == int(batch["units"].sum()) > len(items), "several trained visits per trajectory, each with its hints"

    levels = [tok.convert_tokens_to_ids([level_token(lv, c) for c in range(table.codebook_size)]) for lv in range(table.num_levels)]
    plain = AlignmentModule(model, tasks=["next"], batch_size=2, code_softmax=code_softmax, code_token_ids=levels)
    smooth = AlignmentModule(model, tasks=["next"], batch_size=2, code_softmax=code_softmax, code_token_ids=levels,
                             hint_smoothing=0.5, hint_smoothing_decay=decay)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            p_train, s_train, s_val = plain.model_step(batch, train=True), smooth.model_step(batch, train=True), smooth.model_step(batch)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    finally:
        model.train(was_training)
    labels = batch["labels"][:, 1:]
    where = labels != -100
    z, y, h = logits[where], labels[where], hint_ids[:, 1:][where]

    def logp_over(level: int, rows: torch.Tensor) -> tuple[torch.Tensor, dict[int, int]]:
        if code_softmax == "vocab":
            return rows.log_softmax(-1), {t: t for t in range(rows.shape[1])}
        ids = torch.tensor(levels[level])
        return rows[:, ids].log_softmax(-1), {int(t): k for k, t in enumerate(ids)}

    level_of = {int(t): lv for lv, row in enumerate(levels) for t in row}
    ce = torch.stack([-logp_over(level_of[int(t)], z[i:i + 1])[0][0, logp_over(level_of[int(t)], z[i:i + 1])[1][int(t)]]
                      for i, t in enumerate(y)])
    soft = torch.zeros_like(ce)
    for i in (h >= 0).any(1).nonzero()[:, 0].tolist():
        lp, at = logp_over(0, z[i:i + 1])
        w = torch.tensor([decay ** k for k, t in enumerate(h[i]) if t >= 0])
        soft[i] = -(torch.stack([lp[0, at[int(t)]] for t in h[i] if t >= 0]) * w).sum() / w.sum()
    assert int((soft > 0).sum()) == checked
    weight = batch["label_weight"][:, 1:][where]
    divisor = max(2, int(batch["units"].sum()))
    assert float(p_train["loss"]) == pytest.approx(float((ce * weight).sum()) / divisor, rel=1e-4)
    assert float(s_train["loss"]) == pytest.approx(float(((ce + 0.5 * soft) * weight).sum()) / divisor, rel=1e-4)
    assert float(s_val["loss"]) == pytest.approx(float(p_train["loss"]), rel=1e-6)
    torch.testing.assert_close(s_train["mean_loss"], p_train["mean_loss"])
    torch.testing.assert_close(s_train["sample_loss"], p_train["sample_loss"])
    with pytest.raises(ValueError, match="hint_smoothing"):
        AlignmentModule(model, tasks=["next"], hint_smoothing=-1.0)
    with pytest.raises(ValueError, match="hint_smoothing_decay"):
        AlignmentModule(model, tasks=["next"], hint_smoothing=1.0, hint_smoothing_decay=0.0)
    if code_softmax == "vocab":
        on = ("data.samples.next_format=trajectory", "data.samples.visit_hints=3")
        base = smoke_cfg(smoke_art, model_cache, *on)
        assert align_fingerprint(smoke_cfg(smoke_art, model_cache, *on, "align.hint_smoothing=0")) == align_fingerprint(base)
        # the decay alone (λ 0) trains as the base run does: the same fingerprint
        assert align_fingerprint(smoke_cfg(smoke_art, model_cache, *on, "align.hint_smoothing_decay=0.5")) == align_fingerprint(base)
        smooth_cfg = smoke_cfg(smoke_art, model_cache, *on, "align.hint_smoothing=0.5")
        assert align_fingerprint(smooth_cfg) != align_fingerprint(base)
        assert align_fingerprint(smoke_cfg(smoke_art, model_cache, *on, "align.hint_smoothing=0.5",
                                           "align.hint_smoothing_decay=1")) == align_fingerprint(smooth_cfg)
        assert align_fingerprint(smoke_cfg(smoke_art, model_cache, *on, "align.hint_smoothing=0.5",
                                           "align.hint_smoothing_decay=0.5")) != align_fingerprint(smooth_cfg)
        with pytest.raises(ConfigError, match="hint_smoothing_decay"):
            smoke_cfg(smoke_art, model_cache, *on, "align.hint_smoothing_decay=1.5")
        with pytest.raises(ConfigError, match="hint_smoothing=0.5 needs hints.*visit_hints > 0 \\(is 0\\)"):
            smoke_cfg(smoke_art, model_cache, "data.samples.next_format=trajectory", "align.hint_smoothing=0.5")


def test_a_whole_trajectory_cut_by_tokens_never_trains_half_a_code(parts) -> None:
    from datamodules.config import SampleConfig
    from datamodules.prompts import SYSTEM_PROMPT
    from datamodules.rendering import render_samples
    from datamodules.samples import build_sample_index
    from lightning_modules.chat_encoding import ChatEncoder, code_runs

    dm, tok = parts["datamodule"], parts["tokenizer"]
    dm.setup()
    cfg = SampleConfig(next_format="trajectory", add_profile=False)
    train = dm.checkins.filter(pl.col("split") == "train")
    index = build_sample_index(train, None, cfg, tasks=("next",)).head(1)
    sample = render_samples(index, train, parts["table"].strings(), None, None, cfg)
    code_ids = parts["encoder"].code_token_ids
    full = parts["encoder"].encode(sample)
    ids, _ = full.sample(0)
    runs = code_runs(ids, code_ids)
    levels = parts["table"].num_levels
    for cut in (runs[-1][0] + 2, runs[-1][0]):  # inside the last code, and just before it
        enc = ChatEncoder(tok, SYSTEM_PROMPT, max_length=cut, code_token_ids=code_ids.tolist())
        short = enc.encode(sample)
        mask = short.label_mask(0)
        assert len(short.sample(0)[0]) == cut and short.truncated == 1 and short.truncated_by_task == {"next": 1}
        assert mask.sum() == full.label_mask(0).sum() - levels  # the cut code is not trained at all
        assert mask.sum() % levels == 0
    with pytest.raises(ValueError, match="code_token_ids"):
        ChatEncoder(tok, SYSTEM_PROMPT).encode(sample)


def test_encoding_in_slices_gives_the_same_arrays(parts, monkeypatch) -> None:
    """ChatEncoder.encode tokenises ENCODE_ROWS samples at a time (bounded memory); the packed result,
    label masks of whole-trajectory samples included, does not depend on the slice size."""
    import lightning_modules.chat_encoding as ce
    from datamodules.config import SampleConfig
    from datamodules.rendering import render_samples
    from datamodules.samples import build_sample_index

    dm, enc = parts["datamodule"], parts["encoder"]
    dm.setup()
    cfg = SampleConfig(next_format="trajectory", add_profile=False)
    train = dm.checkins.filter(pl.col("split") == "train")
    index = build_sample_index(train, None, cfg, tasks=("next", "recovery_single"))
    samples = render_samples(index, train, parts["table"].strings(), None, None, cfg).sample(40, seed=1)
    whole = enc.encode(samples)
    monkeypatch.setattr(ce, "ENCODE_ROWS", 7)
    sliced = enc.encode(samples)
    assert (sliced.ids == whole.ids).all() and (sliced.offsets == whole.offsets).all()
    assert (sliced.prompt_len == whole.prompt_len).all() and sliced.truncated == whole.truncated
    assert sorted(sliced.label_masks) == sorted(whole.label_masks) and len(whole.label_masks) > 7
    assert all((sliced.label_masks[i] == whole.label_masks[i]).all() for i in whole.label_masks)
    assert (enc.lengths(samples) == whole.lengths).all()


def test_lora_plus_gives_the_b_matrices_their_own_rate(smoke_art, model_cache, parts) -> None:
    """align.lora_plus_ratio: the B matrices at lr x ratio through warm-up and decay, the rest at lr; at 1 one
    group, and the fingerprint of plain LoRA is that of a config without the switch."""
    from pipeline.align import build_alignment
    from pipeline.paths import align_fingerprint

    assert len(parts["module"].param_groups()) == 1
    cfg = smoke_cfg(smoke_art, model_cache, "align.lora_plus_ratio=16", "align.lr=1e-3")
    module = build_alignment(cfg)["module"]
    rest, b = module.param_groups()
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert b["lr"] == pytest.approx(0.016) and all(".lora_B." in names[id(p)] for p in b["params"])
    assert not any(".lora_B." in names[id(p)] for p in rest["params"]) and any(".lora_A." in names[id(p)] for p in rest["params"])
    assert len(b["params"]) + len(rest["params"]) == sum(p.requires_grad for p in module.model.parameters())
    opt = torch.optim.AdamW(module.param_groups(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 8e-3])
    plain = smoke_cfg(smoke_art, model_cache)
    assert align_fingerprint(cfg) != align_fingerprint(plain)
    assert align_fingerprint(smoke_cfg(smoke_art, model_cache, "align.lora_plus_ratio=1")) == align_fingerprint(plain)


def test_level_code_softmax_scores_each_code_token_against_its_own_level(smoke_art, model_cache, parts) -> None:
    """align.code_softmax=level: a labelled code token's cross-entropy is taken over the code tokens of its
    level only (what constrained decoding chooses among), every other labelled token's over the vocabulary;
    training and validation alike. vocab keeps the fingerprint; a bad value is refused while composing."""
    import torch.nn.functional as F

    from location_tokenizers.codes import level_token
    from lightning_modules.alignment_module import AlignmentModule, CodeLevels
    from pipeline.paths import align_fingerprint

    enc, dm, model, tok, table = parts["encoder"], parts["datamodule"], parts["model"], parts["tokenizer"], parts["table"]
    level_ids = [tok.convert_tokens_to_ids([level_token(lv, c) for c in range(table.codebook_size)]) for lv in range(table.num_levels)]
    encoded = dm.encoded("train")
    rows = [i for i in range(len(encoded)) if encoded.task[i] in ("next", "index2loc")][:3]
    batch = enc.collate([(*encoded.sample(i), i, encoded.task[i]) for i in rows])
    module = AlignmentModule(model, tasks=["next", "index2loc"], batch_size=4, code_softmax="level", code_token_ids=level_ids)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            train, val = module.model_step(batch, train=True), module.model_step(batch)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    finally:
        model.train(was_training)
    labels = batch["labels"][:, 1:]
    where = labels != -100
    targets, flat = labels[where], logits[where]
    expected = F.cross_entropy(flat, targets, reduction="none")
    by_level = {tid: (lv, c) for lv, row in enumerate(level_ids) for c, tid in enumerate(row)}
    n_code = 0
    for i, t in enumerate(targets.tolist()):
        if t in by_level:
            lv, c = by_level[t]
            expected[i] = F.cross_entropy(flat[i, level_ids[lv]].unsqueeze(0), torch.tensor([c]))
            n_code += 1
    assert 0 < n_code < len(targets), "the batch labels code tokens and ordinary tokens"
    weight = batch["label_weight"][:, 1:][where]
    divisor = max(4, int(batch["units"].sum()))
    assert float(train["loss"]) == pytest.approx(float((expected * weight).sum()) / divisor, rel=1e-4)
    assert float(val["loss"]) == pytest.approx(float(train["loss"]), rel=1e-6)
    # over 64 tokens instead of ~49k: never above the vocabulary's cross-entropy
    assert (expected <= F.cross_entropy(flat, targets, reduction="none") + 1e-5).all()
    level, index = CodeLevels(level_ids).of(torch.tensor([level_ids[1][3], 5, -100, 10**7]))
    assert level.tolist() == [1, -1, -1, -1] and int(index[0]) == 3
    with pytest.raises(ValueError, match="code_token_ids"):
        AlignmentModule(model, tasks=["next"], code_softmax="level")
    base = smoke_cfg(smoke_art, model_cache)
    assert align_fingerprint(smoke_cfg(smoke_art, model_cache, "align.code_softmax=vocab")) == align_fingerprint(base)
    assert align_fingerprint(smoke_cfg(smoke_art, model_cache, "align.code_softmax=level")) != align_fingerprint(base)
    with pytest.raises(Exception, match="code_softmax"):
        smoke_cfg(smoke_art, model_cache, "align.code_softmax=codes")


@pytest.mark.parametrize("checkpointing", [True, False])
def test_lora_on_the_top_layers_stops_the_backward_pass_below_them(smoke_art, model_cache, checkpointing) -> None:
    """align.lora_layers=1 on the 2-layer tiny Llama: adapters in the top layer only, nothing below it in the
    backward graph, the same forward pass (the adapters start at zero) and the new rows still trained
    (through the tied output head)."""
    from lightning_modules.alignment_module import AlignmentModule
    from lightning_modules.llm import build_peft_model
    from location_tokenizers.codes import all_code_tokens

    tokens = all_code_tokens(4, 64)
    losses = {}
    for top in (0, 1):
        cfg = smoke_cfg(smoke_art, model_cache, "align.new_tokens=rows", f"align.lora_layers={top}",
                        f"align.gradient_checkpointing={str(checkpointing).lower()}", "align.lora.dropout=0")
        torch.manual_seed(0)
        model, tok, info = build_peft_model(cfg.llm, cfg.align, cfg.paths.cache, tokens, seed=0)
        assert model.get_base_model().config.num_hidden_layers == 2
        assert adapted_layers(model) == ({"0", "1"} if top == 0 else {"1"})
        model.train()
        seen = {}
        model.get_base_model().model.layers[0].register_forward_hook(lambda m, a, out: seen.update(grad=out[0].requires_grad
                                                                     if isinstance(out, tuple) else out.requires_grad))
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, len(tok), (2, 24), generator=gen)
        ids[:, -4:] = torch.tensor(info["new_token_ids"][:4])
        labels = torch.full_like(ids, -100)
        labels[:, -4:] = ids[:, -4:]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "task": ["next"] * 2}
        loss = AlignmentModule(model, tasks=["next"]).model_step(batch)["loss"]
        loss.backward()
        losses[top] = loss.item()
        assert seen["grad"] is (top == 0), "the layer below the adapters is in the backward graph"
        rows = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
        assert rows and all(p.grad is not None and p.grad.abs().sum() > 0 for p in rows), "the new rows get no gradient"
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert lora_b and all(p.grad is not None for p in lora_b), "a LoRA B matrix gets no gradient"
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    from pipeline.paths import align_fingerprint

    base = smoke_cfg(smoke_art, model_cache)
    assert align_fingerprint(smoke_cfg(smoke_art, model_cache, "align.lora_layers=0")) == align_fingerprint(base)
    assert align_fingerprint(smoke_cfg(smoke_art, model_cache, "align.lora_layers=1")) != align_fingerprint(base)
    for top in (2, 3):  # 2 of 2 layers would train as 0 does under another fingerprint
        with pytest.raises(ValueError, match=f"align.lora_layers={top}.*2 decoder layers"):
            build_peft_model(cfg.llm, smoke_cfg(smoke_art, model_cache, f"align.lora_layers={top}").align, cfg.paths.cache, tokens)
    with pytest.raises(ValueError, match="needs align.new_tokens=rows"):
        build_peft_model(cfg.llm, smoke_cfg(smoke_art, model_cache, "align.lora_layers=1", "align.new_tokens=modules").align,
                         cfg.paths.cache, tokens)

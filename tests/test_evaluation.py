"""Evaluation: ranking metrics on hand-computed cases, constrained beam search equal to HF's
``generate`` with ``prefix_allowed_tokens_fn``, exact scoring, baselines, and ``stage=test``."""

from __future__ import annotations

import json
import logging
import os
import math
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch

from lightning_modules.metrics import RankingMetrics
from lightning_modules.results import score_by_task
from pipeline.paths import tokenizer_dir
from location_tokenizers.codes import CodeTable, all_code_tokens
from location_tokenizers.trie import CodeTrie
from tests.conftest import REPO, compose_cfg, compose_run, run_pipeline


# ------------------------------------------------------------------------------ metrics
def test_metrics_hand_cases() -> None:
    m = RankingMetrics()
    ranked = torch.tensor([
        [7, 1, 2, 3, 4, 5, 6, 8, 9, 10],   # target 7 at rank 0
        [1, 2, 7, 3, 4, 5, 6, 8, 9, 10],   # rank 2
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],   # rank 6
        [1, 2, 3, 4, 5, 6, 8, 9, 10, 11],  # absent
    ])
    m.update(ranked, torch.tensor([7, 7, 7, 7]))
    out = {k: float(v) for k, v in m.compute().items()}
    assert out["acc@1"] == pytest.approx(1 / 4)
    assert out["acc@5"] == pytest.approx(2 / 4)
    assert out["acc@10"] == pytest.approx(3 / 4)
    assert out["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert out["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(8)) / 4)
    assert out["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 7) / 4)


def test_metrics_accumulate_over_updates_and_reset() -> None:
    m = RankingMetrics(acc_at=(1,), ndcg_at=(5,))
    m.update(torch.tensor([[3, 4]]), torch.tensor([3]))
    m.update(torch.tensor([[4, 3]]), torch.tensor([3]))
    out = m.compute()
    assert float(out["acc@1"]) == 0.5 and float(out["ndcg@5"]) == pytest.approx((1 + 1 / math.log2(3)) / 2)
    m.reset()
    assert math.isnan(float(m.compute()["acc@1"]))
    with pytest.raises(ValueError):
        m.update(torch.tensor([1, 2]), torch.tensor([1, 2]))


# ------------------------------------------------------------------------- beam search
def _tiny_lm(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    # Sharper distributions than a fresh init, so that beams actually compete.
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return model


def _table(n: int, levels: int, k: int, seed: int = 0) -> CodeTable:
    rng = np.random.default_rng(seed)
    codes = set()
    while len(codes) < n:
        codes.add(tuple(int(x) for x in rng.integers(0, k, size=levels)))
    return CodeTable(loc_ids=np.arange(100, 100 + n), codes=np.array(sorted(codes)), codebook_size=k)


def _tiny_trie(n: int, levels: int, k: int, first_id: int, vocab: int, seed: int = 0) -> tuple[CodeTable, list[list[int]], CodeTrie]:
    """A random code table of ``n`` locations, its code tokens at ids ``first_id...`` and their trie."""
    table = _table(n, levels, k, seed=seed)
    token_ids = [[first_id + lv * k + c for c in range(k)] for lv in range(levels)]
    mapping = {t: token_ids[lv][c] for lv in range(levels) for c, t in enumerate(all_code_tokens(levels, k)[lv * k:(lv + 1) * k])}
    return table, token_ids, CodeTrie(table, mapping, vocab_size=vocab)


def _hf_beams(model, input_ids, attention_mask, trie, table, token_ids, num_beams):
    """Reference: transformers' beam search with a prefix_allowed_tokens_fn over the same trie."""
    prefixes = trie.valid_prefixes()
    code_of = {int(t): (lv, c) for lv, row in enumerate(token_ids) for c, t in enumerate(row)}
    prompt_len = input_ids.shape[1]

    def allowed(batch_id: int, sent: torch.Tensor) -> list[int]:
        gen = sent[prompt_len:].tolist()
        prefix = tuple(code_of[t][1] for t in gen)
        level = len(prefix)
        return [int(token_ids[level][c]) for c in prefixes.get(prefix, ())] or [1]

    out = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, num_beams=num_beams, num_return_sequences=num_beams,
        do_sample=False, max_new_tokens=table.num_levels, prefix_allowed_tokens_fn=allowed, early_stopping=True,
        length_penalty=0.0, output_scores=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=1,
    )
    seqs = out.sequences[:, prompt_len:]
    locs = trie.decode_batch(seqs).view(input_ids.shape[0], num_beams)
    return locs, out.sequences_scores.view(input_ids.shape[0], num_beams)


@pytest.mark.parametrize("num_beams", [2, 5, 15])
def test_beam_search_equals_hf_generate_on_a_tiny_llama(num_beams: int) -> None:
    from lightning_modules.constrained_decoding import beam_search

    vocab, levels, k = 300, 3, 8
    table, token_ids, trie = _tiny_trie(120, levels, k, 50, vocab, seed=num_beams)
    model = _tiny_lm(vocab, seed=num_beams)
    g = torch.Generator().manual_seed(1)
    # Left-padded prompts of different lengths: positions must ignore the padding.
    ids = torch.randint(3, 50, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0
    ids[2, :7], mask[2, :7] = 0, 0
    ours = beam_search(model, ids, mask, trie, num_beams=num_beams)
    ref_locs, ref_scores = _hf_beams(model, ids, mask, trie, table, token_ids, num_beams)
    assert torch.equal(ours.loc_ids, ref_locs), (ours.loc_ids, ref_locs)
    # length_penalty=0: HF's sequence score is the plain sum of log-probs, like ours.
    torch.testing.assert_close(ours.scores, ref_scores.float(), rtol=1e-4, atol=1e-4)
    assert (ours.loc_ids >= 100).all(), "every returned code is a valid location"


def test_sampled_beams_follow_the_trie_and_the_seed() -> None:
    """eval.decoding=sampled_beams (the official protocol): valid codes only, ranked by score, and the
    same seed gives the same ranking."""
    from lightning_modules.constrained_decoding import sampled_beam_search

    vocab, levels, k = 300, 3, 8
    table, token_ids, trie = _tiny_trie(120, levels, k, 50, vocab, seed=3)
    model = _tiny_lm(vocab, seed=3)
    ids = torch.randint(3, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    a = sampled_beam_search(model, ids, mask, trie, num_beams=5, seed=7)
    b = sampled_beam_search(model, ids, mask, trie, num_beams=5, seed=7)
    assert torch.equal(a.loc_ids, b.loc_ids) and (a.loc_ids >= 100).all()
    assert (a.scores[:, :-1] >= a.scores[:, 1:]).all()


def _exhaustive_beams(code_softmax: str, model_seed: int, ids_seed: int, batch: int) -> SimpleNamespace:
    """A tiny trie and LM; exact scores of every code and a beam search with as many beams as codes,
    both normalised per ``code_softmax``. Exhaustive beam search must give the exact scores and ranking."""
    from lightning_modules.constrained_decoding import beam_search, exact_scores, rank_exact

    vocab, levels, k = 200, 3, 4
    table, token_ids, trie = _tiny_trie(40, levels, k, 60, vocab)
    model = _tiny_lm(vocab, seed=model_seed)
    ids = torch.randint(3, 50, (batch, 9), generator=torch.Generator().manual_seed(ids_seed))
    mask = torch.ones_like(ids)
    code_ids = torch.tensor([[token_ids[lv][c] for lv, c in enumerate(row)] for row in table.codes.tolist()])
    level_ids = torch.tensor(token_ids) if code_softmax == "level" else None
    exact = exact_scores(model, ids, mask, code_ids, chunk=16, level_token_ids=level_ids)
    full = beam_search(model, ids, mask, trie, num_beams=len(table), code_softmax=code_softmax)
    ranked = rank_exact(exact, torch.as_tensor(table.loc_ids), top=len(table))
    torch.testing.assert_close(full.scores, ranked.scores, rtol=1e-4, atol=1e-4)
    assert torch.equal(full.loc_ids[:, :5], ranked.loc_ids[:, :5])
    return SimpleNamespace(model=model, ids=ids, mask=mask, trie=trie, code_ids=code_ids, level_ids=level_ids,
                           exact=exact, full=full)


@pytest.mark.parametrize("code_softmax", ["vocab", "level"])
def test_exact_scores_agree_with_beam_scores(code_softmax: str) -> None:
    case = _exhaustive_beams(code_softmax, model_seed=3, ids_seed=2, batch=2)
    assert (torch.logsumexp(case.exact, 1) <= 1e-4).all(), "probabilities of all codes sum to at most 1"
    assert not case.full.scores.requires_grad and not case.exact.requires_grad, "decoding builds no autograd graph"


class _IdEncoder:
    """Prompts written as token ids ("5 9 12"); padding as the real ChatEncoder pads."""

    pad_id = 0

    def prompt_ids(self, texts):
        return [[int(t) for t in text.split()] for text in texts]

    def pad_left(self, rows, device="cpu"):
        from lightning_modules.chat_encoding import ChatEncoder

        return ChatEncoder.pad_left(self, rows, device)


@pytest.mark.parametrize("batch_size", [1, 3, 4, 16])
@pytest.mark.parametrize("min_shared", [1, 32])
def test_shared_prefix_ranks_as_whole_prompts(batch_size: int, min_shared: int) -> None:
    """eval.share_prefix: prefilling the tokens a batch shares once gives the rankings (and, up to rounding,
    the scores) of each prompt decoded alone, unpadded: users with several prompts, a prompt that is a
    prefix of another, twin prompts, and a user with a single prompt."""
    from lightning_modules.constrained_decoding import beam_search
    from lightning_modules.ranking import rank_prompts

    vocab, levels, k = 300, 3, 8
    _, _, trie = _tiny_trie(120, levels, k, 50, vocab, seed=4)
    model = _tiny_lm(vocab, seed=4)
    rng = np.random.default_rng(0)
    system = rng.integers(3, 50, 9).tolist()
    prompts = []
    for user in range(5):
        memory = rng.integers(3, 50, int(rng.integers(1, 8))).tolist()
        for _ in range(int(rng.integers(1, 4))):
            prompts.append(system + memory + rng.integers(3, 50, int(rng.integers(1, 10))).tolist())
    prompts += [prompts[0][:-1], list(prompts[2]), system[:4]]
    texts = [" ".join(map(str, p)) for p in rng.permutation(np.array(prompts, dtype=object))]
    alone = [beam_search(model, torch.tensor([[int(t) for t in text.split()]]), torch.ones(1, len(text.split()), dtype=torch.long),
                         trie, num_beams=5) for text in texts]
    fed = []  # prompt tokens embedded per call (the beam steps feed one token per beam)
    model.model.embed_tokens.register_forward_hook(lambda _m, args, _o: fed.append(args[0].numel()))
    read = {}
    for share in (True, False):
        fed.clear()
        locs, scores = rank_prompts(model, _IdEncoder(), trie, texts, 5, batch_size, share_prefix=share, min_shared=min_shared)
        assert np.array_equal(locs, np.concatenate([a.loc_ids.numpy() for a in alone])), share
        np.testing.assert_allclose(scores, np.concatenate([a.scores.numpy() for a in alone]), rtol=1e-4, atol=1e-4)
        read[share] = sum(n for n in fed if n > 5 * min(batch_size, len(texts)))  # prefills, not beam steps
    assert read[True] < read[False], read
    if batch_size == 1:  # no padding: fewer tokens than the prompts hold
        assert read[True] < sum(len(t.split()) for t in texts), read


def test_shared_batches_keep_a_users_prompts_together_and_the_rest_by_length() -> None:
    from lightning_modules.ranking import _shared_batches

    system, memory_a, memory_b = [1] * 5, [7] * 40, [8] * 40
    ids = [system + memory_a + [2], system + [3] * 9, system + memory_b + [4, 4], system + memory_a + [5, 5, 5],
           system + [6] * 30, system + memory_b + [9]]
    lex = sorted(range(len(ids)), key=ids.__getitem__)
    batches = [b.tolist() for b in _shared_batches(ids, lex, batch_size=4, together=5 + 32)]
    # users a and b: batches of their own (longest first); the two prompts alone: one batch, longest first
    assert sorted(batches) == sorted([[3, 0], [2, 5], [4, 1]])


@pytest.mark.slow
def test_beam_search_equals_hf_generate_on_smollm2(model_cache) -> None:
    from lightning_modules.constrained_decoding import beam_search
    from lightning_modules.llm import load_model, load_tokenizer

    cfg = compose_run(["llm=smollm2_135m", f"paths.cache={model_cache}"])
    tok = load_tokenizer(cfg.llm, cfg.paths.cache)
    table = _table(300, 4, 16, seed=5)
    tok.add_tokens(all_code_tokens(4, 16))
    model = load_model(cfg.llm, cfg.paths.cache, dtype=torch.float32).eval()
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    trie = CodeTrie(table, tok, vocab_size=len(tok))
    token_ids = [trie.level_token_ids[lv].tolist() for lv in range(4)]
    tok.padding_side = "left"
    batch = tok(["The best coffee place in the city is", "Tomorrow morning user 12 will visit POI index"],
                return_tensors="pt", padding=True)
    ours = beam_search(model, batch["input_ids"], batch["attention_mask"], trie, num_beams=15)
    ref, ref_scores = _hf_beams(model, batch["input_ids"], batch["attention_mask"], trie, table, token_ids, 15)
    assert torch.equal(ours.loc_ids, ref)
    torch.testing.assert_close(ours.scores, ref_scores.float(), rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------- baselines
def test_count_baselines_on_a_hand_made_history() -> None:
    from lightning_modules.baselines import CountBaselines

    t0 = pl.datetime(2024, 1, 1)
    rows = [("t1", "u1", 1), ("t1", "u1", 2), ("t1", "u1", 1), ("t2", "u2", 3), ("t2", "u2", 3), ("t2", "u2", 2)]
    train = pl.DataFrame(rows, schema=["traj_id", "user_id", "loc_id"], orient="row").with_columns(
        utc_time=t0 + pl.duration(hours=pl.int_range(pl.len())))
    b = CountBaselines(train, size=3)
    cases = pl.DataFrame({"user_id": ["u1", "u2", "u9"], "prev_loc": [2, 2, None]})
    assert b.rank("most_popular", cases).tolist() == [[1, 2, 3]] * 3  # counts 1:2, 2:2, 3:2 -> ties by id
    assert b.rank("user_most_frequent", cases).tolist() == [[1, 2, 3], [3, 2, 1], [1, 2, 3]]
    # 2 -> 1 (u1), so Markov puts 1 first after 2; without a previous location it backs off.
    assert b.rank("markov", cases).tolist()[0] == [1, 2, 3]
    assert b.rank("markov", cases).tolist()[1] == [1, 3, 2]


def test_stage_baselines_on_the_nyc_release(nyc_release, tmp_path) -> None:
    cfg = compose_cfg(["experiment=nyc_qlora", f"data.root={nyc_release}", f"paths.artifacts={tmp_path}"])
    res = run_pipeline(cfg, "baselines")
    assert res["cases"]["next"] == 2698
    m = res["metrics"]
    # The reference points on this split: user frequency ~0.19, first-order Markov ~0.11 Acc@1.
    assert 0.15 < m["user_most_frequent"]["next"]["acc@1"] < 0.25
    assert 0.07 < m["markov"]["next"]["acc@1"] < 0.16
    assert m["most_popular"]["next"]["acc@1"] < m["user_most_frequent"]["next"]["acc@1"]
    # The strongest rule: the user's visits near the target hour + the current trajectory, tuned on valid.
    assert m["user_time"]["next"]["acc@1"] >= 0.21, m["user_time"]["next"]
    assert res["tuned"]["user_time"]["next"]["valid"]["cases"] == 1000, "tuned on the 1,000 valid trajectories"
    assert res["cases"]["recovery_single"] == 4238, "the full recovery test set"
    lo, hi = res["intervals"]["next"]["intervals"]["user_time"]["acc@1"]
    assert lo < m["user_time"]["next"]["acc@1"] < hi and hi - lo < 0.04
    assert "user_most_frequent" in res["intervals"]["next"]["differences"]
    md = (tmp_path / "nyc" / "baselines" / "results.md").read_text()
    assert "| user_time | next-location | 0.2" in md and "paired bootstrap interval" in md
    assert set(res["hit_split"]["next"]) == set(m) - {"user_time"}
    ranked = pl.read_parquet(tmp_path / "nyc" / "baselines" / "rankings.parquet")
    assert ranked.height == 2698 + 4238 and set(m) <= set(ranked.columns)


# ----------------------------------------------------------------------------- stage=test
@pytest.fixture(scope="module")
def tested(tmp_path_factory, model_cache):
    art = tmp_path_factory.mktemp("test_stage")
    cfg = compose_cfg(["experiment=smoke", f"paths.artifacts={art}", f"paths.cache={model_cache}", "tokenizer.progress_bar=false"])
    return cfg, run_pipeline(cfg, "test"), art


def test_stage_test_writes_model_and_baselines_on_the_same_cases(tested) -> None:
    cfg, res, art = tested
    folder = art / "synthetic" / "smoke"
    saved = json.loads((folder / "results.json").read_text())
    assert saved["metrics"] == res["metrics"]
    models = set(res["metrics"])
    assert {"most_popular", "user_most_frequent", "markov", "user_time", "gru"} <= models and len(models) == 6
    for name, per_task in res["metrics"].items():
        assert set(per_task) == {"next", "recovery_single"}, name
        for m in per_task.values():
            assert 0 <= m["acc@1"] <= m["acc@5"] <= m["acc@10"] <= 1
    assert res["cases"]["next"] > 0 and res["exact"]["next"]["cases"] > 0
    md = (folder / "results.md").read_text()
    assert "QT-Mob (tiny_random)" in md and "markov" in md
    # Intervals on every row and the paired differences with their "beats" marks.
    model = "QT-Mob (tiny_random)"
    assert saved["reference"] == model and set(saved["intervals"]) == {"next", "recovery_single"}
    for task, b in saved["intervals"].items():
        assert set(b["intervals"]) == models and b["resamples"] >= 1000
        assert set(b["differences"]) == models - {model}
        for d in b["differences"].values():
            assert d["acc@1"]["ci"][0] <= d["acc@1"]["diff"] <= d["acc@1"]["ci"][1]
    assert "Paired differences QT-Mob (tiny_random) − row" in md and " beats " in md
    # Each Acc@1 difference split into the cases only the model / only the row gets right.
    for task, rows in saved["hit_split"].items():
        assert set(rows) == models - {model}
        for other, sp in rows.items():
            d = saved["intervals"][task]["differences"][other]["acc@1"]["diff"]
            assert sp["reference_only"] - sp["row_only"] == pytest.approx(d, abs=2e-4), (task, other)
    assert "right only: reference / row" in md
    # Per-case rankings of every row (and the LLM's beam scores), from which the metrics follow.
    ranked = pl.read_parquet(folder / "rankings.parquet")
    assert ranked.height == sum(res["cases"].values()) and set(models) | {f"{model} scores"} <= set(ranked.columns)
    for name in models:
        assert score_by_task(np.array(ranked[name].to_list()), ranked, 10) == saved["metrics"][name], name
    beams = np.array(ranked[f"{model} scores"].to_list())
    assert np.all(beams[:, :-1] >= beams[:, 1:] - 1e-6), "beams best first"
    assert set(saved["cut_history"]) == {"next", "recovery_single"}
    assert saved["tuned"]["gru"]["all"]["dim"] in (64, 128) and "user_time" in saved["tuned"]
    assert list((art / "synthetic" / "smoke" / "tb" / "test").rglob("events.out.tfevents*"))


def test_stage_test_is_deterministic(tested) -> None:
    cfg, res, _ = tested
    again = run_pipeline(cfg, "test", force=True)
    assert again["metrics"] == res["metrics"]


def test_stage_predict_ranks_next_locations_for_a_csv(tested, tmp_path, capsys, caplog) -> None:
    from datamodules.config import ConfigError
    from datamodules.errors import DataError
    from pipeline.predict import run_predict_stage

    cfg, _, art = tested
    locs = pl.read_parquet(tokenizer_dir(cfg) / "codes.parquet")["loc_id"].to_list()
    good = tmp_path / "me.csv"
    good.write_text(f"time,loc_id\n2024-03-01 08:10:00,{locs[0]}\n2024-03-01 12:30:00,{locs[1]}\n2024-03-01 18:05:00,{locs[2]}\n")
    cfg.eval.predict.input = str(good)
    out = run_predict_stage(cfg)
    preds = out["predictions"]
    assert [p["rank"] for p in preds] == list(range(1, 11)) and all(p["loc_id"] in locs for p in preds)
    assert all(p["lat"] is not None and p["category"] for p in preds)
    assert out["at"] == "2024-03-01 19:05:00"
    printed = capsys.readouterr().out
    assert printed.startswith("rank,loc_id,log_prob,lat,lon,category,name")
    # A run whose overrides disagree with how the model was aligned still writes the prompt and normalises the
    # beams as the model's qtmob.json records (official visits, the vocabulary softmax), and says so.
    with caplog.at_level(logging.WARNING, logger="pipeline.predict"):
        cfg.data.samples.visit_text, cfg.align.code_softmax = "compact", "level"
        try:
            assert run_predict_stage(cfg)["predictions"] == preds
        finally:
            cfg.data.samples.visit_text, cfg.align.code_softmax = "official", "vocab"
    warned = caplog.text
    assert "visit_text='official'; this run's 'compact' is not used" in warned
    assert "code_softmax='vocab'; this run's 'level' is not used" in warned
    # Extreme settings end in one line each, before any decoding.
    # Settings outside their range are config errors (pipeline/config.py); the rest need the model or the CSV.
    for key, value, error, message in [
        ("top_k", 200, DataError, "top_k=200; choose a whole number from 1 to"), ("top_k", 0, ConfigError, "top_k=0"),
        ("top_k", -3, ConfigError, "top_k=-3"), ("format", "xml", ConfigError, r"format='xml' is not one of \['csv', 'json'\]"),
        ("at", "2024-03-01 07:00:00", DataError, "is not after the last check-in"),
    ]:
        old = cfg.eval.predict[key]
        cfg.eval.predict[key] = value
        try:
            with pytest.raises(error, match=message):
                run_predict_stage(cfg)
        finally:
            cfg.eval.predict[key] = old
    stranger = tmp_path / "stranger.csv"
    stranger.write_text(f"time,loc_id,user_id\n2024-03-01 08:10:00,{locs[0]},nobody\n")
    cfg.eval.predict.input = str(stranger)
    assert run_predict_stage(cfg)["cold_start"] is True
    assert out["cold_start"] is False or out["user_id"] == "anonymous"
    bad = tmp_path / "bad.csv"
    bad.write_text(f"time,loc_id\n2024-03-01 08:10:00,{locs[0]}\nyesterday,{locs[1]}\n2024-03-01 18:05:00,999999\n")
    cfg.eval.predict.input = str(bad)
    with pytest.raises(DataError, match=r"bad.csv: 2 bad row\(s\): line 3: time 'yesterday'.*line 4: loc_id 999999"):
        run_predict_stage(cfg)


# ----------------------------------------------------------------------------- TensorBoard as a user sees it
def test_tensorboard_serves_every_dashboard_of_a_run(tested) -> None:
    """Start ``tensorboard --logdir <run>/tb`` and find, through its HTTP API, what a user looks for:
    per-task losses, val/acc@1, the rqvae figures, the code map and the sample generations."""
    import re
    import subprocess
    import sys
    import time
    import urllib.request

    from pipeline.paths import tb_dir

    cfg, _, _ = tested
    logdir = tb_dir(cfg)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url, seen, deadline = None, [], time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            seen.append(line)
            if m := re.search(r"(http://127\.0\.0\.1:\d+)", line):
                url = m.group(1)
        assert url, "tensorboard did not start:\n" + "".join(seen)

        def get(path: str) -> dict:
            for _ in range(100):  # the first scan of the logdir runs in the background
                data = json.loads(urllib.request.urlopen(url + path, timeout=30).read())
                if data:
                    return data
                time.sleep(0.3)
            return data

        runs = get("/data/runs")
        assert any(r.startswith("tokenizer") for r in runs) and any(r.startswith("align") for r in runs), runs
        scalars = get("/data/plugin/scalars/tags")
        tags = {tag for run_tags in scalars.values() for tag in run_tags}
        for tag in ("align/train/loss", "align/train/loss_next", "align/train/loss_recovery", "align/train/loss_translation",
                    "align/val/loss", "align/val/loss_next", "align/val/acc@1", "align/lr", "align/grad_norm",
                    "align/tokens_per_s", "align/peak_rss_mb", "rqvae/train_loss", "rqvae/recon", "rqvae/quant",
                    "rqvae/usage_l0", "rqvae/perplexity_l0", "rqvae/collision_rate", "test/next/acc@1",
                    "test/baselines/user_time/next/acc@1", "test/gru/dim64/train_loss"):
            assert tag in tags, (tag, sorted(tags))
        # Namespaced: no stage writes a bare train/... or val/... tag that another stage could reuse.
        assert not [t for t in tags if t.split("/")[0] in ("train", "val", "baseline_gru", "test_baselines")], sorted(tags)
        align_run = next(r for r in scalars if r.startswith("align") and "align/val/loss" in scalars[r])
        quoted = urllib.request.quote(align_run)
        points = get(f"/data/plugin/scalars/scalars?run={quoted}&tag=align/val/loss")
        assert len(points) >= 2, f"a validation curve, not a point: {points}"
        acc = get(f"/data/plugin/scalars/scalars?run={quoted}&tag={urllib.request.quote('align/val/acc@1')}")
        assert acc and 0.0 <= acc[-1][2] <= 1.0
        histograms = get("/data/plugin/histograms/tags")
        assert any("rqvae/codes_l0" in t and "rqvae/codes_l3" in t for t in histograms.values()), histograms
        images = get("/data/plugin/images/tags")
        assert any("rqvae/code_map" in t for t in images.values()), images
        texts = get("/data/plugin/text/tags")
        assert any(any("generation" in tag for tag in t) for t in texts.values()), texts
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_every_stage_dashboard_has_the_runs_own_hyperparameters(tested) -> None:
    """HPARAMS (read back from the event files, as TensorBoard's hparams plugin does) hold the run's
    configuration — align.lr, the LLM, the tokenizer — with the stage's final figures, never the GRU's
    constructor arguments."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from pipeline.paths import tb_dir

    cfg, _, _ = tested
    for stage, metric in (("tokenizer", "rqvae/score"), ("align", "align/val/loss"), ("test", "test/next/acc@1")):
        (version,) = sorted((tb_dir(cfg) / stage).glob("version_*"))[-1:]
        acc = EventAccumulator(str(version))
        acc.Reload()
        content = acc.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
        hp = {k: (v.string_value or v.number_value or v.bool_value) for k, v in start.hparams.items()}
        assert hp["align.lr"] == pytest.approx(float(cfg.align.lr)) and hp["llm.name"] == "tiny_random", (stage, sorted(hp)[:20])
        assert hp["tokenizer.name"] == str(cfg.tokenizer.name) and "dim" not in hp, stage
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
        assert metric in {m.name.tag for m in experiment.metric_infos}, stage


def test_the_readme_example_prints_the_top5_of_the_suites_own_ranking(tested, tmp_path) -> None:
    """The README's prediction example, run as written (only the folder swapped for this run's), prints the
    same top-5 as the suite's constrained beam search on the same prompt."""
    import re
    import subprocess
    import sys

    from pipeline.test import load_for_eval
    from lightning_modules.ranking import rank_prompts

    cfg, _, art = tested
    folder = art / "synthetic" / "smoke" / "model"
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- example: predict -->\s*```python\n(.*?)```", readme, re.S)
    assert block, "README lost its prediction example"
    code = block.group(1)
    assert len(code.strip().splitlines()) <= 20
    code, n = re.subn(r'folder = "[^"]+"', f'folder = "{folder}"', code)
    assert n == 1
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    printed = re.search(r"top-5 next locations: \[(.*)\]", done.stdout)
    assert printed, done.stdout
    shown = [int(x) for x in printed.group(1).split(",")]
    model, _, encoder, trie, meta = load_for_eval(cfg, folder)
    assert meta == json.loads((folder / "qtmob.json").read_text())
    ranked, _ = rank_prompts(model, encoder, trie, [meta["example"]["prompt"]], 5, 1)
    assert shown == ranked[0].tolist()


def test_level_softmax_beams_are_exact_and_rank_by_level_normalised_probabilities() -> None:
    """code_softmax="level" (a model trained with align.code_softmax=level): each step's log-probabilities are
    normalised over that level's code tokens. Exhaustive beam search then gives the exact scores computed
    the same way, the probabilities of all codes under one prefix of levels sum to at most 1, and the
    ranking differs from the vocabulary-normalised one where the ordinary tokens take different mass."""
    from lightning_modules.constrained_decoding import beam_search, exact_scores, level_normalised

    case = _exhaustive_beams("level", model_seed=5, ids_seed=4, batch=3)
    model, ids, mask, level_ids, exact = case.model, case.ids, case.mask, case.level_ids, case.exact
    # the first level alone: its K tokens' probabilities sum to exactly 1
    first = model(input_ids=ids).logits[:, -1].float().log_softmax(-1)[:, level_ids[0]]
    torch.testing.assert_close(torch.logsumexp(level_normalised(first, level_ids[0]), -1), torch.zeros(3), atol=1e-5, rtol=0)
    vocab_norm = exact_scores(model, ids, mask, case.code_ids, chunk=16)
    assert (exact >= vocab_norm - 1e-5).all() and not torch.allclose(exact, vocab_norm)
    with pytest.raises(ValueError, match="code_softmax"):
        beam_search(model, ids, mask, case.trie, num_beams=3, code_softmax="codes")

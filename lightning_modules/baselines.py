"""In-run baselines, fitted on the train split only and ranked on the same cases as the LLM.

* ``most_popular`` — train check-in counts;
* ``user_most_frequent`` — the user's own train visits, then popularity;
* ``markov`` — first-order transitions (last visible location → next), backing off to the user's
  frequencies, then to popularity; for a recovery case with a visible visit after the mask, both
  neighbours count: P(c | before) · P(after | c) (add-½ smoothing over all places);
* ``user_time`` — the user's visits near the target's hour of day, overall, and in the current
  trajectory (:mod:`lightning_modules.user_time`; its weights are tuned on the valid split);
* ``gru`` — a small sequential model over location ids (:class:`SequenceBaselineModule`), trained
  in the same run on every prefix of every train trajectory.

A *case* is one prediction: ``sample_id, task, user_id, target_loc, target_hour, prev_loc, next_loc,
context`` where ``context`` is the list of visible location ids before the target (the history of a
next-location case, the visible left part of a recovery case) and ``next_loc`` the first visible
visit after a recovery target (null otherwise).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable

import lightning as L
import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from datamodules.samples import add_positions


def eval_cases(index: pl.DataFrame, checkins: pl.DataFrame) -> pl.DataFrame:
    """The cases of a (filtered) sample index: next-location and single recovery rows.

    ``sample_id`` is the row number in ``index``, as :func:`datamodules.samples.render_samples`
    numbers the rendered prompts, so predictions and cases line up.
    """
    v = add_positions(checkins.select("traj_id", "user_id", "utc_time", "local_time", "loc_id")).select(
        "traj_id", "pos", "loc_id", target_hour=pl.col("local_time").dt.hour().cast(pl.Int32)
    )
    idx = index.with_row_index("sample_id").filter(pl.col("task").is_in(["next", "recovery_single"]))
    window = (
        idx.select("sample_id", "traj_id", "start", "target_pos", "masked", "task")
        .with_columns(pos=pl.int_ranges("start", "target_pos", dtype=pl.Int32))
        .explode("pos")
        .filter(pl.col("pos").is_not_null())
        .filter(~pl.col("pos").is_in(pl.col("masked").fill_null([])) | (pl.col("task") == "next"))
        .join(v.drop("target_hour"), on=["traj_id", "pos"], how="left")
        .group_by("sample_id", maintain_order=True)
        .agg(context=pl.col("loc_id"))
    )
    # Recovery: the first visible visit after the target (the right neighbour a two-sided rule uses).
    after = (
        idx.filter(pl.col("task") == "recovery_single")
        .select("sample_id", "traj_id", "target_pos", "masked", end=pl.col("end"))
        .with_columns(pos=pl.int_ranges(pl.col("target_pos") + 1, "end", dtype=pl.Int32))
        .explode("pos")
        .filter(pl.col("pos").is_not_null() & ~pl.col("pos").is_in(pl.col("masked").fill_null([])))
        .join(v.drop("target_hour"), on=["traj_id", "pos"], how="left")
        .group_by("sample_id", maintain_order=True)
        .agg(next_loc=pl.col("loc_id").first())
    )
    target = v.rename({"pos": "target_pos", "loc_id": "target_loc"})
    return (
        idx.select("sample_id", "task", "user_id", "traj_id", "target_pos")
        .join(target, on=["traj_id", "target_pos"], how="left")
        .join(window, on="sample_id", how="left")
        .join(after, on="sample_id", how="left")
        .with_columns(pl.col("context").fill_null([]))
        .with_columns(prev_loc=pl.col("context").list.last())
        .sort("sample_id")
    )


def _fill(ranked: list[int], *pools: Iterable[int], size: int) -> list[int]:
    seen, out = set(), []
    for pool in (ranked, *pools):
        for loc in pool:
            if loc not in seen:
                seen.add(loc)
                out.append(loc)
                if len(out) == size:
                    return out
    return out + [-1] * (size - len(out))


class CountBaselines:
    """Popularity, user frequency and first-order Markov rankings from train check-ins.

    Args:
        train: Train check-ins (``traj_id, user_id, utc_time, loc_id``).
        size: Length of every ranked list.
    """

    names = ("most_popular", "user_most_frequent", "markov")

    def __init__(self, train: pl.DataFrame, size: int = 10) -> None:
        self.size = size
        t = add_positions(train.select("traj_id", "user_id", "utc_time", "loc_id"))
        pop = t.group_by("loc_id").len().sort(["len", "loc_id"], descending=[True, False])
        self.popular = pop["loc_id"].to_list()
        self.user: dict[object, list[int]] = {}
        for user, df in t.group_by("user_id").agg(pl.col("loc_id")).iter_rows():
            c = Counter(df)
            self.user[user] = sorted(c, key=lambda loc: (-c[loc], loc))[: size * 2]
        nxt = t.with_columns(nxt=pl.col("loc_id").shift(-1).over("traj_id")).filter(pl.col("nxt").is_not_null())
        trans = nxt.group_by("loc_id", "nxt").len().sort(["loc_id", "len", "nxt"], descending=[False, True, False])
        self.markov: dict[int, list[int]] = defaultdict(list)
        for a, b in trans.select("loc_id", "nxt").iter_rows():
            if len(self.markov[a]) < size:
                self.markov[a].append(b)
        # Full transition counts for the two-sided recovery rule.
        self.forward: dict[int, dict[int, int]] = defaultdict(dict)
        self.backward: dict[int, dict[int, int]] = defaultdict(dict)
        for a, b, n in trans.select("loc_id", "nxt", "len").iter_rows():
            self.forward[a][b] = n
            self.backward[b][a] = n
        self.out_degree = {a: sum(d.values()) for a, d in self.forward.items()}

    def bridge(self, before: int, after: int) -> list[int]:
        """Places between two visible visits, by P(c | before) · P(after | c) (candidates: the successors
        of ``before`` and the predecessors of ``after``). Add-½ smoothing over all N places, so a rare
        place with no known successor does not get P(after | c) = 1; on the NYC valid split this
        two-sided rule reaches Acc@1 0.147 against 0.126 for ``before`` alone (α 0.001–0.5 all beat it)."""
        cands = set(self.forward.get(before, {})) | set(self.backward.get(after, {}))
        if not cands:
            return []
        alpha, n = 0.5, max(len(self.popular), 1)
        out_b = self.out_degree.get(before, 0) + alpha * n

        def key(c: int) -> tuple[float, int]:
            p1 = (self.forward.get(before, {}).get(c, 0) + alpha) / out_b
            p2 = (self.forward.get(c, {}).get(after, 0) + alpha) / (self.out_degree.get(c, 0) + alpha * n)
            return (-p1 * p2, c)

        return sorted(cands, key=key)[: self.size]

    def rank(self, name: str, cases: pl.DataFrame) -> np.ndarray:
        """``(n_cases, size)`` ranked location ids of baseline ``name``."""
        pop = self.popular[: self.size * 2]
        rows = []
        after = cases["next_loc"] if "next_loc" in cases.columns else pl.Series([None] * cases.height)
        for (user, prev), nxt in zip(cases.select("user_id", "prev_loc").iter_rows(), after.to_list()):
            mine = self.user.get(user, [])
            if name == "most_popular":
                rows.append(_fill(pop, size=self.size))
            elif name == "user_most_frequent":
                rows.append(_fill(mine, pop, size=self.size))
            elif name == "markov":
                if prev is not None and nxt is not None:
                    first = self.bridge(prev, nxt)
                else:
                    first = self.markov.get(prev, []) if prev is not None else []
                rows.append(_fill(first, mine, pop, size=self.size))
            else:
                raise ValueError(f"unknown baseline {name!r}; choose from {self.names}")
        return np.asarray(rows, dtype=np.int64).reshape(len(rows), self.size)


# ------------------------------------------------------------------------------ sequential
class _Prefixes(Dataset):
    def __init__(self, seqs: list[np.ndarray], users: np.ndarray) -> None:
        self.seqs, self.users = seqs, users

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.seqs[i], int(self.users[i])


def _pad(batch: list[tuple[np.ndarray, int]]) -> dict[str, Tensor]:
    width = max(len(s) for s, _ in batch)
    x = torch.zeros(len(batch), width, dtype=torch.long)
    for i, (s, _) in enumerate(batch):
        x[i, : len(s)] = torch.from_numpy(np.asarray(s, dtype=np.int64))
    return {"seq": x, "user": torch.tensor([u for _, u in batch], dtype=torch.long)}


class SequenceBaselineModule(L.LightningModule):
    """GRU over location (and user) embeddings predicting the next location at every step.

    Location ids are mapped to ``1..N`` (0 = padding). Trained with teacher forcing on whole train
    trajectories: the loss at position ``t`` predicts visit ``t+1``.

    Args:
        num_locations: N.
        num_users: Users (row 0 = unknown user).
        dim: Embedding and hidden size.
        lr: Adam learning rate.
    """

    def __init__(self, num_locations: int, num_users: int, dim: int = 128, lr: float = 3e-3, dropout: float = 0.2) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # the test dashboard's HPARAMS are the run's, not the GRU's
        self.loc = nn.Embedding(num_locations + 1, dim, padding_idx=0)
        self.user = nn.Embedding(num_users + 1, dim)
        self.gru = nn.GRU(dim, dim, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(2 * dim, num_locations + 1)

    def forward(self, seq: Tensor, user: Tensor) -> Tensor:
        h, _ = self.gru(self.drop(self.loc(seq)))
        u = self.user(user).unsqueeze(1).expand(-1, seq.shape[1], -1)
        logits = self.out(self.drop(torch.cat([h, u], dim=-1)))
        logits[..., 0] = float("-inf")  # never predict padding
        return logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        seq = batch["seq"]
        logits = self(seq[:, :-1], batch["user"])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1), ignore_index=0)
        self.log(f"test/gru/dim{self.hparams.dim}/train_loss", loss, prog_bar=True, batch_size=seq.shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def _valid_key(ranked: np.ndarray, target: np.ndarray) -> float:
    """Acc@1 + NDCG@5: the figure the valid-split choices of the baselines maximise."""
    hit = ranked == target[:, None]
    rank = np.where(hit.any(1), hit.argmax(1), ranked.shape[1])
    return float((rank == 0).mean() + np.where(rank < 5, 1.0 / np.log2(rank + 2.0), 0.0).mean())


class _BestEpochOnValid(L.Callback):
    """Keeps the weights of the epoch with the best valid Acc@1 + NDCG@5 (early stopping without a
    patience: every epoch is scored, the best one is restored at the end)."""

    def __init__(self, baseline: GRUBaseline, valid_cases: pl.DataFrame) -> None:
        self.baseline, self.valid = baseline, valid_cases
        self.target = valid_cases["target_loc"].to_numpy()
        self.best, self.best_epoch, self.state = -1.0, 0, None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.eval()
        value = _valid_key(self.baseline.rank(self.valid), self.target)
        pl_module.train()
        pl_module.log(f"test/gru/dim{pl_module.hparams.dim}/valid_acc1_ndcg5", value)
        if value > self.best:
            self.best, self.best_epoch = value, trainer.current_epoch + 1
            self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


class GRUBaseline:
    """Fits :class:`SequenceBaselineModule` on train trajectories and ranks cases with it.

    Args:
        train: Train check-ins.
        locations: All location ids that may be predicted.
        epochs: Training epochs (with ``valid_cases``: the most; the best epoch on valid is kept).
        seed: Seed (fixed: same data, same ranking).
        valid_cases: Valid-split cases (:func:`eval_cases`) that pick the epoch.
        trainer_factory: ``(label, **trainer_args) -> Trainer``: the run's Trainer factory (its logger,
            progress and extra Lightning arguments); None: a silent one-process Trainer.
    """

    def __init__(self, train: pl.DataFrame, locations: Iterable[int], epochs: int = 15, size: int = 10,
                 seed: int = 0, dim: int = 128, valid_cases: pl.DataFrame | None = None,
                 trainer_factory: Callable[..., L.Trainer] | None = None) -> None:
        self.size = size
        locs = sorted(set(int(x) for x in locations))
        self.to_idx = {loc: i + 1 for i, loc in enumerate(locs)}
        self.from_idx = np.asarray([-1] + locs, dtype=np.int64)
        users = sorted(train["user_id"].unique().to_list(), key=str)
        self.user_idx = {u: i + 1 for i, u in enumerate(users)}
        t = add_positions(train.select("traj_id", "user_id", "utc_time", "loc_id"))
        trajs = t.group_by("traj_id", maintain_order=True).agg(pl.col("user_id").first(), pl.col("loc_id"))
        seqs = [np.asarray([self.to_idx[x] for x in s], dtype=np.int64) for s in trajs["loc_id"].to_list() if len(s) >= 2]
        us = np.asarray([self.user_idx[u] for u, s in zip(trajs["user_id"].to_list(), trajs["loc_id"].to_list()) if len(s) >= 2])
        L.seed_everything(seed, verbose=False)
        self.module = SequenceBaselineModule(len(locs), len(users), dim=dim)
        loader = DataLoader(_Prefixes(seqs, us), batch_size=64, shuffle=True, collate_fn=_pad,
                            generator=torch.Generator().manual_seed(seed))
        picker = _BestEpochOnValid(self, valid_cases) if valid_cases is not None and valid_cases.height else None
        args = dict(max_epochs=epochs, enable_checkpointing=False, log_every_n_steps=max(1, min(10, len(loader))),
                    deterministic=True, callbacks=[picker] if picker else [])
        if trainer_factory is None:
            trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_model_summary=False,
                                enable_progress_bar=False, **args)
        else:
            trainer = trainer_factory(f"gru dim {dim}", **args)
        trainer.fit(self.module, loader)
        self.epochs, self.valid_score = epochs, None
        if picker is not None and picker.state is not None:
            self.module.load_state_dict(picker.state)
            self.epochs, self.valid_score = picker.best_epoch, picker.best
        self.module.eval()

    @torch.no_grad()
    def rank(self, cases: pl.DataFrame) -> np.ndarray:
        """``(n_cases, size)`` ranked location ids (from the visible context before each target)."""
        out = np.full((cases.height, self.size), -1, dtype=np.int64)
        contexts = [[self.to_idx.get(x, 0) for x in (c or [])][-20:] for c in cases["context"].to_list()]
        users = [self.user_idx.get(u, 0) for u in cases["user_id"].to_list()]
        for start in range(0, len(contexts), 256):
            part = contexts[start : start + 256]
            lengths = torch.tensor([max(len(c), 1) for c in part])
            seq = _pad([(np.asarray(c or [0]), 0) for c in part])["seq"]
            logits = self.module(seq, torch.tensor(users[start : start + 256]))
            last = logits[torch.arange(len(part)), lengths - 1]
            top = last.topk(self.size, dim=1).indices.numpy()
            out[start : start + len(part)] = self.from_idx[top]
        return out


def fit_gru(train: pl.DataFrame, locations: Iterable[int], dims: Iterable[int], epochs: int, valid_cases: pl.DataFrame,
            size: int = 10, seed: int = 0, trainer_factory: Callable[..., L.Trainer] | None = None) -> tuple[GRUBaseline, dict[str, float]]:
    """The GRU with its width and epoch count picked on the valid split (best Acc@1 + NDCG@5).

    Returns:
        The chosen model and ``{"dim", "epochs", "valid_acc1_plus_ndcg5"}``.
    """
    best, info = None, {}
    for dim in dims:
        gru = GRUBaseline(train, locations, epochs=epochs, size=size, seed=seed, dim=int(dim), valid_cases=valid_cases,
                          trainer_factory=trainer_factory)
        score = gru.valid_score if gru.valid_score is not None else -1.0
        if best is None or score > info["valid_acc1_plus_ndcg5"]:
            best, info = gru, {"dim": int(dim), "epochs": int(gru.epochs), "valid_acc1_plus_ndcg5": round(float(score), 6)}
    if best is None:
        raise ValueError("eval.gru.dims is empty: give at least one width")
    return best, info


__all__ = ["CountBaselines", "GRUBaseline", "SequenceBaselineModule", "eval_cases", "fit_gru"]

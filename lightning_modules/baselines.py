"""In-run baselines, fitted on the train split only and ranked on the same cases as the LLM.

* ``most_popular`` — train check-in counts;
* ``user_most_frequent`` — the user's own train visits, then popularity;
* ``markov`` — first-order transitions (last visible location → next), backing off to the user's
  frequencies, then to popularity;
* ``gru`` — a small sequential model over location ids (:class:`SequenceBaselineModule`), trained
  in the same run on every prefix of every train trajectory.

A *case* is one prediction: ``sample_id, task, user_id, target_loc, prev_loc, context`` where
``context`` is the list of visible location ids before the target (the history of a next-location
case, the visible left part of a recovery case).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable

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
    v = add_positions(checkins.select("traj_id", "user_id", "utc_time", "loc_id")).select("traj_id", "pos", "loc_id")
    idx = index.with_row_index("sample_id").filter(pl.col("task").is_in(["next", "recovery_single"]))
    window = (
        idx.select("sample_id", "traj_id", "start", "target_pos", "masked", "task")
        .with_columns(pos=pl.int_ranges("start", "target_pos", dtype=pl.Int32))
        .explode("pos")
        .filter(pl.col("pos").is_not_null())
        .filter(~pl.col("pos").is_in(pl.col("masked").fill_null([])) | (pl.col("task") == "next"))
        .join(v, on=["traj_id", "pos"], how="left")
        .group_by("sample_id", maintain_order=True)
        .agg(context=pl.col("loc_id"))
    )
    target = v.rename({"pos": "target_pos", "loc_id": "target_loc"})
    return (
        idx.select("sample_id", "task", "user_id", "traj_id", "target_pos")
        .join(target, on=["traj_id", "target_pos"], how="left")
        .join(window, on="sample_id", how="left")
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

    def rank(self, name: str, cases: pl.DataFrame) -> np.ndarray:
        """``(n_cases, size)`` ranked location ids of baseline ``name``."""
        pop = self.popular[: self.size * 2]
        rows = []
        for user, prev in cases.select("user_id", "prev_loc").iter_rows():
            mine = self.user.get(user, [])
            if name == "most_popular":
                rows.append(_fill(pop, size=self.size))
            elif name == "user_most_frequent":
                rows.append(_fill(mine, pop, size=self.size))
            elif name == "markov":
                rows.append(_fill(self.markov.get(prev, []) if prev is not None else [], mine, pop, size=self.size))
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
        self.save_hyperparameters()
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
        self.log("baseline_gru/loss", loss, prog_bar=True, batch_size=seq.shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class GRUBaseline:
    """Fits :class:`SequenceBaselineModule` on train trajectories and ranks cases with it.

    Args:
        train: Train check-ins.
        locations: All location ids that may be predicted.
        epochs: Training epochs.
        seed: Seed (fixed: same data, same ranking).
        logger: Optional Lightning logger (its loss curve lands beside the LLM's).
    """

    def __init__(self, train: pl.DataFrame, locations: Iterable[int], epochs: int = 15, size: int = 10,
                 seed: int = 0, dim: int = 128, logger: object | None = None) -> None:
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
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger or False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10, deterministic=True)
        trainer.fit(self.module, loader)
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


__all__ = ["CountBaselines", "GRUBaseline", "SequenceBaselineModule", "eval_cases"]

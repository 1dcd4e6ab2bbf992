"""Progress a log file can show, and the start-up filters of known stack noise."""

from __future__ import annotations

import logging
import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.progress import LineProgress, ProgressStyle, duration


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("demo/train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_durations_read_like_a_clock() -> None:
    assert [duration(s) for s in (5, 75, 4000)] == ["5s", "1m15s", "1h06m"]
    assert duration(float("inf")) == "?"


def test_auto_is_lines_without_a_terminal_and_bad_styles_are_refused() -> None:
    # pytest captures stderr, as a SLURM log or a pipe would.
    assert ProgressStyle().resolved() == "lines"
    assert isinstance(ProgressStyle().callback("x"), LineProgress)
    assert ProgressStyle("none").trainer_kwargs("x") == {"callbacks": [], "enable_progress_bar": False}
    with pytest.raises(ValueError, match="progress.style='fancy'"):
        ProgressStyle("fancy")
    assert ProgressStyle.from_mapping({"style": "bar", "every_seconds": 5}) == ProgressStyle("bar", 5.0, 0)


def test_a_fit_prints_step_loss_and_eta_lines_while_it_runs(caplog, tmp_path) -> None:
    caplog.set_level(logging.INFO, logger="qtmob.progress")
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        default_root_dir=tmp_path, log_every_n_steps=1,
                        **ProgressStyle("lines", every_seconds=0, every_steps=2).trainer_kwargs("demo"))
    trainer.fit(_Tiny(), DataLoader(TensorDataset(torch.randn(24, 4)), batch_size=4))
    lines = [r.getMessage() for r in caplog.records if r.name == "qtmob.progress"]
    steps = [m for m in lines if m.startswith("[demo] step ")]
    assert [m.split()[2] for m in steps] == ["2/12", "4/12", "6/12", "8/12", "10/12", "12/12"], lines
    assert all("ETA" in m and "elapsed" in m for m in steps)
    assert "demo/train_loss" in steps[-1] and "(100%)" in steps[-1] and "ETA 0s" in steps[-1]
    assert lines[0].startswith("[demo] training: 12 steps") and lines[-1].startswith("[demo] training done: 12 steps")


def test_a_loop_reports_cases_per_second_and_eta(caplog) -> None:
    caplog.set_level(logging.INFO, logger="qtmob.progress")
    with ProgressStyle("lines", every_seconds=0, every_steps=5).loop("test", 10, "cases") as bar:
        for _ in range(10):
            bar.update(1)
    lines = [r.getMessage() for r in caplog.records if r.name == "qtmob.progress"]
    assert lines[0] == "[test] 10 cases" and lines[-1].startswith("[test] 10 cases in ")
    assert any(m.startswith("[test] 5/10 cases (50%)") and "cases/s" in m and "ETA" in m for m in lines), lines


def test_known_noise_is_filtered_and_the_rest_still_shows(caplog) -> None:
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    from lightning_modules.quiet import quiet_known_noise

    quiet_known_noise()
    quiet_known_noise()  # idempotent: no duplicate filters
    assert len(logging.getLogger("lightning.pytorch.utilities.rank_zero").filters) == 1
    caplog.set_level(logging.INFO)
    rank_zero_info("GPU available: False, used: False")
    rank_zero_info("`Trainer(limit_val_batches=1.0)` was configured so 100% of the batches will be used..")
    rank_zero_info("something new about this run")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["something new about this run"], messages
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet_known_noise()  # catch_warnings reset the filters: install them again inside
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", DeprecationWarning)
        warnings.warn("an unknown problem", UserWarning)
    assert [str(w.message) for w in seen] == ["an unknown problem"]

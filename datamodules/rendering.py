"""Rendering a sample index into text (step 2 of :mod:`datamodules.samples`), once location codes exist.

Vectorised over all samples with Polars: each visit's sentence is written once per variant (its code,
``[MASK]``, ``[UNKNOWN]``) and the windows of a trajectory are joined from those sentences.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import polars as pl

from datamodules.config import SampleConfig
from datamodules.prompts import CONTINUATION_PROMPT, MASK, RESPONSE_PREFIX, TEMPLATES, UNKNOWN, VISIT_TEXT
from datamodules.samples import TASKS, add_positions
from datamodules.user_memory import user_memory
from datamodules.visit_hints import visit_hints


def _template_expr(template: str, values: dict[str, pl.Expr]) -> pl.Expr:
    """``pl.format`` of a ``{name}`` template with per-name expressions."""
    names = re.findall(r"\{(\w+)\}", template)
    return pl.format(re.sub(r"\{\w+\}", "{}", template), *[values[n] for n in names])


def _window_text(samples: pl.DataFrame, flat: pl.Series, n: int, variant: pl.Expr, separator: str) -> pl.Series:
    """Join, per sample, the strings of its visits ``[start, end)`` taken from ``flat``.

    ``flat`` stacks variants of one string per visit (variant ``k`` of visit row ``r`` is at
    ``k * n + r``); ``variant`` picks the variant per (sample, position). Gathering by integer
    index is a memcpy, which keeps rendering fast without per-sample Python.
    """
    rows = samples.select(
        "sample_id", "off", "target_pos", "masked", pos=pl.int_ranges("start", "end", dtype=pl.Int32)
    ).explode("pos")
    rows = rows.with_columns(
        flat_idx=variant.cast(pl.Int64) * n + pl.col("off").cast(pl.Int64) + pl.col("pos").cast(pl.Int64)
    )
    rows = rows.with_columns(text=flat.gather(rows["flat_idx"]))
    joined = rows.group_by("sample_id", maintain_order=True).agg(pl.col("text").str.join(separator))
    # Samples with an empty window (none today) would be missing from the group_by.
    return samples.select("sample_id").join(joined, on="sample_id", how="left", maintain_order="left")["text"].fill_null("")


def _visit_joiner(v: pl.DataFrame, text: pl.Series, separator: str) -> Callable[[pl.DataFrame], pl.Series]:
    """Prepare fast joins of *unmasked* visit windows: per trajectory, all visit strings are
    joined once; a window ``[start, end)`` is then one substring of it (views, no per-visit work).

    Args:
        v: Visits sorted by trajectory and position (``traj_id``).
        text: One string per row of ``v``.
        separator: Between visits.

    Returns:
        A function mapping samples (``traj_id, off, start, end``) to their joined windows.
    """
    sep = len(separator)
    lens = text.str.len_chars().cast(pl.Int64)
    starts = v.select(traj_id="traj_id", ln=lens + sep).select((pl.col("ln").cum_sum() - pl.col("ln")).over("traj_id"))["ln"]
    whole = pl.DataFrame({"traj_id": v["traj_id"], "t": text}).group_by("traj_id").agg(whole=pl.col("t").str.join(separator))

    def window(samples: pl.DataFrame) -> pl.Series:
        first = samples["off"].cast(pl.Int64) + samples["start"].cast(pl.Int64)
        last = samples["off"].cast(pl.Int64) + samples["end"].cast(pl.Int64) - 1
        begin = starts.gather(first)
        length = starts.gather(last) + lens.gather(last) - begin
        return (
            samples.select("traj_id")
            .with_columns(begin=begin, length=length)
            .join(whole, on="traj_id", how="left", maintain_order="left")
            .select(pl.col("whole").str.slice(pl.col("begin"), pl.col("length")))["whole"]
        )

    return window


def _labelled_runs(trajectory: pl.DataFrame, runs: pl.DataFrame) -> tuple[pl.Series, pl.Series]:
    """Per whole-trajectory sample, which runs of code tokens of its answer (its window) are the codes of its
    targets, 0-based: the targets are contiguous, from ``target_pos`` to the window's end (a window whose
    oldest visits were cut to fit, :mod:`datamodules.fitting`, keeps the targets it still holds), and a
    visit's sentence holds ``runs.code_run`` runs (its hint's places) before its own code.

    Args:
        trajectory: Samples with ``sample_id, off, start, end, target_pos``.
        runs: Per visit row: ``code_run`` and ``before`` (the code runs of its trajectory's earlier visits).

    Returns:
        The labelled runs, and beside each how many runs right before it are its visit's hinted places (0 in a
        layout whose code came before the time, where a hint follows its code; no ``VISIT_TEXT`` has one).
    """
    rows = trajectory.select(
        "sample_id", first=pl.col("off").cast(pl.Int64) + pl.col("start").cast(pl.Int64),
        pos=pl.int_ranges(pl.max_horizontal("target_pos", "start"), "end", dtype=pl.Int64) + pl.col("off").cast(pl.Int64),
    ).explode("pos")
    before, code_run = runs["before"], runs["code_run"]
    run = before.gather(rows["pos"]) - before.gather(rows["first"]) + code_run.gather(rows["pos"])
    rows = rows.with_columns(run=run.cast(pl.Int32), hinted=code_run.gather(rows["pos"]).cast(pl.Int32))
    labelled = rows.group_by("sample_id", maintain_order=True).agg("run", "hinted")
    out = trajectory.select("sample_id").join(labelled, on="sample_id", how="left", maintain_order="left")
    return out["run"], out["hinted"]


def _continuation(sub: pl.DataFrame, vals: dict[str, pl.Expr], finish: Callable[..., None], sentence: str,
                  runs: pl.DataFrame) -> None:
    """Next-location samples whose visits are the assistant's turn (``next_format`` continuation or
    trajectory). A per-prefix row answers the target's code after its history and the target's time;
    a whole-trajectory row (``masked`` = its targets) has every visit of its window as the answer, of
    which the code-token runs ``labelled_runs`` (:func:`_labelled_runs`: its targets' codes, not their hints)
    are trained."""
    before_code = sentence.split("{code}")[0]
    whole = pl.col("masked").is_not_null()
    target_prefix = _template_expr(before_code, {"time": pl.col("time"), "user": pl.col("user_id")})
    per_prefix, trajectory = sub.filter(~whole), sub.filter(whole)
    if per_prefix.height:
        finish(per_prefix, "next", vals, pl.col("tgt_code"), pl.col("tgt_loc"),
               prefix=pl.concat_str([pl.col("window"), pl.lit(" "), target_prefix]), template=CONTINUATION_PROMPT)
    if trajectory.height:
        labelled, hinted = _labelled_runs(trajectory, runs)
        trajectory = trajectory.with_columns(labelled=labelled, hinted=hinted)
        finish(trajectory, "next", vals, pl.col("window"), pl.lit(None), prefix=pl.lit(""),
               labelled=pl.col("labelled"), hinted=pl.col("hinted"), template=CONTINUATION_PROMPT)


def _without_lines(text: pl.Expr, drop: tuple[int, ...]) -> pl.Expr:
    """``text`` without its 0-based lines ``drop``."""
    if not drop:
        return text
    keep = pl.element().filter(~pl.int_range(pl.len()).is_in(list(drop)))
    return text.str.split("\n").list.eval(keep).list.join("\n")


def _hints(history: pl.DataFrame, codes: pl.DataFrame, cfg: SampleConfig, visits: pl.DataFrame | None = None) -> pl.DataFrame:
    """The visit hints ``cfg`` asks for (:func:`datamodules.visit_hints.visit_hints`)."""
    return visit_hints(history, codes, cfg.visit_hints, cfg.visit_hint_hours, visits=visits, counts=cfg.visit_hint_counts,
                       count_first=cfg.visit_hint_count_first, user_weight=cfg.visit_hint_user_weight,
                       day_weight=cfg.visit_hint_day_weight, moves_weight=cfg.visit_hint_moves_weight)


def render_samples(
    index: pl.DataFrame,
    visits: pl.DataFrame,
    codes: pl.DataFrame,
    descriptions: pl.DataFrame | None = None,
    profiles: pl.DataFrame | None = None,
    cfg: SampleConfig = SampleConfig(),
    memory: pl.DataFrame | None = None,
    hints: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Render a sample index into text.

    Every visit's sentence (and its ``[MASK]``/``[UNKNOWN]``/numbered/described variants) is
    formatted once; samples then gather and join them by integer position, so the cost is one
    pass over the output text rather than per-sample Python.

    Args:
        index: Output of :func:`build_sample_index`.
        visits: Check-ins with ``traj_id``, ``user_id``, ``local_time``, ``loc_id``.
        codes: ``loc_id, code`` — the token string of each location (e.g. ``<a_1><b_2><c_3><d_4>``).
        descriptions: ``loc_id, description, short_description`` (for the token-semantic and
            translation tasks).
        profiles: ``user_id, profile`` (prepended to next-location and recovery prompts).
        cfg: Sample settings (``add_profile``).
        memory: ``traj_id, memory`` (:func:`datamodules.user_memory.user_memory`: per trajectory, its own
            visits left out), placed after the profile in next-location and recovery prompts.
        hints: ``traj_id, utc_time, hint, hint_places`` (:func:`datamodules.visit_hints.visit_hints`) when
            ``cfg.visit_hints`` is on; default: computed from ``visits`` (which then need ``split``).

    Returns:
        ``sample_id, task, split, traj_id, user_id, target_loc, is_last, template, prompt,
        response_prefix, target, labelled_runs, hint_runs`` — one row per index row, grouped by task (in
        :data:`TASKS` order), index order within a task; ``sample_id`` is the row number in ``index``.
        ``target_loc`` is the location the answer names (null for free-text answers); ``labelled_runs``, of
        a whole-trajectory sample only, the 0-based runs of code tokens of its answer that are its targets' codes,
        and ``hint_runs`` beside each how many runs just before it are the places of its visit's hint.

    Raises:
        ValueError: if a visited or described location has no code, or descriptions are needed
            but missing.
    """
    tasks_present = set(index["task"].unique().to_list())
    needs_text = sorted(tasks_present & {"index2loc", "loc2index", "translation"})
    if needs_text and descriptions is None:
        raise ValueError(f"{needs_text} samples need location descriptions")
    index = index.with_row_index("sample_id")
    v = add_positions(visits.select("traj_id", "user_id", "utc_time", "local_time", "loc_id")).join(
        codes.select("loc_id", "code"), on="loc_id", how="left", maintain_order="left"
    )
    if v["code"].null_count():
        missing = v.filter(pl.col("code").is_null())["loc_id"].unique().head(5).to_list()
        raise ValueError(f"locations without a code, e.g. {missing}: the code table does not cover the data")
    n = v.height
    time_format, visit_sentence = VISIT_TEXT[cfg.visit_text]
    v = v.with_columns(time_s=pl.col("local_time").dt.strftime(time_format))
    plain = "time_s"  # the bare time, which translation blocks keep
    if cfg.visit_hints:  # the hint follows the time wherever a visit or a target is written
        v, plain = v.with_columns(time_plain=pl.col("time_s")), "time_plain"
        if hints is None:
            hints = _hints(visits, codes, cfg)
        v = v.join(hints, on=["traj_id", "utc_time"], how="left", maintain_order="left").with_columns(
            time_s=pl.when(pl.col("hint").fill_null("") != "").then(pl.format("{} {}", "time_s", "hint")).otherwise("time_s")
        )
    # Each hinted place is a run of code tokens of its own in the visit's sentence, beside the visit's code:
    # a whole-trajectory sample labels the runs of its visits' codes (``labelled_runs``), never a hint's.
    hint_runs = (pl.col("hint_places").fill_null(0) if cfg.visit_hints else pl.lit(0)).cast(pl.Int64)
    code_after_time = visit_sentence.index("{code}") > visit_sentence.index("{time}")
    runs = v.with_columns(runs=hint_runs + 1).select(
        code_run=pl.col("runs") - 1 if code_after_time else pl.col("runs") * 0,  # the visit's code among its sentence's runs
        before=pl.col("runs").cum_sum().over("traj_id") - pl.col("runs"),  # runs of the trajectory's earlier visits
    )

    def sentence(code: pl.Expr, time: str = "time_s") -> pl.Expr:
        return _template_expr(visit_sentence, {"time": pl.col(time), "user": pl.col("user_id"), "code": code})

    # Variant 0: the visit with its code; 1: [MASK]; 2: [UNKNOWN].
    flat = pl.concat([v.select(s=sentence(c))["s"] for c in (pl.col("code"), pl.lit(MASK), pl.lit(UNKNOWN))])
    plain_window = _visit_joiner(v, flat.head(n), " ")
    offsets = v.with_row_index("vrow").group_by("traj_id").agg(off=pl.col("vrow").min())
    index = index.join(offsets, on="traj_id", how="left", maintain_order="left")

    def at_target(col: str) -> pl.Series:
        """Per sample, ``v[col]`` at its target visit (null where there is none)."""
        rows = index["off"].cast(pl.Int64) + index["target_pos"].cast(pl.Int64)
        values = v[col].gather(rows.fill_null(0))
        return pl.select(pl.when(rows.is_not_null()).then(values).otherwise(None)).to_series()

    # The head of next-location and recovery prompts: the user's profile sentence, then the trajectory's memory.
    if profiles is not None and cfg.add_profile:
        prof = profiles.select("user_id", head=pl.format("User {} has the following profile: {}\n", "user_id", "profile"))
    else:
        prof = pl.DataFrame(schema={"user_id": pl.String, "head": pl.String})
    if memory is None:
        memory = pl.DataFrame(schema={"traj_id": pl.String, "memory": pl.String})
    index = index.with_columns(
        time=at_target("time_s"), tgt_code=at_target("code"), tgt_loc=at_target("loc_id"),
    )
    keep = ["sample_id", "task", "split", "traj_id", "user_id", "target_loc", "is_last", "template", "prompt", "response_prefix",
            "target", "labelled_runs", "hint_runs"]
    parts: dict[str, pl.DataFrame] = {}

    def finish(df: pl.DataFrame, task: str, values: dict[str, pl.Expr], target: pl.Expr, target_loc: pl.Expr,
               prefix: pl.Expr | None = None, labelled: pl.Expr | None = None, hinted: pl.Expr | None = None,
               template: str | None = None) -> None:
        """Format the prompts (``template`` or the row's template of ``task``), prefix, answer and
        labelled code runs (whole-trajectory samples: with each the number of its hint's runs) of ``df`` into
        ``parts[task]``."""
        if prefix is None:
            prefix = _template_expr(RESPONSE_PREFIX[task], values) if RESPONSE_PREFIX[task] else pl.lit("")
        if labelled is None:
            labelled = pl.lit(None, pl.List(pl.Int32))
        if hinted is None:
            hinted = pl.lit(None, pl.List(pl.Int32))
        # Format each template only on its own rows (a when/then chain would format every
        # template for every row), then restore index order.
        pieces = [
            part.select(
                *[c for c in keep if c not in ("prompt", "response_prefix", "target", "target_loc", "labelled_runs", "hint_runs")],
                prompt=_template_expr(template or TEMPLATES[task][t], values),
                response_prefix=prefix,
                target=target,
                target_loc=target_loc.cast(pl.Int64),
                labelled_runs=labelled,
                hint_runs=hinted,
            ).select(keep)
            for (t,), part in df.partition_by("template", as_dict=True, maintain_order=True).items()
        ]
        if task in parts:  # next-location rows of two kinds (per prefix and whole trajectory)
            pieces.append(parts[task])
        parts[task] = pl.concat(pieces).sort("sample_id") if len(pieces) > 1 else pieces[0]

    def with_profile(df: pl.DataFrame) -> pl.DataFrame:
        return (df.join(prof, on="user_id", how="left", maintain_order="left")
                .join(memory.select("traj_id", "memory"), on="traj_id", how="left", maintain_order="left")
                .with_columns(profile=pl.col("head").fill_null("") + pl.col("memory").fill_null(""))
                .drop("head", "memory"))

    base = {"user": pl.col("user_id"), "time": pl.col("time")}
    for task in ("next", "recovery_multi", "recovery_single"):
        sub = index.filter(pl.col("task") == task)
        if not sub.height:
            continue
        if task == "next":
            variant = None
        elif task == "recovery_multi":
            variant = pl.when(pl.col("pos").is_in(pl.col("masked"))).then(1).otherwise(0)
        else:
            variant = (
                pl.when(pl.col("pos") == pl.col("target_pos")).then(1)
                .when(pl.col("pos").is_in(pl.col("masked"))).then(2)
                .otherwise(0)
            )
        window = plain_window(sub) if variant is None else _window_text(sub, flat, n, variant, " ")
        sub = with_profile(sub.with_columns(window=window))
        vals = {**base, "profile": pl.col("profile"), "history": pl.col("window"), "visits": pl.col("window")}
        if task == "next" and cfg.next_format != "question":
            _continuation(sub, vals, finish, visit_sentence, runs)
            continue
        if task == "recovery_multi":
            full = plain_window(sub)
            finish(sub.with_columns(full=full), task, vals, pl.col("full"), pl.lit(None))
        else:
            finish(sub, task, vals, pl.col("tgt_code"), pl.col("tgt_loc"))

    # Translation: each visit as a numbered block of time + short description -> the token sequence.
    sub = index.filter(pl.col("task") == "translation")
    if sub.height:
        vd = v.join(descriptions.select("loc_id", "short_description"), on="loc_id", how="left", maintain_order="left")
        k = (pl.col("pos") + 1).cast(pl.String)
        numbered = vd.select(s=pl.format("[ {} ] {}", k, sentence(pl.col("code"), plain)))["s"]
        blocks = vd.select(
            s=pl.format("[ {} ]\nTime: {}\nLocation Description: {}", k, plain, pl.col("short_description").fill_null(""))
        )["s"]
        sub = sub.with_columns(blocks=_visit_joiner(v, blocks, "\n")(sub), numbered=_visit_joiner(v, numbered, " ")(sub))
        finish(sub, "translation", {"user": pl.col("user_id"), "blocks": pl.col("blocks")}, pl.col("numbered"), pl.lit(None))

    # Token semantics: code -> description and description -> code.
    for task in ("index2loc", "loc2index"):
        sub = index.filter(pl.col("task") == task)
        if not sub.height:
            continue
        sub = (
            sub.join(codes.select("loc_id", "code"), on="loc_id", how="left", maintain_order="left")
            .join(descriptions.select("loc_id", description=_without_lines(pl.col("description"), cfg.drop_description_lines)),
                  on="loc_id", how="left", maintain_order="left")
        )
        if sub["code"].null_count():
            missing = sub.filter(pl.col("code").is_null())["loc_id"].head(5).to_list()
            raise ValueError(f"locations without a code, e.g. {missing}: the code table does not cover the data")
        vals = {"code": pl.col("code"), "description": pl.col("description")}
        if task == "index2loc":
            finish(sub, task, vals, pl.col("description"), pl.lit(None))
        else:
            finish(sub, task, vals, pl.col("code"), pl.col("loc_id"))

    if not parts:
        return pl.DataFrame(schema={c: (pl.UInt32 if c == "sample_id" else pl.String) for c in keep})
    return pl.concat([parts[t] for t in TASKS if t in parts], rechunk=False)


def sample_renderer(
    history: pl.DataFrame,
    codes: pl.DataFrame,
    descriptions: pl.DataFrame | None,
    profiles: pl.DataFrame | None,
    cfg: SampleConfig,
    visits: pl.DataFrame | None = None,
) -> Callable[[pl.DataFrame], pl.DataFrame]:
    """How a run writes its samples: :func:`render_samples` bound to the user memory and visit hints,
    which are computed once here from ``history``'s train visits (and reused by every re-rendering of
    :func:`datamodules.fitting.fit_history`).

    Args:
        history: The data stage's check-ins (``split`` set): the train visits that memory and hints count.
        codes, descriptions, profiles, cfg: As for :func:`render_samples`.
        visits: The visits the sample index points into, when they are not ``history``'s (``stage=predict``'s
            check-ins); their hints still count ``history``'s train visits only.
    """
    memory = user_memory(history, codes, cfg.user_places, visits)
    hints = _hints(history, codes, cfg, visits) if cfg.visit_hints else None
    written = history if visits is None else visits
    return lambda index: render_samples(index, written, codes, descriptions, profiles, cfg, memory, hints)

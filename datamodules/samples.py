"""QT-Mob's instruction samples as pure Polars functions.

Two steps, so that sample *structure* does not depend on the location codes:

1. :func:`build_sample_index` decides which samples exist — which trajectory, which visits are
   history, which positions are masked, which template — as plain columns. It needs no
   tokenizer, so the data stage can count and store it.
2. :func:`render_samples` turns the index into text once the codes are known (RQ-VAE tokens,
   the released index, or one token per location), vectorised over all samples.

Tasks (design.md §1): ``next`` (next-location), ``recovery_multi`` and ``recovery_single``
(trajectory recovery), ``index2loc`` and ``loc2index`` (token semantics), ``translation``.
Every sample is ``prompt`` (the user turn) + ``response_prefix`` + ``target`` (the assistant turn);
the loss covers the assistant turn, and constrained decoding starts after ``response_prefix``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import polars as pl

from datamodules.config import NEXT_FORMATS, SampleConfig  # noqa: F401 (re-exported: the settings this module reads)

TASKS = ("next", "recovery_multi", "recovery_single", "index2loc", "loc2index", "translation")

MASK, UNKNOWN = "[MASK]", "[UNKNOWN]"

SYSTEM_PROMPT = (
    "You are a helpful assistant that predicts human mobility in a city. Every place (POI) is written "
    "as a POI index: a few special tokens that encode where it is and what it is."
)

# Templates use {name} placeholders; see _template_expr. Evaluation always uses template 0. The
# official code has one next-location wording, so by default (``next_paraphrases: false``) training
# uses template 0 too; the other tasks draw among their wordings, as the official code does.
TEMPLATES: dict[str, list[str]] = {
    "next": [
        "{profile}Here is the current trajectory of user {user}: {history} "
        "Given this trajectory, which POI index will user {user} visit at {time}?",
        "{profile}User {user} has made these visits so far today: {history} "
        "At {time}, where will user {user} go next? Answer with a POI index.",
        "{profile}Trajectory of user {user}: {history} Predict the POI index user {user} visits at {time}.",
    ],
    "recovery_multi": [
        "{profile}Here is a trajectory of user {user} in which some visits are hidden as [MASK]: {visits} "
        "Recover the missing POI indices and output the complete trajectory.",
        "{profile}Some POI indices of this trajectory of user {user} are missing ([MASK]): {visits} "
        "Fill them in and write out the whole trajectory.",
    ],
    "recovery_single": [
        "{profile}Here is a trajectory of user {user}: {visits} One visit is missing ([MASK]) and others "
        "are unknown ([UNKNOWN]). Which POI index is the missing one (not an unknown one)?",
        "{profile}In this trajectory of user {user}, [MASK] marks the visit to recover and [UNKNOWN] marks "
        "visits that are unknown: {visits} What is the POI index at [MASK]?",
    ],
    "index2loc": [
        "What do you know about the place with POI index {code}?",
        "Describe the location, category and surroundings of POI index {code}.",
        "Where is POI index {code} and what kind of place is it?",
    ],
    "loc2index": [
        "{description}\nWhich POI index does this place have?",
        "{description}\nGive the POI index of the place described above.",
    ],
    "translation": [
        "Here is a description of a trajectory of user {user}:\n{blocks}\n"
        "Translate it into the sequence of POI indices.",
        "User {user}'s visits are described as follows:\n{blocks}\nConvert them into POI indices.",
    ],
}
# data.samples.next_format=continuation|trajectory: the visits are the assistant's turn, so the location of
# visit k is predicted from exactly the text that precedes it in the whole trajectory.
CONTINUATION_PROMPT = "{profile}Write the visits of user {user} in time order, each with the POI index of the place visited."

RESPONSE_PREFIX = {
    "next": "At time {time}, user {user} will visit POI index ",
    "recovery_multi": "",
    "recovery_single": "At time {time}, user {user} visited POI index ",
    "index2loc": "",
    "loc2index": "The POI index of this place is ",
    "translation": "",
}

# data.samples.visit_text: (strftime format of a visit's time, the visit sentence with {time} {user} {code}).
VISIT_TEXT = {
    "official": ("%Y-%m-%d %H:%M:%S", "At time {time}, user {user} visited POI index {code}."),
    "compact": ("%a %H:%M", "{time} {code}."),
}

INDEX_SCHEMA = {
    "task": pl.String(), "split": pl.String(), "traj_id": pl.String(), "user_id": pl.String(),
    "start": pl.Int32(), "end": pl.Int32(), "target_pos": pl.Int32(), "masked": pl.List(pl.Int32()),
    "loc_id": pl.Int64(), "template": pl.Int8(), "is_last": pl.Boolean(),
}


def add_positions(visits: pl.DataFrame) -> pl.DataFrame:
    """Number visits within each trajectory in time order (``pos``) and add its length (``traj_len``).

    Args:
        visits: Check-ins with ``traj_id``, ``split``, ``utc_time``; any order.
    """
    return visits.sort("traj_id", "utc_time", maintain_order=True).with_columns(
        pos=pl.int_range(pl.len(), dtype=pl.Int32).over("traj_id"),
        traj_len=pl.len().over("traj_id").cast(pl.Int32),
    )


def _trajectories(visits: pl.DataFrame) -> pl.DataFrame:
    """One row per trajectory, in a stable order (split, numeric trajectory id)."""
    order = pl.col("split").replace_strict({"train": 0, "valid": 1, "test": 2}, default=3, return_dtype=pl.Int8)
    num = pl.col("traj_id").str.extract(r"(\d+)$").cast(pl.Int64, strict=False)
    return (
        visits.group_by("traj_id")
        .agg(pl.col("split").first(), pl.col("user_id").first(), L=pl.len().cast(pl.Int32))
        .sort(order, num, "traj_id")
    )


def _templates(n: int, task: str, split: str, cfg: SampleConfig, rng: np.random.Generator) -> pl.Series:
    k = len(TEMPLATES[task])
    if split == "test" or not cfg.random_templates or k == 1:
        return pl.Series("template", np.zeros(n, dtype=np.int8))
    drawn = rng.integers(0, k, size=n).astype(np.int8)
    # Drawn even when unused, so that the masks drawn after it do not depend on this switch.
    if task == "next" and not cfg.next_paraphrases:
        drawn[:] = 0
    return pl.Series("template", drawn)


def _draw_masks(trajs: pl.DataFrame, cfg: SampleConfig, rng: np.random.Generator) -> pl.DataFrame:
    """Mask 20–50 % of positions 1..L-1 of the first ``recovery_max_len`` visits, vectorised.

    The number of masks k is uniform in [max(1, int(lo·L)), max(1, int(hi·L))]; the positions are
    the k smallest of i.i.d. uniform keys, i.e. a uniform k-subset. Position 0 is never masked, so
    every masked trajectory keeps a visible anchor.
    """
    lh = np.minimum(trajs["L"].to_numpy(), cfg.recovery_max_len).astype(np.int64)
    lo = np.maximum(1, (cfg.mask_ratio[0] * lh).astype(np.int64))
    hi = np.maximum(lo, np.maximum(1, (cfg.mask_ratio[1] * lh).astype(np.int64)))
    k = lo + np.floor(rng.random(lh.size) * (hi - lo + 1)).astype(np.int64)
    n_cand = lh - 1
    owner = np.repeat(np.arange(lh.size), n_cand)
    pos = (np.arange(owner.size) - np.repeat(np.cumsum(n_cand) - n_cand, n_cand) + 1).astype(np.int32)
    keys = rng.random(owner.size)
    order = np.lexsort((keys, owner))
    rank = np.empty(owner.size, dtype=np.int64)
    rank[order] = np.arange(owner.size) - np.repeat(np.cumsum(n_cand) - n_cand, n_cand)
    keep = rank < k[owner]
    # Masked positions of each trajectory, in draw order (the order single samples are emitted).
    picked = pl.DataFrame({"row": owner[keep], "rank": rank[keep], "pos": pos[keep]}).sort("row", "rank")
    masks = picked.group_by("row", maintain_order=True).agg(masked=pl.col("pos"))
    return (
        trajs.with_row_index("row")
        .with_columns(pl.col("row").cast(pl.Int64), end=pl.Series(lh.astype(np.int32)))
        .join(masks.with_columns(pl.col("row").cast(pl.Int64)), on="row", how="left")
        .drop("row")
    )


def _trajectory_chunks(tr: pl.DataFrame, cfg: SampleConfig) -> pl.DataFrame:
    """Whole-trajectory next-location samples: windows of at most ``max_history + 1`` visits whose
    ``masked`` lists the targets (positions >= ``min_history``), each target in exactly one window with
    at most ``max_history`` visits before it there, as in its per-prefix sample."""
    width, step = cfg.max_history + 1, max(cfg.max_history + 1 - cfg.min_history, 1)
    chunks = (
        tr.filter(pl.col("L") > cfg.min_history)
        .with_columns(start=pl.int_ranges(0, pl.col("L") - cfg.min_history, step, dtype=pl.Int32))
        .explode("start")
        .with_columns(end=pl.min_horizontal(pl.col("start") + width, pl.col("L")).cast(pl.Int32))
    )
    # Targets of a chunk: from start + min_history (= the previous chunk's end) to its end.
    first = (pl.col("start") + cfg.min_history).cast(pl.Int32)
    return chunks.with_columns(
        masked=pl.int_ranges(first, pl.col("end"), dtype=pl.Int32), target_pos=first,
        is_last=pl.col("end") == pl.col("L"),
    ).filter(pl.col("masked").list.len() > 0)


def build_sample_index(
    visits: pl.DataFrame, loc_ids: pl.Series | None, cfg: SampleConfig, tasks: tuple[str, ...] = TASKS
) -> pl.DataFrame:
    """Decide every sample of every task and split (no text yet).

    Args:
        visits: Check-ins with ``traj_id``, ``split``, ``user_id``, ``utc_time``.
        loc_ids: Locations with a description (for ``index2loc``/``loc2index``); None skips them.
        cfg: Sample settings.
        tasks: Which tasks to build.

    Returns:
        A frame with :data:`INDEX_SCHEMA`: per sample its task, split, trajectory, visit window
        ``[start, end)``, target position, masked positions and template. Next-location: every
        target position ≥ ``min_history`` of train/valid trajectories (the last visit only in
        test), history = up to ``max_history`` preceding visits; with ``next_format=trajectory``
        the train split has one row per trajectory chunk instead, ``masked`` = its targets. Recovery: the first
        ``recovery_max_len`` visits; ``recovery_multi`` in train/valid, ``recovery_single`` in
        every split. Token-semantic tasks: train only, one sample per described location.
        Translation: train/valid, one per trajectory.
    """
    rng = np.random.default_rng(cfg.seed)
    trajs = _trajectories(visits)
    frames: list[pl.DataFrame] = []

    def emit(df: pl.DataFrame, task: str, split: str, replace: pl.DataFrame | None = None) -> None:
        templates = _templates(df.height, task, split, cfg, rng)  # drawn even if replaced: later masks stay the same
        if replace is not None:
            df, templates = replace, pl.Series("template", np.zeros(replace.height, dtype=np.int8))
        df = df.with_columns(task=pl.lit(task), split=pl.lit(split), template=templates)
        frames.append(df.select([pl.col(c).cast(t) if c in df.columns else pl.lit(None, t).alias(c) for c, t in INDEX_SCHEMA.items()]))

    for split in ("train", "valid", "test"):
        tr = trajs.filter(pl.col("split") == split)
        if tr.height == 0:
            continue
        if "next" in tasks:
            if split == "test":
                nxt = tr.filter(pl.col("L") > cfg.min_history).with_columns(target_pos=pl.col("L") - 1)
            else:
                nxt = (
                    tr.filter(pl.col("L") > cfg.min_history)
                    .with_columns(target_pos=pl.int_ranges(cfg.min_history, pl.col("L"), dtype=pl.Int32))
                    .explode("target_pos")
                )
            nxt = nxt.with_columns(
                start=pl.max_horizontal(pl.col("target_pos") - cfg.max_history, 0),
                end=pl.col("target_pos"),
                is_last=pl.col("target_pos") == pl.col("L") - 1,
            )
            whole = split == "train" and cfg.next_format == "trajectory"
            emit(nxt, "next", split, _trajectory_chunks(tr, cfg) if whole else None)
        recovery = tr.filter(pl.col("L") >= 2)
        if "recovery_multi" in tasks and split != "test":
            emit(_draw_masks(recovery, cfg, rng).with_columns(start=pl.lit(0)), "recovery_multi", split)
        if "recovery_single" in tasks:
            single = (
                _draw_masks(recovery, cfg, rng)
                .with_columns(start=pl.lit(0), target_pos=pl.col("masked"))
                .explode("target_pos")
            )
            emit(single, "recovery_single", split)
        if "translation" in tasks and split != "test":
            emit(tr.with_columns(start=pl.lit(0), end=pl.min_horizontal("L", cfg.recovery_max_len)), "translation", split)
        if split == "train" and loc_ids is not None:
            locs = pl.DataFrame({"loc_id": loc_ids.sort()})
            for task in ("index2loc", "loc2index"):
                if task in tasks:
                    emit(locs, task, split)
    if not frames:
        return pl.DataFrame(schema=INDEX_SCHEMA)
    return pl.concat(frames)


def count_samples(index: pl.DataFrame) -> dict[str, dict[str, int]]:
    """``{task: {split: n}}`` of a sample index."""
    out: dict[str, dict[str, int]] = {}
    for task, split, n in index.group_by("task", "split").len().sort("task", "split").iter_rows():
        out.setdefault(task, {})[split] = n
    return out


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


def _continuation(sub: pl.DataFrame, vals: dict[str, pl.Expr], finish: Callable[..., None], sentence: str) -> None:
    """Next-location samples whose visits are the assistant's turn (``next_format`` continuation or
    trajectory). A per-prefix row answers the target's code after its history and the target's time;
    a whole-trajectory row (``masked`` = its targets) has every visit of its window as the answer, of
    which the codes of ``labelled_visits`` (0-based within the window) are trained."""
    before_code = sentence.split("{code}")[0]
    whole = pl.col("masked").is_not_null()
    target_prefix = _template_expr(before_code, {"time": pl.col("time"), "user": pl.col("user_id")})
    # The targets are contiguous, from target_pos to the window's end; a window whose oldest visits were
    # cut to fit (datamodules/fitting.py) keeps the targets it still holds.
    first = pl.max_horizontal("target_pos", "start") - pl.col("start")
    offsets = pl.int_ranges(first, pl.col("end") - pl.col("start"), dtype=pl.Int32)
    per_prefix, trajectory = sub.filter(~whole), sub.filter(whole)
    if per_prefix.height:
        finish(per_prefix, "next", vals, pl.col("tgt_code"), pl.col("tgt_loc"),
               prefix=pl.concat_str([pl.col("window"), pl.lit(" "), target_prefix]), template=CONTINUATION_PROMPT)
    if trajectory.height:
        finish(trajectory, "next", vals, pl.col("window"), pl.lit(None), prefix=pl.lit(""),
               labelled=offsets.cast(pl.List(pl.Int32)), template=CONTINUATION_PROMPT)


def _without_lines(text: pl.Expr, drop: tuple[int, ...]) -> pl.Expr:
    """``text`` without its 0-based lines ``drop``."""
    if not drop:
        return text
    keep = pl.element().filter(~pl.int_range(pl.len()).is_in(list(drop)))
    return text.str.split("\n").list.eval(keep).list.join("\n")


def render_samples(
    index: pl.DataFrame,
    visits: pl.DataFrame,
    codes: pl.DataFrame,
    descriptions: pl.DataFrame | None = None,
    profiles: pl.DataFrame | None = None,
    cfg: SampleConfig = SampleConfig(),
    memory: pl.DataFrame | None = None,
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
        memory: ``user_id, memory`` (:func:`datamodules.user_memory.user_memory`), placed after the
            profile in next-location and recovery prompts.

    Returns:
        ``sample_id, task, split, traj_id, user_id, target_loc, is_last, template, prompt,
        response_prefix, target`` — one row per index row, grouped by task (in :data:`TASKS`
        order), index order within a task; ``sample_id`` is the row number in ``index``.
        ``target_loc`` is the location the answer names (null for free-text answers).

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

    def sentence(code: pl.Expr) -> pl.Expr:
        return _template_expr(visit_sentence, {"time": pl.col("time_s"), "user": pl.col("user_id"), "code": code})

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

    heads = []  # per user: the profile sentence, then the memory sentence
    if profiles is not None and cfg.add_profile:
        heads.append(profiles.select("user_id", text=pl.format("User {} has the following profile: {}\n", "user_id", "profile"), k=pl.lit(0)))
    if memory is not None and memory.height:
        heads.append(memory.select("user_id", text="memory", k=pl.lit(1)))
    if heads:
        prof = pl.concat(heads).sort("user_id", "k").group_by("user_id", maintain_order=True).agg(profile=pl.col("text").str.join(""))
    else:
        prof = pl.DataFrame(schema={"user_id": pl.String, "profile": pl.String})
    index = index.with_columns(
        time=at_target("time_s"), tgt_code=at_target("code"), tgt_loc=at_target("loc_id"),
    )
    keep = ["sample_id", "task", "split", "traj_id", "user_id", "target_loc", "is_last", "template", "prompt", "response_prefix",
            "target", "labelled_visits"]
    parts: dict[str, pl.DataFrame] = {}

    def finish(df: pl.DataFrame, task: str, values: dict[str, pl.Expr], target: pl.Expr, target_loc: pl.Expr,
               prefix: pl.Expr | None = None, labelled: pl.Expr | None = None, template: str | None = None) -> None:
        """Format the prompts (``template`` or the row's template of ``task``), prefix, answer and
        labelled visits (whole-trajectory samples) of ``df`` into ``parts[task]``."""
        if prefix is None:
            prefix = _template_expr(RESPONSE_PREFIX[task], values) if RESPONSE_PREFIX[task] else pl.lit("")
        if labelled is None:
            labelled = pl.lit(None, pl.List(pl.Int32))
        # Format each template only on its own rows (a when/then chain would format every
        # template for every row), then restore index order.
        pieces = [
            part.select(
                *[c for c in keep if c not in ("prompt", "response_prefix", "target", "target_loc", "labelled_visits")],
                prompt=_template_expr(template or TEMPLATES[task][t], values),
                response_prefix=prefix,
                target=target,
                target_loc=target_loc.cast(pl.Int64),
                labelled_visits=labelled,
            ).select(keep)
            for (t,), part in df.partition_by("template", as_dict=True, maintain_order=True).items()
        ]
        if task in parts:  # next-location rows of two kinds (per prefix and whole trajectory)
            pieces.append(parts[task])
        parts[task] = pl.concat(pieces).sort("sample_id") if len(pieces) > 1 else pieces[0]

    def with_profile(df: pl.DataFrame) -> pl.DataFrame:
        return df.join(prof, on="user_id", how="left", maintain_order="left").with_columns(pl.col("profile").fill_null(""))

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
            _continuation(sub, vals, finish, visit_sentence)
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
        numbered = vd.select(s=pl.format("[ {} ] {}", k, sentence(pl.col("code"))))["s"]
        blocks = vd.select(
            s=pl.format("[ {} ]\nTime: {}\nLocation Description: {}", k, "time_s", pl.col("short_description").fill_null(""))
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

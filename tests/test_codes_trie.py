"""Location code strings, the CodeTable files and the trie used for constrained decoding."""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from location_tokenizers.codes import (
    CodeTable,
    all_code_tokens,
    codes_to_strings,
    level_token,
    parse_token,
    string_to_codes,
)
from location_tokenizers.trie import CodeTrie, lookup_token_ids

NYC_INDEX = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "data/foursquare_nyc/qtmob_foursquare_NYC/index_Llama-3.2-1B-Instruct.json"
)
SMOLLM2_DIRS = [Path("/root/.cache/qtmob/models/smollm2_135m"), Path("/tmp/qcache/models/smollm2_135m")]

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------ helpers
@st.composite
def code_tables(draw: st.DrawFn, min_rows: int = 1, unique_codes: bool = False) -> CodeTable:
    """Random tables: shape (N, L), codebook K, distinct (possibly large, negative) loc ids."""
    num_levels = draw(st.integers(1, 5))
    k = draw(st.integers(1, 12))
    row = st.tuples(*[st.integers(0, k - 1)] * num_levels)
    if unique_codes:
        rows = draw(st.lists(row, min_size=min_rows, max_size=min(25, k**num_levels), unique=True))
    else:
        rows = draw(st.lists(row, min_size=min_rows, max_size=25))
    loc_ids = draw(st.lists(st.integers(-(10**9), 10**12), min_size=len(rows), max_size=len(rows), unique=True))
    # Declared K may exceed the largest used code; files must keep it where they can.
    k_declared = k + draw(st.integers(0, 3))
    codes = np.asarray(rows, dtype=np.int64).reshape(len(rows), num_levels)
    return CodeTable(np.asarray(loc_ids, dtype=np.int64), codes, k_declared)


def assert_tables_equal(a: CodeTable, b: CodeTable, check_k: bool = True) -> None:
    np.testing.assert_array_equal(a.loc_ids, b.loc_ids)
    np.testing.assert_array_equal(a.codes, b.codes)
    assert a.codes.dtype == b.codes.dtype == np.int64
    assert a.loc_ids.dtype == b.loc_ids.dtype == np.int64
    if check_k:
        assert a.codebook_size == b.codebook_size


def expected_continuations(table: CodeTable) -> dict[tuple[int, ...], tuple[int, ...]]:
    """Brute force: every prefix of every code -> sorted set of next codes."""
    nxt: dict[tuple[int, ...], set[int]] = defaultdict(set)
    for row in table.codes.tolist():
        for level in range(table.num_levels):
            nxt[tuple(row[:level])].add(row[level])
    return {prefix: tuple(sorted(codes)) for prefix, codes in nxt.items()}


def shuffled_vocab(num_levels: int, k: int, offset: int = 100, seed: int = 0) -> dict[str, int]:
    """Code tokens -> distinct ids in a scrambled order above ``offset`` (ids unrelated to codes)."""
    tokens = all_code_tokens(num_levels, k)
    ids = np.random.default_rng(seed).permutation(len(tokens)) + offset
    return {tok: int(i) for tok, i in zip(tokens, ids)}


def code_token_ids(table: CodeTable, vocab: dict[str, int]) -> torch.Tensor:
    """(N, L) token ids of the table's codes."""
    return torch.tensor(
        [[vocab[level_token(level, c)] for level, c in enumerate(row)] for row in table.codes.tolist()],
        dtype=torch.long,
    ).reshape(len(table), table.num_levels)


def nodes_by_prefix(trie: CodeTrie, table: CodeTable, vocab: dict[str, int]) -> dict[tuple[int, ...], int]:
    """Walk every prefix of every code with ``advance`` (one row at a time) -> the node reached."""
    out: dict[tuple[int, ...], int] = {(): 0}
    for row in table.codes.tolist():
        node = trie.root(1)
        for level, code in enumerate(row):
            node = trie.advance(node, level, torch.tensor([vocab[level_token(level, code)]]))
            assert int(node) >= 0
            out[tuple(row[: level + 1])] = int(node)
    return out


# Codes in no particular order; prefixes shared at several depths.
HAND = CodeTable(
    loc_ids=np.array([14, 10, 12, 13, 11, 15]),
    codes=np.array([[3, 0, 1], [0, 1, 2], [0, 2, 0], [3, 0, 0], [0, 1, 3], [1, 3, 3]]),
    codebook_size=4,
)


# ------------------------------------------------------------------------------ token strings
def test_level_token_and_parse() -> None:
    assert level_token(0, 12) == "<a_12>"
    assert level_token(3, 7) == "<d_7>"
    assert level_token(25, 0) == "<z_0>"
    assert parse_token("<c_40>") == (2, 40)
    assert parse_token("<a_0>") == (0, 0)
    for level in range(26):
        for code in (0, 1, 9, 10, 255, 123456):
            assert parse_token(level_token(level, code)) == (level, code)
    with pytest.raises(ValueError, match="level"):
        level_token(26, 0)
    with pytest.raises(ValueError, match="non-negative"):
        level_token(0, -1)


@pytest.mark.parametrize(
    "tok",
    ["", "a_1", "<a_1", "a_1>", "<A_1>", "<a_-1>", "<a_01>", "<a_ 1>", "<a1>", "<ab_1>", "<a_1><b_2>",
     " <a_1>", "<a_1>\n", "<{_1>", "<a_>", "<a_1.0>", "<a_x>"],
)
def test_parse_token_rejects_malformed(tok: str) -> None:
    with pytest.raises(ValueError, match="malformed code token"):
        parse_token(tok)


def test_parse_token_rejects_non_string() -> None:
    with pytest.raises(ValueError):
        parse_token(3)  # type: ignore[arg-type]


def test_codes_to_strings_example() -> None:
    assert codes_to_strings(np.array([[12, 3, 40, 7], [0, 0, 0, 255]])) == [
        "<a_12><b_3><c_40><d_7>",
        "<a_0><b_0><c_0><d_255>",
    ]
    assert string_to_codes("<a_12><b_3><c_40><d_7>") == (12, 3, 40, 7)
    assert codes_to_strings(np.zeros((0, 3), dtype=np.int64)) == []
    with pytest.raises(ValueError):
        codes_to_strings(np.array([1, 2, 3]))
    with pytest.raises(ValueError):
        codes_to_strings(np.array([[1, -2]]))


@pytest.mark.parametrize(
    "s",
    ["", "<b_3><a_12>", "<a_1><c_2>", "<b_1>", "<a_1>x<b_2>", "<a_1> <b_2>", "<a_1><b_2>>", "<a_1><a_2>",
     "<a_01><b_2>", "abc"],
)
def test_string_to_codes_rejects_malformed(s: str) -> None:
    with pytest.raises(ValueError, match="code string"):
        string_to_codes(s)


def test_all_code_tokens_order() -> None:
    assert all_code_tokens(2, 3) == ["<a_0>", "<a_1>", "<a_2>", "<b_0>", "<b_1>", "<b_2>"]
    tokens = all_code_tokens(4, 256)
    assert len(tokens) == len(set(tokens)) == 1024
    assert tokens[256] == "<b_0>" and tokens[-1] == "<d_255>"


@FAST
@given(st.integers(1, 26).flatmap(lambda n: st.lists(st.lists(st.integers(0, 10**6), min_size=n, max_size=n))))
def test_strings_round_trip_property(rows: list[list[int]]) -> None:
    num_levels = len(rows[0]) if rows else 1
    codes = np.asarray(rows, dtype=np.int64).reshape(len(rows), num_levels)
    strings = codes_to_strings(codes)
    assert [string_to_codes(s) for s in strings] == [tuple(r) for r in rows]


# ---------------------------------------------------------------------------------- CodeTable
def test_table_validation() -> None:
    with pytest.raises(ValueError, match="distinct"):
        CodeTable(np.array([1, 1]), np.array([[0], [1]]), 2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        CodeTable(np.array([1, 2]), np.array([[0], [2]]), 2)
    with pytest.raises(ValueError, match="shape"):
        CodeTable(np.array([1, 2]), np.array([[0]]), 2)
    with pytest.raises(ValueError, match="integers"):
        CodeTable(np.array([1]), np.array([[0.5]]), 2)
    with pytest.raises(ValueError, match="levels"):
        CodeTable(np.array([1]), np.zeros((1, 27), dtype=np.int64), 2)


def test_frame_strings_tokens() -> None:
    df = HAND.to_frame()
    assert df.columns == ["loc_id", "c0", "c1", "c2", "code"]
    assert df.schema["loc_id"] == pl.Int64 and df.schema["c0"] == pl.Int64 and df.schema["code"] == pl.String
    assert df.row(0) == (14, 3, 0, 1, "<a_3><b_0><c_1>")
    assert HAND.strings().columns == ["loc_id", "code"]
    assert HAND.strings()["code"].to_list() == codes_to_strings(HAND.codes)
    assert HAND.tokens() == ["<a_0>", "<a_1>", "<a_3>", "<b_0>", "<b_1>", "<b_2>", "<b_3>",
                             "<c_0>", "<c_1>", "<c_2>", "<c_3>"]  # fmt: skip
    assert_tables_equal(CodeTable.from_frame(df, codebook_size=4), HAND)
    # Only the joined strings: parsed back; K inferred from the largest code.
    assert_tables_equal(CodeTable.from_frame(HAND.strings()), HAND)
    with pytest.raises(ValueError, match="disagree"):
        CodeTable.from_frame(df.with_columns(pl.lit(0, dtype=pl.Int64).alias("c1")))
    with pytest.raises(ValueError, match="nulls"):
        CodeTable.from_frame(df.with_columns(pl.lit(None, dtype=pl.Int64).alias("c1")).drop("code"))


def test_index_json_format_and_round_trip(tmp_path: Path) -> None:
    table = CodeTable(np.array([0, 1, 7]), np.array([[24, 19, 149, 94], [124, 249, 248, 205], [0, 1, 2, 3]]), 256)
    path = tmp_path / "sub" / "index.json"
    table.to_index_json(path)
    raw = json.loads(path.read_text())
    assert raw == {
        "0": ["<a_24>", "<b_19>", "<c_149>", "<d_94>"],
        "1": ["<a_124>", "<b_249>", "<c_248>", "<d_205>"],
        "7": ["<a_0>", "<b_1>", "<c_2>", "<d_3>"],
    }
    assert path.read_text().startswith('{"0": ["<a_24>", "<b_19>", "<c_149>", "<d_94>"], "1": ')  # release layout
    assert_tables_equal(CodeTable.from_index_json(path, codebook_size=256), table)
    assert CodeTable.from_index_json(path).codebook_size == 250  # inferred: max code + 1
    assert [p.name for p in path.parent.iterdir()] == ["index.json"]  # no temporary file left behind


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"x": ["<a_1>"]}, "not an integer"),
        ({"1": ["<b_1>", "<a_1>"]}, "level"),
        ({"1": ["<a_1>", "<b_1>"], "2": ["<a_1>"]}, "different lengths"),
        ({"1": ["<a_1><b_2>"]}, "exactly one token"),
        ({"1": []}, "non-empty"),
        ({"1": ["<a_01>"]}, "malformed"),
        ({"1": [1, 2]}, "location 1"),
        ({}, "no locations"),
        ([["<a_1>"]], "JSON object"),
    ],
)
def test_index_json_rejects_malformed(tmp_path: Path, content: object, match: str) -> None:
    path = tmp_path / "index.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=match):
        CodeTable.from_index_json(path)


def test_parquet_round_trip_keeps_k(tmp_path: Path) -> None:
    path = tmp_path / "codes.parquet"
    table = CodeTable(HAND.loc_ids, HAND.codes, codebook_size=64)  # K far above the largest code
    table.write_parquet(path)
    assert_tables_equal(CodeTable.read_parquet(path), table)
    # A plain parquet without our metadata still reads, with K inferred.
    table.to_frame().write_parquet(tmp_path / "plain.parquet")
    assert CodeTable.read_parquet(tmp_path / "plain.parquet").codebook_size == 4
    # Empty tables survive parquet (the levels are known from the columns).
    empty = CodeTable(np.zeros(0, dtype=np.int64), np.zeros((0, 3), dtype=np.int64), 8)
    empty.write_parquet(tmp_path / "empty.parquet")
    assert_tables_equal(CodeTable.read_parquet(tmp_path / "empty.parquet"), empty)


def test_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed write leaves the previous file intact and no temporary file behind."""
    path = tmp_path / "codes.parquet"
    HAND.write_parquet(path)
    before = path.read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        Path(args[1]).write_bytes(b"partial")  # type: ignore[arg-type]
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", boom)
    with pytest.raises(OSError, match="disk full"):
        CodeTable(HAND.loc_ids, HAND.codes + 0, 9).write_parquet(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["codes.parquet"]

    index = tmp_path / "index.json"
    HAND.to_index_json(index)
    monkeypatch.setattr(json, "dumps", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        HAND.to_index_json(index)
    assert json.loads(index.read_text())["14"] == ["<a_3>", "<b_0>", "<c_1>"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.parquet", "index.json"]


@FAST
@given(code_tables())
def test_table_round_trips_property(table: CodeTable) -> None:
    assert_tables_equal(CodeTable.from_frame(table.to_frame(), codebook_size=table.codebook_size), table)
    strings = table.strings()["code"].to_list()
    assert [string_to_codes(s) for s in strings] == [tuple(r) for r in table.codes.tolist()]
    with tempfile.TemporaryDirectory() as tmp:
        table.to_index_json(Path(tmp) / "index.json")
        assert_tables_equal(CodeTable.from_index_json(Path(tmp) / "index.json", table.codebook_size), table)
        inferred = CodeTable.from_index_json(Path(tmp) / "index.json")
        assert inferred.codebook_size == int(table.codes.max()) + 1
        table.write_parquet(Path(tmp) / "codes.parquet")
        assert_tables_equal(CodeTable.read_parquet(Path(tmp) / "codes.parquet"), table)
    # Collisions agree with a brute-force count over rows.
    seen: set[tuple[int, ...]] = set()
    dupes = 0
    for row in map(tuple, table.codes.tolist()):
        dupes += row in seen
        seen.add(row)
    assert table.collisions() == dupes
    assert table.collision_rate() == pytest.approx(dupes / len(table))


def test_collisions_hand_cases() -> None:
    def make(rows: list[list[int]]) -> CodeTable:
        return CodeTable(np.arange(len(rows)), np.asarray(rows, dtype=np.int64).reshape(len(rows), -1), 8)

    assert make([[1, 2], [1, 3], [2, 2]]).collisions() == 0  # shared prefixes are not collisions
    triple = make([[1, 2], [1, 2], [1, 2], [3, 4], [3, 4]])
    assert triple.collisions() == 3  # the first of each group is not counted
    assert triple.collision_rate() == pytest.approx(0.6)
    assert make([[5, 5, 5]]).collisions() == 0
    empty = CodeTable(np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.int64), 8)
    assert empty.collisions() == 0 and empty.collision_rate() == 0.0
    assert HAND.collisions() == 0


@pytest.fixture(scope="module")
def nyc_table() -> CodeTable:
    if not NYC_INDEX.is_file():
        pytest.skip(f"the released NYC index is not at {NYC_INDEX} (the shared/ data folder is absent)")
    return CodeTable.from_index_json(NYC_INDEX, codebook_size=256)


def test_released_nyc_index(nyc_table: CodeTable, tmp_path: Path) -> None:
    assert len(nyc_table) == 5765
    assert nyc_table.num_levels == 4 and nyc_table.codebook_size == 256
    assert nyc_table.collisions() == 0 and nyc_table.collision_rate() == 0.0
    assert [np.unique(nyc_table.codes[:, level]).size for level in range(4)] == [39, 110, 167, 256]
    assert len(nyc_table.tokens()) == 39 + 110 + 167 + 256
    assert CodeTable.from_index_json(NYC_INDEX).codebook_size == 256  # level d uses code 255
    # Writing it back reproduces the release content exactly.
    nyc_table.to_index_json(tmp_path / "index.json")
    assert json.loads((tmp_path / "index.json").read_text()) == json.loads(NYC_INDEX.read_text())


# -------------------------------------------------------------------------------------- trie
@pytest.fixture
def hand_trie() -> tuple[CodeTrie, dict[str, int]]:
    vocab = shuffled_vocab(3, 4)
    return CodeTrie(HAND, vocab, vocab_size=200), vocab


def test_trie_shapes(hand_trie: tuple[CodeTrie, dict[str, int]]) -> None:
    trie, vocab = hand_trie
    assert trie.num_levels == 3 and trie.codebook_size == 4 and trie.vocab_size == 200
    # prefixes: () ; a in {0,1,3} ; (0,1),(0,2),(3,0),(1,3) ; 6 full codes
    assert trie.num_nodes == [1, 3, 4]
    assert trie.num_leaves == 6
    assert [tuple(t.shape) for t in trie.node_children] == [(1, 4), (3, 4), (4, 4)]
    assert all(t.dtype == torch.long for t in trie.node_children)
    assert trie.leaf_loc.dtype == torch.long and sorted(trie.leaf_loc.tolist()) == sorted(HAND.loc_ids.tolist())
    for level in range(3):
        assert trie.level_token_ids[level].tolist() == [vocab[level_token(level, c)] for c in range(4)]
    assert CodeTrie(HAND, vocab).vocab_size == max(vocab.values()) + 1


def test_trie_masks_are_exactly_valid_continuations(hand_trie: tuple[CodeTrie, dict[str, int]]) -> None:
    trie, vocab = hand_trie
    expected = expected_continuations(HAND)
    assert trie.valid_prefixes() == expected
    nodes = nodes_by_prefix(trie, HAND, vocab)
    for prefix, next_codes in expected.items():
        mask = trie.allowed_mask(torch.tensor([nodes[prefix]]), len(prefix))
        assert mask.shape == (1, 200) and mask.dtype == torch.bool
        allowed = set(torch.nonzero(mask[0]).flatten().tolist())
        assert allowed == {vocab[level_token(len(prefix), c)] for c in next_codes}, prefix
    root = trie.allowed_mask(trie.root(2), 0)
    assert set(torch.nonzero(root[0]).flatten().tolist()) == {vocab["<a_0>"], vocab["<a_1>"], vocab["<a_3>"]}


def test_trie_walks_every_code_to_its_location(hand_trie: tuple[CodeTrie, dict[str, int]]) -> None:
    trie, vocab = hand_trie
    ids = code_token_ids(HAND, vocab)
    # Batched walk: all locations at once, one advance per level.
    node = trie.root(len(HAND))
    for level in range(HAND.num_levels):
        node = trie.advance(node, level, ids[:, level])
        assert (node >= 0).all()
    assert trie.leaf_to_loc(node).tolist() == HAND.loc_ids.tolist()
    assert trie.decode_batch(ids).tolist() == HAND.loc_ids.tolist()
    for row, loc in zip(ids.tolist(), HAND.loc_ids.tolist()):
        assert trie.decode(row) == loc


def test_trie_invalid_tokens(hand_trie: tuple[CodeTrie, dict[str, int]]) -> None:
    trie, vocab = hand_trie
    root = trie.root(7)
    tokens = torch.tensor([
        vocab["<a_2>"],    # right level, but no location starts with code 2
        vocab["<b_1>"],    # a valid code of the wrong level
        5,                 # an ordinary (non-code) token
        -3,                # out of range
        10_000,            # beyond the vocabulary
        vocab["<a_0>"],    # valid
        vocab["<a_3>"],    # valid
    ])  # fmt: skip
    nxt = trie.advance(root, 0, tokens)
    assert nxt[:5].tolist() == [-1] * 5 and (nxt[5:] >= 0).all()
    # Dead beams stay dead and allow nothing.
    assert trie.advance(nxt, 1, torch.full((7,), vocab["<b_1>"])).tolist()[:5] == [-1] * 5
    assert not trie.allowed_mask(nxt[:5], 1).any()
    assert trie.leaf_to_loc(torch.tensor([-1])).tolist() == [-1]
    # Incomplete, over-long or wrong codes do not decode.
    assert trie.decode([vocab["<a_0>"], vocab["<b_1>"]]) is None
    assert trie.decode([vocab["<a_0>"], vocab["<b_1>"], vocab["<c_0>"]]) is None  # (0,1,0) is not a code
    assert trie.decode([vocab["<a_0>"], vocab["<b_1>"], vocab["<c_2>"], vocab["<c_2>"]]) is None
    with pytest.raises(ValueError, match="level"):
        trie.allowed_mask(trie.root(1), 3)


def test_trie_batched_masks_equal_per_row(hand_trie: tuple[CodeTrie, dict[str, int]]) -> None:
    trie, vocab = hand_trie
    nodes = nodes_by_prefix(trie, HAND, vocab)
    for level in range(HAND.num_levels):
        batch = [n for p, n in nodes.items() if len(p) == level] + [-1]
        batch = batch * 2  # repeated nodes, as beams often are
        full = trie.allowed_mask(torch.tensor(batch), level)
        for i, n in enumerate(batch):
            assert torch.equal(full[i], trie.allowed_mask(torch.tensor([n]), level)[0])


def test_trie_rejects_bad_inputs() -> None:
    vocab = shuffled_vocab(3, 4)
    colliding = CodeTable(np.array([1, 2]), np.array([[0, 1, 2], [0, 1, 2]]), 4)
    with pytest.raises(ValueError, match="share a full code"):
        CodeTrie(colliding, vocab)
    partial = {tok: i for tok, i in vocab.items() if tok != "<b_2>"}
    with pytest.raises(ValueError, match="not in the vocabulary"):
        CodeTrie(HAND, partial)
    # A code token no location uses may be missing: that code is simply never allowed.
    trie = CodeTrie(HAND, {tok: i for tok, i in vocab.items() if tok != "<a_2>"})
    assert trie.level_token_ids[0][2] == -1
    with pytest.raises(ValueError, match="vocab_size"):
        CodeTrie(HAND, vocab, vocab_size=50)
    with pytest.raises(ValueError, match="share a token id"):
        CodeTrie(HAND, {**vocab, "<a_1>": vocab["<a_0>"]})
    with pytest.raises(TypeError):
        CodeTrie(HAND, [1, 2, 3])  # type: ignore[arg-type]


def test_prefix_allowed_tokens_fn_gives_generate_exactly_the_valid_continuations(hand_trie) -> None:
    """The helper of the README's generate() example: after a prompt of any length (padding included),
    the allowed token ids of each prefix are the trie's valid next codes at that level."""
    trie, vocab = hand_trie
    prompt = [5, 6, 7, 8]
    allowed = trie.prefix_allowed_tokens_fn(len(prompt))
    for prefix, next_codes in expected_continuations(HAND).items():
        ids = [vocab[level_token(level, c)] for level, c in enumerate(prefix)]
        got = allowed(0, torch.tensor(prompt + ids))
        assert sorted(got) == sorted(vocab[level_token(len(prefix), c)] for c in next_codes), prefix
    assert allowed(0, torch.tensor(prompt + [vocab[level_token(0, 2)]])) == []  # no code starts with 2


@FAST
@given(code_tables(unique_codes=True), st.integers(0, 2**31 - 1))
def test_trie_property(table: CodeTable, seed: int) -> None:
    vocab = shuffled_vocab(table.num_levels, table.codebook_size, offset=7, seed=seed)
    trie = CodeTrie(table, vocab)
    assert trie.valid_prefixes() == expected_continuations(table)
    ids = code_token_ids(table, vocab)
    assert trie.decode_batch(ids).tolist() == table.loc_ids.tolist()
    # Batched walk with masks: each generated token must be allowed by the mask of its step.
    node = trie.root(len(table))
    for level in range(table.num_levels):
        mask = trie.allowed_mask(node, level)
        assert mask.gather(1, ids[:, level : level + 1]).all()
        node = trie.advance(node, level, ids[:, level])
    assert trie.leaf_to_loc(node).tolist() == table.loc_ids.tolist()


def test_trie_on_released_nyc_index(nyc_table: CodeTable) -> None:
    vocab = shuffled_vocab(4, 256, offset=49152)
    trie = CodeTrie(nyc_table, vocab)
    assert trie.num_nodes == [1] + [int(np.unique(nyc_table.codes[:, :n], axis=0).shape[0]) for n in (1, 2, 3)]
    assert trie.num_nodes[1] == 39
    assert trie.num_leaves == 5765
    # Rows come in file order (not sorted by code); every one decodes to its loc_id.
    ids = code_token_ids(nyc_table, vocab)
    assert torch.equal(trie.decode_batch(ids), torch.from_numpy(nyc_table.loc_ids))
    assert int(trie.allowed_mask(trie.root(1), 0).sum()) == 39
    # Second-level masks count the distinct (a, b) prefixes under each a.
    level1 = trie.allowed_mask(torch.arange(trie.num_nodes[1]), 1)
    assert int(level1.sum()) == int(np.unique(nyc_table.codes[:, :2], axis=0).shape[0])


# ------------------------------------------------------------------------- real HF tokenizers
def _check_trie_matches_tokenizer(tokenizer: object, table: CodeTable) -> None:
    trie = CodeTrie(table, tokenizer, vocab_size=len(tokenizer))  # type: ignore[arg-type]
    convert = tokenizer.convert_tokens_to_ids  # type: ignore[attr-defined]
    for level in range(table.num_levels):
        expected = convert([level_token(level, c) for c in range(table.codebook_size)])
        assert trie.level_token_ids[level].tolist() == expected
    # Tokenising a prompt's code string yields exactly the trie's ids, and they decode back.
    strings = codes_to_strings(table.codes)
    for s, loc in zip(strings[:50], table.loc_ids[:50].tolist()):
        ids = tokenizer(s, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        assert len(ids) == table.num_levels
        assert trie.decode(ids) == loc


def test_trie_with_wordlevel_tokenizer() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    base.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=base, unk_token="[UNK]")
    # Before the code tokens are added they all map to [UNK]: that must not pass as a valid id.
    assert (lookup_token_ids(tokenizer, ["<a_0>", "hello"]) == [-1, 1]).all()
    with pytest.raises(ValueError, match="not in the vocabulary"):
        CodeTrie(HAND, tokenizer)
    assert tokenizer.add_tokens(all_code_tokens(3, 4)) == 12
    _check_trie_matches_tokenizer(tokenizer, HAND)


def test_trie_with_smollm2_tokenizer() -> None:
    folder = next((d for d in SMOLLM2_DIRS if (d / "tokenizer.json").is_file()), None)
    if folder is None:
        pytest.skip(f"no SmolLM2 tokenizer in {[str(d) for d in SMOLLM2_DIRS]} (it is written by the llm stage)")
    from transformers import PreTrainedTokenizerFast

    # The same tokenizer.json and special tokens AutoTokenizer would load, without its ~2 s of
    # model-class resolution.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    vocab_before = len(tokenizer)
    assert tokenizer.add_tokens(all_code_tokens(4, 256)) == 1024
    trie_ids = tokenizer.convert_tokens_to_ids(all_code_tokens(4, 256))
    assert trie_ids == list(range(vocab_before, vocab_before + 1024))  # appended, level-major
    # The released codes when present (all 572 used tokens), else the hand table.
    if NYC_INDEX.is_file():
        table = CodeTable.from_index_json(NYC_INDEX, 256)
    else:
        table = CodeTable(HAND.loc_ids, HAND.codes, 256)
    _check_trie_matches_tokenizer(tokenizer, table)

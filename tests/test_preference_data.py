"""Preference data: JSONL with the standard library, Parquet through `datasets`, tokenisation (chat
template or not), the fixed-shape padded layout, and every drop rule counted and reported (never
silently kept)."""

import json

import numpy as np
import pytest

from jaxrlhf.tokenizers import char_tokenizer
from jaxrlhf.training.preference_data import (
    PreferenceDataError,
    kto_from_arrays,
    load_preference_data,
    load_rows,
    pairs_from_arrays,
    pairs_to_kto,
    tokenize_kto,
    tokenize_pairs,
)

CHARS = "abcdefghijklmnopqrstuvwxyz ?:"
PAD, BOS, EOS = 0, 1, 2


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer(CHARS)


def ids(text):
    return [4 + CHARS.index(c) for c in text]


ROWS = [
    {"prompt": "hi?", "chosen": "yes", "rejected": "no"},
    {"prompt": "why", "chosen": "because", "rejected": "dunno"},
    {"prompt": "ok", "chosen": "fine", "rejected": "bad"},
]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def test_jsonl_and_parquet_give_the_same_padded_arrays(tmp_path, tokenizer):
    from_jsonl = load_preference_data(write_jsonl(tmp_path / "p.jsonl", ROWS), tokenizer, 4, 8)
    from_parquet = load_preference_data(write_parquet(tmp_path / "p.parquet", ROWS), tokenizer, 4, 8)
    for name, value in from_jsonl.arrays().items():
        np.testing.assert_array_equal(value, getattr(from_parquet, name), err_msg=name)
    d = from_jsonl
    assert d.kind == "pairs" and len(d) == 3 and d.stats["kept"] == 3 and d.stats["rows"] == 3
    assert d.prompt_ids.shape == (3, 4) and d.chosen_ids.shape == (3, 8) and d.prompt_ids.dtype == np.int32
    # prompt left-padded, response right-padded with the EOS appended
    np.testing.assert_array_equal(d.prompt_ids[0], [PAD] + ids("hi?"))
    np.testing.assert_array_equal(d.prompt_mask[0], [0, 1, 1, 1])
    np.testing.assert_array_equal(d.chosen_ids[0], ids("yes") + [EOS] + [PAD] * 4)
    np.testing.assert_array_equal(d.chosen_mask[0], [1] * 4 + [0] * 4)
    np.testing.assert_array_equal(d.rejected_ids[2], ids("bad") + [EOS] + [PAD] * 4)


def test_chat_template_is_used_for_the_prompt(tokenizer):
    tok = char_tokenizer(CHARS)
    tok.chat_template = (
        "{% for m in messages %}<bos>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}:{% endif %}"
    )
    d = tokenize_pairs(ROWS[:1], tok, 6, 8)
    np.testing.assert_array_equal(d.prompt_ids[0], [PAD, BOS] + ids("hi?") + ids(":"))
    plain = tokenize_pairs(ROWS[:1], tok, 6, 8, use_chat_template=False)
    np.testing.assert_array_equal(plain.prompt_ids[0], [PAD] * 3 + ids("hi?"))
    # a prompt given as messages goes through the template as it is
    msgs = [{"prompt": [{"role": "user", "content": "ab"}], "chosen": "x", "rejected": "y"}]
    np.testing.assert_array_equal(tokenize_pairs(msgs, tok, 6, 4).prompt_ids[0], [PAD, PAD, BOS] + ids("ab:"))


def test_bad_rows_are_counted_dropped_and_reported(tokenizer):
    rows = ROWS + [
        {"prompt": "q", "chosen": "", "rejected": "no"},  # empty response
        {"prompt": "q", "chosen": "same", "rejected": "same"},  # identical
        {"prompt": "a very long prompt", "chosen": "x", "rejected": "y"},  # prompt too long
        {"prompt": "", "chosen": "x", "rejected": "y"},  # empty prompt
        {"prompt": "q", "chosen": "   ", "rejected": "y"},  # whitespace only
        {"prompt": "q", "chosen": "abcdefghijkl", "rejected": "abcdefghijkm"},  # identical after truncation
        {"prompt": "q", "chosen": "abcdefghijkl", "rejected": "z"},  # truncated, kept
    ]
    with pytest.warns(UserWarning, match="kept 4 of 10"):
        d = tokenize_pairs(rows, tokenizer, 4, 8)
    s = d.stats
    assert (s["rows"], s["kept"], s["empty_response"], s["identical"], s["prompt_too_long"], s["empty_prompt"]) == (
        10,
        4,
        2,
        2,
        1,
        1,
    )
    assert s["response_truncated"] == 3  # two in the identical-after-cut pair, one kept
    np.testing.assert_array_equal(d.chosen_ids[3], ids("abcdefgh"))  # the first R tokens, no EOS
    assert d.chosen_mask.sum(axis=1).min() >= 1 and d.rejected_mask.sum(axis=1).min() >= 1
    assert not np.any(np.all(d.chosen_ids == d.rejected_ids, axis=1))


def test_truncation_options(tokenizer):
    rows = [{"prompt": "abcdefgh", "chosen": "abcdefgh", "rejected": "z"}]
    with pytest.warns(UserWarning):
        d = tokenize_pairs(rows, tokenizer, 4, 4, prompt_truncation="left")
    np.testing.assert_array_equal(d.prompt_ids[0], ids("efgh"))  # the last P tokens
    assert d.stats["prompt_truncated"] == 1 and d.stats["response_truncated"] == 1
    with pytest.raises(PreferenceDataError, match="no preference row left.*'response_too_long': 1"):
        tokenize_pairs(rows, tokenizer, 8, 4, response_truncation="drop")
    with pytest.raises(ValueError, match="prompt_truncation"):
        tokenize_pairs(rows, tokenizer, 4, 4, prompt_truncation="right")


def test_jsonl_needs_no_datasets(tmp_path, tokenizer, monkeypatch):
    """A JSONL file is one `json.loads` per line: reading one never imports `datasets` (pyarrow,
    pandas); a JSON array, a gzipped file and blank lines read the same; bad lines name the line."""
    import builtins
    import gzip
    import sys

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets" or name.startswith(("datasets.", "pyarrow", "pandas")):
            raise ImportError(f"{name} is not installed (test)")
        return real_import(name, *args, **kwargs)

    for name in [m for m in sys.modules if m == "datasets" or m.startswith("datasets.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(builtins, "__import__", no_datasets)
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in ROWS[:2]) + "\n\n" + json.dumps(ROWS[2]) + "\n")
    lines = load_preference_data(str(path), tokenizer, 4, 8)
    (tmp_path / "array.json").write_text(json.dumps(ROWS))
    with gzip.open(tmp_path / "p.jsonl.gz", "wt") as f:
        f.write(path.read_text())
    for other in ("array.json", "p.jsonl.gz"):
        data = load_preference_data(str(tmp_path / other), tokenizer, 4, 8)
        for name, value in lines.arrays().items():
            np.testing.assert_array_equal(value, getattr(data, name), err_msg=f"{other}: {name}")
    assert len(lines) == 3 and lines.stats["rows"] == 3
    (tmp_path / "bad.jsonl").write_text(json.dumps(ROWS[0]) + "\n{oops\n")
    with pytest.raises(PreferenceDataError, match=r"bad.jsonl, line 2: not valid JSON"):
        load_rows(str(tmp_path / "bad.jsonl"))
    (tmp_path / "list.jsonl").write_text('["prompt", "chosen"]\n')
    with pytest.raises(PreferenceDataError, match=r"list.jsonl, item 0: expected a JSON object"):
        load_rows(str(tmp_path / "list.jsonl"))
    (tmp_path / "ragged.jsonl").write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"prompt": "a", "chosen": "b"}))
    with pytest.raises(PreferenceDataError, match=r"row 1 lacks column\(s\) \['rejected'\]"):
        load_preference_data(str(tmp_path / "ragged.jsonl"), tokenizer, 4, 4)
    with pytest.raises(ImportError, match=r"Parquet preference files needs Hugging Face `datasets`.*jaxrlhf\[data\]"):
        (tmp_path / "p.parquet").write_bytes(b"PAR1")
        load_rows(str(tmp_path / "p.parquet"))


def test_mismatched_columns_raise_clear_errors(tmp_path, tokenizer):
    bad = [{"prompt": "a", "chosen": "b", "reject": "c"}]
    with pytest.raises(PreferenceDataError, match=r"missing column\(s\) \['rejected'\].*found"):
        load_preference_data(write_jsonl(tmp_path / "bad.jsonl", bad), tokenizer, 4, 4)
    kto_rows = [{"prompt": "a", "completion": "b", "label": True}]
    with pytest.raises(PreferenceDataError, match="look like KTO rows"):
        load_preference_data(write_parquet(tmp_path / "kto.parquet", kto_rows), tokenizer, 4, 4)
    with pytest.raises(PreferenceDataError, match=r"row 0 lacks column\(s\) \['rejected'\]"):
        tokenize_pairs(bad, tokenizer, 4, 4)
    with pytest.raises(PreferenceDataError, match="unknown preference data format"):
        (tmp_path / "data.csv").write_text("prompt,chosen,rejected\n")
        load_rows(str(tmp_path / "data.csv"))
    with pytest.raises(FileNotFoundError):
        load_rows(str(tmp_path / "nope.jsonl"))


def test_kto_rows_from_jsonl(tmp_path, tokenizer):
    rows = [
        {"prompt": "q", "completion": c, "label": lab}
        for c, lab in [("good", True), ("bad", False), ("fine", 1), ("", True), ("meh", "false")]
    ]
    with pytest.warns(UserWarning, match="empty_response=1"):
        d = load_preference_data(
            write_jsonl(tmp_path / "kto.jsonl", rows[:3] + rows[4:] + rows[3:4]), tokenizer, 2, 6, kind="kto"
        )
    assert d.kind == "kto" and len(d) == 4
    np.testing.assert_array_equal(d.desirable, [True, False, True, False])
    # each row's KL completion is another row's completion (a derangement)
    matches = [[np.array_equal(d.rejected_ids[i], d.chosen_ids[j]) for j in range(4)] for i in range(4)]
    assert all(sum(m) == 1 and not m[i] for i, m in enumerate(matches))
    with pytest.raises(PreferenceDataError, match="KTO label"):
        tokenize_kto([{"prompt": "q", "completion": "x", "label": "maybe"}], tokenizer, 2, 4)


def test_from_arrays_any_padding_and_drops():
    # prompts right-padded in the input, responses left-padded: the masks say what counts
    prompt = np.array([[5, 6, 0], [7, 0, 0], [8, 0, 0]])
    prompt_mask = (prompt > 0).astype(int)
    chosen = np.array([[0, 9, 10], [0, 0, 11], [0, 0, 0]])
    rejected = np.array([[0, 0, 12], [0, 0, 11], [0, 0, 13]])
    with pytest.warns(UserWarning, match="kept 1 of 3"):
        d = pairs_from_arrays(
            prompt, prompt_mask, chosen, (chosen > 0).astype(int), rejected, (rejected > 0).astype(int)
        )
    assert d.stats["identical"] == 1 and d.stats["empty_response"] == 1
    np.testing.assert_array_equal(d.prompt_ids, [[5, 6]])
    np.testing.assert_array_equal(d.chosen_ids, [[9, 10]])
    np.testing.assert_array_equal(d.rejected_ids, [[12, 0]])
    with pytest.raises(PreferenceDataError, match="one number of rows"):
        pairs_from_arrays(prompt, prompt_mask, chosen[:2], chosen[:2] > 0, rejected, rejected > 0)
    k = kto_from_arrays(prompt, prompt_mask, rejected, rejected > 0, [1, 0, 1])
    assert k.kind == "kto" and len(k) == 3
    kk = pairs_to_kto(d.select([0, 0]))
    assert len(kk) == 4 and kk.desirable.tolist() == [True, True, False, False]

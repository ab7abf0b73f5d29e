"""Preference data for the offline trainer: rows -> fixed-shape padded arrays, with every drop counted.

Two kinds of data set:

* **pairs** (DPO, cDPO, IPO, SimPO): columns ``prompt``, ``chosen``, ``rejected``;
* **unpaired** (KTO): columns ``prompt``, ``completion``, ``label`` (true: desirable).

Sources: a JSONL (``.jsonl`` / ``.json``, one object per line or one array; optionally ``.gz``)
file, read with the standard library; a Parquet (``.parquet``) file, read with Hugging Face
``datasets`` (``load_dataset("parquet", data_files=...)``, the ``data`` extra); a
``datasets.Dataset``; a list of dicts; or already tokenised arrays (`pairs_from_arrays`,
`kto_from_arrays`), e.g. the synthetic language of `tasks.synthetic_language`.

Output (`PreferenceData`), every array of one fixed shape so the jitted step compiles once::

    prompt_ids, prompt_mask        [N, P]  left-padded   (P = max_prompt_len)
    chosen_ids, chosen_mask        [N, R]  right-padded  (R = max_response_len)
    rejected_ids, rejected_mask    [N, R]  right-padded
    desirable                      [N]     KTO only (bool)

The model sees ``concat([prompt_ids, response_ids], axis=1)``: the prompt ends at column P and the
response starts there, with no padding in between (positions come from the mask). For KTO the
``chosen_*`` slot holds the completion and the ``rejected_*`` slot its *KL completion*: the
completion of another row (row ``perm[i]``, a fixed derangement drawn from ``kl_seed``), paired
with this row's prompt, the mismatched pair whose log-ratio estimates KTO's reference point ``z0``.
Fixing it here lets the reference log-probs of the KL pairs be precomputed like all others.

**Tokenisation.** With a tokenizer that has a chat template (``tokenizer.chat_template``), the
prompt is ``apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)``
(a prompt given as a list of messages is passed as it is); without one, ``tokenizer(prompt)`` with
the tokenizer's own special tokens (e.g. a BOS). A response is ``tokenizer(response,
add_special_tokens=False)`` followed by the EOS token (when the tokenizer has one and the text does
not already end with it). ``use_chat_template=False`` forces the plain path.

**Rules** (each applied row by row, in this order, each counted in `PreferenceData.stats`):

1. ``empty_prompt``: the prompt has no tokens (an empty text still gets the tokenizer's BOS, if
   it adds one) -> dropped (a causal LM scores token ``i`` from the tokens before it, so a
   response needs at least one prompt token before it).
2. ``empty_response``: a response (chosen, rejected or the KTO completion) is empty or only
   whitespace -> dropped (no tokens to score; its log-prob would be 0 and its length-mean undefined).
3. ``prompt_too_long``: more than ``max_prompt_len`` tokens -> dropped by default
   (``prompt_truncation="drop"``); ``"left"`` keeps the last ``max_prompt_len`` tokens instead
   (counted as ``prompt_truncated``). Dropping is the default because cutting the start of an
   instruction can change what the right answer is.
4. ``response_truncated``: a response longer than ``max_response_len`` tokens is cut to its first
   ``max_response_len`` (it then has no EOS) with ``response_truncation="truncate"`` (default);
   ``"drop"`` drops the row instead (counted as ``response_too_long``).
5. ``identical``: chosen and rejected are the same token sequence (after truncation) -> dropped
   (the pair carries no preference; its DPO gradient is 0 but it would still count in the means).

The counts, with ``rows`` (read) and ``kept``, are in ``stats``; when anything was dropped or cut,
a warning says how much. No row is ever kept silently broken, and a data set with no row left is
an error. Missing columns, or a mix of pair and KTO columns that fits neither, raise
`PreferenceDataError` naming the columns found and the columns expected.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "PAIR_COLUMNS",
    "KTO_COLUMNS",
    "PreferenceData",
    "PreferenceDataError",
    "load_rows",
    "read_json_rows",
    "tokenize_pairs",
    "tokenize_kto",
    "load_preference_data",
    "pairs_from_arrays",
    "kto_from_arrays",
    "pairs_to_kto",
]

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
KTO_COLUMNS = ("prompt", "completion", "label")
ARRAY_FIELDS = ("prompt_ids", "prompt_mask", "chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")


class PreferenceDataError(ValueError):
    """The preference data cannot be used as given (columns, shapes, nothing left after drops)."""


@dataclasses.dataclass
class PreferenceData:
    """Tokenised, padded preference data (see the module docstring for the layout).

    ``ref_chosen_logps`` / ``ref_rejected_logps`` (``[N]`` float32) are the reference model's summed
    response log-probs, filled by `jaxrlhf.training.preference.precompute_reference_logps`.
    ``stats`` counts the rows read, kept, dropped and truncated, by rule.
    """

    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    chosen_ids: np.ndarray
    chosen_mask: np.ndarray
    rejected_ids: np.ndarray
    rejected_mask: np.ndarray
    desirable: np.ndarray | None = None
    ref_chosen_logps: np.ndarray | None = None
    ref_rejected_logps: np.ndarray | None = None
    stats: dict[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        n = self.prompt_ids.shape[0]
        for name in ARRAY_FIELDS:
            value = np.asarray(getattr(self, name))
            if value.ndim != 2 or value.shape[0] != n:
                raise PreferenceDataError(f"PreferenceData.{name} must be [N={n}, T], got shape {value.shape}")
            setattr(self, name, value.astype(np.int32))
        if self.chosen_ids.shape != self.rejected_ids.shape:
            raise PreferenceDataError(
                f"chosen and rejected arrays must have one shape, got "
                f"{self.chosen_ids.shape} and {self.rejected_ids.shape}"
            )
        for ids, mask in (
            ("prompt_ids", "prompt_mask"),
            ("chosen_ids", "chosen_mask"),
            ("rejected_ids", "rejected_mask"),
        ):
            if getattr(self, ids).shape != getattr(self, mask).shape:
                raise PreferenceDataError(
                    f"{ids} and {mask} differ in shape: {getattr(self, ids).shape} vs {getattr(self, mask).shape}"
                )
        if self.desirable is not None:
            self.desirable = np.asarray(self.desirable).astype(bool).reshape(-1)
            if self.desirable.shape != (n,):
                raise PreferenceDataError(f"desirable must be [N={n}], got {self.desirable.shape}")
        for name in ("ref_chosen_logps", "ref_rejected_logps"):
            value = getattr(self, name)
            if value is not None:
                value = np.asarray(value, np.float32)
                if value.shape != (n,):
                    raise PreferenceDataError(f"{name} must be [N={n}], got {value.shape}")
                setattr(self, name, value)

    @property
    def kind(self) -> str:
        """``"pairs"`` or ``"kto"``."""
        return "pairs" if self.desirable is None else "kto"

    @property
    def has_reference(self) -> bool:
        return self.ref_chosen_logps is not None and self.ref_rejected_logps is not None

    def __len__(self) -> int:
        return int(self.prompt_ids.shape[0])

    @property
    def max_prompt_len(self) -> int:
        return int(self.prompt_ids.shape[1])

    @property
    def max_response_len(self) -> int:
        return int(self.chosen_ids.shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-row arrays (what the trainer batches), without ``stats``; absent ones left out."""
        out = {name: getattr(self, name) for name in ARRAY_FIELDS}
        for name in ("desirable", "ref_chosen_logps", "ref_rejected_logps"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def select(self, rows) -> PreferenceData:
        """The rows ``rows`` (indices or a boolean mask); ``stats`` carried over."""
        picked = {k: v[rows] for k, v in self.arrays().items()}
        return dataclasses.replace(self, **picked, stats=dict(self.stats))

    def with_reference(self, ref_chosen_logps, ref_rejected_logps) -> PreferenceData:
        return dataclasses.replace(
            self,
            ref_chosen_logps=np.asarray(ref_chosen_logps, np.float32),
            ref_rejected_logps=np.asarray(ref_rejected_logps, np.float32),
        )


# ----------------------------------------------------------------------------------------------
# Reading rows


def load_rows(source, columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Rows (dicts) from a JSONL / JSON / Parquet path, a ``datasets.Dataset`` or a list of dicts.

    JSON files are read with the standard library (`read_json_rows`): JSON Lines (one object per
    line) or one JSON array of objects, optionally gzipped. Parquet goes through Hugging Face
    ``datasets`` (``load_dataset("parquet", data_files=path, split="train")``; ``pip install
    "jaxrlhf[data]"``). With ``columns``, every row must have them all: otherwise a
    `PreferenceDataError` lists the missing ones and the columns present.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"preference data file not found: {path}")
        lower = path.lower()
        if lower.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
            rows = read_json_rows(path)
            present = list(dict.fromkeys(key for row in rows for key in row))  # in order of first use
            _check_columns(present, columns, path)
            if columns is not None:
                _check_row_columns(rows, columns)
            return rows
        if not lower.endswith(".parquet"):
            raise PreferenceDataError(f"{path}: unknown preference data format (want .jsonl, .json or .parquet)")
        try:
            import datasets
        except ImportError as e:
            raise ImportError(
                'reading Parquet preference files needs Hugging Face `datasets`: pip install "jaxrlhf[data]" '
                "(or pip install datasets); JSONL files need nothing"
            ) from e
        dataset = datasets.load_dataset("parquet", data_files=path, split="train")
        present = list(dataset.column_names)
        _check_columns(present, columns, path)
        rows = dataset.to_list()
    elif hasattr(source, "column_names") and hasattr(source, "to_list"):  # a datasets.Dataset
        present = list(source.column_names)
        _check_columns(present, columns, "dataset")
        rows = source.to_list()
    else:
        rows = [dict(r) for r in source]
        if columns is not None:
            _check_row_columns(rows, columns)
    return rows


def read_json_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The objects of a JSON Lines file (one per line; blank lines skipped) or of a file holding one
    JSON array of objects; ``.gz`` files are decompressed. Standard library only.

    A line that is not JSON, or a value that is not an object, is a `PreferenceDataError` naming
    the file and the line."""
    path = os.fspath(path)
    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):  # one JSON array
        try:
            values = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise PreferenceDataError(f"{path}: not valid JSON ({err})") from None
        where = [f"item {i}" for i in range(len(values))]
    else:
        values, where = [], []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                values.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise PreferenceDataError(f"{path}, line {number}: not valid JSON ({err})") from None
            where.append(f"line {number}")
    for value, place in zip(values, where):
        if not isinstance(value, dict):
            raise PreferenceDataError(f"{path}, {place}: expected a JSON object (one row), got {value!r:.80}")
    return values


def _check_row_columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Every row (a dict) has every column, else `PreferenceDataError` naming the first bad row."""
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            raise PreferenceDataError(
                f"row {i} lacks column(s) {missing}: it has {sorted(row)}; expected {list(columns)}"
            )


def _check_columns(present, columns, where):
    if columns is None:
        return
    missing = [c for c in columns if c not in present]
    if missing:
        hint = ""
        if set(KTO_COLUMNS) <= set(present):
            hint = " (these look like KTO rows: prompt/completion/label; use loss='kto')"
        elif set(PAIR_COLUMNS) <= set(present):
            hint = " (these look like preference pairs: prompt/chosen/rejected)"
        raise PreferenceDataError(
            f"{where}: missing column(s) {missing}; found {present}; expected {list(columns)}{hint}"
        )


# ----------------------------------------------------------------------------------------------
# Tokenising


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _encode_prompt(tokenizer, prompt, use_chat_template: bool | None) -> list[int]:
    chat = _has_chat_template(tokenizer) if use_chat_template is None else use_chat_template
    if chat:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, Mapping) or hasattr(ids, "keys"):  # a BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return [int(t) for t in ids]
    if isinstance(prompt, list):
        raise PreferenceDataError("a prompt given as a list of messages needs a tokenizer with a chat template")
    # An empty prompt keeps the tokenizer's own special tokens (e.g. a BOS); with none it is empty.
    return [int(t) for t in tokenizer(str(prompt))["input_ids"]]


def _response_text(response) -> str:
    """A response as text; a list of messages (conversational rows) gives its last message's content."""
    if isinstance(response, list):
        if not response:
            return ""
        last = response[-1]
        return str(last.get("content", "")) if isinstance(last, Mapping) else str(last)
    return "" if response is None else str(response)


def _encode_response(tokenizer, response) -> list[int]:
    text = _response_text(response)
    if not text.strip():
        return []
    ids = [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(int(eos))
    return ids


class _Builder:
    """Applies the module's rules to token lists and pads the kept rows."""

    def __init__(self, max_prompt_len, max_response_len, prompt_truncation, response_truncation, pad_id):
        if max_prompt_len < 1 or max_response_len < 1:
            raise ValueError(
                f"max_prompt_len and max_response_len must be >= 1, got {max_prompt_len}, {max_response_len}"
            )
        if prompt_truncation not in ("drop", "left"):
            raise ValueError(f"prompt_truncation must be 'drop' or 'left', got {prompt_truncation!r}")
        if response_truncation not in ("truncate", "drop"):
            raise ValueError(f"response_truncation must be 'truncate' or 'drop', got {response_truncation!r}")
        self.P, self.R = int(max_prompt_len), int(max_response_len)
        self.prompt_truncation, self.response_truncation = prompt_truncation, response_truncation
        self.pad_id = int(pad_id)
        self.stats = {
            "rows": 0,
            "kept": 0,
            "empty_prompt": 0,
            "empty_response": 0,
            "prompt_too_long": 0,
            "prompt_truncated": 0,
            "response_too_long": 0,
            "response_truncated": 0,
            "identical": 0,
        }
        self.kept: list[tuple] = []

    def add(self, prompt: Sequence[int], responses: Sequence[Sequence[int]], pairwise: bool, extra=None) -> bool:
        self.stats["rows"] += 1
        prompt, responses = list(prompt), [list(r) for r in responses]
        if not prompt:
            self.stats["empty_prompt"] += 1
            return False
        if any(len(r) == 0 for r in responses):
            self.stats["empty_response"] += 1
            return False
        if len(prompt) > self.P:
            if self.prompt_truncation == "drop":
                self.stats["prompt_too_long"] += 1
                return False
            prompt = prompt[-self.P :]
            self.stats["prompt_truncated"] += 1
        if any(len(r) > self.R for r in responses):
            if self.response_truncation == "drop":
                self.stats["response_too_long"] += 1
                return False
            self.stats["response_truncated"] += sum(len(r) > self.R for r in responses)
            responses = [r[: self.R] for r in responses]
        if pairwise and responses[0] == responses[1]:
            self.stats["identical"] += 1
            return False
        self.stats["kept"] += 1
        self.kept.append((prompt, responses, extra))
        return True

    def arrays(self):
        n = len(self.kept)
        if n == 0:
            raise PreferenceDataError(f"no preference row left after the data rules: {self.stats}")
        prompt_ids = np.full((n, self.P), self.pad_id, np.int32)
        prompt_mask = np.zeros((n, self.P), np.int32)
        num_responses = len(self.kept[0][1])
        resp_ids = [np.full((n, self.R), self.pad_id, np.int32) for _ in range(num_responses)]
        resp_mask = [np.zeros((n, self.R), np.int32) for _ in range(num_responses)]
        for i, (prompt, responses, _) in enumerate(self.kept):
            prompt_ids[i, self.P - len(prompt) :] = prompt
            prompt_mask[i, self.P - len(prompt) :] = 1
            for j, r in enumerate(responses):
                resp_ids[j][i, : len(r)] = r
                resp_mask[j][i, : len(r)] = 1
        return prompt_ids, prompt_mask, resp_ids, resp_mask

    def report(self, what: str) -> dict[str, int]:
        s = self.stats
        dropped = s["rows"] - s["kept"]
        cut = s["prompt_truncated"] + s["response_truncated"]
        if dropped or cut:
            details = ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("rows", "kept") and v)
            warnings.warn(f"{what}: kept {s['kept']} of {s['rows']} rows ({details})", stacklevel=3)
        return dict(s)


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return 0 if pad is None else int(pad)


def tokenize_pairs(
    rows: Iterable[Mapping[str, Any]],
    tokenizer,
    max_prompt_len: int,
    max_response_len: int,
    *,
    use_chat_template: bool | None = None,
    prompt_truncation: str = "drop",
    response_truncation: str = "truncate",
) -> PreferenceData:
    """Preference pairs (rows with ``prompt``, ``chosen``, ``rejected``) -> `PreferenceData`."""
    rows = list(rows)
    _check_row_columns(rows, PAIR_COLUMNS)
    builder = _Builder(max_prompt_len, max_response_len, prompt_truncation, response_truncation, _pad_id(tokenizer))
    for row in rows:
        builder.add(
            _encode_prompt(tokenizer, row["prompt"], use_chat_template),
            [_encode_response(tokenizer, row["chosen"]), _encode_response(tokenizer, row["rejected"])],
            pairwise=True,
        )
    prompt_ids, prompt_mask, (c_ids, r_ids), (c_mask, r_mask) = builder.arrays()
    stats = builder.report("preference pairs")
    return PreferenceData(prompt_ids, prompt_mask, c_ids, c_mask, r_ids, r_mask, stats=stats)


def _as_label(value, i) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "desirable", "undesirable", "1", "0"):
        return value.lower() in ("true", "desirable", "1")
    raise PreferenceDataError(f"row {i}: KTO label must be a bool (or 0/1), got {value!r}")


def _derangement(n: int, seed: int) -> np.ndarray:
    """A permutation with no fixed point (n >= 2): a random cyclic shift of a random order."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    perm = np.empty(n, np.int64)
    perm[order] = np.roll(order, -1)  # order[k] -> order[k + 1]
    return perm


def tokenize_kto(
    rows: Iterable[Mapping[str, Any]],
    tokenizer,
    max_prompt_len: int,
    max_response_len: int,
    *,
    use_chat_template: bool | None = None,
    prompt_truncation: str = "drop",
    response_truncation: str = "truncate",
    kl_seed: int = 0,
) -> PreferenceData:
    """Unpaired KTO rows (``prompt``, ``completion``, ``label``) -> `PreferenceData` of kind ``"kto"``.

    The ``rejected_*`` slot gets each kept row's KL completion (see the module docstring).
    """
    rows = list(rows)
    _check_row_columns(rows, KTO_COLUMNS)
    builder = _Builder(max_prompt_len, max_response_len, prompt_truncation, response_truncation, _pad_id(tokenizer))
    for i, row in enumerate(rows):
        builder.add(
            _encode_prompt(tokenizer, row["prompt"], use_chat_template),
            [_encode_response(tokenizer, row["completion"])],
            pairwise=False,
            extra=_as_label(row["label"], i),
        )
    desirable = np.asarray([extra for _, _, extra in builder.kept], bool)
    prompt_ids, prompt_mask, (c_ids,), (c_mask,) = builder.arrays()
    stats = builder.report("KTO rows")
    return _kto_data(prompt_ids, prompt_mask, c_ids, c_mask, desirable, stats, kl_seed)


def _kto_data(prompt_ids, prompt_mask, ids, mask, desirable, stats, kl_seed) -> PreferenceData:
    n = ids.shape[0]
    if n < 2:
        raise PreferenceDataError(f"KTO needs at least 2 rows (for the mismatched KL pairs), got {n}")
    perm = _derangement(n, kl_seed)
    return PreferenceData(prompt_ids, prompt_mask, ids, mask, ids[perm], mask[perm], desirable=desirable, stats=stats)


def load_preference_data(
    source, tokenizer, max_prompt_len: int, max_response_len: int, *, kind: str = "pairs", **kwargs
) -> PreferenceData:
    """`load_rows` then `tokenize_pairs` (``kind="pairs"``) or `tokenize_kto` (``kind="kto"``)."""
    if kind == "pairs":
        return tokenize_pairs(load_rows(source, PAIR_COLUMNS), tokenizer, max_prompt_len, max_response_len, **kwargs)
    if kind == "kto":
        return tokenize_kto(load_rows(source, KTO_COLUMNS), tokenizer, max_prompt_len, max_response_len, **kwargs)
    raise ValueError(f"kind must be 'pairs' or 'kto', got {kind!r}")


# ----------------------------------------------------------------------------------------------
# Already tokenised arrays


def _rows_of(ids, mask, name) -> list[list[int]]:
    ids, mask = np.asarray(ids), np.asarray(mask)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise PreferenceDataError(f"{name}: ids and mask must be [N, T] of one shape, got {ids.shape} and {mask.shape}")
    return [row[m.astype(bool)].tolist() for row, m in zip(ids, mask)]


def pairs_from_arrays(
    prompt_ids,
    prompt_mask,
    chosen_ids,
    chosen_mask,
    rejected_ids,
    rejected_mask,
    *,
    max_prompt_len: int | None = None,
    max_response_len: int | None = None,
    pad_id: int = 0,
    prompt_truncation: str = "drop",
    response_truncation: str = "truncate",
) -> PreferenceData:
    """`PreferenceData` from token arrays (any padding side: the masks say which tokens count).

    The rules of the module docstring apply (an all-zero response mask is an empty response); the
    lengths default to the widest row present.
    """
    prompts = _rows_of(prompt_ids, prompt_mask, "prompt")
    chosen = _rows_of(chosen_ids, chosen_mask, "chosen")
    rejected = _rows_of(rejected_ids, rejected_mask, "rejected")
    if not len(prompts) == len(chosen) == len(rejected):
        raise PreferenceDataError(
            f"prompt, chosen and rejected need one number of rows, got {len(prompts)}, {len(chosen)}, {len(rejected)}"
        )
    P = max_prompt_len or max(1, max(map(len, prompts), default=1))
    R = max_response_len or max(1, max(map(len, chosen + rejected), default=1))
    builder = _Builder(P, R, prompt_truncation, response_truncation, pad_id)
    for p, c, r in zip(prompts, chosen, rejected):
        builder.add(p, [c, r], pairwise=True)
    prompt_ids, prompt_mask, (c_ids, r_ids), (c_mask, r_mask) = builder.arrays()
    return PreferenceData(
        prompt_ids, prompt_mask, c_ids, c_mask, r_ids, r_mask, stats=builder.report("preference pairs")
    )


def kto_from_arrays(
    prompt_ids,
    prompt_mask,
    completion_ids,
    completion_mask,
    desirable,
    *,
    max_prompt_len: int | None = None,
    max_response_len: int | None = None,
    pad_id: int = 0,
    prompt_truncation: str = "drop",
    response_truncation: str = "truncate",
    kl_seed: int = 0,
) -> PreferenceData:
    """KTO `PreferenceData` from token arrays and a ``[N]`` bool label."""
    prompts = _rows_of(prompt_ids, prompt_mask, "prompt")
    completions = _rows_of(completion_ids, completion_mask, "completion")
    desirable = np.asarray(desirable).astype(bool).reshape(-1)
    if not len(prompts) == len(completions) == len(desirable):
        raise PreferenceDataError(
            f"prompt, completion and desirable need one number of rows, got {len(prompts)}, "
            f"{len(completions)}, {len(desirable)}"
        )
    P = max_prompt_len or max(1, max(map(len, prompts), default=1))
    R = max_response_len or max(1, max(map(len, completions), default=1))
    builder = _Builder(P, R, prompt_truncation, response_truncation, pad_id)
    for p, c, d in zip(prompts, completions, desirable):
        builder.add(p, [c], pairwise=False, extra=bool(d))
    labels = np.asarray([extra for _, _, extra in builder.kept], bool)
    prompt_ids, prompt_mask, (c_ids,), (c_mask,) = builder.arrays()
    return _kto_data(prompt_ids, prompt_mask, c_ids, c_mask, labels, builder.report("KTO rows"), kl_seed)


def pairs_to_kto(data: PreferenceData, kl_seed: int = 0) -> PreferenceData:
    """Each pair as two KTO rows: chosen desirable, rejected undesirable (same prompt)."""
    if data.kind != "pairs":
        raise PreferenceDataError("pairs_to_kto needs pair data")
    prompt_ids = np.concatenate([data.prompt_ids, data.prompt_ids])
    prompt_mask = np.concatenate([data.prompt_mask, data.prompt_mask])
    ids = np.concatenate([data.chosen_ids, data.rejected_ids])
    mask = np.concatenate([data.chosen_mask, data.rejected_mask])
    desirable = np.concatenate([np.ones(len(data), bool), np.zeros(len(data), bool)])
    return _kto_data(prompt_ids, prompt_mask, ids, mask, desirable, dict(data.stats), kl_seed)

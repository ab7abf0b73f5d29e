"""Per-step metrics of a run: a JSONL file, TensorBoard event files, Weights & Biases and a progress bar.

(Named ``metrics_log`` rather than ``logging`` so that it never hides the standard library module.)

One ``MetricsLogger`` per run directory::

    with MetricsLogger(out_dir, total_steps=1000, progress_keys=("reward", "kl")) as logger:
        for step in range(1000):
            ...
            logger.log(step, {"reward": reward, "kl": kl, "loss": {"policy": pg, "value": vf}})

writes, for each call of ``log``:

- one line ``{"step": 12, "reward": 0.5, "kl": 0.01, "loss/policy": ..., ...}`` to
  ``out_dir/metrics.jsonl`` (flushed at once, so a crashed run keeps its numbers); nested dicts are
  flattened with ``/``; JAX and NumPy scalars become Python floats;
- the same scalars to TensorBoard event files in ``out_dir`` (``tensorboard --logdir runs``);
- optionally the same scalars to a Weights & Biases run (``wandb=dict(project=..., name=...)``,
  the keyword arguments of ``wandb.init``; ``pip install "jaxrlhf[wandb]"``). The environment
  chooses the rest as wandb documents it: ``WANDB_MODE=offline`` (no account, no network; ``wandb
  sync`` uploads later), ``WANDB_ENTITY``, ``WANDB_API_KEY``, ``WANDB_DIR`` (default: ``out_dir``).
  W&B's service process writes the run's files in the background: they are complete once the
  program ends (or after ``wandb.teardown()``);
- an update of a tqdm bar whose postfix shows ``progress_keys``.

`logger_options` turns a list of logger names (``PPOConfig.loggers``) into these arguments.

Resuming a run into the same directory appends to ``metrics.jsonl``. Passing ``resume_step`` first
drops the lines with ``step > resume_step`` (they came from work after the checkpoint, which the
resumed run redoes) and tells TensorBoard to hide its events past that step too. A W&B run keeps its
id in ``out_dir/wandb_run_id`` and a resumed run continues it; W&B itself ignores steps at or below
the last one it recorded, so the redone steps keep their first values there.
"""

from __future__ import annotations

import html
import importlib.util
import json
import math
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "MetricsLogger",
    "read_metrics",
    "sampled_token_curve",
    "flatten_metrics",
    "logger_options",
    "METRICS_FILENAME",
    "LOGGERS",
]

METRICS_FILENAME = "metrics.jsonl"
WANDB_ID_FILENAME = "wandb_run_id"
# Where the metrics of a step can go (`logger_options`).
LOGGERS = ("jsonl", "tensorboard", "wandb")


def check_loggers(loggers: Iterable[str]) -> None:
    """Raise ValueError for a name not in `LOGGERS`, ImportError for "wandb" without the wandb package."""
    loggers = tuple(loggers)
    unknown = [name for name in loggers if name not in LOGGERS]
    if unknown:
        raise ValueError(f"unknown logger(s) {unknown}: choose among {LOGGERS}")
    if "wandb" in loggers and importlib.util.find_spec("wandb") is None:
        raise ImportError(
            'the "wandb" logger needs the wandb package: pip install "jaxrlhf[wandb]" (or drop "wandb" from loggers)'
        )


def logger_options(
    loggers: Iterable[str],
    *,
    wandb_project: str | None = None,
    name: str | None = None,
    group: str | None = None,
    run_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`MetricsLogger` keyword arguments that write to ``loggers`` (names from `LOGGERS`).

    ``wandb_project``, ``name``, ``group`` (e.g. the sweep a run belongs to) and ``run_config``
    (its hyper-parameters, shown and filtered on by W&B) only matter with "wandb". Checked by
    `check_loggers` here, so a missing wandb package fails before any training work.
    """
    loggers = tuple(loggers)
    check_loggers(loggers)
    wandb = None
    if "wandb" in loggers:
        wandb = {
            "project": wandb_project,
            "name": name,
            "group": group,
            "config": None if run_config is None else dict(run_config),
        }
    return {"jsonl": "jsonl" in loggers, "tensorboard": "tensorboard" in loggers, "wandb": wandb}


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"loss": {"pg": x}}`` -> ``{"loss/pg": float(x)}``; every leaf must be a scalar.

    Accepts Python numbers, bools and 0-d or size-1 NumPy/JAX arrays (which are fetched from the
    device here). Raises ``ValueError`` for anything with more than one element.
    """
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, prefix=name + "/"))
            continue
        array = np.asarray(value)
        if array.size != 1 or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise ValueError(f"metric {name!r} is not a numeric scalar: {value!r}")
        flat[name] = float(array.reshape(()))
    return flat


def _metrics_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    return os.path.join(path, METRICS_FILENAME) if os.path.isdir(path) else path


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (or of a run directory that holds one), in order.

    A last line cut short by a crash is skipped; any other unreadable line is an error.
    """
    path = _metrics_path(path)
    with open(path) as f:
        lines = f.read().split("\n")  # a complete file ends with "\n", so the last item is ""
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break  # a last line without its newline: cut short by an interrupted run
            raise ValueError(f"{path}:{number}: not a JSON line: {line[:80]!r}") from None
    return records


def sampled_token_curve(
    path: str | os.PathLike, metric: str, start_value: float | None = None
) -> tuple[list[float], list[float], float]:
    """An evaluation metric against the response tokens sampled so far, from a run's metrics.

    Returns ``(tokens, values, total_tokens)``: for each ``eval/<metric>`` record, the cumulative
    ``num_sampled_tokens`` (``num_response_tokens`` where a step has no such field) of the steps up
    to and including its step, and its value; ``start_value`` (the starting policy's evaluation)
    is put first at 0 tokens when given. Steps are the records with a ``score``.
    """
    records = read_metrics(path)
    per_step = [r.get("num_sampled_tokens", r.get("num_response_tokens", 0.0)) for r in records if "score" in r]
    sampled = np.cumsum(per_step) if per_step else np.zeros(1)
    evals = [r for r in records if f"eval/{metric}" in r]
    tokens = [float(sampled[min(r["step"], len(sampled) - 1)]) for r in evals]
    values = [float(r[f"eval/{metric}"]) for r in evals]
    if start_value is not None:
        tokens, values = [0.0, *tokens], [float(start_value), *values]
    return tokens, values, float(sampled[-1]) if per_step else 0.0


def _truncate_after(path: str, resume_step: int) -> int:
    """Rewrite ``path`` keeping only records with ``step <= resume_step``; returns how many were kept."""
    kept = [r for r in read_metrics(path) if r.get("step", -math.inf) <= resume_step]
    tmp_path = path + ".tmp"
    with open(tmp_path, "w") as f:
        for record in kept:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp_path, path)
    return len(kept)


def _start_wandb_run(out_dir: str, init_kwargs: Mapping[str, Any]):
    """A new W&B run, or the one this directory logged to before (its id is in ``wandb_run_id``)."""
    try:
        import wandb
    except ImportError:
        check_loggers(["wandb"])  # the clear message
        raise
    id_path = os.path.join(out_dir, WANDB_ID_FILENAME)
    if os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        run_id = uuid.uuid4().hex[:12]  # W&B run ids: letters and digits
        with open(id_path, "w") as f:
            f.write(run_id + "\n")
    kwargs = {key: value for key, value in init_kwargs.items() if value is not None}
    kwargs.setdefault("dir", os.environ.get("WANDB_DIR", out_dir))
    # "create_new": the R runs of a sweep are open at the same time, each logged through its own object.
    return wandb.init(id=run_id, resume="allow", reinit="create_new", **kwargs)


class MetricsLogger:
    """Writes each step's scalar metrics to JSONL, TensorBoard and W&B, and drives a progress bar.

    Args:
      out_dir: the run directory (created if needed).
      total_steps: length of the progress bar; ``None`` shows a counter without an end.
      progress_keys: metric names shown next to the bar (when a step logs them).
      resume_step: when resuming, the last step already done. Records of later steps are dropped
        from an existing ``metrics.jsonl``, and TensorBoard discards its events past this step.
        ``None`` simply appends.
      tensorboard: write TensorBoard event files.
      progress: show the tqdm bar (on stderr).
      jsonl: write ``metrics.jsonl``.
      wandb: also log to a Weights & Biases run: the keyword arguments of ``wandb.init``
        (``project``, ``name``, ``group``, ``config``; None values are left out). None = no W&B.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        total_steps: int | None = None,
        progress_keys: Iterable[str] = (),
        *,
        resume_step: int | None = None,
        tensorboard: bool = True,
        progress: bool = True,
        jsonl: bool = True,
        wandb: Mapping[str, Any] | None = None,
    ):
        self.out_dir = os.fspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self.path = os.path.join(self.out_dir, METRICS_FILENAME)
        self.progress_keys = tuple(progress_keys)
        self.last_step = resume_step
        self._file = None
        if jsonl:
            if resume_step is not None and os.path.exists(self.path):
                _truncate_after(self.path, resume_step)
            self._file = open(self.path, "a")

        self._wandb_run = None if wandb is None else _start_wandb_run(self.out_dir, wandb)

        self._writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge_step = None if resume_step is None else resume_step + 1
            # Event files are named by the second they were opened; the suffix keeps a resumed
            # run that starts within the same second from overwriting the first run's file.
            self._writer = SummaryWriter(
                logdir=self.out_dir,
                purge_step=purge_step,
                flush_secs=10,
                filename_suffix=f".{time.time_ns()}",
            )

        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=0 if resume_step is None else resume_step + 1,
                dynamic_ncols=True,
                leave=True,
            )

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Record ``metrics`` (a possibly nested dict of scalars) at ``step``; returns the flat floats."""
        step = int(step)
        flat = flatten_metrics(metrics)
        if self._file is not None:
            self._file.write(json.dumps({"step": step, **flat}) + "\n")
            self._file.flush()
        if self._writer is not None:
            for name, value in flat.items():
                self._writer.add_scalar(name, value, global_step=step)
        if self._wandb_run is not None:
            self._wandb_run.log(flat, step=step)
        if self._bar is not None:
            done = step + 1  # steps count from 0
            if done > self._bar.n:
                self._bar.update(done - self._bar.n)
            shown = {k: f"{flat[k]:.4g}" for k in self.progress_keys if k in flat}
            if shown:
                self._bar.set_postfix(shown, refresh=False)
        self.last_step = step
        return flat

    def log_text(self, step: int, tag: str, text: str) -> None:
        """A piece of text (e.g. sampled responses) for TensorBoard's Text tab."""
        if self._writer is not None:
            self._writer.add_text(tag, text, global_step=int(step))
        if self._wandb_run is not None:
            import wandb

            self._wandb_run.log({tag: wandb.Html("<pre>" + html.escape(text) + "</pre>")}, step=int(step))

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the file, the event writer, the W&B run and the bar. Safe to call twice."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

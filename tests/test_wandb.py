"""The Weights & Biases logger, run offline (WANDB_MODE=offline: no account, no network).

An offline run is a directory ``wandb/offline-run-<time>-<id>/`` holding ``run-<id>.wandb``: the
records the W&B service would have uploaded, protobufs in LevelDB's log format. `_wandb_records`
reads them back, so the tests check what a later ``wandb sync`` would upload: the run's name,
group and config, and the metrics of every step.
"""

import glob
import json
import os
import struct
import sys

import jax
import numpy as np
import pytest
import test_training as tt

from jaxrlhf.metrics_log import MetricsLogger, logger_options, read_metrics
from jaxrlhf.models import LanguageModel
from jaxrlhf.training import PPOConfig, train_sweep

# wandb is in the test extra; without it these tests are skipped, not failed.
wandb = pytest.importorskip("wandb")
wandb_internal_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")


@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_NAME", "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


def _records(path):
    """The protobuf `Record`s of a ``.wandb`` file: a 7-byte header (":W&B", magic 0xBEE1, version),
    then LevelDB log records in 32 KiB blocks, each ``crc32c (4) | length (2) | type (1) | data``
    with type FULL (1) or FIRST (2), MIDDLE (3), LAST (4) pieces of one record."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B" and data[4:6] == b"\xe1\xbe", data[:7]
    block, pos, pieces = 32768, 7, []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's last bytes, too few for a header, are padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break  # zero padding after the last record
        pieces.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            pieces = []
            yield record


def _wandb_records(run_dir):
    """``{"run": RunRecord, "config": {key: value}, "history": [{key: value}, ...]}`` of an offline run."""
    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    out = {"run": None, "config": {}, "history": []}
    for record in _records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
            out["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            out["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            out["history"].append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return out


def _offline_runs(wandb_dir):
    """The offline run directories under ``wandb_dir``, complete: W&B's service process writes them in
    the background after ``finish()``; ``wandb.teardown()`` waits for it (as the end of a program does)."""
    wandb.teardown()
    return sorted(glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*")))


def test_offline_run_holds_every_step_and_a_resume_continues_it(tmp_path):
    options = logger_options(("jsonl", "wandb"), wandb_project="tests", name="one", run_config={"lr": 0.5})
    assert options["tensorboard"] is False
    with MetricsLogger(tmp_path, progress=False, **options) as logger:
        for step in range(3):
            logger.log(step, {"reward": np.float32(step / 2), "loss": {"policy": 1.0 + step}})
    # WANDB_DIR unset: the run goes under the run directory, beside metrics.jsonl.
    (first,) = _offline_runs(tmp_path)
    records = _wandb_records(first)
    assert records["run"].display_name == "one" and records["run"].project == "tests"
    assert records["config"]["lr"] == 0.5
    assert [(h["_step"], h["reward"], h["loss/policy"]) for h in records["history"]] == [
        (0, 0.0, 1.0),
        (1, 0.5, 2.0),
        (2, 1.0, 3.0),
    ]
    assert len(read_metrics(tmp_path)) == 3  # JSONL as before, no TensorBoard events
    assert not glob.glob(str(tmp_path / "events.out.tfevents.*"))

    # A resumed run (same directory) continues the same W&B run id with the steps after resume_step.
    with MetricsLogger(tmp_path, progress=False, resume_step=2, **options) as logger:
        logger.log(3, {"reward": 1.5, "loss": {"policy": 4.0}})
    second = [d for d in _offline_runs(tmp_path) if d != first]
    assert len(second) == 1 and second[0].endswith(records["run"].run_id)
    assert [h["_step"] for h in _wandb_records(second[0])["history"]] == [3]


@pytest.mark.slow  # compiles and trains a (tiny) sweep
def test_sweep_writes_one_run_per_member_grouped_by_the_sweep(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    model = LanguageModel(tt.tiny_gpt2_config())
    params = model.init_params(jax.random.PRNGKey(0))
    config = tt.BASE_CONFIG.replace(total_steps=2, loggers=("jsonl", "wandb"), wandb_project="sweeps")
    runs = [{"seed": 0}, {"seed": 1, "learning_rate": 1e-3}]
    result = train_sweep(
        (model, params),
        tt.target_fraction_reward,
        tt.make_prompts(tt.BATCH),
        config,
        tmp_path / "my_sweep",
        runs,
        export=False,
        progress=False,
    )
    offline = _offline_runs(tmp_path / "wandb_home")
    assert len(offline) == len(runs)
    by_name = {}
    for run_dir in offline:
        records = _wandb_records(run_dir)
        by_name[records["run"].display_name] = records
        assert records["run"].run_group == "my_sweep" and records["run"].project == "sweeps"
    assert sorted(by_name) == ["my_sweep/run_0", "my_sweep/run_1"]
    for r, overrides in enumerate(runs):
        records = by_name[f"my_sweep/run_{r}"]
        assert records["config"]["sweep_run"] == r
        assert records["config"]["seed"] == overrides["seed"]
        assert records["config"]["learning_rate"] == pytest.approx(overrides.get("learning_rate", config.learning_rate))
        # The same numbers as the run's metrics.jsonl, step by step.
        jsonl = read_metrics(tmp_path / "my_sweep" / f"run_{r}")
        history = records["history"]
        assert [h["_step"] for h in history] == [m["step"] for m in jsonl] == [0, 1]
        for logged, line in zip(history, jsonl):
            assert logged["score"] == pytest.approx(line["score"])
            assert logged["kl"] == pytest.approx(line["kl"])
    assert len(result.histories) == len(runs)


def test_wandb_without_the_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without wandb imports
    config = PPOConfig(loggers=("jsonl", "wandb"))
    with pytest.raises(ImportError, match=r'pip install "jaxrlhf\[wandb\]"'):
        logger_options(config.loggers)
    with pytest.raises(ImportError, match=r'pip install "jaxrlhf\[wandb\]"'):
        train_sweep(None, None, None, config, "unused", [{"seed": 0}])  # before anything else is looked at
    assert logger_options(("jsonl",)) == {"jsonl": True, "tensorboard": False, "wandb": None}


def test_unknown_logger_names_are_refused():
    with pytest.raises(ValueError, match="loggers must be among"):
        PPOConfig(loggers=("jsonl", "mlflow"))
    with pytest.raises(ValueError, match="tuple of names"):
        PPOConfig(loggers="wandb")
    assert PPOConfig(loggers=["jsonl"]).loggers == ("jsonl",)  # a list (from JSON) becomes a tuple

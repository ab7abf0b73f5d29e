"""Checkpoints of the `TrainState` with Orbax: periodic, asynchronous, last K kept, exact resume.

Each checkpoint is a step directory holding two items::

    state  the TrainState pytree (`ocp.args.StandardSave`): params, optimizer states (with their
           injected numbers), KL controller, score statistics, hyper-parameters, step, PRNG key
           and (``max_staleness > 0``) the rollouts in flight, so N steps + restore + N steps
           equals 2N steps; for a sweep the `SweepState`;
    meta   JSON (`ocp.args.JsonSave`): the PPOConfig and the model configs it was trained with,
           a sweep's per-run overrides and (when given) the prompt set's fingerprint;

and an integrity manifest, ``_INTEGRITY.json``: the size and SHA-256 of every file of the step
(except Orbax's own ``_CHECKPOINT_METADATA`` and the step's ``commit_success.txt``, which Orbax
rewrites at commit). It is written in Orbax's background finalisation, into the temporary step
directory just before Orbax renames it to ``<step>/``, so a committed step always has one (a kill
mid-write leaves only a temporary directory, which Orbax ignores).

Restoring first checks the manifest (`verify_step_dir`): a flipped byte, a truncated or missing
file raises `CheckpointCorruptError` naming the step, the file and the fault, and listing the
intact older steps; with ``fallback_to_intact=True`` the damaged step is moved aside to
``<step>.corrupt`` (never deleted) and the newest intact older step is restored, with a warning.
A step written before manifests existed restores with a `CheckpointIntegrityWarning`.

Restoring then reads ``meta`` and refuses a checkpoint from an incompatible setup with a
`CheckpointMismatchError` naming the differing fields, before anything is compiled or loaded;
then it restores ``state`` onto an abstract target of `jax.ShapeDtypeStruct`s carrying the current
mesh's shardings, so each device (and host) reads only its own shards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxrlhf.config import config_to_dict
from jaxrlhf.training.config import RESUME_MUTABLE_FIELDS, PPOConfig
from jaxrlhf.training.ppo import PPO

# 2: hyper-parameters in the state (TrainState.hparams, injected optimizer numbers); 3: the rollout
# correction's numbers in HyperParams and the rollouts in flight (TrainState.pipeline).
FORMAT_VERSION = 3
_ocp_atomicity = ocp.path.atomicity

MANIFEST_NAME = "_INTEGRITY.json"
MANIFEST_VERSION = 1
# Files of the step directory that Orbax writes or rewrites after the manifest (bookkeeping only).
_UNHASHED = {MANIFEST_NAME, "_CHECKPOINT_METADATA", "commit_success.txt"}
_CHUNK = 1 << 22
CORRUPT_SUFFIX = ".corrupt"


class CheckpointMismatchError(ValueError):
    """The checkpoint directory was written by a run with an incompatible configuration."""


class CheckpointCorruptError(ValueError):
    """A checkpoint step is damaged or incomplete (checksum, size, missing file, unreadable).

    Attributes: ``step``, ``file`` (relative to the step directory, or None), ``problem``,
    ``intact_steps`` (older steps whose checksums verified), ``directory``.
    """

    def __init__(
        self,
        message: str,
        *,
        step: int | None = None,
        file: str | None = None,
        problem: str = "",
        intact_steps=(),
        directory: str | None = None,
    ):
        super().__init__(message)
        self.step, self.file, self.problem = step, file, problem
        self.intact_steps, self.directory = list(intact_steps), directory


class CheckpointIntegrityWarning(UserWarning):
    """A checkpoint could not be verified (no manifest), or a damaged one was moved aside."""


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _step_files(step_dir: str) -> list[str]:
    files = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), step_dir).replace(os.sep, "/")
            if rel not in _UNHASHED:  # only top-level bookkeeping is skipped; items' files all count
                files.append(rel)
    return sorted(files)


def write_manifest(step_dir: str | os.PathLike) -> dict:
    """Writes ``_INTEGRITY.json`` (size and SHA-256 of every data file) into ``step_dir``
    atomically (temporary file + rename) and returns it."""
    step_dir = os.fspath(step_dir)
    files = {
        rel: {"size": os.path.getsize(os.path.join(step_dir, rel)), "sha256": _sha256_file(os.path.join(step_dir, rel))}
        for rel in _step_files(step_dir)
    }
    manifest = {"version": MANIFEST_VERSION, "algorithm": "sha256", "files": files}
    tmp = os.path.join(step_dir, MANIFEST_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=0, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST_NAME))
    return manifest


def verify_step_dir(step_dir: str | os.PathLike) -> tuple[str, str] | None:
    """Checks ``step_dir`` against its manifest. Returns None when every listed file has its
    size and SHA-256, else ``(file, problem)`` for the first fault. Raises `FileNotFoundError`
    when there is no manifest (a step written before manifests existed)."""
    step_dir = os.fspath(step_dir)
    path = os.path.join(step_dir, MANIFEST_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("algorithm") != "sha256" or not isinstance(files, dict):
            raise ValueError(f"unknown manifest format {manifest.get('version')!r}")
    except (ValueError, KeyError, TypeError, OSError) as e:
        return MANIFEST_NAME, f"the integrity manifest is unreadable ({type(e).__name__}: {e})"
    for rel, record in sorted(files.items()):
        full = os.path.join(step_dir, rel)
        if not os.path.isfile(full):
            return rel, "missing (listed in the integrity manifest)"
        size = os.path.getsize(full)
        if size != record["size"]:
            return rel, f"truncated or resized: {size} bytes, {record['size']} written"
        if _sha256_file(full) != record["sha256"]:
            return rel, "contents changed since it was written (SHA-256 mismatch: flipped or overwritten bytes)"
    return None


class _ManifestTemporaryPath(_ocp_atomicity.AtomicRenameTemporaryPath):
    """Orbax's atomic-rename commit, writing the integrity manifest of a *step* directory into the
    temporary directory just before the rename (so the manifest is committed with the step).
    Item directories (``state``, ``meta``) are committed as usual."""

    async def finalize(self):
        final, tmp = os.fspath(self.get_final()), os.fspath(self.get())
        # An item directory (``state``, ``meta``) lives in the temporary step directory; a step
        # directory lives in the checkpoint directory and holds the ``state`` item.
        inside_temporary_step = _ocp_atomicity.TMP_DIR_SUFFIX in os.path.basename(os.path.dirname(final))
        if not inside_temporary_step and os.path.isdir(os.path.join(tmp, "state")):
            await asyncio.to_thread(write_manifest, tmp)
        await super().finalize()


def prompts_fingerprint(ids, mask) -> str:
    """SHA-256 of a prompt set: the shapes and values of ``ids`` and ``mask`` (as little-endian
    int64, so the dtype does not matter). Recorded in the checkpoint metadata; a resume with a
    different prompt set is refused unless ``allow_different_prompts=True``."""
    digest = hashlib.sha256()
    for name, array in (("ids", ids), ("mask", mask)):
        array = np.ascontiguousarray(np.asarray(array).astype("<i8"))
        digest.update(f"{name}{array.shape}".encode())
        digest.update(array.tobytes())
    return "sha256:" + digest.hexdigest()


def _json_roundtrip(value: Any) -> Any:
    return json.loads(json.dumps(value))


def checkpoint_metadata(ppo: PPO, config: PPOConfig, sweep_runs=None, prompts_fingerprint: str | None = None) -> dict:
    """What a checkpoint records about the run that wrote it (JSON values only)."""
    critic = None if ppo.critic is None else dataclasses.asdict(ppo.critic.config)  # shared trunk / critic-free
    return _json_roundtrip(
        {
            "format_version": FORMAT_VERSION,
            "ppo_config": config_to_dict(config),
            "policy_config": dataclasses.asdict(ppo.policy.config),
            "critic_config": critic,
            "sweep_runs": sweep_runs,
            "integrity": "sha256-manifest",  # steps written by this code have a manifest
            "prompts_fingerprint": prompts_fingerprint,
        }
    )


def metadata_differences(saved: dict, current: dict) -> list[str]:
    """Human-readable list of the differences that make resuming from ``saved`` unsafe."""
    problems = []
    if saved.get("format_version") != current["format_version"]:
        problems.append(f"format_version: checkpoint {saved.get('format_version')}, code {current['format_version']}")
    saved_ppo, current_ppo = saved.get("ppo_config", {}), current["ppo_config"]
    mutable = set(RESUME_MUTABLE_FIELDS)
    if current_ppo.get("lr_schedule") == "constant" and saved_ppo.get("lr_schedule") == "constant":
        mutable.add("total_steps")  # only a decaying schedule depends on the run's length
    for name in sorted(set(saved_ppo) | set(current_ppo)):
        if name in mutable:
            continue
        if saved_ppo.get(name, "<missing>") != current_ppo.get(name, "<missing>"):
            problems.append(
                f"ppo_config.{name}: checkpoint {saved_ppo.get(name, '<missing>')!r}, "
                f"now {current_ppo.get(name, '<missing>')!r}"
            )
    if saved.get("sweep_runs") != current["sweep_runs"]:
        problems.append(f"sweep_runs: checkpoint {saved.get('sweep_runs')!r}, now {current['sweep_runs']!r}")
    for key in ("policy_config", "critic_config"):
        saved_cfg, current_cfg = saved.get(key), current[key]
        if saved_cfg == current_cfg:
            continue
        if not isinstance(saved_cfg, dict) or not isinstance(current_cfg, dict):
            problems.append(f"{key}: checkpoint {saved_cfg!r}, now {current_cfg!r}")
            continue
        for name in sorted(set(saved_cfg) | set(current_cfg)):
            if saved_cfg.get(name) != current_cfg.get(name):
                problems.append(f"{key}.{name}: checkpoint {saved_cfg.get(name)!r}, now {current_cfg.get(name)!r}")
    return problems


class Checkpointer:
    """An Orbax `CheckpointManager` for one run's `TrainState` or a whole sweep's `SweepState`,
    with a SHA-256 manifest per step that `restore` verifies (see the module docstring).

    Args:
      directory: where step directories go (created).
      trainer: the run's `PPO` or the `Sweep` (its mesh gives the restore shardings).
      config: the run's config (default: the trainer's); it gives ``save_every`` and
        ``keep_checkpoints`` and is recorded in the metadata.
      async_save: write in a background thread while training goes on.
      fallback_to_intact: when the requested (latest) step is damaged, move it aside to
        ``<step>.corrupt`` and restore the newest intact older step, with a
        `CheckpointIntegrityWarning`, instead of raising `CheckpointCorruptError`.
      prompts_fingerprint: `prompts_fingerprint(ids, mask)` of the run's prompt set, recorded in
        the metadata; restoring a checkpoint that recorded a different one raises
        `CheckpointMismatchError` unless ``allow_different_prompts``.
      allow_different_prompts: resume even though the prompt set changed.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        trainer,
        config: PPOConfig | None = None,
        async_save: bool = True,
        *,
        fallback_to_intact: bool = False,
        prompts_fingerprint: str | None = None,
        allow_different_prompts: bool = False,
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        self.trainer = trainer
        self.fallback_to_intact = fallback_to_intact
        self.allow_different_prompts = allow_different_prompts
        self.restored_step: int | None = None  # the step `restore` actually restored
        self.moved_aside: list[str] = []  # damaged step directories renamed by a fallback
        config = trainer.config if config is None else config
        ppo = trainer if isinstance(trainer, PPO) else trainer.ppo
        sweep_runs = None if isinstance(trainer, PPO) else trainer.overrides
        self.metadata = checkpoint_metadata(ppo, config, sweep_runs, prompts_fingerprint)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=config.save_every,
            max_to_keep=config.keep_checkpoints,
            enable_async_checkpointing=async_save,
            create=True,
            temporary_path_class=_ManifestTemporaryPath,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._saved_steps = set(self.manager.all_steps())
        self._damaged: set[int] = set()

    # -- steps and metadata ----------------------------------------------------------------

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def all_steps(self) -> list[int]:
        return sorted(s for s in self.manager.all_steps() if s not in self._damaged)

    def latest_step(self) -> int | None:
        """The newest step on disk not known to be damaged (`restore` verifies it; with
        ``fallback_to_intact`` it may restore an older one: read ``int(state.step)`` or
        `restored_step` after it)."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def saved_metadata(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def check_compatible(self, step: int) -> None:
        """Raises `CheckpointMismatchError` if checkpoint ``step`` came from an incompatible setup
        or (unless ``allow_different_prompts``) a different prompt set."""
        saved = self.saved_metadata(step)
        problems = metadata_differences(saved, self.metadata)
        if problems:
            raise CheckpointMismatchError(
                f"cannot resume from {self.directory} (step {step}): it was written with a different "
                "configuration:\n  "
                + "\n  ".join(problems)
                + "\nUse a new output directory, or restore the original configuration."
            )
        saved_fp, current_fp = saved.get("prompts_fingerprint"), self.metadata.get("prompts_fingerprint")
        if saved_fp and current_fp and saved_fp != current_fp and not self.allow_different_prompts:
            raise CheckpointMismatchError(
                f"cannot resume from {self.directory} (step {step}): it was trained on a different prompt "
                f"set (fingerprint {saved_fp}, now {current_fp}). Resuming would continue the run on other "
                "prompts (and another batch order). Pass allow_different_prompts=True to the Checkpointer "
                "(train(..., allow_different_prompts=True)) to resume anyway, or use a new output directory."
            )
        if current_fp and saved_fp and saved_fp != current_fp:
            warnings.warn(
                f"resuming step {step} of {self.directory} with a different prompt set (allow_different_prompts=True)",
                CheckpointIntegrityWarning,
                stacklevel=3,
            )

    # -- integrity -------------------------------------------------------------------------

    def _corrupt(self, step: int, file: str | None, problem: str) -> CheckpointCorruptError:
        where = self.step_dir(step) if file is None else os.path.join(self.step_dir(step), file)
        return CheckpointCorruptError(
            f"checkpoint step {step} in {self.directory} is damaged: {where}: {problem}",
            step=step,
            file=file,
            problem=problem,
            directory=self.directory,
        )

    def verify(self, step: int) -> bool:
        """Checks step ``step`` against its manifest: True if verified, False if it has none (written
        before manifests existed); raises `CheckpointCorruptError` naming the file and the fault."""
        step_dir = self.step_dir(step)
        if not os.path.isdir(step_dir):
            raise self._corrupt(step, None, "the step directory is missing")
        try:
            fault = verify_step_dir(step_dir)
        except FileNotFoundError:
            try:
                meta = self.saved_metadata(step)
            except Exception as e:  # noqa: BLE001 - any reader error means the step is unreadable
                raise self._corrupt(
                    step,
                    "meta",
                    f"no integrity manifest, and the metadata is unreadable ({type(e).__name__}: {_short(e)})",
                ) from e
            if meta.get("integrity"):
                raise self._corrupt(
                    step,
                    MANIFEST_NAME,
                    "missing: this step was written with an integrity "
                    "manifest, which has been removed, so its data cannot be trusted",
                ) from None
            return False
        if fault is not None:
            raise self._corrupt(step, *fault)
        return True

    def _intact_older(self, step: int) -> list[str]:
        described = []
        for s in reversed([s for s in self.all_steps() if s < step]):
            try:
                described.append(f"{s} (verified)" if self.verify(s) else f"{s} (no manifest: cannot be verified)")
            except CheckpointCorruptError:
                continue
        return described

    def _move_aside(self, step: int) -> str | None:
        """Renames a damaged step directory to ``<step>.corrupt[-k]`` so that Orbax no longer sees
        it and a new save of the same step does not collide; never deletes it."""
        self._damaged.add(step)
        self._saved_steps.discard(step)
        source = self.step_dir(step)
        target = None
        if jax.process_index() == 0 and os.path.isdir(source):
            target, k = source + CORRUPT_SUFFIX, 1
            while os.path.exists(target):
                target, k = f"{source}{CORRUPT_SUFFIX}-{k}", k + 1
            os.rename(source, target)
            self.moved_aside.append(target)
        if jax.process_count() > 1:  # every host sees the rename before it reloads the step list
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxrlhf_checkpoint_move_aside_{step}")
        self.manager.reload()
        return target

    def _restore_step(self, step: int):
        verified = self.verify(step)  # CheckpointCorruptError
        if not verified:
            warnings.warn(
                f"checkpoint step {step} in {self.directory} has no integrity manifest (written by an "
                "older version): restoring it without verifying its contents",
                CheckpointIntegrityWarning,
                stacklevel=3,
            )
        try:
            self.check_compatible(step)
        except CheckpointMismatchError:
            raise
        except Exception as e:  # noqa: BLE001
            if verified:
                raise
            raise self._corrupt(step, "meta", f"unreadable ({type(e).__name__}: {_short(e)})") from e
        target = self.trainer.abstract_state()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except Exception as e:  # noqa: BLE001
            if verified:  # the files are as written: not damage, but e.g. a state structure the code changed
                raise
            raise self._corrupt(
                step, "state", f"Orbax could not read the state ({type(e).__name__}: {_short(e)})"
            ) from e
        return restored["state"]

    # -- save / restore --------------------------------------------------------------------

    def save(self, state, force: bool = False) -> bool:
        """Saves ``state`` under its step if ``save_every`` divides it (or ``force``); returns
        whether a save started. Asynchronous: call `wait` before reading the files. The
        integrity manifest is written when Orbax commits the step."""
        step = int(state.step)
        if step in self._saved_steps:
            return False
        started = self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(self.metadata)),
            force=force,
        )
        if started:
            self._saved_steps.add(step)
            self._damaged.discard(step)
        return started

    def restore(self, step: int | None = None):
        """The state of checkpoint ``step`` (default: latest), after the integrity and compatibility
        checks. A damaged step raises `CheckpointCorruptError` (naming the file and the fault, and
        listing the intact older steps); with ``fallback_to_intact`` it is moved aside to
        ``<step>.corrupt`` instead and the newest intact older step is restored, with a warning.
        The step restored is ``int(state.step)``, also kept in `restored_step`."""
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self.manager.all_steps():
            raise FileNotFoundError(f"no checkpoint step {step} in {self.directory} (steps: {self.all_steps()})")
        candidates = [step] + [s for s in reversed(self.all_steps()) if s < step]
        damaged = []
        for s in candidates:
            try:
                state = self._restore_step(s)
            except CheckpointCorruptError as e:
                if not self.fallback_to_intact:
                    e.intact_steps = self._intact_older(s)
                    older = ", ".join(e.intact_steps) or "none"
                    e.args = (
                        f"{e.args[0]}\nIntact older steps: {older}. Pass fallback_to_intact=True to the "
                        f"Checkpointer (train(..., fallback_to_intact=True)) to move step {s} aside to "
                        f"{self.step_dir(s)}{CORRUPT_SUFFIX} and resume from the newest intact one, or move "
                        "the damaged step directory away yourself.",
                    )
                    raise
                moved = self._move_aside(s)
                damaged.append(s)
                warnings.warn(
                    f"{e}\nMoved it aside to {moved} (not deleted); trying the next older step.",
                    CheckpointIntegrityWarning,
                    stacklevel=2,
                )
                continue
            if damaged:
                warnings.warn(
                    f"restored checkpoint step {s} of {self.directory} instead of damaged step(s) "
                    f"{damaged} (moved aside to <step>{CORRUPT_SUFFIX})",
                    CheckpointIntegrityWarning,
                    stacklevel=2,
                )
            self.restored_step = s
            return state
        raise CheckpointCorruptError(
            f"no intact checkpoint in {self.directory}: damaged step(s) {damaged} were moved aside to "
            f"<step>{CORRUPT_SUFFIX}",
            step=step,
            problem="no intact step",
            directory=self.directory,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _short(error: Exception, limit: int = 400) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + " ..."

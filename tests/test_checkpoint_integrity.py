"""Checkpoint integrity: fault injection into saved steps (flipped bytes, truncated files, missing
`_METADATA` or manifest, old-format steps), the fallback to the newest intact step, and the prompt
set's fingerprint. Before the integrity manifest, a flipped byte restored silently and a truncated
file or a missing `_METADATA` gave a raw TensorStore error.
"""

import json
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_training import BASE_CONFIG, target_fraction_reward, tiny_gpt2_config

from jaxrlhf.models import LanguageModel
from jaxrlhf.training import PPO, Checkpointer, CheckpointMismatchError
from jaxrlhf.training.checkpoint import (
    CORRUPT_SUFFIX,
    MANIFEST_NAME,
    CheckpointCorruptError,
    CheckpointIntegrityWarning,
    prompts_fingerprint,
    verify_step_dir,
)


@pytest.fixture(scope="module")
def setup():
    model = LanguageModel(tiny_gpt2_config())
    params = model.init_params(jax.random.PRNGKey(0))
    ppo = PPO(BASE_CONFIG, model, target_fraction_reward)
    state0 = ppo.init_state(params)
    # A second state that differs from the first in its step and its parameters.
    state1 = state0.replace(step=state0.step + 1, policy_params=jax.tree.map(lambda x: x + 1, state0.policy_params))
    return ppo, state0, state1


def save_steps(directory, ppo, states, **kwargs):
    checkpointer = Checkpointer(directory, ppo, **kwargs)
    for state in states:
        assert checkpointer.save(state, force=True)
    checkpointer.close()


def largest_data_file(step_dir):
    data_dir = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
    return max((os.path.join(data_dir, name) for name in os.listdir(data_dir)), key=os.path.getsize)


def flip_bytes(step_dir):
    path = largest_data_file(step_dir)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        chunk = f.read(8)
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    return os.path.relpath(path, step_dir)


def truncate(step_dir):
    path = largest_data_file(step_dir)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return os.path.relpath(path, step_dir)


def remove_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))
    return "state/_METADATA"


FAULTS = {
    "flipped bytes": (flip_bytes, "SHA-256 mismatch"),
    "truncated file": (truncate, "truncated"),
    "missing _METADATA": (remove_metadata, "missing"),
}


def restored_step_and_param(state):
    state = jax.device_get(state)
    return int(state.step), float(jax.tree.leaves(state.policy_params)[0].ravel()[0])


def test_saved_steps_carry_a_manifest_that_verifies(setup, tmp_path):
    ppo, state0, state1 = setup
    save_steps(tmp_path, ppo, [state0, state1])
    for step in (0, 1):
        manifest = json.load(open(tmp_path / str(step) / MANIFEST_NAME))
        assert "state/_METADATA" in manifest["files"] and "meta/metadata" in manifest["files"]
        assert any(name.startswith("state/ocdbt.process_0/d/") for name in manifest["files"])
        assert verify_step_dir(tmp_path / str(step)) is None
    checkpointer = Checkpointer(tmp_path, ppo)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointIntegrityWarning)  # verified: no warning
        state = checkpointer.restore()
    checkpointer.close()
    assert restored_step_and_param(state) == restored_step_and_param(state1)
    assert checkpointer.restored_step == 1


@pytest.mark.parametrize("fault", list(FAULTS))
def test_damaged_latest_step_raises_naming_step_file_and_intact_steps(setup, tmp_path, fault):
    ppo, state0, state1 = setup
    save_steps(tmp_path, ppo, [state0, state1])
    inject, problem = FAULTS[fault]
    damaged_file = inject(str(tmp_path / "1"))
    checkpointer = Checkpointer(tmp_path, ppo)
    assert checkpointer.latest_step() == 1
    with pytest.raises(CheckpointCorruptError) as info:
        checkpointer.restore(checkpointer.latest_step())
    checkpointer.close()
    message = str(info.value)
    assert "step 1" in message and damaged_file in message and problem in message, message
    assert "Intact older steps: 0 (verified)" in message and "fallback_to_intact=True" in message
    assert info.value.step == 1 and info.value.file == damaged_file and info.value.intact_steps == ["0 (verified)"]
    assert os.path.isdir(tmp_path / "1")  # nothing moved or deleted without the switch


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fallback_restores_newest_intact_step_and_moves_damaged_aside(setup, tmp_path, fault):
    ppo, state0, state1 = setup
    save_steps(tmp_path, ppo, [state0, state1])
    inject, _ = FAULTS[fault]
    damaged_file = inject(str(tmp_path / "1"))
    checkpointer = Checkpointer(tmp_path, ppo, fallback_to_intact=True)
    latest = checkpointer.latest_step()
    with pytest.warns(CheckpointIntegrityWarning) as record:
        state = checkpointer.restore(latest)
    messages = [str(w.message) for w in record]
    assert any(re.search(r"(?s)step 1 .*damaged.*Moved it aside to .*1\.corrupt", m) for m in messages), messages
    assert any("restored checkpoint step 0" in m and "instead of damaged step(s) [1]" in m for m in messages)
    assert restored_step_and_param(state) == restored_step_and_param(state0)
    assert checkpointer.restored_step == 0 and checkpointer.latest_step() == 0
    assert not os.path.exists(tmp_path / "1")
    moved = tmp_path / ("1" + CORRUPT_SUFFIX)
    assert os.path.exists(moved / damaged_file) or fault == "missing _METADATA"  # kept, not deleted
    assert os.path.isfile(moved / MANIFEST_NAME)
    # Training goes on from step 0 and saves step 1 again: no collision with the damaged copy.
    assert checkpointer.save(state1, force=True)
    checkpointer.close()
    checkpointer = Checkpointer(tmp_path, ppo)
    assert checkpointer.latest_step() == 1
    assert restored_step_and_param(checkpointer.restore()) == restored_step_and_param(state1)
    checkpointer.close()
    assert os.path.isdir(moved)


def test_fallback_with_every_step_damaged_raises(setup, tmp_path):
    ppo, state0, state1 = setup
    save_steps(tmp_path, ppo, [state0, state1])
    flip_bytes(str(tmp_path / "1"))
    truncate(str(tmp_path / "0"))
    checkpointer = Checkpointer(tmp_path, ppo, fallback_to_intact=True)
    with pytest.warns(CheckpointIntegrityWarning), pytest.raises(CheckpointCorruptError, match="no intact checkpoint"):
        checkpointer.restore()
    checkpointer.close()
    assert os.path.isdir(tmp_path / ("0" + CORRUPT_SUFFIX)) and os.path.isdir(tmp_path / ("1" + CORRUPT_SUFFIX))


def test_removed_manifest_is_an_error(setup, tmp_path):
    ppo, state0, state1 = setup
    save_steps(tmp_path, ppo, [state0, state1])
    os.remove(tmp_path / "1" / MANIFEST_NAME)
    checkpointer = Checkpointer(tmp_path, ppo)
    with pytest.raises(CheckpointCorruptError, match=f"(?s){MANIFEST_NAME}: missing.*Intact older steps: 0"):
        checkpointer.restore()
    checkpointer.close()


def save_old_format(directory, ppo, state, checkpointer_metadata):
    """A step as the code before manifests wrote it: no manifest, no integrity key in ``meta``."""
    meta = {k: v for k, v in checkpointer_metadata.items() if k not in ("integrity", "prompts_fingerprint")}
    manager = ocp.CheckpointManager(os.fspath(directory), options=ocp.CheckpointManagerOptions(create=True))
    manager.save(
        int(state.step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
    )
    manager.wait_until_finished()
    manager.close()


def test_old_format_step_restores_with_a_warning_and_its_read_errors_are_clear(setup, tmp_path):
    ppo, state0, state1 = setup
    metadata = Checkpointer(tmp_path / "probe", ppo).metadata
    save_old_format(tmp_path / "old", ppo, state0, metadata)
    save_old_format(tmp_path / "old", ppo, state1, metadata)
    assert not os.path.exists(tmp_path / "old" / "1" / MANIFEST_NAME)
    checkpointer = Checkpointer(tmp_path / "old", ppo)
    with pytest.warns(CheckpointIntegrityWarning, match="no integrity manifest"):
        state = checkpointer.restore()
    assert restored_step_and_param(state) == restored_step_and_param(state1)
    # Without a manifest a flipped byte cannot be seen, but Orbax's read errors become clear ones.
    remove_metadata(str(tmp_path / "old" / "1"))
    with (
        pytest.warns(CheckpointIntegrityWarning),
        pytest.raises(CheckpointCorruptError, match=r"(?s)step 1 .*Orbax could not read the state"),
    ):
        checkpointer.restore()
    checkpointer.close()
    fallback = Checkpointer(tmp_path / "old", ppo, fallback_to_intact=True)
    with pytest.warns(CheckpointIntegrityWarning):
        assert restored_step_and_param(fallback.restore()) == restored_step_and_param(state0)
    fallback.close()
    assert os.path.isdir(tmp_path / "old" / ("1" + CORRUPT_SUFFIX))


def test_different_prompt_set_is_refused_unless_allowed(setup, tmp_path):
    ppo, state0, _ = setup
    ids = np.arange(24, dtype=np.int32).reshape(6, 4) % 15
    mask = np.ones_like(ids)
    fingerprint = prompts_fingerprint(ids, mask)
    save_steps(tmp_path, ppo, [state0], prompts_fingerprint=fingerprint)

    same = Checkpointer(tmp_path, ppo, prompts_fingerprint=prompts_fingerprint(ids.astype(np.int64), mask))
    assert int(same.restore().step) == 0
    same.close()
    other_ids = ids.copy()
    other_ids[2, 1] += 1
    other = prompts_fingerprint(other_ids, mask)
    refused = Checkpointer(tmp_path, ppo, prompts_fingerprint=other)
    with pytest.raises(CheckpointMismatchError, match=r"different prompt set.*allow_different_prompts=True"):
        refused.restore()
    refused.close()
    allowed = Checkpointer(tmp_path, ppo, prompts_fingerprint=other, allow_different_prompts=True)
    with pytest.warns(CheckpointIntegrityWarning, match="different prompt set"):
        assert int(allowed.restore().step) == 0
    allowed.close()
    unknown = Checkpointer(tmp_path, ppo)  # no fingerprint given: nothing to compare
    assert int(unknown.restore().step) == 0
    unknown.close()


def test_prompts_fingerprint_sees_values_mask_and_shape_not_dtype():
    ids = np.arange(12).reshape(3, 4)
    mask = np.ones_like(ids)
    base = prompts_fingerprint(ids, mask)
    assert base.startswith("sha256:") and base == prompts_fingerprint(ids.astype(np.int32), mask.astype(bool))
    assert base == prompts_fingerprint(jnp.asarray(ids), jnp.asarray(mask))
    mask2 = mask.copy()
    mask2[0, 0] = 0
    assert (
        len(
            {
                base,
                prompts_fingerprint(ids + 1, mask),
                prompts_fingerprint(ids, mask2),
                prompts_fingerprint(ids.reshape(4, 3), mask.reshape(4, 3)),
            }
        )
        == 4
    )


def test_kill_mid_save_leaves_only_a_temporary_directory_that_is_ignored(setup, tmp_path):
    """A save killed before Orbax's commit leaves ``<step>.orbax-checkpoint-tmp-*`` (here: a copy of
    step 1 without its manifest, as the manifest is written last, just before the rename)."""
    import shutil

    ppo, state0, state1 = setup
    save_steps(tmp_path, ppo, [state0, state1])
    partial = tmp_path / "2.orbax-checkpoint-tmp-1234567890"
    shutil.copytree(tmp_path / "1", partial)
    os.remove(partial / MANIFEST_NAME)
    os.remove(partial / "commit_success.txt")
    checkpointer = Checkpointer(tmp_path, ppo)
    assert checkpointer.latest_step() == 1
    assert restored_step_and_param(checkpointer.restore()) == restored_step_and_param(state1)
    checkpointer.close()

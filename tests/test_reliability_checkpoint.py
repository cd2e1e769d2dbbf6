"""Reliability of checkpoints: kill -9 in the middle of saves, corrupted files, full disks, crashes while pruning.

Module-level cases fork a child that calls model.checkpoint on a few-MB state and kill it; trainer-level cases run
the real entry point (`train_video_pred.main`, in this process, one rank; or as a subprocess when it must die).
Each test records its figures (trials, faults survived, seconds, bytes lost) with `record`.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import re
import signal
import time

import pytest
import torch

from helpers import one_torch_thread  # noqa: F401  (autouse: one intra-op thread)
from reliability_helpers import (TRAINING_STATE, ckpt_files, cli, differences, make_world, record,  # noqa: F401
                                 run_to_end, temp_files)
import faults
from model.checkpoint import (LATEST, CheckpointError, checkpoint_name, clean_leftovers, list_checkpoints,
                                 load_checkpoint, read_latest_pointer, resolve_resume, save_checkpoint, verify)

FORK = multiprocessing.get_context("fork")  # the child inherits the imports: a kill trial costs milliseconds


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("ckpt_world"))


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def step_of(path) -> int:
    return int(path.stem.split("_")[1])


# ---------------------------------------------------------------------------------------------- 1. kill -9 in saves

def _save_forever(folder: str, payload: torch.Tensor, first_step: int) -> None:
    step = first_step
    while True:
        save_checkpoint({"step": step, "payload": payload}, folder, step, keep_last=3)
        step += 1


def test_kill9_at_random_moments_during_saves_always_leaves_the_previous_checkpoint(tmp_path):
    """20 trials: a child saves an 8 MB state in a loop and is SIGKILLed at a random moment (every second trial: just
    after a temp file appears, i.e. mid-write). After each kill: every file under a final name verifies, the resumed
    checkpoint is at least as new as the last one found and holds the exact payload, and leftovers are cleaned."""
    folder = tmp_path / "ckpt"
    payload = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0))  # 8 MB
    rng = random.Random(0)
    trials, mid_write, removed_total, committed, t0 = 20, 0, 0, 0, time.monotonic()
    for trial in range(trials):
        child = FORK.Process(target=_save_forever, args=(str(folder), payload, committed + 1), daemon=True)
        child.start()
        if trial % 2:
            deadline = time.monotonic() + 20
            while not any(p.name.startswith(".ckpt_") for p in temp_files(folder)) and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(rng.uniform(0, 0.002))
        else:
            time.sleep(rng.uniform(0.02, 0.5))
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        assert child.exitcode == -signal.SIGKILL

        leftovers = temp_files(folder)
        mid_write += any(p.name.startswith(".ckpt_") for p in leftovers)
        for path in list_checkpoints(folder):  # no partial file under a final name
            assert verify(path) is None, f"trial {trial}: {path.name} is under a final name but {verify(path)}"
        assert sorted(clean_leftovers(folder)) == leftovers and temp_files(folder) == []
        removed_total += len(leftovers)
        found = resolve_resume(folder)
        if committed:
            assert found is not None, f"trial {trial}: the checkpoint of step {committed} is gone"
        if found is not None:
            path, state = found
            assert state["step"] == step_of(path) >= committed, f"trial {trial}: resumed {path.name} < {committed}"
            assert torch.equal(state["payload"], payload)
            committed = state["step"]
    assert mid_write >= trials // 2 - 2, f"only {mid_write} of {trials} kills hit a write"
    record("1 kill -9 during saves (module)", trials=trials, kills_mid_write=mid_write, faults_survived=trials,
           leftovers_cleaned=removed_total, checkpoints_committed=committed, bytes_lost=0,
           seconds=round(time.monotonic() - t0, 1))


@pytest.mark.slow  # a subprocess (imports paid again)
def test_trainer_killed_in_the_middle_of_its_save_resumes_from_the_previous_one(world, tmp_path, cli):
    """A real run SIGKILLs itself half-way through writing the step-4 checkpoint (fault point save_crash); the next
    start removes the temp file and resumes from step 2, ending exactly where an uninterrupted run ends."""
    cfg = world.yaml(tmp_path / "c.yaml", tmp_path / "runs", "t", **{"train.max_steps": 6})
    run_dir = tmp_path / "runs" / "t"
    rc, run = run_to_end(["--config", str(cfg)], tmp_path, faults="save_crash:step=4")
    assert rc == -signal.SIGKILL and "VP_FAULTS: save_crash at step 4" in run.out, run.tail()
    folder = run_dir / "checkpoints"
    assert sorted(ckpt_files(run_dir)) == [2] and read_latest_pointer(folder).name == checkpoint_name(2)
    (leftover,) = temp_files(folder)
    assert leftover.name.startswith(".ckpt_000000004.pt.tmp.")
    full = (folder / checkpoint_name(2)).stat().st_size
    partial = leftover.stat().st_size
    assert 0 < partial < full  # really a partial write

    assert cli("--config", cfg, "--resume", "latest") == 0
    assert temp_files(folder) == []
    assert cli("--config", cfg, "logging.name=uninterrupted") == 0
    ref = load_checkpoint(ckpt_files(tmp_path / "runs" / "uninterrupted")[6])
    assert differences(load_checkpoint(ckpt_files(run_dir)[6]), ref, TRAINING_STATE) == []
    record("1 trainer killed mid-save", trials=1, faults_survived=1, partial_bytes_removed=partial,
           seconds_to_die=round(run.seconds, 1), bytes_lost=0)


# ---------------------------------------------------------------------------------------------- 2. corrupted files

def _three_checkpoints(folder):
    for step in (1, 2, 3):
        save_checkpoint({"step": step, "w": torch.full((1000,), float(step))}, folder, step, keep_last=5)
    return [folder / checkpoint_name(s) for s in (1, 2, 3)]


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_byte(p):
    data = bytearray(p.read_bytes())
    data[len(data) // 3] ^= 0x01
    p.write_bytes(bytes(data))


def _strip_footer(p):
    p.write_bytes(p.read_bytes()[:-97])  # the payload alone, as if the write stopped before the commit marker


@pytest.mark.parametrize("corrupt", [_truncate, _flip_byte, _strip_footer], ids=["truncated", "flipped", "no_marker"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_with_a_warning_naming_it(tmp_path, corrupt):
    ck = _three_checkpoints(tmp_path)
    corrupt(ck[2])
    with pytest.warns(UserWarning, match=re.escape(str(ck[2]))):
        path, state = resolve_resume(tmp_path)
    assert path == ck[1] and state["step"] == 2


@pytest.mark.parametrize("pointer", [b"ckpt_000000099.pt\n", b"\x00\xff garbage", b""], ids=["missing", "garbage", "empty"])
def test_bad_latest_pointer_falls_back_to_the_newest_valid_with_a_warning(tmp_path, pointer):
    ck = _three_checkpoints(tmp_path)
    (tmp_path / LATEST).write_bytes(pointer)
    with pytest.warns(UserWarning, match=re.escape(str(tmp_path / LATEST))):
        path, state = resolve_resume(tmp_path)
    assert path == ck[2] and state["step"] == 3


def test_no_valid_checkpoint_fails_listing_every_bad_file_instead_of_starting_over(tmp_path):
    ck = _three_checkpoints(tmp_path)
    for p, corrupt in zip(ck, (_truncate, _flip_byte, _strip_footer)):
        corrupt(p)
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="refusing to start over") as e:
        resolve_resume(tmp_path)
    for p, why in zip(ck, ("truncated", "checksum mismatch", "no commit marker")):
        assert re.search(rf"{p.name}: [^;]*{why}", str(e.value)), str(e.value)


def test_cli_resume_skips_a_corrupt_checkpoint_and_refuses_when_none_is_valid(world, tmp_path, cli, capfd):
    cfg = world.yaml(tmp_path / "c.yaml", tmp_path / "runs", "c", **{"train.max_steps": 4})
    run_dir = tmp_path / "runs" / "c"
    assert cli("--config", cfg) == 0
    _flip_byte(ckpt_files(run_dir)[4])
    capfd.readouterr()
    with pytest.warns(UserWarning, match=re.escape(str(ckpt_files(run_dir)[4]))):
        assert cli("--config", cfg, "--resume", "latest", "train.max_steps=6") == 0
    assert re.search(r"resumed from \S*ckpt_000000002\.pt at step 2", capfd.readouterr().out)
    assert sorted(ckpt_files(run_dir)) == [2, 4, 6] and all(verify(p) is None for p in ckpt_files(run_dir).values())

    for p in ckpt_files(run_dir).values():
        _strip_footer(p)
    before = sorted(os.listdir(run_dir / "checkpoints")), (run_dir / "metrics.jsonl").read_bytes()
    with pytest.warns(UserWarning):
        assert cli("--config", cfg, "--resume", "latest", "train.max_steps=8") == 2
    err = capfd.readouterr().err
    assert "[rank 0] resume error: no valid checkpoint in" in err and "refusing to start over" in err, err
    assert (sorted(os.listdir(run_dir / "checkpoints")), (run_dir / "metrics.jsonl").read_bytes()) == before
    record("2 corrupt checkpoints", trials=3 + 3 + 1 + 2, fallbacks=7, refusals=2)


# ---------------------------------------------------------------------------------------------- 11. disk full

def _save_under_file_size_limit(folder: str, limit: int, q) -> None:
    import resource
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        save_checkpoint({"step": 2, "w": torch.zeros(limit)}, folder, 2)  # 4 x limit bytes
        q.put("saved")
    except CheckpointError as e:
        q.put(str(e))


def test_a_failing_write_rlimit_fsize_keeps_the_previous_checkpoint_and_removes_the_temp_file(tmp_path):
    save_checkpoint({"step": 1, "w": torch.ones(1000)}, tmp_path, 1)
    before = sha(tmp_path / checkpoint_name(1))
    q = FORK.Queue()
    child = FORK.Process(target=_save_under_file_size_limit, args=(str(tmp_path), 1 << 20, q))
    child.start()
    child.join(60)
    message = q.get(timeout=5)
    assert child.exitcode == 0
    assert re.search(r"could not write \S*ckpt_000000002\.pt: File too large .*previous checkpoint is intact", message)
    assert sha(tmp_path / checkpoint_name(1)) == before
    assert read_latest_pointer(tmp_path).name == checkpoint_name(1)
    assert list_checkpoints(tmp_path) == [tmp_path / checkpoint_name(1)] and temp_files(tmp_path) == []
    record("11 disk full (RLIMIT_FSIZE)", trials=1, faults_survived=1, bytes_lost=0, temp_files_left=0)


def test_disk_full_fault_in_a_single_process_run_fails_clearly(world, tmp_path, cli, capfd, monkeypatch):
    cfg = world.yaml(tmp_path / "c.yaml", tmp_path / "runs", "d")
    monkeypatch.setenv("VP_FAULTS", "disk_full:step=4")
    assert cli("--config", cfg) == 1
    err = capfd.readouterr().err
    assert re.search(r"\[rank 0\] error: CheckpointError: could not write \S*ckpt_000000004\.pt: No space left on "
                     r"device \(disk full or not writable\?\); the previous checkpoint is intact", err), err
    run_dir = tmp_path / "runs" / "d"
    assert sorted(ckpt_files(run_dir)) == [2] and verify(ckpt_files(run_dir)[2]) is None
    assert temp_files(run_dir / "checkpoints") == []


# ---------------------------------------------------------------------------------------------- 13. retention

def test_keep_last_never_deletes_the_checkpoint_resumed_from(world, tmp_path, cli):
    cfg = world.yaml(tmp_path / "c.yaml", tmp_path / "runs", "k",
                     **{"train.max_steps": 4, "checkpoint.every": 1, "checkpoint.keep_last": 2})
    run_dir = tmp_path / "runs" / "k"
    assert cli("--config", cfg) == 0
    assert sorted(ckpt_files(run_dir)) == [3, 4]
    assert cli("--config", cfg, "--resume", "latest", "train.max_steps=7") == 0
    assert sorted(ckpt_files(run_dir)) == [4, 6, 7]  # 4 was resumed from: kept although not among the last 2
    resumed_from = ckpt_files(run_dir)[4]
    assert verify(resumed_from) is None
    assert cli("--config", cfg, "--resume", str(resumed_from), "logging.name=k2", "train.max_steps=6") == 0
    assert ckpt_files(tmp_path / "runs" / "k2") == {5: tmp_path / "runs" / "k2" / "checkpoints" / checkpoint_name(5),
                                                    6: tmp_path / "runs" / "k2" / "checkpoints" / checkpoint_name(6)}
    assert verify(resumed_from) is None  # resuming from a path in another run folder never touches it


def _save_with_fault(folder: str, step: int, keep_last: int, spec: str) -> None:
    os.environ["VP_FAULTS"] = spec
    faults.install()  # in this forked child only
    save_checkpoint({"step": step, "w": torch.full((250_000,), float(step))}, folder, step, keep_last=keep_last)


def test_crash_in_the_middle_of_pruning_leaves_latest_valid(tmp_path):
    """Steps 1-5 are on disk; saving step 6 with keep_last=2 must delete 1-4; the process is SIGKILLed right after
    the 1st, 2nd, 3rd deletion. `latest` names step 6, every remaining file verifies, and the next save finishes."""
    trials = 3
    for trial in range(trials):
        folder = tmp_path / f"t{trial}"
        for step in range(1, 6):
            save_checkpoint({"step": step, "w": torch.full((250_000,), float(step))}, folder, step, keep_last=10)
        child = FORK.Process(target=_save_with_fault, args=(str(folder), 6, 2, f"prune_crash:step=6:nth={trial + 1}"))
        child.start()
        child.join(30)
        assert child.exitcode == -signal.SIGKILL
        remaining = sorted(step_of(p) for p in list_checkpoints(folder))
        assert remaining == list(range(trial + 2, 7))  # deleted 1 .. trial+1, then died
        assert read_latest_pointer(folder).name == checkpoint_name(6)
        assert all(verify(p) is None for p in list_checkpoints(folder))
        path, state = resolve_resume(folder)
        assert state["step"] == 6
        save_checkpoint({"step": 7, "w": torch.zeros(10)}, folder, 7, keep_last=2)
        assert [step_of(p) for p in list_checkpoints(folder)] == [6, 7]
    record("13 prune crash", trials=trials, faults_survived=trials, latest_valid_after_every_crash=True, bytes_lost=0)

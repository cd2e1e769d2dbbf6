"""Reliability under torchrun with 2 gloo ranks on CPU: ranks killed, signalled, raising, stalling, producing NaN,
disks filling up. Faults are injected at named points through VP_FAULTS (tests/faults.py, installed by
tests/fault_launcher.py before it calls main); every run is the real command line, and every interrupted run must
end with exactly the state of an uninterrupted one.

Each test records its figures (trials, faults survived, seconds to exit, bytes lost) with `record`.
"""
from __future__ import annotations

import os
import re
import signal
import time

import pytest

from reliability_helpers import (TRAINING_STATE, ckpt_files, differences, launch, make_world, record, run_to_end,
                                 temp_files)
from model.checkpoint import list_checkpoints, load_checkpoint, read_latest_pointer, verify

pytestmark = pytest.mark.slow  # every test here starts torchrun (3 processes)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("ddp_world"))


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """An uninterrupted 2-rank run of 8 steps with a checkpoint after every step: {step: state}."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = world.yaml(tmp / "ref.yaml", tmp / "runs", "ref", **{"checkpoint.every": 1, "checkpoint.keep_last": 10})
    rc, run = run_to_end(["--config", str(cfg)], tmp, nproc=2)
    assert rc == 0, run.tail()
    return {step: load_checkpoint(p) for step, p in ckpt_files(tmp / "runs" / "ref").items()}


def bad_bytes(run_dir) -> int:
    """Bytes of files under a checkpoint's final name that do not verify (committed state that was lost)."""
    return sum(p.stat().st_size for p in list_checkpoints(run_dir / "checkpoints") if verify(p) is not None)


def latest_step(run_dir) -> int:
    path = read_latest_pointer(run_dir / "checkpoints")
    assert path is not None and verify(path) is None, f"latest pointer {path} is not a valid checkpoint"
    return int(path.stem.split("_")[1])


def test_rank_killed_mid_training_torchrun_restarts_and_ends_bit_identical(world, reference, tmp_path):
    """kill -9 of rank 1 at step 5 on the first attempt; torchrun --max-restarts=1 reruns `--resume latest`.
    In the second attempt rank 1 joins the process group 3 s late (it must not meet the first attempt's addresses)."""
    cfg = world.yaml(tmp_path / "c.yaml", tmp_path / "runs", "r")
    rc, run = run_to_end(["--config", str(cfg), "--resume", "latest"], tmp_path, nproc=2,
                         faults="kill:rank=1:step=5:attempt=0,join_late:rank=1:attempt=1:secs=3",
                         torchrun_args=("--max-restarts=1",))
    assert rc == 0, run.tail()
    assert run.time_of(r"\[rank 1\] VP_FAULTS: kill at step 5") is not None, "the fault never fired"
    assert re.search(r"exitcode: -9\).*local_rank: 1", run.out), run.tail()
    assert run.time_of(r"resumed from \S*ckpt_000000004\.pt at step 4") is not None, run.tail()
    final = load_checkpoint(ckpt_files(tmp_path / "runs" / "r")[8])
    assert differences(final, reference[8], TRAINING_STATE) == []
    record("3 restart", trials=1, faults_survived=1, seconds_total=round(run.seconds, 1),
           steps_redone=5 - 4, bytes_lost=bad_bytes(tmp_path / "runs" / "r"), bitwise_equal=True)


def test_sigterm_to_one_rank_to_the_launcher_and_during_a_save_then_bit_identical(world, reference, tmp_path):
    """Three launches of one run: SIGTERM to rank 1 at step 1; SIGTERM to the launcher while rank 0 writes the
    step-4 checkpoint; then the rest. Each stop must save on every rank and exit 143 within 30 s. A stop request
    travels in the flags of the step it reaches, read at the end of the step after it (or at once when a job is due
    then): the step-1 notice stops at step 2, the one during the step-4 save at step 6."""
    run_dir = tmp_path / "runs" / "p"
    args = ["--config", str(world.yaml(tmp_path / "c.yaml", tmp_path / "runs", "p")), "--resume", "latest"]

    # 1. one rank gets SIGTERM (a preemption notice to a single host)
    rc, run = run_to_end(args, tmp_path, nproc=2, faults="sigterm:rank=1:step=1")
    t_signal = run.time_of(r"\[rank 1\] VP_FAULTS: sigterm at step 1")
    assert rc != 0 and t_signal is not None, run.tail()
    for rank in (0, 1):
        assert f"[rank {rank}] stop requested (SIGTERM/SIGUSR1/SIGINT): saved step 2" in run.out, run.tail()
    assert "exitcode: 143" in run.out, run.tail()
    one_rank_s = run.seconds - t_signal
    assert one_rank_s < 30
    assert latest_step(run_dir) == 2

    # 2. the launcher gets SIGTERM while rank 0 is in the middle of writing the step-4 checkpoint
    run = launch(args, tmp_path, nproc=2, faults="save_sleep:step=4:secs=4")
    deadline = time.monotonic() + 180
    while not any(p.name.startswith(".ckpt_000000004.pt.tmp") for p in temp_files(run_dir / "checkpoints")):
        assert run.proc.poll() is None and time.monotonic() < deadline, run.tail()
        time.sleep(0.05)
    t_signal = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    rc = run.wait(60)
    launcher_s = run.t_exit - t_signal
    assert rc != 0 and launcher_s < 30, run.tail()
    assert run.out.count("stop requested (SIGTERM/SIGUSR1/SIGINT): saved step 6") == 2, run.tail()  # both ranks
    assert verify(run_dir / "checkpoints" / "ckpt_000000004.pt") is None  # the interrupted save completed
    assert latest_step(run_dir) == 6
    assert temp_files(run_dir / "checkpoints") == []

    # 3. the rest of the run
    rc, run = run_to_end(args, tmp_path, nproc=2)
    assert rc == 0, run.tail()
    assert run.time_of(r"resumed from \S*ckpt_000000006\.pt at step 6") is not None, run.tail()
    assert differences(load_checkpoint(ckpt_files(run_dir)[8]), reference[8], TRAINING_STATE) == []
    record("4 sigterm", trials=3, faults_survived=2, seconds_to_exit_one_rank=round(one_rank_s, 1),
           seconds_to_exit_launcher_during_save=round(launcher_s, 1), bytes_lost=bad_bytes(run_dir),
           bitwise_equal=True)


def test_one_rank_raises_the_job_exits_naming_rank_and_cause(world, tmp_path):
    """dist_timeout_s = 60: a collective on the error path would hold the job for a minute; it must not."""
    cfg = world.yaml(tmp_path / "c.yaml", tmp_path / "runs", "x", **{"ddp.timeout_s": 60})
    rc, run = run_to_end(["--config", str(cfg)], tmp_path, nproc=2, faults="raise:rank=1:step=3", timeout=150)
    assert rc != 0
    t_error = run.time_of(r"\[rank 1\] error: RuntimeError: injected fault: raise at step 3 on rank 1")
    assert t_error is not None, run.tail()
    exit_s = run.seconds - t_error
    assert exit_s < 20, f"job took {exit_s:.1f} s to end after rank 1 failed"
    record("5 raise", trials=1, seconds_to_exit_after_error=round(exit_s, 1), seconds_total=round(run.seconds, 1))


def test_stalled_rank_ends_the_job_within_the_dist_timeout(world, tmp_path):
    cfg = world.yaml(tmp_path / "c.yaml", tmp_path / "runs", "s", **{"ddp.timeout_s": 10})
    rc, run = run_to_end(["--config", str(cfg)], tmp_path, nproc=2, faults="sleep:rank=1:step=3:secs=600",
                         timeout=150)
    t_stall = run.time_of(r"\[rank 1\] VP_FAULTS: sleep at step 3")
    assert rc != 0 and t_stall is not None, run.tail()
    exit_s = run.seconds - t_stall
    assert exit_s < 10 + 8, f"job took {exit_s:.1f} s to end after rank 1 stalled (dist_timeout_s=10)\n{run.tail()}"
    assert re.search(r"\[rank 1\].*stall", run.out), run.tail()  # the stalled rank is named
    record("6 stall", trials=1, dist_timeout_s=10, seconds_to_exit_after_stall=round(exit_s, 1))


def test_dataloader_worker_death_ends_the_job(world, tmp_path):
    cfg = world.yaml(tmp_path / "c.yaml", tmp_path / "runs", "w",
                     **{"ddp.timeout_s": 10, "data.num_workers": 1})
    rc, run = run_to_end(["--config", str(cfg)], tmp_path, nproc=2, faults="worker_kill:rank=1", timeout=150)
    assert rc != 0
    t_error = run.time_of(r"\[rank 1\] error: .*DataLoader worker")
    assert t_error is not None, run.tail()
    record("6 worker death", trials=1, dist_timeout_s=10, seconds_total=round(run.seconds, 1),
           seconds_to_exit_after_error=round(run.seconds - t_error, 1))
    assert run.seconds - t_error < 10 + 8


def test_nonfinite_loss_halt_stops_both_ranks_before_the_optimizer_step(world, tmp_path):
    cfg = world.yaml(tmp_path / "c.yaml", tmp_path / "runs", "h", **{"checkpoint.every": 1, "checkpoint.keep_last": 10,
                                                                     "train.nonfinite": "halt"})
    rc, run = run_to_end(["--config", str(cfg)], tmp_path, nproc=2, faults="nan_loss:rank=1:step=3")
    assert rc != 0
    for rank in (0, 1):
        assert re.search(rf"\[rank {rank}\] training halted: non-finite loss or gradient at step 3", run.out), \
            run.tail()
    assert max(ckpt_files(tmp_path / "runs" / "h")) == 3  # nothing after the bad step was applied or saved
    record("7 halt", trials=1, seconds_total=round(run.seconds, 1))


def test_nonfinite_loss_skip_leaves_weights_ema_optimizer_and_lr_bit_identical(world, reference, tmp_path):
    """Rank 1's loss is NaN at step 3 (0-based) and rank 0 gets SIGTERM in the same step: that step's update is
    masked and it is saved under its number, 4. Its weights and AdamW moments must equal the uninterrupted run's
    step-3 state bit for bit; the LR schedule and data position advanced as in the uninterrupted run's step 4."""
    cfg = world.yaml(tmp_path / "c.yaml", tmp_path / "runs", "k", **{"checkpoint.every": 1, "checkpoint.keep_last": 10,
                                                                     "train.nonfinite": "skip"})
    rc, run = run_to_end(["--config", str(cfg)], tmp_path, nproc=2,
                         faults="nan_loss:rank=1:step=3,sigterm:rank=0:step=3")
    assert rc != 0 and re.search(r"step skipped.*\(1/10 in a row\)", run.out), run.tail()
    assert run.out.count("stop requested (SIGTERM/SIGUSR1/SIGINT): saved step 4") == 2, run.tail()
    skipped = load_checkpoint(ckpt_files(tmp_path / "runs" / "k")[4])
    moments = {"unet": skipped["unet"], "moments": skipped["optimizer"]["state"]}
    assert differences(moments, {"unet": reference[3]["unet"], "moments": reference[3]["optimizer"]["state"]},
                       ("unet", "moments")) == []
    assert differences(skipped, reference[4], ("lr_scheduler", "step", "epoch", "position")) == []
    assert skipped["ema"]["optimization_step"] == reference[3]["ema"]["optimization_step"] + 1  # EMA stepped
    assert skipped["nonfinite_skips"] == 1
    record("7 skip", trials=1, skipped_steps=1, bitwise_equal_sections=["unet", "ema", "optimizer", "lr_scheduler"])


def test_disk_full_during_a_save_keeps_the_previous_checkpoint_and_all_ranks_agree(world, reference, tmp_path):
    cfg = world.yaml(tmp_path / "c.yaml", tmp_path / "runs", "d")
    rc, run = run_to_end(["--config", str(cfg)], tmp_path, nproc=2, faults="disk_full:step=4")
    run_dir = tmp_path / "runs" / "d"
    assert rc != 0
    for rank in (0, 1):
        assert re.search(rf"\[rank {rank}\] error: CheckpointError: could not write \S*ckpt_000000004\.pt: "
                         r"No space left on device", run.out), run.tail()
    assert sorted(ckpt_files(run_dir)) == [2] and latest_step(run_dir) == 2
    assert temp_files(run_dir / "checkpoints") == []
    assert differences(load_checkpoint(ckpt_files(run_dir)[2]), reference[2], TRAINING_STATE) == []
    record("11 disk full (torchrun)", trials=1, seconds_total=round(run.seconds, 1), bytes_lost=bad_bytes(run_dir),
           temp_files_left=0)


def test_config_error_under_torchrun_is_identical_on_both_ranks(world, tmp_path):
    """6 clips per step over 2 ranks x 2 accumulation steps does not divide: both ranks say so, before any group."""
    cfg = world.yaml(tmp_path / "c.yaml", tmp_path / "runs", "c",
                     **{"train.batch_size": 6, "train.grad_accum_steps": 2})
    logs = tmp_path / "logs"
    rc, run = run_to_end(["--config", str(cfg)], tmp_path, nproc=2, timeout=120,
                         torchrun_args=("--log-dir", str(logs), "--redirects", "2"))
    assert rc != 0 and "exitcode: 2" in run.out, run.tail()
    stderr = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
    assert sorted(stderr) == [0, 1], run.tail()
    for rank, text in stderr.items():
        assert text.startswith(f"[rank {rank}] config error: "), text
    assert stderr[0].split("] ", 1)[1] == stderr[1].split("] ", 1)[1]
    assert "train.batch_size: 6 (global) is not divisible by 2 ranks x train.grad_accum_steps=2" in stderr[0]
    assert not (tmp_path / "runs").exists()  # nothing was created: no run folder, no process group
    record("9 config under torchrun", trials=1, seconds_total=round(run.seconds, 1))


def test_wandb_without_a_network_on_rank_0_never_times_out_the_other_rank(world, tmp_path):
    """Issue 16 item 5: rank 0's wandb.init stalls 15 s (online, no network) while ddp.timeout_s is 10; wandb starts
    in its own thread, so rank 1's first collective does not wait for it, and it is given up after its deadline."""
    cfg = world.yaml(tmp_path / "c.yaml", tmp_path / "runs", "wb", **{
        "ddp.timeout_s": 10, "logging.wandb.mode": "online", "logging.wandb.init_timeout_s": 12,
        "train.max_steps": 4})
    rc, run = run_to_end(["--config", str(cfg)], tmp_path, nproc=2, faults="wandb_init_sleep:rank=0:secs=15",
                         timeout=150)
    assert rc == 0, run.tail()
    assert run.time_of(r"\[rank 0\] VP_FAULTS: wandb_init_sleep") is not None, "the fault never fired"
    assert "wandb did not start within logging.wandb.init_timeout_s=12 s" in run.out, run.tail()
    assert sorted(ckpt_files(tmp_path / "runs" / "wb")) == [2, 4]
    record("issue16 5 wandb", dist_timeout_s=10, wandb_stall_s=15, seconds_total=round(run.seconds, 1))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_whole_process_group_with_loader_workers_saves(world, tmp_path, sig):
    """`timeout`, Slurm's scancel and Ctrl-C in a terminal signal every process of the job at once: torchrun, the
    ranks and their DataLoader workers. The workers must leave the stop to their rank (a worker dying of the signal
    made the rank fail with 'DataLoader worker ... is killed by signal' instead of saving): every rank saves the
    step it reached and the run exits as a stop request does."""
    cfg = world.yaml(tmp_path / "c.yaml", tmp_path / "runs", "g",
                     **{"data.num_workers": 2, "train.max_steps": 10_000, "checkpoint.every": 10_000})
    run = launch(["--config", str(cfg)], tmp_path, nproc=2)
    deadline = time.monotonic() + 180
    metrics = tmp_path / "runs" / "g" / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count('"loss"') >= 3):  # training, the workers running
        assert run.proc.poll() is None and time.monotonic() < deadline, run.tail()
        time.sleep(0.1)
    os.killpg(run.proc.pid, sig)
    rc = run.wait(90)
    assert "is killed by signal" not in run.out, run.tail()
    saved = [int(s) for s in re.findall(r"\[rank 0\] stop requested \(SIGTERM/SIGUSR1/SIGINT\): saved step (\d+)",
                                        run.out)]
    assert rc != 0 and saved, run.tail()
    assert f"[rank 1] stop requested (SIGTERM/SIGUSR1/SIGINT): saved step {saved[0]}" in run.out, run.tail()
    assert latest_step(tmp_path / "runs" / "g") == saved[0]

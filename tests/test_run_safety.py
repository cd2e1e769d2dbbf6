"""Issue 16, the trainer's half: a frame size the VAE cannot divide refused before the scan, the final checkpoint
saved before the final pictures and evaluation, an existing run folder never mixed with a new run, Ctrl-C saving
like SIGTERM with the saved step in metrics.jsonl, resumes that say what changed and apply or refuse it, expected
errors in one line. Real runs of the tiny trainer world (tests/trainer_helpers.py), in this process."""
from __future__ import annotations

import errno
import shutil
import signal
import time
from pathlib import Path

import pytest

import faults
import train_video_pred
import video_prediction_trainer
from helpers import one_torch_thread  # noqa: F401  (autouse fixture: one intra-op thread)
from model import checkpoint as ckpt
from training import tracking
from trainer_helpers import make_world, read_jsonl, write_yaml


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("run_safety_world"))


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.delenv("VP_FAULTS", raising=False)
    faults.install(monkeypatch)
    monkeypatch.setenv("WANDB_SILENT", "true")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def run_main(world, tmp_path: Path, name: str, *flags: str, **dotted) -> tuple[int, Path]:
    """`main([--config <yaml>, FLAGS])` in this process; returns (exit code, run folder)."""
    cfg = write_yaml(tmp_path / f"{name}.yaml", world.config(tmp_path / "runs", **{"logging.name": name, **dotted}))
    return train_video_pred.main(["--config", str(cfg), "--device", "cpu", *flags]), tmp_path / "runs" / name


def checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("ckpt_*.pt"))


# ---------------------------------------------------------------- item 4: frame size; the final save comes first

def test_a_frame_size_the_vae_and_unet_do_not_divide_is_refused_before_the_scan(world, tmp_path, capsys):
    # the tiny VAE downsamples 2x; four UNet levels halve 3 more times: frames must be multiples of 16
    rc, run = run_main(world, tmp_path, "size", **{"data.height": 24, "unet.block_out_channels": [8, 8, 8, 8],
                                                   "unet.attention": [False] * 4})
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "data.height: 24" in err and "multiple of 16" in err and "data.width" not in err, err
    assert "Traceback" not in err and not run.exists()  # refused before the run folder and the scan


def test_the_final_checkpoint_is_saved_before_the_final_pictures(world, tmp_path, monkeypatch, capsys):
    def broken(self, force=False):
        if force:
            raise RuntimeError("sampling failed")
    monkeypatch.setattr(video_prediction_trainer.Trainer, "visualize", broken)
    rc, run = run_main(world, tmp_path, "final", **{"train.max_steps": 2})
    assert rc == 1 and "sampling failed" in capsys.readouterr().err
    assert checkpoints(run) == ["ckpt_000000002.pt"]


# ---------------------------------------------------------------- item 3: an earlier run is never mixed with a new one

def test_a_second_start_in_a_run_folder_is_refused_unless_resume_or_overwrite(world, tmp_path, capsys):
    rc, run = run_main(world, tmp_path, "twice", **{"train.max_steps": 2, "checkpoint.every": 1})
    assert rc == 0 and checkpoints(run) == ["ckpt_000000001.pt", "ckpt_000000002.pt"]
    before = {p: p.read_bytes() for p in [run / "metrics.jsonl", *(run / "checkpoints").glob("ckpt_*")]}

    capsys.readouterr()
    rc, _ = run_main(world, tmp_path, "twice", **{"train.max_steps": 1, "checkpoint.every": 1})
    err = capsys.readouterr().err
    assert rc == 2, err
    assert str(run) in err and "--resume latest" in err and "--overwrite" in err and "Traceback" not in err, err
    assert {p: p.read_bytes() for p in before} == before  # nothing touched

    rc, _ = run_main(world, tmp_path, "twice", "--overwrite", **{"train.max_steps": 1, "checkpoint.every": 1})
    assert rc == 0
    assert checkpoints(run) == ["ckpt_000000001.pt"]  # the earlier run's step 2 is gone, not mixed in
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r] == [1]

    with pytest.raises(SystemExit) as e:
        train_video_pred.parse_args(["--resume", "latest", "--overwrite"])
    assert e.value.code == 2


# ---------------------------------------------------------------- items 9 and 8: Ctrl-C saves; the saved step is logged

def test_ctrl_c_saves_exits_130_logs_the_saved_step_and_resumes(world, tmp_path, monkeypatch, capsys):
    common = {"train.log_every": 100, "train.max_steps": 4}  # no step is due for logging: only the saved one is
    monkeypatch.setenv("VP_FAULTS", "sigint:step=1:times=1")
    faults.reset()
    rc, run = run_main(world, tmp_path, "ctrl_c", **common)
    err = capsys.readouterr().err
    assert rc == 130, err
    assert "saved step" in err and "Traceback" not in err, err
    (saved,) = checkpoints(run)
    step = int(saved[5:-3])
    assert 1 < step < 4
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r] == [step]

    monkeypatch.delenv("VP_FAULTS")
    rc, _ = run_main(world, tmp_path, "ctrl_c", "--resume", "latest", **common)
    assert rc == 0
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r] == [step]  # 4 is not due; no hole
    assert ckpt.resolve_resume(run / "checkpoints")[1]["step"] == 4


def test_a_second_ctrl_c_stops_at_once_without_saving(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VP_FAULTS", "sigint:times=2")  # at the start of steps 0 and 1
    faults.reset()
    rc, run = run_main(world, tmp_path, "ctrl_c2", **{"train.max_steps": 4})
    err = capsys.readouterr().err
    assert rc == 130, err
    assert "stopped without saving" in err and "Traceback" not in err, err
    assert checkpoints(run) == []


# ---------------------------------------------------------------- item 2: a resume says what changed, applies or refuses

def test_a_resume_prints_every_change_and_applies_the_optimizer_settings(world, tmp_path, capsys):
    first = {"train.max_steps": 2, "optim.lr": 1e-3, "ema.decay": 0.9}
    rc, run = run_main(world, tmp_path, "changed", **first)
    assert rc == 0
    changed = {"train.max_steps": 3, "optim.lr": 1e-5, "optim.weight_decay": 0.1, "optim.adam_betas": [0.8, 0.99],
               "ema.decay": 0.5}
    capsys.readouterr()
    rc, _ = run_main(world, tmp_path, "changed", "--resume", "latest", **changed)
    out = capsys.readouterr().out
    assert rc == 0
    for line in ("optim.lr: 0.001 -> 1e-05", "optim.weight_decay: 0.0 -> 0.1", "ema.decay: 0.9 -> 0.5",
                 "optim.adam_betas: [0.9, 0.999] -> [0.8, 0.99]", "train.max_steps: 2 -> 3"):
        assert f"changed since the checkpoint: {line}" in out, out
    state = ckpt.resolve_resume(run / "checkpoints")[1]
    assert state["step"] == 3
    (group,) = state["optimizer"]["param_groups"]
    assert group["lr"] == 1e-5 and group["weight_decay"] == 0.1 and tuple(group["betas"]) == (0.8, 0.99)
    assert state["lr_scheduler"]["base_lrs"] == [1e-5]
    assert state["ema"]["decay"] == 0.5
    assert [r["lr"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r and r["step"] == 3] == [1e-5]


def test_a_resume_that_changes_the_objective_is_refused_unless_allowed(world, tmp_path, capsys):
    rc, run = run_main(world, tmp_path, "objective", **{"train.max_steps": 1})
    assert rc == 0
    later = {"train.max_steps": 2, "diffusion.prediction_type": "v_prediction", "data.frame_interval": 2}
    capsys.readouterr()
    rc, _ = run_main(world, tmp_path, "objective", "--resume", "latest", **later)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "diffusion.prediction_type: 'epsilon' -> 'v_prediction'" in err and "data.frame_interval: 1 -> 2" in err
    assert "--allow-objective-change" in err and "Traceback" not in err, err
    assert checkpoints(run) == ["ckpt_000000001.pt"]

    rc, _ = run_main(world, tmp_path, "objective", "--resume", "latest", "--allow-objective-change", **later)
    assert rc == 0
    assert "changed since the checkpoint: diffusion.prediction_type: 'epsilon' -> 'v_prediction'" in \
        capsys.readouterr().out
    assert checkpoints(run) == ["ckpt_000000001.pt", "ckpt_000000002.pt"]


# ---------------------------------------------------------------- item 12: expected errors in one line, exit 2

def test_a_bad_frame_is_named_once_without_a_traceback_unless_asked(world, tmp_path, capsys):
    root = tmp_path / "frames"
    shutil.copytree(world.raw["data"]["root"], root)
    bad = sorted((root / "clip_0001").glob("*.png"))[3]
    bad.write_bytes(bad.read_bytes()[:40])  # a truncated PNG
    where = {"data.root": str(root), "data.synthetic.enabled": False}
    rc, run = run_main(world, tmp_path, "bad", **where)
    captured = capsys.readouterr()
    assert rc == 2, captured.err
    assert (captured.out + captured.err).count(str(bad)) == 1, captured.err
    assert "DataError" in captured.err and "Traceback" not in captured.err, captured.err
    assert not run.exists()  # a failed start leaves no empty run folder (issue 16 item 13)

    rc, _ = run_main(world, tmp_path, "bad", "--traceback", **where)
    assert rc == 2 and "Traceback" in capsys.readouterr().err


def test_an_unexpected_error_keeps_its_traceback(world, tmp_path, monkeypatch, capsys):
    def broken(self, *a, **k):
        raise RuntimeError("a bug")
    monkeypatch.setattr(video_prediction_trainer.Trainer, "train_step", broken)
    rc, _ = run_main(world, tmp_path, "bug", **{"train.max_steps": 1})
    err = capsys.readouterr().err
    assert rc == 1 and "error: RuntimeError: a bug" in err and "Traceback" in err, err


# ---------------------------------------------------------------- item 10: a full disk in a log or picture write

def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("what", ["picture", "metrics"])
def test_a_full_disk_in_a_log_or_picture_write_names_the_file_saves_and_stops(world, tmp_path, monkeypatch, capsys,
                                                                              what):
    if what == "picture":
        monkeypatch.setattr(video_prediction_trainer, "sample_grid", _no_space)
        dotted, name = {"eval.visualize_every": 1}, "samples/step_0000001.png"
    else:
        real = tracking.Tracker.log
        monkeypatch.setattr(tracking.Tracker, "log",
                            lambda self, metrics, step: _no_space() if step == 1 else real(self, metrics, step))
        dotted, name = {}, "metrics.jsonl"
    rc, run = run_main(world, tmp_path, what, **{"train.max_steps": 6, **dotted})
    err = capsys.readouterr().err
    assert rc == 1, err
    assert f"could not write {run / name}: No space left on device" in err and "Traceback" not in err, err
    # the stop goes with the next step's flags: the picture of step 1 fails before step 2, whose flags are read at
    # once (jobs run after it); step 1's record is written after step 2 (metrics read one step late), the stop
    # goes with step 3's flags, read after step 4
    (saved,) = checkpoints(run)
    step = 2 if what == "picture" else 4
    assert saved == f"ckpt_{step:09d}.pt" and f"saved step {step} and stopped" in err, err


# ---------------------------------------------------------------- item 5: wandb starts in its own thread, with a deadline

def test_wandb_that_never_starts_is_given_up_after_its_deadline_and_training_goes_on(world, tmp_path, monkeypatch):
    monkeypatch.setenv("VP_FAULTS", "wandb_init_sleep:secs=3")
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match=r"wandb did not start within logging.wandb.init_timeout_s=1 s"):
        rc, run = run_main(world, tmp_path, "wandb_stall", **{"logging.wandb.mode": "online",
                                                              "logging.wandb.init_timeout_s": 1})
    assert rc == 0
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    assert time.monotonic() - t0 < 60


def test_what_is_logged_while_wandb_starts_is_sent_once_it_is_up_in_order(world, tmp_path, monkeypatch):
    import wandb
    sent = []

    class SlowRun:
        id = "slow"

        def log(self, metrics, step):
            sent.append((step, "loss" in metrics))

        def finish(self):
            sent.append("finish")

    def slow_init(*args, **kwargs):
        time.sleep(1.5)
        return SlowRun()

    monkeypatch.setattr(wandb, "init", slow_init)
    rc, run = run_main(world, tmp_path, "wandb_slow", **{"logging.wandb.mode": "online"})
    assert rc == 0
    assert [s for s, is_train in sent[:-1] if is_train] == [1, 2, 3, 4] and sent[-1] == "finish", sent
    assert ckpt.resolve_resume(run / "checkpoints")[1]["wandb_id"] in (None, "slow")


def test_resume_latest_before_the_first_save_drops_the_stopped_attempts_records(world, tmp_path):
    """An attempt stopped before its first checkpoint (kill -9) left records; `--resume latest` starts from step 0
    and must not log a second run's steps after them."""
    run = tmp_path / "runs" / "early"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n{"step": 3, "lo')
    rc, _ = run_main(world, tmp_path, "early", "--resume", "latest", **{"train.max_steps": 2})
    assert rc == 0
    records = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2] and all(r["loss"] != 9.0 for r in records)


def test_too_little_data_for_one_batch_is_a_one_line_error(world, tmp_path, capsys):
    rc, run = run_main(world, tmp_path, "small", **{"train.batch_size": 64})
    err = capsys.readouterr().err
    assert rc == 2 and "fewer than one global batch" in err and "Traceback" not in err, err
    assert not run.exists()

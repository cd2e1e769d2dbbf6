"""The trainer end to end, on CPU with gloo and a tiny model: the run folder, torchrun with 2 ranks, exact resume,
killed saves, wandb faults, the latent cache, non-finite steps, config and resume errors.

Single-process runs call `main([...])` in this process (imports paid once); the real command line and torchrun run
as subprocesses. Every run reads one synthetic world and one tiny VAE built for this module (`make_world`).
"""
from __future__ import annotations

import gc
import json
import math
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

import train_video_pred
import video_prediction_trainer
from configs import load_config
from configs.loader import config_from_dict, parse_yaml
from data import build_windows, discover_clips, split_clips
from helpers import one_torch_thread  # noqa: F401  (autouse fixture: one intra-op thread)
from model import checkpoint as ckpt
from training import distributed
import faults
from training.distributed import DistInfo
from trainer_helpers import (REPO, assert_bitwise_equal, explain, losses, make_world, read_jsonl, run_cli,
                             subprocess_env, train_records, write_yaml)
from video_prediction_trainer import Trainer, TrainingHalted

T_PAST, T_FUTURE = 2, 2
NAMES = ("model", "copy_last", "copy_last_vae", "vae_roundtrip")  # rows every eval json must hold


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("trainer_world"))


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    """Fault points installed, none active unless a test sets VP_FAULTS; wandb quiet; the SIGTERM/SIGUSR1
    handlers that fit() installs in this process put back afterwards."""
    monkeypatch.delenv("VP_FAULTS", raising=False)
    faults.install(monkeypatch)
    monkeypatch.setenv("WANDB_SILENT", "true")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def run_main(world, tmp_path: Path, name: str, *sets: str, resume: str | None = None, **dotted) -> tuple[int, Path]:
    """`main([--config <yaml>, --set ...])` in this process; returns (exit code, run folder)."""
    cfg = write_yaml(tmp_path / f"{name}.yaml", world.config(tmp_path / "runs", **{"logging.name": name, **dotted}))
    argv = ["--config", str(cfg), *(["--set", *sets] if sets else []), *(["--resume", resume] if resume else [])]
    return train_video_pred.main(argv), tmp_path / "runs" / name


def val_windows(cfg) -> int:
    _, val = split_clips(discover_clips(cfg.data), cfg.data.val_fraction, cfg.data.split_seed)
    return len(build_windows(val, cfg.data))


def final_state(run_dir: Path) -> tuple[Path, dict]:
    found = ckpt.resolve_resume(run_dir / "checkpoints", "latest")
    assert found is not None, f"no checkpoint in {run_dir}"
    return found


def assert_same_training_state(a: dict, b: dict) -> None:
    """Model, EMA, optimizer, LR schedule and data position: bit for bit. No RNG state is saved (each step's
    randomness is derived from (train.seed, rank, step)); the equal losses of the steps after a resume check it."""
    for key in ("unet", "ema", "optimizer", "lr_scheduler", "step", "epoch", "position", "nonfinite_skips"):
        assert_bitwise_equal(a[key], b[key], key)
    assert "rng" not in a and "rng" not in b


def check_eval_json(path: Path, step: int, num_clips: int) -> dict:
    result = json.loads(path.read_text())
    assert result["step"] == step and isinstance(result["step"], int)
    assert result["num_clips"] == num_clips and isinstance(result["num_clips"], int)
    for metric in ("psnr", "ssim"):
        assert set(NAMES) <= set(result[metric]), result[metric].keys()
        for name, values in result[metric].items():
            assert len(values) == T_FUTURE, f"{metric}.{name}: {values}"
            assert all(isinstance(v, float) and math.isfinite(v) for v in values), f"{metric}.{name}: {values}"
    assert all(0 < v < 100 for v in result["psnr"]["copy_last"])
    assert all(-1 <= v <= 1 for vs in result["ssim"].values() for v in vs)
    return result


# ---------------------------------------------------------------- 1. the command line and the run folder

def test_cli_run_writes_every_item_of_the_run_folder_and_wandb_offline(world, tmp_path):
    cfg_path = write_yaml(tmp_path / "cli.yaml", world.config(
        tmp_path / "runs", **{"logging.name": "cli", "eval.visualize_every": 2, "eval.every": 2,
                              "checkpoint.every": 2, "eval.clips": 2, "eval.vis_clips": 2}))
    sets = ["train.max_steps=3", "logging.wandb.mode=offline"]
    proc = run_cli(["--config", str(cfg_path), "--set", *sets], tmp_path)
    assert proc.returncode == 0, explain(proc)
    run = tmp_path / "runs" / "cli"
    cfg = load_config(cfg_path, sets)

    # config.yaml: the resolved config, loading back to an equal one
    assert load_config(run / "config.yaml") == cfg

    # metrics.jsonl: one JSON object a line; a training record per step with the scalars
    records = read_jsonl(run / "metrics.jsonl")
    train = train_records(run)
    assert sorted(train) == [1, 2, 3]
    for r in train.values():
        for key in ("loss", "lr", "grad_norm", "samples_per_s"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] >= 0, (key, r)
        assert r["lr"] > 0 and r["samples_per_s"] > 0

    # eval/step_*.json at the cadence and at the end; their means appended to metrics.jsonl
    evals = sorted(p.name for p in (run / "eval").iterdir())
    assert evals == ["step_0000002.json", "step_0000003.json"]
    for step in (2, 3):
        result = check_eval_json(run / "eval" / f"step_{step:07d}.json", step, num_clips=2)
        logged = [r for r in records if r["step"] == step and "eval/psnr_model" in r]
        assert len(logged) == 1, f"eval of step {step} logged {len(logged)} times"
        for metric in ("psnr", "ssim"):
            for name, values in result[metric].items():
                assert logged[0][f"eval/{metric}_{name}"] == pytest.approx(sum(values) / len(values), abs=1e-3)

    # checkpoints: ckpt_*.pt and `latest`, complete, carrying the resolved config
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["ckpt_000000002.pt", "ckpt_000000003.pt", "latest"], names
    assert (run / "checkpoints" / "latest").read_text().strip() == "ckpt_000000003.pt"
    path, state = final_state(run)
    assert path.name == "ckpt_000000003.pt" and state["step"] == 3
    assert config_from_dict(state["config"]) == cfg

    # samples: PNG grids and one GIF per clip with t_past + t_future frames, all openable
    for step in (2, 3):
        with Image.open(run / "samples" / f"step_{step:07d}.png") as im:
            im.load()
            assert im.format == "PNG" and im.width > im.height > 0
        for clip in range(2):
            with Image.open(run / "samples" / f"step_{step:07d}_clip{clip}.gif") as im:
                assert im.format == "GIF" and im.n_frames == T_PAST + T_FUTURE
                for i in range(im.n_frames):
                    im.seek(i)
                    im.load()

    # wandb offline: a run folder inside the run folder
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run / "wandb").iterdir()) if (run / "wandb").exists() else "no wandb folder"
    assert list(offline[0].glob("*.wandb")), list(offline[0].iterdir())


def test_cli_dry_run_prints_the_resolved_config_and_creates_nothing(world, tmp_path):
    cfg_path = write_yaml(tmp_path / "dry.yaml", world.config(tmp_path / "runs", **{"logging.name": "dry"}))
    proc = run_cli(["--config", str(cfg_path), "--dry-run", "--set", "optim.lr=3e-4", "sampler.eta=0.5"], tmp_path)
    assert proc.returncode == 0, explain(proc)
    printed = config_from_dict(parse_yaml(proc.stdout))
    assert printed == load_config(cfg_path, ["optim.lr=3e-4", "sampler.eta=0.5"])
    assert printed.optim.lr == 3e-4
    assert not (tmp_path / "runs").exists()


def test_cli_help():
    proc = subprocess.run([sys.executable, str(REPO / "train_video_pred.py"), "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env=subprocess_env(Path("/nonexistent")))
    assert proc.returncode == 0, explain(proc)
    for flag in ("--config", "--set", "--resume", "--dry-run", "--device", "exit codes"):
        assert flag in proc.stdout


def test_cli_config_errors_exit_2_naming_every_key(world, tmp_path):
    cfg_path = write_yaml(tmp_path / "bad.yaml", world.config(tmp_path / "runs", **{"logging.name": "bad"}))
    proc = run_cli(["--config", str(cfg_path), "--set", "optim.lr=fast", "unet.block_out_channelz=[8]",
                    "sampler.num_inference_steps=0"], tmp_path)
    assert proc.returncode == 2, explain(proc)
    for key in ("optim.lr", "unet.block_out_channelz", "did you mean 'block_out_channels'",
                "sampler.num_inference_steps"):
        assert key in proc.stderr, f"{key!r} not in:\n{proc.stderr}"
    assert not (tmp_path / "runs").exists()

    proc = run_cli(["--config", str(tmp_path / "missing.yaml")], tmp_path)
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr, explain(proc)


# ---------------------------------------------------------------- 2 + 3. torchrun with 2 ranks, exact resume

@pytest.fixture(scope="module")
def ddp_runs(world, tmp_path_factory):
    """Three `torchrun --nproc_per_node=2` runs (gloo): 4 steps straight; 2 steps; the latter resumed to 4."""
    tmp = tmp_path_factory.mktemp("ddp")
    common = {"checkpoint.every": 2, "eval.clips": 0, "eval.vis_clips": 1,
              "cache.dir": str(tmp / "cache")}  # a fresh cache: built by both ranks
    runs, procs = {}, {}
    for name, steps, resume in (("straight", 4, None), ("half", 2, None), ("half", 4, "latest")):
        cfg = write_yaml(tmp / f"{name}{steps}.yaml", world.config(tmp / "runs", **{
            "logging.name": name, "train.max_steps": steps, **common}))
        proc = run_cli(["--config", str(cfg), *(["--resume", resume] if resume else [])], tmp, torchrun_procs=2,
                       timeout=300)
        assert proc.returncode == 0, f"torchrun {name} max_steps={steps}: " + explain(proc)
        runs[name], procs[(name, steps)] = tmp / "runs" / name, proc
    return types.SimpleNamespace(runs=runs, procs=procs, cfg=load_config(cfg), common=common)


@pytest.mark.slow
def test_torchrun_two_ranks_train_evaluate_and_save_once(ddp_runs):
    run = ddp_runs.runs["straight"]
    assert sorted(train_records(run)) == [1, 2, 3, 4]  # rank 0 alone writes metrics.jsonl
    # one evaluation at the end, written once, over every val window: the ranks split the windows between them
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["step_0000004.json"]
    n_val = val_windows(ddp_runs.cfg)
    check_eval_json(run / "eval" / "step_0000004.json", 4, num_clips=n_val)
    eval_lines = [r for r in read_jsonl(run / "metrics.jsonl") if "eval/psnr_model" in r]
    assert [r["step"] for r in eval_lines] == [4]
    assert ddp_runs.procs[("straight", 4)].stdout.count(f"evaluation on {n_val} val clips") == 1
    assert (run / "samples" / "step_0000004.png").is_file()
    # checkpoints at 2 and 4, without RNG state: each rank derives its noise from (train.seed, rank, step)
    path, state = final_state(run)
    assert path.name == "ckpt_000000004.pt" and state["world_size"] == 2 and "rng" not in state
    # each rank iterated over its own half of the training windows: an epoch (every window once) took
    # windows / (2 ranks x 2 per rank) steps, not twice as many
    cfg = ddp_runs.cfg
    train_clips, _ = split_clips(discover_clips(cfg.data), cfg.data.val_fraction, cfg.data.split_seed)
    steps_per_epoch = len(build_windows(train_clips, cfg.data)) // cfg.train.batch_size
    assert 1 < steps_per_epoch < 4
    assert (state["epoch"], state["position"]) == divmod(4, steps_per_epoch)
    assert (run / "checkpoints" / "ckpt_000000002.pt").is_file()
    # the latent cache was built by both ranks together and is complete
    manifests = list((Path(ddp_runs.cfg.cache.dir)).glob("*/manifest.json"))
    assert len(manifests) == 1
    assert len(json.loads(manifests[0].read_text())["files"]) == 2 * 6  # mean + std of each of the 6 clips


@pytest.mark.slow
def test_exact_resume_two_ranks(ddp_runs):
    straight, resumed = ddp_runs.runs["straight"], ddp_runs.runs["half"]
    assert "resumed from" in ddp_runs.procs[("half", 4)].stdout
    assert sorted(losses(resumed)) == [1, 2, 3, 4]  # 1-2 from the first invocation, 3-4 after the resume
    assert losses(resumed) == losses(straight)  # exact floats
    assert_same_training_state(final_state(straight)[1], final_state(resumed)[1])


@pytest.mark.slow
def test_resume_on_another_world_size_is_deterministic(world, ddp_runs, tmp_path):
    """A 2-rank checkpoint resumed by 1 process: the data restarts at the next epoch and the one rank draws rank 0's
    noise, so the run is not the 2-rank one; but the same resume twice gives the same run, bit for bit."""
    saved = ddp_runs.runs["straight"] / "checkpoints" / "ckpt_000000002.pt"
    runs = []
    for name in ("one_a", "one_b"):
        (tmp_path / "runs" / name / "checkpoints").mkdir(parents=True)
        shutil.copy(saved, tmp_path / "runs" / name / "checkpoints" / saved.name)
        with pytest.warns(UserWarning, match="saved with 2 ranks on 1: the data order restarts at the next epoch"):
            rc, run = run_main(world, tmp_path, name, resume="latest", **{**ddp_runs.common, "train.max_steps": 4})
        assert rc == 0
        runs.append(run)
    a, b = runs
    assert sorted(losses(a)) == [3, 4] and losses(a) == losses(b)  # exact floats
    assert_same_training_state(final_state(a)[1], final_state(b)[1])
    assert losses(a)[3] != losses(ddp_runs.runs["straight"])[3]


def test_step_seeds_are_a_pure_function_of_seed_rank_and_step():
    keys = [(seed, rank, step, stream) for seed in range(3) for rank in range(4) for step in range(50)
            for stream in ("noise", "global", "loader")]
    seeds = {k: distributed.step_seed(*k) for k in keys}
    assert len(set(seeds.values())) == len(seeds)  # every rank, step and stream its own seed
    assert all(0 <= v < 2 ** 63 for v in seeds.values())
    assert all(distributed.step_seed(*k) == v for k, v in seeds.items())  # the same arguments, the same seed
    # the derivation fixes every run's noise: changing it changes what a given config trains (say so when you do)
    assert distributed.step_seed(0, 0, 0, "noise") == 4000563893452429607


def test_teardown_frees_a_ddp_model_held_in_a_reference_cycle_before_the_group_goes(tmp_path):
    """A DDP model kept alive only by a reference cycle (as the Trainer's is) must be gone when teardown returns:
    left to the interpreter's final collection, its reducer destroys gloo's work objects while the GIL is being
    torn down and a finished run dies with SIGABRT. Automatic collection is off so only teardown can free it."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        net = DDP(torch.nn.Linear(3, 2))
        net(torch.randn(4, 3)).sum().backward()  # the reducer has buckets and has all-reduced once
        holder = {"net": net}
        holder["self"] = holder  # the cycle
        alive = weakref.ref(net)
        del net, holder
        assert alive() is not None, "negative control: the cycle keeps the model alive without a collection"
        distributed.teardown()
        assert alive() is None, "the DDP model (and its process group) outlived teardown"
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if was_enabled:
            gc.enable()


@pytest.mark.slow
def test_torchrun_bf16_gradient_all_reduce_into_bucket_views_trains_like_fp32_and_profiles_each_rank(
        world, ddp_runs, tmp_path):
    """ddp.grad_dtype=bf16 (DDP's bf16_compress_hook) with ddp.bucket_view: the same 4 steps as the
    fp32 run above, but gradients rounded to bf16 on the wire: weights close to the fp32 run's, not equal to them
    (the hook ran). profile.at writes every rank's summary and trace."""
    straight = ddp_runs.runs["straight"]
    cfg = write_yaml(tmp_path / "bf16.yaml", world.config(tmp_path / "runs", **{
        **ddp_runs.common, "logging.name": "bf16", "train.max_steps": 4, "ddp.grad_dtype": "bf16", "ddp.bucket_view": True,
        "profile.at": 2, "profile.steps": 1}))
    proc = run_cli(["--config", str(cfg)], tmp_path, torchrun_procs=2, timeout=300)
    assert proc.returncode == 0, explain(proc)
    run = tmp_path / "runs" / "bf16"
    assert f"profile of steps 2..2: {run / 'profile'}" in proc.stdout
    for rank in (0, 1):
        summary = json.loads((run / "profile" / f"rank{rank}.json").read_text())
        assert (summary["rank"], summary["first_step"], summary["steps"]) == (rank, 2, 1)
        assert (run / "profile" / f"rank{rank}.trace.json.gz").stat().st_size > 0
    fp32, bf16 = final_state(straight)[1]["unet"], final_state(run)[1]["unet"]
    fp32_at_2 = ckpt.load_checkpoint(straight / "checkpoints" / "ckpt_000000002.pt")["unet"]
    moved = sum((fp32[k].float() - fp32_at_2[k].float()).norm() ** 2 for k in fp32) ** 0.5  # steps 3 and 4
    diff = sum((fp32[k].float() - bf16[k].float()).norm() ** 2 for k in fp32) ** 0.5
    assert 0 < diff < 0.1 * moved, (diff, moved)
    assert losses(run)[1] == losses(straight)[1]  # the first loss comes before any all-reduce


def test_exact_resume_single_process_and_negative_control(world, tmp_path, monkeypatch):
    common = {"checkpoint.every": 2, "checkpoint.keep_last": 4}
    rc, straight = run_main(world, tmp_path, "straight", **common)
    assert rc == 0
    rc, half = run_main(world, tmp_path, "half", "train.max_steps=2", **common)
    assert rc == 0
    control = tmp_path / "runs" / "control"
    shutil.copytree(half, control)  # the same stopped run, resumed below without the per-step reseed
    rc, resumed = run_main(world, tmp_path, "half", resume="latest", **common)
    assert rc == 0

    expected = losses(straight)
    assert sorted(expected) == [1, 2, 3, 4]
    assert losses(resumed) == expected
    assert_same_training_state(final_state(straight)[1], final_state(resumed)[1])
    # the stopped run's final save (after its end-of-run jobs) equals the uninterrupted run's save at that step
    mid = ckpt.load_checkpoint(straight / "checkpoints" / "ckpt_000000002.pt")
    assert_same_training_state(mid, ckpt.load_checkpoint(half / "checkpoints" / "ckpt_000000002.pt"))

    # negative control: the same resume with the per-step reseed left out (the step's generator and the global RNG
    # run on from where the new process starts them) must not reproduce the losses
    monkeypatch.setattr(Trainer, "_seed_step", lambda self: None)
    rc, control = run_main(world, tmp_path, "control", resume="latest", **common)
    assert rc == 0
    got = losses(control)
    assert [got[s] for s in (1, 2)] == [expected[s] for s in (1, 2)]  # copied from the stopped run
    assert got[3] != expected[3] and got[4] != expected[4]


def test_exact_resume_with_dropout_reseeds_the_global_rng_each_step(world, tmp_path, monkeypatch):
    """nn.Dropout in the UNet draws from the global RNG, which each step reseeds from (seed, rank, step): a resume
    reproduces its masks, though this process ran other runs (and their evaluations) in between."""
    common = {"checkpoint.every": 2, "unet.dropout": 0.3}
    rc, straight = run_main(world, tmp_path, "straight", **common)
    assert rc == 0
    rc, half = run_main(world, tmp_path, "half", "train.max_steps=2", **common)
    assert rc == 0
    shutil.copytree(half, tmp_path / "runs" / "control")
    rc, resumed = run_main(world, tmp_path, "half", resume="latest", **common)
    assert rc == 0
    expected = losses(straight)
    assert sorted(expected) == [1, 2, 3, 4] and losses(resumed) == expected
    assert_same_training_state(final_state(straight)[1], final_state(resumed)[1])

    # negative control: the resumed steps' global RNG seeded as for the next step (their noise unchanged): the dropout
    # masks, and with them the losses, differ
    real = distributed.step_seed
    monkeypatch.setattr(video_prediction_trainer, "step_seed",
                        lambda seed, rank, step, stream: real(seed, rank, step + (stream == "global"), stream))
    rc, control = run_main(world, tmp_path, "control", resume="latest", **common)
    assert rc == 0
    got = losses(control)
    assert got[3] != expected[3] and got[4] != expected[4]


def test_resume_with_a_changed_model_shape_names_the_checkpoint(world, tmp_path, capsys):
    rc, run = run_main(world, tmp_path, "shape", **{"train.max_steps": 1, "data.val_fraction": 0.0})
    assert rc == 0
    before = {f: (run / f).read_text() for f in ("config.yaml", "metrics.jsonl")}
    checkpoint = run / "checkpoints" / "ckpt_000000001.pt"
    wider = {"unet.block_out_channels": [16, 48], "train.max_steps": 2, "data.val_fraction": 0.0}

    capsys.readouterr()
    rc, _ = run_main(world, tmp_path, "shape", resume="latest", **wider)
    err = capsys.readouterr().err
    assert rc == 2  # refused before anything starts, like a config error
    assert str(checkpoint) in err and "shape" in err and "unet.block_out_channels" in err, err

    # the Trainer's own check (it also guards callers other than the command line)
    with pytest.raises(ValueError, match=f"cannot resume from {re.escape(str(checkpoint))}.*shape"):
        _trainer(world, tmp_path, "shape", resume="latest", **wider,
                 **{"cache.dir": world.raw["cache"]["dir"]})
    # a refused resume leaves the run folder describing the checkpoints it holds
    assert {f: (run / f).read_text() for f in before} == before


# ---------------------------------------------------------------- 4. a killed save leaves the last checkpoint

def _tmp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if ".tmp." in p.name] if folder.is_dir() else []


def _check_after_kill(folder: Path) -> tuple[Path, dict]:
    """No partial file under a final name; `latest` names a valid checkpoint; resolve_resume finds it."""
    finals = ckpt.list_checkpoints(folder)
    assert finals, "no checkpoint survived"
    for p in finals:
        assert ckpt.verify(p) is None, f"{p.name} is under a final name but {ckpt.verify(p)}"
    pointer = ckpt.read_latest_pointer(folder)
    assert pointer is not None and ckpt.verify(pointer) is None
    path, state = ckpt.resolve_resume(folder, "latest")
    assert path == pointer
    return path, state


@pytest.mark.slow
def test_trainer_killed_at_a_random_moment_keeps_a_valid_checkpoint(world, tmp_path):
    cfg = write_yaml(tmp_path / "kill.yaml", world.config(tmp_path / "runs", **{
        "logging.name": "kill", "train.max_steps": 10_000, "checkpoint.every": 1, "checkpoint.keep_last": 2,
        "data.val_fraction": 0.0}))
    run = tmp_path / "runs" / "kill"
    folder = run / "checkpoints"
    log = tmp_path / "kill.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "train_video_pred.py"), "--config", str(cfg)], cwd=REPO,
                                env=subprocess_env(tmp_path), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 150
        while not (folder / "latest").exists():
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint within 150 s"
            time.sleep(0.01)
        delay = random.uniform(0.0, 1.5)
        kill_at = time.monotonic() + delay
        while time.monotonic() < kill_at and not _tmp_files(folder):  # kill mid-write if we catch one
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    path, state = _check_after_kill(folder)
    assert state["step"] == int(path.stem.split("_")[1]) >= 1, f"killed after {delay:.3f} s"

    # the run continues from it: `--resume latest` removes any temp file and trains on
    rc, _ = run_main(world, tmp_path, "kill", resume="latest", **{
        "train.max_steps": state["step"] + 1, "checkpoint.every": 1, "checkpoint.keep_last": 2,
        "data.val_fraction": 0.0})
    assert rc == 0
    assert not _tmp_files(folder)
    assert final_state(run)[1]["step"] == state["step"] + 1
    # metrics.jsonl: each step once, those the killed run logged after its last checkpoint replaced by the redo
    assert sorted(train_records(run)) == list(range(1, state["step"] + 2))


_BIG_SAVER = textwrap.dedent("""
    import sys, torch
    from model.checkpoint import save_checkpoint
    folder = sys.argv[1]
    save_checkpoint({"step": 1, "w": torch.arange(1000.0)}, folder, 1, keep_last=2)
    step = 2
    while True:  # large states, one after another, until killed
        save_checkpoint({"step": step, "w": torch.full((8 << 20,), float(step))}, folder, step, keep_last=2)
        step += 1
""")


@pytest.mark.slow
def test_kill_in_the_middle_of_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    folder = tmp_path / "checkpoints"

    def big_write_started() -> bool:  # a temp file of a large checkpoint, or (a non-atomic writer) its final name
        return any(p.name.startswith(".ckpt_") for p in _tmp_files(folder)) or len(ckpt.list_checkpoints(folder)) > 1

    for attempt in range(3):  # the kill must land while a temp file is written; retry if it raced the rename
        shutil.rmtree(folder, ignore_errors=True)
        log = tmp_path / "saver.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-c", _BIG_SAVER, str(folder)], cwd=REPO,
                                    env=subprocess_env(tmp_path), stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while not ((folder / "latest").exists() and big_write_started()):
                assert proc.poll() is None, log.read_text()[-4000:]
                assert time.monotonic() < deadline, "no checkpoint write seen within 120 s"
                time.sleep(0.0002)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(30)
        path, state = _check_after_kill(folder)  # whenever the kill landed
        assert state["step"] == int(path.stem.split("_")[1])
        assert torch.equal(state["w"], torch.arange(1000.0) if state["step"] == 1
                           else torch.full((8 << 20,), float(state["step"])))
        leftovers = _tmp_files(folder)
        if any(p.name.startswith(".ckpt_") for p in leftovers):
            break
    assert any(p.name.startswith(".ckpt_") for p in leftovers), f"never killed mid-write in {attempt + 1} attempts"
    assert {p.name for p in ckpt.clean_leftovers(folder)} == {p.name for p in leftovers}
    assert not _tmp_files(folder)


# ---------------------------------------------------------------- 5. wandb failures are never fatal

def test_wandb_failing_at_init_does_not_stop_training(world, tmp_path, monkeypatch):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("injected: wandb.init failed")

    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(UserWarning, match="wandb could not start.*injected"):
        rc, run = run_main(world, tmp_path, "wandb_init", **{"logging.wandb.mode": "offline"})
    assert rc == 0
    assert sorted(train_records(run)) == [1, 2, 3, 4]
    assert (run / "eval" / "step_0000004.json").is_file()


def test_wandb_failing_at_log_does_not_stop_training(world, tmp_path, monkeypatch):
    import wandb

    calls = []

    class BrokenRun:
        id = "injected"

        def log(self, *args, **kwargs):
            calls.append("log")
            raise ConnectionError("injected: wandb.log failed")

        def finish(self):
            calls.append("finish")

    monkeypatch.setattr(wandb, "init", lambda *a, **k: BrokenRun())
    with pytest.warns(UserWarning, match="wandb failed at log.*injected"):
        rc, run = run_main(world, tmp_path, "wandb_log", **{"logging.wandb.mode": "offline"})
    assert rc == 0
    assert calls and calls[0] == "log"  # the fault fired (then wandb was switched off for the run)
    assert sorted(train_records(run)) == [1, 2, 3, 4]
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "eval/psnr_model" in r] == [4]


# ---------------------------------------------------------------- 6. latent cache

def _count_encoder_calls(monkeypatch, vae) -> list:
    calls = []
    original = vae.encode

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(vae, "encode", counting)
    return calls


def _trainer(world, tmp_path: Path, name: str, resume: str | None = None, **dotted) -> Trainer:
    """A Trainer in this process (one rank, CPU); its latent cache under tmp_path unless cache.dir is given."""
    raw = world.config(tmp_path / "runs", **{"logging.name": name, "cache.dir": str(tmp_path / "cache"),
                                            **dotted})
    return train_video_pred.build(config_from_dict(raw), DistInfo(), tmp_path / "runs" / name, resume=resume)


def _cache_folder(tmp_path: Path) -> Path:
    (folder,) = [p.parent for p in (tmp_path / "cache").glob("*/manifest.json")]
    return folder


def test_latent_cache_no_encoder_in_training_reused_and_rebuilt_when_corrupt(world, tmp_path, monkeypatch, capsys):
    # first run: builds the cache, then trains without calling the encoder
    trainer = _trainer(world, tmp_path, "a")
    assert "latent cache: building" in capsys.readouterr().out
    calls = _count_encoder_calls(monkeypatch, trainer.model.vae.vae)
    seen = [m for m in [trainer.train_step() for _ in range(3)] + [trainer.flush()] if m]  # read one step late
    assert [m["step"] for m in seen] == [1, 2, 3] and all(math.isfinite(m["loss"]) for m in seen)
    assert trainer.step == 3 and len(calls) == 0
    trainer.tracker.close()
    folder = _cache_folder(tmp_path)
    manifest_mtime = (folder / "manifest.json").stat().st_mtime_ns
    npy = sorted(folder.glob("*.mean.npy"))[0]
    good = npy.read_bytes()

    # second run: the same cache, not rebuilt (no encoder call at all while the trainer is built)
    from diffusers import AutoencoderKL
    class_calls = _count_encoder_calls(monkeypatch, AutoencoderKL)
    trainer = _trainer(world, tmp_path, "b")
    out = capsys.readouterr().out
    assert f"latent cache: using {folder}" in out and "building" not in out
    assert len(class_calls) == 0
    assert (folder / "manifest.json").stat().st_mtime_ns == manifest_mtime
    trainer.tracker.close()

    # a flipped byte in one latent file: detected and rebuilt to the same bytes
    data = bytearray(good)
    data[-1] ^= 0xFF
    npy.write_bytes(bytes(data))
    trainer = _trainer(world, tmp_path, "c")
    out = capsys.readouterr().out
    assert "latent cache: building" in out and "checksum mismatch" in out, out
    assert len(class_calls) > 0
    assert npy.read_bytes() == good
    trainer.tracker.close()

    # with the cache off, every training step runs the encoder
    trainer = _trainer(world, tmp_path, "d", **{"cache.enabled": False})
    calls = _count_encoder_calls(monkeypatch, trainer.model.vae.vae)
    trainer.train_step()
    trainer.train_step()
    assert len(calls) >= 2
    trainer.tracker.close()


# ---------------------------------------------------------------- non-finite steps (fault point nan_loss)
# Each step's flags are read one step late and a non-finite step's update is masked on the device by fused AdamW's
# found_inf; the step keeps its number (LR and EMA advance). Reading the flags at once (a job due every step) or one
# step late must give the same numbers.

def test_nonfinite_halt_masks_the_update_and_stops(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VP_FAULTS", "nan_loss:step=2")
    no_eval = {"data.val_fraction": 0.0, "checkpoint.every": 1}
    trainer = _trainer(world, tmp_path, "halt", **no_eval)
    with pytest.raises(TrainingHalted, match="non-finite loss or gradient at step 2"):
        trainer.fit()
    # the weights and AdamW state are those of step 2: nothing was applied from the NaN step
    saved = ckpt.load_checkpoint(tmp_path / "runs" / "halt" / "checkpoints" / "ckpt_000000002.pt")
    assert_bitwise_equal(trainer.unet.state_dict(), saved["unet"], "unet")
    assert_bitwise_equal(trainer.optimizer.state_dict(), saved["optimizer"], "optimizer")
    # the EMA took its step towards those unchanged weights: exactly diffusers' update from the saved EMA
    from diffusers.training_utils import EMAModel
    oracle = EMAModel([p.detach().clone() for p in trainer.unet.parameters()], foreach=True)
    oracle.load_state_dict(saved["ema"])
    oracle.step(trainer.unet.parameters())
    assert_bitwise_equal(trainer.ema.state_dict(), oracle.state_dict(), "ema")
    assert all(torch.isfinite(p).all() for p in trainer.unet.parameters())
    assert trainer.step == 3  # the masked step kept its number
    assert not (tmp_path / "runs" / "halt" / "checkpoints" / "ckpt_000000003.pt").exists()

    # the command line: exit 1 with a message that says what happened and what to do
    capsys.readouterr()
    rc, run = run_main(world, tmp_path, "halt_cli", **no_eval)
    err = capsys.readouterr().err
    assert rc == 1
    assert "training halted" in err and "non-finite" in err and "step 2" in err and "train.nonfinite" in err, err
    assert sorted(train_records(run)) == [1, 2]


def test_flags_read_one_step_late_give_the_numbers_of_flags_read_at_once(world, tmp_path):
    """Without jobs the host reads each step's flags after launching the next; with a save every step it reads
    them at once. Losses, LR and the final training state are the same bit for bit."""
    runs = {}
    for name, save_every in (("late", 0), ("at_once", 1)):
        rc, runs[name] = run_main(world, tmp_path, name, **{"data.val_fraction": 0.0, "checkpoint.every": save_every,
                                                            "train.max_steps": 5})
        assert rc == 0
    late, at_once = train_records(runs["late"]), train_records(runs["at_once"])
    assert sorted(late) == sorted(at_once) == [1, 2, 3, 4, 5]  # every step logged once, under its own number
    for step in late:
        assert (late[step]["loss"], late[step]["lr"]) == (at_once[step]["loss"], at_once[step]["lr"]), step
    assert_same_training_state(final_state(runs["late"])[1], final_state(runs["at_once"])[1])


def test_nonfinite_halt_read_one_step_late_masks_the_update(world, tmp_path, monkeypatch):
    monkeypatch.setenv("VP_FAULTS", "nan_loss:step=2")
    trainer = _trainer(world, tmp_path, "dhalt", **{"data.val_fraction": 0.0, "train.max_steps": 6,
                                                    "checkpoint.every": 0})
    with pytest.raises(TrainingHalted, match="non-finite loss or gradient at step 2"):
        trainer.fit()
    # read at the end of the next step: 4 steps were launched, of which the third (index 2) was masked
    assert trainer.step == 4
    assert all(torch.isfinite(p).all() for p in trainer.unet.parameters())
    assert all(torch.isfinite(s).all() for s in trainer.ema.shadow_params)
    steps = {float(st["step"]) for st in trainer.optimizer.state.values()}
    assert steps == {3.0}, steps  # AdamW applied 3 updates: the masked one was taken back
    assert all(torch.isfinite(v).all() for st in trainer.optimizer.state.values() for v in st.values())


def test_nonfinite_skip_continues_and_keeps_step_numbers(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VP_FAULTS", "nan_loss:step=1:times=1")
    faults.reset()  # times=N counts per process
    rc, run = run_main(world, tmp_path, "dskip", **{"data.val_fraction": 0.0, "train.nonfinite": "skip",
                                                    "train.max_steps": 4})
    out = capsys.readouterr().out
    assert rc == 0
    assert "non-finite loss/gradient at step 1; step skipped, its update masked" in out, out
    records = train_records(run)
    assert sorted(records) == [1, 3, 4]  # the masked step is not logged as a training record
    assert all(math.isfinite(r["loss"]) for r in records.values())
    state = final_state(run)[1]
    assert state["step"] == 4 and state["nonfinite_skips"] == 0
    assert {float(st["step"]) for st in state["optimizer"]["state"].values()} == {3.0}
    assert all(torch.isfinite(v).all() for v in state["unet"].values())


def test_nonfinite_skip_gives_up_after_max_skips_in_a_row(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VP_FAULTS", "nan_loss")  # every step
    rc, run = run_main(world, tmp_path, "giveup", **{"data.val_fraction": 0.0, "train.nonfinite": "skip",
                                                     "train.max_nonfinite_skips": 2})
    err = capsys.readouterr().err
    assert rc == 1 and "2 non-finite steps in a row" in err, err
    assert train_records(run) == {}


# ---------------------------------------------------------------- evaluation metrics

def test_frame_psnr_is_ten_log10_of_one_over_the_mse_capped_with_nan_kept():
    """The project's one PSNR (torchmetrics) against the formula: per image, peak 1; identical images score the cap
    (not inf); an image holding a NaN scores NaN and no other image does."""
    from training.evaluation import PSNR_MAX_DB, frame_psnr
    g = torch.Generator().manual_seed(0)
    true = torch.rand(2, 3, 3, 8, 8, generator=g)
    pred = (true + 0.05 * torch.randn(true.shape, generator=g)).clamp(0, 1)
    mse = (pred - true).pow(2).flatten(2).mean(2)
    torch.testing.assert_close(frame_psnr(pred, true), 10 * torch.log10(1 / mse), rtol=0, atol=1e-4)
    assert (frame_psnr(true, true) == PSNR_MAX_DB).all()
    pred[0, 1, 0, 0, 0] = float("nan")
    out = frame_psnr(pred, true)
    assert out[0, 1].isnan() and int(out.isnan().sum()) == 1


def test_frame_metrics_are_fp32_inside_bf16_autocast():
    """The trainer evaluates under its bf16 autocast; SSIM's Gaussian filter is a conv2d, which autocast would run
    in bf16 (on a GPU a 41 dB VAE round trip then scored SSIM 0.34 and copy-last -0.25). CPU autocast casts conv2d
    the same way, so this checks the guard here. Oracles: identical frames give SSIM 1 and PSNR at the clamp."""
    from training.evaluation import frame_metrics
    g = torch.Generator().manual_seed(0)
    true = torch.rand(2, 3, 3, 48, 64, generator=g) * 2 - 1
    pred = (true + 0.02 * torch.randn(true.shape, generator=g)).clamp(-1, 1)
    psnr32, ssim32 = frame_metrics(pred, true)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        psnr16, ssim16 = frame_metrics(pred, true)
        same_psnr, same_ssim = frame_metrics(true, true)
    assert torch.allclose(ssim16, ssim32, atol=1e-5) and torch.allclose(psnr16, psnr32, atol=1e-4)
    assert (ssim32 > 0.9).all() and (ssim32 < 1).all()
    assert torch.allclose(same_ssim, torch.ones_like(same_ssim), atol=1e-5) and (same_psnr > 99).all()


def test_copy_last_vae_is_the_decoded_last_latent_and_equals_the_round_trip_on_a_still_clip():
    """copy_last_vae (the copy made in latent space): on a clip where nothing moves it is the VAE round trip of the
    future exactly, while copy_last is exact (PSNR at the clamp); on a moving clip it is the last past frame's round
    trip, so its error against the truth is copy_last's plus the VAE's."""
    from helpers import tiny_config, tiny_kl_vae
    from model import FrozenVAE, VideoPredictionDiffusion
    from training.evaluation import evaluate
    torch.manual_seed(0)
    model = VideoPredictionDiffusion(tiny_config(), FrozenVAE(tiny_kl_vae()))
    g = torch.Generator().manual_seed(1)
    still = (torch.rand(1, 3, 16, 16, generator=g) * 2 - 1).expand(T_PAST + T_FUTURE, 3, 16, 16)
    moving = torch.rand(T_PAST + T_FUTURE, 3, 16, 16, generator=g) * 2 - 1
    data = [{"frames": still, "cond": torch.zeros(0)}, {"frames": moving, "cond": torch.zeros(0)}]
    info = DistInfo(device=torch.device("cpu"))
    res = [evaluate(model, data, [i], info, {"model": model.unet}, steps=2, batch_size=1) for i in (0, 1)]
    assert all(v > 99 for v in res[0]["psnr"]["copy_last"])
    assert res[0]["psnr"]["copy_last_vae"] == res[0]["psnr"]["vae_roundtrip"]
    with torch.no_grad():
        decoded_last = model.vae.decode(model.vae.encode(moving[None, T_PAST - 1:T_PAST]))[0, 0]
    mse = (((decoded_last + 1) / 2 - (moving[T_PAST:] + 1) / 2) ** 2).flatten(1).mean(1)
    expected = (10 * torch.log10(1 / mse)).tolist()
    assert res[1]["psnr"]["copy_last_vae"] == pytest.approx(expected, abs=1e-3)
    assert res[1]["psnr"]["copy_last_vae"] != res[1]["psnr"]["vae_roundtrip"]

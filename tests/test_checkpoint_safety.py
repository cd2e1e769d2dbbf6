"""Issue 16 item 1: loading a checkpoint runs no code from it, and trained weights export to safetensors + JSON.

One real training run (the entry point, in this process, 2 steps) gives the checkpoint; a planted copy of it carries
an object whose `__reduce__` calls os.system to create a marker file, saved with the project's own save_checkpoint
(so its checksum is valid). Every loading path must refuse it with an error naming the file, and the marker must
never appear.
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import one_torch_thread  # noqa: F401  (autouse: one intra-op thread)
from reliability_helpers import make_world

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import diagnose_diffusion  # noqa: E402
import test_model_inference as inference_cli  # noqa: E402
import train_video_pred  # noqa: E402
from model.checkpoint import (_FOOTER_LEN, UnsafeCheckpointError, load_checkpoint, resolve_resume,  # noqa: E402
                              save_checkpoint)
from model.loading import LoadError, load_model  # noqa: E402
from tools import export as export_tool  # noqa: E402


class RunsCode:
    """Unpickling this calls os.system(command): what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.command = f"touch {marker}"

    def __reduce__(self):
        return os.system, (self.command,)


def train(args: list) -> int:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return train_video_pred.main([*map(str, args), "--device", "cpu"])
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real 2-step run (checkpoint at step 2) and its YAML config."""
    root = tmp_path_factory.mktemp("safety")
    world = make_world(root)
    cfg = world.yaml(root / "run.yaml", root / "runs", **{"train.max_steps": 2})
    os.environ.setdefault("WANDB_MODE", "disabled")
    assert train(["--config", cfg]) == 0
    return root / "runs" / "run", cfg


def plant(run_dir: Path, dest: Path, marker: Path, step: int = 4) -> Path:
    """The run's checkpoint with a code-running object added, saved (valid checksum) as checkpoint `step` of `dest`."""
    _, state = resolve_resume(run_dir / "checkpoints")
    state["extra"] = RunsCode(marker)
    return save_checkpoint(state, dest, step)


def test_a_trained_checkpoint_loads_without_unpickling_code(run):
    run_dir, cfg = run
    path, state = resolve_resume(run_dir / "checkpoints")
    assert state["step"] == 2 and "rng" not in state  # randomness is derived from (seed, rank, step), not saved
    # tensors and plain data only: nothing outside weights_only's default list
    assert torch.serialization.get_unsafe_globals_in_checkpoint(_payload(path)) == []
    assert load_model(run_dir).step == 2
    # a checkpoint of the same step as written before step seeds were derived: per-rank RNG states, numpy's among
    # them (allow-listed); it loads, and resumes into the same run (its "rng" entry is ignored)
    old = run_dir.parent / "old_rng"
    (old / "checkpoints").mkdir(parents=True)
    old_rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
               "cuda": None, "generators": {"train": torch.Generator().get_state()}}
    save_checkpoint({**state, "rng": [old_rng]}, old / "checkpoints", 2)
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(_payload(old / "checkpoints" / path.name))) <= {
        "numpy.dtype", "numpy.ndarray", "numpy._core.multiarray._reconstruct", "numpy.dtypes.UInt32DType"}
    assert load_model(old).step == 2
    assert train(["--config", cfg, "--resume", "latest", "--set", "train.max_steps=4", "logging.name=old_rng"]) == 0
    # and training resumes from it
    assert train(["--config", cfg, "--resume", "latest", "--set", "train.max_steps=4"]) == 0
    new_final, old_final = (resolve_resume(r / "checkpoints")[1] for r in (run_dir, old))
    assert new_final["step"] == old_final["step"] == 4
    assert all(torch.equal(new_final["unet"][k], old_final["unet"][k]) for k in new_final["unet"])


def _payload(path: Path) -> io.BytesIO:
    """The torch.save bytes of a checkpoint file, without the commit footer."""
    return io.BytesIO(path.read_bytes()[:-_FOOTER_LEN])


def test_load_checkpoint_refuses_code_and_names_the_file(run, tmp_path):
    marker = tmp_path / "marker"
    path = plant(run[0], tmp_path / "ckpt", marker)
    with pytest.raises(UnsafeCheckpointError, match=f"{path}.*posix.system"):
        load_checkpoint(path)
    assert not marker.exists()


def test_load_model_refuses_code(run, tmp_path):
    marker = tmp_path / "marker"
    path = plant(run[0], tmp_path / "planted" / "checkpoints", marker)
    for kw in ({"run": tmp_path / "planted"}, {"checkpoint": str(path)}):
        with pytest.raises(LoadError, match=str(path)):
            load_model(**kw)
    assert not marker.exists()


@pytest.mark.parametrize("tool", ["test_model_inference", "diagnose_diffusion"])
def test_inference_and_diagnosis_refuse_code(run, tmp_path, tool, capsys):
    marker = tmp_path / "marker"
    path = plant(run[0], tmp_path / "planted" / "checkpoints", marker)
    main = inference_cli.main if tool == "test_model_inference" else diagnose_diffusion.main
    capsys.readouterr()
    assert main(["--run", str(tmp_path / "planted"), "--out", str(tmp_path / "out"), "--clips", "1",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "posix.system" in err
    assert not marker.exists()


def test_resume_refuses_code_and_does_not_fall_back(run, tmp_path, capsys):
    """--resume FILE and --resume latest both stop (exit 2): a valid file carrying code is not skipped over for an
    older checkpoint as a torn write would be."""
    run_dir, cfg = run
    marker = tmp_path / "marker"
    evil_run = tmp_path / "runs" / "run"
    shutil.copytree(run_dir / "checkpoints", evil_run / "checkpoints")
    path = plant(run_dir, evil_run / "checkpoints", marker, step=100)
    for which in (str(path), "latest"):
        capsys.readouterr()
        assert train(["--config", cfg, "--resume", which, "--set", f"logging.run_dir={tmp_path / 'runs'}",
                      "train.max_steps=200"]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and "posix.system" in err, err
    assert not marker.exists()


def test_export_loads_in_every_tool_without_unpickling(run, tmp_path, monkeypatch):
    run_dir, _ = run
    out = tmp_path / "export"
    assert export_tool.main(["--run", str(run_dir), "--out", str(out)]) == 0
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["config.json", "unet.safetensors", "unet_ema.safetensors", "vae/config.json",
                     "vae/diffusion_pytorch_model.safetensors"]
    assert json.loads((out / "config.json").read_text())["config"]["vae"]["pretrained"] == "vae"
    original = load_model(run_dir)

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load called while loading an export")
    monkeypatch.setattr(torch, "load", no_unpickling)
    exported = load_model(out)
    assert exported.step == original.step and exported.checkpoint == out
    for a, b in ((exported.raw_unet, original.raw_unet), (exported.ema_unet, original.ema_unet)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(next(exported.ema_unet.parameters()), next(exported.raw_unet.parameters()))
    assert exported.ema_state["optimization_step"] == original.ema_state["optimization_step"]
    assert exported.cfg.vae.pretrained == str((out / "vae").resolve())
    assert exported.cfg.unet == original.cfg.unet and exported.cfg.diffusion == original.cfg.diffusion
    # the folder is complete without the run's VAE folder, and a tool predicts from it
    moved = shutil.move(str(out), tmp_path / "elsewhere")
    clip = sorted(p for p in (run_dir.parents[1] / "world").iterdir() if p.is_dir())[0]
    assert inference_cli.main(["--run", str(moved), "--frames", str(clip), "--out", str(tmp_path / "pred"),
                               "--clips", "1", "--device", "cpu", "--steps", "2"]) == 0


def test_a_file_that_is_not_a_checkpoint_of_this_project_is_named_not_a_traceback(run, tmp_path, capsys):
    """Issue 16 item 13: valid checkpoint files without a 'unet' (or not even a dict) end in one line, exit 2."""
    _, cfg = run
    _, state = resolve_resume(run[0] / "checkpoints")
    cases = {"tensor": torch.zeros(3), "no_unet": {k: v for k, v in state.items() if k != "unet"},
             "weights_only": {k: state[k] for k in ("unet", "ema", "config", "vae", "model_args")}}
    for name, payload in cases.items():
        path = save_checkpoint(payload, tmp_path / name, 1)
        capsys.readouterr()
        assert train(["--config", cfg, "--resume", path]) == 2
        err = capsys.readouterr().err
        assert f"cannot resume from {path}" in err and "Traceback" not in err, err
        if name == "weights_only":  # the tools load weights alone; resume needs the training state too
            assert "not a training checkpoint" in err, err
            continue
        with pytest.raises(LoadError, match=str(path)):
            load_model(checkpoint=str(path))

"""tools/evaluate.py, tools/predict.py and tools/anomaly.py on a tiny trained run (16x16 frames, 6 optimizer steps):
the same numbers as the trainer, every frame predicted, files that open, run from another directory."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import one_torch_thread  # noqa: F401 (fixture)
from trainer_helpers import REPO, explain, make_world, run_cli, write_yaml

sys.path.insert(0, str(REPO))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run trained by the real command line; its final evaluation covers every val window."""
    root = tmp_path_factory.mktemp("tools")
    world = make_world(root)
    raw = world.config(root / "runs", **{"train.max_steps": 6, "train.ema_decay": 0.9, "train.eval_clips": 0})
    proc = run_cli(["--config", str(write_yaml(root / "run.yaml", raw))], root)
    assert proc.returncode == 0, explain(proc)
    return root / "runs" / "run"


def test_evaluate_gives_the_trainers_numbers_from_any_directory(run, tmp_path, monkeypatch, capsys):
    from tools import evaluate
    monkeypatch.chdir(tmp_path)
    trainer = json.loads(next((run / "eval").glob("step_*.json")).read_text())
    assert evaluate.main(["--run", str(run), "--out", "ev"]) == 0
    ours = json.loads((tmp_path / "ev" / "evaluate.json").read_text())
    assert ours["num_clips"] == trainer["num_clips"] == 6
    for metric in ("psnr", "ssim"):  # same windows, seed and precision: the same numbers (to the VAE's batch rounding)
        assert set(ours[metric]) == set(trainer[metric])
        for row, values in trainer[metric].items():
            assert ours[metric][row] == pytest.approx(values, abs=2e-4), (metric, row)
    assert "copy_last_vae" in capsys.readouterr().out


def test_evaluate_rollout_samples_and_window_selection(run, tmp_path):
    from tools import evaluate
    out = tmp_path / "ev"
    assert evaluate.main(["--run", str(run), "--out", str(out), "--rollout", "2", "--samples", "2",
                          "--weights", "ema", "--data-root", str(run.parents[1] / "world")]) == 0
    res = json.loads((out / "evaluate.json").read_text())
    assert res["rounds"] == 2 and len(res["psnr"]["model"]) == 4 and "raw" not in res["psnr"]
    assert {"model.k2_mean", "model.k2_best", "model.k2_avg"} <= set(res["psnr"]) and res["samples"] == 2
    assert res["num_clips"] == 6 * 2  # 6 clips of 8 frames, windows of 6 frames every 2nd frame: starts 0 and 2
    assert evaluate.main(["--run", str(run), "--out", str(out), "--last-fraction", "0.5", "--windows", "1"]) == 0
    res = json.loads((out / "evaluate.json").read_text())
    assert res["num_clips"] == 1 and int(res["windows"][0].split("@")[1]) >= 4  # inside the last half of 8 frames

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
    raw = world.config(root / "runs", **{"train.max_steps": 6, "ema.decay": 0.9, "eval.clips": 0})
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


def read_csv(path: Path) -> list[dict]:
    import csv
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_predict_every_frame_of_a_folder_and_a_video(run, tmp_path):
    """Every frame after the first t_past gets a prediction at t+1, and at t+h from the frame t_past+h-1 on; the mp4
    and the GIF hold one frame per input frame; the numbers do not depend on the batch size; a video of the same
    frames gives a prediction for every frame too."""
    import numpy as np
    from PIL import Image

    from data.video import count_frames
    from tools import predict
    clip = run.parents[1] / "world" / "clip_0000"  # 8 frames of 16x16
    out = tmp_path / "p"
    assert predict.main(["--run", str(run), "--input", str(clip), "--out", str(out), "--rollout", "2", "--png",
                         "--batch-size", "4"]) == 0
    rows = read_csv(out / "frames.csv")
    assert [int(r["frame"]) for r in rows] == list(range(8))
    for f, r in enumerate(rows):
        for h in range(1, 5):
            assert (r[f"psnr_t+{h}"] != "") == (f >= 2 + h - 1), (f, h)
        assert (r["copy_last_psnr_t+1"] != "") == (f >= 1)
    assert count_frames(out / "predict.mp4") == 8
    with Image.open(out / "predict.gif") as gif:
        assert gif.n_frames == 8
    assert sorted(p.name for p in (out / "predicted").iterdir()) == [f"{f:06d}.png" for f in range(2, 8)]
    # summary: copy-last at t+1 averaged over the frames the model predicts (2..7), not frame 1 too
    copy_t1 = json.loads((out / "summary.json").read_text())["mean_per_horizon"]["copy_last_psnr"][0]
    assert copy_t1 == pytest.approx(np.mean([float(r["copy_last_psnr_t+1"]) for r in rows[2:]]), abs=1e-3)
    again = tmp_path / "q"
    assert predict.main(["--run", str(run), "--input", str(clip), "--out", str(again), "--rollout", "2",
                         "--batch-size", "1"]) == 0
    for a, b in zip(rows, read_csv(again / "frames.csv")):
        assert a["psnr_t+1"] == b["psnr_t+1"] and a["psnr_t+4"] == b["psnr_t+4"]

    frames = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(clip.glob("*.png"))])
    video = tmp_path / "clip.mp4"
    predict.write_mp4(frames, video, 10)
    assert predict.main(["--run", str(run), "--input", str(video), "--out", str(tmp_path / "v")]) == 0
    rows = read_csv(tmp_path / "v" / "frames.csv")
    assert len(rows) == 8 and all(r["psnr_t+1"] for r in rows[2:]) and json.loads(
        (tmp_path / "v" / "summary.json").read_text())["predicted_frames"] == 6


def test_anomaly_tool_scores_every_predicted_frame(run, tmp_path):
    from PIL import Image

    from tools import anomaly as tool
    world = run.parents[1] / "world"
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"clip_0000": [[4, 5]], "clip_0003": [[6, 7]]}))
    out = tmp_path / "a"
    assert tool.main(["--run", str(run), "--data-root", str(world), "--labels", str(labels), "--out", str(out),
                      "--clips", "4", "--rollout", "2"]) == 0
    res = json.loads((out / "anomaly.json").read_text())
    assert res["frames_scored"] == 4 * (8 - 2) and res["frames_anomalous"] == 4
    assert set(res["auc"]) == set(tool.SCORES) and all(0 <= v <= 1 for v in res["auc"].values())
    assert res["auc_per_clip"]["clip_0001"]["model_t+1"] == "nan"  # no anomalous frame: no AUC
    rows = read_csv(out / "scores.csv")
    assert len(rows) == 4 * 8 and sum(r["label"] == "1" for r in rows) == 4
    assert all((r["model_t+1"] == "") == (int(r["frame"]) < 2) for r in rows)
    for name in ("roc.png", "curves.png", "curves/clip_0002.png"):
        with Image.open(out / name) as img:
            assert img.size[0] > 100


def test_anomaly_tool_reports_each_event_kind_when_the_labels_name_it(run, tmp_path):
    """Labels in the synthetic world's format ("clips" + "events" with a kind): by_kind holds, per score, each kind's
    AUC against every normal frame, which is the AUC of those frames' scores in scores.csv."""
    import torch

    from diagnosis import anomaly
    from tools import anomaly as tool
    world = run.parents[1] / "world"
    labels = tmp_path / "anomalies.json"
    labels.write_text(json.dumps({"clips": {"clip_0000": [[4, 5]], "clip_0001": [[3, 3]]},
                                  "events": {"clip_0000": [{"kind": "stop", "label": [4, 5]}],
                                             "clip_0001": [{"kind": "jump", "label": [3, 3]}]}}))
    out = tmp_path / "k"
    assert tool.main(["--run", str(run), "--data-root", str(world), "--labels", str(labels), "--out", str(out),
                      "--clips", "3", "--smooth", "1"]) == 0
    kinds = json.loads((out / "anomaly.json").read_text())["by_kind"]["model_t+1"]
    assert kinds["stop"]["frames"] == 2 and kinds["jump"]["frames"] == 1
    assert kinds["normal_after_event"]["frames"] == 2 + 4  # up to 4 after: frames 6, 7 of clip 0, 4..7 of clip 1
    rows = [r for r in read_csv(out / "scores.csv") if r["model_t+1"]]
    stop = [float(r["model_t+1"]) for r in rows if r["clip"] == "clip_0000" and r["label"] == "1"]
    normal = [float(r["model_t+1"]) for r in rows if r["label"] == "0"]
    expected = anomaly.auc(torch.tensor(stop + normal), torch.tensor([1] * len(stop) + [0] * len(normal)).bool())
    assert kinds["stop"]["auc"] == pytest.approx(expected, abs=1e-4)
    # --smooth 1: every score also smoothed over time, from the clip's PSNR series in scores.csv
    res = json.loads((out / "anomaly.json").read_text())
    assert {"model_t+1_smooth1", "copy_last_mean_raw_smooth1"} <= set(res["auc"]) and "model_t+1_smooth1" in res["by_kind"]
    clip = [r for r in read_csv(out / "scores.csv") if r["clip"] == "clip_0000"]
    psnr = torch.tensor([float(r["model_psnr_t+1"] or "nan") for r in clip])
    smoothed = anomaly.anomaly_scores(anomaly.smooth(psnr, 1.0), normalise=True)
    assert [float(r["model_t+1_smooth1"] or "nan") for r in clip] == pytest.approx(smoothed.tolist(), abs=1e-4,
                                                                                    nan_ok=True)


@pytest.mark.parametrize("bad", [["--smooth", "0"], ["--smooth", "-1"], ["--samples", "0"]])
def test_anomaly_tool_refuses_bad_numbers_before_loading_anything(bad, capsys):
    from tools import anomaly as tool
    with pytest.raises(SystemExit) as e:
        tool.main(["--run", "no_such_run", "--data-root", "no_such_root", *bad])
    assert e.value.code == 2 and bad[0] in capsys.readouterr().err

"""Anomaly scoring (diagnosis/anomaly.py): AUC and regularity against hand-computed values, every label format."""
from __future__ import annotations

import math

import pytest
import torch

from diagnosis import anomaly
from helpers import one_torch_thread  # noqa: F401 (fixture)


def test_auc_of_hand_made_scores():
    # 4 positives x 4 negatives = 16 pairs: positive above negative in 4 + 4 + 2 + 2, one tie (1/2): 12.5 / 16
    scores = torch.tensor([0.9, 0.8, 0.5, 0.3, 0.7, 0.5, 0.2, 0.1])
    labels = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    pairs = [(p, n) for p in scores[:4].tolist() for n in scores[4:].tolist()]
    expected = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert expected == pytest.approx(12.5 / 16)
    assert anomaly.auc(scores, labels) == pytest.approx(expected, abs=1e-6)
    assert anomaly.auc(-scores, labels) == pytest.approx(1 - expected, abs=1e-6)
    # NaN scores (frames no window predicts) are left out; one class only: no AUC
    assert anomaly.auc(torch.cat([scores, torch.tensor([math.nan])]), torch.cat([labels, torch.tensor([True])])) == \
        pytest.approx(expected, abs=1e-6)
    assert math.isnan(anomaly.auc(scores[:4], labels[:4]))
    fpr, tpr = anomaly.roc(scores, labels)
    area = sum((fpr[i + 1] - fpr[i]) * (tpr[i + 1] + tpr[i]) / 2 for i in range(len(fpr) - 1))
    assert area == pytest.approx(expected, abs=1e-6)


def test_regularity_is_per_clip_min_max():
    psnr = torch.tensor([math.nan, math.nan, 30.0, 20.0, 25.0, 30.0])
    s = anomaly.regularity(psnr)
    assert s[:2].isnan().all() and s[2:].tolist() == pytest.approx([1.0, 0.0, 0.5, 1.0])
    assert anomaly.anomaly_scores(psnr, True)[3] == 1.0 and anomaly.anomaly_scores(psnr, False)[3] == -20.0
    assert anomaly.regularity(torch.tensor([5.0, 5.0])).tolist() == [1.0, 1.0]


def test_patch_score_finds_a_small_error_that_the_frame_psnr_dilutes():
    # the same total squared error, once in one 8x8 patch (a small object predicted wrong), once spread evenly over
    # the 64x64 frame: equal frame PSNR; the worst 8x8 patch of the first is the whole error, of the second 1/64 of it
    from training.evaluation import frame_metrics

    truth = torch.zeros(2, 3, 64, 64)
    d = 0.8  # error in [-1, 1] pixel units: d / 2 on [0, 1] images
    pred = truth.clone()
    pred[0, :, 16:24, 32:40] = d
    pred[1] = d / 8  # 64 * d^2 = 4096 * (d / 8)^2
    frame = frame_metrics(pred[None], truth[None])[0][0].tolist()
    assert frame[0] == pytest.approx(frame[1], abs=1e-3)
    assert frame[1] == pytest.approx(-10 * math.log10((d / 16) ** 2), abs=1e-3)
    patch = anomaly.patch_psnr(pred, truth, 8)
    assert float(patch[0]) == pytest.approx(-10 * math.log10((d / 2) ** 2), abs=1e-3)
    assert float(patch[1]) == pytest.approx(frame[1], abs=1e-3)
    scores = anomaly.anomaly_scores(patch, normalise=False)
    assert scores[0] > scores[1] + 15  # 10 log10(64) = 18 dB apart
    # a patch larger than the frame is the frame; identical frames score the 100 dB cap, not inf
    assert anomaly.patch_psnr(pred, truth, 100).tolist() == pytest.approx(frame, abs=1e-3)
    assert anomaly.patch_psnr(truth, truth, 8).tolist() == [100.0, 100.0]
    # a patch straddling the stride grid is still covered by a window half of it at least
    pred2 = truth[:1].clone()
    pred2[0, :, 18:26, 34:42] = d
    assert float(anomaly.patch_psnr(pred2, truth[:1], 8)[0]) <= -10 * math.log10((d / 2) ** 2 / 4) + 1e-3


def test_every_label_format_gives_the_same_intervals(tmp_path):
    clips = ["Test001", "Test002", "Test003"]
    want = {"Test001": [(60, 179)], "Test002": [(94, 179)], "Test003": [(0, 9), (20, 29)]}
    (tmp_path / "l.json").write_text('{"Test001": [[60, 179]], "Test002": [[94, 179]], "Test003": [[0, 9], [20, 29]]}')
    (tmp_path / "l.csv").write_text("clip,start,end\nTest001,60,179\nTest002,94,179\nTest003,0,9\nTest003,20,29\n")
    (tmp_path / "UCSDped2.m").write_text(
        "TestDataset = struct();\nTestDataset.gt_frame{1} = [61:180];\nTestDataset.gt_frame{2} = [95:180];\n"
        "TestDataset.gt_frame{3} = [1:10, 21:30];\n")
    for name in ("l.json", "l.csv", "UCSDped2.m"):
        assert anomaly.load_labels(tmp_path / name, clips) == want, name
    scipy_io = pytest.importorskip("scipy.io")
    import numpy as np
    cells = np.empty((1, 3), dtype=object)
    cells[0, 0], cells[0, 1], cells[0, 2] = np.array([[61], [180]]), np.array([[95], [180]]), np.array([[1, 21], [10, 30]])
    scipy_io.savemat(tmp_path / "ped2.mat", {"gt": cells})
    assert anomaly.load_labels(tmp_path / "ped2.mat", clips) == want
    with pytest.raises(ValueError, match="by order"):
        anomaly.load_labels(tmp_path / "UCSDped2.m", clips[:2])


def test_frame_labels_and_intervals_round_trip():
    frames = [0, 2, 4, 6, 8, 10]  # every 2nd frame of a clip
    y = anomaly.frame_labels([(3, 6), (10, 12)], frames)
    assert y.tolist() == [False, False, True, True, False, True]
    assert anomaly.intervals_of(y) == [(2, 3), (5, 5)]


def test_score_curve_shades_the_labelled_frames():
    img = anomaly.score_curve(list(range(20)), {"s": [float(i % 5) for i in range(20)]}, [(5, 9)], "t")
    px = img.load()
    shaded = [x for x in range(img.width) if px[x, img.height // 2] == (255, 214, 214)]
    assert shaded and 0.2 < (min(shaded) / img.width) < 0.5  # frames 5..9 of 0..19: a band left of the middle


def test_synthetic_anomalies_break_the_law_only_where_labelled(tmp_path):
    """An anomalous world is the normal world of the same seed except for the event's object from the event on: in
    its abnormal frames it stands still (stop), retraces its track (reverse), runs 3x (speedup) or leaves its track
    (jump); anomalies.json labels [start, end + 1]. Every other object, and the frames before, are unchanged."""
    import dataclasses
    import json

    import numpy as np

    from configs.schema import SyntheticConfig
    from data.synthetic import anomaly_events, object_tracks, render_clip, write_world
    normal = SyntheticConfig(enabled=True, num_clips=8, frames_per_clip=24, height=24, width=24, num_objects=2, seed=3)
    odd = dataclasses.replace(normal, anomalies=2, anomaly_frames=3)
    kinds = set()
    for c in range(8):
        base, tr = object_tracks(normal, c), object_tracks(odd, c)
        events = anomaly_events(odd, c)
        assert len(events) == 2 and events[0]["end"] < events[1]["start"]
        first = events[0]["start"]
        assert np.array_equal(render_clip(normal, c)[0][:first], render_clip(odd, c)[0][:first])
        moved = {e["object"] for e in events}
        for k in set(range(2)) - moved:
            assert np.array_equal(base.x[:, k], tr.x[:, k]) and np.array_equal(base.y[:, k], tr.y[:, k])
        e = events[0]
        k, a, b = e["object"], e["start"], e["end"]
        pos, ref = np.stack([tr.x[:, k], tr.y[:, k]], 1), np.stack([base.x[:, k], base.y[:, k]], 1)
        expected = {"stop": [ref[a - 1]] * 3, "reverse": [ref[a - 2 - j] for j in range(3)],
                    "speedup": [ref[a - 1 + 3 * (j + 1)] for j in range(3)]}.get(e["kind"])
        if expected is not None:
            assert np.allclose(pos[a:b + 1], np.stack(expected), atol=1e-4), e
        else:
            assert np.array_equal(pos[b + 1:events[1]["start"]], ref[b + 1:events[1]["start"]])  # back on its track
        assert e["label"] == [a, b + 1]
        kinds.add(e["kind"])
    assert len(kinds) >= 3
    write_world(odd, tmp_path / "w", progress=False)
    labels = json.loads((tmp_path / "w" / "anomalies.json").read_text())
    assert labels["clips"]["clip_0005"] == [e["label"] for e in anomaly_events(odd, 5)]
    assert anomaly.load_labels(tmp_path / "w" / "anomalies.json", [])["clip_0005"] == \
        [tuple(e["label"]) for e in anomaly_events(odd, 5)]


def test_by_kind_splits_the_auc_by_event_and_reports_the_frames_after_it(tmp_path):
    """Hand-made scores on one 12-frame clip with a 'stop' labelled [3, 5] and a 'jump' labelled [8, 9]: the stop's
    frames score 0.9 / 0.2 / 0.9, the jump's 1.0 / 1.0, normal frames 0.1 except 0.6 right after the stop."""
    import json
    labels = {"clips": {"c": [[3, 5], [8, 9]]},
              "events": {"c": [{"kind": "stop", "label": [3, 5]}, {"kind": "jump", "label": [8, 9]}]}}
    (tmp_path / "a.json").write_text(json.dumps(labels))
    (tmp_path / "a.csv").write_text("c,3,5\n")
    events = anomaly.load_events(tmp_path / "a.json")
    assert [e["kind"] for e in events["c"]] == ["stop", "jump"] and anomaly.load_events(tmp_path / "a.csv") == {}
    s = torch.tensor([math.nan, 0.1, 0.1, 0.9, 0.2, 0.9, 0.6, 0.1, 1.0, 1.0, 0.1, 0.1])
    r = anomaly.by_kind({"c": s}, {"c": list(range(12))}, events, after=2)
    # normal frames: 1, 2, 6, 7, 10, 11 (0 has no score) = five at 0.1 and one at 0.6
    # stop: pairs (0.9 or 0.2) against those: 0.9 beats all 6 (twice), 0.2 beats the five 0.1s -> (12 + 5) / 18
    assert r["stop"]["frames"] == 3 and r["stop"]["auc"] == pytest.approx(17 / 18)
    assert r["stop"]["mean_score_by_position"] == pytest.approx([0.9, 0.2, 0.9])
    assert r["jump"]["auc"] == pytest.approx(1.0) and r["jump"]["mean_score_by_position"] == pytest.approx([1.0, 1.0])
    # after an interval: frame 6 (1 after the stop), 7 (2 after), 10 (1 after the jump), 11 (2 after)
    assert r["normal_after_event"]["mean_score_by_distance"] == pytest.approx([0.35, 0.1])
    assert r["normal_after_event"]["frames"] == 4
    assert r["normal_elsewhere"] == {"mean_score": pytest.approx(0.1), "frames": 2}


def test_smooth_is_a_gaussian_over_the_finite_frames_of_a_clip():
    psnr = torch.tensor([math.nan, 30.0, 20.0, 20.0, 35.0, 20.0, 20.0, 20.0, 30.0])
    sigma = 1.0
    out = anomaly.smooth(psnr, sigma)
    # by hand: each finite frame's Gaussian-weighted mean over its finite neighbours within 3 sigma
    for i in range(len(psnr)):
        if math.isnan(psnr[i]):
            assert math.isnan(out[i])
            continue
        pairs = [(math.exp(-0.5 * ((j - i) / sigma) ** 2), float(psnr[j])) for j in range(len(psnr))
                 if abs(j - i) <= 3 and math.isfinite(psnr[j])]
        assert float(out[i]) == pytest.approx(sum(w * v for w, v in pairs) / sum(w for w, _ in pairs), abs=1e-4)
    assert anomaly.smooth(psnr, 0).tolist()[1:] == psnr.tolist()[1:]
    assert anomaly.smooth(torch.full((7,), 25.0), 2.0).tolist() == pytest.approx([25.0] * 7)


def test_smoothing_lets_an_event_seen_at_its_onset_and_end_be_seen_between():
    # a stop as prediction error sees it: high at its first frame and where motion resumes, low between (the past
    # already shows the object standing); normal frames low, with noise
    g = torch.Generator().manual_seed(0)
    scores = 0.1 + 0.05 * torch.rand(40, generator=g)
    labels = torch.zeros(40, dtype=torch.bool)
    for a in (10, 25):
        scores[a], scores[a + 1], scores[a + 2], scores[a + 3] = 0.9, 0.11, 0.1, 0.9
        labels[a:a + 4] = True
    raw = anomaly.auc(scores, labels)
    assert raw < 0.85  # the two middle frames score like normal ones
    assert anomaly.auc(anomaly.smooth(scores, 1.0), labels) > 0.95


def test_an_oracle_that_knows_the_law_predicts_normal_motion_exactly_and_a_stop_from_its_second_frame(tmp_path):
    """bench/anomaly_oracle.py: the world's own renderer at a clock extrapolated from the past. Normal frames far
    from an event are predicted exactly; inside a 'stop' the last-two-frames oracle is exact again from the event's
    second frame (the past already shows the object standing): no prediction error can see those frames."""
    import json

    from bench import anomaly_oracle as oracle
    from configs.loader import load_config
    from data.synthetic import anomaly_events

    world = ["data.synthetic.num_clips=4", "data.synthetic.frames_per_clip=20", "data.synthetic.anomaly_kinds=[stop]"]
    cfg = load_config("configs/anomaly_synthetic.yaml", oracle.STUDY_WORLD + world)
    sc = cfg.data.synthetic
    for clip in range(2):
        ev = anomaly_events(sc, clip)
        psnr = oracle.oracle_psnr(sc, clip, cfg.data.t_past, "last2")
        near = {f for e in ev for f in range(e["label"][0] - 1, e["label"][1] + 3)}
        assert all(psnr[f] == 100.0 for f in range(cfg.data.t_past, 20) if f not in near)
        for e in ev:
            a = e["start"]
            assert psnr[a] < 60 and psnr[a + 1] == 100.0 and psnr[a + 2] == 100.0 and psnr[a + 3] < 60
    out = tmp_path / "oracle.json"
    assert oracle.main(["--set", *world, "--fit", "last2", "--out", str(out)]) == 0
    r = json.loads(out.read_text())["fits"]["last2"]
    assert r["t+1"]["mean_score_by_position"]["stop"][1:3] == [0.0, 0.0]
    assert r["t+1_smooth1"]["auc"] > r["t+1"]["auc"]


def test_an_imperfect_oracle_loses_what_smoothing_gave_the_exact_one(tmp_path):
    """bench/anomaly_oracle.py --jitter: a clock misjudged by D frames of motion predicts normal frames no longer
    exactly (their PSNR falls from the 100 dB cap to a value that falls as D grows), the same D and clip give the
    same prediction (seeded), and the time smoothing that lifts the exact oracle's AUC lifts the jittered one's less
    (its normal frames no longer score exactly 0)."""
    import json

    from bench import anomaly_oracle as oracle
    from configs.loader import load_config

    world = ["data.synthetic.num_clips=6", "data.synthetic.frames_per_clip=24"]
    sc = load_config("configs/anomaly_synthetic.yaml", oracle.STUDY_WORLD + world).data.synthetic
    assert oracle.oracle_psnr(sc, 0, 4, "last2", 0.2)[4:] == oracle.oracle_psnr(sc, 0, 4, "last2", 0.2)[4:]  # 0-3: NaN
    out = tmp_path / "oracle.json"
    assert oracle.main(["--set", *world, "--fit", "last2", "--jitter", "0", "0.1", "0.5", "--out", str(out)]) == 0
    fits = json.loads(out.read_text())["fits"]
    exact, small, large = fits["last2"], fits["last2_jitter0.1"], fits["last2_jitter0.5"]
    assert exact["normal_frames_psnr_median"] == 100.0
    assert 100.0 > small["normal_frames_psnr_median"] > large["normal_frames_psnr_median"]
    assert small["normal_frames_predicted_exactly"] == 0.0
    gain = {k: v["t+1_smooth1"]["auc"] - v["t+1"]["auc"] for k, v in (("exact", exact), ("small", small))}
    assert gain["exact"] > gain["small"]

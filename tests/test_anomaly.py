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

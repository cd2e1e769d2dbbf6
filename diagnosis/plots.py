"""Charts for the diagnosis: line plots and a tiling of them, drawn with Pillow (pictures of frames are
training/visualize.py's).

Written by hand because matplotlib is not a dependency of the project, and these plots need only lines, axes,
tick labels and a legend.
"""
from __future__ import annotations

import math

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]
_W, _H = 420, 260  # one panel, pixels
_LEFT, _RIGHT, _TOP, _BOTTOM = 58, 12, 22, 34  # margins around the plot area


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-2:
        return f"{v:.1e}"
    return f"{v:.3g}"


def line_plot(series: dict[str, tuple[list, list]], title: str, xlabel: str = "", logy: bool = False,
              hlines: dict[str, float] | None = None, xlines: dict[str, float] | None = None,
              xspans: list[tuple[float, float]] | None = None) -> Image.Image:
    """One panel: each series (label -> (xs, ys)) as a line with dots; hlines / xlines are labelled dashed guides;
    xspans are shaded x intervals (e.g. labelled anomalous frames).
    Non-finite points are skipped (and counted in the legend); with logy, values <= 0 are skipped too (silently:
    empty histogram bins, exact zeros)."""
    img = Image.new("RGB", (_W, _H), "white")
    d = ImageDraw.Draw(img)
    d.text((_LEFT, 4), title, fill=(0, 0, 0))
    guides = dict(hlines or {})

    def ok(y):
        return y is not None and math.isfinite(y) and (y > 0 or not logy)

    ys_all = [float(y) for _, ys in series.values() for y in ys if ok(float(y))] + \
             [v for v in guides.values() if ok(v)]
    xs_all = [float(x) for xs, _ in series.values() for x in xs] + list((xlines or {}).values())
    if not ys_all or not xs_all:
        d.text((_LEFT, _H // 2), "no finite values", fill=(200, 0, 0))
        return img
    f = (lambda y: math.log10(y)) if logy else (lambda y: y)
    y0, y1 = f(min(ys_all)), f(max(ys_all))
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad
    x0, x1 = min(xs_all), max(xs_all)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pw, ph = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def px(x, y):
        return _LEFT + (x - x0) / (x1 - x0) * pw, _TOP + (1 - (f(y) - y0) / (y1 - y0)) * ph

    integer_x = all(float(x).is_integer() for x in xs_all)
    for a, b in xspans or []:  # shaded first, so lines and dots stay on top
        xa = min(max(px(a - 0.5 if integer_x else a, 1.0 if logy else y0)[0], _LEFT), _LEFT + pw)
        xb = min(max(px(b + 0.5 if integer_x else b, 1.0 if logy else y0)[0], _LEFT), _LEFT + pw)
        d.rectangle([xa, _TOP, xb, _TOP + ph], fill=(255, 214, 214))
    d.rectangle([_LEFT, _TOP, _LEFT + pw, _TOP + ph], outline=(0, 0, 0))
    for k in range(5):  # y ticks
        yv = y0 + k * (y1 - y0) / 4
        yy = _TOP + (1 - k / 4) * ph
        d.line([_LEFT - 3, yy, _LEFT, yy], fill=(0, 0, 0))
        d.text((2, yy - 5), _fmt(10 ** yv if logy else yv), fill=(0, 0, 0))
    for k in range(5):  # x ticks (whole numbers when every x is one: steps, timesteps)
        xv = x0 + k * (x1 - x0) / 4
        xv = round(xv) if integer_x else xv
        xx = _LEFT + (xv - x0) / (x1 - x0) * pw
        d.line([xx, _TOP + ph, xx, _TOP + ph + 3], fill=(0, 0, 0))
        d.text((xx - 10, _TOP + ph + 5), _fmt(xv), fill=(0, 0, 0))
    d.text((_LEFT + pw // 2 - 3 * len(xlabel), _H - 13), xlabel, fill=(0, 0, 0))
    for (label, value), colour in zip(guides.items(), COLOURS[::-1]):
        if ok(value):
            yy = px(x0, value)[1]
            for xx in range(_LEFT, _LEFT + pw, 8):
                d.line([xx, yy, xx + 4, yy], fill=(110, 110, 110))
            d.text((_LEFT + pw - 6 * len(label) - 4, yy - 11), label, fill=(90, 90, 90))
    for label, xv in (xlines or {}).items():
        xx = px(xv, math.pow(10, y0) if logy else y0)[0]
        for yy in range(_TOP, _TOP + ph, 8):
            d.line([xx, yy, xx, yy + 4], fill=(110, 110, 110))
        right = xx > _LEFT + pw - 8 * len(label)  # near the right edge: label on the line's left
        d.text((xx - 6 * len(label) - 2 if right else xx + 2, _TOP + ph - 12), label, fill=(90, 90, 90))
    texts, drawn = [], []  # legend lines; every point the lines pass (to keep the legend off them)
    for (label, (xs, ys)), colour in zip(series.items(), COLOURS):
        pts = [px(float(x), float(y)) for x, y in zip(xs, ys) if ok(float(y))]
        skipped = sum(not math.isfinite(float(y)) for y in ys)
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        drawn += [(a[0] + (b[0] - a[0]) * k / 16, a[1] + (b[1] - a[1]) * k / 16)
                  for a, b in zip(pts, pts[1:]) for k in range(16)] + pts
        texts.append((label + (f" ({skipped} non-finite)" if skipped else ""), colour))
    if texts:  # in the corner of the plot area where it covers the fewest line points, on white
        lw, lh = 22 + 6 * max(len(t) for t, _ in texts), 12 * len(texts) + 4
        corners = [(_LEFT + 2, _TOP + 2), (_LEFT + pw - lw - 2, _TOP + 2), (_LEFT + 2, _TOP + ph - lh - 2),
                   (_LEFT + pw - lw - 2, _TOP + ph - lh - 2)]
        lx, ly = min(corners, key=lambda c: sum(c[0] <= x <= c[0] + lw and c[1] <= y <= c[1] + lh for x, y in drawn))
        d.rectangle([lx, ly, lx + lw, ly + lh], fill="white", outline=(200, 200, 200))
        for k, (text, colour) in enumerate(texts):
            d.rectangle([lx + 4, ly + 5 + 12 * k, lx + 12, ly + 11 + 12 * k], fill=colour)
            d.text((lx + 16, ly + 2 + 12 * k), text, fill=(0, 0, 0))
    return img


def tile(panels: list[Image.Image], columns: int = 2) -> Image.Image:
    """Panels of equal size in a grid, row-major."""
    rows = math.ceil(len(panels) / columns)
    w, h = panels[0].size
    out = Image.new("RGB", (w * min(columns, len(panels)), h * rows), "white")
    for i, p in enumerate(panels):
        out.paste(p, ((i % columns) * w, (i // columns) * h))
    return out

"""Check results and the report: report.json ({"checks": [...]}), report.md and a console table."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

PASS, WARN, FAIL = "pass", "warn", "fail"


@dataclass
class Check:
    name: str
    status: str  # pass | warn | fail
    value: object  # what was measured (a number, or a small dict of numbers)
    expected: str  # the range a healthy setup gives
    hint: str  # one line: what it means and what to do
    details: dict = field(default_factory=dict)  # curves and counts behind the value (report.json only)

    def __post_init__(self):
        assert self.status in (PASS, WARN, FAIL), self.status


def grade(value: float, pass_if, warn_if) -> str:
    """PASS when pass_if(value), else WARN when warn_if(value), else FAIL (also for NaN/Inf)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return FAIL
    return PASS if pass_if(value) else WARN if warn_if(value) else FAIL


def json_safe(x):
    """NaN/Inf become strings (JSON has no NaN); tensors and numpy numbers become floats."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    return x


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_short(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


def write_report(checks: list[Check], out: Path, header: dict, pictures: dict[str, str]) -> tuple[Path, Path]:
    """report.json (machine-readable) and report.md (a table, then the pictures) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    data = {**json_safe(header), "checks": [json_safe(asdict(c)) for c in checks], "pictures": pictures}
    (out / "report.json").write_text(json.dumps(data, indent=1))
    counts = {s: sum(c.status == s for c in checks) for s in (PASS, WARN, FAIL)}
    lines = ["# Diagnosis report", ""]
    lines += [f"- **{k}**: {_short(v)}" for k, v in header.items()]
    lines += [f"- **result**: {counts[PASS]} pass, {counts[WARN]} warn, {counts[FAIL]} fail", "",
              "| check | status | value | expected | hint |", "| --- | --- | --- | --- | --- |"]
    for c in checks:
        status = {PASS: "pass", WARN: "**warn**", FAIL: "**FAIL**"}[c.status]
        row = [c.name, status, _short(c.value), c.expected, c.hint]
        lines.append("| " + " | ".join(str(x).replace("|", "/").replace("\n", " ") for x in row) + " |")
    lines += ["", "## Pictures", ""]
    for caption, file in pictures.items():
        lines += [f"**{caption}**", "", f"![{caption}]({file})", ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.json", out / "report.md"


def format_checks(checks: list[Check]) -> str:
    """A plain-text table for the console, one line per check."""
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':<{width}}  status  value"]
    for c in checks:
        lines.append(f"{c.name:<{width}}  {c.status.upper():<6}  {_short(c.value)}   (expected {c.expected})")
        if c.status != PASS:
            lines.append(f"{'':<{width}}          -> {c.hint}")
    return "\n".join(lines)

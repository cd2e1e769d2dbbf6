"""The packages depend downwards only (configs <- data <- model <- training <- scripts), and no production module
knows about the tests' fault injection. Read from the source with `ast`, so a late import inside a function counts."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["configs", "data", "model", "training"]  # each may import only those before it


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", LAYERS)
def test_a_package_imports_no_package_above_it(package):
    above = set(LAYERS[LAYERS.index(package) + 1:]) | {"diagnosis", "tools", "bench", "tests", "faults",
                                                        "train_video_pred", "video_prediction_trainer"}
    wrong = {f"{p.relative_to(REPO)} imports {sorted(imported_packages(p) & above)}"
             for p in (REPO / package).glob("*.py") if imported_packages(p) & above}
    assert not wrong, sorted(wrong)


def test_no_production_module_mentions_the_fault_injection():
    production = [*REPO.glob("*.py"), *(p for pkg in (*LAYERS, "diagnosis", "tools") for p in (REPO / pkg).glob("*.py"))]
    assert production
    hooked = [str(p.relative_to(REPO)) for p in production if "VP_FAULTS" in p.read_text() or "faults" in
              imported_packages(p)]
    assert hooked == []


@pytest.mark.parametrize("fact, marker, home", [
    ("PSNR", "peak_signal_noise_ratio", "training/evaluation.py"),
    ("an animated GIF", "save_all=", "training/visualize.py"),
    ('what --device "auto" means', '== "auto"', "training/distributed.py"),
])
def test_one_place_per_fact(fact, marker, home):
    """Issue 17 (9): one module computes PSNR, writes GIFs and resolves the device; the others call it."""
    production = [*REPO.glob("*.py"), *(p for pkg in (*LAYERS, "diagnosis", "tools")
                                         for p in (REPO / pkg).glob("*.py"))]
    found = sorted(str(p.relative_to(REPO)) for p in production if marker in p.read_text())
    assert found == [home], f"{fact}: {found}"

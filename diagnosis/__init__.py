"""Diagnosis of a trained run: shared by `diagnose_diffusion.py` (pass/warn/fail checks) and
`test_model_inference.py` (a quick sanity check). `inputs` reads frames, `checks` holds the checks, `report` writes
report.json / report.md, `plots` draws the pictures with Pillow, `inference` predicts and rolls out."""

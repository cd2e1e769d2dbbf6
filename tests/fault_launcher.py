"""`python tests/fault_launcher.py ARGS` (or under torchrun): train_video_pred.main(ARGS) with the fault points of
tests/faults.py installed, so VP_FAULTS can name them. The production script knows nothing about faults."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faults  # noqa: E402  (tests/, this file's folder)
import train_video_pred  # noqa: E402

if __name__ == "__main__":
    faults.install()
    sys.exit(train_video_pred.main())

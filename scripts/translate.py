#!/usr/bin/env python
"""Translate text with a trained model: `mt-translate` run from a checkout (same flags, same output).

    python scripts/translate.py --checkpoint RUN/checkpoints/best.pt < test.de > test.hyp.en
    python scripts/translate.py --checkpoint MODEL_FOLDER_OR_HUB_ID --beam 5 < test.de

The code is mt/translate.py (`python -m mt.translate --help` lists the options).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # this checkout's mt, installed or not
    sys.path.insert(0, str(REPO))

from mt.translate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

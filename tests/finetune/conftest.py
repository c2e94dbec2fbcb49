"""The fine-tuning tests reuse the HTTP tests' live-server helpers."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))

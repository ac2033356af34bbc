"""`python -m orchestrator.export <checkpoint dir | step dir | URL> <out dir | URL>`: a consolidated
safetensors export of a checkpoint written under any layout (orchestrator/checkpoint/export.py)."""

import sys

from orchestrator.checkpoint.export import export, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())

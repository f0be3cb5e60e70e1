import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see cnds_compiler/train/cli.py

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"


def shipped_specs() -> list[Path]:
    return sorted(SPECS.glob("*.cnds"))


@pytest.fixture
def spec_dir(tmp_path: Path) -> Path:
    """A temp folder for specs written by a test."""
    return tmp_path

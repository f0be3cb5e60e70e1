from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"


def shipped_specs() -> list[Path]:
    return sorted(SPECS.glob("*.cnds"))


@pytest.fixture
def spec_dir(tmp_path: Path) -> Path:
    """A temp folder for specs written by a test."""
    return tmp_path

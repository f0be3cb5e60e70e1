import os
from pathlib import Path

# Before torch loads. The suite runs 2-process trainings on 2 cores; there idle OpenMP threads that spin
# (the default) slowed small nets 10x or more, while sleeping costs ~1.6x at most on an idle machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"


def shipped_specs() -> list[Path]:
    return sorted(SPECS.glob("*.cnds"))


def run_reader_gone(cmd: list[str], lines: int = 0, **kw) -> tuple[int, list[str], str]:
    """Run ``cmd`` as ``cmd | head -n LINES`` would: read ``lines`` lines of its stdout (0: none), then close
    the pipe while it still writes. Returns (exit code, the lines read, stderr)."""
    import subprocess

    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    read = [p.stdout.readline() for _ in range(lines)]
    p.stdout.close()
    err = p.stderr.read()
    return p.wait(timeout=600), read, err


@pytest.fixture
def spec_dir(tmp_path: Path) -> Path:
    """A temp folder for specs written by a test."""
    return tmp_path


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray (2 CPUs) for the whole test session: starting one costs seconds."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()

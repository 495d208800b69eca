"""Shared test helpers: run a suite script end to end in a subprocess."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
CIFAR_DIR = SHARED / "cifar10"
FACES_DIR = SHARED / "faces"


def run(script, *args, stdin=None, timeout=600, cwd=None):
    """Run `python SCRIPT args...` from the repository root; returns the CompletedProcess (text)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT, env=env)


def torchrun(script, *args, nproc=2, timeout=300, env=None):
    """`torchrun --standalone --nproc_per_node=N SCRIPT args...` (a free port, so runs never collide)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore", **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def assert_one_line_error(proc, status):
    """A user's mistake: the given exit status, one line on stderr, no traceback."""
    assert proc.returncode == status, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("device:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(scope="session")
def shared_datasets():
    if not SHARED.exists():
        pytest.skip(f"{SHARED} not found")
    return SHARED

"""Shared test helpers: run a suite script end to end in a subprocess."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def check_face_torchrun(script, source, tmp_path, *train_args):
    """A face script trained for one epoch with 2 torchrun processes (gloo) on a copy of the data prepared in
    `source`: the same steps per epoch as the one-process run there, one model that plain eval loads."""
    data = tmp_path / "ddp"
    data.mkdir()
    for path in source.iterdir():
        if path.name == "meta.json" or path.name.endswith(".pt.gz"):
            (data / path.name).write_bytes(path.read_bytes())
    proc = torchrun(script, "train", "--data-dir", data, "--epochs", 1, *train_args, "--device", "cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "torchrun: 2 processes, backend gloo" in proc.stdout
    assert sum(line.startswith("epoch 1/1") for line in proc.stdout.splitlines()) == 1
    one = next(csv.DictReader((source / "history.csv").open()))
    two = list(csv.DictReader((data / "history.csv").open()))
    assert len(two) == 1 and two[0]["steps"] == one["steps"]
    assert [row["world_size"] for row in csv.DictReader((data / "runs.csv").open())] == ["2"]
    state = torch.load(data / "model.pt", weights_only=True)["model"]
    assert not any(key.startswith("module.") for key in state)
    photo = sorted((FACES_DIR / "image_data").iterdir())[0]
    ev = run(script, "eval", photo, "--data-dir", data, "--json", "--output", tmp_path / "out.png", "--device", "cpu")
    assert ev.returncode == 0, ev.stderr
    assert "boxes" in json.loads(ev.stdout.splitlines()[0])


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

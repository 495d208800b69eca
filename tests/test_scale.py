"""Scale-out and observation options of every train command: torchrun (gloo on the CPU), --amp, --tensorboard,
DATA_DIR/runs.csv, --tag and --grid. Run end to end on a few hundred generated captchas and CIFAR-10 images."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import conftest
from conftest import CIFAR_DIR, ROOT, assert_one_line_error, load_script

SCRIPTS = ["captcha.py", "cifar_lenet.py"]
TRAIN_OPTIONS = {"captcha.py": ["--epoch-size", 0]}   # no repetition of the tiny training split


def run(script, *args, **kwargs):
    extra = TRAIN_OPTIONS.get(script, []) if args[:1] == ("train",) else []
    return conftest.run(script, *args, *extra, **kwargs)


def torchrun(script, *args, **kwargs):
    extra = TRAIN_OPTIONS.get(script, []) if args[:1] == ("train",) else []
    return conftest.torchrun(script, *args, *extra, **kwargs)


def history(data):
    return list(csv.DictReader((data / "history.csv").open()))


def runs(data):
    return list(csv.DictReader((data / "runs.csv").open()))


def copy_prepared(src, dst):
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if path.name == "meta.json" or path.name.endswith(".pt.gz"):
            shutil.copy(path, dst / path.name)
    return dst


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Prepared data of each script: 300 generated captchas, 300 CIFAR-10 images."""
    root = tmp_path_factory.mktemp("scale")
    out = {}
    proc = run("generate-captcha/generate.py", "--count", 300, "--output", root / "captchas", "--workers", 2)
    assert proc.returncode == 0, proc.stderr
    proc = run("captcha.py", "prepare", "--image-dir", root / "captchas", "--data-dir", root / "captcha", "--workers", 2,
               "--split", "50/40/10")   # 120 validation codes: enough to rank epochs (RANK_MIN), so they stop early
    assert proc.returncode == 0, proc.stderr
    out["captcha.py"] = root / "captcha"
    if CIFAR_DIR.exists():
        src = root / "cifar_src"
        (src / "train").mkdir(parents=True)
        shutil.copy(CIFAR_DIR / "labels.txt", src / "labels.txt")
        for path in sorted((CIFAR_DIR / "train").iterdir())[:300]:
            (src / "train" / path.name).symlink_to(path)
        proc = run("cifar_lenet.py", "prepare", "--image-dir", src, "--data-dir", root / "cifar", "--workers", 2)
        assert proc.returncode == 0, proc.stderr
        out["cifar_lenet.py"] = root / "cifar"
    return root, out


def data_of(prepared, script, name):
    root, out = prepared
    if script not in out:
        pytest.skip(f"{CIFAR_DIR} not found")
    return copy_prepared(out[script], root / name)


# ---- torchrun ----
def test_epoch_batches_shard_each_global_batch(monkeypatch):
    """Two processes split every global batch of one process into disjoint halves, with the same step count (the
    module is shared by the session's in-process commands: its rank_and_world is put back after)."""
    module = load_script("cifar_lenet.py")
    n, batch = 103, 20
    monkeypatch.setattr(module, "rank_and_world", lambda: (0, 1))
    single = module.epoch_batches(n, batch, 0, 1, "cpu")
    ranks = []
    for rank in range(2):
        monkeypatch.setattr(module, "rank_and_world", lambda rank=rank: (rank, 2))
        ranks.append(module.epoch_batches(n, batch, 0, 1, "cpu"))
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 6
    for whole, a, b in zip(single, *ranks):
        assert not set(a.tolist()) & set(b.tolist())
        assert sorted(a.tolist() + b.tolist()) == sorted(whole.tolist())
    monkeypatch.setattr(module, "rank_and_world", lambda: (0, 1))
    assert torch.equal(torch.cat(single).sort().values, torch.arange(n))              # a permutation
    assert not torch.equal(torch.cat(module.epoch_batches(n, batch, 0, 2, "cpu")), torch.cat(single))  # per epoch
    monkeypatch.setattr(module, "rank_and_world", lambda: (1, 4))
    assert all(len(idx) >= 1 for idx in module.epoch_batches(n, batch, 0, 1, "cpu"))  # short last batch topped up


@pytest.mark.parametrize("script", SCRIPTS)
def test_torchrun_matches_one_process_stops_together_and_writes_one_model(prepared, script):
    """The same steps per epoch as one process with the same global batch; with lr 1e-30 (the weights do not move in
    float32; 0 is refused) validation never improves after epoch 1, so with patience 1 every process must stop after
    epoch 2 (a process that stopped alone would leave the other waiting in a collective and fail the run); only
    rank 0 writes, and plain eval loads its model."""
    single, multi = data_of(prepared, script, f"{script}-1"), data_of(prepared, script, f"{script}-2")
    args = ["train", "--epochs", 6, "--patience", 1, "--lr", "1e-30", "--batch-size", 50, "--device", "cpu"]
    one = run(script, *args, "--data-dir", single)
    assert one.returncode == 0, one.stderr
    two = torchrun(script, *args, "--data-dir", multi, timeout=240)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "torchrun: 2 processes, backend gloo" in two.stdout
    assert "early stop" in two.stdout and "early stop" in one.stdout
    steps = [int(row["steps"]) for row in history(single)]
    assert steps == [int(row["steps"]) for row in history(multi)] == (   # 150 or 240 training images / 50, 2 epochs
        [3, 3] if script == "captcha.py" else [5, 5])
    assert runs(multi)[-1]["epochs_run"] == "2"
    # only rank 0 prints and writes: each epoch line once, one model, nothing half-written
    assert sum(line.startswith("epoch 2/6") for line in two.stdout.splitlines()) == 1
    assert two.stderr.count("device: cpu") == 1
    written = sorted(p.name for p in multi.iterdir() if not p.name.endswith(".pt.gz"))
    assert written == sorted(["checkpoint.pt", "history.csv", "history.png", "meta.json", "model.pt", "runs.csv"]
                             + (["confusion.png"] if script != "captcha.py" else []))
    assert [row["world_size"] for row in runs(multi)] == ["2"]
    state = torch.load(multi / "model.pt", weights_only=True)["model"]
    assert not any(key.startswith("module.") for key in state)
    ev = run(script, "eval", "--data-dir", multi, "--json", "--device", "cpu",
             *sorted(p for p in (prepared[0] / "captchas").iterdir())[:3]) if script == "captcha.py" else \
        run(script, "eval", "--data-dir", multi, "--json", "--device", "cpu", *sorted(CIFAR_DIR.glob("train/*"))[:3])
    assert ev.returncode == 0, ev.stderr
    assert len([json.loads(line) for line in ev.stdout.splitlines()]) == 3


def test_torchrun_needs_a_batch_per_process(prepared):
    data = data_of(prepared, "captcha.py", "tiny-batch")
    proc = torchrun("captcha.py", "train", "--data-dir", data, "--epochs", 1, "--batch-size", 1, "--device", "cpu")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: 2 processes need a --batch-size and a training split of at least 2 (now 1 and 150)"]
    assert not (data / "model.pt").exists()


def test_torchrun_resume(prepared):
    script = "cifar_lenet.py" if "cifar_lenet.py" in prepared[1] else "captcha.py"
    data = data_of(prepared, script, "resume")
    first = torchrun(script, "train", "--data-dir", data, "--epochs", 2, "--batch-size", 50, "--device", "cpu")
    assert first.returncode == 0, first.stdout + first.stderr
    before = history(data)
    resumed = torchrun(script, "train", "--data-dir", data, "--epochs", 3, "--batch-size", 50, "--device", "cpu",
                       "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resum" in resumed.stdout
    after = history(data)
    assert [row["epoch"] for row in after] == ["1", "2", "3"]
    assert after[:2] == before
    assert [row["epochs_run"] for row in runs(data)] == ["2", "3"]


# ---- runs.csv, --tag, --grid ----
def test_runs_csv_row_per_train(prepared):
    data = data_of(prepared, "captcha.py", "runs")
    printed = []
    for tag in ("first", "second"):
        proc = run("captcha.py", "train", "--data-dir", data, "--epochs", 1, "--batch-size", 64, "--device", "cpu",
                   "--tag", tag)
        assert proc.returncode == 0, proc.stderr
        printed.append(re.search(r"^test \(\d+ images.*exact-match ([\d.]+)%", proc.stdout, re.M))
        assert printed[-1], proc.stdout
    rows = runs(data)
    assert [row["tag"] for row in rows] == ["first", "second"]
    for row, test in zip(rows, printed):
        assert row["epochs_run"] == "1" and row["world_size"] == "1" and row["device"] == "cpu"
        assert float(row["test"]) == pytest.approx(float(test[1]) / 100, abs=5e-5) and float(row["seconds"]) > 0
        assert row["batch_size"] == "64" and row["lr"] == "0.003" and row["start"][:2] == "20"
    history_acc = max(float(r["val_acc"]) for r in history(data))
    assert float(rows[-1]["best_val"]) == pytest.approx(history_acc, abs=1e-5)


def test_grid_runs_every_combination(prepared):
    data = data_of(prepared, "captcha.py", "grid")
    proc = run("captcha.py", "train", "--data-dir", data, "--epochs", 1, "--device", "cpu",
               "--grid", "lr=0.003,0.001", "--grid", "batch-size=64,128")
    assert proc.returncode == 0, proc.stderr
    names = ["lr=0.003_batch-size=64", "lr=0.003_batch-size=128", "lr=0.001_batch-size=64", "lr=0.001_batch-size=128"]
    for name in names:
        assert (data / "grid" / name / "model.pt").exists() and (data / "grid" / name / "history.csv").exists()
    assert not (data / "model.pt").exists()
    rows = runs(data)
    assert [row["tag"] for row in rows] == names
    assert [(row["lr"], row["batch_size"]) for row in rows] == [("0.003", "64"), ("0.003", "128"),
                                                                ("0.001", "64"), ("0.001", "128")]
    table = proc.stdout[proc.stdout.index("best val"):].splitlines()[1:5]
    printed = [line.split()[0] for line in table]
    assert sorted(printed) == sorted(names)
    scores = [float(line.split()[2]) for line in table]
    assert scores == sorted(scores, reverse=True)          # sorted by best validation score


def test_grid_resumed_after_a_cut(prepared):
    """A --grid cut short, run again with --resume: the runs with a checkpoint go on, the others start fresh (the
    first run without one stopped the grid: 'nothing to resume')."""
    data = data_of(prepared, "captcha.py", "grid-resume")
    common = ["train", "--data-dir", data, "--device", "cpu", "--batch-size", 64, "--epoch-size", 0]
    assert run("captcha.py", *common, "--epochs", 1, "--grid", "lr=0.003").returncode == 0
    proc = run("captcha.py", *common, "--epochs", 2, "--grid", "lr=0.003,0.001", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "after epoch 1" in proc.stdout and "no checkpoint of this run: it starts fresh" in proc.stdout
    assert [row["epoch"] for row in history(data / "grid" / "lr=0.003")] == ["1", "2"]
    assert [row["epoch"] for row in history(data / "grid" / "lr=0.001")] == ["1", "2"]


@pytest.mark.parametrize("grid", ["nope=1,2", "lr", "lr=abc", "resume=1", "device=cpu,cuda", "amp=1"])
def test_grid_bad_option(prepared, grid):
    data = data_of(prepared, "captcha.py", f"badgrid-{grid.replace('=', '_')}")
    line = assert_one_line_error(conftest.run_main("captcha.py", "train", "--data-dir", data, "--device", "cpu",
                                                   "--grid", grid), 2)   # in-process: it stops before any work
    assert "--grid" in line


# ---- --tensorboard and --amp ----
def test_tensorboard_writes_event_files(prepared, tmp_path):
    pytest.importorskip("tensorboard")
    data = data_of(prepared, "captcha.py", "tb")
    proc = run("captcha.py", "train", "--data-dir", data, "--epochs", 2, "--batch-size", 64, "--device", "cpu",
               "--tensorboard", tmp_path / "tb", "--histogram-every", 1)
    assert proc.returncode == 0, proc.stderr
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(events[0]), size_guidance={"histograms": 0, "images": 0}).Reload()
    tags = acc.Tags()
    assert {"train_loss", "val_acc", "lr", "images_per_s"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("val_acc")] == [1, 2]
    assert tags["images"] and tags["histograms"]


def test_tensorboard_missing_is_one_line(prepared, tmp_path):
    """Without the tensorboard package the option fails with one line; without the option nothing changes."""
    hide = tmp_path / "hide" / "tensorboard"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('tensorboard is not installed')\n")
    data = data_of(prepared, "captcha.py", "notb")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "hide"), PYTHONWARNINGS="ignore")
    base = [sys.executable, str(ROOT / "captcha.py"), "train", "--data-dir", str(data), "--epochs", "1",
            "--device", "cpu", "--epoch-size", "0"]
    proc = subprocess.run(base + ["--tensorboard", str(tmp_path / "tb")], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    line = assert_one_line_error(proc, 2)
    assert "pip install tensorboard" in line
    assert not (data / "model.pt").exists() and not (tmp_path / "tb").exists()
    proc = subprocess.run(base, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_amp_switch(prepared):
    module = load_script("captcha.py")
    cpu = torch.device("cpu")
    assert module.amp_dtype(cpu, amp=False) is None
    native = any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                        "_is_amx_tile_supported"))
    assert module.amp_dtype(cpu) == (torch.bfloat16 if native else None)   # bf16 only where the CPU has it natively
    saved, module.CPU_BF16 = module.CPU_BF16, False
    try:
        assert module.amp_dtype(cpu) is None                # a script whose CPU_BF16 is off: fp32 on every CPU
    finally:
        module.CPU_BF16 = saved
    data = data_of(prepared, "captcha.py", "amp")
    proc = run("captcha.py", "train", "--data-dir", data, "--epochs", 1, "--device", "cpu", "--no-amp")
    assert proc.returncode == 0, proc.stderr
    assert "precision torch.float32" in proc.stdout
    assert runs(data)[-1]["amp"] == "False"

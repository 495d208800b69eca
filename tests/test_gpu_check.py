"""benchmarks/gpu_check.py: its CPU dry run on tiny real data (steps 1, 4, 5, 6 still work with the scripts as
they are), its full GPU schedule on simulated scripts (steps 2, 3 and 7, the device-versus-CPU evals and the time
budgets, which only a GPU run reaches), and its command timeouts."""
import argparse
import csv
import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run

NUMBER = (int, float)


def is_number(x):
    return isinstance(x, NUMBER) and not isinstance(x, bool)


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def private_keys(obj):
    """Keys starting with '_' anywhere in the JSON (internal fields must not leak into the report)."""
    if isinstance(obj, dict):
        return [k for k in obj if k.startswith("_")] + [k for v in obj.values() for k in private_keys(v)]
    if isinstance(obj, list):
        return [k for v in obj for k in private_keys(v)]
    return []


def read_report(path):
    def no_nan(name):
        raise AssertionError(f"{name} in the JSON")
    return json.loads(path.read_text(), parse_constant=no_nan)


@pytest.mark.slow
def test_cpu_dry_run(tmp_path, shared_datasets):
    """`--device cpu` on tiny real data: every step present with a status, the figures are numbers, and each model
    (trained on the CPU here) evaluates on the CPU with CUDA hidden."""
    out = tmp_path / "out" / "gpu_check.json"
    t0 = time.monotonic()
    proc = run("benchmarks/gpu_check.py", "--device", "cpu", "--minutes", 3, "--out", out, "--work", tmp_path / "work",
               "--datasets", shared_datasets, timeout=300)
    seconds = time.monotonic() - t0
    assert out.exists(), proc.stdout + proc.stderr
    report = read_report(out)
    assert proc.returncode == 0, (report["problems"], [s.get("runs") for s in report["steps"] if s["status"] != "ok"])
    assert report["sizes"] == "tiny" and report["complete"] and not report["problems"]
    assert report["elapsed_s"] <= 3 * 60 and seconds < 3 * 60 + 30
    assert not private_keys(report)
    assert report["environment"]["torch"] and report["environment"]["file_sha256"]["cifar_resnet.py"]
    assert {name: p["status"] for name, p in report["prepare"].items()} == {"cifar": "ok", "captcha": "ok",
                                                                               "faces": "ok"}
    steps = {s["step"]: s for s in report["steps"]}
    assert sorted(steps) == [1, 2, 3, 4, 5, 6, 7]
    assert {n: s["status"] for n, s in steps.items()} == {1: "ok", 2: "skipped", 3: "skipped", 4: "ok", 5: "ok",
                                                          6: "ok", 7: "skipped"}
    for n, key in ((1, "val_top1"), (4, "val_exact"), (5, "val_ap50")):
        epochs = steps[n]["epochs"]
        assert len(epochs) == 1 and epochs[0]["epoch"] == 1
        assert all(is_number(epochs[0][k]) for k in (key, "seconds", "per_s")), epochs
        for r in steps[n]["runs"]:
            assert r["status"] == "ok" and is_number(r["wall_s"]) and r["device_printed"] == "cpu"
    assert steps[1]["train_images"] == 18 and steps[1]["val_images"] == 2
    ev = steps[5]["eval"]
    assert ev["ok"] and ev["answers"] == 2 and is_number(ev["seconds_per_image"])
    models = steps[6]["models"]
    assert sorted(models) == ["captcha", "cifar_resnet", "fast_rcnn_faces"]
    for name, res in models.items():
        cpu = res["cpu"]
        assert name == "fast_rcnn_faces" or res["model"] == {"saved_on": ["cpu"], "module_prefix": False}
        assert cpu["ok"] and cpu["device_printed"] == "cpu" and cpu["cuda_hidden"], (name, res)
        assert cpu["answers"] == cpu["images"] > 0 and cpu["errors"] == 0
    assert all(steps[6]["checks"].values())
    logs = out.parent / "gpu_check_logs"
    assert any(logs.glob("*cifar_resnet_train.stdout.txt"))
    print(f"dry run: {seconds:.1f} s")


# ---- the full (GPU) schedule on simulated scripts: fast, no torch, no GPU ----
FAKE_SCRIPT = r'''
import csv, json, os, sys, time
from pathlib import Path
name, args = Path(__file__).stem, sys.argv[1:]
def opt(flag, default=None):
    return args[args.index(flag) + 1] if flag in args else default
if name == "generate":
    out = Path(opt("--output")); out.mkdir(parents=True, exist_ok=True)
    for i in range(int(opt("--count"))):
        (out / f"{i:05d}-ab{i % 10}c.png").write_bytes(b"")
    sys.exit(0)
command, data, device = args[0], Path(opt("--data-dir", ".")), opt("--device", "cpu")
if f"{name} {command}" == os.environ.get("FAKE_FAIL"):
    sys.exit("Traceback (most recent call last):\nRuntimeError: simulated failure")
if command == "prepare":
    data.mkdir(parents=True, exist_ok=True)
    (data / "training_set.0.pt.gz").write_bytes(b"x")
    (data / "meta.json").write_text(json.dumps({"counts": {"training_set": 900, "validating_set": 100,
                                                           "testing_set": 10}}))
    sys.exit(0)
print(f"device: {device}", file=sys.stderr)
if device == "cpu" and command == "eval" and os.environ.get("CUDA_VISIBLE_DEVICES") != "":
    sys.exit("the CPU eval must run with CUDA hidden")
faulty = os.environ.get("FAKE_FAULTY") == "1"   # torchrun's model.pt as DDP saved it, other steps; cuda reads otherwise
if command == "train":
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        print(f"torchrun: {world} processes, backend nccl")
    amp, comp = "--no-amp" not in args, "--compile" in args
    print(f"{name}: 900 train images, precision torch.{'bfloat16' if amp else 'float32'}")
    val, speed = {"fast_rcnn_faces": ("val_ap50", "photos_per_s"), "rcnn_faces": ("val_bacc", "crops_per_s"),
                  "captcha": ("val_acc", "images_per_s")}.get(name, ("val_acc", "img_per_s"))
    rows = []
    for e in range(1, int(opt("--epochs")) + 1):
        seconds = 900 / (1000.0 * (2 if amp else 1) * (1.5 if comp else 1)) + (5.0 if comp and e == 1 else 0)
        rows.append({"epoch": e, "train_loss": 1 / e, val: 0.5 + 0.1 * e, "seconds": seconds,
                     "steps": 2 if faulty and "WORLD_SIZE" in os.environ else 4, speed: 900 / seconds})
    for path, table in ((data / "history.csv", rows), (data / "runs.csv", [{"best_val": 0.6, "test": 0.55,
                        "metric": "top-1", "batch_size": 256, "world_size": world}])):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    (data / "model.pt").write_text(json.dumps({"saved_on": ["cuda:0"],   # what model_facts reads here
                                               "module_prefix": faulty and "WORLD_SIZE" in os.environ}))
    sys.exit(0)
skip = {"--data-dir", "--device", "--output-dir", "--output", "--model", "--threshold"}
images = [a for i, a in enumerate(args[1:], 1) if not a.startswith("--") and args[i - 1] not in skip]
for path in images:
    answer = {"cifar_resnet": {"top": [{"label": "cat", "probability": 0.9}]}, "cifar_lenet": {"top": [
              {"label": "cat", "probability": 0.8}]}, "captcha": {"code": "ab1d" if faulty and device == "cuda" else
              "ab1c", "confidence": 0.9}}.get(
              name, {"boxes": [{"x": 1, "y": 2, "w": 3, "h": 4, "score": 0.9}], "output": "x.png"})
    print(json.dumps({"image": path, **answer}), flush=True)
    time.sleep(0.02)
'''

FAKE_TORCHRUN = r'''
import os, subprocess, sys
args = [a for a in sys.argv[1:] if a != "--standalone"]
nproc = int(args.pop(0).split("=")[1])
sys.exit(subprocess.run([sys.executable, *args], env=dict(os.environ, WORLD_SIZE=str(nproc))).returncode)
'''


@pytest.fixture
def simulated(tmp_path, monkeypatch):
    """gpu_check with ROOT pointing at fake scripts and datasets, torchrun faked, a CUDA environment pretended."""
    gc = load_gpu_check()
    root = tmp_path / "repo"
    (root / "generate-captcha").mkdir(parents=True)
    for script in gc.SCRIPTS:
        (root / script).write_text(FAKE_SCRIPT)
    (root / "torchrun.py").write_text(FAKE_TORCHRUN)
    data = tmp_path / "datasets"
    (data / "cifar10" / "train").mkdir(parents=True)
    (data / "cifar10" / "labels.txt").write_text("cat\ndog\n")
    for i in range(30):
        (data / "cifar10" / "train" / f"{i:05d}_cat.jpg").write_bytes(b"")
    (data / "faces" / "image_data").mkdir(parents=True)
    with open(data / "faces" / "bbox_train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Name", "width", "height", "xmin", "ymin", "xmax", "ymax"])
        for i in range(12):
            (data / "faces" / "image_data" / f"{i}.jpg").write_bytes(b"")
            writer.writerow([f"{i}.jpg", 100, 100, 10, 10, 50, 50])
    monkeypatch.setattr(gc, "ROOT", root)
    monkeypatch.setattr(gc, "TORCHRUN", [sys.executable, str(root / "torchrun.py")])
    monkeypatch.setattr(gc, "model_facts", lambda path: json.loads(Path(path).read_text()))   # the dry run: real ones
    monkeypatch.setitem(gc.SIZES["full"], "captchas", 30)

    def environment(self, in_process=False):
        self.result["environment"] = {"torch": "fake", "cuda_available": True, "gpu_count": 1,
                                      "gpu": {"name": "Simulated GPU"}}
        return self.result["environment"]
    monkeypatch.setattr(gc.Check, "environment", environment)
    monkeypatch.setattr(gc.shutil, "which", lambda name: None)   # no nvidia-smi: memory "not measured"

    def check(minutes=1.5, **env):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        args = argparse.Namespace(out=str(tmp_path / "out" / "gpu_check.json"), minutes=minutes, device="cuda",
                                  tiny=False, work=str(tmp_path / "work"), datasets=str(data), nproc=0)
        c = gc.Check(args)
        c.run_all()
        c.close()
        return c.result, read_report(c.out)
    return check


def test_full_schedule_on_simulated_scripts(simulated, capsys):
    """Every step of the GPU run on simulated scripts; fast_rcnn_faces.py's train fails: step 5 records it with its
    stderr, and the run goes on (step 6 cannot evaluate the missing face model, every other eval runs)."""
    result, report = simulated(FAKE_FAIL="fast_rcnn_faces train")
    assert report["sizes"] == "full" and report["device"] == "cuda"
    assert not private_keys(report)
    steps = {s["step"]: s for s in report["steps"]}
    assert {n: s["status"] for n, s in steps.items()} == {1: "ok", 2: "ok", 3: "ok", 4: "ok", 5: "failed",
                                                          6: "failed", 7: "ok"}, report["problems"]
    assert not report["complete"] and len(report["problems"]) == 2
    assert report["problems"][0].startswith("step 5 failed")
    assert "simulated failure" in steps[5]["runs"][0]["stderr_tail"] and "eval" not in steps[5]
    assert steps[1]["val_top1_last"] == pytest.approx(1.0) and steps[1]["target"]["met"]
    assert [e["epoch"] for e in steps[1]["epochs"]] == [1, 2, 3, 4, 5]
    variants = steps[2]["variants"]
    assert list(variants) == ["no-amp", "amp", "amp+compile"]
    assert variants["amp"]["precision"] == "bfloat16" and variants["no-amp"]["precision"] == "float32"
    assert steps[2]["amp_speedup"] == 2.0 and steps[2]["compile_speedup"] == 1.5
    assert steps[2]["compile_seconds_estimate"] == 5.0
    assert steps[3]["nproc_per_node"] == 1 and steps[3]["process_group_backend"] is None
    assert steps[3]["checks"] == {"same steps per epoch as one process": True, "model.pt without module. prefix": True,
                                  "model evaluates": True}
    assert any("nccl" in s for s in report["skipped"])
    probe, main = steps[4]["runs"]   # 1 epoch, then as many as fit (the simulated epochs take 0.45 s)
    assert probe["name"] == "captcha probe (1 epoch)" and steps[4]["probe"]["epoch_seconds"] == pytest.approx(0.45)
    assert main["name"] == f"captcha train ({steps[4]['epochs_requested']} epochs)"
    assert len(steps[4]["epochs"]) == steps[4]["epochs_requested"] > 1
    assert "no model.pt" in steps[6]["models"]["fast_rcnn_faces"]["reason"]
    assert steps[6]["checks"] == {"captcha eval on cpu": True, "captcha eval on cuda": True,
                                  "captcha cuda and cpu answer alike (one image in ten, or one, apart)": True,
                                  "cifar_resnet eval on cpu": True, "cifar_resnet eval on cuda": True,
                                  "cifar_resnet cuda and cpu answer alike (one image in ten, or one, apart)": True,
                                  "fast_rcnn_faces eval on cpu": False, "fast_rcnn_faces eval on cuda": False}
    for n, names in ((6, ["captcha", "cifar_resnet"]), (7, ["cifar_lenet", "rcnn_faces"])):
        for name in names:
            res = steps[n]["models"][name]
            assert res["cuda"]["ok"] and res["cpu"]["ok"] and res["cpu"]["cuda_hidden"]
            assert res["agreement_device_vs_cpu"]["same_prediction"] == res["agreement_device_vs_cpu"]["of"] > 0
            assert res["model"]["saved_on"] == ["cuda:0"]
    assert any("nvidia-smi not found" in s for s in report["skipped"])
    table = capsys.readouterr().out
    assert "Simulated GPU" in table and "amp+compile" in table and "target 90%: met" in table


def test_simulated_faults_fail_their_checks(simulated):
    """What the GPU run checks can fail: torchrun with other steps per epoch than one process and a model.pt whose keys
    carry DDP's module. prefix fail step 3; a device eval that answers otherwise than the CPU's fails step 6."""
    result, report = simulated(FAKE_FAULTY="1")
    steps = {s["step"]: s for s in report["steps"]}
    assert steps[3]["status"] == "failed" and steps[3]["checks"] == {
        "same steps per epoch as one process": False, "model.pt without module. prefix": False, "model evaluates": True}
    assert steps[3]["steps_per_epoch"] == 2 and steps[3]["steps_one_process"] == 4
    captcha = steps[6]["models"]["captcha"]["agreement_device_vs_cpu"]
    assert captcha["same_prediction"] == 0 < captcha["of"] and steps[6]["status"] == "failed"
    assert steps[6]["checks"]["captcha cuda and cpu answer alike (one image in ten, or one, apart)"] is False
    assert steps[6]["checks"]["cifar_resnet cuda and cpu answer alike (one image in ten, or one, apart)"] is True
    assert not report["complete"] and any(p.startswith("step 3 failed") for p in report["problems"])


def test_commands_stop_at_their_timeout(tmp_path):
    gc = load_gpu_check()
    args = argparse.Namespace(out=str(tmp_path / "r.json"), minutes=1, device="cpu", tiny=True, work=str(tmp_path),
                              datasets=str(tmp_path), nproc=0)
    check = gc.Check(args)
    check.grace = 1.0
    t0 = time.monotonic()
    rec = check.run("sleeps", [sys.executable, "-c", "import time; time.sleep(60)"], timeout=1, min_seconds=0)
    assert rec["status"] == "timeout" and time.monotonic() - t0 < 1 + check.grace + 3   # not the 60 s
    deaf = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    t0 = time.monotonic()
    rec = check.run("ignores Ctrl-C", [sys.executable, "-c", deaf], timeout=1, min_seconds=0)
    assert rec["status"] == "timeout" and rec["rc"] == -9 and rec["_stdout"] == "up\n"
    assert time.monotonic() - t0 < 1 + check.grace + 3
    check.deadline = time.monotonic() + 1   # less than the grace period left: nothing is started
    assert check.run("late", [sys.executable, "-c", "pass"], timeout=30)["status"] == "not run"

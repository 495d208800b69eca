"""Hostile and clumsy input, across captcha.py, cifar_lenet.py, cifar_resnet.py, rcnn_faces.py and fast_rcnn_faces.py:
- the shared helpers are the same text in every script, and every read of user data goes through them;
- every numeric option is checked by argparse: one line, status 2, nothing created;
- --data-dir that is a file or not writable is refused before any work;
- prepare and train hold DATA_DIR: a second command fails at once naming the first;
- prepare swaps complete data in: an error or Ctrl-C at any point leaves the old files byte for byte.
Commands that must stop before any work run in-process (conftest.run_main: the same main(), without the seconds of
an interpreter start); the rest run as subprocesses (test_fast_rcnn_faces.py has a bad option through a real one).
"""
import argparse
import ast
import errno
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (CIFAR_DIR, FACES_DIR, ROOT, assert_one_line_error, load_script, png_declaring, run, run_main,
                      tree_bytes)

SCRIPTS = ["captcha.py", "cifar_lenet.py", "cifar_resnet.py", "rcnn_faces.py", "fast_rcnn_faces.py"]
FACES = ["rcnn_faces.py", "fast_rcnn_faces.py"]
CIFARS = ["cifar_lenet.py", "cifar_resnet.py"]
# helpers that must be the same text (compared as ASTs) in all five scripts
SHARED = ["UserError", "load_image", "image_to_tensor", "save_shard", "load_shard", "atomic_path", "atomic_torch_save",
          "atomic_write_text", "list_images", "write_split", "read_split", "read_text", "read_meta", "staging_dir",
          "swap_prepared", "save_prepared", "seed_everything", "pick_device", "progress", "CHECKPOINT_KEYS",
          "load_model_file", "save_history", "main_process", "setup_distributed", "rank_and_world", "epoch_batches",
          "shard", "sum_over_processes", "mean_over_processes", "sync_buffers", "wrap_model", "amp_dtype", "autocast",
          "open_tensorboard", "log_epoch", "append_run", "grid_runs", "parse_number", "positive_int", "nonneg_int",
          "nonneg_float", "wait_ms", "probability", "seed_int", "worker_count", "lock_data_dir", "import_optional", "json_ready",
          "OnnxNetwork", "BrokenModel", "finite", "load_network", "cmd_export", "Batcher", "PAGE", "cmd_serve", "serve_protocol", "serve_protocol_class", "HEADER_SECONDS", "MAX_CONNECTIONS",
          "UPLOADS_HELD", "loopback_only", "add_ship_commands", "port_number",
          "start_worker", "parallel_map", "signals_held", "save_epoch", "KEEP_NOTE", "RUN_FILES", "keep_previous", "move_run_rows", "resume_training", "RESUME_OWN", "resume_options", "given_options", "HelpFormatter", "OneLineParser", "base_parser", "cmd_train",
          "iter_eval_inputs", "add_scale_options", "main", "run_command", "refuse_other_data"]
FACE_SHARED = ["CSV_COLUMNS", "written_by_eval", "read_boxes_csv", "count_skip", "split_indices", "side_arg", "width_arg", "photo_path", "OutputFiles", "cosine_schedule", "found_boxes", "match_detections",
               "fit_calibration", "detection_scores", "read_ahead", "read_photo",
               "start_reader", "boxes_inside", "prepare_photos", "working_copy", "draw_boxes", "encode_offsets",
               "decode_offsets", "cmd_eval", "face_parser"]
# every call that reads a file, and the only functions allowed to make it (they turn failures into UserError)
READERS = {"open": {"setup_distributed", "lock_data_dir"}, "os.open": {"lock_data_dir"},
           "Image.open": {"load_image", "pixel_count", "written_by_eval"},
           "gzip.open": {"load_shard"}, "torch.load": {"load_shard", "load_model_file"},
           "pd.read_csv": {"read_boxes_csv"}, ".read_text": {"read_text"}, ".read_bytes": set(),
           ".open": set(), "json.load": set(),
           "json.loads": {"read_meta", "refuse_other_data", "OnnxNetwork", "serve_worker", "recover_prepared"},
           "np.load": set(), "cv2.imread": set(), "csv.reader": {"read_labels", "read_boxes_csv"},
           "csv.DictReader": {"read_runs"}, ".InferenceSession": {"OnnxNetwork"},
           ".load": set()}   # .load: pickle.load, onnx.load, torch.jit.load ... nowhere
# read_labels: lines of read_text; serve_worker: the options serve --workers passes to its own processes; pixel_count:
# the header of bytes serve received; recover_prepared: the list of files swap_prepared wrote


COMMON_MARK = "# ==== Common to all five scripts: keep identical ===="
FACE_MARK = "# ==== Common to the two face scripts (rcnn_faces.py, fast_rcnn_faces.py): keep identical ===="
CIFAR_MARK = "# ==== Common to the two CIFAR scripts (cifar_lenet.py, cifar_resnet.py): keep identical ===="


def top_level(script, text=None):
    """{name: AST node} of the top-level functions, classes and constants of a script (or of its `text`)."""
    nodes = {}
    for node in ast.parse((ROOT / script).read_text() if text is None else text).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            nodes[node.name] = node
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            nodes[node.targets[0].id] = node
    return nodes


def call_name(node):
    """'open', 'torch.load', '.read_text' (a method of anything else) for a Call node."""
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return f"{func.value.id}.{func.attr}" if isinstance(func.value, ast.Name) else f".{func.attr}"
    return ""


# ---- one text, one way in ----
def test_near_certain_never_shown_certain():
    """A probability or share short of 1 never reads 100.00% or 1.0 (rounding made 0.99996 certain): eval's JSON and
    lines of the three kinds, and the helper every script's test figures go through."""
    for script in SCRIPTS:
        under_one = load_script(script).under_one
        assert f"{under_one(0.99996, 4):.2%}" == "99.99%" and f"{under_one(0.9996, 3):.1%}" == "99.9%"
        assert (under_one(1.0, 4), under_one(0.5, 4), under_one(0.99996, 6)) == (1.0, 0.5, 0.99996)
    cpu, blank = torch.device("cpu"), [Image.new("RGB", (96, 40), "white")]
    info = {"labels": ["cat", "dog"], "mean": [0.5] * 3, "std": [0.25] * 3}
    sure = lambda x: torch.tensor([[16.0, 0.0]]).expand(len(x), 2)   # softmax 0.9999999
    top = load_script("cifar_lenet.py").predict(sure, info, cpu, None, blank)[0]["top"]
    assert top[0]["probability"] == 0.999999
    info = {"charset": "ab", "image_size": [40, 96], "views": [[0, 0]]}
    sure = lambda x: torch.tensor([13.0, 0.0, 0.0]).expand(len(x), 4, 3)   # 0.99998
    assert load_script("captcha.py").predict(sure, info, cpu, None, blank)[0] == {"code": "aaaa", "confidence": 0.9999}
    for script in ("rcnn_faces.py", "fast_rcnn_faces.py"):
        boxes = load_script(script).found_boxes(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([0.99999]), 0.5)
        assert boxes == [{"x": 0, "y": 0, "w": 10, "h": 10, "score": 0.9999}]


def test_keep_previous_moves_all_or_nothing(tmp_path, monkeypatch):
    """A new train moves the run before into previous/: a file that cannot move (on Windows, one another program holds
    open) leaves every file where it was, said in one line (it split the run: model and checkpoint moved, history
    not, and eval then found no model)."""
    module = load_script("captcha.py")
    names = ("model.pt", "checkpoint.pt", "history.csv")
    for name in names:
        (tmp_path / name).write_text(name)
    real = os.replace

    def replace(src, dst):
        if Path(src).name == "history.csv" and "previous" in str(dst):
            raise PermissionError(errno.EACCES, "Access is denied")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(module.UserError, match=r"history.csv: cannot move it to .*previous.* \(Access is denied\)"):
        module.keep_previous(tmp_path, None, names)
    assert all((tmp_path / name).read_text() == name for name in names)
    assert not any((tmp_path / "previous").iterdir())


def test_stdin_lines_decode_as_files_do(monkeypatch):
    """eval's paths on stdin: UTF-8 with or without a BOM, and UTF-16 with its BOM (PowerShell 5.1's `>`), read alike,
    whatever the console's code page; bytes that are not UTF-8 survive as they do in file names."""
    module = load_script("captcha.py")
    for data in ("café.png\r\nb.png\n".encode(), "\ufeffcafé.png\r\nb.png\n".encode(),
                 "café.png\r\nb.png\n".encode("utf-16")):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="cp1252"))
        assert [line.strip() for line in module.stdin_lines()] == ["café.png", "b.png"], data
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9.png\n"), encoding="cp1252"))
    assert [os.fsencode(line.strip()) for line in module.stdin_lines()] == [b"caf\xe9.png"]


def test_common_block_is_one_text():
    """Each script ends with one block, after COMMON_MARK, that is the same text in all five: a fix made in one
    copy alone fails here, naming the definitions that differ. The block holds every shared helper, and no
    script defines one of its names again above it."""
    parts = {}
    for script in SCRIPTS:
        text = (ROOT / script).read_text()
        assert text.count(COMMON_MARK) == 1, f"{script}: expected one line {COMMON_MARK!r}"
        parts[script] = text.split(COMMON_MARK)
    blocks = {script: top_level(script, common) for script, (_, common) in parts.items()}
    first = blocks[SCRIPTS[0]]
    for script, block in blocks.items():
        assert set(block) == set(first), f"{script}: the common block defines {set(block) ^ set(first)} differently"
        differ = [name for name in first if ast.dump(block[name]) != ast.dump(first[name])]
        assert not differ, f"{script}: {differ} differ from {SCRIPTS[0]}'s copy"
    assert len({common for _, common in parts.values()}) == 1, "the common blocks differ in comments or layout"
    assert set(SHARED) <= set(first), set(SHARED) - set(first)
    for script, (task, _) in parts.items():
        assert not set(top_level(script, task)) & set(first), f"{script} redefines a name of the common block"


@pytest.mark.parametrize("scripts,mark,expected", [
    (FACES, FACE_MARK, {"read_boxes_csv", "match_detections", "read_ahead", "OutputFiles"}),
    (CIFARS, CIFAR_MARK, {"read_label_list", "label_files", "decode", "channel_stats", "split_indices", "report_test",
                          "cmd_prepare", "train", "predict", "cmd_eval", "export_example", "build_parser"})],
    ids=["face", "cifar"])
def test_pair_block_is_one_text(scripts, mark, expected):
    """The two face scripts hold their shared photo, scoring and eval helpers in one block between FACE_MARK and
    COMMON_MARK, the two CIFAR scripts all but their network and recipe between CIFAR_MARK and COMMON_MARK: the same
    text in both scripts of a pair; neither defines one of its names above it."""
    parts = {}
    for script in scripts:
        text = (ROOT / script).read_text()
        assert text.count(mark) == 1, f"{script}: expected one line {mark!r}"
        task, rest = text.split(mark)
        assert rest.count(COMMON_MARK) == 1, f"{script}: {mark!r} is not followed by {COMMON_MARK!r}"
        parts[script] = task, rest.split(COMMON_MARK)[0]
    if len({block for _, block in parts.values()}) > 1:
        trees = [top_level(script, block) for script, (_, block) in parts.items()]
        differ = sorted(name for name in set(trees[0]) | set(trees[1])
                        if ast.dump(trees[0].get(name, ast.Pass())) != ast.dump(trees[1].get(name, ast.Pass())))
        pytest.fail(f"the blocks after {mark!r} differ: {differ or 'in comments or layout'}")
    names = set(top_level(scripts[0], parts[scripts[0]][1]))
    assert expected <= names, expected - names
    for script, (task, _) in parts.items():
        assert not set(top_level(script, task)) & names, f"{script} redefines a name of the block after {mark!r}"


@pytest.mark.parametrize("names,scripts", [(SHARED, SCRIPTS), (FACE_SHARED, FACES)], ids=["all", "faces"])
def test_shared_helpers_are_one_text(names, scripts):
    trees = {script: top_level(script) for script in scripts}
    for name in names:
        dumps = {script: ast.dump(trees[script][name]) for script in scripts if name in trees[script]}
        assert len(dumps) == len(scripts), f"{name} missing in {set(scripts) - set(dumps)}"
        assert len(set(dumps.values())) == 1, f"{name} differs between {scripts}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_files_are_read_only_by_the_reading_functions(script):
    """The grep-able guarantee: open/Image.open/torch.load/gzip.open/read_csv/read_text/... of user data appear only
    inside the few reading functions, which turn every failure into the one-line UserError."""
    misplaced = []
    for name, node in top_level(script).items():
        for call in ast.walk(node):
            if isinstance(call, ast.Call):
                reader = call_name(call)
                key = reader if reader in READERS or "." not in reader else "." + reader.split(".")[-1]
                if key in READERS and name not in READERS[key]:
                    misplaced.append(f"{reader} in {name} (line {call.lineno})")
    assert not misplaced, misplaced


# ---- options checked before any work ----
COMMON_BAD = [["train", "--epochs", "0"], ["train", "--epochs", "2.5"], ["train", "--batch-size", "0"],
              ["train", "--lr", "-1"], ["train", "--lr", "nan"], ["train", "--patience", "0"],
              ["train", "--seed", "-1"], ["train", "--histogram-every", "-1"], ["prepare", "--workers", "0"],
              ["prepare", "--workers", "100000"], ["prepare", "--seed", "abc"], ["eval", "--device", "tpu"],
              ["train", "--batch-size", "99999999999999999999"], ["train", "--lr", "1e300"],
              ["serve", "--max-wait-ms", "1e300"], ["serve", "--workers", "100000"], ["train", "--lr", "0"]]
SCRIPT_BAD = {
    "captcha.py": [["train", "--epoch-size", "-1"], ["train", "--epoch-size", "99999999999999999999"], ["train", "--augment", "nan"], ["train", "--augment", "4"], ["train", "--augment", "strong"],
                   ["prepare", "--length", "0"], ["prepare", "--split", "50/50/1"], ["prepare", "--label-regex", "("],
                   ["prepare", "--label-regex", "[a-z]+"], ["prepare", "--image-size", "0", "0"],
                   ["prepare", "--image-size", "16", "16"]],   # a 1x1 last map: BatchNorm failed on a batch of one
    "cifar_lenet.py": [["train", "--label-smoothing", "1.5"], ["train", "--weight-decay", "-0.1"],
                       ["train", "--weight-decay", "1e300"]],
    "cifar_resnet.py": [["train", "--lr", "inf"]],
    "rcnn_faces.py": [["prepare", "--pos-iou", "1.5"], ["prepare", "--neg-iou", "-0.1"],
                      ["prepare", "--crop-size", "0"], ["prepare", "--crop-size", "100000"],
                      ["prepare", "--crop-size", "16"],
                      ["prepare", "--search-side", "0"], ["train", "--width", "100000"],
                      ["prepare", "--proposals", "0"], ["prepare", "--backgrounds", "-1"],
                      ["train", "--width", "0"], ["train", "--threshold", "2"], ["train", "--nms-iou", "-1"],
                      ["eval", "--threshold", "1.01"], ["eval", "--search-side", "0"]],
    "fast_rcnn_faces.py": [["prepare", "--size", "0x0"], ["prepare", "--size", "100000x100000"],
                           ["prepare", "--search-side", "0"], ["prepare", "--search-side", "99999999999999999999"],
                           ["prepare", "--proposals", "-1"], ["train", "--width", "1"], ["train", "--width", "100000"],
                           ["train", "--nms-iou", "2"], ["eval", "--threshold", "-0.5"]],
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_numeric_options_out_of_range(script, tmp_path, monkeypatch):
    for args in COMMON_BAD + SCRIPT_BAD[script]:
        proc = run_main(script, *args, "--data-dir", tmp_path / "data")
        line = assert_one_line_error(proc, 2)
        assert line.startswith("error: ") and args[1] in line, (args, line)
        assert not (tmp_path / "data").exists(), args
        if args[1] == "--lr":   # one range however it is missed (0 and nan said "at least 0", -1 "more than 0")
            assert "out of range: it must be more than 0 and at most 10000" in line, line
    # --grid values go through the same checks
    line = assert_one_line_error(run_main(script, "train", "--data-dir", tmp_path / "data", "--grid", "epochs=1,0"), 2)
    assert "--grid epochs=1,0" in line and "at least 1" in line
    data = ["train", "--data-dir", tmp_path / "data"]   # a wrong --grid or --tag is said before any run trains
    line = assert_one_line_error(run_main(script, *data, "--grid", "lr=0.1,0.2", "--grid", "lr=0.3"), 2)
    assert "--lr has a --grid already" in line   # both runs trained at 0.3, named 0.1 and 0.2
    line = assert_one_line_error(run_main(script, *data, "--grid", "lr=0.01,0.02", "--lr", 0.03), 2)
    assert "--lr is given on its own too" in line   # the grid's values silently replaced it
    line = assert_one_line_error(run_main(script, *data, "--grid", "seed=" + ",".join(map(str, range(100))),
                                          "--grid", "patience=" + ",".join(map(str, range(1, 101)))), 2)
    assert "10,000 combinations, more than 1,000" in line
    line = assert_one_line_error(run_main(script, *data, "--grid", "tag=short," + "é" * 130, "--grid", "seed=1,2"), 2)
    assert "over 255 bytes" in line   # the second run failed, after the first had trained
    line = assert_one_line_error(run_main(script, *data, "--tag", "x" * 201), 2)
    assert "--tag" in line and "at most 200 printable characters" in line   # made runs.csv unreadable
    line = assert_one_line_error(run_main(script, "--data-dir", tmp_path / "data", "eval"), 2)
    assert "options go after the command" in line   # was "invalid choice: '.../data'"
    if script == "captcha.py":   # serve's workers import the script by name, which a dot breaks (each worker died
        copy = tmp_path / "plates.v2.py"   # with ModuleNotFoundError, the server waited); the block is common to all
        shutil.copy(ROOT / script, copy)
        line = assert_one_line_error(run(copy, "serve", "--workers", 2, "--data-dir", tmp_path / "data"), 2)
        assert "rename the copy (plates_v2.py) or use --workers 1" in line
    (tmp_path / "a-file").write_text("not a folder")
    line = assert_one_line_error(run_main(script, *data, "--tensorboard", tmp_path / "a-file"), 2)
    assert "--tensorboard" in line and "not a folder" in line
    line = assert_one_line_error(run_main(script, *data, "--tensorboard", tmp_path / "a-file" / "tb"), 2)
    assert "--tensorboard" in line and "cannot write there" in line   # a place no folder can be made: said at once
    for asked in (["--histogram-every", 2], ["--grid", "histogram-every=1,2"]):   # were silently ignored
        line = assert_one_line_error(run_main(script, *data, *asked), 2)
        assert "--histogram-every" in line and "pass --tensorboard DIR too" in line
    assert "meta.json not found" in assert_one_line_error(run_main(script, *data, "--histogram-every", 0), 1)   # never
    if script.startswith("cifar"):   # --compile on the CPU without a compiler: said before the data are read
        for cxx in ("/nonexistent/g++", ""):   # inductor runs $CXX, g++ when unset (an empty one: nothing)
            monkeypatch.setenv("CXX", cxx)
            line = assert_one_line_error(run_main(script, *data, "--compile", "--device", "cpu"), 2)
            assert f"--compile on the CPU needs a C++ compiler: {cxx!r} (CXX" in line
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_data_dir_not_a_writable_folder(script, tmp_path):
    a_file = tmp_path / "data"
    a_file.write_text("not a folder")
    for command in (["prepare", "--image-dir", tmp_path], ["train"]):
        line = assert_one_line_error(run_main(script, *command, "--data-dir", a_file), 2)
        assert str(a_file) in line and "not a folder" in line
    assert a_file.read_text() == "not a folder"
    if os.geteuid() == 0:
        read_only = "/proc"  # root writes anywhere except where the kernel refuses
    else:
        read_only = tmp_path / "ro"
        read_only.mkdir(mode=0o555)
    for command in (["prepare", "--image-dir", tmp_path], ["train"]):
        line = assert_one_line_error(run_main(script, *command, "--data-dir", read_only), 2)
        assert "not writable" in line


# ---- one command per DATA_DIR ----
def synthetic_cifar(data_dir, n=64):
    """A prepared CIFAR-style DATA_DIR of random images, written by the script's own save_prepared."""
    module = load_script("cifar_lenet.py")
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % 3
    meta = {"kind": "cifar", "script": "cifar_lenet", "labels": ["a", "b", "c"], "image_size": 32,
            "mean": [0.5] * 3, "std": [0.25] * 3}
    data_dir.mkdir()
    module.save_prepared(data_dir, {name: (images, labels) for name in module.SPLITS}, meta)
    return data_dir


def test_second_command_on_a_data_dir_fails_at_once(tmp_path):
    """train holds DATA_DIR: prepare, another train and export fail at once naming it; SIGTERM ends train cleanly
    and the lock goes with it."""
    data = synthetic_cifar(tmp_path / "data")
    cmd = [sys.executable, str(ROOT / "cifar_lenet.py"), "train", "--data-dir", str(data), "--epochs", "100000",
           "--batch-size", "16", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # see test_captcha
    try:
        deadline, holder = time.time() + 120, ""
        while "train" not in holder and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
            holder = (data / ".lock").read_text() if (data / ".lock").exists() else ""
        assert proc.poll() is None and f"pid {proc.pid} " in holder, proc.communicate()
        before = tree_bytes(data)
        for script, args in [("cifar_lenet.py", ["prepare", "--image-dir", tmp_path, "--workers", 1]),
                             ("cifar_resnet.py", ["train", "--epochs", 1, "--device", "cpu"]),
                             ("captcha.py", ["prepare", "--image-dir", tmp_path, "--workers", 1]),
                             ("cifar_lenet.py", ["export"]),   # its model.onnx beside a model.pt being replaced
                             ("cifar_lenet.py", ["export", "--model", data / "model.pt"]),   # named: the same
                             ("cifar_lenet.py", ["export", "--output", data / "other.onnx"])]:
            line = assert_one_line_error(run_main(script, *args, "--data-dir", data), 1)
            assert f"in use by pid {proc.pid} " in line and "cifar_lenet.py train" in line
            assert ("--output in another folder" in line) == (args[0] == "export")   # what export can change
        assert all(before[name] == data.joinpath(name).read_bytes() for name in before if name.endswith(".pt.gz"))
        proc.send_signal(signal.SIGTERM)   # a kill ends train as Ctrl-C does (Ctrl-C: test_captcha's resume test)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "terminated" in err and "Traceback" not in err, err
    assert not (data / ".lock").exists() and not list(data.glob("*.tmp*"))


def test_train_refuses_what_it_cannot_write_before_training(tmp_path):
    """A damaged runs.csv is said before any epoch (it used to end a whole training run with an error and lose the
    run's row); a --tensorboard that names a file: a usage error in one line, before any work; --sync-bn in one
    process: a warning."""
    data = synthetic_cifar(tmp_path / "data")
    (data / "runs.csv").mkdir()
    proc = run_main("cifar_lenet.py", "train", "--data-dir", data, "--epochs", 1, "--device", "cpu")
    assert "runs.csv" in assert_one_line_error(proc, 1) and "epoch 1" not in proc.stdout
    (data / "runs.csv").rmdir()
    (tmp_path / "tb").write_text("a file")
    line = assert_one_line_error(run_main("cifar_lenet.py", "train", "--data-dir", data, "--epochs", 1, "--device",
                                          "cpu", "--tensorboard", tmp_path / "tb"), 2)
    assert str(tmp_path / "tb") in line and not (data / "model.pt").exists()
    proc = run_main("cifar_lenet.py", "train", "--data-dir", data, "--epochs", 1, "--device", "cpu", "--sync-bn")
    assert proc.returncode == 0, proc.stderr   # one process: said, not silently ignored, and the run goes on
    assert "warning: --sync-bn: one process, nothing to synchronise" in proc.stderr and (data / "model.pt").is_file()


def test_divergence_long_names_and_a_link_in_data_dir(tmp_path):
    """A loss that explodes but stays finite ends the run in one line (5e17 trained on, was saved and scored); a file
    whose name is near 255 bytes is written atomically (the temporary name was longer than the file system takes);
    prepare into LINK/../data works (the staging folder was looked for beside the link's parent)."""
    data = synthetic_cifar(tmp_path / "data")
    proc = run_main("cifar_lenet.py", "train", "--data-dir", data, "--epochs", 2, "--batch-size", 16, "--lr", 1000,
                    "--device", "cpu")
    assert "(diverged); lower --lr" in assert_one_line_error(proc, 1) and not (data / "model.pt").exists()
    module = load_script("cifar_lenet.py")
    names = ["é" * 120 + ".png", "😀" * 48 + "." + "😀" * 15]   # 244 and 253 bytes
    for name in names:
        module.atomic_write_text(tmp_path / name, "whole")
        assert (tmp_path / name).read_text() == "whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["data", *names])   # no temporary file left
    (tmp_path / "deep" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "deep" / "sub")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(12):
        Image.new("RGB", (32, 32), (20 * i, 0, 0)).save(images / f"{i:05d}_{'ab'[i % 2]}.png")
    (images / "labels.txt").write_text("a\nb\n")
    proc = run_main("cifar_lenet.py", "prepare", "--image-dir", images, "--data-dir", tmp_path / "link" / ".." / "d",
                    "--workers", 1)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "deep" / "d" / "meta.json").is_file() and not (tmp_path / "d").exists()


def test_an_unreadable_folder_is_said(tmp_path, monkeypatch):
    """list_images: a subfolder that cannot be read (no permission: simulated, as root reads everything) is a
    UserError naming it; Path.rglob passed over it, and prepare and eval left its images out unsaid."""
    module = load_script("captcha.py")
    (tmp_path / "ok").mkdir()
    (tmp_path / "locked").mkdir()
    (tmp_path / ".hidden").mkdir()
    for folder in ("ok", "locked", ".hidden", "."):
        Image.new("RGB", (8, 8)).save(tmp_path / folder / "a.png")
    (tmp_path / "ok" / ".b.png").write_bytes(b"hidden")
    assert module.list_images(tmp_path) == [tmp_path / p for p in ("a.png", "locked/a.png", "ok/a.png")]
    scandir = os.scandir

    def refusing(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    with pytest.raises(module.UserError, match=r"locked: cannot read this folder \(Permission denied\)"):
        module.list_images(tmp_path)


@pytest.mark.parametrize("script", ["cifar_lenet.py", "rcnn_faces.py", "fast_rcnn_faces.py"])
def test_an_image_folder_without_permission_is_said(script, tmp_path, monkeypatch):
    """prepare of an --image-dir it may not read (simulated: root reads everything): one line saying so (it was a
    missing test/ folder for CIFAR, and every photo an "unusable Name" for the face scripts)."""
    images = tmp_path / "images"
    images.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != images and access(path, mode, **kw))
    extra = ["--csv", FACES_DIR / "bbox_train.csv"] if "faces" in script else []
    line = assert_one_line_error(run_main(script, "prepare", "--image-dir", images, *extra, "--data-dir",
                                          tmp_path / "d"), 1)
    assert f"--image-dir {images}: cannot read this folder (permission denied)" in line


def test_resume_refuses_other_prepared_data_and_another_runs_model(tmp_path):
    """Each prepare gives meta.json the id of its data and options, kept in the checkpoint: --resume after another
    prepare (other images of the same classes) is one line, before any epoch (it went on, and validated and tested
    on images it had trained on); a model.pt of another run beside the checkpoint is one line too (a traceback after
    training)."""
    module = load_script("cifar_lenet.py")
    ids = []
    for name, seed, label in [("p1", 1, 0), ("p2", 1, 0), ("p3", 2, 0), ("p4", 1, 1)]:   # same, other seed, other data
        (tmp_path / name).mkdir()
        split = (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, label]))
        module.save_prepared(tmp_path / name, {"training_set": split}, {"kind": "cifar", "seed": seed})
        ids.append(json.loads((tmp_path / name / "meta.json").read_text())["prepared"])
    assert ids[0] == ids[1] and len(set(ids)) == 3 and all(len(i) == 16 for i in ids)
    data = synthetic_cifar(tmp_path / "data")
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "prepared": "first"}))
    train = ["train", "--data-dir", data, "--batch-size", 16, "--device", "cpu"]
    assert run_main("cifar_lenet.py", *train, "--epochs", 1).returncode == 0
    (data / "meta.json").write_text(json.dumps({**meta, "prepared": "second"}))   # prepared again
    proc = run_main("cifar_lenet.py", *train, "--epochs", 2, "--resume")
    assert "trained on data prepared before the last prepare" in assert_one_line_error(proc, 1)
    assert "epoch 2" not in proc.stdout and "no epoch to train" not in proc.stdout
    (data / "meta.json").write_text(json.dumps({**meta, "prepared": "first"}))
    ckpt = torch.load(data / "checkpoint.pt", weights_only=True)   # of a version before the id: data prepared since
    torch.save({k: v for k, v in ckpt.items() if k != "prepared"}, data / "checkpoint.pt")
    proc = run_main("cifar_lenet.py", *train, "--epochs", 2, "--resume")
    assert "or an older cifar_lenet.py): its scores would mix" in assert_one_line_error(proc, 1)   # went on silently
    torch.save(ckpt, data / "checkpoint.pt")
    best = torch.load(data / "model.pt", weights_only=True)
    other = module.build_model({"num_classes": 5})
    torch.save({**best, "model": other.state_dict(), "model_args": {"num_classes": 5}}, data / "model.pt")
    line = assert_one_line_error(run_main("cifar_lenet.py", *train, "--epochs", 2, "--resume"), 1)
    assert "not the best model of the run" in line
    torch.save(best, data / "model.pt")
    proc = run_main("cifar_lenet.py", *train, "--epochs", 2, "--resume")
    assert proc.returncode == 0 and "epoch 2/2" in proc.stdout, proc.stderr


def test_a_file_system_error_is_one_line(tmp_path, capsys):
    """An OSError that no reader turned into a UserError (a full disk, a folder where a file goes) ends the command
    in one line, naming where the file was going rather than its temporary name."""
    mod = load_script("captcha.py")
    (tmp_path / "history.tmp").write_text("new")
    (tmp_path / "history.csv").mkdir()
    args = argparse.Namespace(command="eval", data_dir=tmp_path,
                              func=lambda a: os.replace(tmp_path / "history.tmp", tmp_path / "history.csv"))
    assert mod.run_command(args) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'history.csv'}: Is a directory\n"


def test_readers_cap_and_straighten_what_they_read(tmp_path, monkeypatch):
    """The common block's readers (one text in all five scripts): a model file or shard that unpacks past MAX_UNPACKED
    and 64x its size and a FIFO named as a model are one-line errors; a 16-bit grey image is scaled, not clipped; a photo
    stored sideways with an EXIF orientation is read upright."""
    module = load_script("cifar_lenet.py")
    data = synthetic_cifar(tmp_path / "data")   # random images: a shard that does not pack at all
    zeros = tmp_path / "zeros.pt.gz"            # packs ~1000x, as a bomb does
    module.save_shard(zeros, [torch.zeros(1000, 3, 32, 32, dtype=torch.uint8), torch.zeros(1000, dtype=torch.long)])
    model, packed = tmp_path / "model.pt", tmp_path / "packed.pt"
    torch.save({"script": "cifar_lenet", "model": {"w": torch.zeros(10 ** 6)}}, model)   # torch stores it unpacked
    with zipfile.ZipFile(model) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for entry in src.infolist():
            dst.writestr(entry.filename, src.read(entry))
    monkeypatch.setattr(module, "MAX_UNPACKED", 100_000)   # all four files unpack past it
    assert module.load_shard(data / "training_set.0.pt.gz")[0].shape == (64, 3, 32, 32)   # within 64x its size
    assert module.load_model_file(model, ["model"])["model"]["w"].shape == (10 ** 6,)
    for read, path in [(module.load_shard, zeros), (lambda p: module.load_model_file(p, ["model"]), packed)]:
        with pytest.raises(module.UserError, match="unpack_limit"):
            read(path)
    os.mkfifo(tmp_path / "fifo.pt")
    with pytest.raises(module.UserError, match="not a file"):
        module.load_model_file(tmp_path / "fifo.pt")
    from PIL import Image
    Image.fromarray((torch.arange(256 * 8) * 32).reshape(8, 256).numpy().astype("uint16")).save(tmp_path / "g16.png")
    grey = module.image_to_tensor(module.load_image(tmp_path / "g16.png"))[0]   # 0..65504 -> 0..255
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert grey[0, 64] == 8 and grey[-1, 0] == 223 and grey[-1, -1] == 255   # 2048, 57344, 65504 / 257
    img = Image.new("RGB", (60, 40), "white")
    img.paste((255, 0, 0), (0, 0, 10, 10))   # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6   # view rotated 90 degrees clockwise
    img.save(tmp_path / "side.jpg", exif=exif)
    upright = module.image_to_tensor(module.load_image(tmp_path / "side.jpg"))
    assert upright.shape == (3, 60, 40) and upright[0, 2, -3] > 200 and upright[1, 2, -3] < 60   # now top-right


def test_transparent_colour_is_white_and_a_bad_exif_is_silent(tmp_path):
    """A PNG whose tRNS marks one colour transparent (1-bit, grey, 16-bit grey, RGB) is composited onto white like
    an alpha channel (it was read black, and the "transparency" left on the RGB image made a face eval's annotated
    PNG a traceback); a BMP whose alpha is all 0 is opaque, as browsers show it (it was read all white); a damaged
    EXIF block or a bomb's header prints no Python warning (serve's log)."""
    module = load_script("cifar_lenet.py")
    for mode, key in [("1", 0), ("L", 0), ("I;16", 0), ("RGB", (0, 0, 0))]:
        Image.new(mode, (8, 6), key).save(tmp_path / f"{mode}.png", transparency=key)
        img = module.load_image(tmp_path / f"{mode}.png")
        assert img.getpixel((0, 0)) == (255, 255, 255) and "transparency" not in img.info, mode
        img.save(tmp_path / "annotated.png")   # as draw_boxes saves it
    header = struct.pack("<IiiHHIIiiII4I", 124, 8, 6, 1, 32, 3, 192, 0, 0, 0, 0, 0xff0000, 0xff00, 0xff, 0xff000000)
    bmp = header.ljust(124, b"\0") + b"\x1e\x1e\xc8\0" * 48   # 32-bit BMP, an alpha mask, alpha 0: red, not white
    (tmp_path / "alpha0.bmp").write_bytes(b"BM" + struct.pack("<IHHI", 14 + len(bmp), 0, 0, 138) + bmp)
    assert module.load_image(tmp_path / "alpha0.bmp").getpixel((0, 0)) == (200, 30, 30)
    Image.new("RGB", (8, 6), "red").save(tmp_path / "exif.jpg", exif=b"Exif\0\0II*\0\x08\0\0\0\xff\xff\x12\x01\x03\0")
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        assert module.load_image(tmp_path / "exif.jpg").size == (8, 6)
        assert module.pixel_count((tmp_path / "exif.jpg").read_bytes()) == 48   # serve, before load_image
        assert module.pixel_count(png_declaring(tmp_path / "bomb.png", 10000, 10000).read_bytes()) == 10 ** 8
    assert not shown, [str(w.message) for w in shown]


GOOD_MODELS = {   # eval's entries of a model file of each script, as train writes them
    "captcha.py": {"model_args": {"n_classes": 11, "length": 4, "image_size": [40, 96]}, "charset": "0123456789",
                   "image_size": [40, 96], "calibration": {"a": 1.0, "b": 0.0}},
    "cifar_lenet.py": {"labels": ["a", "b", "c"], "model_args": {"num_classes": 3}, "mean": [0.5] * 3,
                       "std": [0.25] * 3},
    "rcnn_faces.py": {"crop_size": 32, "search_side": 400, "proposals": 2000, "calibration": [1.0, 0.0, 0.5],
                      "model_args": {"width": 16, "crop_size": 32, "regress": True}},
    "fast_rcnn_faces.py": {"size": [384, 256], "search_side": 200, "proposals": 300, "calibration": [1.0, 0.0, 0.5],
                           "model_args": {"width": 24, "samples": 1}},
}
GOOD_MODELS["cifar_resnet.py"] = GOOD_MODELS["cifar_lenet.py"]
BAD_ENTRIES = {   # hand-edited entries that ended in a traceback, gigabytes allocated, a NaN in the JSON or no box
    "captcha.py": [("image_size", [4000, 4000]), ("image_size", "ab"), ("image_size", [40.0, 96.0]), ("charset", 5),
                   ("charset", ""),
                   ("model_args", {"n_classes": 11, "length": 4, "image_size": [60000, 60000]}),
                   ("model_args", {"n_classes": 11, "length": 4, "image_size": [40, 96], "widths": []}),
                   ("calibration", {"a": float("nan"), "b": 0}), ("calibration", {"a": 1e308, "b": 1e308})],
    "cifar_lenet.py": [("labels", ["a", "b"]), ("labels", 5), ("labels", []), ("labels", ["a", "a", "b"]),
                       ("labels", ["", "b", "c"]), ("mean", [0.5]), ("std", [0, 0, 0]), ("image_size", 4)],
    "rcnn_faces.py": [("calibration", [float("nan"), 0]), ("calibration", "ab"), ("calibration", []),
                      ("calibration", [-1.0, 0.0]), ("calibration", [1e30, 0.0, 0.0]),
                      ("search_side", 0), ("search_side", -5), ("crop_size", 100000), ("proposals", 0),
                      ("proposals", "ab"), ("nms_iou", 1.5)],
    "fast_rcnn_faces.py": [("size", [0, 0]), ("size", "ab"), ("size", [100000, 100000]), ("calibration", "ab"),
                           ("calibration", 5), ("calibration", [-1.0, 0.0, 0.0]), ("proposals", -1),
                           ("search_side", 0), ("model_args", {"width": 1}), ("nms_iou", "ab")],
}
BAD_ENTRIES["cifar_resnet.py"] = BAD_ENTRIES["cifar_lenet.py"]
BAD_ENTRIES["cifar_lenet.py"] = [*BAD_ENTRIES["cifar_resnet.py"], ("image_size", 8)]   # LeNet reads 16 px and more


@pytest.mark.parametrize("script", SCRIPTS)
def test_model_entries_checked_before_use(script):
    """check_model: a model file's entries as train writes them pass; each hand-edited one is a UserError naming
    the file (load_network calls it for model.pt and model.onnx before building the network)."""
    module = load_script(script)
    module.check_model("model.pt", GOOD_MODELS[script])
    for key, value in BAD_ENTRIES[script]:
        with pytest.raises(module.UserError, match="model.pt: .* malformed"):
            module.check_model("model.pt", {**GOOD_MODELS[script], key: value})


BAD_META = {   # hand-edited meta.json entries that ended in a traceback (after an epoch, for R-CNN) or a NaN loss
    "captcha.py": [("lengths", []), ("lengths", 4), ("image_size", [40.0, 96.0]), ("charset", "aab"), ("length", 0)],
    "cifar_lenet.py": [("mean", [0.5]), ("std", [0, 0, 0])],
    "rcnn_faces.py": [("options", {"crop_size": 100000, "search_side": 400}), ("options", {"crop_size": 32,
                      "search_side": 0}), ("splits", {"validating": [5], "testing": []}), ("boxes", {"a.jpg": "abc"}),
                      ("options", {"crop_size": 32, "search_side": 400, "proposals": -1})],
    "fast_rcnn_faces.py": [("size", ["a", "b"]), ("search_side", 0), ("proposals", -1)],
}


@pytest.mark.parametrize("script", list(BAD_META))
def test_meta_entries_checked_before_training(script, tmp_path):
    """read_meta: each hand-edited meta.json entry is one line naming the key, before train loads anything."""
    module = load_script(script)
    for key, value in BAD_META[script]:
        data = tmp_path / f"{key}-{value!r}"
        data.mkdir()
        meta = {"kind": module.DATA_KIND, "labels": ["a"], "mean": [0.5] * 3, "std": [0.25] * 3, "size": [384, 256],
                "charset": "ab", "image_size": [40, 96], "length": 4, "lengths": [3, 4], "case_sensitive": False,
                "search_side": 200, "proposals": 300, "image_dir": "x",
                "options": {"crop_size": 32, "search_side": 400},
                "splits": {"validating": [], "testing": []}, "boxes": {}}
        (data / "meta.json").write_text(json.dumps(meta))
        module.read_meta(data)   # the entries as prepare writes them pass
        (data / "meta.json").write_text(json.dumps({**meta, key: value}))
        with pytest.raises(module.UserError, match=f"'{key}[.a-z_]*' is missing or malformed"):
            module.read_meta(data)


def test_train_and_export_helpers_under_stress(tmp_path, monkeypatch, capsys):
    """Signals wait while torch.export traces (it swallowed a Ctrl-C and wrote the file, and turned SIGTERM into a
    traceback) and act after; a full disk in torch.save is an OSError (one line in run_command), not a RuntimeError
    traceback; a new best model of a resumed run moves the model.onnx exported before aside; --grid values that hold
    a path make folder names without one; a model.pt with NaN weights is refused (eval printed bare NaN)."""
    module = load_script("cifar_lenet.py")
    for sig, raised in ((signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, module.Terminated)):
        reached = []
        with pytest.raises(raised):
            with module.signals_held():
                signal.raise_signal(sig)
                reached.append(True)   # the body runs to its end first
        assert reached == [True]
    monkeypatch.setattr(module.torch, "save", lambda obj, f: (_ for _ in ()).throw(RuntimeError("unexpected pos 64")))
    with pytest.raises(OSError, match="a full disk"):
        module.atomic_torch_save({}, tmp_path / "x.pt")
    monkeypatch.undo()
    assert not list(tmp_path.iterdir())   # no temporary file left
    model = module.build_model({"num_classes": 3})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    (tmp_path / "model.onnx").write_bytes(b"exported from the model before")
    args = argparse.Namespace(data_dir=str(tmp_path))
    state = {"epoch": 3, "history": [{"epoch": 3, "val_acc": 0.5}], "best_score": 0.5, "bad_epochs": 0,
             "model_args": {"num_classes": 3}}
    module.save_epoch(tmp_path, args, model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), state,
                      {"model_args": {"num_classes": 3}}, ["val_acc"])
    assert not (tmp_path / "model.onnx").exists() and (tmp_path / "model.pt").exists()
    assert [p.read_bytes() for p in (tmp_path / "previous").glob("*/model.onnx")] == [b"exported from the model before"]
    capsys.readouterr()
    for n in range(2, module.KEEP_NOTE + 1):   # previous/ is never pruned: from KEEP_NOTE runs on, their size is said
        (tmp_path / "model.pt").write_bytes(b"m" * 2**20)
        module.keep_previous(tmp_path, None, ("model.pt",))
        assert len(list((tmp_path / "previous").iterdir())) == n
        said = capsys.readouterr().out
        assert (f"keeps {n} earlier runs ({n - 1} MB); delete those you no longer need" in said) == (n == module.KEEP_NOTE)
    parser = module.build_parser()
    args = parser.parse_args(["train", "--grid", "tag=q/../../..,w", "--grid", "lr=0.1,0.2"])
    names = [name for name, _ in module.grid_runs(args, args.train_parser)]
    assert len(set(names)) == 4 and not any("/" in name for name in names), names
    good = {"script": "cifar_lenet", "model": model.state_dict(), "model_args": {"num_classes": 3},
            "labels": ["a", "b", "c"], "mean": [0.5] * 3, "std": [0.2] * 3}
    good["model"]["fc3.weight" if "fc3.weight" in good["model"] else next(iter(good["model"]))].fill_(float("nan"))
    torch.save(good, tmp_path / "nan.pt")
    with pytest.raises(module.UserError, match="NaN or infinity"):
        module.load_model_file(tmp_path / "nan.pt")


def test_epoch_files_are_whole_or_the_run_before(tmp_path, monkeypatch):
    """save_epoch: a full disk while the first epoch's files are written puts the run before back in place (its model,
    checkpoint and history were left in previous/, and runs.csv pointing there); a Ctrl-C while they are written
    waits until all are (a new model.pt beside no checkpoint, or no history, before)."""
    module = load_script("cifar_lenet.py")
    old = {name: f"the run before: {name}".encode() for name in ("model.pt", "checkpoint.pt", "history.csv")}
    for name, data in old.items():
        (tmp_path / name).write_bytes(data)
    module.write_runs(tmp_path / "runs.csv", [{"run_dir": str(tmp_path), "test": "0.5"}])
    model = module.build_model({"num_classes": 3})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    state = {"epoch": 1, "history": [{"epoch": 1, "val_acc": 0.5}], "best_score": 0.5, "bad_epochs": 0,
             "model_args": {"num_classes": 3}}
    save = partial(module.save_epoch, tmp_path, argparse.Namespace(data_dir=str(tmp_path)), model, optimizer,
                   scheduler, torch.amp.GradScaler("cpu", enabled=False), state, {"model_args": {"num_classes": 3}},
                   ["val_acc"])
    real_save, real_save_model = module.atomic_torch_save, module.save_model

    def disk_full_at_the_checkpoint(obj, path):
        if Path(path).name == "checkpoint.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, path)
    monkeypatch.setattr(module, "atomic_torch_save", disk_full_at_the_checkpoint)
    with pytest.raises(OSError):
        save()
    assert {name: (tmp_path / name).read_bytes() for name in old} == old
    assert not list((tmp_path / "previous").iterdir())
    assert module.read_runs(tmp_path / "runs.csv")[0]["run_dir"] == str(tmp_path)
    monkeypatch.setattr(module, "atomic_torch_save", real_save)
    real_history = module.save_history
    (tmp_path / "checkpoint.pt").unlink()   # a run before without a checkpoint: none of this run's stays beside it
    monkeypatch.setattr(module, "save_history", lambda *args: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError):
        save()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.csv", "model.pt", "previous", "runs.csv"]
    assert (tmp_path / "model.pt").read_bytes() == old["model.pt"]
    (tmp_path / "checkpoint.pt").write_bytes(old["checkpoint.pt"])

    def ctrl_c_midway(*args):
        signal.raise_signal(signal.SIGINT)
        real_history(*args)
    monkeypatch.setattr(module, "save_history", ctrl_c_midway)
    with pytest.raises(KeyboardInterrupt):
        save()
    assert all((tmp_path / name).read_bytes() != data for name, data in old.items())   # all three of the new run
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1
    [before] = (tmp_path / "previous").iterdir()
    assert {p.name: p.read_bytes() for p in before.iterdir()} == old
    # a full disk at a later epoch whose model is better: the best model so far comes back beside its checkpoint
    monkeypatch.setattr(module, "save_history", real_history)
    state.update(epoch=2, history=state["history"] + [{"epoch": 2, "val_acc": 0.6}], best_score=0.6)
    epoch1 = {name: (tmp_path / name).read_bytes() for name in ("model.pt", "checkpoint.pt")}
    monkeypatch.setattr(module, "atomic_torch_save", disk_full_at_the_checkpoint)
    with pytest.raises(OSError):
        save()
    assert {name: (tmp_path / name).read_bytes() for name in epoch1} == epoch1
    assert not list(tmp_path.glob("*.tmp-*"))   # no copy left behind
    monkeypatch.setattr(module, "atomic_torch_save", real_save)
    monkeypatch.setattr(module, "save_model", lambda *args: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError):   # the model itself not written: nothing changed, no second name left
        save()
    assert {name: (tmp_path / name).read_bytes() for name in epoch1} == epoch1 and not list(tmp_path.glob("*.tmp-*"))
    monkeypatch.setattr(module, "save_model", real_save_model)
    monkeypatch.setattr(module, "save_history", lambda *args: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError):   # the checkpoint of this epoch written: its model stays beside it
        save()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert (tmp_path / "model.pt").read_bytes() != epoch1["model.pt"] and not list(tmp_path.glob("*.tmp-*"))
    monkeypatch.setattr(module, "save_history", real_history)
    save()
    assert torch.load(tmp_path / "model.pt", weights_only=True)["model_args"] == {"num_classes": 3}
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert not list(tmp_path.glob("*.tmp-*"))
    for sig, raised in ((signal.SIGTERM, module.Terminated), (signal.SIGINT, KeyboardInterrupt)):
        with pytest.raises(raised):   # a signal held while the body fails: the stop wins (130 / 143), not the error
            with module.signals_held():
                signal.raise_signal(sig)
                raise OSError(errno.ENOSPC, "full")


def test_torchrun_peer_gone_is_one_line(monkeypatch, capsys):
    """Under torchrun, a collective that fails because another process died is one line naming the process (it was
    60 lines of traceback from each survivor); any other RuntimeError, and any outside torchrun, keeps its
    traceback (a bug)."""
    module = load_script("cifar_lenet.py")
    def lost(args):
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:9099\nmore")
    def bug(args):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    args = argparse.Namespace(command="eval", data_dir="unused", func=lost)
    with pytest.raises(RuntimeError):
        module.run_command(args)
    monkeypatch.setenv("WORLD_SIZE", "2")   # cmd_train has left the process group by then: the environment tells
    monkeypatch.setenv("RANK", "1")
    assert module.run_command(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error (process 1): [../gloo") and "another torchrun" in err
    with pytest.raises(RuntimeError, match="shapes"):   # a bug under torchrun keeps its traceback
        module.run_command(argparse.Namespace(command="eval", data_dir="unused", func=bug))
    parser = module.build_parser()   # --grid names made unique by a suffix: the suffix free too
    args = parser.parse_args(["train", "--grid", "tag=a-b-3,a-b,a/b"])
    names = [name for name, _ in module.grid_runs(args, args.train_parser)]
    assert len(set(names)) == 3, names


def test_resume_refuses_a_damaged_checkpoint(tmp_path):
    """train --resume: a checkpoint whose epoch, history or best score was edited is one line, before training; a
    new --lr holds from the resumed epoch on (also after a run at lr 0); on/off options are said as flags."""
    module = load_script("cifar_lenet.py")
    model = module.build_model({"num_classes": 3})
    optimizer = torch.optim.AdamW(model.parameters())
    good = {"script": "cifar_lenet", "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": {},
            "scheduler": {}, "epoch": 2, "history": [{}, {}], "best_score": 0.5, "bad_epochs": 0,
            "model_args": {"num_classes": 3}}
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    path = tmp_path / "checkpoint.pt"
    torch.save(good, path)
    (tmp_path / "model.pt").write_bytes(b"the best model so far")   # beside its checkpoint, as train leaves it
    assert module.resume_training(path, {"num_classes": 3}, model, optimizer, scaler)[0] == 2
    for key, value in [("epoch", "2"), ("epoch", -5), ("best_score", "x"), ("bad_epochs", None), ("history", "abc")]:
        torch.save({**good, key: value}, path)
        with pytest.raises(module.UserError, match="does not fit this run"):
            module.resume_training(path, {"num_classes": 3}, model, optimizer, scaler)
    # the learning rate asked for now holds: scaled from the run's, or taken as it is where the run's was 0
    for stored, asked in [(0.002, 0.01), (0.0, 0.01)]:
        torch.save({**good, "optimizer": torch.optim.AdamW(model.parameters(), lr=stored).state_dict()}, path)
        fresh = torch.optim.AdamW(model.parameters(), lr=asked)
        module.resume_training(path, {"num_classes": 3}, model, fresh, scaler)
        assert fresh.param_groups[0]["lr"] == pytest.approx(asked)
    parser = module.build_parser().parse_args(["train"]).train_parser
    amp = next(a for a in parser._actions if a.dest == "amp")
    assert (module.shown(amp, False), module.shown(amp, True)) == ("--no-amp", "--amp")   # not "--no-amp False"
    (tmp_path / "model.pt").unlink()   # (resume_options checks a model.pt beside it: this one is not a model)
    torch.save({**good, "config": {"batch_size": -3}}, path)   # an option edited in the checkpoint: one line
    with pytest.raises(module.UserError, match="its option --batch-size -3 is not valid"):
        module.resume_options(argparse.Namespace(batch_size=64, data_dir=tmp_path / "none"), parser, path, set())
    # a shard missing between others: said, not a shorter split read without a word
    for n in (0, 2):
        module.save_shard(tmp_path / f"training_set.{n}.pt.gz", [torch.zeros(2)])
    with pytest.raises(module.UserError, match="training_set.1.pt.gz is missing"):
        module.read_split(tmp_path, "training_set")
    assert [module.host_name(name) for name in ("Proxy.Example:8080", "http://proxy.example/", "[::1]:80", "a.b.")
            ] == ["proxy.example", "proxy.example", "::1", "a.b"]
    with pytest.raises(argparse.ArgumentTypeError):
        module.host_name("[")


@pytest.mark.parametrize("script", ["captcha.py", "fast_rcnn_faces.py"])
def test_ctrl_c_while_starting(script):
    """Ctrl-C while the script still imports torch: status 130 and no traceback (a KeyboardInterrupt traceback from
    inside torch's import before). Sent 0.8 s after the start, inside the imports on these machines; later it is
    main()'s "interrupted", also 130."""
    proc = subprocess.Popen([sys.executable, str(ROOT / script), "eval", "--device", "cpu"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # see test_captcha
    time.sleep(0.8)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and err.strip() == "interrupted", err
    proc = subprocess.Popen([sys.executable, str(ROOT / script), "eval", "--device", "cpu"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    time.sleep(0.8)
    proc.send_signal(signal.SIGTERM)   # a scheduler's stop: one line too (it ended silently, status -15)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip() == "terminated", (proc.returncode, err)


# ---- prepare: nothing lost ----
@pytest.fixture(scope="module")
def cifar_source(tmp_path_factory):
    """40 CIFAR training images (links into ../shared), or where ../shared is missing 40 drawn ones named alike: these
    tests check prepare's files, not what the pictures show."""
    src = tmp_path_factory.mktemp("cifar_src")
    (src / "train").mkdir()
    if CIFAR_DIR.exists():
        shutil.copy(CIFAR_DIR / "labels.txt", src / "labels.txt")
        for path in sorted((CIFAR_DIR / "train").iterdir())[:40]:
            (src / "train" / path.name).symlink_to(path)
        return src
    labels = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (src / "labels.txt").write_text("\n".join(labels) + "\n")
    pixels = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(src / "train" / f"{i:05d}_{labels[i % 10]}.jpg")
    return src


@pytest.fixture
def prepared_with_model(cifar_source, tmp_path):
    """DATA_DIR with prepared data and the files of a training run, which a prepare must leave alone."""
    data = tmp_path / "data"
    assert run_main("cifar_lenet.py", "prepare", "--image-dir", cifar_source, "--data-dir", data, "--workers", 1,
                    "--seed", 5).returncode == 0
    for name in ("model.pt", "checkpoint.pt", "history.csv", "runs.csv"):
        (data / name).write_bytes(os.urandom(64))
    return data


def leftovers(data):
    """Temporary folders and files of a prepare left next to or in DATA_DIR."""
    return [p.name for p in [*data.parent.iterdir(), *data.iterdir()] if ".prepare-" in p.name or ".tmp" in p.name
            or p.name == ".lock"]


def test_prepare_interrupted_or_failing_at_every_rename(cifar_source, prepared_with_model, monkeypatch):
    """Ctrl-C or a write error at each file rename of prepare (shards and meta.json into the new folder, old files
    aside, new files in): the old data are as they were, byte for byte, and nothing is left behind; a complete
    prepare replaces shards and meta.json and keeps the rest (a user's file named like a shard too)."""
    data = prepared_with_model
    before = tree_bytes(data)
    args = ["prepare", "--image-dir", cifar_source, "--data-dir", data, "--workers", 1]
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == fail_at:
            raise failure
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    fail_at, failure = 0, None
    assert run_main("cifar_lenet.py", *args, "--seed", 5).returncode == 0   # counts the renames (same data again)
    renames = len(calls)
    assert tree_bytes(data) == before and renames >= 10, calls   # 3 shards + meta, twice, and the old ones aside
    for fail_at in range(1, renames + 1):
        for failure in (KeyboardInterrupt(), OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))):
            calls.clear()
            proc = run_main("cifar_lenet.py", *args, "--seed", 1)
            if isinstance(failure, KeyboardInterrupt):
                assert proc.returncode == 130 and "interrupted" in proc.stderr, (fail_at, proc.stderr)
            else:
                assert "No space left" in assert_one_line_error(proc, 1)
            assert tree_bytes(data) == before, (fail_at, calls[-1])
            assert not leftovers(data), (fail_at, leftovers(data))
    fail_at = 0
    for name in ("training_set.backup.pt.gz", "training_set.0.bak.pt.gz"):   # named like a shard, not one: kept
        (data / name).write_bytes(b"a user's own copy")
    assert run_main("cifar_lenet.py", *args, "--seed", 1).returncode == 0
    for name in ("training_set.backup.pt.gz", "training_set.0.bak.pt.gz"):   # and not read as one either
        assert (data / name).read_bytes() == b"a user's own copy"
        assert data / name not in load_script("cifar_lenet.py").shard_paths(data, "training_set")
        (data / name).unlink()
    after = tree_bytes(data)
    assert sorted(after) == sorted(before) and not leftovers(data)
    assert all(after[name] == before[name] for name in ("model.pt", "checkpoint.pt", "history.csv", "runs.csv"))
    assert json.loads(after["meta.json"])["seed"] == 1
    assert after["training_set.0.pt.gz"] != before["training_set.0.pt.gz"]


INTERRUPT_AT_RENAME = """
import os, runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)   # a background job's child starts with SIGINT ignored
real_replace, calls = os.replace, []
at = {int(n) for n in os.environ["INTERRUPT_AT_RENAME"].split(",")}
def replace(src, dst):
    calls.append(dst)
    if len(calls) in at:
        signal.raise_signal(signal.SIGINT)   # Ctrl-C, delivered as to any process
    return real_replace(src, dst)
os.replace = replace
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_prepare_ctrl_c_mid_swap_end_to_end(cifar_source, prepared_with_model):
    """A real SIGINT (or two) to a real prepare while it swaps: the few renames finish first, then "interrupted"; the
    new data are whole and nothing else changed (an interrupt during the undo of the swap left no meta.json and no
    shards). test_prepare_interrupted_or_failing_at_every_rename has the undo, on errors raised at each rename."""
    data = prepared_with_model
    before = tree_bytes(data)
    for at in ("10", "10,11"):
        env = dict(os.environ, INTERRUPT_AT_RENAME=at, PYTHONWARNINGS="ignore")
        proc = subprocess.run([sys.executable, "-c", INTERRUPT_AT_RENAME, str(ROOT / "cifar_lenet.py"), "prepare",
                               "--image-dir", str(cifar_source), "--data-dir", str(data), "--workers", "2", "--seed",
                               "1"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert proc.returncode == 130 and "interrupted" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        after = tree_bytes(data)
        assert sorted(after) == sorted(before) and not leftovers(data), at
        assert all(after[name] == before[name] for name in ("model.pt", "checkpoint.pt", "history.csv", "runs.csv"))
        assert json.loads(after["meta.json"])["seed"] == 1 and after["training_set.0.pt.gz"] != before[
            "training_set.0.pt.gz"]


DIE_IN_WORKER = """
import os, runpy, sys
import PIL.Image
parent, real_open = os.getpid(), PIL.Image.open
def dying_open(*args, **kwargs):   # decoding happens in the workers: each ends as the out-of-memory killer ends one
    if os.getpid() != parent:
        os._exit(9)
    return real_open(*args, **kwargs)
PIL.Image.open = dying_open
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_worker_that_dies_is_one_line(cifar_source, prepared_with_model):
    """A prepare worker killed (by the system, for want of memory): one error line, status 1, old data intact (it
    was a BrokenProcessPool traceback)."""
    data = prepared_with_model
    before = tree_bytes(data)
    proc = subprocess.run([sys.executable, "-c", DIE_IN_WORKER, str(ROOT / "cifar_lenet.py"), "prepare",
                           "--image-dir", str(cifar_source), "--data-dir", str(data), "--workers", "2"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert "a worker process died" in assert_one_line_error(proc, 1)
    assert tree_bytes(data) == before and not leftovers(data)


@pytest.mark.parametrize("script", ["captcha.py", "rcnn_faces.py"])
def test_prepare_refuses_another_scripts_data(script, prepared_with_model):
    """prepare into a DATA_DIR holding another script's prepared data: one line before any work, every file as it
    was (it replaced cifar_lenet.py's shards and meta.json, and left its model beside the new data)."""
    before = tree_bytes(prepared_with_model)
    line = assert_one_line_error(run_main(script, "prepare", "--data-dir", prepared_with_model, "--image-dir",
                                          prepared_with_model, "--workers", 1), 1)
    assert "prepared by cifar_lenet.py" in line and "another --data-dir" in line
    assert tree_bytes(prepared_with_model) == before and not leftovers(prepared_with_model)


def test_prepare_keeps_a_meta_json_the_suite_did_not_write(cifar_source, tmp_path):
    """A meta.json of the user's own in DATA_DIR (notes, a list, not JSON) is refused, every byte kept (the swap
    deleted it); a damaged meta.json beside prepared shards is this script's, and a prepare replaces it."""
    data = tmp_path / "data"
    data.mkdir()
    for text in ('{"dataset": "my notes"}', "[1, 2]", "// notes"):
        (data / "meta.json").write_text(text)
        line = assert_one_line_error(run_main("cifar_lenet.py", "prepare", "--image-dir", cifar_source, "--data-dir",
                                              data, "--workers", 1), 1)
        assert "not a meta.json of this suite" in line and (data / "meta.json").read_text() == text
        assert sorted(p.name for p in data.iterdir()) == ["meta.json"]
    (data / "meta.json").unlink()
    assert run_main("cifar_lenet.py", "prepare", "--image-dir", cifar_source, "--data-dir", data,
                    "--workers", 1).returncode == 0
    (data / "meta.json").write_text("{damaged")
    assert run_main("cifar_lenet.py", "prepare", "--image-dir", cifar_source, "--data-dir", data,
                    "--workers", 1).returncode == 0
    assert json.loads((data / "meta.json").read_text())["kind"] == "cifar"


def test_a_shard_copied_in_by_hand_is_refused(prepared_with_model):
    """A shard beside the prepared ones (left from another prepare, or copied in) is not trained on silently: the
    split no longer holds the count meta.json has (the tutorial read stale batches into the next run)."""
    module = load_script("cifar_lenet.py")
    meta = module.read_meta(prepared_with_model)
    n = len(module.read_split(prepared_with_model, "training_set", meta)[0])
    shutil.copy(prepared_with_model / "training_set.0.pt.gz", prepared_with_model / "training_set.1.pt.gz")
    with pytest.raises(module.UserError, match=f"hold {2 * n} items, meta.json says {n}"):
        module.read_split(prepared_with_model, "training_set", meta)


def test_staging_folders_of_killed_runs_are_cleared(prepared_with_model):
    """A prepare killed with SIGKILL leaves its folder next to DATA_DIR: the next prepare removes it (it holds the
    lock, so no other prepare is using it), unless it holds the old data of a swap cut short."""
    data = prepared_with_model
    module = load_script("cifar_lenet.py")
    stale = data.parent / f"{data.name}.prepare-999999-0123abcd"
    (stale / "junk").mkdir(parents=True)
    kept = data.parent / f"{data.name}.prepare-999998-4567cdef"
    (kept / "previous").mkdir(parents=True)
    users = data.parent / f"{data.name}.prepare-notes"   # the user's own folder: no mark, never removed
    legacy = data.parent / f"{data.name}.prepare-999997-89abcdef"   # left by a version that made no mark
    (legacy / "junk").mkdir(parents=True)
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    for folder in (stale, kept):
        (folder / module.STAGING_MARK).touch()
    with module.staging_dir(data) as staged:
        assert staged.parent == data.parent and staged.name.startswith(f"{data.name}.prepare-{os.getpid()}-")
        assert not stale.exists() and not legacy.exists() and kept.exists()
        assert (users / "notes.txt").read_text() == "mine"
    assert not staged.exists()


@pytest.mark.parametrize("script", FACES)
def test_face_csv_bad_rows_and_crowds_are_skipped(script, tmp_path):
    """A row with extra fields and a photo with over MAX_FACES boxes are skipped and counted, the rest kept; a
    CSV over MAX_CSV_BYTES is one error; boxes drawn on a photo since resized (the CSV's width and height) are
    scaled to it."""
    mod = load_script(script)
    csv_path = tmp_path / "boxes.csv"
    crowd = "".join(f"crowd.jpg,{i},1,{i + 10},20\n" for i in range(mod.MAX_FACES + 1))
    csv_path.write_text("Name,xmin,ymin,xmax,ymax\na.jpg,1,2,30,40\nb.jpg,1,2,30,40,extra,fields\n" + crowd
                        + "c.jpg,5,5,25,25\nd.jpg,x,2,30,40\n" + "e" * 100 + ".jpg,5,5,5,25\nf.jpg,1,2\n"
                        + "a.jpg,1,2,30,40\ng.jpg,0,0,inf,inf\n")
    rows, skipped, sizes = mod.read_boxes_csv(csv_path)
    assert rows == {"a.jpg": [(1, 2, 30, 40)], "c.jpg": [(5, 5, 25, 25)]} and sizes == {}
    assert skipped["non-numeric box"][0] == 3   # d.jpg, f.jpg and the infinite g.jpg
    assert skipped["wrong number of fields"] == [1, ["b.jpg"]] and skipped["duplicate row"] == [1, ["a.jpg 1,2,30,40"]]
    # one file under three Names is one photo with every box once; a face cut by the edge keeps its part inside
    (tmp_path / "a.jpg").write_bytes(b"a photo")
    (tmp_path / "alias.jpg").symlink_to(tmp_path / "a.jpg")
    named = {"a.jpg": [(1, 2, 30, 40)], "./a.jpg": [(5, 5, 25, 25), (1, 2, 30, 40)], "alias.jpg": [(7, 7, 27, 27)]}
    jobs = mod.photo_jobs(tmp_path, named, {}, 0, skipped)
    assert list(jobs) == ["./a.jpg"] and jobs["./a.jpg"][1] == [(5, 5, 25, 25), (1, 2, 30, 40), (7, 7, 27, 27)]
    assert skipped["duplicate row"][0] == 2
    gt, outside, clipped, note = mod.boxes_inside([(-1, 5, 20, 30), (700, 5, 720, 30), (5, 5, 20, 30),
                                                   (600, 5, 700, 30), (10, 10, 10.5, 20)], 612, 408, (612, 408))
    assert gt.tolist() == [[0, 5, 20, 30], [5, 5, 20, 30], [10, 10, 10.5, 20]]   # most of a box must be in the photo
    assert outside == [[700, 5, 720, 30], [600, 5, 700, 30]] and clipped == [[-1, 5, 20, 30]] and note is None
    # the CSV's width and height: a photo halved since has its boxes halved; one turned keeps them, noted
    gt, _, _, note = mod.boxes_inside([(10, 20, 30, 40)], 306, 204, (612, 408))
    assert gt.tolist() == [[5, 10, 15, 20]] and note.startswith("photo resized since the CSV, boxes scaled (CSV width")
    gt, _, _, note = mod.boxes_inside([(10, 20, 30, 40)], 400, 400, (612, 408))
    assert gt.tolist() == [[10, 20, 30, 40]] and note.startswith("photo of another shape than the CSV")
    # a photo its EXIF orientation turns upright: the CSV may give the size as stored (width and height swapped)
    gt, _, _, note = mod.boxes_inside([(10, 20, 30, 40)], 408, 612, (612, 408))
    assert gt.tolist() == [[10, 20, 30, 40]] and note.startswith("photo turned a quarter since the CSV (EXIF?)")
    gt, _, _, note = mod.boxes_inside([(10, 20, 30, 40)], 204, 306, (612, 408))
    assert gt.tolist() == [[5, 10, 15, 20]] and note.startswith("photo turned a quarter and resized")
    assert note.endswith("(CSV width,height 612x408, photo 204x306)")
    # a CSV of the photo as stored (a tool that ignores EXIF): its boxes turned upright as load_image turns the photo
    stored = torch.zeros(40, 60, 3, dtype=torch.uint8)
    stored[5:15, 10:25] = 255   # a face at (10, 5, 25, 15) of the 60x40 photo as stored
    for orientation, drawn_on, box in [(5, (60, 40), (10, 5, 25, 15)), (6, (60, 40), (10, 5, 25, 15)),
                                       (7, (60, 40), (10, 5, 25, 15)), (8, (60, 40), (10, 5, 25, 15)),
                                       (6, (120, 80), (20, 10, 50, 30))]:   # the last one resized since the CSV
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(stored.numpy()).save(tmp_path / "turned.png", exif=exif)
        photo = mod.load_image(tmp_path / "turned.png")
        ys, xs = torch.nonzero(torch.from_numpy(np.array(photo))[..., 0] > 127, as_tuple=True)
        gt, _, _, note = mod.boxes_inside([box], photo.width, photo.height, drawn_on, photo.info["exif_orientation"])
        assert photo.size == (40, 60) and gt.tolist() == [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]
        assert note == (f"boxes of the photo as stored, turned upright with it (EXIF orientation {orientation})"
                        f"{', and scaled' if drawn_on[0] == 120 else ''} (CSV width,height {drawn_on[0]}x"
                        f"{drawn_on[1]}, photo 40x60)")
    # examples quote the row (row numbers shift where pandas drops a line), cut to 80 characters
    assert skipped["non-numeric box"][1] == ["d.jpg x,2,30,40", "f.jpg 1,2,,", "g.jpg 0,0,inf,inf"]   # f: short
    assert skipped["zero-size or inverted box"] == [1, ["e" * 77 + "..."]]
    assert skipped[f"photo with over {mod.MAX_FACES} boxes (MAX_FACES)"] == [mod.MAX_FACES + 1, ["crowd.jpg"]]
    # rows pandas dropped without a word: a quote never closed (it swallowed the rows after it), a huge field
    for text, message in [('Name,xmin,ymin,xmax,ymax\na.jpg,1,2,30,40\n"b.jpg,1,2,30,40\nc.jpg,1,2,30,40\n',
                            "opened in the row at line 3 is never closed"),
                          ("Name,xmin,ymin,xmax,ymax\n" + "n" * 140_000 + ".jpg,1,2,30,40\n", "line 2: field larger"),
                          ("Name;xmin;ymin;xmax;ymax\na.jpg;1;2;30;40\n", "separated by ';'"),
                          ("Name,xmin,ymin,xmax,ymax\na.jpg,0.1,0.2,0.3,0.4\n", "within 0..1")]:
        (tmp_path / "odd.csv").write_text(text)
        with pytest.raises(mod.UserError, match=message):
            mod.read_boxes_csv(tmp_path / "odd.csv")
    (tmp_path / "odd.csv").write_text("Name, xmin, ymin, xmax, ymax\na.jpg, 1, 2, 30, 40\n")   # spaces after commas
    assert mod.read_boxes_csv(tmp_path / "odd.csv")[0] == {"a.jpg": [(1, 2, 30, 40)]}
    with open(csv_path, "r+b") as f:
        f.truncate(mod.MAX_CSV_BYTES + 1)
    with pytest.raises(mod.UserError, match="MAX_CSV_BYTES"):
        mod.read_boxes_csv(csv_path)
    # a set too small to leave a photo for training and one for validation is refused by prepare
    assert [len(i) for i in mod.split_indices(1, 0)] == [0, 1, 0]
    assert [len(i) for i in mod.split_indices(3, 0)] == [2, 1, 0]
    assert [len(i) for i in mod.split_indices(2000, 0)] == [1600, 200, 200]
    if not FACES_DIR.exists():
        pytest.skip(f"{FACES_DIR} not found: the CSV's own photo sizes are not checked")
    header, first = (FACES_DIR / "bbox_train.csv").read_text().splitlines()[:2]   # its photo's own size
    name, *numbers = first.split(",")
    csv_path.write_text(f"{header}\n{name},{','.join(str(2 * int(v)) for v in numbers)}\n")   # drawn on twice the size
    assert mod.read_boxes_csv(csv_path)[2] == {name: (2 * int(numbers[0]), 2 * int(numbers[1]))}
    proc = run_main(script, "prepare", "--image-dir", FACES_DIR / "image_data", "--csv", csv_path, "--data-dir",
                    tmp_path / "data", "--workers", 1)
    assert "leave none for training or validation" in assert_one_line_error(proc, 1)
    assert f"1 x photo resized since the CSV, boxes scaled: {name} (CSV width,height" in proc.stdout
    assert not list((tmp_path / "data").glob("*.pt.gz"))


@pytest.mark.parametrize("script", FACES)
def test_face_prepare_says_why_and_eval_output_rules(script, tmp_path, monkeypatch, capsys):
    """A CSV without one usable row says why (it said only "no rows with a usable box"); a photo's note keeps its
    reason and sizes whole (it was cut at the "(" of "(EXIF?)"); at the interactive prompt, --output is refused only
    for the image that is --output itself (every later image was refused too)."""
    mod = load_script(script)
    (tmp_path / "img").mkdir()
    swapped = tmp_path / "swapped.csv"
    swapped.write_text("Name,xmin,ymin,xmax,ymax\na.jpg,30,40,1,2\nb.jpg,50,60,5,5\n")   # max and min swapped
    line = assert_one_line_error(run_main(script, "prepare", "--image-dir", tmp_path / "img", "--csv", swapped,
                                          "--data-dir", tmp_path / "d"), 1)
    assert "no rows with a usable box; 2 x zero-size or inverted box (e.g. a.jpg 30,40,1,2)" in line
    note = ("photo turned a quarter and resized since the CSV (EXIF?), boxes scaled (CSV width,height 612x408, "
            "photo 204x306)")
    answer = {"gt": torch.zeros(1, 4).numpy(), "outside": [], "clipped": [], "note": note}
    monkeypatch.setattr(mod, "parallel_map", lambda *args: [answer])
    mod.prepare_photos({"t.jpg": None}, 1, {"t.jpg": [(1, 2, 3, 4)]}, {})
    assert ("1 x photo turned a quarter and resized since the CSV (EXIF?), boxes scaled: t.jpg (CSV width,height "
            "612x408, photo 204x306)") in capsys.readouterr().out
    class Terminal:
        def isatty(self):
            return True
    monkeypatch.setattr(mod.sys, "stdin", Terminal())
    out = tmp_path / "out.png"
    outputs = mod.OutputFiles(argparse.Namespace(output=str(out), output_dir=None, images=None), [])
    with pytest.raises(mod.UserError, match="is an input image"):
        outputs.path_for(str(out))
    assert outputs.path_for(str(tmp_path / "a.jpg")) == out and outputs.path_for(str(tmp_path / "b.jpg")) == out


@pytest.mark.parametrize("script", FACES)
def test_two_evals_never_write_one_name(script, tmp_path):
    """Two evals writing one --output-dir at once: a name the other took after this one chose it stays the other's
    (it was overwritten), and this eval writes the next free name; atomic_path(replace=False) never replaces."""
    mod = load_script(script)
    photo, folder = str(tmp_path / "a.jpg"), tmp_path / "out"
    outputs = mod.OutputFiles(argparse.Namespace(output=mod.OUTPUT, output_dir=str(folder), images=[photo]), [photo])
    out = outputs.path_for(photo)
    assert out == folder / "a.png"
    out.write_bytes(b"the other eval's image")   # written by another process since the name was chosen
    written = outputs.write(photo, out, partial(mod.draw_boxes, Image.new("RGB", (64, 48)), [], size=(384, 256)))
    assert written == folder / "a-2.png" and out.read_bytes() == b"the other eval's image"
    assert Image.open(written).info.get("Comment") == mod.EVAL_MARK
    with pytest.raises(FileExistsError):
        with mod.atomic_path(out, replace=False) as tmp:
            tmp.write_bytes(b"new")
    assert out.read_bytes() == b"the other eval's image" and sorted(p.name for p in folder.iterdir()) == [
        "a-2.png", "a.png"]


WORKERS_LEFT = """
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("script", sys.argv[1])
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)
sys.platform = sys.argv[2]   # "darwin": start_worker as on macOS and Windows (no PR_SET_PDEATHSIG)
pool = script.ProcessPoolExecutor(2, initializer=script.start_worker, initargs=(os.getpid(),))
pool.submit(int).result()   # the pool forks its workers at the first job
print(*pool._processes, flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("platform", ["linux", "darwin"])
def test_pool_workers_end_with_a_killed_command(tmp_path, platform):
    """A command killed with SIGKILL (or by the out-of-memory killer) takes its pool's workers with it: they held
    DATA_DIR's lock (every later command: 'in use by' a pid gone) and the terminal's output open. Linux kills
    them; on macOS and Windows ("darwin") a thread in each waits for the command's process (they lived on)."""
    (tmp_path / "left.py").write_text(WORKERS_LEFT)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "left.py"), str(ROOT / "cifar_lenet.py"), platform],
                            stdout=subprocess.PIPE, text=True)
    workers = {int(pid) for pid in proc.stdout.readline().split()}
    assert len(workers) == 2 and proc.pid not in workers
    proc.kill()
    proc.wait(timeout=10)
    deadline = time.time() + 10
    while time.time() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in workers):
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)


KILLED_SWAP = """
import importlib.util, os, signal, sys, torch
spec = importlib.util.spec_from_file_location("script", sys.argv[1])
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)
data, kill_at, renames, placed = os.path.realpath(sys.argv[2]), int(sys.argv[3]), [], []
fail_at = int(sys.argv[4]) if len(sys.argv) > 4 else 0   # the new file placed that fails: swap_prepared's undo runs
def killing(move):
    def moving(src, dst):   # the swap's renames: into DATA_DIR, into previous/, previous/ -> replaced
        if os.path.dirname(os.path.abspath(dst)) == data or os.path.basename(os.path.dirname(dst)) == "previous" \
                or os.path.basename(dst) == "replaced":
            renames.append(dst)
            if len(renames) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if os.path.dirname(os.path.abspath(dst)) == data and os.path.basename(os.path.dirname(src)) != "previous":
                placed.append(dst)
                if len(placed) == fail_at:
                    raise OSError(5, "Input/output error")
        return move(src, dst)
    return moving
os.replace, os.rename = killing(os.replace), killing(os.rename)
script.save_prepared(data, {"training_set": (torch.ones(2500),), "testing_set": (torch.ones(5),)}, {"n": 1})
"""


def test_a_prepare_killed_while_swapping_loses_nothing(tmp_path, capsys):
    """A prepare killed (SIGKILL) at any point of the swap of its data into DATA_DIR: the next command that locks
    DATA_DIR puts the earlier data back (they were left in a hidden staging folder, DATA_DIR without meta.json or
    with shards of two prepares), or, when the swap was done, keeps the new data and removes the staging folder.
    It also removes the temporary files of writes killed with their process (those of a live one stay)."""
    mod = load_script("rcnn_faces.py")   # SHARD_SIZE 1000: the new data is 4 shards and meta.json, the old 1 and it
    (tmp_path / "script.py").write_text(KILLED_SWAP)
    runs = {}
    for kill_at in (2, 5, 8):   # the old meta.json moved aside (not the shard); 2 new shards placed; the swap done
        data = tmp_path / str(kill_at) / "data"
        data.mkdir(parents=True)
        mod.save_prepared(data, {"training_set": (torch.zeros(3),)}, {"n": 0})
        (data / "model.pt").write_bytes(b"a model")
        shard = (data / "training_set.0.pt.gz").read_bytes()
        for name in ("notes.tmp-1-2.txt", f"model.tmp-{os.getpid()}-0123abcd.pt"):   # a user's; a live process's
            (data / name).write_text("kept")
        runs[kill_at] = subprocess.Popen([sys.executable, str(tmp_path / "script.py"), str(ROOT / "rcnn_faces.py"),
                                          str(data), str(kill_at)])
    for kill_at, proc in runs.items():
        assert proc.wait(timeout=120) == -signal.SIGKILL, kill_at
        data = tmp_path / str(kill_at) / "data"
        assert len(list(data.parent.iterdir())) == 2   # DATA_DIR and the staging folder left by the kill
        (data / f"checkpoint.tmp-{proc.pid}-a1b2c3d4.pt").write_text("killed")   # a killed write's temporary file
        (data / "grid" / "lr=0.1").mkdir(parents=True)   # and one of a --grid run's
        (data / "grid" / "lr=0.1" / f"model.tmp-{proc.pid}-a1b2c3d4.pt").write_text("killed")
        nested = data / "data.prepare-1-abcdef12"   # a staging folder of another DATA_DIR named data, inside this one
        (nested / "previous").mkdir(parents=True)
        (nested / mod.STAGING_MARK).write_text("beside")   # beside data/data
        (nested / "previous" / "validating_set.0.pt.gz").write_text("another DATA_DIR's shard")
        with mod.lock_data_dir(data, False):
            pass
        message = capsys.readouterr().err
        assert sorted(p.name for p in data.glob("*.tmp-*")) == ["model.tmp-{}-0123abcd.pt".format(os.getpid()),
                                                                 "notes.tmp-1-2.txt"]
        assert not list((data / "grid").glob("*/*.tmp-*"))
        meta = json.loads((data / "meta.json").read_text())
        assert [p.name for p in data.parent.iterdir()] == ["data"] and (data / "model.pt").read_bytes() == b"a model"
        assert (nested / "previous" / "validating_set.0.pt.gz").exists()   # not ours: left as it is
        assert not (data / "validating_set.0.pt.gz").exists()
        shards = [p.name for p in mod.shard_paths(data, "training_set") + mod.shard_paths(data, "testing_set")]
        if kill_at == 8:
            assert meta["n"] == 1 and len(shards) == 4 and not message
        else:
            assert meta["n"] == 0 and "the earlier data put back" in message, kill_at
            assert shards == ["training_set.0.pt.gz"] and (data / shards[0]).read_bytes() == shard


def killed_prepare(tmp_path, data, kill_at, fail_at=0, old=3):
    """DATA_DIR `data` prepared (`old` items of training_set: 1 shard per SHARD_SIZE 1000, and meta.json "n" 0),
    then a prepare of 2500 + 5 items (4 shards, "n" 1) into it killed at its rename `kill_at` (KILLED_SWAP)."""
    mod = load_script("rcnn_faces.py")
    (tmp_path / "script.py").write_text(KILLED_SWAP)
    data.mkdir(parents=True, exist_ok=True)
    mod.save_prepared(data, {"training_set": (torch.zeros(old),)}, {"n": 0})
    shards = {p.name: p.read_bytes() for p in mod.shard_paths(data, "training_set")}
    proc = subprocess.run([sys.executable, str(tmp_path / "script.py"), str(ROOT / "rcnn_faces.py"), str(data),
                           str(kill_at), str(fail_at)])
    assert proc.returncode == -signal.SIGKILL
    return mod, shards


def prepared_files(mod, data):
    meta = json.loads((data / "meta.json").read_text())
    return meta["n"], {p.name: p.read_bytes() for p in mod.shard_paths(data, "training_set")
                       + mod.shard_paths(data, "testing_set")}


def test_a_prepare_killed_before_its_swap_leaves_nothing(tmp_path):
    """A prepare killed while it built its new data (before the swap) left its staging folder, as large as the data,
    until a later prepare: the next command that locks DATA_DIR removes it; a folder of an earlier version (no mark)
    stays."""
    mod, data = load_script("rcnn_faces.py"), tmp_path / "data"
    data.mkdir()
    staged, older = tmp_path / "data.prepare-999999-abcdef12", tmp_path / "data.prepare-999998-abcdef13"
    for folder in (staged, older):
        folder.mkdir()
        (folder / "training_set.0.pt.gz").write_bytes(b"half written")
    (staged / mod.STAGING_MARK).write_text("beside")
    with mod.lock_data_dir(data, False):
        pass
    assert not staged.exists() and (older / "training_set.0.pt.gz").exists()


def test_a_train_killed_between_its_model_and_checkpoint(tmp_path, capsys):
    """SIGKILL between a new model.pt and the checkpoint that names it: the next command that locks DATA_DIR puts
    the best model of the checkpoint back from save_epoch's held copy (it was removed as a stale temporary file, and
    model.pt stayed one epoch ahead of the checkpoint); killed after the checkpoint, the copy goes. Its pid may name
    another process by then (reused; a container's): the lock says no train runs."""
    mod = load_script("cifar_lenet.py")
    model = lambda epoch: {**{key: [] for key in mod.MODEL_KEYS}, "script": mod.SCRIPT, "model": {}, "epoch": epoch}
    for epoch, bad_epochs, best in ((1, 0, 1), (2, 0, 2), (3, 2, 1)):
        data = tmp_path / "grid" / f"{epoch}-{bad_epochs}"   # a folder named grid, of no --grid run: recovered
        data.mkdir(parents=True)
        torch.save({**{key: {} for key in mod.CHECKPOINT_KEYS}, "script": mod.SCRIPT, "epoch": epoch,
                    "bad_epochs": bad_epochs}, data / "checkpoint.pt")
        torch.save(model(2), data / "model.pt")   # written, then the kill (or the checkpoint of epoch 2, then it)
        torch.save(model(1), data / f"model.held-{os.getpid()}-abcdef12.pt")   # a pid alive now
        (data / "model.held-out-set.pt").write_text("the user's")   # not a name held_copy makes: never touched
        (data / "model.held-7-0badc0de.pt").write_bytes(b"cut short")   # a copy killed half-written
        (data / "model.onnx").write_text("exported from model.pt")
        with mod.lock_data_dir(data, False):
            pass
        assert torch.load(data / "model.pt", weights_only=True)["epoch"] == (1 if best == 1 else 2)
        assert (data / "model.onnx").exists() == (best == 2)   # an export of the model put back aside goes with it
        assert sorted(p.name for p in data.glob("model.held-*")) == (["model.held-7-0badc0de.pt"] if best == 1 else
                                                                     []) + ["model.held-out-set.pt"]
        assert ("checkpoint's best model again (epoch 1)" in capsys.readouterr().err) == (best == 1)
    run = tmp_path / "data" / "grid" / "lr=0.1"   # a --grid run's folder, locked alone (export beside its model):
    run.mkdir(parents=True)                        # its train holds DATA_DIR and may be between the two files
    (tmp_path / "data" / "meta.json").write_text("{}")   # DATA_DIR's prepared data
    torch.save({**{key: {} for key in mod.CHECKPOINT_KEYS}, "script": mod.SCRIPT, "epoch": 1, "bad_epochs": 0},
               run / "checkpoint.pt")
    torch.save(model(2), run / "model.pt")
    torch.save(model(1), run / "model.held-1-abcdef12.pt")
    with mod.lock_data_dir(run, False):
        pass
    assert torch.load(run / "model.pt", weights_only=True)["epoch"] == 2 and (run / "model.held-1-abcdef12.pt").exists()
    with mod.lock_data_dir(tmp_path / "data", False):   # DATA_DIR's lock: no train runs in its grid
        pass
    assert torch.load(run / "model.pt", weights_only=True)["epoch"] == 1 and not list(run.glob("model.held-*"))


def test_a_train_killed_before_its_history_was_written(tmp_path):
    """SIGKILL between checkpoint.pt and history.csv: the next command that locks DATA_DIR writes the history again
    from the checkpoint (it stayed an epoch behind, or missing after a first epoch, until a train --resume)."""
    mod, data = load_script("cifar_lenet.py"), tmp_path / "data"
    data.mkdir()
    rows = [{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.6}]
    mod.save_history(data, rows[:1], ["val_acc"])
    torch.save({**{key: {} for key in mod.CHECKPOINT_KEYS}, "script": mod.SCRIPT, "epoch": 2, "bad_epochs": 0,
                "history": rows, "plot_keys": ["val_acc"]}, data / "checkpoint.pt")
    os.utime(data / "history.csv", ns=(1, 1))   # written before the checkpoint
    with mod.lock_data_dir(data, False):
        pass
    assert (data / "history.csv").read_text().splitlines() == ["epoch,val_acc", "1,0.5", "2,0.6"]
    before = (data / "history.png").stat().st_mtime_ns
    with mod.lock_data_dir(data, False):   # up to date now: not written again
        pass
    assert (data / "history.png").stat().st_mtime_ns == before


def test_a_fresh_train_killed_as_it_moved_the_run_before_aside(tmp_path, monkeypatch, capsys):
    """SIGKILL while keep_previous moved the run before into previous/TIME/ (a file at a time; its runs.csv rows
    after): the next command that locks DATA_DIR puts the files back beside the others and the rows with them (the run
    was split, model.pt aside and the checkpoint in place: resume and eval failed)."""
    mod = load_script("cifar_lenet.py")
    for cut in (2, None):   # killed after 2 files moved; after every file and the rows, before the mark went
        data = tmp_path / str(cut)
        data.mkdir()
        files = {name: f"the run before's {name}" for name in ("model.pt", "checkpoint.pt", "history.csv")}
        for name, text in files.items():
            (data / name).write_text(text)
        mod.write_runs(data / "runs.csv", [{"run_dir": os.path.abspath(data), "test": "0.5"}])
        if cut:
            moved, replace = [], os.replace
            def cutting(src, dst):
                if len(moved) == cut:
                    raise KeyboardInterrupt   # as a kill: no undo runs
                moved.append(dst)
                return replace(src, dst)
            with monkeypatch.context() as patch:
                patch.setattr(os, "replace", cutting)
                with pytest.raises(KeyboardInterrupt):
                    mod.keep_previous(data, data)
        else:
            keep = mod.keep_previous(data, data)
            (keep / mod.KEEP_MARK).touch()
            assert mod.read_runs(data / "runs.csv")[0]["run_dir"] == os.path.abspath(keep)
        with mod.lock_data_dir(data, False):
            pass
        assert {name: (data / name).read_text() for name in files} == files
        assert mod.read_runs(data / "runs.csv")[0]["run_dir"] == os.path.abspath(data)
        assert not any((data / "previous").iterdir()) and "is back in place" in capsys.readouterr().err


def test_keep_previous_cannot_write_its_mark(tmp_path, monkeypatch):
    """No room for keep_previous's mark (no inodes left, a quota): one line, the run before where it was (an
    UnboundLocalError traceback)."""
    mod, data = load_script("cifar_lenet.py"), tmp_path / "data"
    data.mkdir()
    (data / "model.pt").write_text("the run before's")
    monkeypatch.setattr(Path, "touch", lambda self, *a, **k: (_ for _ in ()).throw(OSError(errno.EDQUOT, "Quota")))
    with pytest.raises(mod.UserError, match=r"^cannot write .*\.moving \(Quota\)"):
        mod.keep_previous(data, data)
    assert (data / "model.pt").read_text() == "the run before's" and not any((data / "previous").iterdir())


def test_a_signal_just_as_the_command_ends(monkeypatch, capsys):
    """SIGTERM or Ctrl-C after run_command returned, before main() restored the handlers: one line and 143 or 130
    (it was a traceback and status 1)."""
    mod = load_script("cifar_lenet.py")
    for error, status, word in ((mod.Terminated(), 143, "terminated"), (KeyboardInterrupt(), 130, "interrupted")):
        monkeypatch.setattr(mod, "run_command", lambda args, e=error: (_ for _ in ()).throw(e))
        assert mod.main(["eval", "--data-dir", "nowhere"]) == status
        assert capsys.readouterr().err == f"\n{word}\n"


def test_a_prepare_killed_while_undoing_or_recovering_loses_nothing(tmp_path, monkeypatch):
    """A kill during swap_prepared's undo (a placement failed: the earlier shards it had put back were removed as
    if they were new ones), and a recovery cut short (a Ctrl-C) while it removed the staging folder of a swap that
    was done (the earlier shards left in it were put back beside the new data next time)."""
    for kill_at in (12, 15):   # 5 earlier shards and meta.json aside, 3rd placement fails; 3 or 5 shards back
        data = tmp_path / f"undo{kill_at}" / "data"
        mod, shards = killed_prepare(tmp_path, data, kill_at, fail_at=3, old=4500)
        with mod.lock_data_dir(data, False):
            pass
        assert prepared_files(mod, data) == (0, shards) and os.listdir(data.parent) == ["data"]
    data = tmp_path / "done" / "data"
    mod, shards = killed_prepare(tmp_path, data, 12, old=4500)   # killed as it ended: the new data all placed

    def cut_short(path, ignore_errors=False):   # placing gone first (the order of the folder's names)
        Path(path, "placing").unlink()
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(shutil, "rmtree", cut_short)
        with pytest.raises(KeyboardInterrupt):
            with mod.lock_data_dir(data, False):
                pass
    with mod.lock_data_dir(data, False):
        pass
    n, new = prepared_files(mod, data)
    assert n == 1 and sorted(new) == ["testing_set.0.pt.gz", "training_set.0.pt.gz", "training_set.1.pt.gz",
                                      "training_set.2.pt.gz"]
    with mod.staging_dir(data):   # the folder left: the next prepare removes it
        pass
    assert os.listdir(data.parent) == ["data"]


def test_eval_goes_on_past_a_folder_it_cannot_read(tmp_path, monkeypatch):
    """A folder inside an input folder that cannot be read (permissions, /proc): the images that can be read, then
    the folder, answered as an error (the run stopped there, nothing said of the inputs after it); others go on."""
    mod, album = load_script("cifar_lenet.py"), tmp_path / "album"
    (album / "private").mkdir(parents=True)
    for path in (album / "a.png", tmp_path / "b.png"):
        Image.new("RGB", (32, 32)).save(path)
    walk = os.walk

    def walking(top, onerror=None, **options):   # as os.walk meets a folder without read permission
        for root, folders, files in walk(top, onerror=onerror, **options):
            if "private" in folders:
                folders.remove("private")
                onerror(PermissionError(errno.EACCES, "Permission denied", str(Path(root) / "private")))
            yield root, folders, files
    monkeypatch.setattr(os, "walk", walking)
    inputs = [str(tmp_path / "b.png"), str(album), str(tmp_path / "b.png")]
    assert list(mod.iter_eval_inputs(inputs)) == [inputs[0], str(album / "a.png"), str(album / "private"), inputs[0]]
    assert list(mod.iter_eval_inputs([str(album)])) == [str(album / "a.png"), str(album / "private")]
    with pytest.raises(mod.UserError, match="cannot read this folder"):   # prepare: said, never passed over
        mod.list_images(album)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(mod.UserError, match="^a folder that cannot be read$"):
        mod.load_image(str(album / "private"))


def test_lock_file_on_a_full_disk(tmp_path, monkeypatch):
    """A full disk as DATA_DIR's lock file is written: one line naming the folder and what to do (it was the bare
    "No space left on device"), and neither the lock file nor a folder made for the command is left."""
    mod, write = load_script("captcha.py"), os.write
    monkeypatch.setattr(os, "write", lambda fd, data: write(fd, data) if not data.startswith(b"pid ")
                        else (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    for data, create in ((tmp_path / "new" / "data", True), (tmp_path, False)):
        with pytest.raises(mod.UserError, match=r"--data-dir .*: cannot write its lock file \.lock \(No space left "
                                                r"on device\); free some space there or pass another --data-dir"):
            with mod.lock_data_dir(data, create):
                pass
        assert not (tmp_path / "new" / "data").exists() and not (tmp_path / ".lock").exists()


def test_a_recovery_keeps_what_is_not_its_own(tmp_path, capsys):
    """The recovery of a killed prepare leaves other DATA_DIRs' staging folders (data/data.prepare-... of
    data/data, data.prepare-x.prepare-... of data.prepare-x: it removed data's shards and put theirs in), keeps a
    file that is not one the prepare placed, and stops every command while the earlier data cannot go back (a
    later prepare's data would have them put back beside it, or removed)."""
    mod, data = load_script("rcnn_faces.py"), tmp_path / "data"
    data.mkdir()
    mod.save_prepared(data, {"training_set": (torch.ones(1500),), "testing_set": (torch.ones(2),)}, {"n": 2})
    before = prepared_files(mod, data)
    for other in (data / "data", tmp_path / "data.prepare-x"):
        mod, shards = killed_prepare(tmp_path, other, 5)   # 2 new shards placed
        with mod.lock_data_dir(data, False):
            pass
        assert prepared_files(mod, data) == before and not capsys.readouterr().err
        with mod.lock_data_dir(other, False):
            pass
        assert prepared_files(mod, other) == (0, shards) and "the earlier data put back" in capsys.readouterr().err
    data = tmp_path / "users" / "data"
    mod, shards = killed_prepare(tmp_path, data, 5)
    (data / "testing_set.0.pt.gz").unlink()
    (data / "testing_set.0.pt.gz").write_bytes(b"the user's")   # another inode: not one it placed
    (data / "meta.json").write_text("{}")   # where the earlier meta.json goes back
    for _ in range(2):
        with pytest.raises(mod.UserError, match=r"cannot go back \(.*meta.json is there\); put them back"):
            with mod.lock_data_dir(data, False):
                pass
    (data / "meta.json").unlink()
    with mod.lock_data_dir(data, False):
        pass
    assert prepared_files(mod, data) == (0, {**shards, "testing_set.0.pt.gz": b"the user's"})


def test_prepared_id_leaves_out_speeds(tmp_path):
    """The same photos prepared again keep their id (train --resume goes on) though the face scripts' meta.json
    also holds the speed of that prepare, and the folder may be spelled otherwise; other data gets another id."""
    module = load_script("rcnn_faces.py")
    ids = []
    (tmp_path / "data").mkdir()
    for speed, value, folder in ((19.5, 0, "/a/photos"), (7.25, 0, "./photos"), (19.5, 1, "/a/photos")):
        module.save_prepared(tmp_path / "data", {"training_set": (torch.full((3,), value),)},
                             {"kind": "rcnn_faces", "photos_per_s": speed, "image_dir": folder})
        ids.append(json.loads((tmp_path / "data" / "meta.json").read_text())["prepared"])
    assert ids[0] == ids[1] != ids[2]


def test_an_ignored_signal_stays_ignored_while_held():
    """A background job of a shell script runs with SIGINT ignored: a Ctrl-C meant for the script must not end it
    when it lands while signals are held (a pool's start, an export, a checkpoint)."""
    module = load_script("cifar_lenet.py")
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with module.signals_held():
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)

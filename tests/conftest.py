"""Shared test helpers: run a suite script end to end in a subprocess."""
import contextlib
import csv
import functools
import importlib.util
import io
import json
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

# pytest.ini runs two workers (pytest-xdist) on the two cores: one thread each, here and in every command they start,
# since two processes of two threads each on two cores run slower than one each
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
CIFAR_DIR = SHARED / "cifar10"
FACES_DIR = SHARED / "faces"


def run(script, *args, stdin=None, timeout=600, cwd=None):
    """Run `python SCRIPT args...` from the repository root; returns the CompletedProcess (text). The command runs in
    its own process, forked from a server that has imported torch already (tests/zygote.py): the same command, a
    few seconds less each time. SUITE_TESTS_NO_FORK=1 starts a fresh interpreter for every command instead."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    argv = [str(ROOT / script), *map(str, args)]
    if os.environ.get("SUITE_TESTS_NO_FORK") != "1":
        return ZYGOTE.run(argv, stdin, timeout, str(cwd or ROOT), env)
    return subprocess.run([sys.executable, *argv], input=stdin, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or ROOT, env=env)


class Zygote:
    """Client of tests/zygote.py: started on first use (again if it died or the environment changed since)."""

    def __init__(self):
        self.proc = self.sock = self.env = None

    def start(self, env):
        self.close()
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "zygote.py"), str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()], cwd=ROOT, env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self.env = env

    def close(self):
        if self.proc is not None:
            self.sock.close()  # the server reads an empty message and returns
            self.proc.wait(timeout=30)
            self.proc = None

    def reply(self, timeout):
        if not select.select([self.sock], [], [], timeout)[0]:
            return None
        message = self.sock.recv(1 << 16)
        if not message:
            raise RuntimeError("the fork server (tests/zygote.py) died")
        return json.loads(message)

    def run(self, argv, stdin, timeout, cwd, env):
        imported_with = {k: v for k, v in env.items() if k != "PYTEST_CURRENT_TEST"}  # pytest sets it per test
        if self.proc is None or self.proc.poll() is not None or imported_with != self.env:
            self.start(imported_with)
        with tempfile.TemporaryFile("w+b") as inp, tempfile.TemporaryFile("w+b") as out, \
                tempfile.TemporaryFile("w+b") as err:
            if stdin is not None:
                inp.write(stdin.encode() if isinstance(stdin, str) else stdin)
                inp.seek(0)
            fds = [inp.fileno() if stdin is not None else 0, out.fileno(), err.fileno()]
            socket.send_fds(self.sock, [json.dumps({"argv": argv, "cwd": cwd, "env": env}).encode()], fds)
            pid = self.reply(300)["pid"]   # a fork server just started may still be importing
            done = self.reply(timeout)
            if done is None:
                os.kill(pid, signal.SIGKILL)
                self.reply(30)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        if done is None:
            raise subprocess.TimeoutExpired(argv, timeout, stdout, stderr)
        return subprocess.CompletedProcess([sys.executable, *argv], done["status"], stdout, stderr)


ZYGOTE = Zygote()


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


# ---- hostile input (test_hostile.py and the hostile cases of each script's tests) ----
@functools.lru_cache(maxsize=None)
def load_script(script):
    """A suite script imported as a module (once per session), to call its functions or its main() in-process."""
    spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(script, *args, stdin=""):
    """`script.main(args)` in this process, for commands that must stop before any real work (no interpreter start,
    so dozens of cases cost little): a CompletedProcess with the exit status, stdout and stderr, as `run` gives."""
    out, err, real_stdin = io.StringIO(), io.StringIO(), sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = load_script(script).main([str(a) for a in args])
            except SystemExit as e:  # argparse
                status = e.code
    finally:
        sys.stdin = real_stdin
    return subprocess.CompletedProcess(args, status, out.getvalue(), err.getvalue())


def run_warnings_shown(script, *args, timeout=600):
    """`run` with Python's warnings left on, to check that stderr holds nothing but what the script prints."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=dict(env, PYTHONUNBUFFERED="1"))


def png_declaring(path, width, height):
    """A PNG of a few dozen bytes whose header declares width x height pixels: a decompression bomb."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)   # 8-bit RGB
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                           + chunk(b"IEND", b""))
    return Path(path)


def hostile_images(folder):
    """Files that are no usable image, each of another kind: [(path, words expected in its error)]."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(jpeg, "JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[:200])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image\n")
    os.mkfifo(folder / "fifo.png")
    (folder / "loop.png").symlink_to("loop.png")
    return [(png_declaring(folder / "bomb.png", 15000, 15000), "pixels"),    # PIL's DecompressionBombError
            (png_declaring(folder / "warns.png", 10000, 10000), "pixels"),   # PIL's DecompressionBombWarning
            (png_declaring(folder / "big.png", 9000, 8000), "pixels"),       # over the script's MAX_PIXELS only
            (folder / "truncated.jpg", "cannot read"), (folder / "empty.png", "not an image"),
            (folder / "text.png", "not an image"), (folder / "fifo.png", "not a file"),
            (folder / "loop.png", "not a file"), (folder / "missing.png", "no such file")]


def odd_images(folder):
    """Images of unusual modes and shapes that every script must read: [path]."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("I;16", (40, 30), 3000).save(folder / "gray16.png")
    Image.new("CMYK", (40, 30), (0, 100, 0, 0)).save(folder / "cmyk.jpg")
    Image.new("LA", (40, 30), (90, 120)).save(folder / "gray_alpha.png")
    Image.new("RGB", (3, 200), (10, 200, 10)).save(folder / "thin.png")
    first, second = Image.new("P", (40, 30), 1), Image.new("P", (50, 50), 2)
    first.save(folder / "animated.gif", save_all=True, append_images=[second])
    return sorted(folder.iterdir())


def tree_bytes(folder):
    """{relative path: bytes} of every file below `folder` (to check that nothing changed)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- ship and serve: export, eval of the .onnx, the HTTP service ----
def same_answers(a, b, tol, path="result"):
    """eval's JSON answers of the torch and the ONNX model agree: same strings, integers (box pixels) within 1,
    probabilities within tol; the paths ("image", "output") are not compared."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (path, a, b)
        for key in a.keys() - {"image", "output"}:
            same_answers(a[key], b[key], tol, f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), (path, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            same_answers(x, y, tol, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= tol + 1e-9, (path, a, b)   # 0.3002 - 0.3001 is a hair over 1e-4 in floating point
    elif isinstance(a, int):
        assert abs(a - b) <= 1, (path, a, b)
    else:
        assert a == b, (path, a, b)


def check_calibration_before_the_shift(script, model, photo, tmp_path, shift):
    """A face model calibrated as before 2026-12-06, (a, b) without the count shift c, is read as one with
    c = `shift`: its boxes at the default threshold 0.5 are those its own default kept (it lost them all once). A
    model without a calibration (too few boxes to fit one) keeps the network's softmax, unshifted."""
    state = {k: v for k, v in torch.load(model, weights_only=True).items() if k != "calibration"}
    answers = []
    for name, calibration in [("old", [1.5, -0.5]), ("shifted", [1.5, -0.5, shift]), ("none", None),
                              ("softmax", [1.0, 0.0, 0.0])]:
        torch.save({**state, **({"calibration": calibration} if calibration else {})}, tmp_path / f"{name}.pt")
        proc = run(script, "eval", photo, "--model", tmp_path / f"{name}.pt", "--json", "--threshold", 0.05,
                   "--output-dir", tmp_path / name, "--device", "cpu")
        assert proc.returncode == 0, proc.stderr
        answers.append(json.loads(proc.stdout)["boxes"])
    assert answers[0] and answers[0] == answers[1] and answers[2] == answers[3] != answers[0]


def check_onnx(script, model, images, tmp_path, *eval_args):
    """`export` the model, then `eval --json` with the .pt and the .onnx on the same images: the same answers
    (probabilities within 1e-4 of the .pt's in fp32; where the .pt runs in bf16 on this CPU, its first answer within
    3e-2 of fp32's too). Returns the .onnx path and the answers."""
    onnx = tmp_path / "model.onnx"
    proc = run_main(script, "export", "--model", model, "--output", onnx)   # in this process: the exporter's
    assert proc.returncode == 0, proc.stderr                                 # first use costs seconds, once
    assert f"exported {onnx}: " in proc.stdout and "opset 18" in proc.stdout, proc.stdout
    assert onnx.stat().st_size > 10_000
    line = assert_one_line_error(run_main(script, "export", "--model", model, "--output", onnx), 2)
    assert "exists" in line and "--force" in line
    before = Path(model).read_bytes()
    line = assert_one_line_error(run_main(script, "export", "--model", model, "--output", model, "--force"), 2)
    assert "NAME.onnx" in line and Path(model).read_bytes() == before   # the model stays the model
    nowhere = tmp_path / "no-such-folder" / "model.onnx"
    line = assert_one_line_error(run_main(script, "export", "--model", model, "--output", nowhere), 2)
    assert "no folder" in line and not nowhere.parent.exists()
    folder = tmp_path / "folder.onnx"   # said before the export's work, not as its write failed after it
    folder.mkdir()
    line = assert_one_line_error(run_main(script, "export", "--model", model, "--output", folder, "--force"), 2)
    assert "a folder; name the file" in line and not any(folder.iterdir())
    if os.geteuid() != 0:   # root writes in a folder without write permission
        folder.chmod(0o555)
        line = assert_one_line_error(run_main(script, "export", "--model", model, "--output", folder / "m.onnx"), 2)
        assert "cannot write in" in line
        folder.chmod(0o755)
    answers = []
    out = (lambda name: ["--output-dir", tmp_path / name]) if "faces" in script else (lambda name: [])
    for i, m in enumerate((model, onnx)):
        ev = run(script, "eval", *images, "--model", m, "--json", "--device", "cpu", *out(f"annotated-{i}"), *eval_args)
        assert ev.returncode == 0, ev.stderr
        answers.append([json.loads(line) for line in ev.stdout.splitlines()])
    assert len(answers[0]) == len(images)
    module = load_script(script)
    if module.amp_dtype(torch.device("cpu")) is not None:  # this CPU runs the .pt in bf16: compare its fp32 answers
        saved, module.CPU_BF16 = module.CPU_BF16, False
        try:
            ev = run_main(script, "eval", *images, "--model", model, "--json", "--device", "cpu", *out("annotated-fp32"),
                          *eval_args)
        finally:
            module.CPU_BF16 = saved
        assert ev.returncode == 0, ev.stderr
        fp32 = [json.loads(line) for line in ev.stdout.splitlines()]
        for a, b in zip(answers[0], fp32):   # the bf16 answers: close to fp32's (a near tie may swap the order)
            if "top" in a:
                fp32_probability = {t["label"]: t["probability"] for t in b["top"]}
                assert abs(fp32_probability[a["top"][0]["label"]] - a["top"][0]["probability"]) <= 3e-2, (a, b)
            elif "boxes" in a:
                assert abs(max([x["score"] for x in a["boxes"]] or [0]) - max([x["score"] for x in b["boxes"]] or [0])
                           ) <= 3e-2, (a, b)
            elif a["code"] == b["code"]:
                assert abs(a["confidence"] - b["confidence"]) <= 3e-2, (a, b)
        answers[0] = fp32
    same_answers(answers[0], answers[1], 1e-4)
    return onnx, answers[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, data=None, headers=None, timeout=60):
    """(status, JSON or text) of a GET, or of a POST when data is given; 4xx/5xx answers are returned too."""
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, body, kind = response.status, response.read(), response.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        status, body, kind = e.code, e.read(), e.headers.get("content-type", "")
    return status, json.loads(body) if kind.startswith("application/json") else body.decode()


def multipart(field, filename, data):
    """A multipart/form-data body with one file field: (body, headers)."""
    boundary = "suite-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@contextlib.contextmanager
def serving(script, *args, open_files=None):
    """`python SCRIPT serve --port FREE args...` in a subprocess, once /health answers: yields (base URL, process).
    open_files: the soft limit of open files it starts with. On leaving, Ctrl-C (SIGINT), as a user stops it; the
    process's exit is the caller's to check."""
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, resource.getrlimit(
        resource.RLIMIT_NOFILE)[1]))) if open_files else None
    proc = subprocess.Popen([sys.executable, str(ROOT / script), "serve", "--port", str(port), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            preexec_fn=limit)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            assert proc.poll() is None, proc.communicate()
            with contextlib.suppress(OSError):
                if http(url + "/health", timeout=5)[0] == 200:
                    break
            time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()

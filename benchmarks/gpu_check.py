"""One unattended check of every GPU claim of the suite, within a time budget; always writes its JSON.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--minutes 8] [--device cuda|cpu] [--work DIR] [--tiny]

Run it from the repository root with ../shared/datasets beside the repository (cifar10/train/NNNNN_label.jpg +
cifar10/labels.txt, faces/image_data/*.jpg + faces/bbox_train.csv; --datasets DIR for another place). It needs no
network and nothing beyond requirements.txt. It prepares its own data in --work (default /tmp/gpu_check, outside
the repository; reused by a rerun with the same sizes and scripts), with --workers = CPU cores: CIFAR-10 split
45,000/5,000 (--test-dir holds copies of 1,000 training images, as the official test set is not in the datasets,
so the test score printed by train is not held out), 20,000 generated captchas, the first 300 face photos (read in
place, through a CSV of their rows). Then, in order:

  1. cifar_resnet.py train --epochs 5 --amp (default recipe): validation top-1, seconds and images/s per epoch,
     peak GPU memory; target >= 90% after 5 epochs
  2. the same network, 2 epochs each with --no-amp, --amp, --amp --compile: images/s (the second epoch is the
     steady one; compile time ~ first minus second epoch of the compiled run)
  3. torchrun --standalone --nproc_per_node=N (N = visible GPUs, --nproc) cifar_resnet.py train --epochs 1: it runs,
     the same steps per epoch as one process, a model.pt without DDP's prefix that plain eval loads. With N = 1
     the scripts start no process group (WORLD_SIZE=1), so nccl/DDP/--sync-bn need 2+ GPUs; the JSON says so
  4. captcha.py, default recipe, as many epochs as fit in 2 minutes (from a 1-epoch probe): images/s and
     validation exact-match per epoch
  5. fast_rcnn_faces.py, 1 epoch: validation AP@0.5, photos/s, eval seconds per photo on the device (time between
     the first and the last --json line, so start-up is excluded)
  6. each model of steps 1, 4, 5: eval --json on the device, and the same model.pt on the CPU with CUDA hidden
     (CUDA_VISIBLE_DEVICES=""), as on a CPU-only machine; predictions compared
  7. if time is left: cifar_lenet.py and rcnn_faces.py (100 photos), 1 epoch each, eval on the device and the CPU

Each step may use the time left minus the minimum the later steps need (PLAN), up to a cap, so time a step leaves
unused goes to the later ones; every command runs with a timeout derived from that and is stopped with SIGINT (the
scripts' Ctrl-C: whole files left behind), then SIGKILL, when it runs over. A step that fails or times out is recorded as
such, with the tail of its stderr, and the run goes on. The captcha and face preparation runs on the CPU in the
background during steps 1-3. The JSON (--out) is rewritten atomically after every command, so it holds everything
up to the last finished command even if this process is killed; logs of every command go to <out name>_logs/
beside it. Peak GPU memory is nvidia-smi's memory.used of the whole GPU sampled every 0.25 s while a command runs
(CUDA context and PyTorch's cached blocks included, not only live tensors); without nvidia-smi it is not measured.
A table of the figures is printed at the end. Exit status 0 when every step that ran passed, else 1.

--device cpu (or --tiny) is the dry run of the test suite: tiny sizes (20 CIFAR images, 100 captchas, 10 photos),
1 epoch, steps 1, 4, 5, 6 in two chains of commands side by side (2, 3 and 7 only repeat those commands with other
flags or scripts; the tests run their code on simulated output); it checks that the steps still work, not speed.
"""
import argparse
import concurrent.futures
import csv
import datetime
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# ../shared/datasets beside the repository (or shared/datasets inside it, as some copies of the tree have it)
DATASETS = next((d for d in (ROOT.parent / "shared" / "datasets", ROOT / "shared" / "datasets") if d.is_dir()),
                ROOT.parent / "shared" / "datasets")
PY = sys.executable
TORCHRUN = [PY, "-m", "torch.distributed.run"]
SCRIPTS = ("captcha.py", "cifar_lenet.py", "cifar_resnet.py", "rcnn_faces.py", "fast_rcnn_faces.py",
           "generate-captcha/generate.py")
SIZES = {   # "cifar": training images used (0: all 50,000); "cifar_test": images of the --test-dir folder
    "full": {"cifar": 0, "cifar_test": 1000, "captchas": 20000, "faces": 300, "rcnn_photos": 100, "eval_images": 8,
             "face_eval_photos": 20, "step1_epochs": 5, "step2_epochs": 2, "captcha_train_s": 120},
    "tiny": {"cifar": 20, "cifar_test": 2, "captchas": 100, "faces": 10, "rcnn_photos": 0, "eval_images": 2,
             "face_eval_photos": 2, "step1_epochs": 1, "step2_epochs": 1, "captcha_train_s": 0},
}
STEPS = {1: "cifar_resnet: 5 epochs, default recipe, AMP", 2: "cifar_resnet: --no-amp / --amp / --amp --compile",
         3: "cifar_resnet under torchrun (one process per GPU)", 4: "captcha: default recipe, epochs that fit in 2 minutes",
         5: "fast_rcnn_faces: 1 epoch, eval s/photo", 6: "eval on the device and the same model.pt on the CPU",
         7: "cifar_lenet and rcnn_faces: 1 epoch, eval on the device and on the CPU"}
# The full run: (floor, cap) seconds of each step. A step may use the time left minus the floors of the steps after
# it, at most its cap (see Check.lane; a run shorter than 8 minutes scales the floors down); expected on one H100: 1 ~60 s, 2 ~150 s (--compile ~60-100 s of it), 3 ~35 s,
# 4 ~150 s, 5 ~50 s, 6 ~20 s, 7 ~50 s, after ~30 s of CIFAR preparation.
PLAN = {1: (40, 240), 2: (45, 330), 3: (30, 120), 4: (40, 240), 5: (40, 150), 6: (15, 90), 7: (0, 150)}
WANT_AFTER_CAPTCHA = 70   # seconds steps 5 and 6 usually take: the captcha training (step 4) leaves them that
SPEED_KEYS = ("img_per_s", "images_per_s", "photos_per_s", "crops_per_s")
LOG_LIMIT = 200_000   # characters of each command's stdout/stderr kept in the log files
AGREEMENT_MIN = 0.9   # steps 6-7: the device's eval and the CPU's give the same answer for this share of images (or
# all but one)


def now():
    return time.monotonic()


def number(text):
    """A CSV cell as int/float when it is one (NaN and infinities become None), else the text."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return text
    if not math.isfinite(value):
        return None
    return int(value) if re.fullmatch(r"-?\d+", text.strip()) else value


def clean(obj):
    """JSON-safe: NaN/inf -> None, paths -> str, tuples -> lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def read_csv(path):
    try:
        with open(path, newline="") as f:
            return [{k: number(v) for k, v in row.items()} for row in csv.DictReader(f)]
    except (OSError, csv.Error):
        return []


def rounded(x, digits):
    return round(x, digits) if isinstance(x, float) else x


def epochs_of(rows, val_key):
    """Per-epoch figures from history.csv rows, whatever the script names its columns."""
    out = []
    for row in rows:
        speed = next((row[k] for k in SPEED_KEYS if isinstance(row.get(k), (int, float))), None)
        out.append({"epoch": row.get("epoch"), val_key: rounded(row.get("val_acc", row.get("val_ap50")), 5),
                    "seconds": rounded(row.get("seconds"), 2), "per_s": rounded(speed, 1), "steps": row.get("steps")}
                   | {k: rounded(row[k], 5) for k in ("val_char_acc", "val_bacc", "train_loss") if k in row})
    return out


def is_num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def short(path):
    text = str(path)
    return text.replace(str(ROOT) + os.sep, "") if text.startswith(str(ROOT)) else text


def sha(path):
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    except OSError:
        return None


def link_prepared(src, dst):
    """A fresh run folder holding links to the prepared data (meta.json and shards), nothing else."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if path.name == "meta.json" or path.name.endswith(".pt.gz"):
            (dst / path.name).symlink_to(path.resolve())
    return dst


def model_facts(path):
    """Where model.pt's tensors were saved (cpu, cuda:0) and whether its keys carry DDP's `module.` prefix."""
    import torch   # imported here only: the parent never initialises CUDA
    where = set()

    def keep(storage, location):
        where.add(location)
        return storage
    state = torch.load(path, map_location=keep, weights_only=True)
    keys = list(state.get("model", state).keys()) if isinstance(state, dict) else []
    return {"saved_on": sorted(where), "module_prefix": any(k.startswith("module.") for k in keys)}


class GpuSampler:
    """nvidia-smi memory.used / utilization.gpu every 0.25 s in the background; windows by time."""

    def __init__(self):
        self.samples, self.proc, self.note = [], None, None
        exe = shutil.which("nvidia-smi")
        if not exe:
            self.note = "nvidia-smi not found: no GPU memory figures"
            return
        try:
            self.proc = subprocess.Popen([exe, "-i", "0", "--query-gpu=memory.used,utilization.gpu",
                                          "--format=csv,noheader,nounits", "-lms", "250"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError as e:
            self.note = f"nvidia-smi failed to start: {e}"
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            try:   # GPU 0 only (-i 0): the one every single-process step uses
                self.samples.append((now(), float(parts[0]), float(parts[1])))
            except (ValueError, IndexError):
                continue

    def window(self, t0, t1):
        if not self.proc:
            return {}
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        before = [s for s in self.samples if s[0] < t0]
        if not inside:
            return {"gpu_memory_note": "no nvidia-smi sample in this window"}
        base = before[-1][1] if before else None
        return {"gpu_memory_peak_mib": max(s[1] for s in inside), "gpu_memory_before_mib": base,
                "gpu_util_mean_pct": round(sum(s[2] for s in inside) / len(inside), 1)}

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()


class Check:
    def __init__(self, args):
        self.args = args
        self.tiny = args.tiny or args.device == "cpu"
        self.sizes = SIZES["tiny" if self.tiny else "full"]
        self.cores = os.cpu_count() or 1
        self.t0 = now()
        total = args.minutes * 60
        self.end_reserve = min(15.0, 0.05 * total)   # for the last JSON and the table
        self.grace = 3.0 if self.tiny else 10.0      # after SIGINT, before SIGKILL
        self.deadline = self.t0 + total - self.end_reserve
        self.scale = min(1.0, args.minutes / 8)      # the minimum times in PLAN are those of the 8-minute run
        self.work = Path(args.work).resolve()
        self.out = Path(args.out).resolve()
        self.logs = self.out.parent / f"{self.out.stem}_logs"
        self.data = Path(args.datasets).resolve()
        self.lock = threading.RLock()
        self.procs = {}
        self.aborting = False
        self.counter = 0
        self.prepared = {}   # name -> (threading.Event, folder or None)
        self.gpu = None
        self.result = {
            "check": "benchmarks/gpu_check.py", "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "finished": None, "elapsed_s": None, "minutes": args.minutes, "device": args.device,
            "sizes": "tiny" if self.tiny else "full", "size_table": self.sizes, "cpu_cores": self.cores,
            "complete": False, "environment": {}, "measurement_notes": [], "skipped": [], "problems": [],
            "prepare": {}, "steps": [{"step": n, "name": name, "status": "pending"} for n, name in STEPS.items()],
        }

    # ---- bookkeeping ----
    def step(self, n):
        return self.result["steps"][n - 1]

    def save(self):
        with self.lock:
            self.result["elapsed_s"] = round(now() - self.t0, 1)
            text = json.dumps(clean(self.result), indent=1)
            self.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.out.with_name(f"{self.out.name}.tmp.{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, self.out)

    def skip(self, what, why):
        with self.lock:
            self.result["skipped"].append(f"{what}: {why}")

    def problem(self, text):
        with self.lock:
            self.result["problems"].append(text)

    def left(self):
        return self.deadline - now()

    # ---- running commands ----
    def run(self, name, cmd, timeout, env=None, min_seconds=3.0, nice=False):
        """Run a command in its own process group; stop it with SIGINT (then SIGKILL) after `timeout` seconds or
        at the global deadline. Returns a record with status ok / failed / timeout / not run, and its output.
        nice: at a lower CPU priority (background preparation beside a GPU step)."""
        timeout = min(timeout, self.left() - self.grace)
        if nice and shutil.which("nice"):
            cmd = [shutil.which("nice"), "-n", "10", *cmd]
        shown = " ".join(short(c) for c in cmd).replace(PY, "python").replace(str(shutil.which("nice")), "nice")
        rec = {"name": name, "cmd": shown, "status": "not run", "timeout_s": round(max(timeout, 0), 1)}
        if self.aborting or timeout < min_seconds:
            rec["reason"] = "interrupted" if self.aborting else f"no time left ({max(timeout, 0):.0f} s)"
            return rec
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        with self.lock:
            self.counter += 1
            log = self.logs / f"{self.counter:02d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}"
        lines, err = [], []
        t0 = now()
        try:
            proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                                    start_new_session=True)
        except OSError as e:
            rec.update(status="failed", reason=f"could not start: {e}")
            return rec
        with self.lock:
            self.procs[proc.pid] = proc
        self.say(f"{name}: started (timeout {timeout:.0f} s)")
        readers = [threading.Thread(target=lambda: lines.extend((now(), l) for l in proc.stdout), daemon=True),
                   threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)]
        for r in readers:
            r.start()
        timed_out = False
        try:
            proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
            self.stop(proc)
        for r in readers:
            r.join(timeout=5)
        with self.lock:
            self.procs.pop(proc.pid, None)
        t1 = now()
        out_text, err_text = "".join(l for _, l in lines), "".join(err)
        rec.update(status="timeout" if timed_out else ("ok" if proc.returncode == 0 else "failed"),
                   rc=proc.returncode, wall_s=round(t1 - t0, 2), t_start=t0, t_end=t1)
        if self.aborting and rec["status"] != "ok":
            rec["status"] = "interrupted"
        device = re.findall(r"^device: (\S+)", err_text, re.M)
        if device:
            rec["device_printed"] = device[-1]
        if rec["status"] != "ok":
            rec["stderr_tail"] = err_text[-2500:]
            rec["stdout_tail"] = out_text[-800:]
        try:
            self.logs.mkdir(parents=True, exist_ok=True)
            log.with_suffix(".stdout.txt").write_text(f"$ {shown}\n" + out_text[-LOG_LIMIT:])
            log.with_suffix(".stderr.txt").write_text(err_text[-LOG_LIMIT:])
            rec["log"] = str(log.relative_to(self.out.parent)) + ".std{out,err}.txt"
        except OSError:
            pass
        if self.gpu:
            rec |= self.gpu.window(t0, t1)
        rec["_lines"], rec["_stdout"], rec["_stderr"] = lines, out_text, err_text
        self.say(f"{name}: {rec['status']} in {rec['wall_s']:.1f} s")
        return rec

    def say(self, text):
        print(f"[{now() - self.t0:6.1f} s] {text}", flush=True)

    def stop(self, proc):
        """Ctrl-C to the command's process group (the scripts leave whole files), SIGKILL if it does not end."""
        for sig, wait in ((signal.SIGINT, self.grace), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def python(self, script, *args):
        return [PY, ROOT / script, *args]

    @staticmethod
    def public(rec):
        return {k: v for k, v in rec.items() if not k.startswith("_") and k not in ("t_start", "t_end")}

    def record(self, n, rec):
        with self.lock:
            self.step(n).setdefault("runs", []).append(self.public(rec))
        self.save()
        return rec

    def part(self, until, later=(), cap=math.inf):
        """Deadline of the next command of a step: the step's time left minus what the commands after it need at
        least (`later`, seconds of the 8-minute run), at most `cap` seconds from now."""
        return now() + max(0.0, min(cap, until - now() - self.scale * sum(later)))

    # ---- environment ----
    def environment(self, in_process=False):
        env = {"python": platform.python_version(), "platform": platform.platform(), "cpu_cores": self.cores,
               "date_utc": self.result["started"]}
        try:
            model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), None)
            env["cpu"] = model
            env["memory_gib"] = round(int(next(l.split()[1] for l in open("/proc/meminfo")
                                               if l.startswith("MemTotal"))) / 2 ** 20, 1)
        except (OSError, StopIteration, ValueError):
            pass
        for key, cmd in (("commit", ["git", "rev-parse", "HEAD"]),
                         ("dirty_files", ["git", "status", "--porcelain", "--untracked-files=no"])):
            try:
                p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=20)
                env[f"git_{key}"] = (p.stdout.strip() if key == "commit" else p.stdout.split("\n")[:20]) \
                    if p.returncode == 0 else None
            except (OSError, subprocess.TimeoutExpired):
                env[f"git_{key}"] = None
        if env.get("git_commit") is None:
            env["git_note"] = "no git repository here: identify the code by file_sha256"
        env["file_sha256"] = {s: sha(ROOT / s) for s in (*SCRIPTS, "requirements.txt", "benchmarks/gpu_check.py")}
        code = ("import json, importlib.util, importlib.metadata as md, torch\n"
                "d = {'torch': torch.__version__, 'cuda': torch.version.cuda, 'cudnn': torch.backends.cudnn.version(),"
                " 'cuda_available': torch.cuda.is_available(),"
                " 'cpu_capability': torch.backends.cpu.get_cpu_capability()}\n"
                "for p in ('torchvision', 'triton', 'numpy', 'opencv-contrib-python-headless', 'tensorboard'):\n"
                "    try: d[p] = md.version(p)\n"
                "    except md.PackageNotFoundError: d[p] = None\n"
                "if d['cuda_available']:\n"
                "    d['gpu_count'] = torch.cuda.device_count()\n"
                "    p = torch.cuda.get_device_properties(0)\n"
                "    d['gpu'] = {'name': p.name, 'capability': '%d.%d' % (p.major, p.minor),"
                " 'memory_mib': p.total_memory // 2**20, 'sm_count': p.multi_processor_count,"
                " 'bf16': torch.cuda.is_bf16_supported()}\n"
                "    try: d['nccl'] = '.'.join(map(str, torch.cuda.nccl.version()))\n"
                "    except Exception as e: d['nccl'] = 'unavailable: %s' % e\n"
                "print(json.dumps(d))\n")
        if in_process:   # the CPU dry run: torch is imported here anyway (model.pt checks); no CUDA is touched
            exec(code.replace("print(json.dumps(d))", "env.update(d)"), {"env": env})
        else:            # a child process queries the GPU, so this process never holds a CUDA context
            p = None
            try:
                p = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
                env |= json.loads(p.stdout.strip().splitlines()[-1])
            except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as e:
                env["torch_error"] = f"{type(e).__name__}: {e} {p.stderr[-800:] if p else ''}"
        smi = shutil.which("nvidia-smi")
        if smi:
            try:
                p = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm",
                                    "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
                env["nvidia_smi"] = p.stdout.strip()
            except (OSError, subprocess.TimeoutExpired):
                pass
        env["c_compiler"] = shutil.which("cc") or shutil.which("gcc")   # torch.compile (Triton) builds with it
        with self.lock:
            self.result["environment"] = env
        self.save()
        return env

    # ---- data preparation (into --work, reused when the sizes and the script are the same) ----
    def prepared_event(self, name):
        with self.lock:
            return self.prepared.setdefault(name, [threading.Event(), None])

    def need(self, name, until):
        event, folder = self.prepared_event(name)
        event.wait(timeout=max(0.0, until - now()))
        return self.prepared_event(name)[1]

    def prep(self, name, budget, make):
        """Run `make(folder, until)` unless folder holds data prepared with the same stamp; publish the folder."""
        t0 = now()
        entry = {"status": "running"}
        with self.lock:
            self.result["prepare"][name] = entry
        folder = self.work / f"{name}_prepared"
        script = {"cifar": "cifar_resnet.py", "captcha": "captcha.py", "faces": "fast_rcnn_faces.py",
                  "rcnn": "rcnn_faces.py"}[name]
        stamp = {"sizes": self.sizes, "script_sha256": sha(ROOT / script), "datasets": str(self.data)}
        stamp_file = folder / "gpu_check_stamp.json"
        try:
            if (folder / "meta.json").exists() and stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
                entry.update(status="ok", reused=True)
            else:
                shutil.rmtree(folder, ignore_errors=True)
                runs = make(folder, t0 + budget)
                entry["runs"] = [self.public(r) for r in runs]
                bad = [r for r in runs if r["status"] != "ok"]
                entry["status"] = bad[0]["status"] if bad else "ok"
                if not bad:
                    stamp_file.write_text(json.dumps(stamp))
            meta = json.loads((folder / "meta.json").read_text()) if entry["status"] == "ok" else {}
            entry["counts"] = meta.get("counts") or {k: len(v) for k, v in (meta.get("splits") or {}).items()
                                                     if isinstance(v, list)} or None
        except Exception as e:   # noqa: BLE001 - a broken step must not end the check
            entry.update(status="failed", error=f"{type(e).__name__}: {e}")
        entry["seconds"] = round(now() - t0, 1)
        if entry["status"] != "ok":
            self.problem(f"prepare {name}: {entry['status']}")
        with self.lock:
            self.prepared_event(name)[1] = folder if entry["status"] == "ok" else None
            self.prepared_event(name)[0].set()
        self.save()

    def make_cifar(self, folder, until):
        """All of ../shared/datasets/cifar10 as --image-dir (a tiny run: a copy of its first images), and a
        --test-dir of copies of its first images: the official test images are not in the datasets, so with
        --test-dir the image folder is split 90/10 (45,000/5,000 of 50,000) and the test split repeats training
        images (its score is not held out)."""
        src = self.data / "cifar10"
        files = sorted(p.name for p in (src / "train").iterdir())
        image_dir, test_dir = src, self.work / f"cifar_test_{self.sizes['cifar_test']}"
        shutil.rmtree(test_dir, ignore_errors=True)
        test_dir.mkdir(parents=True)
        for name in files[:self.sizes["cifar_test"]]:
            shutil.copy(src / "train" / name, test_dir / name)
        if self.sizes["cifar"]:
            image_dir = self.work / f"cifar_src_{self.sizes['cifar']}"
            shutil.rmtree(image_dir, ignore_errors=True)
            (image_dir / "train").mkdir(parents=True)
            shutil.copy(src / "labels.txt", image_dir / "labels.txt")
            for name in files[:self.sizes["cifar"]]:
                shutil.copy(src / "train" / name, image_dir / "train" / name)
        return [self.run("prepare cifar", self.python("cifar_resnet.py", "prepare", "--image-dir", image_dir,
                                                      "--test-dir", test_dir, "--data-dir", folder,
                                                      "--workers", self.cores), until - now())]

    def captcha_epoch_size_option(self):
        """captcha.py's train repeats a small training split to --epoch-size images per epoch (where it has the
        option): the tiny dry run turns that off so its 1 epoch stays tiny."""
        try:
            return "--epoch-size" in (ROOT / "captcha.py").read_text()
        except OSError:
            return False

    def make_captcha(self, folder, until):
        images = self.work / f"captchas_{self.sizes['captchas']}"
        gen = self.run("generate captchas", self.python("generate-captcha/generate.py", "--count", self.sizes["captchas"],
                                                        "--output", images, "--seed", 0, "--clean"),
                       self.part(until, [10]) - now(), nice=not self.tiny)
        if gen["status"] != "ok":
            return [gen]
        return [gen, self.run("prepare captcha", self.python("captcha.py", "prepare", "--image-dir", images,
                                                             "--data-dir", folder), until - now(), nice=not self.tiny)]

    def face_csv(self, n):
        """The CSV rows of the first n photos (sorted names) that exist: prepare then reads only those photos,
        straight from ../shared/datasets/faces/image_data."""
        src = self.data / "faces"
        with open(src / "bbox_train.csv", newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = reader.fieldnames, list(reader)
        keep = set(sorted({r["Name"] for r in rows if (src / "image_data" / r["Name"]).is_file()})[:n])
        out = self.work / f"faces_{n}.csv"
        with open(out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(r for r in rows if r["Name"] in keep)
        return out

    def make_faces(self, folder, until, script="fast_rcnn_faces.py", n=None):
        return [self.run(f"prepare {script[:-3]}", self.python(script, "prepare", "--image-dir",
                                                               self.data / "faces" / "image_data", "--csv",
                                                               self.face_csv(n or self.sizes["faces"]),
                                                               "--data-dir", folder, "--workers", self.cores),
                         until - now(), nice=not self.tiny)]

    def make_rcnn(self, folder, until):
        return self.make_faces(folder, until, "rcnn_faces.py", self.sizes["rcnn_photos"])

    # ---- steps ----
    def begin(self, n):
        with self.lock:
            self.step(n).update(status="running", started_s=round(now() - self.t0, 1))
        self.save()
        return now()

    def finish(self, n, t0, budget, checks=(), notes=(), **figures):
        """Status from the step's runs and checks: failed > timeout > partial (some commands had no time) > ok;
        "not run" when no command had time."""
        with self.lock:
            st = self.step(n)
            statuses = [r["status"] for r in st.get("runs", [])]
            failed_checks = [c for c, ok in checks if not ok]
            if "failed" in statuses or "interrupted" in statuses or failed_checks:
                status = "failed" if "interrupted" not in statuses else "interrupted"
            elif "timeout" in statuses:
                status = "timeout"
            elif not statuses or all(s == "not run" for s in statuses):
                status = "not run"
            elif "not run" in statuses:
                status = "partial"
            else:
                status = "ok"
            st.update(status=status, seconds=round(now() - t0, 1), budget_s=round(budget, 1), **figures)
            peaks = [r["gpu_memory_peak_mib"] for r in st.get("runs", []) if is_num(r.get("gpu_memory_peak_mib"))]
            if peaks:
                st["gpu_memory_peak_mib"] = max(peaks)
            if checks:
                st["checks"] = {c: ok for c, ok in checks}
            if notes:
                st["notes"] = list(notes)
            if status != "ok":
                why = ", ".join(failed_checks) or ", ".join(f"{r['name']} {r['status']}" for r in st.get("runs", [])
                                                             if r["status"] != "ok")
                self.problem(f"step {n} {status}: {why}")
        self.save()

    def skip_step(self, n, why):
        """A step left out on purpose (tiny dry run)."""
        with self.lock:
            self.step(n).update(status="skipped", reason=why)
        self.skip(f"step {n}", why)
        self.save()

    def not_run(self, n, why):
        """A step that could not run (its data was not prepared)."""
        with self.lock:
            self.step(n).update(status="not run", reason=why)
        self.problem(f"step {n} not run: {why}")
        self.save()

    def train(self, n, name, script, data, until, *extra, launcher=None):
        cmd = [*(launcher or [PY]), ROOT / script, "train", "--data-dir", data, "--device", self.args.device, *extra]
        rec = self.run(name, cmd, until - now())
        rec["_history"] = read_csv(data / "history.csv")
        rows = read_csv(data / "runs.csv")
        rec["_runs"] = rows[-1] if rows else {}
        m = re.search(r"precision (?:torch\.)?(\w+)", rec.get("_stdout", ""))
        if m:
            rec["precision"] = m.group(1)
        return self.record(n, rec)

    def step1(self, budget):
        t0 = self.begin(1)
        data = self.need("cifar", t0 + budget)
        if data is None:
            return self.not_run(1, "CIFAR data not prepared")
        epochs = self.sizes["step1_epochs"]
        run_dir = link_prepared(data, self.work / "runs" / "step1_cifar_resnet")
        rec = self.train(1, "cifar_resnet train", "cifar_resnet.py", run_dir, t0 + budget, "--epochs", epochs, "--amp")
        hist = epochs_of(rec["_history"], "val_top1")
        last = hist[-1]["val_top1"] if hist else None
        figures = {"epochs": hist, "val_top1_last": last, "test_top1": rec["_runs"].get("test"),
                   "test_note": "test split = a few training images again (no official test set here): not held out",
                   "precision": rec.get("precision"), "train_images": self.count(data, "training_set"),
                   "val_images": self.count(data, "validating_set")}
        if len(hist) >= 2:
            figures["images_per_s_after_epoch1"] = round(sum(h["per_s"] or 0 for h in hist[1:]) / (len(hist) - 1), 1)
        if hist and rec.get("wall_s"):
            figures["startup_and_test_s"] = round(rec["wall_s"] - sum(h["seconds"] or 0 for h in hist), 1)
        if not self.tiny:
            figures["target"] = {"val_top1_after_5_epochs": 0.90, "met": bool(last is not None and len(hist) >= 5
                                                                                and last >= 0.90)}
        self.finish(1, t0, budget, **figures)

    def count(self, data, split):
        try:
            return json.loads((data / "meta.json").read_text())["counts"][split]
        except (OSError, KeyError, ValueError, TypeError):
            return None

    def step2(self, budget):
        if self.tiny:
            return self.skip_step(2, "tiny dry run: the command of step 1 with other flags, whose speed matters "
                                     "only on a GPU (--compile alone takes minutes on a CPU); tests/test_gpu_check.py "
                                     "runs this step's code on simulated output")
        t0 = self.begin(2)
        until = t0 + budget
        data = self.need("cifar", until)
        if data is None:
            return self.not_run(2, "CIFAR data not prepared")
        variants = [("no-amp", ["--no-amp"], 25), ("amp", ["--amp"], 20), ("amp+compile", ["--amp", "--compile"], 30)]
        notes = []
        epochs = self.sizes["step2_epochs"]
        runs, figures = {}, {}
        for i, (name, flags, _) in enumerate(variants):
            run_dir = link_prepared(data, self.work / "runs" / f"step2_{name}")
            rec = self.train(2, f"cifar_resnet {name}", "cifar_resnet.py", run_dir,
                             self.part(until, [least for _, _, least in variants[i + 1:]], cap=150),
                             "--epochs", epochs, *flags)
            hist = epochs_of(rec["_history"], "val_top1")
            runs[name] = {"images_per_s": [h["per_s"] for h in hist], "epoch_seconds": [h["seconds"] for h in hist],
                          "steady_images_per_s": hist[-1]["per_s"] if hist else None,
                          "val_top1": [h["val_top1"] for h in hist], "precision": rec.get("precision"),
                          "wall_s": rec.get("wall_s"), "gpu_memory_peak_mib": rec.get("gpu_memory_peak_mib")}
        speed = {k: v["steady_images_per_s"] for k, v in runs.items()}
        if speed.get("amp") and speed.get("no-amp"):
            figures["amp_speedup"] = round(speed["amp"] / speed["no-amp"], 2)
        comp = runs.get("amp+compile", {})
        if speed.get("amp+compile") and speed.get("amp"):
            figures["compile_speedup"] = round(speed["amp+compile"] / speed["amp"], 2)
        if len(comp.get("epoch_seconds", [])) >= 2 and all(is_num(x) for x in comp["epoch_seconds"][:2]):
            figures["compile_seconds_estimate"] = round(comp["epoch_seconds"][0] - comp["epoch_seconds"][1], 1)
            if is_num(runs["amp"].get("wall_s")) and is_num(comp.get("wall_s")):
                figures["compile_wall_extra_s"] = round(comp["wall_s"] - runs["amp"]["wall_s"], 1)
        notes.append("steady = the last epoch's images/s (the first one includes cuDNN autotuning and, with "
                     "--compile, compilation); compile_seconds_estimate = first minus second training epoch of the "
                     "--compile run; compile_wall_extra_s = its whole command's extra wall time over --amp "
                     "(includes compiling the eval graph)")
        self.finish(2, t0, budget, variants=runs, notes=notes, **figures)

    def step3(self, budget):
        if self.tiny:
            return self.skip_step(3, "tiny dry run: with 1 process torchrun runs step 1's command as one plain "
                                     "process; tests/test_scale.py runs torchrun with 2 processes (gloo) and "
                                     "tests/test_gpu_check.py this step's code on simulated output")
        t0 = self.begin(3)
        until = t0 + budget
        data = self.need("cifar", until)
        if data is None:
            return self.not_run(3, "CIFAR data not prepared")
        gpus = self.result["environment"].get("gpu_count") or 1
        nproc = self.args.nproc or (gpus if self.args.device == "cuda" else 1)
        run_dir = link_prepared(data, self.work / "runs" / "step3_torchrun")
        extra = ["--sync-bn"] if nproc > 1 and self.args.device == "cuda" else []
        rec = self.train(3, f"torchrun {nproc} cifar_resnet", "cifar_resnet.py", run_dir,
                         self.part(until, [10]), "--epochs", 1, *extra,
                         launcher=[*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}"])
        m = re.search(r"torchrun: (\d+) processes, backend (\w+)", rec.get("_stdout", ""))
        hist = rec["_history"]
        steps = hist[0].get("steps") if hist else None
        reference = next((h.get("steps") for d in ("step1_cifar_resnet", "step2_no-amp", "step2_amp")
                          for h in read_csv(self.work / "runs" / d / "history.csv")[:1]), None)
        if reference is None:   # no one-process run: the single process's count, ceil(train / batch)
            n, batch = self.count(data, "training_set"), rec["_runs"].get("batch_size")
            reference = math.ceil(n / batch) if isinstance(n, int) and isinstance(batch, int) else None
        figures = {"nproc_per_node": nproc, "process_group_backend": m and m.group(2),
                   "processes": m and int(m.group(1)), "sync_bn": bool(extra), "steps_per_epoch": steps,
                   "steps_one_process": reference, "images_per_s": hist[0].get("img_per_s") if hist else None,
                   "world_size_in_runs_csv": rec["_runs"].get("world_size")}
        checks, notes = [], []
        if nproc == 1:
            notes.append("with 1 process (WORLD_SIZE=1) the scripts run as one plain process and start no process "
                         "group, so nccl, DDP and --sync-bn are not exercised here: they need 2+ GPUs (NCCL takes "
                         "one rank per GPU)")
            self.skip("nccl / DDP / --sync-bn", f"{gpus} GPU(s): torchrun with 1 process starts no process group")
        if rec["status"] == "ok":
            if nproc > 1:
                checks.append(("torchrun line printed with the process count", bool(m) and int(m.group(1)) == nproc))
            checks.append(("same steps per epoch as one process", steps is not None and steps == reference))
            if (run_dir / "model.pt").exists():
                facts = model_facts(run_dir / "model.pt")
                figures["model"] = facts
                checks.append(("model.pt without module. prefix", not facts["module_prefix"]))
                ev = self.eval_run(3, "cifar_resnet", run_dir, self.args.device, until)
                figures["eval"] = self.public(ev)
                checks.append(("model evaluates", ev.get("ok", False)))
            else:
                checks.append(("model.pt written", False))
        self.finish(3, t0, budget, checks=checks, notes=notes, **figures)

    def step4(self, budget):
        t0 = self.begin(4)
        until = t0 + budget
        data = self.need("captcha", until)
        if data is None:
            return self.not_run(4, "captchas not prepared")
        extra, notes, figures = [], [], {}
        if self.tiny and self.captcha_epoch_size_option():
            extra = ["--epoch-size", 0]
            notes.append("tiny dry run: --epoch-size 0 (one pass over the tiny split per epoch)")
        epochs = 1
        if not self.tiny:   # a 1-epoch probe measures an epoch and the start-up, then as many epochs as fit
            probe_dir = link_prepared(data, self.work / "runs" / "step4_probe")
            probe = self.train(4, "captcha probe (1 epoch)", "captcha.py", probe_dir, self.part(until, [20], cap=90),
                               "--epochs", 1, *extra)
            if probe["status"] != "ok":   # the real run would fail (or run over) the same way: keep the time
                return self.finish(4, t0, budget, notes=["the 1-epoch probe did not pass: no longer run"])
            hist = epochs_of(probe["_history"], "val_exact")
            if hist and hist[0]["seconds"]:
                epoch_s = hist[0]["seconds"]
                startup = max(0.0, probe["wall_s"] - epoch_s)
                # what steps 5 and 6 usually take stays theirs (step 7 is optional: it gets what is left)
                margin = self.scale * 10 + startup
                room = min(self.sizes["captcha_train_s"], until - now() - margin,
                           self.left() - self.scale * WANT_AFTER_CAPTCHA - margin)
                epochs = max(1, min(60, int(room // epoch_s)))
                figures["probe"] = {"epoch_seconds": epoch_s, "startup_and_test_s": round(startup, 1),
                                    "images_per_s": hist[0]["per_s"]}
            notes.append("epochs from the probe's epoch time: as many whole epochs as fit in the step's time left, "
                         "at most 2 minutes of training (the one-cycle schedule then spans exactly them)")
        run_dir = link_prepared(data, self.work / "runs" / "step4_captcha")
        rec = self.train(4, f"captcha train ({epochs} epochs)", "captcha.py", run_dir, until, "--epochs", epochs, *extra)
        hist = epochs_of(rec["_history"], "val_exact")
        figures |= {"epochs_requested": epochs, "epochs": hist, "val_exact_last": hist[-1]["val_exact"] if hist else None,
                    "val_exact_best": max((h["val_exact"] for h in hist if isinstance(h["val_exact"], (int, float))),
                                          default=None),
                    "test_exact": rec["_runs"].get("test"), "metric": rec["_runs"].get("metric"),
                    "images_per_s_mean": round(sum(h["per_s"] or 0 for h in hist) / len(hist), 1) if hist else None,
                    "train_images": self.count(data, "training_set"), "precision": rec.get("precision")}
        self.finish(4, t0, budget, notes=notes, **figures)

    def step5(self, budget):
        t0 = self.begin(5)
        until = t0 + budget
        data = self.need("faces", until)
        if data is None:
            return self.not_run(5, "face photos not prepared")
        run_dir = link_prepared(data, self.work / "runs" / "step5_fast_rcnn")
        rec = self.train(5, "fast_rcnn_faces train", "fast_rcnn_faces.py", run_dir, self.part(until, [10]),
                         "--epochs", 1)
        hist = epochs_of(rec["_history"], "val_ap50")
        figures = {"epochs": hist, "test_ap50": rec["_runs"].get("test"), "photos": self.face_count(data),
                   "photos_per_s": hist[0]["per_s"] if hist else None,
                   "eval_note": "eval seconds_per_image: time between the first and the last --json line (start-up "
                                "excluded), selective search on the CPU included"}
        if (run_dir / "model.pt").exists():
            ev = self.eval_run(5, "fast_rcnn_faces", run_dir, self.args.device, until,
                               self.eval_images("fast_rcnn_faces", self.sizes["face_eval_photos"]))
            figures["eval"] = self.public(ev)
        self.finish(5, t0, budget, **figures)

    def face_count(self, data):
        try:
            meta = json.loads((data / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        splits = meta.get("splits")
        return meta.get("counts") or ({k: len(v) for k, v in splits.items() if isinstance(v, list)}
                                      if isinstance(splits, dict) else None) or meta.get("photos")

    # ---- eval ----
    def eval_images(self, script, n):
        if script.startswith("cifar"):
            return sorted((self.data / "cifar10" / "train").iterdir())[:n]
        if script == "captcha":
            folder = self.work / f"captchas_{self.sizes['captchas']}"
            return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:n] \
                if folder.is_dir() else []
        return sorted((self.data / "faces" / "image_data").iterdir())[:n]

    def eval_run(self, n, script, run_dir, device, until, images=None):
        """`SCRIPT eval --json` on a few images; device "cpu" runs with CUDA hidden, as on a CPU-only machine."""
        images = images or self.eval_images(script, self.sizes["eval_images"])
        if not images:
            return {"ok": False, "reason": "no images to evaluate"}
        out_dir = self.work / "eval_out" / f"{script}_{device}_{n}"
        extra = ["--output-dir", out_dir] if "faces" in script else []
        env = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}
        rec = self.run(f"{script} eval --device {device}", self.python(f"{script}.py", "eval", "--data-dir", run_dir,
                                                                         "--json", "--device", device, *extra, *images),
                       until - now(), env=env)
        self.record(n, rec)
        objs = []
        for t, line in rec.get("_lines", []):
            try:
                objs.append((t, json.loads(line)))
            except ValueError:
                continue
        errors = [o for _, o in objs if "error" in o]
        res = {"device": device, "device_printed": rec.get("device_printed"), "images": len(images),
               "answers": len(objs), "errors": len(errors), "status": rec["status"], "wall_s": rec.get("wall_s"),
               "cuda_hidden": device == "cpu"}
        res["ok"] = rec["status"] == "ok" and len(objs) == len(images) and not errors and \
            rec.get("device_printed") in (device, None)
        if len(objs) >= 2:   # seconds per image between the first and the last answer: start-up excluded
            res["seconds_per_image"] = round((objs[-1][0] - objs[0][0]) / (len(objs) - 1), 3)
        if objs:
            res["seconds_per_image_with_startup"] = round(rec["wall_s"] / len(objs), 3)
        res["_answers"] = [o for _, o in objs]
        return res

    def compare(self, a, b):
        """How far two evals of the same model on the same images agree."""
        pa, pb = a.get("_answers", []), b.get("_answers", [])
        if not pa or len(pa) != len(pb):
            return None

        def key(o):
            if "top" in o:
                return o["top"][0]["label"] if o["top"] else None
            if "code" in o:
                return o["code"]
            if "boxes" in o:
                return len(o["boxes"])
            return None
        same = sum(key(x) == key(y) for x, y in zip(pa, pb))
        out = {"same_prediction": same, "of": len(pa)}
        if "top" in pa[0]:
            out["max_probability_difference"] = round(max(abs(x["top"][0]["probability"] - y["top"][0]["probability"])
                                                          for x, y in zip(pa, pb) if x["top"] and y["top"]), 4)
        return out

    def step6(self, budget):
        t0 = self.begin(6)
        until = t0 + budget
        models = [("cifar_resnet", self.work / "runs" / "step1_cifar_resnet", 1),
                  ("captcha", self.work / "runs" / "step4_captcha", 4),
                  ("fast_rcnn_faces", self.work / "runs" / "step5_fast_rcnn", 5)]
        self.eval_models(6, models, until)
        self.finish_evals(6, t0, budget)

    def eval_models(self, n, models, until):
        """Every model: eval on the device and on the CPU (CUDA hidden), side by side in a few threads."""
        jobs, results = [], {}
        for script, run_dir, source in models:
            if not (run_dir / "model.pt").exists():
                results[script] = {"ok": False, "reason": f"no model.pt (step {source} did not write one)"}
                continue
            earlier = self.step(source).get("eval")
            if self.args.device == "cpu" and earlier and earlier.get("device") == "cpu":
                results[script] = {"cpu": {**earlier, "reused_from_step": source}}   # the same CPU eval again
                continue
            images = self.eval_images(script, 2 if "faces" in script else self.sizes["eval_images"])
            results[script] = {}
            devices = ["cpu"] if self.args.device == "cpu" else [self.args.device, "cpu"]
            jobs += [(script, run_dir, d, images) for d in devices]
        with concurrent.futures.ThreadPoolExecutor(max_workers=2 if self.tiny else 4) as pool:
            futures = {pool.submit(self.eval_run, n, s, r, d, until, images): (s, d) for s, r, d, images in jobs}
            for script, run_dir, _ in models:   # while the evals run
                if (run_dir / "model.pt").exists():
                    try:
                        results[script]["model"] = model_facts(run_dir / "model.pt")
                    except Exception as e:   # noqa: BLE001
                        results[script]["model"] = {"error": f"{type(e).__name__}: {e}"}
            for f, (script, device) in futures.items():
                try:
                    results[script][device] = f.result()
                except Exception as e:   # noqa: BLE001
                    results[script][device] = {"ok": False, "reason": f"{type(e).__name__}: {e}"}
        for script, res in results.items():
            if self.args.device != "cpu" and self.args.device in res and "cpu" in res:
                res["agreement_device_vs_cpu"] = self.compare(res[self.args.device], res["cpu"])
            for d in ("cpu", self.args.device):
                if isinstance(res.get(d), dict):
                    res[d].pop("_answers", None)
        with self.lock:
            self.step(n)["models"] = results

    def finish_evals(self, n, t0, budget, notes=()):
        results = self.step(n).get("models", {})
        checks = []
        for script, res in results.items():
            for d in ("cpu", self.args.device) if self.args.device != "cpu" else ("cpu",):
                checks.append((f"{script} eval on {d}", bool(res.get(d, {}).get("ok"))))
            agree = res.get("agreement_device_vs_cpu")
            if agree:   # the device may round otherwise (bf16): a rare different answer (one of two face photos)
                differ = agree["of"] - agree["same_prediction"]
                checks.append((f"{script} {self.args.device} and cpu answer alike (one image in ten, or one, apart)",
                               differ <= max(1, (1 - AGREEMENT_MIN) * agree["of"] + 1e-9)))   # 1e-9: 0.1 * 20
        if self.args.device == "cpu":
            notes = [*notes, "device is cpu: the CPU eval (CUDA hidden) is the only eval"]
        self.finish(n, t0, budget, checks=checks, notes=notes)

    def step7(self, budget):
        if self.tiny:
            return self.skip_step(7, "tiny dry run: only the steps of the issue")
        if budget < 30 * self.scale:
            return self.skip_step(7, f"optional, and only {budget:.0f} s were left")
        t0 = self.begin(7)
        until = t0 + budget
        models = []
        cifar = self.need("cifar", until)
        if cifar is not None:
            run_dir = link_prepared(cifar, self.work / "runs" / "step7_cifar_lenet")
            self.train(7, "cifar_lenet train", "cifar_lenet.py", run_dir, self.part(until, [20, 10], cap=90),
                       "--epochs", 1)
            models.append(("cifar_lenet", run_dir, 7))
        rcnn = self.need("rcnn", until)
        if rcnn is not None:
            run_dir = link_prepared(rcnn, self.work / "runs" / "step7_rcnn_faces")
            self.train(7, "rcnn_faces train", "rcnn_faces.py", run_dir, self.part(until, [10]), "--epochs", 1)
            models.append(("rcnn_faces", run_dir, 7))
        self.eval_models(7, models, until)
        self.finish_evals(7, t0, budget)

    # ---- schedule ----
    def lane(self, tasks, later=0.0):
        """Run tasks [(fn(budget), floor_s, cap_s)] in order. A task may use the time left minus the floors of the
        tasks after it (and `later`, the floors of what runs after this lane), at most its cap: the earlier steps,
        which the issue lists first, get what they need, and every later step keeps its minimum. In the tiny dry
        run a task may use 80% of the time left (the limits only keep a hang from eating the rest). An exception
        in one task is recorded and the lane goes on."""
        for i, (fn, floor, cap) in enumerate(tasks):
            if self.aborting:
                return
            left = max(0.0, self.left())
            if self.tiny:
                budget = 0.8 * left
            else:
                budget = min(cap, max(left - self.scale * (later + sum(f for _, f, _ in tasks[i + 1:])),
                                      min(floor, left)))
            self.guarded(fn, budget)

    def guarded(self, fn, budget):
        try:
            fn(budget)
        except Exception as e:   # noqa: BLE001 - a bug in one step must not lose the others
            import traceback
            self.problem(f"{getattr(fn, '__name__', fn)}: {type(e).__name__}: {e}")
            with self.lock:
                self.result.setdefault("internal_errors", []).append(traceback.format_exc()[-2000:])
            for st in self.result["steps"]:
                if st["status"] == "running":
                    st["status"] = "failed"
            self.save()

    def prep_task(self, name, make):
        def task(budget):
            self.prep(name, budget, make)
        task.__name__ = f"prepare {name}"
        return task

    def run_all(self):
        a = self.args
        missing = [p for p in (self.data / "cifar10" / "labels.txt", self.data / "faces" / "bbox_train.csv")
                   if not p.exists()]
        if missing:
            self.problem(f"datasets not found: {', '.join(map(str, missing))} (use --datasets DIR)")
        shutil.rmtree(self.work / "runs", ignore_errors=True)   # no model of an earlier check is ever evaluated
        self.work.mkdir(parents=True, exist_ok=True)
        prep = {name: self.prep_task(name, make) for name, make in
                (("cifar", self.make_cifar), ("captcha", self.make_captcha), ("faces", self.make_faces),
                 ("rcnn", self.make_rcnn))}
        if self.tiny:   # two independent chains side by side: the dry run is mostly process start-up
            self.skip("GPU memory", "CPU run")
            self.prepared_event("rcnn")[0].set()
            lanes = [[(prep["cifar"], 0, 0), (self.step1, 0, 0), (self.step2, 0, 0), (self.step3, 0, 0),
                      (self.step5, 0, 0)],
                     [(prep["faces"], 0, 0), (prep["captcha"], 0, 0), (self.step4, 0, 0)]]
            threads = [threading.Thread(target=self.lane, args=(lane,), daemon=True) for lane in lanes]
            for t in threads:
                t.start()
            self.wait(threads)
            self.lane([(self.step6, 0, 0), (self.step7, 0, 0)])
            self.environment(in_process=True)
            return
        env = self.environment()
        if a.device == "cuda" and not env.get("cuda_available"):
            self.problem("--device cuda: torch sees no CUDA device (see environment); nothing was run")
            for st in self.result["steps"]:
                st.update(status="skipped", reason="no CUDA device")
            return
        if a.device == "cuda":
            self.gpu = GpuSampler()
            if self.gpu.note:
                self.skip("GPU memory", self.gpu.note)
            else:
                self.result["measurement_notes"].append(
                    "gpu_memory_peak_mib: nvidia-smi memory.used of GPU 0, sampled every 0.25 s while the command ran: "
                    "CUDA context + PyTorch's caching allocator (reserved, not only allocated) + any other process; "
                    "gpu_memory_before_mib is the last sample before it started")
        self.result["measurement_notes"].append(
            "images/s and seconds per epoch are the scripts' own history.csv figures (training pass only for "
            "cifar; captcha's seconds include validation); captchas and faces were prepared on the CPU in the "
            "background (nice 10) during steps 1-3, which may slow those steps slightly")
        background = None

        def start_background(budget):   # captchas and faces are prepared on the CPU while steps 1-3 use the GPU
            nonlocal background
            background = threading.Thread(target=self.lane, daemon=True, args=(
                [(prep["captcha"], 0, 200), (prep["faces"], 0, 150), (prep["rcnn"], 0, 120)],))
            background.start()
        start_background.__name__ = "start background preparation"
        # The background preparation starts once CIFAR is prepared (that uses every core first).
        self.lane([(prep["cifar"], 0, 200), (start_background, 0, 0), *[(step, *PLAN[n]) for n, step in
                   enumerate((self.step1, self.step2, self.step3, self.step4, self.step5, self.step6, self.step7), 1)]])
        if background:
            background.join(timeout=max(0.0, self.left()))

    def wait(self, threads):
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=0.5)

    def abort(self):
        """Ctrl-C / SIGTERM of this check: stop every running command, keep what was measured."""
        self.aborting = True
        with self.lock:
            procs = list(self.procs.values())
        for p in procs:
            threading.Thread(target=self.stop, args=(p,), daemon=True).start()
        deadline = now() + self.grace + 6
        while now() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.2)
        for st in self.result["steps"]:
            if st["status"] in ("pending", "running"):
                st["status"] = "interrupted"
        self.problem("the check was interrupted")

    def close(self):
        if self.gpu:
            self.gpu.stop()
        with self.lock:
            self.result["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            for st in self.result["steps"]:
                if st["status"] in ("pending", "running"):
                    st.update(status="not run", reason="no time left")
            self.result["complete"] = all(st["status"] in ("ok", "skipped") for st in self.result["steps"]) and \
                not self.result["problems"]
        self.save()
        print(self.table(), flush=True)
        print(f"\nJSON: {self.out}\nlogs: {self.logs}", flush=True)

    # ---- the table ----
    def table(self):
        r, env = self.result, self.result["environment"]
        gpu = (env.get("gpu") or {}).get("name") or ("no GPU" if self.args.device == "cpu" else "?")
        head = (f"gpu_check: {gpu}, torch {env.get('torch')}, CUDA {env.get('cuda')}, commit "
                f"{(env.get('git_commit') or 'unknown')[:10]}, {r['started']}, sizes {r['sizes']}, "
                f"{r['elapsed_s']} s of {r['minutes'] * 60:.0f}")
        rows = [("step", "status", "seconds", "figures")]
        for name, p in r["prepare"].items():
            rows.append((f"prepare {name}", p.get("status"), p.get("seconds"), "reused" if p.get("reused") else
                         json.dumps(p.get("counts"))[:70]))
        for st in r["steps"]:
            text = self.summary(st)
            rows.append((f"{st['step']}", st["status"], st.get("seconds"), text[:117] + "..." if len(text) > 120
                         else text))
        width = [max(len(str(row[i])) for row in rows) for i in range(3)]
        lines = [head, ""] + ["  ".join(str(c).ljust(width[i]) if i < 3 else str(c) for i, c in enumerate(row))
                              for row in rows]
        if r["skipped"]:
            lines += ["", "skipped: " + "; ".join(r["skipped"])]
        if r["problems"]:
            lines += ["problems: " + "; ".join(r["problems"])]
        return "\n".join(lines)

    @staticmethod
    def summary(st):
        def pct(x):
            return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "-"

        def mib(x):
            return f", peak {x / 1024:.1f} GiB" if isinstance(x, (int, float)) else ""
        runs = st.get("runs", [])
        peak = max((x.get("gpu_memory_peak_mib") for x in runs if x.get("gpu_memory_peak_mib")), default=None)
        n = st["step"]
        if st["status"] == "skipped":
            return st.get("reason", "")
        if n in (1, 4) and st.get("epochs"):
            key = "val_top1" if n == 1 else "val_exact"
            eps = st["epochs"]
            speed = [e["per_s"] for e in eps if isinstance(e["per_s"], (int, float))]
            text = (f"val {' '.join(pct(e[key]) for e in eps[-6:])} after {len(eps)} epochs, "
                    f"{(sum(speed) / len(speed)) if speed else 0:.0f} img/s, "
                    f"{sum(e['seconds'] or 0 for e in eps) / len(eps):.1f} s/epoch{mib(peak)}")
            if st.get("target"):
                text += f", target 90%: {'met' if st['target']['met'] else 'NOT met'}"
            return text
        if n == 2 and st.get("variants"):
            parts = [f"{k} {v['steady_images_per_s'] or 0:.0f} img/s" for k, v in st["variants"].items()]
            if "compile_seconds_estimate" in st:
                parts.append(f"compile ~{st['compile_seconds_estimate']} s")
            return ", ".join(parts) + mib(peak)
        if n == 3 and st.get("nproc_per_node"):
            return (f"{st.get('nproc_per_node')} process(es), process group {st.get('process_group_backend')}, steps {st.get('steps_per_epoch')} vs {st.get('steps_one_process')}"
                    f" one process, eval {'ok' if (st.get('eval') or {}).get('ok') else 'FAILED'}{mib(peak)}")
        if n == 5 and st.get("epochs"):
            ev = st.get("eval") or {}
            return (f"val AP50 {st['epochs'][-1]['val_ap50']}, {st.get('photos_per_s') or 0:.1f} photos/s, eval "
                    f"{ev.get('seconds_per_image', '-')} s/photo{mib(peak)}")
        if n in (6, 7) and st.get("checks"):
            bad = [c for c, ok in st["checks"].items() if not ok]
            return f"{len(st['checks']) - len(bad)}/{len(st['checks'])} evals ok" + (f"; failed: {', '.join(bad)}"
                                                                                     if bad else "")
        bad = next((x for x in runs if x["status"] != "ok"), None)
        if bad:
            tail = [l for l in (bad.get("stderr_tail") or bad.get("reason") or "").splitlines() if l.strip()]
            return f"{bad['name']}: {bad['status']}" + (f": {tail[-1][:100]}" if tail else "")
        return st.get("reason", "")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="gpu_check.json", help="the JSON report (rewritten atomically after every command)")
    p.add_argument("--minutes", type=float, default=8.0, help="the whole check ends within this")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the tiny dry run")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (automatic with --device cpu)")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "gpu_check"),
                   help="prepared data and runs, outside the repository (reused by a rerun with the same sizes)")
    p.add_argument("--datasets", default=str(DATASETS), help="folder with cifar10/ and faces/")
    p.add_argument("--nproc", type=int, default=0, help="processes of the torchrun step (0: one per visible GPU)")
    args = p.parse_args()
    check = Check(args)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    # Children start with SIGINT at its default (a handler here, never SIG_IGN), so Ctrl-C stops them cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"gpu_check: device {args.device}, sizes {'tiny' if check.tiny else 'full'}, {args.minutes:g} minutes; "
          f"JSON -> {check.out}", flush=True)
    check.save()
    try:
        worker = threading.Thread(target=check.guarded, args=(lambda _: check.run_all(), 0), daemon=True)
        worker.start()
        check.wait([worker])
    except KeyboardInterrupt:
        check.abort()
    finally:
        check.close()
    return 0 if check.result["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Ship and serve: torch vs ONNX Runtime per image for all five scripts, `serve` under load for two of them.

Usage:
    python benchmarks/serve_bench.py [--workdir benchmarks/out/serve] [--seconds 8] [--clients 1,8,32]

It makes its own small models first (their accuracy does not matter here, only their size and speed):
captcha.py on 400 generated captchas, cifar_lenet.py and cifar_resnet.py on 600 images of
../shared/datasets/cifar10, rcnn_faces.py and fast_rcnn_faces.py on 12 photos of ../shared/datasets/faces,
one epoch each, then `export` of each.
1. Inference, in this process: milliseconds per image of the network alone (torch, then the exported model
   in ONNX Runtime) at batch 1 and batch 64, median of repeated runs, and the model files' sizes. The unit is
   an image for captcha.py and the CIFAR scripts, a 32x32 region crop for rcnn_faces.py (eval scores up to
   2,000 per photo), a letterboxed photo with FAST_ROIS proposals for fast_rcnn_faces.py (batch 1 and 8).
2. Load: `serve` of model.pt and of model.onnx of captcha.py and cifar_lenet.py in a subprocess on 127.0.0.1;
   N clients (threads, one connection each) post images back to back for --seconds (at most --max-requests
   each): requests/s, p50 and p99 latency. The same with `--max-batch 1` (one image per forward pass) shows
   what batching brings, and with `--workers 2` what a second server process brings.
Prints a table and writes WORKDIR/serve_bench.json. Clients only ever connect to 127.0.0.1.
"""
import argparse
import contextlib
import http.client
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10"
FACES = ROOT.parent / "shared" / "datasets" / "faces"
FAST_ROIS = 3000   # proposals of one photo at eval: ~2,700 dense windows + up to 300 selective-search regions
SERVED = ("captcha.py", "cifar_lenet.py")


def sh(*args):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(map(str, args))}\n{proc.stderr[-2000:]}")
    return proc.stdout


def load_script(script):
    spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_models(work):
    """Small trained models of both scripts, exported: {script: (data_dir, sample image paths)}."""
    captcha = work / "captcha"
    if not (captcha / "data/model.onnx").exists():
        shutil.rmtree(captcha, ignore_errors=True)
        sh("generate-captcha/generate.py", "--count", 400, "--output", captcha / "images", "--seed", 1)
        sh("captcha.py", "prepare", "--image-dir", captcha / "images", "--data-dir", captcha / "data")
        sh("captcha.py", "train", "--data-dir", captcha / "data", "--epochs", 1, "--epoch-size", 400, "--device", "cpu")
        sh("captcha.py", "export", "--data-dir", captcha / "data")
    models = {"captcha.py": (captcha / "data", sorted((captcha / "images").iterdir())[:64])}
    cifar = work / "cifar"
    if not (cifar / "labels.txt").exists():
        shutil.rmtree(cifar, ignore_errors=True)
        (cifar / "train").mkdir(parents=True)
        for path in sorted((CIFAR / "train").iterdir())[:600]:
            (cifar / "train" / path.name).symlink_to(path)
        shutil.copy(CIFAR / "labels.txt", cifar / "labels.txt")
    for script in ("cifar_lenet.py", "cifar_resnet.py"):
        data = work / Path(script).stem
        if not (data / "model.onnx").exists():
            shutil.rmtree(data, ignore_errors=True)
            sh(script, "prepare", "--image-dir", cifar, "--data-dir", data)
            sh(script, "train", "--data-dir", data, "--epochs", 1, "--device", "cpu")
            sh(script, "export", "--data-dir", data)
        models[script] = (data, sorted((cifar / "train").iterdir())[:64])
    faces = work / "faces.csv"
    if not faces.exists():
        rows = (FACES / "bbox_train.csv").read_text().splitlines()
        names = sorted({r.split(",")[0] for r in rows[1:]})[:12]
        faces.write_text("\n".join([rows[0]] + [r for r in rows[1:] if r.split(",")[0] in names]) + "\n")
    for script in ("rcnn_faces.py", "fast_rcnn_faces.py"):
        data = work / Path(script).stem
        if not (data / "model.onnx").exists():
            shutil.rmtree(data, ignore_errors=True)
            sh(script, "prepare", "--image-dir", FACES / "image_data", "--csv", faces, "--data-dir", data)
            sh(script, "train", "--data-dir", data, "--epochs", 1, "--device", "cpu")
            sh(script, "export", "--data-dir", data)
        models[script] = (data, None)
    return models


def random_inputs(module, info, batch):
    """Inputs of the network for `batch` images (crops, photos) from export's example, random pixels; for the
    Fast R-CNN network, FAST_ROIS random proposals per photo."""
    example = module.export_example(info)[0]
    x = torch.randn(batch, *example[0].shape[1:])
    if len(example) == 1:
        return (x,)
    h, w = x.shape[2:]
    xy = torch.rand(batch * FAST_ROIS, 2) * torch.tensor([w * 0.8, h * 0.8])
    size = 8 + torch.rand(batch * FAST_ROIS, 1) * min(w, h) * 0.4
    index = torch.arange(batch).repeat_interleave(FAST_ROIS)[:, None].float()
    return x, torch.cat([index, xy, xy + size], 1)


def inference_ms(script, data, images, repeats):
    """ms per image of the network alone, torch and ONNX Runtime, batch 1 and 64 (median of `repeats`)."""
    module = load_script(script)
    rows = []
    for name in ("model.pt", "model.onnx"):
        net, info, device = module.load_network(data / name, "cpu")
        pils = [module.load_image(p) for p in images or []]
        for batch in (1, 8 if script == "fast_rcnn_faces.py" else 64):
            if script == "captcha.py":
                x = (module.preprocess(torch.stack([module.to_input(img, tuple(info["image_size"]))
                                                    for img in pils[:batch]])),)
            elif script.startswith("cifar"):
                x = (module.preprocess(torch.stack([module.to_input(img) for img in pils[:batch]]), info["mean"],
                                       info["std"]),)
            else:
                x = random_inputs(module, info, batch)
            times = []
            runs = repeats if batch == 1 else max(3, repeats // 8)
            if script in ("fast_rcnn_faces.py", "cifar_resnet.py"):
                runs = max(3, runs // 10)
            with torch.no_grad():
                net(*x)  # warm-up
                for _ in range(runs):
                    t0 = time.perf_counter()
                    net(*x)
                    times.append(time.perf_counter() - t0)
            rows.append({"script": script, "model": name, "batch": batch,
                         "ms_per_image": round(1000 * statistics.median(times) / batch, 3),
                         "file_mb": round((data / name).stat().st_size / 2**20, 2)})
    return rows


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(script, model, *args):
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / script), "serve", "--model", str(model), "--port", str(port),
                             "--device", "cpu", *map(str, args)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    workers = int(args[list(args).index("--workers") + 1]) if "--workers" in args else 1
    try:
        pids = set()
        for _ in range(600):   # until every server process has answered
            if proc.poll() is not None:
                sys.exit(f"serve failed: {proc.stderr.read()[-2000:]}")
            with contextlib.suppress(OSError):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                response = conn.getresponse()
                if response.status == 200:
                    pids.add(json.loads(response.read())["pid"])
                    if len(pids) == workers:
                        break
            time.sleep(0.1)
        yield port
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def load(port, bodies, clients, seconds, max_requests):
    """`clients` threads post images back to back: (requests/s, p50 ms, p99 ms, errors)."""
    latencies, errors, lock = [], [0], threading.Lock()
    stop = time.perf_counter() + seconds

    def client(k):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for i in range(max_requests):
            if time.perf_counter() > stop:
                break
            body = bodies[(k * 7 + i) % len(bodies)]
            t0 = time.perf_counter()
            conn.request("POST", "/predict", body, {"Content-Type": "application/octet-stream"})
            response = conn.getresponse()
            response.read()
            with lock:
                latencies.append(time.perf_counter() - t0)
                errors[0] += response.status != 200
        conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    pick = lambda q: round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1)
    return round(len(latencies) / wall, 1), pick(0.5), pick(0.99), errors[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks/out/serve")
    parser.add_argument("--seconds", type=float, default=8, help="load per setting")
    parser.add_argument("--max-requests", type=int, default=2000, help="per client and setting")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=200, help="timed runs of batch 1 (batch 64: 1/8 of them)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    clients = [int(c) for c in args.clients.split(",")]
    models = make_models(args.workdir)
    result = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
              "flags": sorted({f for f in open("/proc/cpuinfo").read().split() if f.startswith(("avx", "amx"))})
              if Path("/proc/cpuinfo").exists() else [], "inference": [], "serve": []}
    for script, (data, images) in models.items():
        result["inference"] += inference_ms(script, data, images, args.repeats)
    print(f"{'script':<20}{'model':<12}{'batch':>6}{'ms/image':>10}{'file MB':>9}")
    for r in result["inference"]:
        print(f"{r['script']:<20}{r['model']:<12}{r['batch']:>6}{r['ms_per_image']:>10.3f}{r['file_mb']:>9.2f}")
    print(f"\n{'script':<16}{'model':<12}{'options':<14}{'clients':>8}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'errors':>7}")
    for script, (data, images) in models.items():
        if script not in SERVED:
            continue
        bodies = [p.read_bytes() for p in images]
        for name in ("model.pt", "model.onnx"):
            for options in ([], ["--max-batch", "1"], ["--workers", "2"]):
                with server(script, data / name, *options) as port:
                    load(port, bodies, 4, 1, 20)   # warm-up
                    for c in clients if not options else clients[-2:] if "--workers" in options else clients[-1:]:
                        rps, p50, p99, errors = load(port, bodies, c, args.seconds, args.max_requests)
                        row = {"script": script, "model": name, "options": " ".join(options), "clients": c,
                               "requests_per_s": rps, "p50_ms": p50, "p99_ms": p99, "errors": errors}
                        result["serve"].append(row)
                        print(f"{script:<16}{name:<12}{row['options']:<14}{c:>8}{rps:>8.1f}{p50:>8.1f}{p99:>8.1f}"
                              f"{errors:>7}", flush=True)
    (args.workdir / "serve_bench.json").write_text(json.dumps(result, indent=1))
    print(f"\n{args.workdir / 'serve_bench.json'}; CPU flags: {' '.join(result['flags'])}")


if __name__ == "__main__":
    main()

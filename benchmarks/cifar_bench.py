"""Training speed and accuracy of cifar_lenet.py and cifar_resnet.py versus the tutorial's training loop.

Usage:
    python cifar_lenet.py prepare --image-dir cifar --data-dir data/cifar_lenet     # once
    python benchmarks/cifar_bench.py --data-dir data/cifar_lenet [--nets lenet,resnet] [--images 4000]
        [--speed-epochs 2] [--acc-epochs 0] [--val-images 1000] [--threads N] [--device auto]

Speed: images/s of one training epoch over the first --images training images, per network:
  tutorial  the tutorial's loop: float32 C,W,H batches of 1000 images re-read from gz files every epoch,
            mini-batches of 100, Adam 1e-3, default memory format, no augmentation;
  script    the script's own train_one_epoch: the uint8 split in memory (on the device), random crop + flip
            on whole batches, its batch size, optimizer and memory format.
  The two run alternately on chunks of --chunk images (tutorial, script, tutorial, script, ...; the tutorial's
  files then hold --chunk images when that is under 1000), so a busy shared machine hurts both alike.
  Also printed: the one-time cost of loading the whole prepared data, as a share of one full epoch.
Accuracy: --acc-epochs N trains each network N epochs on the first --images training images, with the
  script's recipe (one-cycle schedule over N epochs) and with the tutorial's recipe, and prints the
  validation top-1 of both after every epoch (first --val-images images of the validation split).
Time to accuracy: --time-to runs the real command `cifar_resnet.py train --epochs N` (default recipe; --epochs,
  default 5; --train-arg passes more train options) on a copy of the prepared data in --workdir (all of it
  unless --images/--val-images are given) and prints the validation top-1 after every epoch with the minutes
  since the start, then a table and the first epoch at or above --target (default 90%):
      python benchmarks/cifar_bench.py --data-dir data/cifar_resnet --time-to --epochs 5
"""
import argparse
import csv
import gzip
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"lenet": "cifar_lenet.py", "resnet": "cifar_resnet.py"}
TUTORIAL_SHARD, TUTORIAL_BATCH = 1000, 100


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / SCRIPTS[name])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def write_tutorial_shards(images, labels, folder, size=TUTORIAL_SHARD):
    """The tutorial's files: float32 in [0, 1], C,W,H order (its transpose), gzip of torch.save, 1000 a file."""
    for i, start in enumerate(range(0, len(labels), size)):
        x = images[start:start + size].float().div(255).transpose(2, 3).contiguous()
        with gzip.open(folder / f"{i}.pt.gz", "wb") as f:
            torch.save((x, labels[start:start + size].clone()), f)
    return sorted(folder.glob("*.pt.gz"), key=lambda p: int(p.name.split(".")[0]))


def tutorial_epoch(model, optimizer, paths, device):
    """The tutorial's loop over some of its files: each file decompressed again, mini-batches of 100."""
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    for path in paths:
        with gzip.open(path, "rb") as f:
            x, y = torch.load(f, weights_only=True)
        for start in range(0, len(y), TUTORIAL_BATCH):
            out = model(x[start:start + TUTORIAL_BATCH].to(device))
            loss = loss_fn(out, y[start:start + TUTORIAL_BATCH].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    sync(device)


@torch.no_grad()
def tutorial_accuracy(model, images, labels, device):
    model.eval()
    x = images.float().div(255).transpose(2, 3)
    logits = torch.cat([model(x[i:i + 500].to(device)).cpu() for i in range(0, len(labels), 500)])
    return (logits.argmax(1) == labels).float().mean().item()


def script_setup(module, num_classes, steps, device):
    """Model, optimizer, scheduler and loss exactly as the script's train command builds them."""
    model = module.build_model({"num_classes": num_classes}).to(device, memory_format=module.MEMORY_FORMAT)
    recipe = argparse.Namespace(lr=module.LR, weight_decay=module.WEIGHT_DECAY)
    optimizer, scheduler = module.make_optimizer(model, recipe, steps)
    return model, optimizer, scheduler, nn.CrossEntropyLoss(label_smoothing=module.LABEL_SMOOTHING)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def bench_speed(name, module, train, norm, num_classes, args, device, tmp, full_n, load_seconds):
    images, labels = train
    n = len(labels)
    folder = tmp / name
    folder.mkdir()
    chunk = args.chunk if args.chunk < TUTORIAL_SHARD else args.chunk // TUTORIAL_SHARD * TUTORIAL_SHARD
    files = write_tutorial_shards(images, labels, folder, min(chunk, TUTORIAL_SHARD))
    per_chunk = max(1, chunk // TUTORIAL_SHARD)
    starts = range(0, n, chunk)
    torch.manual_seed(args.seed)
    tut_model = module.build_model({"num_classes": num_classes}).to(device, memory_format=torch.contiguous_format)
    tut_opt = torch.optim.Adam(tut_model.parameters(), lr=1e-3)
    steps = args.speed_epochs * sum(math.ceil(min(chunk, n - s) / module.BATCH_SIZE) for s in starts)
    model, optimizer, scheduler, loss_fn = script_setup(module, num_classes, steps, device)
    data = (images.to(device), labels.to(device))
    tut_times, our_times = [], []
    for epoch in range(1, args.speed_epochs + 1):
        tut_times.append(0.0)
        our_times.append(0.0)
        for i, start in enumerate(starts):
            part = tuple(t[start:start + chunk] for t in data)
            tut_times[-1] += timed(lambda: tutorial_epoch(tut_model, tut_opt, files[i * per_chunk:(i + 1) * per_chunk],
                                                          device), device)
            our_times[-1] += timed(lambda: script_epoch(module, model, part, norm, optimizer, scheduler, loss_fn,
                                                        device, name), device)
        print(f"{name} speed epoch {epoch}: tutorial {n / tut_times[-1]:.0f} img/s ({tut_times[-1]:.1f}s)  "
              f"script {n / our_times[-1]:.0f} img/s ({our_times[-1]:.1f}s)  "
              f"ratio {tut_times[-1] / our_times[-1]:.2f}x", flush=True)
    tut, ours = n * len(tut_times) / sum(tut_times), n * len(our_times) / sum(our_times)
    print(f"{name} SPEED over {args.speed_epochs} epochs of {n} images: tutorial {tut:.0f} img/s, "
          f"script {ours:.0f} img/s, ratio {ours / tut:.2f}x; one full epoch of {full_n} images: "
          f"tutorial ~{full_n / tut:.0f}s, script ~{full_n / ours:.0f}s; loading the whole prepared data once "
          f"({load_seconds:.1f}s) = {100 * load_seconds / (full_n / ours):.1f}% of a script epoch", flush=True)


def script_epoch(module, model, data, norm, optimizer, scheduler, loss_fn, device, name):
    """One epoch of the script's own training loop (one process, its default precision)."""
    batches = list(torch.randperm(len(data[1]), device=device).split(module.BATCH_SIZE))
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    return module.train_one_epoch(model, data, norm, optimizer, scheduler, scaler, loss_fn, batches,
                                  module.amp_dtype(device), name)


def bench_accuracy(name, module, train, val, norm, num_classes, args, device, tmp):
    images, labels = train
    torch.manual_seed(args.seed)
    steps = args.acc_epochs * math.ceil(len(labels) / module.BATCH_SIZE)
    model, optimizer, scheduler, loss_fn = script_setup(module, num_classes, steps, device)
    torch.manual_seed(args.seed)
    tut_model = module.build_model({"num_classes": num_classes}).to(device, memory_format=torch.contiguous_format)
    tut_opt = torch.optim.Adam(tut_model.parameters(), lr=1e-3)
    folder = tmp / f"{name}_acc"
    folder.mkdir()
    files = [] if args.no_tutorial_acc else write_tutorial_shards(images, labels, folder)
    data, val_dev = (images.to(device), labels.to(device)), (val[0].to(device), val[1].to(device))
    for epoch in range(1, args.acc_epochs + 1):
        seconds = timed(lambda: script_epoch(module, model, data, norm, optimizer, scheduler, loss_fn, device, name),
                        device)
        ours = module.evaluate(model, val_dev, norm, loss_fn, 500, module.amp_dtype(device))[1]
        line = f"{name} ACC epoch {epoch}/{args.acc_epochs}: val top-1 script {ours:.2%} ({seconds:.0f}s)"
        if not args.no_tutorial_acc:
            tut_seconds = timed(lambda: tutorial_epoch(tut_model, tut_opt, files, device), device)
            line += f"  tutorial {tutorial_accuracy(tut_model, *val, device):.2%} ({tut_seconds:.0f}s)"
        print(line, flush=True)


def time_to_data(args, module, work):
    """The prepared data for --time-to in work/data: links to all of it, or the first --images training and
    --val-images validation (and as many test) images written with the script's own write_split."""
    src, data = Path(args.data_dir), work / "data"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    if not (src / "meta.json").exists():
        sys.exit(f"error: {src}/meta.json not found; run `python cifar_resnet.py prepare --data-dir {src}` first")
    if not args.images and not args.val_images:
        for path in src.iterdir():
            if path.name == "meta.json" or path.name.endswith(".pt.gz"):
                (data / path.name).symlink_to(path.resolve())
        return data
    meta = json.loads((src / "meta.json").read_text())
    limits = {"training_set": args.images, "validating_set": args.val_images, "testing_set": args.val_images}
    for name, limit in limits.items():
        tensors = module.read_split(src, name)
        tensors = tuple(t[:limit or len(t)] for t in tensors)
        module.write_split(data, name, tensors)
        meta.setdefault("counts", {})[name] = len(tensors[1])
    (data / "meta.json").write_text(json.dumps(meta, indent=1))
    return data


def time_to(args):
    """cifar_resnet.py train --epochs N, default recipe: validation top-1 after every epoch and the minutes."""
    work = Path(args.workdir)
    data = time_to_data(args, load_script("resnet"), work)
    cmd = [sys.executable, str(ROOT / SCRIPTS["resnet"]), "train", "--data-dir", str(data), "--epochs",
           str(args.epochs), "--device", args.device, "--seed", str(args.seed), *args.train_arg]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    print("$", " ".join(cmd).replace(f"{ROOT}/", "").replace(sys.executable, "python"), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    minutes = {}
    for line in proc.stdout:
        m = re.match(r"epoch (\d+)/\d+ .* val loss \S+ acc ([\d.]+)%", line)
        if m:
            minutes[int(m.group(1))] = (time.perf_counter() - t0) / 60
            print(f"TIME-TO epoch {m.group(1)}/{args.epochs}: val top-1 {float(m.group(2)):.2f}%  "
                  f"{minutes[int(m.group(1))]:.1f} min since start", flush=True)
        elif line.startswith(("test (", "best model", "cifar_resnet:")):
            print(line.rstrip(), flush=True)
    if proc.wait():
        sys.exit(f"error: train exited with status {proc.returncode}")
    with open(data / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    print(f"\n{'epoch':>5}  {'val top-1':>9}  {'train s':>8}  {'img/s':>7}  {'minutes':>7}")
    for row in rows:
        e = int(row["epoch"])
        print(f"{e:>5}  {float(row['val_acc']):>9.2%}  {float(row['seconds']):>8.0f}  "
              f"{float(row.get('img_per_s') or 0):>7.0f}  {minutes.get(e, float('nan')):>7.1f}")
    hit = next((row for row in rows if float(row["val_acc"]) >= args.target), None)
    total = (time.perf_counter() - t0) / 60
    print(f"TIME-TO {args.target:.0%}: " + (f"epoch {hit['epoch']}, {minutes.get(int(hit['epoch']), total):.1f} min"
                                              if hit else f"not reached in {len(rows)} epochs") +
          f" ({len(rows)} epochs, {total:.1f} min in all, --device {args.device}"
          f"{f', OMP_NUM_THREADS={args.threads}' if args.threads else ''})")
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", default="data/cifar_lenet", help="data prepared by either CIFAR script")
    parser.add_argument("--nets", default="lenet,resnet", help="comma-separated: lenet, resnet")
    parser.add_argument("--images", type=int, default=None,
                        help="training images per epoch (0: all; default 4000, with --time-to all)")
    parser.add_argument("--val-images", type=int, default=None,
                        help="validation images for accuracy (0: all; default 1000, with --time-to all)")
    parser.add_argument("--speed-epochs", type=int, default=2, help="timed epochs of each loop (0: skip)")
    parser.add_argument("--chunk", type=int, default=2000, help="images per alternation of the two timed loops")
    parser.add_argument("--acc-epochs", type=int, default=0, help="epochs of the accuracy comparison (0: skip)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-tutorial-acc", action="store_true", help="accuracy of the script's recipe only")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast on the CPU (scripts' CPU_BF16 off)")
    parser.add_argument("--time-to", action="store_true",
                        help="run `cifar_resnet.py train --epochs N` (default recipe) and print the validation top-1 "
                             "after every epoch with the minutes since the start")
    parser.add_argument("--epochs", type=int, default=5, help="with --time-to: train --epochs")
    parser.add_argument("--target", type=float, default=0.90, help="with --time-to: report the first epoch at this")
    parser.add_argument("--train-arg", action="append", default=[], metavar="ARG",
                        help="with --time-to: one more train argument, e.g. --train-arg=--lr=0.4 (repeatable)")
    parser.add_argument("--workdir", default=str(ROOT / "benchmarks" / "out" / "time-to"),
                        help="with --time-to: the run's copy of the data, model and history")
    args = parser.parse_args()
    if args.time_to:
        return time_to(args)
    args.images = 4000 if args.images is None else args.images
    args.val_images = 1000 if args.val_images is None else args.val_images
    if args.threads:
        torch.set_num_threads(args.threads)
    modules = {name: load_script(name) for name in args.nets.split(",")}
    for module in modules.values():
        module.CPU_BF16 = module.CPU_BF16 and not args.fp32
    first = next(iter(modules.values()))
    device = first.pick_device(args.device)
    meta = first.read_meta(args.data_dir)
    t0 = time.perf_counter()
    full_train = first.read_split(args.data_dir, "training_set")
    val = first.read_split(args.data_dir, "validating_set")
    load_seconds = time.perf_counter() - t0
    limit = args.images or len(full_train[1])
    train = tuple(t[:limit] for t in full_train)
    val = tuple(t[:args.val_images or len(val[1])] for t in val)
    norm, num_classes = (meta["mean"], meta["std"]), len(meta["labels"])
    print(f"{torch.__version__}, {device}, {torch.get_num_threads()} threads, "
          f"CPU bf16 {'/'.join(f'{k} {m.CPU_BF16}' for k, m in modules.items())}; {len(train[1])} training "
          f"images per epoch (of {len(full_train[1])}), {len(val[1])} validation images", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, module in modules.items():
            if args.speed_epochs:
                bench_speed(name, module, train, norm, num_classes, args, device, Path(tmp), len(full_train[1]),
                            load_seconds)
            if args.acc_epochs:
                bench_accuracy(name, module, train, val, norm, num_classes, args, device, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())

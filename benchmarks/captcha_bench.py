"""Captcha benchmark: held-out accuracy within a wall-time budget, and training speed vs the tutorial loop.

    python benchmarks/captcha_bench.py                       # 20,000 train + 2,000 held-out, 60 minutes
    python benchmarks/captcha_bench.py --train-count 3000 --minutes 5 --epochs 10   # a quick look
    python benchmarks/captcha_bench.py --train-count 1000 --style "--size 200x50 --palette dark --length 5-6"
                                                             # few labels of another style
    python benchmarks/captcha_bench.py --train-count 1000 --generator benchmarks/plain_captchas.py --epochs 60
                                                             # few labels of a plain real-site kind (CODE.png)

Steps, all through the real commands: generate the training captchas (seed 0) and held-out captchas
(another seed), `captcha.py prepare`, `captcha.py train` (stopped with Ctrl-C at the time budget, so the
best model so far is what counts), `captcha.py eval --json` on the held-out folder. Then, in the same
run, the tutorial's training loop (ResNet-18 at 24x56, float32, BCE, Adam, batches of 100) for a few
batches, to give the images/s ratio on this machine. Prints one summary block at the end.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

ROOT = Path(__file__).resolve().parents[1]


def sh(*args, **kwargs):
    print("$", " ".join(map(str, args)), flush=True)
    return subprocess.run([sys.executable, *map(str, args)], check=True, cwd=ROOT, **kwargs)


def train_with_budget(data, epochs, minutes, extra):
    """Run train; at the budget send Ctrl-C (the best model so far stays). Returns seconds."""
    cmd = [sys.executable, "captcha.py", "train", "--data-dir", str(data), "--epochs", str(epochs), *extra]
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    # SIGINT back to its default in the child: a background job's children start with it ignored
    proc = subprocess.Popen(cmd, cwd=ROOT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        proc.wait(timeout=minutes * 60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        proc.wait()
        print(f"stopped at the {minutes}-minute budget", flush=True)
    return time.perf_counter() - start


def tutorial_images_per_s(n_batches, n_classes=36, length=4):
    """The tutorial's loop on random data of its shape: ResNet-18 (3x3 stem, no max-pool) at 24x56."""
    model = torchvision.models.resnet18(num_classes=n_classes * length)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    x = torch.rand(100, 3, 24, 56)
    y = torch.zeros(100, n_classes * length)
    y[:, ::n_classes] = 1
    model.train()
    for i in range(n_batches + 1):
        if i == 1:  # first batch is warm-up
            start = time.perf_counter()
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    return 100 * n_batches / (time.perf_counter() - start)


def ours_images_per_s(n_batches, batch_size=128):
    """captcha.py's training step (augmentation included) on random data, measured like the tutorial's."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("captcha", ROOT / "captcha.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    device = torch.device("cpu")
    model = mod.build_model({"n_classes": 37, "length": 4, "image_size": [40, 96]}).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    x = torch.randint(0, 256, (batch_size * (n_batches + 1), 3, 40, 96), dtype=torch.uint8)
    y = torch.randint(0, 36, (len(x), 4))
    gen = torch.Generator().manual_seed(0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batches = list(torch.arange(len(x)).split(batch_size))
    mod.run_epoch(model, x, y, device, batches[:1], None, optimizer, scheduler, scaler, gen)  # warm-up
    start = time.perf_counter()
    mod.run_epoch(model, x, y, device, batches[1:], None, optimizer, scheduler, scaler, gen)
    return batch_size * n_batches / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train-count", type=int, default=20000)
    p.add_argument("--heldout-count", type=int, default=2000)
    p.add_argument("--minutes", type=float, default=60, help="wall-time budget for training")
    p.add_argument("--epochs", type=int, default=40, help="train --epochs (length of the lr schedule)")
    p.add_argument("--workdir", default=str(ROOT / "benchmarks" / "out" / "captcha"))
    p.add_argument("--tutorial-batches", type=int, default=10)
    p.add_argument("--reuse", action="store_true", help="reuse generated captchas and prepared data found in --workdir")
    p.add_argument("--generator", default="generate-captcha/generate.py",
                   help="script that writes the captchas (--count, --output, --seed, --clean)")
    p.add_argument("--style", default="", help="generator options for training and held-out captchas alike")
    p.add_argument("--prepare-args", default="", help="extra options of captcha.py prepare")
    args, extra = p.parse_known_args()
    work = Path(args.workdir)
    train_dir, heldout_dir, data = work / "train", work / "heldout", work / "data"
    for folder, count, seed in ((train_dir, args.train_count, 0), (heldout_dir, args.heldout_count, 12345)):
        if not (args.reuse and folder.is_dir() and len(list(folder.glob("*.png"))) == count):
            sh(args.generator, "--count", count, "--output", folder, "--seed", seed, "--clean",
               *args.style.split())
    if not (args.reuse and (data / "meta.json").exists()):
        sh("captcha.py", "prepare", "--image-dir", train_dir, "--data-dir", data, *args.prepare_args.split())
    for name in ("model.pt", "checkpoint.pt"):
        (data / name).unlink(missing_ok=True)
    seconds = train_with_budget(data, args.epochs, args.minutes, extra)
    out = subprocess.run([sys.executable, "captcha.py", "eval", "--json", "--data-dir", str(data), str(heldout_dir)],
                         cwd=ROOT, capture_output=True, text=True)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    case_sensitive = "--case-sensitive" in args.prepare_args
    truth = [Path(r["image"]).stem.split("-")[-1] for r in rows]
    truth = truth if case_sensitive else [t.lower() for t in truth]
    exact = sum(r.get("code") == t for r, t in zip(rows, truth)) / len(rows)
    chars = sum(a == b for r, t in zip(rows, truth) for a, b in zip(r.get("code", ""), t)) / sum(map(len, truth))
    confident = [r.get("code") == t for r, t in zip(rows, truth) if r.get("confidence", 0) >= 0.9]
    history = (data / "history.csv").read_text().splitlines()
    header = history[0].split(",")
    last = dict(zip(header, history[-1].split(",")))
    ours = sum(float(dict(zip(header, row.split(",")))["images_per_s"]) for row in history[1:]) / (len(history) - 1)
    if args.tutorial_batches:   # 0: no speed comparison
        tutorial = tutorial_images_per_s(args.tutorial_batches)
        ours_now = ours_images_per_s(args.tutorial_batches)
    print("\n==== captcha benchmark ====")
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    meta = json.loads((data / "meta.json").read_text())
    print(f"training: {args.train_count} generated captchas {args.style!r} ({meta['counts']['training_set']} in the "
          f"train split), {len(history) - 1} epochs in {seconds / 60:.1f} min (budget {args.minutes} min, "
          f"schedule {args.epochs} epochs)")
    print(f"last epoch: val exact-match {float(last['val_acc']):.2%}")
    print(f"held-out ({len(rows)} captchas, seed 12345): exact-match {exact:.2%}, per-character {chars:.2%}; "
          f"{len(confident)} with confidence >= 0.9, {sum(confident) / max(len(confident), 1):.2%} of them right")
    print(f"accuracy per training minute: {exact / (seconds / 60):.4f}")
    print(f"training images/s during the run: {ours:.0f}")
    if args.tutorial_batches:
        print(f"training images/s, measured back to back: captcha.py {ours_now:.0f}, tutorial loop {tutorial:.0f} "
              f"(x{ours_now / tutorial:.1f})")


if __name__ == "__main__":
    main()

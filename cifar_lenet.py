"""CIFAR-10 style image classifier: the tutorial's LeNet (two 5x5 convolutions, 120-60-N classifier), better recipe.

Usage: python cifar_lenet.py COMMAND [options] (COMMAND --help: all of them):
    prepare [--image-dir cifar/] [--test-dir DIR] [--labels FILE] [--workers N]
    train   [--epochs N] [--batch-size N] [--lr X] [--device auto] [--resume]
    eval    [IMAGE_OR_FOLDER ...] [--json] [--model PATH]
    export  [--model PATH] [--output model.onnx]   # for ONNX Runtime
    serve   [--model model.pt|model.onnx] [--port 8000]   # HTTP: POST /predict, a page at /
    train under `torchrun --standalone --nproc_per_node=N`: DDP over N processes or GPUs (README.md)

Data layout (auto-detected by prepare; --labels FILE overrides the label list):
    DIR/labels.txt and DIR/**/N_label.ext     the tutorial's CIFAR archive (cifar/train/2598_cat.png)
    DIR/<label>/*.ext                        one folder per class (torchvision ImageFolder), labels sorted
Images of any size and mode (png, jpg, jpeg, bmp, gif, webp) become RGB 32x32, stored as uint8 C,H,W in
gzipped shards. cifar_lenet.py and cifar_resnet.py write the same format ("kind": "cifar").

Result: 72.6% top-1 / 93.5% top-3 on a held-out 10% (5,000) of the CIFAR-10 training images with the
defaults (30 epochs, ~29 s each on a shared 2-core CPU, 1 thread); the tutorial's recipe: 59.4% on the test set.
"""
import argparse
import asyncio
import contextlib
import csv
import ctypes
import datetime
import errno
import gzip
import hashlib
import html
import importlib
import io
import ipaddress
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import unicodedata
import urllib.parse
import warnings
import zipfile
from collections import Counter, OrderedDict
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import cache
from pathlib import Path

try:
    import fcntl  # DATA_DIR lock (lock_data_dir); not on Windows
except ImportError:
    fcntl = None


def quit_starting(message, status):
    """Ctrl-C or SIGTERM while torch loads (a second or two): one line, 130 or 143, no traceback (os._exit, not
    SystemExit: raised inside torch's C++, it aborts); a closed stderr must not keep the process alive."""
    with contextlib.suppress(OSError):
        os.write(2, message)
    os._exit(status)


QUIET_START = signal.getsignal(signal.SIGINT) is signal.default_int_handler
QUIET_TERM = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL   # not one a parent set (ignored)
if QUIET_START:
    signal.signal(signal.SIGINT, lambda *_: quit_starting(b"\ninterrupted\n", 130))
if QUIET_TERM:
    signal.signal(signal.SIGTERM, lambda *_: quit_starting(b"\nterminated\n", 143))
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

if QUIET_START:   # from here on: main() reports them
    signal.signal(signal.SIGINT, signal.default_int_handler)
if QUIET_TERM:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

# ---- Config ----
SCRIPT = Path(__file__).stem             # stored in model.pt and checkpoint.pt
DATA_KIND = "cifar"                      # stored in meta.json; cifar_lenet.py and cifar_resnet.py share it
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp"}
SHARD_SIZE = 1000
SPLITS = ("training_set", "validating_set", "testing_set")
IMAGE_DIR = "cifar"
IMAGE_SIZE = 32          # prepare's images (side, px); a change: prepare and train again (a model keeps its own)
MIN_IMAGE_SIZE = 16      # the smallest IMAGE_SIZE: LeNet's two 5x5 convolutions and pools need 16 px
MAX_PIXELS = 40_000_000                 # bigger images (decompression bombs) are refused before decoding
SHARD_SPEC = ((torch.uint8, (3, IMAGE_SIZE, IMAGE_SIZE)), (torch.int64, ()))   # images, label indices
META_KEYS = {"labels": list, "mean": lambda v: numbers(v, 3, -1e3, 1e3),   # what train reads from meta.json
             "std": lambda v: numbers(v, 3, 1e-6, 1e3)}
MODEL_KEYS = ("model", "model_args", "labels", "mean", "std")   # what eval reads from model.pt
PAD = 4                                  # random crop: zero padding of 4 pixels, then a 32x32 window
CONFUSION_MAX = 100                      # confusion.png is drawn for at most this many classes
# Recipe. LeNet is small and underfits CIFAR-10, so: AdamW with a one-cycle schedule, light weight decay,
# no label smoothing; crop + flip augmentation and per-channel normalisation do most of the work.
EPOCHS = 30
BATCH_SIZE = 256
LR = 4e-3
WEIGHT_DECAY = 5e-4
LABEL_SMOOTHING = 0.0
MEMORY_FORMAT = torch.channels_last      # faster convolutions with cuDNN (bf16) and oneDNN (CPU)
CPU_BF16 = True          # bf16 autocast on CPUs with native bf16 (AVX512-BF16/AMX): ~2x faster


# ---- Model ----
def build_model(model_args):
    """The tutorial's LeNet: conv5x5 -> pool -> conv5x5 -> pool -> 120 -> 60 -> N, with dropout 0.1; B,3,32,32 in (any
    IMAGE_SIZE from 16 on works)."""
    features = nn.Sequential(nn.Conv2d(3, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),    # B,16,14,14
                             nn.Conv2d(16, 32, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),   # B,32,5,5
                             nn.AdaptiveAvgPool2d(5))   # 5x5 from any IMAGE_SIZE (at 32: as it is, no weights)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 5 * 5, 120), nn.ReLU(inplace=True), nn.Dropout(0.1),
                               nn.Linear(120, 60), nn.ReLU(inplace=True), nn.Dropout(0.1),
                               nn.Linear(60, model_args["num_classes"]))
    return nn.Sequential(OrderedDict(features=features, classifier=classifier)).to(memory_format=MEMORY_FORMAT)


def make_optimizer(model, args, steps):
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, pct_start=0.2,
                                                    total_steps=max(steps, 8))  # tiny runs: no 0-step phase
    return optimizer, scheduler


# ==== Common to the two CIFAR scripts (cifar_lenet.py, cifar_resnet.py): keep identical ====
# What both CIFAR classifiers do alike: all but the network and its recipe (Config, build_model,
# make_optimizer). A fix in one script is copied to the other (tests/test_hostile.py checks).

# ---- Data: images, label lists and labelled files, decoding in processes, channel statistics, splits ----


def read_image(path):
    """Any image file -> uint8 tensor 3,32,32 (the whole picture squeezed to 32x32, as CIFAR itself)."""
    return to_input(load_image(path))


def to_input(img, size=IMAGE_SIZE):
    """PIL image -> uint8 tensor 3,size,size: prepare and eval alike (eval at the size the model was trained at)."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC, reducing_gap=2.0)
    return image_to_tensor(img)


def model_size(info):
    """The side of the images a model was trained on (models of before image_size: 32), check_model having
    checked it."""
    return int(info.get("image_size", 32))


def decode(path):
    """Prepare worker: path -> (uint8 array 3,32,32, None), or (None, reason) for a file that cannot be read."""
    try:
        return read_image(path).numpy(), None
    except UserError as e:  # missing, not an image, damaged, too many pixels: skipped and counted
        return None, str(e)


def preprocess(images, mean, std):
    """uint8 B,3,H,W (on any device) -> normalised float; the one input transform of train and eval."""
    mean = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    x = (images.float() / 255 - mean) / std
    return x.contiguous(memory_format=MEMORY_FORMAT)


def augment(images):
    """Random crop (zero padding of PAD pixels) and random horizontal flip of a whole uint8 batch B,3,H,W, on
    its own device: two gathers (rows, then columns) of a per-image window; a flip reads the columns backwards."""
    b, c, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (PAD, PAD, PAD, PAD))                                        # B,3,H+8,W+8
    rows = torch.randint(0, 2 * PAD + 1, (b, 1), device=dev) + torch.arange(h, device=dev)   # B,H
    cols = torch.randint(0, 2 * PAD + 1, (b, 1), device=dev) + torch.arange(w, device=dev)   # B,W
    cols = torch.where(torch.rand(b, 1, device=dev) < 0.5, cols.flip(1), cols)
    x = padded.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w + 2 * PAD))               # B,3,H,W+8
    return x.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))                            # B,3,H,W


def read_label_list(path):
    labels = [nfc(line.strip()) for line in read_text(path).splitlines() if line.strip()]
    if not labels:
        raise UserError(f"{path}: no labels in it (one label per line)")
    return checked_labels(labels, path)


def checked_labels(labels, source):
    """A label list as read (a labels file, or the class folders' names): none twice (in one Unicode form), none a
    path or holding a control character."""
    twice = [label for label, n in Counter(labels).items() if n > 1]
    if twice:
        raise UserError(f"{source}: the label {twice[0]!r} is listed twice")
    odd = [label for label in labels
           if label in (".", "..") or "/" in label or "\\" in label
           or any(unicodedata.category(c) in ("Cc", "Cs") for c in label)]   # control characters, lone surrogates
    if odd:   # a label names a class folder or ends a file name: never a path
        raise UserError(f"{source}: {odd[0]!r} is not a label (a plain name: no path, no control character)")
    return labels


def find_labels(image_dir, labels_file, test_dir=None):
    """The label list: --labels FILE, else DIR/labels.txt, else the class folder names (sorted; a test folder
    inside DIR is none)."""
    if labels_file:
        if not Path(labels_file).is_file():
            what = "not a file" if Path(labels_file).exists() else "no such file"
            raise UserError(f"--labels {labels_file}: {what}; pass the file of one label per line")
        return read_label_list(labels_file)
    if (image_dir / "labels.txt").exists() and not (image_dir / "labels.txt").is_file():
        raise UserError(f"{image_dir / 'labels.txt'}: not a file; labels.txt holds one label per line")
    if (image_dir / "labels.txt").is_file():
        return read_label_list(image_dir / "labels.txt")
    folders = sorted(nfc(p.name) for p in image_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
                     and not (test_dir and is_within(p, test_dir)))
    if not folders:
        raise UserError(f"{image_dir}: no labels.txt and no class folders; add labels.txt (one label per line), "
                        f"put the images in one folder per class, or pass --labels FILE")
    return checked_labels(folders, f"{image_dir} (its class folders)")


def nfc(name):
    """A label or file name in one Unicode form: a name from macOS holds é as e + a combining accent."""
    return unicodedata.normalize("NFC", name)


def few(names, n=5):
    """A long list of names for one message: the first n, then how many more."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def is_within(path, folder):
    """True if `path` is `folder` or below it, symlinked folders followed (a --test-dir linked into --image-dir)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def label_files(folder, labels, exclude=None):
    """([(path, label index)], [(path, why skipped)]) for the images below `folder` (except below `exclude`).
    When top-level folders are named after two labels or more, a file's label is its folder (ImageFolder layout),
    else the end of its name after a '_' (N_label.ext; the longest label that fits: 00001_pickup_truck.png is a
    pickup_truck, not a truck)."""
    index = {name: i for i, name in enumerate(labels)}   # labels in NFC (read_label_list, find_labels)
    folders = {nfc(p.name) for p in Path(folder).iterdir() if p.is_dir()}
    by_folder = len(folders & set(index)) >= 2   # one: the tutorial's train/ for a label "train"
    kept, skipped, excluded = [], [], {}   # excluded: folder -> below `exclude`, resolved once per folder
    for path in list_images(folder):
        if exclude is not None and path.parent not in excluded:
            excluded[path.parent] = is_within(path.parent, exclude)
        if excluded.get(path.parent):
            continue
        parts = path.relative_to(folder).parts
        if by_folder:
            name = nfc(parts[0]) if len(parts) > 1 else None
        else:
            ends = nfc(path.stem).split("_")
            ends = ["_".join(ends[i:]) for i in range(1, len(ends))]   # after each '_', the longest first
            name = next((end for end in ends if end in index), ends[-1] if ends else None)
        if name is None:
            skipped.append((path, "no label", "not in a class folder" if by_folder else "no _label in its name"))
        elif name not in index:
            skipped.append((path, "unknown label", f"label {name!r} is not in the label list"))
        else:
            kept.append((path, index[name]))
    for path in Path(folder).rglob("*"):   # named like an image, but a folder, a link to nothing or a link loop
        if (path.suffix.lower() in IMAGE_EXTS and not path.is_file() and (exclude is None or not is_within(
                path.parent, exclude)) and not any(part.startswith(".") for part in path.relative_to(folder).parts)):
            skipped.append((path, "not a regular file", "a folder, a pipe, a device or a link to no file"))
    return kept, skipped


def decode_images(kept, workers, desc):
    """Decode the kept files in parallel -> (uint8 N,3,32,32, int64 N, [(path, why skipped)])."""
    paths = [p for p, _ in kept]
    chunk = max(1, min(256, len(paths) // (4 * max(workers, 1))))
    results = parallel_map(decode, paths, workers, desc, "img", chunk)
    good = [i for i, (array, _) in enumerate(results) if array is not None]
    skipped = [(paths[i], "unreadable", why) for i, (array, why) in enumerate(results) if array is None]
    images = torch.from_numpy(np.stack([results[i][0] for i in good])) if good else torch.zeros(
        0, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    return images, torch.tensor([kept[i][1] for i in good], dtype=torch.int64), skipped


def channel_stats(images):
    """Per-channel mean and std (0..1 scale) of uint8 images N,3,H,W, in chunks to bound memory."""
    total, squares = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for chunk in images.split(SHARD_SIZE):
        x = chunk.double() / 255
        total += x.sum((0, 2, 3))
        squares += (x * x).sum((0, 2, 3))
    n = images.numel() / 3
    mean = total / n
    return mean.tolist(), (squares / n - mean ** 2).clamp_min(1e-12).sqrt().tolist()


def split_indices(n, seed, fractions=(0.8, 0.1, 0.1)):
    """Deterministic train/val/test split of range(n): same n and seed -> same split."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_train, n_val = int(n * fractions[0]), int(n * fractions[1])
    return perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]


# ---- Train / evaluate: a model file's entries, one epoch, a whole split, the test report ----


def check_model(path, info):
    """A model file's entries (model.pt, or model.onnx's metadata) checked before the network is built or an image
    read: a hand-edited or damaged entry is a UserError, not a traceback or a NaN in the JSON."""
    labels, args = info.get("labels"), info.get("model_args")
    if not (isinstance(labels, list) and labels and all(isinstance(s, str) for s in labels)
            and all(labels) and len(set(labels)) == len(labels)
            and args == {"num_classes": len(labels)} and numbers(info.get("mean"), 3, -1e3, 1e3)
            and numbers(info.get("std"), 3, 1e-6, 1e3) and numbers([info.get("image_size", 32)], 1, MIN_IMAGE_SIZE, 1024, True)):
        raise UserError(f"{path}: its labels, mean, std, image size or network arguments are malformed; train it again")


def train_one_epoch(model, data, norm, optimizer, scheduler, scaler, loss_fn, batches, dtype, desc):
    """One pass over this process's index `batches` of the training split; returns (loss, top-1, images)."""
    images, labels = data
    model.train()
    device = labels.device
    total_loss, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    n = sum(len(idx) for idx in batches)
    with progress(total=n, desc=desc, unit="img", leave=False) as bar:
        for idx in batches:
            x, y = preprocess(augment(images[idx]), *norm), labels[idx]
            with autocast(device, dtype):
                out = model(x)
                loss = loss_fn(out, y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            total_loss += loss.detach() * len(idx)   # summed on the device: no sync per batch
            correct += (out.argmax(1) == y).sum()
            bar.update(len(idx))
    return total_loss.item() / max(n, 1), correct.item() / max(n, 1), n


@torch.no_grad()
def evaluate(model, data, norm, loss_fn, batch_size, dtype):
    """(loss, top-1, logits N,K) over a whole split, sample-weighted, without augmentation."""
    images, labels = data
    model.eval()
    if not len(labels):
        return 0.0, 0.0, torch.zeros(0, device=labels.device)
    with autocast(labels.device, dtype):
        logits = torch.cat([model(preprocess(images[i:i + batch_size], *norm)).float()
                            for i in range(0, len(labels), batch_size)])
    return loss_fn(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item(), logits


def report_test(data_dir, labels, test_labels, logits):
    """Print test top-1/top-3 (top-3 from 4 classes on: with 3 or fewer it is always 100%) and the per-class table;
    save confusion.png (rows: true class)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(labels)
    top = logits.topk(min(3, k), dim=1).indices
    top1 = (top[:, 0] == test_labels).float().mean().item()
    top3 = (top == test_labels[:, None]).any(1).float().mean().item()
    print(f"test ({len(test_labels)} images): top-1 {under_one(top1, 4):.2%}" +
          (f"  top-3 {under_one(top3, 4):.2%}" if k > 3 else ""))
    count = torch.bincount(test_labels, minlength=k).tolist()
    right = torch.bincount(test_labels[top[:, 0] == test_labels], minlength=k).tolist()
    print(f"{'class':<16}{'images':>8}{'top-1':>9}")
    for name, n, r in zip(labels, count, right):
        print(f"{name:<16}{n:>8}{f'{under_one(r / n, 4):.2%}' if n else '-':>9}")   # '-': no test image of the class
    if k > CONFUSION_MAX:   # k x k cells, each a number drawn: 1,000 classes took 22 GB
        print(f"confusion.png not drawn: {k} classes (at most {CONFUSION_MAX})")
        return top1
    confusion = torch.bincount(test_labels * k + top[:, 0], minlength=k * k).view(k, k)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * k, 1 + 0.5 * k))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(k), labels, rotation=90)
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(confusion.numpy()):
        ax.text(j, i, v, ha="center", va="center", fontsize=7)
    fig.tight_layout()
    with atomic_path(Path(data_dir) / "confusion.png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return top1


# ---- Commands: prepare, train, eval (predict, the export's example), the parser ----


def cmd_prepare(args):
    image_dir = Path(args.image_dir)
    test_dir = Path(args.test_dir) if args.test_dir else None
    if image_dir.is_dir() and not os.access(image_dir, os.R_OK | os.X_OK):   # said, not as a missing test/ folder
        raise UserError(f"--image-dir {image_dir}: cannot read this folder (permission denied)")
    if test_dir is None and (image_dir / "test").is_dir():   # the tutorial's layout: its test images never train
        test_dir = image_dir / "test"
        print(f"test split: {test_dir} (a test folder inside --image-dir; its images are kept out of training)")
    for flag, folder in (("--image-dir", image_dir), ("--test-dir", test_dir)):
        if folder is not None and not folder.is_dir():
            raise UserError(f"{flag} {folder}: no such folder; pass the folder of the images ({flag} DIR)")
        if folder is not None and is_within(Path(args.data_dir), folder):   # its plots would come back as images
            raise UserError(f"--data-dir {args.data_dir} is inside {flag} {folder}; choose a data folder outside it", 2)
    if test_dir and is_within(image_dir, test_dir):
        raise UserError(f"--image-dir {image_dir} is inside --test-dir {test_dir}: nothing would be left to train "
                        "on", 2)
    labels = find_labels(image_dir, args.labels, test_dir)
    sources = {"train": (image_dir, test_dir)} | ({"test": (test_dir, None)} if test_dir else {})
    decoded, skipped, tested = {}, [], set()
    for name, (folder, exclude) in reversed(sources.items()):   # test first: its files never train
        kept, bad = label_files(folder, labels, exclude)
        if name == "test":
            tested = {os.path.realpath(p) for p, _ in kept}
        else:   # one file in both folders (a link, or a link's target): a test image would be trained on
            bad += [(p, "also in --test-dir", "the same file is a test image") for p, _ in kept
                    if tested and os.path.realpath(p) in tested]
            kept = [(p, i) for p, i in kept if not (tested and os.path.realpath(p) in tested)]
        images, targets, unreadable = decode_images(kept, args.workers, f"decode {folder}")
        decoded[name] = (images, targets)
        skipped += bad + unreadable
    print(f"skipped {len(skipped)}" + "".join(f", {v} {k}" for k, v in Counter(s[1] for s in skipped).items()))
    for path, _, why in skipped[:5]:
        print(printable(f"  skipped {path}: {why}"))
    images, targets = decoded["train"]
    found = set(torch.cat([t for _, t in decoded.values()]).unique().tolist())   # classes with an image
    if not args.labels and not (image_dir / "labels.txt").is_file() and len(found) < len(labels):
        train = image_dir / "train"
        if labels == ["train"] and any(p.is_dir() for p in train.iterdir()):   # train/CLASS/ (and test/CLASS/)
            test = image_dir / "test"
            raise UserError(f"{image_dir}: its classes are folders inside train/: pass --image-dir {train}"
                            + (f" --test-dir {test}" if test.is_dir() else ""))
        raise UserError(f"{image_dir}: class folders without images: "
                        f"{few([n for i, n in enumerate(labels) if i not in found])} (a symlinked folder is not "
                        "followed); remove them or fill them")
    if len(found) < 2:
        raise UserError(f"{image_dir}: images of {len(found)} class found; a classifier needs at least 2 (see what "
                        "was skipped above; a symlinked folder is not followed)")
    if len(found) < len(labels):   # a classifier's output never trained, never right
        print(f"warning: no image of {few([repr(n) for i, n in enumerate(labels) if i not in found])} (in the "
              f"label list): the model will never answer it", file=sys.stderr)
    train, val, test = split_indices(len(targets), args.seed, (0.9, 0.1, 0) if test_dir else (0.8, 0.1, 0.1))
    if test_dir:  # rounding leftovers go to training; the test split is the separate folder
        train, test = train + test, None
    splits = {SPLITS[0]: (images[train], targets[train]), SPLITS[1]: (images[val], targets[val]),
              SPLITS[2]: decoded["test"] if test_dir else (images[test], targets[test])}
    counts = {name: len(t) for name, (_, t) in splits.items()}
    print(f"kept {sum(counts.values())} images ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    if min(counts.values()) == 0:
        raise UserError(f"{image_dir}: too few usable images for a train/validation/test split "
                        f"({', '.join(f'{k} {v}' for k, v in counts.items())}); need at least 10 labelled images")
    mean, std = channel_stats(splits[SPLITS[0]][0])
    meta = {"kind": DATA_KIND, "script": SCRIPT, "image_dir": str(image_dir), "test_dir": test_dir and str(test_dir),
            "labels": labels, "image_size": IMAGE_SIZE, "mean": mean, "std": std, "seed": args.seed,
            "counts": counts, "skipped": len(skipped), "skipped_by_reason": Counter(s[1] for s in skipped)}
    save_prepared(args.data_dir, splits, meta)
    return 0


def train(args, device, out_dir, tb_dir):
    """One training run on DATA_DIR's prepared data; model, checkpoint and history go to out_dir."""
    cxx = os.environ.get("CXX", "g++")   # the compiler torch's inductor runs on the CPU ("ccache g++" works too)
    if args.compile and device.type == "cpu" and not shutil.which((shlex.split(cxx) or [""])[0]):
        raise UserError(f"--compile on the CPU needs a C++ compiler: {cxx!r} (CXX, or g++ when unset) is not "
                        "there; install one or leave --compile out", 2)
    data_dir = Path(args.data_dir)
    meta = read_meta(data_dir)
    if meta.get("image_size", IMAGE_SIZE) != IMAGE_SIZE:   # IMAGE_SIZE edited after prepare: the shards say "not ours"
        raise UserError(f"{data_dir}: prepared at {meta['image_size']} px, IMAGE_SIZE is {IMAGE_SIZE}; run "
                        f"`python {SCRIPT}.py prepare --data-dir {shlex.quote(str(data_dir))}` again")
    rank = rank_and_world()[0]
    if main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = resume_path(args, out_dir)   # checked before any work
    seed_everything(args.seed + rank)   # augmentation differs per process; DDP copies rank 0's initial weights
    writer = open_tensorboard(tb_dir) if tb_dir else None
    # The whole split lives on the device as uint8 (a 50k CIFAR split is 150 MB); batches are index slices.
    train_set, val, test = (tuple(t.to(device) for t in read_split(data_dir, name, meta)) for name in SPLITS)
    labels, norm = meta["labels"], (meta["mean"], meta["std"])
    if any(len(y) and (y.min() < 0 or y.max() >= len(labels)) for _, y in (train_set, val, test)):
        raise UserError(f"{data_dir}: the shards hold label numbers beyond the {len(labels)} labels of meta.json; "
                        f"run `python {SCRIPT}.py prepare` again")
    model_args = {"num_classes": len(labels)}
    model = build_model(model_args).to(device)
    steps = args.epochs * math.ceil(len(train_set[1]) / args.batch_size)
    optimizer, scheduler = make_optimizer(model, args, steps)
    dtype = amp_dtype(device, args.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    history, best_score, bad_epochs, start = [], -1.0, 0, 1
    if checkpoint:
        done, history, best_score, bad_epochs = resume_training(checkpoint, model_args, model, optimizer, scaler,
                                                                scheduler, labels, steps // args.epochs)
        start = done + 1
    net = wrap_model(model, device, args.sync_bn)
    step_model = torch.compile(net) if args.compile else net
    eval_model = step_model if net is model else (torch.compile(model) if args.compile else model)
    print(f"{SCRIPT}: {len(train_set[1])} train / {len(val[1])} val / {len(test[1])} test images, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, precision {dtype or torch.float32}")
    if writer:
        writer.add_images("inputs", train_set[0][:32], 0)
    val_shard = tuple(shard(t) for t in val)
    for epoch in range(start, args.epochs + 1):
        if bad_epochs >= args.patience:
            break
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        batches = epoch_batches(len(train_set[1]), args.batch_size, args.seed, epoch, device)
        train_loss, train_acc, n = train_one_epoch(step_model, train_set, norm, optimizer, scheduler, scaler, loss_fn,
                                                   batches, dtype, f"epoch {epoch}")
        train_loss, train_acc = mean_over_processes([train_loss, train_acc], n, device)
        check_loss(epoch, "training", train_loss)
        seconds = time.perf_counter() - t0
        sync_buffers(model)
        val_loss, val_acc, _ = evaluate(eval_model, val_shard, norm, loss_fn, 2 * args.batch_size, dtype)
        val_loss, val_acc = mean_over_processes([val_loss, val_acc], len(val_shard[1]), device)
        check_loss(epoch, "validation", val_loss)
        improved = val_acc > best_score
        best_score, bad_epochs = (val_acc, 0) if improved else (best_score, bad_epochs + 1)
        history.append({"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
                        "val_acc": val_acc, "lr": lr, "steps": len(batches), "seconds": seconds,
                        "img_per_s": len(train_set[1]) / seconds})
        if main_process():   # the epoch is saved before its line is printed
            log_epoch(writer, history[-1], model, args.histogram_every)
            best_model = {"model_args": model_args, "labels": labels, "image_size": IMAGE_SIZE, "mean": norm[0],
                          "std": norm[1], "epoch": epoch, "val_acc": val_acc}
            save_epoch(out_dir, args, model, optimizer, scheduler, scaler,
                       {"epoch": epoch, "history": history, "best_score": best_score, "bad_epochs": bad_epochs,
                        "model_args": model_args, "classes": labels}, best_model if improved else None,
                       ["train_acc", "val_acc"])
        print(f"epoch {epoch}/{args.epochs}  train loss {train_loss:.3f} acc {train_acc:.2%}  "
              f"val loss {val_loss:.3f} acc {val_acc:.2%}  lr {lr:.5f}  {seconds:.1f}s  "
              f"{len(train_set[1]) / seconds:.0f} img/s{'  *' if improved else ''}", flush=True)
    if writer:
        writer.close()
    if bad_epochs >= args.patience:
        print(f"early stop: no better validation accuracy for {bad_epochs} epochs")
    result = {"epochs_run": len(history), "best_val": round(best_score, 6), "test": float("nan"), "metric": "top-1"}
    if not main_process():
        return result
    best = load_model_file(out_dir / "model.pt")
    model.load_state_dict(best["model"])
    print(f"best model: epoch {best['epoch']}, val acc {best['val_acc']:.2%}")
    logits = evaluate(model, test, norm, loss_fn, 2 * args.batch_size, dtype)[2]
    result["test"] = round(report_test(out_dir, labels, test[1].cpu(), logits.cpu()), 6)
    return result


def export_example(info):
    """export: example inputs, input and output names, dynamic axes, and what the input is."""
    size = model_size(info)
    about = f"x: B,3,{size},{size} float, (RGB pixels / 255 - mean) / std with mean {info['mean']} and std " \
            f"{info['std']}; logits: B,classes (softmax: probabilities)"
    return (torch.zeros(2, 3, size, size),), ["x"], ["logits"], ({0: torch.export.Dim("batch")},), about


@torch.no_grad()
def predict(net, info, device, args, images):
    """PIL images -> eval's JSON objects {"top": the 5 likeliest labels with their probabilities}."""
    x = torch.stack([to_input(img, model_size(info)) for img in images]).to(device)
    with autocast(device, amp_dtype(device)):
        probs = finite(net(preprocess(x, info["mean"], info["std"])).float().softmax(1).cpu())
    top = probs.topk(min(5, len(info["labels"])))
    return [{"top": [{"label": info["labels"][i], "probability": round(under_one(p, 6), 6)} for p, i in zip(ps, idx)]}
            for ps, idx in zip(top.values.tolist(), top.indices.tolist())]


def cmd_eval(args):
    net, info, device = load_network(args.model or Path(args.data_dir) / "model.pt", args.device)
    interactive = not args.images and sys.stdin.isatty()
    failed = False
    paths = iter_eval_inputs(args.images)
    if args.images:  # files and folders: a known count, so a progress bar (shown on a terminal only)
        paths = progress(list(paths), unit="img", desc="eval", leave=False)
    for path in paths:
        try:
            img = load_image(path)
        except UserError as e:  # missing, not an image, damaged, too many pixels
            failed = True
            reason = f"cannot read image: {e}"
            if args.json:
                print(json.dumps({"image": path, "error": reason}), flush=True)
            else:
                print(printable(f"{path}: {reason}"), file=sys.stderr)
            continue
        result, = predict(net, info, device, args, [img])
        if args.json:
            print(json.dumps({"image": path, **result}), flush=True)
        else:
            print("\n".join(([] if interactive else [printable(path)]) +
                            [f"{t['label']}: {under_one(t['probability'], 4):.2%}" for t in result["top"]]), flush=True)
    return 1 if failed and not interactive else 0   # the prompt said each failure as it came


def build_parser():
    parser, sub, common, device, seed = base_parser()

    p = sub.add_parser("prepare", parents=[common, seed], help="images -> tensor batches")
    p.add_argument("--image-dir", default=IMAGE_DIR, help="labels.txt + N_label images, or one folder per class; "
                   f"images over {MAX_PIXELS:,} pixels are skipped")
    p.add_argument("--labels", default=None, help="label list file (default: IMAGE_DIR/labels.txt or folder names)")
    p.add_argument("--test-dir", default=None, help="take the test split from this folder (default: IMAGE_DIR/test "
                   "if there is one, as in the tutorial's cifar/test)")
    p.add_argument("--workers", type=worker_count, default=os.cpu_count() or 1, help="parallel decoding processes")
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("train", parents=[common, device, seed], help="train with early stopping")
    p.add_argument("--epochs", type=positive_int, default=EPOCHS,
                   help="maximum epochs (also the length of the lr schedule)")
    p.add_argument("--patience", type=positive_int, default=20,
                   help="stop after N epochs without a better validation score")
    p.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE,
                   help="training mini-batch size (under torchrun: the global batch)")
    p.add_argument("--lr", type=positive_float, default=LR, help="peak learning rate of the one-cycle schedule; over 0")
    p.add_argument("--weight-decay", type=nonneg_float, default=WEIGHT_DECAY, help="optimizer weight decay")
    p.add_argument("--label-smoothing", type=probability, default=LABEL_SMOOTHING, help="of the training loss")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (helps most on CUDA)")
    p.add_argument("--resume", action="store_true", help="continue from DATA_DIR/checkpoint.pt")
    add_scale_options(p)
    p.set_defaults(func=cmd_train, train_parser=p)
    p = sub.add_parser("eval", parents=[common, device], help="predict images")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files or folders; none: read paths from stdin; "
                   f"images over {MAX_PIXELS:,} pixels are refused")
    p.add_argument("--model", default=None, help="model.pt or model.onnx (default: DATA_DIR/model.pt)")
    p.add_argument("--json", action="store_true", help="one JSON object per image on stdout")
    p.set_defaults(func=cmd_eval)
    add_ship_commands(sub, common, [device])
    return parser


# ==== Common to all five scripts: keep identical ====
# Everything below is the same text in captcha.py, cifar_lenet.py, cifar_resnet.py, rcnn_faces.py and
# fast_rcnn_faces.py (tests/test_hostile.py compares them): a fix made here goes into all five.

# ---- Errors, images, shards, atomic files, prepared data ----
class UserError(Exception):
    """A mistake of the user or bad input data: main() prints one line and exits with `status`."""

    def __init__(self, message, status=1):
        super().__init__(message)
        self.status = status


def load_image(path):
    """Open an image file (or the bytes of one) of IMAGE_FORMATS as RGB, the format decided by content, not
    extension; alpha is composited onto white. Every failure is a UserError with a one-line reason: missing, not a
    file, not an image, damaged, or more than MAX_PIXELS pixels (a decompression bomb: a small file that would
    decode to gigabytes), refused from its header before decoding."""
    try:
        if not isinstance(path, bytes) and not os.path.isfile(path):
            raise UserError("no such file" if not os.path.lexists(path) else "not a file" if not os.path.isdir(path)
                            else "a folder that cannot be read" if not os.access(path, os.R_OK | os.X_OK) else
                            f"a folder with no images ({', '.join(sorted(IMAGE_EXTS))})")
        with warnings.catch_warnings():  # PIL's own bomb warning becomes an error here; its others (a damaged EXIF
            warnings.simplefilter("ignore")   # block) are no lines on stderr: the image is read as stored
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path, formats=IMAGE_FORMATS) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise UserError(f"{img.width}x{img.height} pixels, over the limit of {MAX_PIXELS:,} (MAX_PIXELS)")
                img.seek(0)  # first frame of a GIF
                turned = 1   # the EXIF orientation applied, in the image's info (a face CSV's boxes may need it)
                with contextlib.suppress(Exception):   # upright as viewers show it; a damaged EXIF block: as stored
                    orientation = img.getexif().get(0x0112, 1)
                    if orientation != 1:   # an orientation tag: only then a transposed copy
                        img, turned = ImageOps.exif_transpose(img), orientation
                alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info   # or a colour marked
                alpha = img.convert("RGBA").getchannel("A") if alpha else None   # transparent (PNG tRNS, any mode)
                if alpha is not None and img.format in ("BMP", "DIB") and alpha.getextrema() == (0, 0):
                    alpha = None   # a BMP's alpha all 0: a channel left unused, opaque as browsers show it
                if img.mode.startswith("I"):   # 16-bit grey (I;16, or I holding values over 255): 8 bits, not clipped
                    grey = np.asarray(img, dtype=np.float32)
                    grey = np.rint(grey / 257 if img.mode.startswith("I;16") or grey.max() > 255 else grey).clip(0, 255)
                    img = Image.fromarray(grey.astype(np.uint8))
                if alpha is not None:
                    rgba = img.convert("RGBA")
                    rgba.putalpha(alpha)
                    img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
                img = img.convert("RGB")
                img.info["exif_orientation"] = turned
                return img
    except UserError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise UserError(f"over the limit of {MAX_PIXELS:,} pixels (MAX_PIXELS)")
    except UnidentifiedImageError:
        raise UserError("not an image, or not of a format read here (PNG, JPEG, GIF, BMP, WebP)")
    except Exception as e:  # any decoder error of any format: truncated, damaged, unsupported mode, ...
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip() or type(e).__name__
        raise UserError(reason.splitlines()[0][:200])


def image_to_tensor(img):
    """PIL RGB image -> uint8 tensor 3,H,W."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def save_shard(path, tensors):
    """gzip(torch.save(tuple)) written atomically, with no file name or time in the gzip header: the same tensors
    give the same bytes."""
    buf = io.BytesIO()
    torch.save(tuple(tensors), buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(buf.getbuffer(), compresslevel=3, mtime=0))


MAX_UNPACKED = 2 << 30   # a shard or model file may unpack to this, or to 64x its size (a gzip bomb: 200x-1000x)


def unpack_limit(path):
    """The most bytes the shard or model file at path may unpack to: MAX_UNPACKED, or 64 times its size for the
    large prepared data of large images (uint8 images pack 1.5-10x; a bomb of zeros 200-1000x)."""
    return max(MAX_UNPACKED, 64 * os.path.getsize(path))


def load_shard(path):
    """A shard: the tuple of tensors of SHARD_SPEC (dtype, and size after the first dimension with None for any), all
    of one length, loaded with weights_only=True (no pickled code runs). A truncated, damaged or foreign file is a
    UserError naming it."""
    try:
        limit = unpack_limit(path)
        with gzip.open(path, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:   # a gzip bomb: a small file that unpacks to gigabytes
            raise UserError(f"{path}: unpacks to over {limit:,} bytes (unpack_limit); run `python {SCRIPT}.py "
                            "prepare` again")
        tensors = torch.load(io.BytesIO(data), weights_only=True)
    except UserError:
        raise
    except Exception as e:  # EOFError (truncated), BadGzipFile, not a torch file, pickled code, ...
        raise UserError(f"{path}: damaged or not a shard ({type(e).__name__}); run `python {SCRIPT}.py prepare` again")
    fits = isinstance(tensors, tuple) and len(tensors) == len(SHARD_SPEC) and all(
        isinstance(t, torch.Tensor) and t.dtype == dtype and t.dim() == len(shape) + 1 and len(t) == len(tensors[0])
        and all(s is None or s == n for s, n in zip(shape, t.shape[1:]))
        for t, (dtype, shape) in zip(tensors, SHARD_SPEC))
    if not fits:
        raise UserError(f"{path}: not a shard of {SCRIPT}.py's prepared data (or of an older {SCRIPT}.py); run "
                        f"`python {SCRIPT}.py prepare` again")
    return tensors


@contextlib.contextmanager
def atomic_path(path, replace=True):
    """A temporary name next to `path`, unique to this write (NAME.tmp-PID-RANDOM.EXT, NAME cut so that a long name
    still fits the file system's 255 bytes): renamed to `path` when the
    block ends, removed when it fails or is interrupted, so `path` is always either the old file or the whole new
    one, whatever else writes next to it. replace=False: a `path` that exists by then (another process took the
    name) stays as it is and FileExistsError is raised."""
    path = Path(path)
    tag = f".tmp-{os.getpid()}-{secrets.token_hex(4)}"
    suffix = path.suffix if len(os.fsencode(path.suffix)) <= 16 else ""
    stem = os.fsdecode(os.fsencode(path.stem)[:255 - len(os.fsencode(tag + suffix))])   # a name's 255 bytes at most
    tmp = path.with_name(stem + tag + suffix)
    try:
        yield tmp
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)   # fails on an existing name, unlike a rename
            except FileExistsError:
                raise
            except OSError:   # no hard links on this file system (FAT, some shares): a last look, then the rename
                if os.path.lexists(path):
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(folder):
    """The temporary files (atomic_path's NAME.tmp-PID-RANDOM.EXT) that writes killed with their process left in
    `folder` (SIGKILL, a power cut: nothing removed them; a checkpoint's is as large as it) are removed; those of a
    process still running stay. POSIX only (lock_data_dir calls it): os.kill(pid, 0) ends a process on Windows."""
    for path in Path(folder).glob("*.tmp-*-*"):
        pid, _, token = path.name.rpartition(".tmp-")[2].partition("-")
        token = token.partition(".")[0]
        if not (pid.isascii() and pid.isdigit() and len(token) == 8 and not token.strip("0123456789abcdef")):
            continue   # not a name atomic_path makes
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:   # no such process
            with contextlib.suppress(OSError):
                if path.is_file() and not path.is_symlink():
                    path.unlink()
        except (OSError, OverflowError):   # alive (another user's), or not a pid
            pass


def restore_held_model(folder):
    """A train killed between its new model.pt and the checkpoint that names it (SIGKILL) left the best model before
    as save_epoch's held copy: it goes back in place where model.pt is not the best model of checkpoint.pt (the
    checkpoint's epoch minus its epochs without a better one) and the copy is, and is removed where model.pt is.
    lock_data_dir calls it, the lock held: no train that made a copy still runs (whatever process its pid names now).
    A file of another name, or one that is neither, stays."""
    folder = Path(folder)
    for held in folder.glob("model.held-*-*.pt"):
        pid, _, token = held.name.removeprefix("model.held-").removesuffix(".pt").partition("-")
        if not (pid.isascii() and pid.isdigit() and len(token) == 8 and not token.strip("0123456789abcdef")):
            continue   # not a name held_copy makes
        try:
            state = load_model_file(folder / "checkpoint.pt", CHECKPOINT_KEYS)
            best = state["epoch"] - state["bad_epochs"]
            current = load_model_file(folder / "model.pt").get("epoch") if (folder / "model.pt").exists() else None
        except (UserError, OSError, TypeError):   # nothing to decide with: the copy stays
            continue
        if current == best:
            held.unlink()   # damaged too (a copy cut short): model.pt is the one
            continue
        try:
            copy = load_model_file(held).get("epoch")
        except (UserError, OSError, TypeError):
            continue
        if copy == best:   # a model.onnx exported from the model.pt replaced goes aside first, as save_model does
            keep_previous(folder, None, ("model.onnx",))
            os.replace(held, folder / "model.pt")
            print(f"{folder}: a train was killed while it saved an epoch; model.pt is its checkpoint's best model "
                  f"again (epoch {best})", file=sys.stderr)


def restore_history(folder):
    """A train killed between checkpoint.pt and its history (SIGKILL) left history.csv and .png an epoch behind, or
    none (older than the checkpoint, which is written first): both written again from the checkpoint's history.
    lock_data_dir calls it; a checkpoint of before plot_keys is left as it is."""
    checkpoint, table = Path(folder) / "checkpoint.pt", Path(folder) / "history.csv"
    try:
        if not checkpoint.is_file() or table.exists() and table.stat().st_mtime_ns >= checkpoint.stat().st_mtime_ns:
            return
        state = load_model_file(checkpoint, CHECKPOINT_KEYS)
        if isinstance(state.get("plot_keys"), list) and isinstance(state["history"], list) and state["history"]:
            save_history(folder, state["history"], state["plot_keys"])
    except (UserError, OSError, TypeError, ValueError):   # nothing to write it from: left as it is
        pass


def atomic_torch_save(obj, path):
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:   # torch's zip writer says a full disk as "[enforce fail ...] unexpected pos"
            raise OSError(f"{path}: cannot write it (a full disk? {str(e).splitlines()[0][:80]})") from None


def atomic_write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def list_images(folder, unreadable=None):
    """Image files below `folder` (recursive; links to folders not followed), sorted, by extension; hidden files and
    folders (.ipynb_checkpoints, .Trash) left out. A folder that cannot be read is a UserError: its images would be
    left out unsaid (Path.rglob passes over it in silence); given a list `unreadable`, its OSError goes there."""
    images, errors = [], [] if unreadable is None else unreadable
    for root, folders, files in os.walk(folder, onerror=errors.append):
        folders[:] = [name for name in folders if not name.startswith(".")]
        images += [path for path in (Path(root, name) for name in files if not name.startswith("."))
                   if path.suffix.lower() in IMAGE_EXTS and path.is_file()]
    if errors and unreadable is None:
        raise UserError(f"{errors[0].filename}: cannot read this folder ({errors[0].strerror}); make it "
                        f"readable, or move it out of {folder}")
    return sorted(images, key=Path.as_posix)   # Windows compares paths without case: the same split everywhere


def write_split(data_dir, name, tensors):
    """Write one split as shards `name.N.pt.gz`, N = 0.. (the last one may be short)."""
    n = len(tensors[0])
    for i, start in enumerate(range(0, max(n, 1), SHARD_SIZE)):  # an empty split still gets one (empty) shard
        # clone: torch.save of a slice writes its whole storage
        save_shard(Path(data_dir) / f"{name}.{i}.pt.gz", [t[start:start + SHARD_SIZE].clone() for t in tensors])


def shard_paths(folder, name):
    """The shards of split `name` in folder, in order: name.N.pt.gz with N a whole number (a user's
    name.0.bak.pt.gz is none of them: prepare leaves it, train does not read it)."""
    paths = [p for p in Path(folder).glob(f"{name}.*.pt.gz")
             if p.name.count(".") == 3 and p.name.split(".")[1].isascii() and p.name.split(".")[1].isdigit()]
    return sorted(paths, key=lambda p: int(p.name.split(".")[1]))


def read_split(data_dir, name, meta=None):
    """Read all shards of a split once and concatenate them (no per-epoch decompression); with meta (meta.json),
    their count must be the one prepare wrote."""
    paths = shard_paths(data_dir, name)
    numbers = [int(p.name.split(".")[1]) for p in paths]
    if numbers and numbers != list(range(len(numbers))):   # a shard deleted or renamed
        missing = min(set(range(len(numbers) + 1)) - set(numbers))
        raise UserError(f"{data_dir}: {name}.{missing}.pt.gz is missing; run `python {SCRIPT}.py prepare` again")
    parts = [load_shard(p) for p in paths]
    if not parts:
        raise UserError(f"{data_dir}: no {name} shards; run `python {SCRIPT}.py prepare` first")
    try:
        split = tuple(torch.cat(ts) for ts in zip(*parts))
    except RuntimeError:  # shards of different sizes: files of two prepares
        raise UserError(f"{data_dir}: {name} shards of different prepares; run `python {SCRIPT}.py prepare` again")
    counts = (meta or {}).get("counts")   # where prepare wrote each split's count (captcha, CIFAR)
    expected = counts.get(name) if isinstance(counts, dict) else None
    if isinstance(expected, int) and expected != len(split[0]):   # a shard left or copied in by hand
        raise UserError(f"{data_dir}: the {name} shards hold {len(split[0])} items, meta.json says {expected}; "
                        f"run `python {SCRIPT}.py prepare` again")
    return split


def read_text(path):
    """A UTF-8 text file (a BOM is allowed) as str; unreadable or not UTF-8 is a UserError naming it."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})")


def read_meta(data_dir):
    """DATA_DIR/meta.json as prepare wrote it: JSON of this kind of data with every key of META_KEYS ("a.b": key b in
    a) of its type (or passing its check). Anything else is a UserError that asks to prepare again."""
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise UserError(f"{path} not found; run `python {SCRIPT}.py prepare --data-dir {shlex.quote(str(data_dir))}` "
                        f"first")
    again = f"run `python {SCRIPT}.py prepare --data-dir {shlex.quote(str(data_dir))}` again"
    try:
        meta = json.loads(read_text(path))
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path}: not valid JSON ({str(e)[:100]}); {again}")
    if not isinstance(meta, dict):
        raise UserError(f"{path}: not a meta.json of this suite; {again}")
    if meta.get("kind") != DATA_KIND:
        other = str(meta.get("script", "another script")).removesuffix(".py")
        raise UserError(f"{data_dir} holds data prepared by {other}.py, not {SCRIPT}.py; use another --data-dir")
    for key, kind in META_KEYS.items():
        value = meta
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not (isinstance(value, kind) if isinstance(kind, type) else kind(value)):
            what = f"not a {kind.__name__}" if isinstance(kind, type) else "malformed"
            raise UserError(f"{path}: {key!r} is missing or {what}; {again}")
    return meta


def refuse_other_data(data_dir):
    """prepare into a DATA_DIR that holds another script's prepared data would replace that data: refused before any
    work. So is a meta.json that no script of the suite wrote (not JSON, or without "kind"), which the swap would
    delete, unless prepared shards lie beside it: then it is this script's, damaged (read_meta asks for a prepare)."""
    path = Path(data_dir) / "meta.json"
    try:
        meta = json.loads(read_text(path)) if path.is_file() else {"kind": DATA_KIND}
    except (UserError, ValueError, RecursionError):
        meta = None
    ours = any(shard_paths(data_dir, split) for split in ("training_set", "validating_set", "testing_set"))
    if not (isinstance(meta, dict) and "kind" in meta or ours):
        raise UserError(f"{path}: not a meta.json of this suite (prepare would replace it); move it, or use another "
                        "--data-dir")
    if isinstance(meta, dict) and meta.get("kind", DATA_KIND) != DATA_KIND:
        other = str(meta.get("script", "another script")).removesuffix(".py")
        raise UserError(f"{data_dir} holds data prepared by {other}.py, which a prepare of {SCRIPT}.py would "
                        f"replace; use another --data-dir")


STAGING_MARK = ".prepare-staging"   # in each folder staging_dir makes: only such folders are ever cleared


def staging_folders(data_dir):
    """[(folder, ours)] for the folders staging_dir made for DATA_DIR (a real path): DATA_DIR.prepare-PID-RANDOM
    beside it or inside it; ours: its STAGING_MARK says where DATA_DIR is ("beside", "inside"), False for a folder of
    an earlier version (an empty mark or none). A folder whose mark says the other place is another DATA_DIR's
    (data/data.prepare-... beside data/data is not data's), as is a name that merely starts the same
    (data.prepare-x.prepare-...: data.prepare-x's)."""
    prefix, found = f"{data_dir.name}.prepare-", []
    places = [(data_dir.parent, "beside")] if data_dir.parent != data_dir else []
    for parent, where in [*places, (data_dir, "inside")]:
        with contextlib.suppress(OSError):
            for folder in parent.iterdir():
                pid, _, token = folder.name.removeprefix(prefix).partition("-")
                if not (folder.name.startswith(prefix) and pid.isascii() and pid.isdigit() and len(token) == 8
                        and not token.strip("0123456789abcdef")) or folder.is_symlink() or not folder.is_dir():
                    continue
                mark = ""
                if os.path.lexists(folder / STAGING_MARK):
                    try:
                        mark = read_text(folder / STAGING_MARK)
                    except UserError:   # unreadable, not UTF-8
                        continue
                if mark in (where, ""):
                    found.append((folder, mark == where))
    return found


@contextlib.contextmanager
def staging_dir(data_dir):
    """A new empty folder next to DATA_DIR (DATA_DIR.prepare-PID-RANDOM; inside DATA_DIR when its parent is read-only
    or another file system, where a rename into DATA_DIR would not be atomic) to build prepared data in. Removed when
    the block ends, unless a swap cut short left the old data in its previous/ (swap_prepared). Folders of killed
    runs (staging_folders) are removed first: the caller holds DATA_DIR's lock, so no other prepare uses them; a
    folder of the user's whose name merely starts the same stays."""
    data_dir = Path(os.path.realpath(data_dir))   # not abspath: LINK/../data is beside the folder LINK names
    parent = data_dir.parent
    if not os.access(parent, os.W_OK) or os.stat(parent).st_dev != os.stat(data_dir).st_dev:
        parent = data_dir
    for old, _ in staging_folders(data_dir) if fcntl else []:   # unlocked (Windows): another prepare's, maybe
        if old.parent == parent and not (old / "previous").exists():
            shutil.rmtree(old, ignore_errors=True)
    staged = parent / f"{data_dir.name}.prepare-{os.getpid()}-{secrets.token_hex(4)}"
    staged.mkdir()
    (staged / STAGING_MARK).write_text("inside" if parent == data_dir else "beside", encoding="utf-8")
    try:
        yield staged
    finally:
        if (staged / "previous").exists():
            print(f"the earlier prepared data of {data_dir} is in {staged / 'previous'}", file=sys.stderr)
        else:
            shutil.rmtree(staged, ignore_errors=True)


def prepared_file(name):
    """True for the names prepare places in DATA_DIR: meta.json and the shards SPLIT.N.pt.gz."""
    split, _, rest = name.partition(".")
    number = rest.removesuffix(".pt.gz")
    return name == "meta.json" or (split in ("training_set", "validating_set", "testing_set") and number != rest
                                   and number.isascii() and number.isdigit())


def file_mark(path):
    """[inode, modification time in ns] of `path` (not followed): the same through a rename, another for a file
    written anew."""
    stat = os.lstat(path)
    return [stat.st_ino, stat.st_mtime_ns]


def recover_prepared(data_dir):
    """The earlier prepared data back in DATA_DIR after a prepare killed while it swapped its data in (SIGKILL, the
    out-of-memory killer: swap_prepared's undo never ran), from the staging folder's previous/, the new files placed by
    then removed (its "placing" names them with their file_mark); a staging folder of a swap that was done, or of a
    prepare killed before its swap, is removed. Called by lock_data_dir with DATA_DIR's lock held, so no prepare is
    using those folders. A file that is not one it placed (another file_mark: the earlier one its undo put back, the
    user's) is never removed; a file where the earlier data would go back (DATA_DIR changed since) is a UserError,
    DATA_DIR left as it is: every command stops until the user has sorted it out, so no later prepare has old files put
    back beside its own."""
    shown, data_dir = data_dir, Path(os.path.realpath(data_dir))
    for staged, ours in staging_folders(data_dir):
        previous, placing, removed = staged / "previous", staged / "placing", 0
        if ours and not os.path.lexists(previous):   # killed before its swap began: new files only, none placed
            shutil.rmtree(staged, ignore_errors=True)
            continue
        if not ours or not previous.is_dir():
            continue
        try:
            if os.path.lexists(placing):
                placed = json.loads(read_text(placing))
                if not isinstance(placed, dict) or not all(prepared_file(name) and isinstance(mark, list)
                                                           for name, mark in placed.items()):
                    raise ValueError(f"{placing} is not the list of files a prepare placed")
                if "meta.json" in placed and not (staged / "meta.json").exists():   # placed: the swap was done
                    previous.rename(staged / "replaced")   # first: rmtree cut short leaves no previous/ to put back
                    shutil.rmtree(staged, ignore_errors=True)
                    continue
                for name, mark in placed.items():   # gone from `staged`: placed in DATA_DIR, and maybe removed since
                    with contextlib.suppress(FileNotFoundError):   # by the undo or a recovery cut short; another
                        if not (staged / name).exists() and file_mark(data_dir / name) == mark:   # file there (the
                            (data_dir / name).unlink()   # earlier one the undo put back, the user's) stays
                            removed += 1
                placing.unlink()
            earlier = sorted(previous.iterdir())
            if taken := [path.name for path in earlier if os.path.lexists(data_dir / path.name)]:
                raise FileExistsError(errno.EEXIST, "is there", str(data_dir / taken[0]))
            for path in earlier:
                os.replace(path, data_dir / path.name)
            previous.rmdir()
        except (OSError, ValueError, UserError) as e:
            why = f"{e.filename} is there" if isinstance(e, FileExistsError) else getattr(e, "strerror", None) or e
            raise UserError(f"{shown}: a prepare killed while it swapped its data in left the earlier prepared "
                            f"data in {previous}, and they cannot go back ({why}); put them back in {data_dir} in "
                            f"place of its meta.json and shards and remove {staged}, or remove {staged} and "
                            f"prepare again")
        shutil.rmtree(staged, ignore_errors=True)
        done = "the earlier data put back" if earlier else "its files removed" if removed else "none of its files left"
        print(f"{shown}: a prepare was killed while it swapped its data in; {done}", file=sys.stderr)


def swap_prepared(staged, data_dir):
    """Move the shards and meta.json built in `staged` into DATA_DIR in place of the old ones; every other file there
    (model.pt, checkpoint.pt, history, runs.csv) stays. Renames on one file system, so each file is whole, old or new;
    the old meta.json goes aside first and the new one comes last, so a meta.json never sits beside shards of another
    prepare; an error or Ctrl-C before the end puts the old files back, a kill the next command (recover_prepared)."""
    data_dir = Path(data_dir)
    previous = staged / "previous"
    previous.mkdir()
    moved, placed = [], []
    ours = [p for split in ("training_set", "validating_set", "testing_set") for p in shard_paths(data_dir, split)]
    with signals_held():   # a few renames: a Ctrl-C waits for them (one during the undo left no meta.json, no shards)
        try:
            for path in [data_dir / "meta.json", *ours]:   # a user's own file named like a shard stays
                if path.exists():
                    moved.append(path)
                    os.replace(path, previous / path.name)
            new = [*sorted(staged.glob("*_set.*.pt.gz")), staged / "meta.json"]
            atomic_write_text(staged / "placing", json.dumps({path.name: file_mark(path) for path in new}))
            for path in new:
                placed.append(data_dir / path.name)
                os.replace(path, data_dir / path.name)
        except BaseException:   # a file system error: the old files back
            for path in placed:
                path.unlink(missing_ok=True)
            for path in reversed(moved):
                if (previous / path.name).exists():
                    os.replace(previous / path.name, path)
            with contextlib.suppress(OSError):  # not empty if a file could not go back: staging_dir keeps it then
                previous.rmdir()
            raise
        previous.rename(staged / "replaced")  # the old files, removed with `staged`


def save_prepared(data_dir, splits, meta):
    """Write the splits ({name: tensors}) as shards and `meta` as meta.json into a new folder, then swap them into
    DATA_DIR: an error or Ctrl-C before the swap is done leaves the earlier prepared data as it was. meta.json gets
    the data's "prepared" id (a digest of meta and every tensor: the same data and options, the same id); a checkpoint
    keeps the id of the data it was trained on, and is not resumed on other data."""
    # a speed differs from run to run, a folder's path with how it is spelled: neither is the data
    kept = {k: v for k, v in meta.items() if not k.endswith("_per_s") and k not in ("image_dir", "test_dir", "csv")}
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True).encode())
    for name in sorted(splits):
        for tensor in splits[name]:
            digest.update(tensor.contiguous().numpy())   # read in place, not copied
    meta = {**meta, "prepared": digest.hexdigest()[:16]}
    try:
        with staging_dir(data_dir) as staged:
            for name, tensors in splits.items():
                write_split(staged, name, tensors)
            atomic_write_text(staged / "meta.json", json.dumps(meta, indent=1))
            swap_prepared(staged, data_dir)
    except OSError as e:  # a full disk, a folder made read-only meanwhile, ...
        raise UserError(f"{data_dir}: cannot write the prepared data ({e.strerror or e}); the earlier data are kept")


# ---- Device, progress, history, model files ----
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name, quiet=False):
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu or auto", 2)
    elif name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available; use --device cpu or auto", 2)
    if not quiet:
        print(f"device: {name}", file=sys.stderr)
    return torch.device(name)


def progress(iterable=None, **kwargs):
    """tqdm on stderr, hidden when stderr is not a terminal and in processes other than the main one."""
    return tqdm(iterable, disable=not (sys.stderr.isatty() and main_process()), file=sys.stderr,
                dynamic_ncols=True, **kwargs)


def save_history(data_dir, history, plot_keys):
    """history.csv (one row per epoch) and history.png (saved, never shown)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(k for h in history for k in h))   # rows of a run resumed from an older version differ
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(Path(data_dir) / "history.csv", buf.getvalue())
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in plot_keys:
        ax.plot(epochs, [h.get(key, float("nan")) for h in history], label=key)
    ax.set_xlabel("epoch")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(Path(data_dir) / "history.png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "history", "best_score", "bad_epochs", "model_args")


def load_model_file(path, keys=None, kin=False):
    """model.pt (or, with keys=CHECKPOINT_KEYS, checkpoint.pt) of this script, loaded on the CPU with
    weights_only=True; it must hold `keys` (default MODEL_KEYS: what eval needs). kin: also one of a copy of this
    script under another name (train --init), known by holding those keys. A missing, foreign, damaged or
    incomplete file is a UserError naming it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: model not found; train one with `python {SCRIPT}.py train` or pass --model")
    if not path.is_file():   # a folder, or a FIFO that would block the read forever
        raise UserError(f"{path}: not a file; pass the model.pt that train wrote")
    with contextlib.suppress(zipfile.BadZipFile, OSError):   # torch.save's zip: its entries' sizes, before unpacking
        with zipfile.ZipFile(path) as z:
            limit = unpack_limit(path)
            if sum(entry.file_size for entry in z.infolist()) > limit:
                raise UserError(f"{path}: unpacks to over {limit:,} bytes (unpack_limit); not a model of {SCRIPT}.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or one holding pickled code
        raise UserError(f"{path}: damaged, or not a model file of this suite ({type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("script") != SCRIPT and not (
            kin and isinstance(ckpt.get("script"), str) and all(key in ckpt for key in keys or MODEL_KEYS)):
        other = ckpt.get("script") if isinstance(ckpt, dict) else None
        raise UserError(f"{path}: model was trained by {other or 'another program'}"
                        f"{'.py' if other else ''}, not {SCRIPT}.py")
    missing = [key for key in keys or MODEL_KEYS if key not in ckpt]
    if missing and keys is None and "optimizer" in ckpt:
        raise UserError(f"{path}: a training checkpoint (what train --resume reads), not a model; pass model.pt")
    if missing:
        raise UserError(f"{path}: incomplete, no {', '.join(missing)}; train again")
    weights = ckpt["model"].values() if isinstance(ckpt.get("model"), dict) else []
    if not all(torch.isfinite(w).all() for w in weights if isinstance(w, torch.Tensor) and w.is_floating_point()):
        raise UserError(f"{path}: its weights hold NaN or infinity (answers would be NaN); train again")
    return ckpt


def resume_path(args, out_dir):
    """train --resume: the checkpoint to resume, checked before any work (None without --resume)."""
    path = out_dir / "checkpoint.pt"
    if args.resume and not path.exists():
        raise UserError(f"{path} not found: nothing to resume; train without --resume")
    return path if args.resume else None


def resume_training(path, model_args, model, optimizer, scaler, scheduler=None, classes=None, steps_per_epoch=None):
    """train --resume: model, optimizer, scaler (and a step-wise scheduler of `steps_per_epoch` steps an epoch: when
    --epochs, --batch-size or the data changed its length, the same shape over the new length from the epoch reached)
    from checkpoint.pt, the learning rate scaled to the one `optimizer` was built with (its run's, or a --lr given
    now: resume_options). Returns (epochs done, history, best score, bad epochs). classes: what the network's outputs
    stand for (a charset, labels); the checkpoint's must be the same (checkpoints saved before they were stored are
    not checked)."""
    ckpt = load_model_file(path, CHECKPOINT_KEYS)
    try:
        if ckpt["model_args"] != model_args:
            raise UserError(f"{path} was trained on other data or options ({ckpt['model_args']}, now {model_args}); "
                            f"train without --resume")
        if ckpt.get("classes", classes) != classes:   # same count, other order: every output would change meaning
            old, new = ckpt["classes"], classes
            i = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
            raise UserError(f"{path} was trained on data of other classes (class {i}: "
                            f"{old[i] if i < len(old) else 'none'!r}, now {new[i] if i < len(new) else 'none'!r}); "
                            f"train without --resume")
        model.load_state_dict(ckpt["model"])
        asked = [dict(group) for group in optimizer.param_groups]   # built from this run's options
        optimizer.load_state_dict(ckpt["optimizer"])
        for group, new in zip(optimizer.param_groups, asked):   # a --lr or --weight-decay given now holds from here
            base = lambda g: g.get("max_lr", g.get("initial_lr", g["lr"]))   # the schedule's peak, else its start
            keys = [key for key in ("lr", "initial_lr", "max_lr", "min_lr") if key in group]
            if base(group) > 0:
                group.update({key: group[key] * base(new) / base(group) for key in keys})
            else:   # a run at lr 0 (a check of the data): the rates asked for now, as a fresh run starts
                group.update({key: new.get(key, new["lr"]) for key in keys})
            group.update({key: new[key] for key in ("weight_decay",) if key in group})
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if scheduler is not None:
            if ckpt["scheduler"].get("total_steps") == getattr(scheduler, "total_steps", None):
                scheduler.load_state_dict(ckpt["scheduler"])
            else:   # the same schedule shape over the new length, from the epoch reached
                scheduler.last_epoch = min(ckpt["epoch"] * steps_per_epoch, scheduler.total_steps)
            scheduler.last_epoch -= 1   # one step back and again: the rate there, from the rates asked for now
            with warnings.catch_warnings():   # "step() before optimizer.step()": this step sets the rate only
                warnings.simplefilter("ignore")
                scheduler.step()
        done = ckpt["epoch"], ckpt["history"], ckpt["best_score"], ckpt["bad_epochs"]
        if not (numbers([done[0], done[3]], 2, 0, MAX_INT, True) and isinstance(done[1], list)
                and all(isinstance(h, dict) for h in done[1]) and numbers([done[2]], 1, -1, 1e9)
                and (scheduler is None or 0 <= scheduler.last_epoch <= getattr(scheduler, "total_steps", MAX_INT))):
            raise ValueError("epoch, history, best score or the schedule's position")
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:  # a checkpoint of another version
        raise UserError(f"{path}: does not fit this run ({type(e).__name__}); train without --resume")
    if done[2] >= 0 and not Path(path).with_name("model.pt").is_file():   # the run's best model: test and calibration
        raise UserError(f"{Path(path).with_name('model.pt')}: missing, the best model of the run to resume (moved?); "
                        f"put it back, or train without --resume")
    print(f"resumed from {path} after epoch {done[0]} (best validation score {done[2]:.4g})", flush=True)
    return done


RESUME_OWN = ("command", "data_dir", "device", "grid", "histogram_every", "init", "resume", "sync_bn", "tag",
              "tensorboard", "compile")   # train --resume: options of the command line, not of the run resumed


def resume_options(args, parser, path, given):
    """train --resume: args with the options of the run resumed (its checkpoint's) where the command line gives none
    (`given`: the options it names), so that a run goes on as it started (--lr, --epochs, --width ...); those given
    that differ from the run's are said. A checkpoint without its options (an older version) changes nothing."""
    state = load_model_file(path, CHECKPOINT_KEYS)
    ours = prepared_id(args.data_dir)   # a checkpoint without one: a version before the id, so prepared since
    if ours is not None and state.get("prepared") != ours:
        raise UserError(f"{path} was trained on data prepared before the last prepare of {args.data_dir} (other "
                        f"images, splits or options, or an older {SCRIPT}.py): its scores would mix two data sets; "
                        "train without --resume")
    best = Path(path).with_name("model.pt")
    if best.is_file() and load_model_file(best).get("model_args") != state.get("model_args"):
        raise UserError(f"{best}: not the best model of the run in {path} (other network arguments); put that run's "
                        "model.pt back, or train without --resume")
    config = state.get("config")
    args, taken, changed = argparse.Namespace(**vars(args)), [], []
    for action in parser._actions if isinstance(config, dict) else []:   # argparse has no public list of options
        dest = action.dest
        if dest in RESUME_OWN or dest not in config or config[dest] == getattr(args, dest, None):
            continue
        value = config[dest]
        if dest in given and dest in (state.get("model_args") or {}):   # the network's shape: the checkpoint's
            raise UserError(f"{shown(action, getattr(args, dest))}: the run resumed has {shown(action, value, True)} "
                            "and a resumed run keeps its network; drop the option, or train without --resume", 2)
        if dest in given:
            changed.append(f"{shown(action, getattr(args, dest))} (the run's: {shown(action, value, bare=True)})")
            continue
        try:   # what the parser would make of it: a checkpoint edited by hand passes the same checks as the options
            ok = (action.type(str(value)) == value if action.type else type(value) is type(action.default)) and (
                value in (action.choices or [value]))
        except (argparse.ArgumentTypeError, TypeError, ValueError):
            ok = False
        if not ok:
            raise UserError(f"{path}: its option {shown(action, repr(value))} is not valid; train without --resume")
        setattr(args, dest, value)
        taken.append(shown(action, value))
    if taken:
        print(f"options of the run resumed: {', '.join(taken)}")
    if changed:
        print(f"options changed from the run resumed: {', '.join(changed)}")
    if type(state["epoch"]) is int and state["epoch"] >= args.epochs:   # a run that ends at once: said, not silent
        print(f"the run resumed has run {state['epoch']} epochs, --epochs {args.epochs}: no epoch to train (raise "
              "--epochs to train more); its best model is scored again")
    return args


def prepared_id(data_dir):
    """The id prepare gave DATA_DIR's data (meta.json's "prepared"); None for data prepared before there was one."""
    with contextlib.suppress(UserError):
        return read_meta(data_dir).get("prepared")
    return None


def shown(action, value, bare=False):
    """An option as a command line writes it: `--lr 0.01` (bare: `0.01`), `--amp` or `--no-amp`, `--sync-bn` or
    `no --sync-bn`."""
    flags = action.option_strings or [action.dest]
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):   # on/off
        return flags[0] if value else flags[1] if len(flags) > 1 else f"no {flags[0]}"
    return str(value) if bare else f"{flags[0]} {value}"


def given_options(parser, argv):
    """The options (dests) that the arguments `argv` of `parser` name: argparse fills in a default only where the
    namespace has no value yet, so those still holding a marker after parsing were not given."""
    unset = object()
    probe = argparse.Namespace(**{a.dest: unset for a in parser._actions   # no public list of options (as above)
                                  if not isinstance(a, argparse._AppendAction)})   # --grid: appends to what is there
    parser.parse_known_args(argv, probe)
    return {dest for dest, value in vars(probe).items() if value is not unset}


def asked_for(args, dest, named=None):
    """Whether the train command names option `dest`, itself or in a --grid item (`named`: its given_options)."""
    named = given_options(args.train_parser, args.argv[args.argv.index("train") + 1:]) if named is None else named
    return dest in named or any(item.partition("=")[0] == dest.replace("_", "-") for item in args.grid or [])


KEEP_NOTE = 5   # keep_previous: from this many earlier runs in previous/ on, each new one says what they take
KEEP_MARK = ".moving"   # in previous/TIME/ while keep_previous moves a run there


RUN_FILES = ("model.pt", "model.onnx", "checkpoint.pt", "history.csv", "history.png", "confusion.png")


def keep_previous(out_dir, data_dir, names=RUN_FILES):
    """Move the model (and its export), checkpoint and history of the run before into out_dir/previous/TIME/ (and
    the run_dir of its rows in DATA_DIR/runs.csv with them; data_dir None: the files `names` alone): never lost, and
    no stale model.onnx left beside the new model. Nothing there is ever deleted; from KEEP_NOTE runs on, their
    count and size are said."""
    old = [out_dir / name for name in names if (out_dir / name).exists()]
    if not old:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(max(p.stat().st_mtime for p in old)))
    keep, n = out_dir / "previous" / stamp, 1
    while keep.exists():
        n += 1
        keep = out_dir / "previous" / f"{stamp}-{n}"
    keep.mkdir(parents=True)
    moved, p = [], keep / KEEP_MARK
    try:
        p.touch()   # until the run has moved whole: a kill before is undone by restore_kept_run
        for p in old:
            os.replace(p, keep / p.name)
            moved.append(p)
    except OSError as e:   # Windows: a file another program holds open cannot move; the run's files stay together
        for done in reversed(moved):
            with contextlib.suppress(OSError):
                os.replace(keep / done.name, done)
        with contextlib.suppress(OSError):
            (keep / KEEP_MARK).unlink(missing_ok=True)
            keep.rmdir()
        what = f"cannot write {p}" if p.name == KEEP_MARK else f"{p}: cannot move it to {keep}"
        raise UserError(f"{what} ({e.strerror or e}); close what holds it open and train again")
    print(f"the previous {'run' if data_dir else 'model'}'s {', '.join(p.name for p in old)}: moved to {keep}",
          flush=True)
    kept = [path for path in (out_dir / "previous").iterdir() if path.is_dir()]
    if len(kept) >= KEEP_NOTE:   # never deleted here: the user decides, told what it costs
        size = sum(f.stat().st_size for run in kept for f in run.rglob("*") if f.is_file())
        print(f"{out_dir / 'previous'} keeps {len(kept)} earlier runs ({size / 2**20:,.0f} MB); delete those you no "
              f"longer need", flush=True)
    if data_dir is not None:
        move_run_rows(data_dir, out_dir, keep)
    (keep / KEEP_MARK).unlink()
    return keep


def restore_kept_run(out_dir, data_dir):
    """A keep_previous cut short by a kill (its KEEP_MARK still there): the files it had moved go back beside the
    others, the run whole again as before the command, and its runs.csv rows with them. lock_data_dir calls it."""
    for mark in Path(out_dir).glob(f"previous/*/{KEEP_MARK}"):
        keep = mark.parent
        for path in keep.iterdir():
            if path != mark and not os.path.lexists(Path(out_dir) / path.name):
                os.replace(path, Path(out_dir) / path.name)
        move_run_rows(data_dir, keep, out_dir)
        mark.unlink()
        with contextlib.suppress(OSError):
            keep.rmdir()
        print(f"{out_dir}: the run before, which a killed command had begun to move to {keep}, is back in place",
              file=sys.stderr)


def move_run_rows(data_dir, old, new):
    """The rows of DATA_DIR/runs.csv whose run_dir is `old` get `new`: run_dir follows the files."""
    with contextlib.suppress(UserError, OSError, ValueError):
        rows = read_runs(Path(data_dir) / "runs.csv")
        moved = [r for r in rows if r.get("run_dir") and Path(r["run_dir"]).resolve() == Path(old).resolve()]
        for r in moved:
            r["run_dir"] = os.path.abspath(new)
        if moved:
            write_runs(Path(data_dir) / "runs.csv", rows)


def save_model(obj, path):
    """model.pt written atomically; a model.onnx beside it, exported from the model before (a resumed run's new best
    model, a calibration fitted again), is moved aside (keep_previous): it never stays beside a model it is not."""
    atomic_torch_save(obj, path)
    if (path.parent / "model.onnx").exists():
        keep_previous(path.parent, None, ("model.onnx",))


def save_epoch(out_dir, args, model, optimizer, scheduler, scaler, state, best_model=None, plot_keys=()):
    """After each epoch, in the main process: model.pt when the score improved (best_model: what eval needs beside
    the weights), checkpoint.pt (state: epoch, history, best_score, bad_epochs, model_args, classes) and the history table
    and plot. All written atomically, before the epoch's line is printed; the first epoch of a fresh run moves the
    files of the run before aside first (keep_previous), and back in place if this epoch's cannot all be written (a
    full disk). Ctrl-C and SIGTERM wait until the epoch's files are written: a model.pt never sits beside the
    checkpoint of another epoch."""
    with signals_held():
        keep = keep_previous(out_dir, args.data_dir) if state["epoch"] == 1 else None
        best, before = out_dir / "model.pt", None   # before: the best model so far, until the checkpoint names the new
        try:
            if best_model is not None:
                before = held_copy(best) if state["epoch"] > 1 and best.is_file() else None
                save_model({"script": SCRIPT, "model": model.state_dict(), **best_model}, best)
            config = {k: v for k, v in vars(args).items() if k not in ("func", "train_parser", "argv")}
            atomic_torch_save({"script": SCRIPT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), **state,
                               "config": config, "prepared": prepared_id(args.data_dir), "plot_keys": list(plot_keys)},
                              out_dir / "checkpoint.pt")
            if before is not None:   # the checkpoint names this epoch's model now: the copy goes, as it can
                with contextlib.suppress(OSError):
                    before.unlink()
                before = None
            save_history(out_dir, state["history"], plot_keys)
        except BaseException:
            if before is not None:   # no checkpoint of this epoch: the model of the epoch before back beside its own
                os.replace(before, best)   # (two links to one file, when save_model failed: both stay)
                before.unlink(missing_ok=True)
            if state["epoch"] == 1:   # nothing of this run; the run before, whole, where it was
                for name in RUN_FILES:
                    if keep is None or not (keep / name).exists():
                        (out_dir / name).unlink(missing_ok=True)
            if keep is not None:
                for path in keep.iterdir():
                    os.replace(path, out_dir / path.name)
                keep.rmdir()
                move_run_rows(args.data_dir, keep, out_dir)
                print(f"the previous run's files: back in {out_dir}", file=sys.stderr, flush=True)
            raise


def held_copy(path):
    """A second name for file `path` (a hard link, else a copy) beside it, NAME.held-PID-RANDOM.EXT: the file as it
    is, while a write replaces `path` (after a kill, restore_held_model decides). Nothing is left if it fails."""
    copy = path.with_name(f"{path.stem}.held-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        try:
            os.link(path, copy)
        except OSError:   # no hard links on this file system
            shutil.copyfile(path, copy)
    except BaseException:
        copy.unlink(missing_ok=True)
        raise
    return copy


# ---- Scale out and observe: torchrun, mixed precision, TensorBoard, runs.csv, --grid ----
def main_process():
    """True in a plain run and in torchrun's rank 0: the one process that prints and writes files."""
    return os.environ.get("RANK", "0") == "0"


def setup_distributed(device_name):
    """The training device. Under torchrun (WORLD_SIZE > 1) also join the process group: nccl on CUDA with one
    GPU per local rank, gloo on the CPU; ranks other than 0 print nothing on stdout."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name, quiet=not main_process())
    if world == 1 or dist.is_initialized():
        return device
    if not main_process():
        sys.stdout = open(os.devnull, "w")
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():  # met by ranks > 0 only: every rank reports it
            error = UserError(f"torchrun: local rank {local_rank} but {torch.cuda.device_count()} CUDA devices on "
                              f"this node; lower --nproc_per_node", 2)
            error.all_ranks = True
            raise error
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"torchrun: --device {device.type} is not supported; use cuda or cpu", 2)
    # a long timeout: in a --grid, the other ranks wait while rank 0 scores the test split of the previous run
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2),
                            device_id=device if device.type == "cuda" else None)
    print(f"torchrun: {world} processes, backend {dist.get_backend()}")
    return device


def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def epoch_batches(n, batch_size, seed, epoch, device):
    """This process's index batches of one epoch. A permutation seeded by (seed, epoch), the same in every process,
    is cut into global batches of `batch_size`; under torchrun each process takes every world-th index of each batch
    (a last batch shorter than the world is topped up from the start), so all take the same number of steps."""
    rank, world = rank_and_world()
    if min(n, batch_size) < world:
        raise UserError(f"{world} processes need a --batch-size and a training split of at least {world} "
                        f"(now {batch_size} and {n})", 2)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    batches = []
    for start in range(0, n, batch_size):
        idx = perm[start:start + batch_size]
        if len(idx) < world:
            idx = torch.cat([idx, perm[:world - len(idx)]])
        batches.append(idx[rank::world])
    return list(torch.cat(batches).to(device).split([len(idx) for idx in batches]))   # one copy to the device


def shard(items):
    """This process's share of a validation split (every world-th item; all of it in one process)."""
    rank, world = rank_and_world()
    return items[rank::world]


def sum_over_processes(values, device):
    """Sums of per-process numbers over all processes (the numbers themselves in one process)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def mean_over_processes(values, count, device):
    """Count-weighted means of per-process means over all processes (unchanged in one process), so every
    process sees the same numbers and takes the same early-stopping decision."""
    *sums, total = sum_over_processes([*(v * count if count else 0.0 for v in values), count], device)
    return [v / max(total, 1) for v in sums]


MAX_LOSS = 1e4   # check_loss: a mean loss above this has diverged (cross-entropy starts near ln(classes), 1 to 7)


def check_loss(epoch, split, loss):
    """A loss that is nan, inf or over MAX_LOSS (diverged, though finite) ends the run before the epoch is saved: the
    last good model and checkpoint stay. The loss is the mean over all processes, so every process stops together."""
    if not math.isfinite(loss) or loss > MAX_LOSS:
        raise UserError(f"epoch {epoch}: {split} loss is {loss:.4g}{' (diverged)' if math.isfinite(loss) else ''}; "
                        "lower --lr", 1)


def sync_buffers(model):
    """Rank 0's BatchNorm running statistics in every process before validation (DDP copies them only at the
    start of each training step, so each process's last local batch is still in its own)."""
    if dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def wrap_model(model, device, sync_bn):
    """DistributedDataParallel under torchrun (optionally with synchronised BatchNorm); the model itself else."""
    if not dist.is_initialized():
        return model
    if sync_bn:
        if device.type != "cuda":
            raise UserError("--sync-bn needs CUDA (torch's SyncBatchNorm does not run on the CPU)", 2)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def amp_dtype(device, amp=True):
    """The autocast dtype: with --amp, bf16 on CUDA where supported, else fp16 (trained with a GradScaler); on a
    CPU bf16 only if CPU_BF16 (measured faster for this model) and the CPU has native bf16 instructions;
    None (fp32) otherwise."""
    if not amp:
        return None
    if device.type == "cuda":  # native bf16 from compute capability 8 (Ampere) on; older GPUs would emulate it
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    # torch has no public check for native bf16 on a CPU: these private torch.cpu helpers (missing -> False)
    names = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if device.type == "cpu" and CPU_BF16 and any(getattr(torch.cpu, name, lambda: False)() for name in names):
        return torch.bfloat16
    return None


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def open_tensorboard(logdir):
    """A SummaryWriter for --tensorboard DIR (None in processes other than the main one). tensorboard is an
    optional package: without it this option fails with one line saying how to install it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard", 2)
    return SummaryWriter(str(logdir)) if main_process() else None


def log_epoch(writer, row, model, every):
    """TensorBoard: every number of the history row as a scalar; weight histograms every `every` epochs."""
    if writer is None:
        return
    epoch = row["epoch"]
    for key, value in row.items():
        if key != "epoch":
            writer.add_scalar(key, value, epoch)
    if every and epoch % every == 0:
        for name, p in model.named_parameters():
            writer.add_histogram(name, p.detach().float().cpu(), epoch)
    writer.flush()


def read_runs(path):
    """The rows of a runs.csv, [] when there is none."""
    try:
        return list(csv.DictReader(io.StringIO(read_text(path)))) if path.exists() else []
    except csv.Error as e:
        raise UserError(f"{path}: not a CSV ({e}); move it away")


def write_runs(path, rows):
    """runs.csv rewritten atomically; columns: the union over all rows."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), restval="",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def append_run(data_dir, row):
    """Append one row to DATA_DIR/runs.csv."""
    path = Path(data_dir) / "runs.csv"
    try:
        rows = read_runs(path)
    except UserError as e:
        raise UserError(f"{e} (this run's model is saved)")
    write_runs(path, rows + [row])


def grid_runs(args, parser, named=()):
    """[(name, args)] for every combination of the --grid KEY=V1,V2 options (one unnamed run without --grid);
    named: the options the command line gives, which no --grid may set too."""
    axes = []
    for item in args.grid or []:
        key, _, values = item.partition("=")
        action = parser._option_string_actions.get(f"--{key}")   # argparse has no public lookup by option name
        fixed = ("grid", "data_dir", "resume", "device", "tensorboard")   # one per command line
        if not values or action is None or action.nargs == 0 or action.dest in fixed:
            raise UserError(f"--grid {item}: expected OPTION=V1,V2,... with OPTION a train option that takes a value "
                            f"(e.g. --grid lr=0.01,0.001)", 2)
        try:
            converted = [(action.type or str)(v) for v in values.split(",")]
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise UserError(f"--grid {item}: not a valid value for --{key} ({e})", 2)
        if action.choices and any(v not in action.choices for v in converted):
            raise UserError(f"--grid {item}: --{key} takes one of {', '.join(map(str, action.choices))}", 2)
        if action.dest in named:   # the grid's values would silently replace the one given
            raise UserError(f"--grid {item}: --{key} is given on its own too; list its value in the --grid", 2)
        if any(axis[0][1] == action.dest for axis in axes):   # two axes of one option: the last one's value wins
            raise UserError(f"--grid {item}: --{key} has a --grid already; list all its values in one", 2)
        axes.append([(key, action.dest, text, value) for text, value in zip(values.split(","), converted)])
    if math.prod(map(len, axes)) > MAX_GRID:
        raise UserError(f"--grid: {math.prod(map(len, axes)):,} combinations, more than {MAX_GRID:,}; fewer values", 2)
    runs, names = [], set()
    for combo in itertools.product(*axes):
        run_args = argparse.Namespace(**vars(args))
        for _, dest, _, value in combo:
            setattr(run_args, dest, value)
        name = "_".join(f"{key}={''.join(c if c.isalnum() or c in '.+-' else '-' for c in text)}"
                        for key, _, text, _ in combo)   # a folder name: a '/' in a value (a path) leads nowhere
        base, k = name, len(runs) + 1
        while name in names:   # a suffix that is free itself
            name, k = f"{base}-{k}", k + 1
        if len(name.encode()) > 255:   # DATA_DIR/grid/NAME: said now, not after the runs before it trained
            raise UserError(f"--grid: the run folder name {name[:60]}... is over 255 bytes; shorter values", 2)
        names.add(name)
        runs.append((name, run_args))
    return runs


# ---- Ship and serve: ONNX export, ONNX Runtime, HTTP ----
ONNX_OPSET = 18          # ONNX Runtime >= 1.14 runs it
MAX_UPLOAD = 8 * 2**20   # serve: default --max-bytes of one request
BODY_SECONDS = 30        # serve: a request body not complete after this long is answered 408 (multipart: 10x)
UPLOAD_RATE = 32 << 10   # serve: bytes/s a body must keep up on average (beyond BODY_SECONDS): 8 MB in 286 s
SERVE_LIMITS = {"timeout_graceful_shutdown": 5}   # serve: a stop waits at most 5 s for the requests in flight
HEADER_SECONDS = 10      # serve: a connection whose request line and headers are not all in after this is closed
MAX_CONNECTIONS = 1000   # serve: open connections per process; one more is closed at once (serve_protocol)
UPLOADS_HELD = 16        # serve: raw bodies held at once (arriving or answered), in --max-bytes; more bytes: 503
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "DIB", "WEBP")   # what load_image decodes (JPEG: camera MPO files too)
SERVE_OPTIONS = "SUITE_SERVE_OPTIONS"   # serve --workers N: the options, passed to each process in this variable


def import_optional(module, package, purpose):
    """An optional package (onnx, onnxruntime, fastapi, uvicorn): missing, one line says how to install it."""
    try:
        with signals_held():   # a Ctrl-C inside onnxruntime's loading became an ImportError: "needs the package"
            return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{purpose} needs the package {package}: pip install {package}")


def json_ready(value):
    """Tensors, tuples and paths -> lists and strings, recursively: a model file's entries as JSON."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)   # a path, bytes, ...


class OnnxNetwork:
    """An exported network run by ONNX Runtime on the CPU, called like the torch one (tensors in, tensors out);
    `info` holds what eval needs, from the model's metadata."""

    def __init__(self, path, spin=True):
        ort = import_optional("onnxruntime", "onnxruntime", "a .onnx model")
        if not Path(path).exists():
            raise UserError(f"{path}: model not found; make one with `python {SCRIPT}.py export`")
        if not Path(path).is_file():
            raise UserError(f"{path}: not a file; pass the model.onnx that export wrote")
        try:
            options = ort.SessionOptions()   # spin=False: waiting threads sleep, leaving the CPU to serve's others
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
            options.intra_op_num_threads = torch.get_num_threads()   # serve --workers shares the cores out
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.info = json.loads(self.session.get_modelmeta().custom_metadata_map["suite"])
        except Exception as e:  # onnxruntime's own exception types: damaged file, not ONNX, no metadata
            raise UserError(f"{path}: not an ONNX model exported by `python {SCRIPT}.py export` ({type(e).__name__})")
        if not isinstance(self.info, dict) or self.info.get("script") != SCRIPT:
            other = self.info.get("script") if isinstance(self.info, dict) else None
            raise UserError(f"{path}: exported by {f'{other}.py' if other else 'another program'}, not "
                            f"{SCRIPT}.py")
        self.names = [i.name for i in self.session.get_inputs()]

    def eval(self):  # as a torch network: always in inference mode
        return self

    def __call__(self, *inputs):
        feed = {name: x.detach().float().cpu().numpy() for name, x in zip(self.names, inputs)}
        outputs = [torch.from_numpy(y) for y in self.session.run(None, feed)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def numbers(value, n, low, high, whole=False):
    """True when value is a list of n numbers (whole numbers if whole) from low to high: how check_model reads a
    model file's entries before any is used."""
    return isinstance(value, (list, tuple)) and len(value) == n and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and low <= v <= high
        and (not whole or isinstance(v, int)) for v in value)   # 40.0 is no size: PIL and torch refuse it


class BrokenModel(UserError):
    """A model file that loads but cannot answer: one line from eval, a 500 (not the client's fault) from serve."""


def finite(values):
    """eval's and serve's numbers, checked: a model whose weights overflow (a damaged or hand-edited file) answers
    NaN or infinity, which JSON cannot carry and nobody can use."""
    if not torch.isfinite(values).all():
        raise BrokenModel("the model answers NaN or infinity (its weights overflow: a damaged or hand-edited model "
                          "file?); train it again")
    return values


def under_one(share, decimals):
    """A share or probability as shown with `decimals` decimals (of the fraction: 4 for 99.99%): under 1, never 1.
    Rounding showed 0.99996 as 100.00% (or 1.0): one wrong in 25,000, or a probability short of 1, read as certain."""
    return min(share, 1 - 10 ** -decimals) if share < 1 else share


def load_network(path, device_name, serving=False):
    """model.pt -> (the torch network in eval mode, the file's entries, device); model.onnx -> (an OnnxNetwork,
    the same entries from its metadata, the CPU). eval and serve call either the same way; serving, ONNX Runtime's
    waiting threads sleep (measured: 1.5x the requests/s of one client)."""
    if Path(path).suffix.lower() == ".onnx":
        if device_name not in ("auto", "cpu"):
            raise UserError(f"--device {device_name}: a .onnx model runs on the CPU (ONNX Runtime); use --device cpu "
                            "or auto, or the model.pt it came from", 2)
        net = OnnxNetwork(path, spin=not serving)
        check_model(path, net.info)
        try:   # the graph against its metadata: an example through it and through the network the metadata describes
            inputs = export_example(net.info)[0]
            with torch.no_grad():
                expected, got = build_model(net.info["model_args"]).eval()(*inputs), net(*inputs)
            expected, got = [y if isinstance(y, tuple) else (y,) for y in (expected, got)]
            fits = len(expected) == len(got) and all(a.shape == b.shape for a, b in zip(expected, got))
        except Exception:   # onnxruntime's errors (an input of another shape) are of its own types
            fits = False
        if not fits:
            raise UserError(f"{path}: its network does not fit the metadata stored with it (edited?); export it again")
        return net, net.info, pick_device("cpu")
    device = pick_device(device_name)
    info = load_model_file(path)
    check_model(path, info)   # before the network is built: a hand-edited size would allocate gigabytes
    try:
        model = build_model(info["model_args"])
        model.load_state_dict(info["model"])
    except (TypeError, ValueError, RuntimeError, KeyError, IndexError) as e:  # weights of another network
        raise UserError(f"{path}: its weights do not fit {SCRIPT}.py's network ({type(e).__name__})")
    return model.to(device).eval(), info, device


@torch.no_grad()
def cmd_export(args):
    """model.pt -> model.onnx (opset ONNX_OPSET, dynamic batch), with the model file's entries as JSON metadata."""
    onnx = import_optional("onnx", "onnx", "export")
    import_optional("onnxscript", "onnxscript", "export")   # torch's ONNX exporter uses it
    path = Path(args.model or Path(args.data_dir) / "model.pt")
    out = Path(args.output or path.with_suffix(".onnx"))
    if path.suffix.lower() == ".onnx":
        raise UserError(f"{path}: already an ONNX model; pass the model.pt it came from")
    if out.suffix.lower() != ".onnx":   # and never the model itself, nor its checkpoint
        raise UserError(f"--output {out}: name it NAME.onnx (eval and serve tell a model's format by its name)", 2)
    model, info, device = load_network(path, "cpu")   # a missing model is said first, whatever --output is
    if out.is_dir():
        raise UserError(f"--output {out}: a folder; name the file to write (NAME.onnx)", 2)
    if os.path.lexists(out) and not args.force:   # a link to nowhere is the user's too
        raise UserError(f"{out} exists; pass --force to replace it, or --output FILE", 2)
    if not out.parent.is_dir():
        raise UserError(f"--output {out}: no folder {out.parent}; create it first", 2)
    if not os.access(out.parent, os.W_OK | os.X_OK):   # a read-only place: said before the export's work
        raise UserError(f"--output {out}: cannot write in {out.parent}; pass another --output", 2)
    inputs, input_names, output_names, dynamic, about = export_example(info)
    meta = json.dumps({**json_ready({k: v for k, v in info.items() if k != "model"}), "input": about})
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), signals_held():  # progress lines
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, inputs, dynamo=True, opset_version=ONNX_OPSET, input_names=input_names,
                                    output_names=output_names, dynamic_shapes=dynamic)
    proto = program.model_proto
    proto.metadata_props.add(key="suite", value=meta)
    try:
        with atomic_path(out) as tmp:
            onnx.save(proto, str(tmp))
            expected, got = model(*inputs), OnnxNetwork(tmp)(*inputs)   # the file as written, before it takes the name
    except OSError as e:   # a folder that takes no new file (/proc, a full disk)
        raise UserError(f"--output {out}: {e.strerror or e}")
    pairs = zip(expected, got) if isinstance(expected, tuple) else [(expected, got)]
    diff = max((a.float() - b).abs().max().item() for a, b in pairs)
    print(f"exported {out}: {out.stat().st_size / 2**20:.1f} MB, ONNX opset {ONNX_OPSET}, inputs "
          f"{', '.join(input_names)} (first axis dynamic); largest difference to torch on an example {diff:.1e}")
    return 0


@contextlib.contextmanager
def signals_held():
    """Ctrl-C and SIGTERM wait while the body runs, then act: torch.export catches what a signal handler raises
    inside its tracing (it went on and wrote the file) or turns it into its own error (a traceback)."""
    got, before = [], {}
    try:
        with contextlib.suppress(ValueError):   # not the main thread: signals are not ours to hold
            for s in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(s) is not signal.SIG_IGN:   # an ignored signal stays ignored (a background job)
                    before[s] = signal.signal(s, lambda signum, frame: got.append(signum))
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)   # None: a handler set outside Python
        if got:   # also over an error of the body (a full disk): the user asked to stop; 130 / 143 say so
            raise KeyboardInterrupt() if got[0] == signal.SIGINT else Terminated()


def pixel_count(data):
    """The pixels an image file says it holds (its header only; 0 when it is not an image of IMAGE_FORMATS). PIL's
    warnings (a bomb, a damaged EXIF block) print nothing: a client would fill the log with them."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
                return img.width * img.height
    except Exception:   # load_image says why
        return 0


class PixelBudget:
    """serve: the pixels of decoded images waiting for a forward pass, at most `limit` at a time (a PNG of a few KB
    decodes to 48 MB: many at once would exhaust memory). A request waits for room before it decodes; one image
    alone always gets room. Requests enter in their order of arrival (a large photo is not passed for ever by a
    stream of small ones)."""

    def __init__(self, limit):
        self.limit, self.used, self.changed, self.waiting = limit, 0, None, []

    @contextlib.asynccontextmanager
    async def room(self, n):
        self.changed, ticket = self.changed or asyncio.Condition(), object()
        async with self.changed:
            self.waiting.append(ticket)
            try:
                await self.changed.wait_for(lambda: self.waiting[0] is ticket and (
                    self.used == 0 or self.used + n <= self.limit))
            finally:   # entered, or cancelled while waiting: the next in line may go
                self.waiting.remove(ticket)
                self.changed.notify_all()
            self.used += n
        try:
            yield
        finally:
            async with self.changed:
                self.used -= n
                self.changed.notify_all()


class Batcher:
    """serve: requests that arrive together share one forward pass. The first waiting image opens a batch, which
    takes up to max_batch images or waits max_wait seconds for more; batches run one at a time in a thread."""

    def __init__(self, predict, max_batch, max_wait):
        self.predict, self.max_batch, self.max_wait = predict, max_batch, max_wait
        self.queue, self.images, self.batches = None, 0, 0

    async def run(self):
        self.queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while len(items) < self.max_batch and deadline > loop.time():
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
            self.images, self.batches = self.images + len(items), self.batches + 1
            try:
                results = await asyncio.to_thread(self.predict, [img for img, _ in items])
            except Exception:  # one image that fails must not fail the others: each alone, its own answer
                results = [await asyncio.to_thread(self.alone, img) for img, _ in items]
            for (_, future), result in zip(items, results):
                if not future.done():
                    future.set_exception(result) if isinstance(result, Exception) else future.set_result(result)

    def alone(self, img):
        try:
            return self.predict([img])[0]
        except Exception as e:
            return e

    async def __call__(self, img):
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((img, future))
        return await future


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{script}</title>
<style>body{{font:16px system-ui,sans-serif;max-width:44rem;margin:2rem auto;padding:0 1rem}}
#drop{{display:block;border:2px dashed #888;border-radius:8px;padding:2rem;text-align:center}}
#drop.over{{background:#eef}} canvas{{max-width:100%;margin-top:1rem}} pre{{font-size:1.2rem}}</style></head>
<body><h1>{script}</h1><p>{about}</p>
<label id="drop">Drop an image here, or pick one: <input type="file" id="file" accept="image/*"></label>
<pre id="answer"></pre><canvas id="view"></canvas>
<script>
const answer = document.getElementById("answer"), drop = document.getElementById("drop");
function describe(r) {{
  if (r.error) return "error: " + r.error;
  if ("code" in r) return "code: " + r.code + "  (confidence " + r.confidence.toFixed(2) + ")";
  if (r.top) return r.top.map(t => t.label + ": " + (100 * t.probability).toFixed(2) + "%").join("\\n");
  return r.boxes.length + (r.boxes.length == 1 ? " face" : " faces");
}}
async function send(file) {{
  answer.textContent = "reading " + file.name + " ...";
  let result;
  try {{
    const response = await fetch("predict", {{method: "POST", body: file,
      headers: {{"Content-Type": file.type || "application/octet-stream"}}}});
    result = await response.json();
  }} catch (e) {{ result = {{error: String(e)}}; }}
  answer.textContent = describe(result);
  const canvas = document.getElementById("view"), g = canvas.getContext("2d");
  try {{
    const img = await createImageBitmap(file);
    canvas.width = img.width; canvas.height = img.height; g.drawImage(img, 0, 0);
    g.strokeStyle = "#0f0"; g.lineWidth = Math.max(2, img.width / 250);
    for (const b of result.boxes || []) g.strokeRect(b.x, b.y, b.w, b.h);
  }} catch (e) {{ canvas.width = 0; }}
}}
document.getElementById("file").addEventListener("change", e => e.target.files[0] && send(e.target.files[0]));
drop.addEventListener("dragover", e => {{ e.preventDefault(); drop.classList.add("over"); }});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => {{ e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files[0]) send(e.dataTransfer.files[0]); }});
</script></body></html>
"""


def cmd_serve(args):
    """HTTP service: POST /predict (the image as the body or a multipart file field) -> eval's JSON; GET /health,
    /info and / (a page to try it). Bad input is a JSON error with a 4xx status; Ctrl-C stops it cleanly.
    --workers N: uvicorn runs N processes on one port, each building the app with serve_worker()."""
    if args.workers > 1 and "." in SCRIPT:   # the workers import this file by its name, where "a.b" means a package
        raise UserError(f"--workers {args.workers}: the worker processes import {SCRIPT}.py by its name, which cannot "
                        f"hold a dot; rename the copy ({SCRIPT.replace('.', '_')}.py) or use --workers 1", 2)
    uvicorn = import_optional("uvicorn", "uvicorn", "serve")
    app, path = serve_app(args)   # also with --workers: a bad model or option fails here, in one line
    with contextlib.suppress(ImportError, ValueError, OSError):   # each connection holds a file descriptor: as many
        import resource                                          # as the system allows (the soft limit is often 1,024)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        for limit in (want, min(want, 10240)):   # macOS refuses more than 10,240 (OPEN_MAX) with no error of its own
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
                break
    try:   # a port in use or a host that is not this machine: one line, before "serving"
        family = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)[0][0]
        socket.create_server((args.host, args.port), family=family).close()
    except OSError as e:
        raise UserError(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror or e})")
    host = f"[{args.host}]" if ":" in args.host else args.host   # an IPv6 address in a URL
    print(f"serving {path} on http://{host}:{args.port}/ "
          f"({args.workers} process{'es' if args.workers > 1 else ''}; Ctrl-C stops)", flush=True)
    if args.workers == 1:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", http=serve_protocol, **SERVE_LIMITS)
        return 0
    del app   # the worker processes load their own model; this one only checked that it loads
    with tempfile.TemporaryDirectory(prefix=f"{SCRIPT}-serve-") as private:   # a worker restarted after a crash
        copy = Path(private) / Path(path).name       # loads the model the others run, whatever DATA_DIR holds now
        shutil.copyfile(path, copy)
        os.environ[SERVE_OPTIONS] = json.dumps({**{k: v for k, v in vars(args).items() if k != "func"},
                                                "model": str(path), "model_copy": str(copy)})
        uvicorn.run(f"{SCRIPT}:serve_worker", factory=True, app_dir=str(Path(__file__).resolve().parent),
                    workers=args.workers, host=args.host, port=args.port, log_level="warning",
                    http=f"{SCRIPT}:serve_protocol", **SERVE_LIMITS)
    return 0


def serve_protocol(**kwargs):
    """uvicorn's HTTP/1.1 protocol (h11) for one connection of serve, with what uvicorn leaves out: a deadline of
    HEADER_SECONDS for each request's line and headers (a client could open connections and send nothing, or a
    byte now and then, until no file descriptor is left), and at most MAX_CONNECTIONS open at once."""
    return serve_protocol_class()(**kwargs)


@cache
def serve_protocol_class():
    """The class of serve_protocol, made once: uvicorn is an optional package."""
    base = importlib.import_module("uvicorn.protocols.http.h11_impl").H11Protocol
    most = MAX_CONNECTIONS if os.name != "nt" else min(MAX_CONNECTIONS, 500)   # Windows' select(): 512 sockets
    with contextlib.suppress(ImportError, ValueError, OSError):   # below the descriptors this process may open
        import resource
        most = min(most, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 100)

    class Protocol(base):
        def connection_made(self, transport):
            super().connection_made(transport)
            if len(self.connections) > most:
                transport.abort()   # closed at once, its descriptor freed
            else:
                self.deadline(self.cycle)

        def on_response_complete(self):
            cycle = self.cycle   # before the next request, pipelined behind this one, may start its cycle
            super().on_response_complete()
            self.deadline(cycle)   # the next request on this connection has as long

        def connection_lost(self, exc):
            self.deadline(None, arm=False)   # no timer keeps a closed connection for HEADER_SECONDS
            super().connection_lost(exc)

        def send_400_response(self, msg):   # a request h11 cannot parse: {"error"} as every refusal (was text)
            h11, body = importlib.import_module("h11"), json.dumps({"error": "not a valid HTTP request"}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def deadline(self, cycle=None, arm=True):
            # complete headers start a new cycle: the connection is closed only when none has started since
            if getattr(self, "header_timer", None):
                self.header_timer.cancel()
            self.header_timer = arm and self.loop.call_later(
                HEADER_SECONDS, lambda: self.cycle is cycle and self.transport.close())
    return Protocol


def serve_worker():
    """uvicorn's app factory in each process of serve --workers N: the parent's options, a share of the cores."""
    args = argparse.Namespace(**json.loads(os.environ[SERVE_OPTIONS]))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.workers))
    return serve_app(args)[0]


def serve_app(args):
    """The FastAPI app of serve, and the model's path."""
    fastapi = import_optional("fastapi", "fastapi", "serve")
    import_optional("python_multipart", "python-multipart", "serve")   # fastapi reads multipart uploads with it
    responses = importlib.import_module("fastapi.responses")
    path = args.model or Path(args.data_dir) / "model.pt"
    net, info, device = load_network(getattr(args, "model_copy", None) or path, args.device, serving=True)
    batcher = Batcher(lambda images: predict(net, info, device, args, images), args.max_batch,
                      args.max_wait_ms / 1000)
    about = {"script": SCRIPT, "model": str(path), "format": "onnx" if isinstance(net, OnnxNetwork) else "torch",
             "torch": torch.__version__, **json_ready({k: v for k, v in info.items() if k not in ("model", "input")}),
             "options": {k: getattr(args, k) for k in args.predicting}}   # serve's, for predictions (None: the model's)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(batcher.run())
        # a second Ctrl-C skips the lifespan's end, then cancels it: starlette reports that as a traceback (text);
        # a malformed request or multipart body is answered (400), not logged: a client would fill the log
        logging.getLogger("uvicorn.error").addFilter(lambda record: not record.getMessage().rstrip().endswith(
            ("asyncio.exceptions.CancelledError", "Invalid HTTP request received.")))
        logging.getLogger("python_multipart").setLevel(logging.ERROR)
        yield
        task.cancel()

    app = fastapi.FastAPI(title=SCRIPT, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    error = lambda status, reason: responses.JSONResponse({"error": reason}, status_code=status)
    app.add_exception_handler(importlib.import_module("starlette.exceptions").HTTPException,   # 404, 405: {"error"}
                              lambda request, e: responses.JSONResponse({"error": str(e.detail)}, e.status_code,
                                                                        headers=getattr(e, "headers", None)))

    @app.api_route("/health", methods=["GET", "HEAD"])   # HEAD: what uptime monitors send
    def health():
        return {"status": "ok", "images": batcher.images, "batches": batcher.batches, "pid": os.getpid()}

    @app.api_route("/info", methods=["GET", "HEAD"])
    def model_info():
        return about

    @app.api_route("/", methods=["GET", "HEAD"], response_class=responses.HTMLResponse)
    def page():
        return PAGE.format(script=f"{SCRIPT}.py", about=html.escape(__doc__.split("\n")[0]))

    client_disconnect = importlib.import_module("starlette.requests").ClientDisconnect   # starlette: fastapi's base
    decoding, pixels = asyncio.Semaphore(2), PixelBudget(2 * MAX_PIXELS)
    bodies = {"held": 0, "limit": UPLOADS_HELD * args.max_bytes}   # bytes of raw bodies (default: 128 MB)

    def body_seconds(request):
        """How long a body may take: BODY_SECONDS, plus its length (Content-Length, else --max-bytes) at UPLOAD_RATE
        (a client sending a byte now and then holds its buffer no longer than that)."""
        length = request.headers.get("content-length", "")
        return BODY_SECONDS + (int(length) if length.isdigit() else args.max_bytes) / UPLOAD_RATE

    async def read_body(request, held):
        """The raw body, up to one byte over --max-bytes, its bytes counted in `bodies` (and in held[0], for the
        caller to give back); asyncio.TimeoutError when it is not complete within body_seconds(), MemoryError when
        the bodies held would pass UPLOADS_HELD times --max-bytes."""
        data, chunks = bytearray(), request.stream().__aiter__()
        deadline = asyncio.get_running_loop().time() + body_seconds(request)
        while len(data) <= args.max_bytes:
            try:
                chunk = await asyncio.wait_for(chunks.__anext__(), deadline - asyncio.get_running_loop().time())
            except StopAsyncIteration:
                break
            if bodies["held"] + len(chunk) > bodies["limit"]:
                raise MemoryError()
            bodies["held"] += len(chunk)
            held[0] += len(chunk)
            data += chunk
        return data

    @app.post("/predict")
    async def predict_image(request: fastapi.Request):
        held = [0]   # bytes of this request's body in `bodies`
        try:
            return await answer(request, held)
        except asyncio.CancelledError:   # serve stopping (uvicorn cancels what is in flight after 5 s): no traceback
            return error(503, "the server is stopping")
        finally:
            bodies["held"] -= held[0]

    def busy():
        return responses.JSONResponse({"error": f"busy: {bodies['held']:,} bytes of uploads in progress (at most "
                                       f"{UPLOADS_HELD} x --max-bytes); try again in a few seconds"}, 503,
                                      {"Retry-After": "5"})

    async def answer(request, held):
        kind = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
        length = request.headers.get("content-length")
        if request.headers.get("content-encoding", "identity").strip().lower() not in ("", "identity"):
            return error(415, f"Content-Encoding {request.headers['content-encoding'][:40]!r}: send the image "
                              "itself, not compressed")
        if length is not None and (not length.isdigit() or int(length) > args.max_bytes + 4096):
            return error(413, f"request over the limit of {args.max_bytes:,} bytes (--max-bytes)")
        name = None   # eval's "image": the multipart field's file name; a bare body has none
        if kind == "multipart/form-data":
            if length is None:
                return error(411, "a multipart upload needs a Content-Length header")
            try:
                form = await asyncio.wait_for(request.form(max_files=1, max_fields=8), 10 * BODY_SECONDS)
            except asyncio.TimeoutError:
                return error(408, f"the multipart body did not arrive within {10 * BODY_SECONDS} s")
            except Exception as e:  # starlette's own parse errors (their detail says why), a client gone
                return error(400, f"cannot read the multipart body ({getattr(e, 'detail', type(e).__name__)})")
            uploads = [v for v in form.values() if hasattr(v, "read")]
            if not uploads:
                return error(400, "the multipart body has no file field")
            data = await uploads[0].read(args.max_bytes + 1)
            name = uploads[0].filename or None
            if bodies["held"] + len(data) > bodies["limit"]:
                return busy()
            bodies["held"] += len(data)
            held[0] += len(data)
        elif kind.startswith("image/") or kind == "application/octet-stream":
            try:
                data = await read_body(request, held)
            except asyncio.TimeoutError:
                return error(408, f"the body did not arrive within {body_seconds(request):.0f} s")
            except MemoryError:
                return busy()
            except client_disconnect:   # nobody to answer; no traceback in the log either
                return error(400, "the client went away before the body was complete")
        else:
            return error(415, f"content type {kind!r}: send the image itself (image/* or application/octet-stream) "
                              "or a multipart/form-data file field")
        if not data:
            return error(400, "empty body: send an image")
        if len(data) > args.max_bytes:
            return error(413, f"image over the limit of {args.max_bytes:,} bytes (--max-bytes)")
        data = bytes(data)
        n = await asyncio.to_thread(pixel_count, data)   # over MAX_PIXELS: refused from its header, no room
        async with pixels.room(n if n <= MAX_PIXELS else 0):   # decoded images: bounded memory
            try:
                async with decoding:   # beside the event loop, not in it; two at a time
                    img = await asyncio.to_thread(load_image, data)
            except UserError as e:
                return error(400, f"cannot read image: {e}")
            try:
                return {"image": name, **await batcher(img)}
            except BrokenModel as e:
                print(f"error: /predict failed: {e}", file=sys.stderr, flush=True)
                return error(500, str(e))
            except UserError as e:
                return error(422, str(e))
            except Exception as e:  # a bug, not the client's: its name in the answer and on stderr, and serve on
                print(f"error: /predict failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                return error(500, f"prediction failed ({type(e).__name__})")

    return loopback_only(app, args.host, error, args.allowed_host or []), path


def loopback_only(app, host, error, allowed=()):
    """The app, answering on a loopback --host (the default) only requests whose Host header names this machine:
    a web page whose name its site points at 127.0.0.1 (DNS rebinding) would otherwise use the service from any
    visitor's browser, which sends the name it looked up. A request without Host (HTTP/1.0) is answered."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:   # a name: only localhost is sure to be this machine alone
        loopback = host == "localhost"
    if not loopback:
        return app
    names = {"localhost", "127.0.0.1", "::1", host, *allowed}

    async def guarded(scope, receive, send):
        if scope["type"] != "http":   # the lifespan's start and end
            await app(scope, receive, send)
            return
        asked = next((value for key, value in scope["headers"] if key == b"host"), b"").decode("latin-1")
        try:
            name = (urllib.parse.urlsplit(f"//{asked}").hostname or "").rstrip(".")
        except ValueError:   # e.g. "[" without its "]"
            name = None
        if asked and name not in names:
            await error(400, f"Host {asked[:100]!r}: this service answers requests to {host} only (behind a "
                             f"reverse proxy that passes its own name on: serve --allowed-host NAME)")(scope, receive,
                                                                                                       send)
            return
        await app(scope, receive, send)
    return guarded


def add_ship_commands(sub, common, serve_parents):
    """The export and serve commands of every script; serve_parents: the script's options for predictions."""
    p = sub.add_parser("export", parents=[common], help="model.pt -> ONNX (for onnxruntime)")
    p.add_argument("--model", default=None, help="model file (default: DATA_DIR/model.pt)")
    p.add_argument("--output", default=None, help="ONNX file (default: the model's name with .onnx)")
    p.add_argument("--force", action="store_true", help="replace --output if it exists")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("serve", parents=[common, *serve_parents],
                       help="HTTP service: POST /predict, GET /health, /info, / (a page to try it)")
    p.add_argument("--model", default=None, help="model.pt or model.onnx (default: DATA_DIR/model.pt)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--allowed-host", action="append", type=host_name, metavar="NAME",
                   help="on a loopback --host, a Host header answered besides localhost (a reverse proxy's name; "
                        "repeatable)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port")
    p.add_argument("--max-bytes", type=positive_int, default=MAX_UPLOAD, help="largest image accepted, in bytes")
    p.add_argument("--max-batch", type=positive_int, default=32, help="images of requests arriving together "
                   "that share one forward pass")
    p.add_argument("--max-wait-ms", type=wait_ms, default=5, help="how long a batch waits for more requests")
    p.add_argument("--workers", type=worker_count, default=1, help="server processes on the port, each with its "
                   "own copy of the model and a share of the CPU's cores")
    predicting = {k for parent in serve_parents for k in vars(parent.parse_args([]))}   # shown by /info
    p.set_defaults(func=cmd_serve, predicting=sorted(predicting))


# ---- Options, DATA_DIR lock, train command, eval input, main ----
MAX_INT, MAX_FLOAT = 2 ** 31 - 1, 1e4   # the largest whole number and number an option takes
MAX_GRID = 1000          # --grid: combinations at most (each a whole training run)
MAX_TAG = 200            # --tag: characters at most (a row of runs.csv)


def parse_number(text, kind, low, high=None):
    """argparse type helper: `text` as a finite int or float from `low` to `high`; anything else is an
    ArgumentTypeError, so argparse stops with one line and status 2 before any work."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}")
    if (kind is float and not math.isfinite(value)) or value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"{text!r} is out of range: it must be at least {low}"
                                         + (f" and at most {high}" if high is not None else ""))
    return value


def positive_int(text):
    return parse_number(text, int, 1, MAX_INT)


def nonneg_int(text):
    return parse_number(text, int, 0, MAX_INT)


def nonneg_float(text):
    return parse_number(text, float, 0, MAX_FLOAT)


def printable(text):
    """Text as printed for a person: control characters, line and paragraph separators, the bytes of a name that is
    not UTF-8 and the bidirectional overrides written as escapes, so that one name stays on its line and cannot
    drive the terminal or reorder what is shown; other spaces and joiners (a no-break space, U+202F in a macOS
    screenshot's name, an emoji's joiner) stay as they are, and the name as printed is the file's."""
    return "".join(repr(c)[1:-1] if unicodedata.category(c) in ("Cc", "Zl", "Zp", "Cs")
                   or "\u202a" <= c <= "\u202e" or "\u2066" <= c <= "\u2069" else c for c in str(text))


def positive_float(text):
    """A number over 0: --lr 0 trains nothing (the weights stay random) and would still save a model."""
    with contextlib.suppress(ValueError):   # a number out of range (nan, inf and 0 included): one message for all
        if not 0 < float(text) <= MAX_FLOAT:
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: it must be more than 0 and at most "
                                             f"{MAX_FLOAT:g}")
    return parse_number(text, float, 0, MAX_FLOAT)   # not a number: its message


def wait_ms(text):
    return parse_number(text, float, 0, 10_000)


def probability(text):
    return parse_number(text, float, 0, 1)


def port_number(text):
    return parse_number(text, int, 1, 65535)


def seed_int(text):
    return parse_number(text, int, 0, 2 ** 31 - 1)  # numpy takes 32-bit seeds; torchrun adds the rank


def folder_arg(text):
    """A folder to write into (--tensorboard): one that exists as a file, or a place where it cannot be made or
    written (read-only), is refused before any work."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder")
    near = Path(os.path.abspath(text))
    while not os.path.lexists(near):   # the folder, or the nearest of its parents that exists
        near = near.parent
    if not near.is_dir() or not os.access(near, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: cannot write there ({near} is not a writable folder)")
    return text


def tag_text(text):
    """--tag: a label of at most MAX_TAG printable characters (a long one made runs.csv unreadable)."""
    if len(text) > MAX_TAG or not text.isprintable():
        raise argparse.ArgumentTypeError(f"{text[:40]!r}{'...' if len(text) > 40 else ''}: at most {MAX_TAG} "
                                         "printable characters")
    return text


def host_name(text):
    """--allowed-host: a host name or address as a Host header gives it (lower case; a port, scheme or final dot
    dropped)."""
    try:
        name = urllib.parse.urlsplit(text if "//" in text else f"//{text}").hostname
    except ValueError:   # "[" without "]"
        name = None
    if not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not a host name")
    return name.rstrip(".")


def worker_count(text):
    return parse_number(text, int, 1, 256)


@contextlib.contextmanager
def lock_data_dir(data_dir, create, named="--data-dir"):
    """Hold DATA_DIR for one command (prepare, train): an exclusive fcntl.flock on DATA_DIR/.lock, which names its
    holder (pid and command line), so a second command on the same folder fails at once with one line naming it.
    The file goes when the command ends (a command that opened it just before checks that it locked the file still
    there). DATA_DIR must be a writable folder, checked here before any work; `create` makes it, else a missing one
    is left to the command to report. Under torchrun rank 0 holds it for all ranks (they meet rank 0 in
    init_process_group before reading anything). Without fcntl (Windows) nothing is locked. named: the folder in
    messages (export's: the model's folder, where its --output goes)."""
    data_dir, other = Path(data_dir), "another --data-dir" if named == "--data-dir" else "--output in another folder"
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir}: a file, not a folder; pass a folder", 2)
    made = create and not data_dir.exists()   # removed again if the command leaves it empty (an error)
    if create:
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--data-dir {data_dir}: cannot create it ({e.strerror or e})", 2)
    if fcntl is None and main_process() and data_dir.is_dir():
        print(f"note: {data_dir} is not locked on this system (no fcntl): run one command at a time on it",
              file=sys.stderr)
    if not main_process() or fcntl is None or not data_dir.is_dir():
        yield
        return
    path = data_dir / ".lock"
    f = None
    while f is None:  # until the file locked is the one at `path`: a holder may remove it just after we open it
        try:
            if not os.access(data_dir, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            f = open(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+", encoding="utf-8", errors="replace")
        except OSError as e:
            raise UserError(f"{named} {data_dir}: not writable ({e.strerror or e}); pass {other}", 2)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = (f.read().strip().splitlines() or ["another process"])[0][:300]
            f.close()
            if isinstance(e, BlockingIOError):
                raise UserError(f"{data_dir} is in use by {holder}; wait until it ends or pass {other}")
            raise UserError(f"{named} {data_dir}: cannot lock {path} ({e.strerror or e})")
        try:
            ours = os.path.samestat(os.stat(path), os.fstat(f.fileno()))
        except OSError:
            ours = False
        if not ours:
            f.close()
            f = None
    with f:
        try:
            try:   # unbuffered: a full disk fails here, with nothing left to write when the file closes
                os.ftruncate(f.fileno(), 0)
                os.write(f.fileno(), f"pid {os.getpid()} ({shlex.join(sys.argv)})\n".encode("utf-8", "replace"))
            except OSError as e:
                raise UserError(f"{named} {data_dir}: cannot write its lock file {path.name} ({e.strerror or e}); "
                                f"free some space there or pass {other}")
            recover_prepared(data_dir)
            real = Path(os.path.realpath(data_dir))   # a --grid run's folder locked alone (export beside its model):
            grid_run = real.parent.name.lower() == "grid" and (real.parent.parent / "meta.json").exists()   # the
            for folder in [data_dir, *(data_dir / "grid").glob("*/")]:   # train of its DATA_DIR may be saving in it;
                if not (grid_run and folder == data_dir):                 # and each --grid run's folder
                    restore_kept_run(folder, data_dir)
                    restore_held_model(folder)
                    restore_history(folder)
                remove_stale_temporaries(folder)
            yield
        finally:
            path.unlink(missing_ok=True)  # still locked here: the next command makes a new file
            if made:
                with contextlib.suppress(OSError):   # only if empty
                    data_dir.rmdir()


def start_worker(parent=None):
    """Start of each process of a prepare pool: one thread (the pool is the parallelism), and Ctrl-C left to the main
    process, which stops the pool: no traceback from every worker. The worker ends when the command (`parent`, its
    pid, when it forked the worker) ends, by a SIGKILL too: a worker left behind held DATA_DIR's lock and the
    terminal's output. Linux kills a forked one (PR_SET_PDEATHSIG); otherwise (a forkserver's, a spawned one, macOS,
    Windows) a thread waits for the command's process and ends the worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)   # as the pool ends it, not main()'s handler
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
        if parent is not None and os.getppid() != parent:   # the command ended before that
            os._exit(1)
    forked_on_linux = sys.platform.startswith("linux") and parent is not None
    if not forked_on_linux and (command := multiprocessing.parent_process()) is not None:
        threading.Thread(target=lambda: command.join() or os._exit(1), daemon=True).start()
    torch.set_num_threads(1)


def parallel_map(work, items, workers, desc, unit, chunksize=1):
    """[work(item) for item in items] in `workers` processes (in this one for 1), in order, with a progress bar.
    Ctrl-C drops the items still queued; a process that dies (out of memory) ends the command (run_command)."""
    parent = os.getpid() if multiprocessing.get_start_method() == "fork" else None   # forkserver: not its parent
    workers = min(workers, 61) if os.name == "nt" else workers   # ProcessPoolExecutor's limit there
    pool = ProcessPoolExecutor(workers, initializer=start_worker, initargs=(parent,)) if workers > 1 else None
    try:
        with signals_held():   # the pool forks here: a signal inside a fork was lost (and the command went on)
            answers = pool.map(work, items, chunksize=chunksize) if pool else map(work, items)
        return list(progress(answers, total=len(items), desc=desc, unit=unit))
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, except where there is none to show (None, "", or a flag's False)."""

    def _get_help_string(self, action):   # the method argparse's own ArgumentDefaultsHelpFormatter overrides
        shown = not (action.default is None or action.default is False or action.default == "")
        return super()._get_help_string(action) if shown else action.help


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line (`error: PROG: MESSAGE (see PROG --help)`), status 2; its
    help lists the defaults (subcommands' parsers are of this class too)."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def base_parser():
    """The parser every script starts from, its subcommands, and the option groups they share: --data-dir (every
    command), --device (train, eval), --seed (prepare, train)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=f"data/{SCRIPT}", help="prepared batches, model and history")
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="auto: cuda if available, else mps, else cpu")
    seed = argparse.ArgumentParser(add_help=False)
    seed.add_argument("--seed", type=seed_int, default=0, help="split and training seed")
    parser = OneLineParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{prepare,train,eval,export,serve}")
    return parser, sub, common, device, seed


def cmd_train(args):
    """Train once, or once per --grid combination (each in DATA_DIR/grid/NAME/); one runs.csv row per run."""
    named = given_options(args.train_parser, args.argv[args.argv.index("train") + 1:])
    runs = grid_runs(args, args.train_parser, named)
    if asked_for(args, "histogram_every", named) and not args.tensorboard and any(
            r.histogram_every for _, r in runs):   # 0 (never) needs no TensorBoard
        raise UserError("--histogram-every sets how often TensorBoard gets weight histograms; pass --tensorboard DIR "
                        "too", 2)
    given = named if args.resume else set()
    device = setup_distributed(args.device)
    if args.sync_bn and not dist.is_initialized() and main_process():
        print("warning: --sync-bn: one process, nothing to synchronise (torchrun with 2 or more processes on CUDA "
              "synchronises BatchNorm)", file=sys.stderr)
    data_dir = Path(args.data_dir)
    if main_process():
        read_runs(data_dir / "runs.csv")   # a damaged runs.csv: said now, not after the training it would lose
    table = []
    try:
        for name, run_args in runs:
            out_dir = data_dir / "grid" / name if name else data_dir
            tb_dir = args.tensorboard and Path(args.tensorboard) / name
            if name:
                print(f"\n== grid run {name}: {out_dir}")
            if name and run_args.resume and not (out_dir / "checkpoint.pt").exists():   # a --grid cut short
                print("no checkpoint of this run: it starts fresh")
                run_args.resume = False
            if run_args.resume and (out_dir / "checkpoint.pt").is_file():   # the run's options where none are given
                run_args = resume_options(run_args, args.train_parser, out_dir / "checkpoint.pt",
                                          given | {k for k, v in vars(run_args).items() if v != getattr(args, k)})
            started, t0 = time.strftime("%Y-%m-%d %H:%M:%S"), time.time()
            result = train(run_args, device, out_dir, tb_dir)
            options = {k: v for k, v in vars(run_args).items()
                       if k not in ("command", "func", "train_parser", "grid", "argv")}
            row = {"start": started, "tag": "/".join(filter(None, (run_args.tag, name))),
                   "run_dir": os.path.abspath(out_dir), **result, "seconds": round(time.time() - t0, 1),
                   "device": str(device), "world_size": rank_and_world()[1]}
            row |= {k: v for k, v in options.items() if k not in row}
            if main_process():
                append_run(data_dir, row)
            table.append(row)
        if dist.is_initialized():
            dist.barrier()   # leave together: rank 0 may still be scoring the test split
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if len(table) > 1:
        print(f"\n{'run':<40}{'epochs':>7}{'best val':>10}{'test':>8}{'seconds':>9}")
        for row in sorted(table, key=lambda r: -r["best_val"]):
            print(f"{row['tag']:<40}{row['epochs_run']:>7}{row['best_val']:>10.4f}{row['test']:>8.4f}"
                  f"{row['seconds']:>9.0f}")
        print(f"best validation score: {max(table, key=lambda r: r['best_val'])['run_dir']}/model.pt")
    return 0


def iter_eval_inputs(paths):
    """Yield image paths: from arguments, else piped stdin, else the interactive prompt; a folder stands for its
    images. A folder without images is a UserError when it is the only argument (nothing to do is a mistake, not a
    success); among others, or from stdin, it is yielded itself, and answered as an image that cannot be read, so
    the others are still read. So is a folder inside that cannot be read, after the images that can."""
    def expand(p, alone=False):
        unreadable = []
        images = list_images(p, unreadable) if os.path.isdir(p) else None
        if images == [] and alone and not unreadable:
            raise UserError(f"{p}: no images in this folder (extensions {', '.join(sorted(IMAGE_EXTS))})")
        if not (images or unreadable):   # a file, or a folder without images among other inputs
            return [p]
        return [str(q) for q in images] + [str(e.filename) for e in unreadable]

    if paths:
        for p in paths:
            yield from expand(p, len(paths) == 1)
    elif sys.stdin.isatty():
        while True:
            if not sys.stdout.isatty():   # eval --json > FILE: the prompt on the terminal, stdout holds answers only
                print("Image path: ", end="", file=sys.stderr, flush=True)
            try:
                line = input("Image path: " if sys.stdout.isatty() else "").strip()
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return
            if len(line) > 1 and line[0] == line[-1] and line[0] in "'\"":   # a path dropped into a terminal
                line = line[1:-1]
            if line:
                yield from expand(line)
    else:
        read = False
        for line in stdin_lines():
            if line.strip():
                read = True
                yield from expand(line.strip())
        if not read:   # `eval < /dev/null`, or a `find` that found nothing: said, not a silent success
            raise UserError("no image path on stdin (pass IMAGE arguments, or one path per line on stdin)")


def stdin_lines():
    """Piped stdin's lines, decoded as a labels file is: UTF-8 (a BOM dropped) or UTF-16 with its BOM (PowerShell's
    `>`), not in the console's code page (Windows decodes pipes as cp1252); names that are not UTF-8 keep their
    bytes (surrogateescape), as file names do."""
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:   # a text stream with no bytes below it
        return (line.lstrip("\ufeff") for line in sys.stdin)
    raw = raw if hasattr(raw, "peek") else io.BufferedReader(raw)
    utf16 = raw.peek(2)[:2] in (b"\xff\xfe", b"\xfe\xff")
    return io.TextIOWrapper(raw, encoding="utf-16" if utf16 else "utf-8-sig", errors="surrogateescape")


def add_scale_options(p):
    """Options of every train command for torchrun, mixed precision, TensorBoard and run tables."""
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="mixed precision: bf16 on CUDA where supported, else fp16 with loss scaling; the CPU uses "
                        "bf16 only where measured faster")
    p.add_argument("--sync-bn", action="store_true", help="under torchrun on CUDA: synchronise BatchNorm statistics "
                   "(an error on the CPU, a warning in one process)")
    p.add_argument("--tensorboard", type=folder_arg, metavar="DIR", default=None,
                   help="write TensorBoard logs to DIR (needs `pip install tensorboard`)")
    p.add_argument("--histogram-every", type=nonneg_int, default=5, metavar="N",
                   help="with --tensorboard: weight histograms every N epochs (0: never)")
    p.add_argument("--tag", type=tag_text, default="", help="a label for this run in DATA_DIR/runs.csv")
    p.add_argument("--grid", action="append", metavar="OPTION=V1,V2",
                   help="run every combination of these option values, each in DATA_DIR/grid/NAME/ "
                        "(repeatable, e.g. --grid lr=0.01,0.001 --grid batch-size=128,256)")


class Terminated(BaseException):
    """SIGTERM (a `kill`, a scheduler's stop): handled as Ctrl-C is, files written whole or not at all. Not a
    KeyboardInterrupt, which uvicorn and eval's prompt take as theirs."""


def on_sigterm(signum, frame):
    raise Terminated()


def main(argv=None):
    for stream in (sys.stdout, sys.stderr):   # a file name that is not UTF-8 prints escaped, not as a traceback
        with contextlib.suppress(AttributeError, ValueError):
            if stream.errors == "strict":
                stream.reconfigure(errors="backslashreplace")
    parser, given = build_parser(), sys.argv[1:] if argv is None else [str(a) for a in argv]
    if given and given[0].startswith("-") and given[0] not in ("-h", "--help"):   # said "invalid choice: 'data/x'"
        parser.error(f"options go after the command: python {SCRIPT}.py COMMAND [options]")
    args = parser.parse_args(given)
    args.argv = given   # train --resume: which options are given
    before = signal.getsignal(signal.SIGTERM)
    with contextlib.suppress(ValueError):   # main() called from another thread keeps the default
        if before is not signal.SIG_IGN:    # nohup and the like: ignored it stays
            signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return run_command(args)
    except (KeyboardInterrupt, Terminated) as e:   # just as run_command returned: one line, as inside it
        print("\nterminated" if isinstance(e, Terminated) else "\ninterrupted", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(signal.SIGTERM, before)


def run_command(args):
    """args.func under the DATA_DIR lock where it writes; every error ends here in one line and an exit status."""
    try:
        folder = args.data_dir   # one command at a time writes a DATA_DIR (lock_data_dir); export: the folder of
        if args.command == "export":   # the model when the .onnx goes beside it (a train there may be replacing it)
            model = Path(args.model or Path(args.data_dir) / "model.pt")
            beside = Path(args.output or model.with_suffix(".onnx")).parent.resolve() == model.parent.resolve()
            folder = model.parent if beside else None
        writes = args.command in ("prepare", "train") or (args.command == "export" and folder is not None)
        named = "--data-dir" if args.command != "export" else "the model's folder"
        with lock_data_dir(folder, args.command == "prepare", named) if writes else contextlib.nullcontext():
            if args.command == "prepare":
                refuse_other_data(args.data_dir)
            return args.func(args)
    except UserError as e:
        if main_process() or getattr(e, "all_ranks", False):   # under torchrun: one line, not one per process
            print(f"error: {printable(e)}", file=sys.stderr)
        return e.status
    except (KeyboardInterrupt, Terminated) as e:
        if main_process():
            print("\nterminated" if isinstance(e, Terminated) else "\ninterrupted", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except BrokenPipeError:  # e.g. `eval ... | head`
        sys.stderr.close()
        return 1
    except BrokenProcessPool:   # a worker killed, most often by the system for want of memory
        print("error: a worker process died (out of memory, or killed); nothing was replaced; run it again "
              "(prepare: with fewer --workers)", file=sys.stderr)
        return 1
    except RuntimeError as e:   # under torchrun: another process stopped, this one's collective failed (60 lines)
        lost = isinstance(e, getattr(dist, "DistError", ())) or any(
            word in str(e) for word in ("gloo", "NCCL", "Connection", "connection", "peer"))
        if int(os.environ.get("WORLD_SIZE", "1")) < 2 or not lost:   # a bug: its traceback
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"error (process {os.environ.get('RANK')}): {first[:200]} (another torchrun process may have stopped: "
              "see its message)", file=sys.stderr)
        return 1
    except OSError as e:   # a full disk, a folder where a file goes, a read-only place: the system's own words
        where = e.filename2 or e.filename   # a rename: where the file was going, not its temporary name
        rank = "" if main_process() else f" (process {os.environ.get('RANK')})"
        print(f"error{rank}: {f'{where}: ' if where else ''}{e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    status = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # done: a Ctrl-C while Python shuts down is no traceback
    if "LOCAL_RANK" in os.environ:   # a torchrun process, its work written and its process group destroyed: Gloo's
        with contextlib.suppress(OSError, ValueError):   # threads could abort the interpreter's shutdown (SIGABRT,
            sys.stdout.flush()                           # "terminate called without an active exception": 1 run in
            sys.stderr.flush()                           # ~25 here, status 1 after a finished run), so end now
        os._exit(status if isinstance(status, int) else 0)
    sys.exit(status)

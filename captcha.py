"""Read captchas of any length with a small ResNet: one softmax per code position, plus an end symbol.

Usage: python captcha.py COMMAND [options] (COMMAND --help: all of them):
    prepare [--image-dir generate-captcha/output] [--labels FILE] [--charset auto] [--length auto]
    train   [--epochs N] [--device auto] [--resume]
    eval    [IMAGE_OR_FOLDER ...] [--json]
    export  [--model PATH] [--output model.onnx]   # for ONNX Runtime
    serve   [--model model.pt|model.onnx] [--port 8000]   # HTTP: POST /predict, a page at /
    train under `torchrun --standalone --nproc_per_node=N`: DDP over N processes or GPUs (README.md)

Data: a folder of images (png, jpg, jpeg, gif, bmp, webp; the file content decides the format) named
CODE.ext or PREFIX-CODE.ext (the code is the name after its last '-': `2b827.png`, `00042-8cA6.png`), or any
names listed with their codes in a --labels file (CSV `file,code` or `file code` lines). Codes are lower-cased
unless --case-sensitive; the charset is what the codes use (--charset auto) and codes of several lengths may
be mixed (--length auto). Names whose code breaks a rule are skipped and counted.
Result: 95.2% exact-match on 2,000 held-out generated captchas after 53 minutes of training on a 2-core CPU
with native bf16 (20,000 generated, 92 epochs; 93.65% after 24 epochs, 52 minutes, in fp32; benchmarks/RESULTS.md);
99.35% of plain one-font captchas after 16 minutes on 900 labels (benchmarks/plain_captchas.py).
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
import re
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
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import cache, partial
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
SCRIPT = Path(__file__).stem
IMAGE_DIR = "generate-captcha/output"   # --image-dir: where generate-captcha/generate.py writes (beside this script)
DATA_KIND = SCRIPT
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp"}
SHARD_SIZE = 1000
SPLITS = ("training_set", "validating_set", "testing_set")
MAX_PIXELS = 16_000_000                 # bigger images (decompression bombs) are refused before decoding
SHARD_SPEC = ((torch.uint8, (3, None, None)), (torch.int64, (None,)))   # images, codes (character indices, end)
META_KEYS = {   # what train reads from meta.json, checked as check_model checks a model's (lengths: None in old data)
    "charset": lambda v: isinstance(v, str) and 0 < len(v) == len(set(v)), "case_sensitive": bool,
    "image_size": lambda v: numbers(v, 2, 16, 1024, True), "length": lambda v: numbers([v], 1, 1, MAX_LENGTH, True),
    "lengths": lambda v: v is None or isinstance(v, list) and bool(v) and numbers(v, len(v), 1, MAX_LENGTH, True)}
MODEL_KEYS = ("model", "model_args", "charset", "image_size")   # what eval reads from model.pt
CHARSETS = {  # --charset accepts auto (the characters of the codes), one of these names, or a literal string
    "a-z0-9": "0123456789abcdefghijklmnopqrstuvwxyz",
    "A-Za-z0-9": "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
    "0-9": "0123456789",
    "a-z": "abcdefghijklmnopqrstuvwxyz",
}
LABEL_REGEX = r"^(?:.*-)?([^-]+)\.[^.]+$"   # the code: the file name after its last '-', or the whole stem
MAX_LENGTH = 16           # longest code a model reads; longer codes are skipped
MAX_LABELS_BYTES = 32 << 20   # a --labels file larger than this is refused
MAX_LABELS_LINES = 500_000    # ... or longer (each line's file is looked up: ~1 KB of memory a line)
MAX_LABEL_LINE = 4096         # a longer line of a --labels file is skipped, not read
OUTSIDE = "characters outside the charset: "   # a skip reason, followed by the characters
LABEL_HEADERS = {"file", "filename", "file_name", "name", "image", "image_name", "img", "path", "filepath",
                 "file_path", "image_path"}   # the file column of an optional header (lower case, '_' for spaces)
CODE_HEADERS = {"code", "label", "text", "captcha", "answer", "solution", "value", "truth"}   # its code column
# The measured reasons for the constants below: benchmarks/RESULTS.md, "Why the captcha recipe's constants are what
# they are". Input 40 px high (strokes stay 1-2 px wide), as wide as the images' median aspect ratio (a multiple of 8)
IMAGE_HEIGHT = 40
WIDTH_RANGE = (48, 256)
ASPECT_SAMPLE = 200       # images whose size decides the width with --image-size auto
# Split: validation and test each take 10% (at most 1,000 images); a set under 2,000 images keeps no test split
SPLIT_FRACTION, SPLIT_MAX, TEST_MIN_SET = 0.1, 1000, 2000
# train's defaults (--epochs, --patience, --batch-size, --lr): AdamW, one-cycle schedule peaking at LR
EPOCHS, PATIENCE, BATCH_SIZE, LR = 60, 20, 128, 3e-3
EPOCH_SIZE = 5000         # training images per epoch at least: a smaller set repeats, each copy augmented afresh
RANK_MIN = 50             # fewer validation codes do not rank epochs: the whole schedule runs, the last model is kept
# --augment auto: 1 up to AUGMENT_FULL training images, then (AUGMENT_FULL / N) ** 0.75 * (passes / AUGMENT_PASSES)
# ** 0.6 (at most 1); under AUGMENT_FEW images (AUGMENT_FEW / N) ** 0.6, at most AUGMENT_MAX
AUGMENT_FULL, AUGMENT_PASSES = 1000, 5
AUGMENT_FEW, AUGMENT_MAX = 450, 1.5
AUGMENT_RAMP = 0.25       # the strength rises linearly over this share of the epochs, from 1/ramp of its value
FEW_LABELS = 5000         # under this many training images, train suggests --init (a reader of generated captchas)
CPU_BF16 = True          # bf16 autocast on CPUs with native bf16 (AVX512-BF16/AMX): 1.7x faster training
# eval reads each captcha in 5 views, shifted by one pixel each way, and averages the log-probabilities (the
# confidence is calibrated on the same views)
VIEWS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))   # (dx, dy) in pixels of the model's input
CALIBRATION_MIN = 3      # right and wrong validation codes each that a calibration needs (else: the raw confidence)
# A validation split read (nearly) all right, or of under CALIBRATION_CODES codes, is read again under the training
# distortions at full strength, CALIBRATION_READS reads in all, and the calibration (Platt scaling) fitted on both
CALIBRATION_READS = 2000
CALIBRATION_CODES = 100


# ---- Data ----
def to_input(img, image_size):
    """PIL image -> uint8 3,H,W at the model's input size. Used by prepare and eval alike."""
    h, w = image_size
    return image_to_tensor(img.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=2.0))


def preprocess(x):
    """uint8 B,3,H,W -> float in [-1, 1], channels_last. The only normalisation, for train and eval."""
    return (x.float() / 127.5 - 1.0).contiguous(memory_format=torch.channels_last)


def resolve_charset(name, case_sensitive):
    """--charset NAME|STRING -> the characters, in order; None for auto (taken from the codes in prepare)."""
    if name == "auto":
        return None
    name = unicodedata.normalize("NFC", name)   # as the codes are
    if name not in CHARSETS and not re.fullmatch(r"-?(?:[^-]-[^-]|[^-])*-?", name):
        raise UserError(f"--charset {name!r}: a '-' inside the string joins the two ends of a range (a-f); a literal "
                        "'-' goes first or last", 2)
    chars = CHARSETS.get(name) or re.sub(r"([^-])-([^-])", expand_range, name)
    chars = "".join(dict.fromkeys(chars if case_sensitive else chars.lower()))  # unique, order kept
    if len(chars) < 2:
        raise UserError(f"--charset {name!r}: needs at least 2 distinct characters", 2)
    return chars


def expand_range(match):
    """'a-f' -> 'abcdef' in a --charset literal (digits, lower or upper case letters; 'z-a' or 'a-9' are refused)."""
    first, last = match.groups()
    if not (first <= last and any(first in kind and last in kind for kind in (
            "0123456789", "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"))):
        raise UserError(f"--charset: {match.group(0)!r} is not a range of digits or of letters of one case (a "
                        "literal '-' goes first or last)", 2)
    return "".join(map(chr, range(ord(first), ord(last) + 1)))


def check_code(code, charset, length, case_sensitive):
    """A code as written -> (code, None) or (None, reason). charset/length None: any (auto)."""
    code = unicodedata.normalize("NFC", code.strip())   # a name from macOS holds é as e + a combining accent
    code = code if case_sensitive else code.lower()
    if not code:
        return None, "empty code"
    if any("\udc80" <= c <= "\udcff" for c in code):   # bytes of a name that is not UTF-8 (surrogateescape)
        return None, "file name not UTF-8"
    if any(c.isspace() or not c.isprintable() for c in code):
        return None, "code with spaces or control characters"
    if length is not None and len(code) != length:
        return None, f"code of length {len(code)}, not {length}"
    if len(code) > MAX_LENGTH:
        return None, f"code longer than {MAX_LENGTH} characters"
    bad = "".join(sorted(set(code) - set(charset))) if charset is not None else ""
    return (None, OUTSIDE + bad) if bad else (code, None)


def parse_code(name, regex, charset, length, case_sensitive):
    """File name -> (code, None) or (None, reason)."""
    match = regex.match(name)
    return check_code(match.group(1), charset, length, case_sensitive) if match else (None, "no code in the name")


def group_outside(skipped):
    """One skip reason for every code with characters outside the charset (not one line per set of characters)."""
    grouped, outside = {}, set()
    for reason, names in skipped.items():
        if reason.startswith(OUTSIDE):
            outside.update(reason[len(OUTSIDE):])
            reason = OUTSIDE
        grouped.setdefault(reason, []).extend(names)
    if outside:
        chars = "".join(sorted(outside))
        grouped[f"{OUTSIDE}{chars[:40]}{'...' if len(chars) > 40 else ''}"] = grouped.pop(OUTSIDE)
    return grouped


def doubtful_codes(codes):
    """Signs that file names read as codes are not codes (names like img_001.png, or a prefix joined by '_')."""
    doubts = []
    prefix = os.path.commonprefix(codes)
    if len(codes) >= 10 and len(prefix) >= 3:
        doubts.append(f"every code begins with {prefix!r}: are the file names codes? Name files CODE.png or "
                      f"PREFIX-CODE.png, or pass --labels FILE or --label-regex")
    numbers = sorted(int(c) for c in codes if c.isdigit() and c.isascii())
    if len(codes) >= 10 and len(numbers) == len(codes) and numbers == list(range(numbers[0], numbers[0] + len(codes))):
        doubts.append(f"the codes are the numbers {numbers[0]} to {numbers[-1]}: are the files numbered rather than "
                      "named by their codes? Pass --labels FILE")
    joined = [c for c in codes if "_" in c]
    if joined:
        doubts.append(f"{len(joined)} codes hold '_' (e.g. {joined[0]!r}); if it joins a prefix to the code, pass "
                      "--label-regex '^(?:.*_)?([^_]+)\\.[^.]+$'")
    copies = [c for c in codes if re.search(r"\(\d+\)$|\.(png|jpe?g|gif|bmp|webp)$", c, re.I)]
    if copies:   # `2b827(1).png`, `2b827.png.png`: a download's second copy, its mark read as characters
        doubts.append(f"{len(copies)} codes end like a copied or twice-named file (e.g. {copies[0]!r}): their marks "
                      "are now characters of the charset; rename or remove those files")
    return doubts


def guess_separator(lines):
    """The field separator of a labels file's lines: the one of tab, comma and semicolon that splits the most of
    them into one same number (2 or more) of fields (a tie: in that order); None (whitespace) if none does. A
    semicolon file with decimal commas (`a.png;abcd;0,93`) is read by its semicolons."""
    best, best_lines = None, 0
    for sep in "\t,;":
        counts = [line.count(sep) + 1 for line in lines]
        fields = max(set(counts), key=lambda n: (counts.count(n), n)) if counts else 1
        if fields >= 2 and counts.count(fields) > best_lines:
            best, best_lines = sep, counts.count(fields)
    return best


def read_labels(path, image_dir):
    """--labels FILE -> ({image path: code as written}, {reason: [line numbers or names]}, {every file a line names,
    as resolved and as written}). Lines `file,code` (CSV), `file<TAB>code` or `file code`, an optional header (which
    names the code column when there are more); a file must resolve inside image_dir. A line that cannot be used is
    skipped and counted, never the end of prepare."""
    path, root = Path(path), Path(image_dir).resolve()
    if not path.exists():
        raise UserError(f"--labels {path}: no such file; pass the file that lists each image's code")
    if not path.is_file():   # a folder, or a FIFO (a pipe would block the read)
        raise UserError(f"--labels {path}: not a regular file; pass the labels file itself")
    if path.stat().st_size > MAX_LABELS_BYTES:
        raise UserError(f"--labels {path}: larger than {MAX_LABELS_BYTES >> 20} MB")
    lines = read_text(path).splitlines()
    if len(lines) > MAX_LABELS_LINES:
        raise UserError(f"--labels {path}: {len(lines):,} lines, over the limit of {MAX_LABELS_LINES:,} "
                        "(MAX_LABELS_LINES)")
    sep = guess_separator([line for line in lines if line.strip() and not line.lstrip().startswith("#")][:20])

    def comment(line):   # `# ...`; a `#name.png,code` line holds the separator and is not one
        text = line.lstrip()
        return text.startswith("#") and (sep not in text if sep else text[1:2] in ("", " "))

    first = next((line for line in lines if line.strip() and not comment(line)), "")   # a header, if any
    fields = len(first.split()) if header_names(first.split()) else 2   # as many as a `file code` header names
    split = ((lambda line: line.split("\t")) if sep == "\t" else
             (lambda line: next(csv.reader([line], delimiter=sep, skipinitialspace=True), [])) if sep else
             (lambda line: line.split(None, fields - 1)))
    labels, skipped, mentioned, columns, named = {}, defaultdict(list), set(), (0, 1), False
    folder = Path(image_dir).absolute()   # names as written, for the files counted "not in the labels file"
    for number, line in enumerate(lines, 1):
        if comment(line):
            continue
        if len(line) > MAX_LABEL_LINE:
            skipped[f"line over {MAX_LABEL_LINE} characters"].append(f"line {number}")
            continue
        row = [cell.strip() for cell in split(line)]
        while len(row) > 2 and not row[-1]:   # `file,code,`: a trailing comma is no third field
            row.pop()
        if not any(row):
            continue
        names = line is first and header_names(row, root)
        if names:
            file_column = next((i for i, n in enumerate(names) if n in LABEL_HEADERS), 0)
            code_column = next((i for i, n in enumerate(names) if i != file_column and n in CODE_HEADERS),
                               1 - file_column if len(row) == 2 else None)
            if code_column is None:
                raise UserError(f"--labels {path}: which column holds the code? name it 'code' in the header "
                                f"(header: {line[:80]!r})")
            columns, named = (file_column, code_column), True
            continue
        if len(row) > columns[0] and row[columns[0]]:   # counted once, whatever becomes of the line
            mentioned.add(os.path.normpath(folder / row[columns[0]]))
        if len(row) > 2 and not named or sep is None and len(row) - 1 == columns[1] and len(row[-1].split()) > 1:
            # file,code,more or `file code more`: which field is the code?
            skipped["line of more than two fields (a header naming the code column says which)"].append(
                f"line {number}")
            continue
        name, code = (row[i] if len(row) > i else "" for i in columns)
        try:   # nothing outside image_dir is looked at beyond where the name leads
            target = (root / name).resolve()
            kind = (("file" if target.is_file() else "other" if target.exists() else "missing")
                    if target.is_relative_to(root) else   # else the name leads out, or a link it passes does
                    "link" if Path(os.path.normpath(root / name)).is_relative_to(root) else "outside")
            parts = Path(name).parts
            if kind == "missing" and len(parts) > 1 and parts[0] in (root.name, folder.name):
                below = (root / Path(*parts[1:])).resolve()   # `images/x.png` with --image-dir images
                if below.is_file() and below.is_relative_to(root):
                    kind = "above"
                    mentioned.add(below)
        except (OSError, ValueError, RuntimeError):   # a NUL byte, a name too long, a symlink loop
            skipped["unusable file name"].append(f"line {number}")
            continue
        if name:
            mentioned.add(target)
        if not name or not code:
            skipped["line without a code" if name else "line without a file name" if code else
                    "line without a file name and a code (tab, comma, semicolon or space separated)"].append(
                f"line {number}")
        elif kind == "outside":
            skipped["file outside --image-dir"].append(name)
        elif kind == "link":
            skipped["a link leading out of --image-dir (links are followed inside it only)"].append(name)
        elif kind == "above":
            skipped[f"listed file not found: names are read inside --image-dir, and these begin with its own name "
                    f"{Path(name).parts[0]!r} (pass the folder above it as --image-dir)"].append(name)
        elif kind != "file":
            skipped["listed file not found" if kind == "missing" else "listed, not a regular file"].append(name[:80])
        elif target in labels:
            skipped["file listed twice (first code kept)"].append(name)
        else:
            labels[target] = code
    return labels, dict(skipped), mentioned


def header_names(cells, root=None):
    """A labels file's first line, split -> its words (lower case, '_' for spaces) if they name its columns (a file
    or code header, and no cell an image name, nor, given root, an image inside it), else None."""
    names = [cell.lower().replace(" ", "_") for cell in cells]
    if (any(n in LABEL_HEADERS for n in names) or any(n in CODE_HEADERS for n in names[1:])) and not any(
            Path(cell).suffix.lower() in IMAGE_EXTS or root and image_in(root, cell) for cell in cells):
        return names
    return None


def image_in(root, name):
    """Is `name` a file inside the folder `root` (resolved)? Nothing outside it is looked at; no name raises."""
    try:
        target = (root / name).resolve()
        return target.is_relative_to(root) and target.is_file()
    except (OSError, ValueError, RuntimeError):   # a NUL byte, a name too long, a symlink loop
        return False


def length_text(lengths):
    """[3, 4, 5] -> '3-5', [4] -> '4'."""
    return str(lengths[0]) if len(lengths) == 1 else f"{lengths[0]}-{lengths[-1]}"


def auto_image_size(paths):
    """(IMAGE_HEIGHT, width) with the width from the median aspect ratio of up to ASPECT_SAMPLE images."""
    ratios = []
    for p in paths[::max(1, len(paths) // ASPECT_SAMPLE)]:
        with contextlib.suppress(UserError):   # counted when prepare decodes it
            width, height = load_image(p).size
            ratios.append(width / max(height, 1))
    ratio = float(np.median(ratios)) if ratios else 2.4
    return IMAGE_HEIGHT, int(np.clip(round(IMAGE_HEIGHT * ratio / 8) * 8, *WIDTH_RANGE))


def decode_file(path, image_size):
    """Worker: path -> (uint8 array 3,H,W, None) or (None, reason). Numpy, not torch: a tensor sent back from
    a worker process holds a file descriptor open, and thousands of them exhaust the process's limit."""
    try:
        return to_input(load_image(path), image_size).numpy(), None
    except UserError as e:  # missing, not an image, damaged, too many pixels: skipped and counted
        return None, f"unreadable image: {e}"


def split_sizes(n, split):
    """Images for (train, validation, test) out of n: --split auto (see SPLIT_FRACTION) or percentages T/V/T."""
    if split == "auto":
        n_val = min(max(round(SPLIT_FRACTION * n), 1), SPLIT_MAX) if n > 1 else 0
        n_test = n_val if n >= TEST_MIN_SET else 0
    else:
        n_val, n_test = (round(n * p / 100) for p in split[1:])
    return n - n_val - n_test, n_val, n_test


def split_indices(n, seed, sizes):
    """Deterministic train/val/test split of range(n) into the given sizes: same n and seed -> same split."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_train, n_val, _ = sizes
    return perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]


# ---- Model ----
class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with a shortcut (1x1 conv when the shape changes)."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CaptchaNet(nn.Module):
    """ResNet-style trunk (a stride-2 stem, then 4 stages of basic blocks, each halving the resolution
    after the first) -> feature map C,h,w -> one softmax per code position over the charset plus an end symbol
    (the last class), which pads codes shorter than `length`."""

    def __init__(self, n_classes, length, image_size, widths=(32, 64, 128, 192), blocks=(1, 2, 2, 1)):
        super().__init__()
        self.length, self.n_classes = length, n_classes
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        layers, c_in = [], widths[0]
        for stage, (c_out, n) in enumerate(zip(widths, blocks)):
            for i in range(n):
                layers.append(BasicBlock(c_in, c_out, 2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        h, w = (math.ceil(d / 2 ** len(widths)) for d in image_size)  # the stem and 3 strided stages halve it
        # Head: each code position has a learned query that attends over the feature map's places (plus a
        # learned position code), and ONE classifier reads every position (measured: benchmarks/RESULTS.md).
        self.positions = nn.Parameter(torch.randn(c_in, h * w) * 0.02)
        self.queries = nn.Parameter(torch.randn(length, c_in) * c_in ** -0.5)
        # A learned prior over the places, started as "character i sits in the i-th slice of the width": without
        # it every query first attends to the whole image alike and the reader takes many epochs to start.
        column = (torch.arange(w) + 0.5) / w                                       # place's x in (0, 1)
        centre = (torch.arange(length) + 0.5) / length
        prior = -0.5 * ((column[None, :] - centre[:, None]) * length * 1.5) ** 2    # L,w
        self.prior = nn.Parameter(prior.repeat(1, h))                              # L,N (places row by row)
        self.register_load_state_dict_pre_hook(   # a model saved before the prior existed reads with a flat one
            lambda module, state, prefix, *_: state.setdefault(prefix + "prior", torch.zeros_like(module.prior)))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(c_in, n_classes))

    def forward(self, x):  # B,3,H,W -> B,length,n_classes
        f = self.layers(self.stem(x)).flatten(2)                                          # B,C,N places
        attn = (torch.einsum("lc,bcn->bln", self.queries, f + self.positions) + self.prior).softmax(-1)  # B,L,N
        return self.classifier(torch.einsum("bln,bcn->blc", attn, f))                    # B,L,K


# ---- Train / evaluate helpers ----
def augment(x, generator, strength=1.0):
    """Random distortions of a whole uint8 batch on its device, returned as preprocess() would return the batch:
    affine jitter (shift +-4 px, scale 0.9-1.1, rotation +-5 degrees, shear +-0.15), a smooth elastic warp
    (+-1.5 px), contrast and brightness, a thin random line across half of the images, and pixel noise.
    `strength` scales every magnitude (0: none). Captchas of one generator sit at fixed places in one style;
    this makes the reader robust to other layouts and is what lets a small training set generalise."""
    b, _, h, w = x.shape
    r = (torch.rand(b, 12, generator=generator, device=x.device) * 2 - 1) * strength  # B,12 in [-s, s]
    angle, scale, shear = r[:, 0] * (5 * np.pi / 180), 1 + 0.1 * r[:, 1], 0.15 * r[:, 2]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, (shear - sin) * h / w, r[:, 3] * 8 / w], 1),
                         torch.stack([sin * w / h, cos, r[:, 4] * 8 / h], 1)], 1)  # B,2,3
    grid = F.affine_grid(theta, [b, 3, h, w], align_corners=False)            # B,H,W,2 in [-1, 1]
    warp = torch.randn(b, 2, 3, 6, generator=generator, device=x.device) * (1.5 * strength)  # px, coarse
    warp = F.interpolate(warp, size=(h, w), mode="bilinear", align_corners=True)
    grid = grid + (warp * torch.tensor([2 / w, 2 / h], device=x.device)[:, None, None]).permute(0, 2, 3, 1)
    # sampling the image shifted to [-2, 0] pads with 0, which is white (1.0) once shifted back
    out = F.grid_sample(preprocess(x) - 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 1
    mean = out.mean((1, 2, 3), keepdim=True)
    out = (out - mean) * (1 + 0.3 * r[:, 5, None, None, None]) + mean + 0.2 * r[:, 6, None, None, None]
    # a thin line: the pixels within 0.7 px of a random line through the image, in a random grey
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    angle = r[:, 7, None, None] * np.pi
    dist = (xs - w / 2 - r[:, 8, None, None] * w / 2) * torch.sin(angle) - (ys - h / 2) * torch.cos(angle)
    line = (dist.abs() < 0.7) & (r[:, 9, None, None] > 0)                      # B,H,W; about half the images
    out = torch.where(line[:, None], r[:, 10, None, None, None], out)
    noise = torch.randn(out.shape, generator=generator, device=x.device)
    out = out + noise * (0.05 * r[:, 11].abs())[:, None, None, None]
    return out.clamp(-1, 1).contiguous(memory_format=torch.channels_last)


def run_epoch(model, x, y, device, batches, dtype, optimizer=None, scheduler=None, scaler=None, generator=None,
              strength=1.0):
    """One pass over uint8 images x (N,3,H,W) and codes y (N,L, padded with the end symbol) in the given index
    batches. Trains when an optimizer is given. Returns sample-weighted mean loss, exact-match and
    per-character accuracy (over the codes' own characters), and the count."""
    train = optimizer is not None
    model.train(train)
    n = sum(len(idx) for idx in batches)
    total_loss = torch.zeros((), device=device)
    counts = torch.zeros(3, device=device, dtype=torch.long)   # codes read right, characters read right, characters
    bar = progress(total=n, unit="img", leave=False, desc="train" if train else "eval")
    with torch.set_grad_enabled(train):
        for idx in batches:
            xb, yb = x[idx], y[idx]
            inputs = augment(xb, generator, strength) if train else preprocess(xb)
            with autocast(device, dtype):
                logits = model(inputs)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), yb.flatten(),
                                       label_smoothing=0.1 if train else 0.0)
            if train:
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
            correct = as_read(logits.argmax(-1), logits.shape[-1] - 1) == yb
            is_char = yb < logits.shape[-1] - 1          # not the end symbol
            total_loss += loss.detach() * len(idx)
            counts += torch.stack([correct.all(1).sum(), (correct & is_char).sum(), is_char.sum()])
            bar.update(len(idx))
    bar.close()
    m, (exact, chars, n_chars) = max(n, 1), counts.tolist()
    return total_loss.item() / m, exact / m, chars / max(n_chars, 1), n


def shifted_views(x, views):
    """Preprocessed B,3,H,W -> V*B,3,H,W: the batch shifted by each (dx, dy) of views, the edges filled white."""
    h, w = x.shape[2:]
    m = max(max(abs(dx), abs(dy)) for dx, dy in views)
    padded = F.pad(x, (m, m, m, m), value=1.0)
    return torch.cat([padded[:, :, m - dy:m - dy + h, m - dx:m - dx + w] for dx, dy in views]).contiguous(
        memory_format=torch.channels_last)


def read_logp(net, x, views):
    """uint8 B,3,H,W -> log-probabilities B,L,K of the network (torch or ONNX), averaged over the shifted views."""
    logp = net(shifted_views(preprocess(x), views)).float().log_softmax(-1)
    return logp.unflatten(0, (len(views), len(x))).mean(0)


@torch.no_grad()
def read_codes(model, x, device, batch_size, dtype, views=((0, 0),)):
    """uint8 images N,3,H,W -> (predicted classes N,L, log of the raw confidence N: the sum over positions of
    the log-probability of the predicted class), each image read in the given views."""
    model.eval()
    preds, scores = [], []
    for idx in in_order(len(x), max(1, batch_size // len(views)), device):
        with autocast(device, dtype):
            logp = read_logp(model, x[idx], views)
        best, pred = logp.max(-1)
        preds.append(as_read(pred, logp.shape[-1] - 1))
        scores.append(best.sum(1))
    return torch.cat(preds), torch.cat(scores)


def as_read(pred, end):
    """Predicted classes N,L as eval reads them: every position after the first end symbol is one too (decode_code
    stops there), so that exact-match and per-character figures are those of the codes eval prints."""
    return pred.masked_fill((pred == end).cumsum(1) > 0, end)


def decode_code(classes, charset):
    """Class indices of one image -> the code: its characters up to the first end symbol."""
    return "".join(charset[i] for i in itertools.takewhile(lambda i: i < len(charset), classes))


def fit_calibration(scores, correct):
    """Platt scaling: P(code right) = sigmoid(a * score + b), score the log raw confidence, fitted on the
    validation codes (Platt's smoothed targets). None (eval then gives the raw confidence, in the same order) under
    CALIBRATION_MIN right or wrong codes, or for a slope a <= 0: a validation split read all right (or all wrong)
    has nothing to fit the slope on, and a flat fit would give every image, a blank one too, the same confidence."""
    scores, correct = scores.double().cpu(), correct.cpu()
    n_right = correct.sum().item()
    if min(n_right, len(correct) - n_right) < CALIBRATION_MIN:
        return None
    targets = torch.where(correct, (n_right + 1) / (n_right + 2), 1 / (len(correct) - n_right + 2)).double()
    ab = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([ab], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(ab[0] * scores + ab[1], targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    a, b = ab.tolist()
    return {"a": a, "b": b} if a > 0 else None   # a <= 0: the scores do not rank the errors


def calibrated(scores, calibration):
    """Log raw confidences -> probabilities that the codes are right (raw confidence without a calibration)."""
    if not calibration:
        return scores.exp()
    return torch.sigmoid(calibration["a"] * scores + calibration["b"])


def in_order(n, batch_size, device):
    """Index batches over range(n) in order (evaluation)."""
    return list(torch.arange(n, device=device).split(batch_size))


def init_from(model, init, charset):
    """Copy into model the weights of another captcha model (init: its model.pt) whose name and shape match: the
    network (stem and blocks) always, the attention where length and input size agree, and the classifier's row
    of each character the two charsets share (and of the end symbol). Returns a summary."""
    own, state = model.state_dict(), init["model"]
    same = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    old = {c: j for j, c in enumerate(init["charset"])}
    rows = [(i, old[c]) for i, c in enumerate(charset) if c in old] + [(len(charset), len(init["charset"]))]
    new_rows, old_rows = (list(r) for r in zip(*rows))
    for key in ("classifier.1.weight", "classifier.1.bias"):
        if own[key].shape[1:] == state[key].shape[1:]:
            same[key] = own[key].clone()
            same[key][new_rows] = state[key][old_rows]
    model.load_state_dict(same, strict=False)
    fresh = sorted(k for k in own if k not in same and not k.endswith("num_batches_tracked"))
    return (f"{len(same)} of {len(own)} tensors, {len(rows) - 1} of {len(charset)} characters" +
            (f" (new: {', '.join(fresh)})" if fresh else ""))


def check_model(path, info):
    """A model file's entries (model.pt, or model.onnx's metadata) checked before the network is built or an image
    read: a hand-edited or damaged entry is a UserError, not a traceback or gigabytes allocated."""
    args, charset = info.get("model_args"), info.get("charset")
    if isinstance(charset, str) and isinstance(args, dict) and args.get("n_classes") == len(charset):
        raise UserError(f"{path}: a model of an older captcha.py (no end symbol: one length only); train it again")
    if not (isinstance(charset, str) and 0 < len(charset) == len(set(charset)) and numbers(info.get("image_size"), 2,
            16, 1024, True) and isinstance(args, dict) and set(args) == {"n_classes", "length", "image_size"}
            and args["n_classes"] == len(charset) + 1 and numbers(args["image_size"], 2, 16, 1024, True)
            and list(args["image_size"]) == list(info["image_size"])
            and numbers([args["length"]], 1, 1, MAX_LENGTH, True)):
        raise UserError(f"{path}: its charset, image size or network arguments are malformed; train it again")
    try:
        reading(info)
    except UserError as e:
        raise UserError(f"{path}: {e}")


def build_model(model_args):
    model = CaptchaNet(**{**model_args, "image_size": tuple(model_args["image_size"])})
    return model.to(memory_format=torch.channels_last)


def export_example(info):
    """export: example inputs, input and output names, dynamic axes, and what the input is."""
    x = torch.zeros(2, 3, *info["image_size"])
    about = "x: B,3,H,W float, RGB pixels / 127.5 - 1; logits: B,length,charset+1 (last class: end of code)"
    return (x,), ["x"], ["logits"], ({0: torch.export.Dim("batch")},), about


def reading(info):
    """The views and calibration a model file asks eval to read with; a malformed entry (a hand-edited file) is a
    UserError. Models saved before VIEWS read in one view."""
    views, calibration = info.get("views", [[0, 0]]), info.get("calibration")
    if (not isinstance(views, (list, tuple)) or not 1 <= len(views) <= 25
            or not all(isinstance(v, (list, tuple)) and len(v) == 2 and all(type(d) is int and abs(d) <= 8 for d in v)
                       for v in views)):
        raise UserError(f"the model's views entry is malformed ({str(views)[:60]}); expected pairs of pixel shifts")
    if calibration is not None and not (isinstance(calibration, dict) and all(
            isinstance(calibration.get(k), (int, float)) and abs(calibration[k]) <= 1e6 for k in "ab")):
        raise UserError(f"the model's calibration entry is malformed ({str(calibration)[:60]}); expected a and b")
    return views, calibration


@torch.no_grad()
def predict(net, info, device, args, images, per_position=False):
    """PIL images -> eval's JSON objects {"code", "confidence"} (+ "per_position" probabilities if asked)."""
    views, calibration = reading(info)
    x = torch.stack([to_input(img, tuple(info["image_size"])) for img in images]).to(device)
    with autocast(device, amp_dtype(device)):
        logp = read_logp(net, x, views)   # B,L,K
    best, idx = logp.max(-1)
    results = []
    for p, i, confidence in zip(best, idx, finite(calibrated(best.sum(1), calibration)).tolist()):
        code = decode_code(i.tolist(), info["charset"])
        results.append({"code": code, "confidence": round(under_one(confidence, 4), 4)}
                       | ({"per_position": p[:len(code)].exp().tolist()} if per_position else {}))
    return results


# ---- Commands ----
def cmd_prepare(args):
    image_dir = Path(args.image_dir)
    if args.labels and args.label_regex.pattern != LABEL_REGEX:
        raise UserError("--label-regex reads codes from file names, --labels from a file: pass one of them", 2)
    beside = Path(__file__).resolve().parent / IMAGE_DIR   # where generate.py writes, from any working folder
    if args.image_dir == IMAGE_DIR and not image_dir.is_dir() and beside.is_dir():
        image_dir = beside
        print(f"--image-dir {IMAGE_DIR}: not in the working folder; reading {image_dir}")
    if not image_dir.is_dir():
        raise UserError(f"{image_dir}: {'a file, not an' if image_dir.exists() else 'no such'} image folder (generate "
                        "captchas with `python generate-captcha/generate.py` or pass --image-dir)")
    if Path(args.data_dir).resolve() == image_dir.resolve():   # its plots would come back as captchas
        raise UserError(f"--data-dir {args.data_dir} is the image folder; choose another data folder", 2)
    if os.path.lexists(image_dir / ".generate-swap"):   # generate.py's mark while it swaps a new set in
        raise UserError(f"{image_dir}: a generate.py run was killed while it put its captchas there, and the folder "
                        f"holds some of each set; run generate.py with the same --output again (it finishes that)")
    charset = resolve_charset(args.charset, args.case_sensitive)
    length = None if args.length == "auto" else args.length
    entries = sorted(p for p in image_dir.iterdir() if not p.name.startswith("."))
    files = [p for p in entries if p.is_file()]
    skipped = defaultdict(list)  # reason -> list of file names
    if args.labels:   # a labels file may name images in subfolders
        listed, refused, mentioned = read_labels(args.labels, image_dir)
        skipped |= refused
        for p in files:   # each file counted once: one the labels name but refused is not "not in the labels file"
            if (p.suffix.lower() in IMAGE_EXTS and p.resolve() not in mentioned
                    and os.path.normpath(p.absolute()) not in mentioned):
                skipped["image not in the labels file"].append(p.name)
        candidates = [(p, *check_code(code, charset, length, args.case_sensitive)) for p, code in listed.items()]
    else:
        nested = [p for p in list_images(image_dir) if p.parent != image_dir]
        if nested:   # read only when a labels file names them: a train/ test/ layout must not be merged unasked
            skipped["in a subfolder (pass the subfolder as --image-dir, or a --labels file naming them)"] = [
                str(p.relative_to(image_dir)) for p in nested]
        if not files:
            raise UserError(f"{image_dir}: " + (f"no images in the folder itself, {len(nested)} in its subfolders "
                                                f"(e.g. {nested[0].relative_to(image_dir)}); pass a subfolder as "
                                                "--image-dir" if nested else "the folder is empty; put the captchas "
                                                "there or pass --image-dir"))
        odd = [p.name for p in entries if p.suffix.lower() in IMAGE_EXTS and not p.is_file()]
        if odd:   # a folder, a FIFO or a dangling link named like an image: said, not passed over
            skipped["not a regular file"] = odd
        candidates = [(p, *parse_code(p.name, args.label_regex, charset, length, args.case_sensitive))
                      if p.suffix.lower() in IMAGE_EXTS else (p, None, "not an image file") for p in files]
    for p, _, reason in candidates:
        if reason:
            skipped[reason].append(p.name)
    labelled = [(p, code) for p, code, reason in candidates if not reason]
    paths = [p for p, _ in labelled]
    image_size = auto_image_size(paths) if args.image_size == "auto" else tuple(args.image_size)
    results = parallel_map(partial(decode_file, image_size=image_size), paths, 1 if len(paths) < 200 else args.workers,
                           "prepare", "img", 256)

    images, codes = [], []
    for (p, code), (array, reason) in zip(labelled, results):
        if reason:
            skipped[reason].append(p.name)
        else:
            images.append(array)
            codes.append(code)
    skipped = group_outside(skipped)
    n_skipped = sum(map(len, skipped.values()))
    print(f"{image_dir}: {len(images)} images kept, {n_skipped} skipped")
    for reason, names in sorted(skipped.items()):
        print(printable(f"  skipped {len(names)}: {reason} (e.g. {', '.join(names[:3])})"))
    if not images:
        causes = {k: v for k, v in skipped.items() if k != "image not in the labels file"} or skipped   # the why
        most = max(causes.items(), key=lambda item: len(item[1]))[0] if causes else "none found"
        raise UserError(f"{image_dir}: no usable captcha image (most skipped: {most}); " + (
            "check the --labels file: its names are read inside --image-dir, its codes must fit --charset and --length"
            if args.labels else "expected names like 2b827.png or 00001-2b827.png, or a --labels file, and codes that "
            "--charset and --length allow"))
    if not args.labels and args.label_regex.pattern == LABEL_REGEX:
        for doubt in doubtful_codes(codes):
            print(f"warning: {doubt}", file=sys.stderr)
    charset = charset or "".join(sorted(set("".join(codes))))
    lengths = sorted({len(code) for code in codes})
    end = len(charset)   # the end symbol: the class after the last character, padding every shorter code
    print(f"charset {charset!r} ({len(charset)} characters), code length {length_text(lengths)}, "
          f"input {image_size[0]}x{image_size[1]}")

    x = torch.from_numpy(np.stack(images))  # N,3,H,W uint8
    y = torch.tensor([[charset.index(c) for c in code] + [end] * (lengths[-1] - len(code)) for code in codes])  # N,L
    sizes = split_sizes(len(x), args.split)
    if not sizes[0]:
        raise UserError(f"--split: no image left for training ({len(x)} kept, {sizes[1]} for validation, {sizes[2]} "
                        f"for test); give training a larger share", 2)
    splits = {name: (x[idx], y[idx]) for name, idx in
              zip(SPLITS, (torch.tensor(i, dtype=torch.long) for i in split_indices(len(x), args.seed, sizes)))}
    meta = {"kind": DATA_KIND, "script": SCRIPT, "image_dir": str(image_dir), "image_size": list(image_size),
            "charset": charset, "length": lengths[-1], "lengths": lengths, "case_sensitive": args.case_sensitive,
            "labels": args.labels, "label_regex": None if args.labels else args.label_regex.pattern, "seed": args.seed,
            "kept": len(x), "skipped": n_skipped, "skipped_by_reason": {k: len(v) for k, v in skipped.items()},
            "counts": {name: len(y) for name, (_, y) in splits.items()}}
    save_prepared(args.data_dir, splits, meta)
    print(f"wrote {args.data_dir}: " + ", ".join(f"{name} {len(y)}" for name, (_, y) in splits.items()))
    if not sizes[1] and not sizes[2]:
        print("no validation or test split (too few images, or --split): train can score only the images it trains on")
    elif not sizes[2]:
        print(f"no test split (fewer than {TEST_MIN_SET} images, or --split): train reports the validation score")
    return 0


def improves(acc, loss, best, best_loss):
    """Is this epoch's model better than the best so far? Higher validation exact-match; at the same exact-match,
    once some code is read, lower validation loss (why: benchmarks/RESULTS.md)."""
    return acc > best or (acc == best > 0 and loss < best_loss)


def train(args, device, out_dir, tb_dir):
    """One training run on DATA_DIR's prepared data; model, checkpoint and history go to out_dir."""
    data_dir = Path(args.data_dir)
    meta = read_meta(data_dir)
    rank = rank_and_world()[0]
    if main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = resume_path(args, out_dir)   # checked before any work
    if args.init and (not Path(args.init).is_file() or Path(args.init).suffix.lower() == ".onnx"):   # before work
        raise UserError(f"--init {args.init}: " + ("an ONNX export" if Path(args.init).is_file() else "not a file" if
                                                   os.path.lexists(args.init) else "no such file") +
                        "; --init needs a model.pt that train wrote")
    init = args.init and load_model_file(args.init, kin=True)   # a reader of captcha.py or of a renamed copy
    if init:
        check_model(args.init, init)
    if init and checkpoint:
        raise UserError("--init and --resume: a resumed run goes on from its checkpoint; pass one of them", 2)
    seed_everything(args.seed + rank)   # DDP copies rank 0's initial weights to every process
    writer = open_tensorboard(tb_dir) if tb_dir else None
    (x_train, y_train), (x_val, y_val) = load_training_splits(data_dir, meta, device)
    n_val, own_val = len(y_val), x_val is not x_train   # an empty validation split is replaced by the training one
    # else every epoch counts as better and the last one is kept, unless --patience is given: the user's choice (a
    # resumed run ranks as it started: its --patience is not on this command line)
    resumed_ranked = bool(checkpoint) and load_model_file(checkpoint, CHECKPOINT_KEYS).get("ranked") is True
    ranked = own_val and (n_val >= RANK_MIN or asked_for(args, "patience") or resumed_ranked)
    x_val, y_val = shard(x_val), shard(y_val)
    # one class per character plus the end symbol
    model_args = {"n_classes": len(meta["charset"]) + 1, "length": meta["length"], "image_size": meta["image_size"]}
    n_train, n_epoch = len(x_train), max(len(x_train), args.epoch_size)   # images per epoch: a small set repeats
    passes = args.epochs * n_epoch / max(n_train, 1)   # how often the run shows each training image
    strength = auto_augment(n_train, passes) if args.augment == "auto" else args.augment
    ramp = max(1, round(AUGMENT_RAMP * args.epochs))   # epochs over which the strength rises to its value
    model = build_model(model_args).to(device)
    if init:
        try:
            print(f"initialised from {args.init}: {init_from(model, init, meta['charset'])}")
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:   # another version's
            raise UserError(f"{args.init}: not a captcha model this run can start from ({type(e).__name__})")
    # AdamW + one-cycle: reaches a given accuracy in far fewer epochs than the tutorial's constant-lr Adam
    # (see benchmarks/captcha_bench.py); cross-entropy per position replaces BCE over the one-hot code.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps_per_epoch = (n_epoch + args.batch_size - 1) // args.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, epochs=args.epochs,
                                                    steps_per_epoch=steps_per_epoch, pct_start=0.15)
    dtype = amp_dtype(device, args.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    history, best, bad_epochs, first_epoch = [], -1.0, 0, 1
    model_path = out_dir / "model.pt"
    if checkpoint:
        done, history, best, bad_epochs = resume_training(checkpoint, model_args, model, optimizer, scaler,
                                                          scheduler, meta["charset"], steps_per_epoch)
        first_epoch = done + 1
        bad_epochs = bad_epochs if ranked else 0   # a checkpoint of before RANK_MIN may have stopped early
    best = round(best, 5)   # scores are compared as history.csv keeps them (5 decimals): a resumed run decides alike
    best_loss = min([h.get("val_loss", math.inf) for h in history if h.get("val_acc") == best], default=math.inf)
    generator = torch.Generator(device=device).manual_seed(args.seed + first_epoch + 7919 * rank)
    step_model = wrap_model(model, device, args.sync_bn)
    print(f"train {n_train} ({n_epoch} per epoch), validate {n_val} images of {tuple(meta['image_size'])}, "
          f"charset {meta['charset']!r}, length {length_text(meta.get('lengths', [meta['length']]))}, "
          f"augment {strength:g} (from epoch {ramp}), precision {dtype or torch.float32}")
    if not ranked:
        print(f"{n_val} validation codes: too few to rank epochs (under {RANK_MIN}); the whole schedule runs and the "
              "last epoch's model is kept (--patience N ranks them)" if own_val else
              "no validation split; the whole schedule runs and the last epoch's model is kept")
    elif n_val < RANK_MIN:
        print(f"{n_val} validation codes rank the epochs (--patience given): a code is {100 / n_val:.1f} points")
    if n_train < FEW_LABELS and not init and not checkpoint:
        print(f"few labels ({n_train}): captchas in many fonts read far more from a model trained on generated "
              f"captchas (--init MODEL); see README.md")
    if writer:
        writer.add_images("inputs", x_train[:32], 0)

    val_batches = in_order(len(y_val), 4 * args.batch_size, device)
    for epoch in range(first_epoch, args.epochs + 1):
        if bad_epochs >= args.patience:
            break
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        epoch_strength = round(strength * min(1.0, epoch / ramp), 4)
        batches = [idx % n_train for idx in epoch_batches(n_epoch, args.batch_size, args.seed, epoch, device)]
        *train_stats, n = run_epoch(step_model, x_train, y_train, device, batches, dtype, optimizer, scheduler,
                                    scaler, generator, epoch_strength)
        train_loss, train_acc, _ = mean_over_processes(train_stats, n, device)
        train_seconds = time.perf_counter() - start
        check_loss(epoch, "training", train_loss)
        sync_buffers(model)
        *val_stats, n = run_epoch(model, x_val, y_val, device, val_batches, dtype)
        val_loss, val_acc, val_char = mean_over_processes(val_stats, n, device)
        check_loss(epoch, "validation", val_loss)
        seconds = time.perf_counter() - start
        score = round(val_acc, 5), round(val_loss, 5)   # also equal counts all-reduced (0.3 vs 0.30000000000000004)
        improved = not ranked or improves(*score, best, best_loss)
        (best, best_loss), bad_epochs = (score, 0) if improved else ((best, best_loss), bad_epochs + 1)
        history.append({"epoch": epoch, "train_loss": round(train_loss, 5), "train_acc": round(train_acc, 5),
                        "val_loss": round(val_loss, 5), "val_acc": round(val_acc, 5),
                        "val_char_acc": round(val_char, 5), "lr": lr, "augment": epoch_strength, "steps": len(batches),
                        "seconds": round(seconds, 2), "images_per_s": round(n_epoch / train_seconds, 1)})
        if main_process():   # the epoch is saved before its line is printed
            log_epoch(writer, history[-1], model, args.histogram_every)
            best_model = {"model_args": model_args, "charset": meta["charset"], "length": meta["length"],
                          "image_size": meta["image_size"], "case_sensitive": meta["case_sensitive"], "epoch": epoch,
                          "val_acc": val_acc, "views": [list(v) for v in VIEWS]}   # eval reads in VIEWS
            save_epoch(out_dir, args, model, optimizer, scheduler, scaler,
                       {"epoch": epoch, "history": history, "best_score": best, "bad_epochs": bad_epochs,
                        "model_args": model_args, "classes": meta["charset"], "ranked": ranked},
                       best_model if improved else None,
                       ["train_acc", "val_acc", "val_char_acc"])
        print(f"epoch {epoch}/{args.epochs}  train loss {train_loss:.4f} acc {train_acc:.2%}  "
              f"val loss {val_loss:.4f} acc {val_acc:.2%} (chars {val_char:.2%})  lr {lr:.5f}  "
              f"{seconds:.1f}s  {n_epoch / train_seconds:.0f} img/s{'  *' if improved else ''}", flush=True)
    if writer:
        writer.close()
    if bad_epochs >= args.patience:
        print(f"early stop: no better validation exact-match (or loss at the same exact-match) for {args.patience} "
              f"epochs")
    result = {"epochs_run": len(history), "best_val": round(best, 6), "test": float("nan"), "metric": "exact-match"}
    if main_process():
        result["test"] = calibrate_and_test(model, model_path, data_dir, meta, device, 4 * args.batch_size, dtype,
                                            best, ranked)
        print(f"saved {model_path}, {out_dir / 'history.csv'}, {out_dir / 'history.png'}")
    return result


def load_training_splits(data_dir, meta, device):
    """The training and validation splits on the device, checked against meta.json; an empty validation split is
    replaced by the training split (tiny sets), with a warning."""
    x_train, y_train = (t.to(device) for t in read_split(data_dir, "training_set", meta))
    x_val, y_val = (t.to(device) for t in read_split(data_dir, "validating_set", meta))
    for x, y in ((x_train, y_train), (x_val, y_val)):
        if list(x.shape[2:]) != meta["image_size"] or y.shape[1] != meta["length"] or (
                len(y) and (y.min() < 0 or y.max() > len(meta["charset"]))):
            raise UserError(f"{data_dir}: the shards do not match meta.json (image size, code length or charset); "
                            f"run `python {SCRIPT}.py prepare` again")
    if len(x_val) == 0:  # tiny data sets: validate on the training split rather than divide by zero
        if main_process():
            print("warning: empty validation split; validating on the training split", file=sys.stderr)
        x_val, y_val = x_train, y_train
    return (x_train, y_train), (x_val, y_val)


def calibrate_and_test(model, model_path, data_dir, meta, device, batch_size, dtype, best, ranked):
    """After training: the best model read as eval reads it (in the VIEWS, averaged), its confidence calibrated on
    the whole validation split and saved into model.pt, then scored on the test split (its exact-match, or NaN).
    best: the training loop's validation score, quoted when there is neither a validation nor a test split; ranked:
    whether validation chose the model (False: it is the last epoch's, see RANK_MIN)."""
    if not model_path.exists():
        raise UserError(f"{model_path} was not written (no epoch ran); raise --epochs")
    best_model = load_model_file(model_path)
    model.load_state_dict(best_model["model"])
    x_val, y_val = (t.to(device) for t in read_split(data_dir, "validating_set", meta))
    if len(x_val):   # P(code right) as a function of the raw confidence, on the whole validation split
        calibration, scores, right, fitted_on = fit_confidence(model, x_val, y_val, device, batch_size, dtype)
        best_model["calibration"], best = calibration, right.float().mean().item()
        confident = calibrated(scores, calibration) >= 0.9
        how = (f"confidence calibrated on {fitted_on}" if calibration else f"confidence not calibrated (under "
               f"{CALIBRATION_MIN} wrong or right codes, or scores that do not rank them: eval gives the raw one)")
        sure = f", {under_one(right[confident].float().mean().item(), 3):.1%} of them right" if confident.any() else ""
        print(f"validation read in {len(VIEWS)} views as eval does: exact-match {under_one(best, 4):.2%}; {how}: "
              f"{confident.sum().item()} with confidence >= 0.9{sure}")
    save_model(best_model, model_path)
    x_test, y_test = (t.to(device) for t in read_split(data_dir, "testing_set", meta))
    if not len(x_test):
        shown = f"{under_one(best, 4):.2%}"
        print(f"no validation or test split: exact-match {shown} on the training images themselves says nothing of "
              f"new captchas; prepare with a validation share (--split auto)" if not len(x_val) else
              f"no test split: validation exact-match {shown} (the last epoch's model) is the estimate" if not ranked
              else f"no test split: validation exact-match {shown} (best model of epoch {best_model['epoch']}) is "
              f"the estimate, slightly optimistic as it chose the model")
        return float("nan")
    pred, _ = read_codes(model, x_test, device, batch_size, dtype, VIEWS)
    correct, is_char = pred == y_test, y_test < len(meta["charset"])   # not the end symbol
    test_acc = correct.all(1).float().mean().item()
    test_char = (correct & is_char).sum().item() / max(is_char.sum().item(), 1)
    kept = "best model of epoch" if ranked else "the last epoch's model, epoch"
    print(f"test ({len(x_test)} images, {kept} {best_model['epoch']}, read as eval does): "
          f"exact-match {under_one(test_acc, 4):.2%}, per-character {under_one(test_char, 4):.2%}")
    return round(test_acc, 6)


def fit_confidence(model, x, y, device, batch_size, dtype):
    """The validation images x (uint8) with codes y read as eval reads them, and the calibration fitted on them ->
    (calibration or None, log raw confidences, right or not, what it was fitted on). Read with CALIBRATION_MIN right
    codes or more, and under CALIBRATION_MIN wrong ones or under CALIBRATION_CODES codes in all, the images are read
    again under the training distortions (distorted_reads) and the calibration fitted on both."""
    pred, scores = read_codes(model, x, device, batch_size, dtype, VIEWS)
    right = (pred == y).all(1)
    n_wrong = (~right).sum().item()
    if right.sum().item() < CALIBRATION_MIN or n_wrong >= CALIBRATION_MIN and len(x) >= CALIBRATION_CODES:
        return fit_calibration(scores, right), scores, right, f"{len(x)} codes"
    few = "too few wrong" if n_wrong < CALIBRATION_MIN else f"too few, under {CALIBRATION_CODES}"
    more_scores, more_right = distorted_reads(model, x, y, device, batch_size, dtype)
    return (fit_calibration(torch.cat([scores, more_scores]), torch.cat([right, more_right])), scores, right,
            f"{len(x)} codes and {len(more_right)} distorted copies of them ({(~more_right).sum().item()} read wrong; "
            f"the codes alone: {few})")


def distorted_reads(model, x, y, device, batch_size, dtype):
    """Images x (uint8) with codes y read again as eval reads them, each time under fresh training distortions at
    full strength (augment), about CALIBRATION_READS reads in all, a batch at a time: (log raw confidences, right or
    not), for a calibration that the undistorted codes, read all right, leave without a slope."""
    generator = torch.Generator(device=device).manual_seed(0)
    scores, right = [], []
    for idx in in_order(max(1, -(-CALIBRATION_READS // len(x)) - 1) * len(x), batch_size, device):
        idx = idx % len(x)   # copy after copy of the images
        seen = ((augment(x[idx], generator) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)   # back to pixels
        pred, score = read_codes(model, seen, device, batch_size, dtype, VIEWS)
        scores.append(score)
        right.append((pred == y[idx]).all(1))
    return torch.cat(scores), torch.cat(right)


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
        result, = predict(net, info, device, args, [img], per_position=not args.json)
        if args.json:
            print(json.dumps({"image": path, **result}), flush=True)
        else:
            per_position = " ".join(f"{under_one(v, 2):.2f}" for v in result["per_position"])
            prefix = "" if interactive else f"{printable(path)}  "
            confidence = under_one(result["confidence"], 2)
            print(f"{prefix}code: {result['code']}  confidence {confidence:.2f} (per position {per_position})",
                  flush=True)
    return 1 if failed and not interactive else 0   # the prompt said each failure as it came


def length_arg(text):
    """--length: auto or a number of characters."""
    if text == "auto":
        return text
    if not text.isdigit() or not 1 <= int(text) <= MAX_LENGTH:
        raise argparse.ArgumentTypeError(f"expected auto or a length from 1 to {MAX_LENGTH}, got {text!r}")
    return int(text)


def split_arg(text):
    """--split: auto or TRAIN/VAL/TEST percentages that add up to 100."""
    if text == "auto":
        return text
    parts = text.split("/")
    if len(parts) != 3 or not all(p.isdigit() for p in parts) or sum(map(int, parts)) != 100 or int(parts[0]) < 1:
        raise argparse.ArgumentTypeError(f"expected auto or three percentages adding up to 100 (e.g. 90/10/0), "
                                         f"got {text!r}")
    return tuple(map(int, parts))


def regex_arg(text):
    """--label-regex: a regular expression with a group that captures the code."""
    try:
        regex = re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"not a regular expression ({e})")
    if regex.groups < 1:
        raise argparse.ArgumentTypeError("needs one group (...) that captures the code")
    return regex


def auto_augment(n_train, passes=AUGMENT_PASSES):
    """--augment auto: the distortion strength for a training split of n_train images, each seen `passes` times
    in the run (see AUGMENT_FULL and AUGMENT_FEW)."""
    n = max(n_train, 1)
    strength = min(1.0, (AUGMENT_FULL / n) ** 0.75 * (passes / AUGMENT_PASSES) ** 0.6)
    return round(min(AUGMENT_MAX, (AUGMENT_FEW / n) ** 0.6) if strength == 1.0 and n < AUGMENT_FEW else strength, 3)


class ImageSizeAction(argparse.Action):
    """--image-size auto | H W (each 16 to 1024 pixels, one over 16: the network's last map, a 16th of the input,
    must hold two places, as BatchNorm cannot train on one value per channel in a batch of one)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values == ["auto"]:
            return setattr(namespace, self.dest, "auto")
        if (len(values) != 2 or not all(v.isdigit() and 16 <= int(v) <= 1024 for v in values)
                or max(map(int, values)) <= 16):
            parser.error(f"argument {option_string}: expected auto or H W, each from 16 to 1024 pixels and one of them "
                         "over 16")
        setattr(namespace, self.dest, tuple(map(int, values)))


def build_parser():
    parser, sub, common, device, seed = base_parser()

    p = sub.add_parser("prepare", parents=[common, seed], help="images -> tensor batches")
    p.add_argument("--image-dir", default=IMAGE_DIR,
                   help="folder of CODE.ext or PREFIX-CODE.ext images (or of the files a --labels file lists); "
                        f"images over {MAX_PIXELS:,} pixels are skipped")
    p.add_argument("--labels", metavar="FILE", default=None,
                   help="codes from FILE instead of file names: CSV lines `file,code`, or tab, ';' or space "
                        "separated lines (header optional; file names relative to --image-dir)")
    p.add_argument("--charset", default="auto",
                   help=f"characters a code may hold: auto (those the codes use), one of {', '.join(CHARSETS)}, "
                        "or a literal string, where a-f stands for abcdef; codes with other characters are skipped")
    p.add_argument("--case-sensitive", action="store_true",
                   help="keep the case of codes (otherwise they are lower-cased)")
    p.add_argument("--length", type=length_arg, default="auto",
                   help=f"characters per code: auto (every length up to {MAX_LENGTH}) or N (other lengths skipped)")
    p.add_argument("--label-regex", type=regex_arg, default=LABEL_REGEX,
                   help="regex whose first group is the code in a file name")
    p.add_argument("--image-size", nargs="+", action=ImageSizeAction, default="auto", metavar="H W",
                   help=f"model input size: auto ({IMAGE_HEIGHT} high, width from the images' aspect ratio) or H W")
    p.add_argument("--split", type=split_arg, default="auto", metavar="auto|T/V/T",
                   help=f"train/validation/test percentages, e.g. 90/10/0; auto: validation and test "
                        f"{SPLIT_FRACTION:.0%}% each (at most {SPLIT_MAX}), no test split under {TEST_MIN_SET} images")
    p.add_argument("--workers", type=worker_count, default=os.cpu_count() or 1, help="parallel decoding processes")
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("train", parents=[common, device, seed], help="train with early stopping")
    p.add_argument("--epochs", type=positive_int, default=EPOCHS,
                   help="maximum epochs (also the length of the lr schedule)")
    p.add_argument("--patience", type=positive_int, default=PATIENCE,
                   help=f"stop after N epochs without a better validation score (under {RANK_MIN} validation codes, "
                        f"only when given: by default the whole schedule runs)")
    p.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE,
                   help="mini-batch size (under torchrun: the global batch)")
    p.add_argument("--lr", type=positive_float, default=LR,
                   help="peak learning rate of the one-cycle schedule; over 0")
    p.add_argument("--resume", action="store_true", help="continue from DATA_DIR/checkpoint.pt")
    p.add_argument("--init", metavar="MODEL", default=None,
                   help="start from the weights of another captcha model.pt, e.g. one trained on generated captchas: "
                        "for a few hundred labels (the attention starts fresh where length or size differ, the "
                        "classifier keeps the characters both charsets hold)")
    p.add_argument("--epoch-size", type=lambda text: parse_number(text, int, 0, 10 ** 7), default=EPOCH_SIZE,
                   metavar="N", help="images per epoch at least (a smaller training split is repeated, augmented "
                   "afresh)")
    p.add_argument("--augment", type=lambda text: text if text == "auto" else parse_number(text, float, 0, 3),
                   default="auto", metavar="X",
                   help=f"strength of the random distortions while training: 0 (none) to 3, or auto: up to "
                        f"{AUGMENT_MAX:g} under {AUGMENT_FEW} training images, 1 up to {AUGMENT_FULL:,}, less on "
                        f"larger sets and shorter runs (18,000 images: 0.11 for 5 epochs, 0.29 for 24)")
    add_scale_options(p)
    p.set_defaults(func=cmd_train, train_parser=p)
    p = sub.add_parser("eval", parents=[common, device], help="read captcha images")
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

"""End-to-end tests of cifar_lenet.py and cifar_resnet.py on a few hundred real CIFAR-10 images.

Two source folders are built in a temporary directory from ../shared/datasets/cifar10:
- `names`: the tutorial's layout, labels.txt + train/NNNNN_label.jpg + test/NNNNN_label.jpg, plus files that
  must be skipped (corrupt, decompression bomb, unknown label, no label) and odd images that must be kept
  (grayscale, RGBA, any size);
- `folders`: one folder per class (3 classes, ImageFolder layout).
"""
import csv
import gzip
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import (CIFAR_DIR, ROOT, assert_one_line_error, check_onnx, hostile_images, http, load_script,
                      multipart, odd_images, png_declaring, run, run_main, run_warnings_shown, serving)

LENET, RESNET = "cifar_lenet.py", "cifar_resnet.py"
LABELS = (CIFAR_DIR / "labels.txt").read_text().split() if CIFAR_DIR.exists() else []
TOP_LINE = re.compile(r"^(\S+): (\d+\.\d\d)%$")
N_TRAIN, N_TEST = 270, 30           # names layout: images in train/ and test/
FOLDER_CLASSES, PER_CLASS = ("airplane", "automobile", "frog"), 60


@pytest.fixture(scope="module")
def cifar_dir():
    """The real CIFAR images: tests that read them skip without ../shared; the unit tests run anyway."""
    if not CIFAR_DIR.exists():
        pytest.skip(f"{CIFAR_DIR} not found")
    return CIFAR_DIR


def read_shards(data_dir, name):
    parts = []
    for path in sorted(data_dir.glob(f"{name}.*.pt.gz")):
        with gzip.open(path, "rb") as f:
            parts.append(torch.load(io.BytesIO(f.read()), weights_only=True))
    return tuple(torch.cat(ts) for ts in zip(*parts))


def link(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src)


@pytest.fixture(scope="module")
def names_dir(cifar_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("names")
    shutil.copy(CIFAR_DIR / "labels.txt", root / "labels.txt")
    files = sorted((CIFAR_DIR / "train").iterdir())[:N_TRAIN + N_TEST]
    for i, src in enumerate(files):
        link(src, root / ("train" if i < N_TRAIN else "test") / src.name)
    (root / "train" / "90000_cat.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")   # corrupt
    link(files[0], root / "train" / "90001_unicorn.jpg")                                     # label not in list
    link(files[1], root / "train" / "nolabel.jpg")                                           # no label in name
    Image.new("L", (50, 41), 128).save(root / "train" / "90002_dog.png")                      # grayscale, 50x41
    Image.new("RGBA", (64, 64), (255, 0, 0, 100)).save(root / "train" / "90003_cat.png")      # RGBA
    png_declaring(root / "train" / "90004_cat.png", 15000, 15000)                              # a bomb
    return root


@pytest.fixture(scope="module")
def folders_dir(cifar_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    for label in FOLDER_CLASSES:
        for src in sorted((CIFAR_DIR / "train").glob(f"*_{label}.jpg"))[:PER_CLASS]:
            link(src, root / label / src.name)
    return root


@pytest.fixture(scope="module")
def names_data(names_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("names_data")
    proc = run(LENET, "prepare", "--image-dir", names_dir, "--data-dir", data, "--workers", 2)
    assert proc.returncode == 0, proc.stderr
    return data, proc


@pytest.fixture(scope="module")
def folders_data(folders_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("folders_data")
    proc = run(LENET, "prepare", "--image-dir", folders_dir, "--data-dir", data, "--workers", 1)
    assert proc.returncode == 0, proc.stderr
    return data


@pytest.fixture(scope="module")
def lenet_trained(names_data):
    """Two epochs of LeNet on the names data, then one more with --resume."""
    data, _ = names_data
    first = run(LENET, "train", "--data-dir", data, "--epochs", 2, "--device", "cpu")
    assert first.returncode == 0, first.stderr
    history_after_first = (data / "history.csv").read_text()
    resumed = run(LENET, "train", "--data-dir", data, "--epochs", 3, "--device", "cpu", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    return data, first, resumed, history_after_first


@pytest.fixture(scope="module")
def resnet_trained(folders_data, tmp_path_factory):
    """One epoch of ResNet-18 on a copy of the data that cifar_lenet.py prepared (same format)."""
    data = tmp_path_factory.mktemp("resnet_data")
    for path in folders_data.glob("*"):
        if path.name == "meta.json" or path.name.endswith(".pt.gz"):
            shutil.copy(path, data / path.name)
    proc = run(RESNET, "train", "--data-dir", data, "--epochs", 1, "--batch-size", 64, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    return data, proc


# ---- prepare ----
def test_prepare_counts_and_skips(names_data, names_dir):
    data, proc = names_data
    n = N_TRAIN + N_TEST + 2        # + grayscale and RGBA images
    assert f"kept {n} images" in proc.stdout
    assert "skipped 4" in proc.stdout
    for reason in ("2 unreadable", "1 unknown label", "1 no label"):
        assert reason in proc.stdout
    assert "'unicorn' is not in the label list" in proc.stdout
    meta = json.loads((data / "meta.json").read_text())
    assert meta["kind"] == "cifar" and meta["script"] == "cifar_lenet"
    assert meta["labels"] == LABELS
    assert sum(meta["counts"].values()) == n and meta["skipped"] == 4
    assert f"test split: {names_dir / 'test'}" in proc.stdout   # the tutorial's layout: cifar/test, never trained on
    assert meta["counts"]["testing_set"] == N_TEST and meta["counts"]["validating_set"] == int((N_TRAIN + 2) * 0.1)
    images, labels = read_shards(data, "training_set")
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32) and len(images) == len(labels)
    assert 0 <= labels.min() and labels.max() < len(LABELS)
    assert all(0.2 < m < 0.8 for m in meta["mean"]) and all(0.1 < s < 0.5 for s in meta["std"])


def test_prepare_class_folders(folders_data):
    meta = json.loads((folders_data / "meta.json").read_text())
    assert meta["labels"] == sorted(FOLDER_CLASSES)
    assert sum(meta["counts"].values()) == len(FOLDER_CLASSES) * PER_CLASS and meta["skipped"] == 0
    _, labels = read_shards(folders_data, "training_set")
    assert set(labels.tolist()) == {0, 1, 2}


def test_top3_only_from_four_classes(tmp_path, capsys):
    """With 3 classes or fewer every image's true class is among the top 3: the figure says nothing and is left out."""
    mod = load_script(LENET)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, -1.0], [1.0, -1.0, 2.0, 3.0]])
    assert mod.report_test(tmp_path, list("abcd"), torch.tensor([1, 1, 1]), logits) == pytest.approx(1 / 3)
    assert re.search(r"^test \(3 images\): top-1 33.33%  top-3 66.67%$", capsys.readouterr().out, re.M)
    assert mod.report_test(tmp_path, list("ab"), torch.tensor([1, 1, 1]), logits[:, :2]) == pytest.approx(1 / 3)
    out = capsys.readouterr().out
    assert re.search(r"^test \(3 images\): top-1 33.33%$", out, re.M) and "top-3" not in out


def test_split_is_deterministic(folders_dir, folders_data, tmp_path):
    same = run(RESNET, "prepare", "--image-dir", folders_dir, "--data-dir", tmp_path / "same", "--workers", 2)
    assert same.returncode == 0, same.stderr
    for name in ("training_set", "validating_set", "testing_set"):
        a, b = read_shards(folders_data, name), read_shards(tmp_path / "same", name)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])   # workers 1 vs 2, other script: same data
    split = load_script(LENET).split_indices
    assert split(180, 0) == split(180, 0) and split(180, 0) != split(180, 1)
    train, val, test = split(180, 1)
    assert (len(train), len(val), len(test)) == (144, 18, 18) and sorted(train + val + test) == list(range(180))


def test_prepare_test_dir(names_dir, tmp_path):
    proc = run(LENET, "prepare", "--image-dir", names_dir, "--test-dir", names_dir / "test",
               "--data-dir", tmp_path, "--workers", 1)
    assert proc.returncode == 0, proc.stderr
    counts = json.loads((tmp_path / "meta.json").read_text())["counts"]
    assert counts["testing_set"] == N_TEST                   # the separate folder, nothing else
    assert counts["training_set"] + counts["validating_set"] == N_TRAIN + 2   # test/ is not read twice
    assert counts["validating_set"] == int((N_TRAIN + 2) * 0.1)


def test_prepare_overlapping_folders_and_empty_classes(names_dir, folders_dir, tmp_path):
    """A --test-dir linked into --image-dir is still kept out of training; a data folder inside the image folder
    (its plots would be read as images, its name as a class), a class folder without images (or a symlinked one,
    which the walk does not follow) and a single class are refused."""
    (tmp_path / "linked").symlink_to(names_dir / "test")
    proc = run(LENET, "prepare", "--image-dir", names_dir, "--test-dir", tmp_path / "linked",
               "--data-dir", tmp_path / "d", "--workers", 1)
    assert proc.returncode == 0, proc.stderr
    counts = json.loads((tmp_path / "d" / "meta.json").read_text())["counts"]
    assert counts["testing_set"] == N_TEST and counts["training_set"] + counts["validating_set"] == N_TRAIN + 2
    src = tmp_path / "classes"
    shutil.copytree(folders_dir, src, symlinks=True)
    hidden = src / FOLDER_CLASSES[0] / ".ipynb_checkpoints"   # a notebook's copies: left out, like any hidden file
    hidden.mkdir()
    link(next((folders_dir / FOLDER_CLASSES[1]).iterdir()), hidden / "copy.jpg")
    others = sorted((CIFAR_DIR / "train").glob(f"*_{FOLDER_CLASSES[2]}.jpg"))[PER_CLASS:PER_CLASS + 5]
    for path in others:   # test/CLASS/ inside: the test split, not a class named "test"
        link(path, src / "test" / FOLDER_CLASSES[2] / path.name)
    proc = run(LENET, "prepare", "--image-dir", src, "--data-dir", tmp_path / "h", "--workers", 1)
    assert proc.returncode == 0 and f"kept {len(FOLDER_CLASSES) * PER_CLASS + 5} images" in proc.stdout, proc.stdout
    meta = json.loads((tmp_path / "h" / "meta.json").read_text())
    assert meta["labels"] == sorted(FOLDER_CLASSES) and meta["counts"]["testing_set"] == 5
    (src / "labels.txt").write_text("airplane\n..\n")
    assert "'..' is not a label" in assert_one_line_error(run(LENET, "prepare", "--image-dir", src, "--data-dir",
                                                                tmp_path / "h", "--workers", 1), 1)
    line = assert_one_line_error(run(LENET, "prepare", "--image-dir", src, "--data-dir", src / "prepared",
                                     "--workers", 1), 2)
    assert "is inside --image-dir" in line and not (src / "prepared").exists()   # made for the lock, then removed
    shutil.rmtree(src)
    src.mkdir()
    for label in FOLDER_CLASSES:
        (src / label).symlink_to(folders_dir / label) if label == FOLDER_CLASSES[0] else \
            shutil.copytree(folders_dir / label, src / label, symlinks=True)
    (src / "empty").mkdir()
    line = assert_one_line_error(run(LENET, "prepare", "--image-dir", src, "--data-dir", tmp_path / "e",
                                     "--workers", 1), 1)
    assert line.endswith(f"class folders without images: {', '.join(sorted([FOLDER_CLASSES[0], 'empty']))} "
                         "(a symlinked folder is not followed); remove them or fill them")
    for label in [*FOLDER_CLASSES[1:-1], FOLDER_CLASSES[0], "empty"]:
        (src / label).unlink() if (src / label).is_symlink() else shutil.rmtree(src / label)
    line = assert_one_line_error(run(LENET, "prepare", "--image-dir", src, "--data-dir", tmp_path / "e",
                                     "--workers", 1), 1)
    assert "images of 1 class found; a classifier needs at least 2" in line


def test_prepare_reads_labels_as_written(cifar_dir, tmp_path):
    """N_label names whose label holds a '_' (CIFAR-100's pickup_truck) take the longest label that fits, not the
    end after the last '_'; a listed label without images is a warning; a file linked into both --image-dir and
    --test-dir stays a test image only; a label listed twice is named. A label named like the train/ folder does
    not make the folder a class. A label's accent written two ways (NFC in labels.txt, NFD in file names from macOS)
    is one label (the images were skipped as "label 'café' is not in the label list")."""
    src = tmp_path / "src"
    (src / "train").mkdir(parents=True)
    (src / "holdout").mkdir()
    (src / "labels.txt").write_text("cat\ntruck\npickup_truck\nzebra\ntrain\ncaf\u00e9\n")   # CIFAR-100 has a train
    for label, n in (("cat", 8), ("truck", 8)):
        for i, path in enumerate(sorted((cifar_dir / "train").glob(f"*_{label}.jpg"))[:n]):
            link(path, src / "train" / f"{i:05d}_{label}.jpg")
    for i, path in enumerate(sorted((cifar_dir / "train").glob("*_truck.jpg"))[8:14]):
        link(path, src / "train" / f"{100 + i:05d}_pickup_truck.jpg")
    for i, path in enumerate(sorted((cifar_dir / "train").glob("*_cat.jpg"))[8:11]):
        link(path, src / "holdout" / f"{200 + i:05d}_cat.jpg")
    for i, path in enumerate(sorted((cifar_dir / "train").glob("*_dog.jpg"))[:4]):
        link(path, src / "train" / f"{300 + i:05d}_cafe\u0301.jpg")
    (src / "train" / "00200_cat.jpg").symlink_to(src / "holdout" / "00200_cat.jpg")   # a test image, also here
    proc = run(LENET, "prepare", "--image-dir", src, "--test-dir", src / "holdout", "--data-dir", tmp_path / "d",
               "--workers", 1)
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1, 1 also in --test-dir" in proc.stdout and "warning: no image of 'zebra', 'train'" in proc.stderr
    splits = [read_shards(tmp_path / "d", name)[1] for name in ("training_set", "validating_set", "testing_set")]
    assert torch.bincount(torch.cat(splits[:2]), minlength=6).tolist() == [8, 8, 6, 0, 0, 4]   # cat, truck, ...
    assert splits[2].tolist() == [0, 0, 0]
    (src / "labels.txt").write_text("cat\ntruck\ncat\n")
    line = assert_one_line_error(run_main(LENET, "prepare", "--image-dir", src, "--data-dir", tmp_path / "e"), 1)
    assert "the label 'cat' is listed twice" in line
    (src / "labels.txt").write_text("caf\u00e9\ntruck\ncafe\u0301\n")
    line = assert_one_line_error(run_main(LENET, "prepare", "--image-dir", src, "--data-dir", tmp_path / "e"), 1)
    assert "the label 'caf\u00e9' is listed twice" in line


def test_class_folder_names_are_checked_as_labels(tmp_path):
    """Labels from class folders pass the checks of a labels file's: two folders named alike in two Unicode forms
    (a copy from macOS) are one label twice, a control character is no label (eval would print it raw)."""
    module = load_script(LENET)
    for names, said in [(["caf\u00e9", "cafe\u0301"], "the label 'caf\u00e9' is listed twice"),
                        (["cat", "dog\x1b[2J"], "is not a label")]:
        root = tmp_path / str(len(said))
        for name in names:
            (root / name).mkdir(parents=True)
        with pytest.raises(module.UserError, match=re.escape(said)):
            module.find_labels(root, None)
    for name in ("dog", "caf\u00e9"):
        (tmp_path / "ok" / name).mkdir(parents=True)
    assert module.find_labels(tmp_path / "ok", None) == ["caf\u00e9", "dog"]


def test_shards_hold_only_their_own_images(tmp_path):
    module = load_script(LENET)
    images = torch.randint(0, 256, (2500, 3, 32, 32), dtype=torch.uint8)
    module.write_split(tmp_path, "training_set", (images, torch.arange(2500)))
    sizes = []
    for path in sorted(tmp_path.glob("training_set.*.pt.gz")):
        with gzip.open(path, "rb") as f:
            sizes.append(len(f.read()))
    assert len(sizes) == 3 and sum(sizes) < 1.05 * images.numel() * 1.1    # a slice saved alone, not its storage
    assert torch.equal(module.read_split(tmp_path, "training_set")[0], images)


def test_read_image_any_mode_and_size(tmp_path):
    module = load_script(LENET)
    for mode, size in (("L", (7, 90)), ("RGBA", (40, 30)), ("P", (33, 33)), ("RGB", (32, 32))):
        Image.new(mode, size).save(tmp_path / f"x_{mode}.png")
        x = module.read_image(tmp_path / f"x_{mode}.png")
        assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)


def test_augment_is_a_padded_crop_or_flip():
    module = load_script(RESNET)
    torch.manual_seed(0)
    images = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = module.augment(images)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    flips = 0
    for i in range(len(images)):
        windows = [(padded[i, :, y:y + 32, x:x + 32], f) for y in range(9) for x in range(9) for f in (0, 1)]
        matches = [f for w, f in windows if torch.equal(out[i], w.flip(2) if f else w)]
        assert matches, f"image {i} is no crop/flip of its padded original"
        flips += matches[0]
    assert 10 < flips < 54                                   # about half are flipped
    x = module.preprocess(images, [0.5] * 3, [0.25] * 3)
    assert x.dtype == torch.float32 and abs(x.mean().item()) < 0.1


def test_per_class_table_says_when_a_class_has_no_test_image(tmp_path, capsys):
    """report_test: a class without test images shows '-' (it showed 0.00%, as if every one had been missed)."""
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [5.0, 0.0, 0.0]])
    top1 = load_script(LENET).report_test(tmp_path, ["cat", "dog", "emu"], torch.tensor([0, 1, 1]), logits)
    out = capsys.readouterr().out
    assert abs(top1 - 2 / 3) < 1e-6 and (tmp_path / "confusion.png").is_file()
    assert re.search(r"^cat\s+1\s+100\.00%$", out, re.M) and re.search(r"^dog\s+2\s+50\.00%$", out, re.M)
    assert re.search(r"^emu\s+0\s+-$", out, re.M)


# ---- train ----
def test_train_lenet_writes_everything(lenet_trained):
    data, first, _, history = lenet_trained
    assert len(re.findall(r"^epoch \d/2  train loss [\d.]+ acc [\d.]+%  val loss [\d.]+ acc [\d.]+%  lr [\d.]+  "
                          r"[\d.]+s  \d+ img/s", first.stdout, re.M)) == 2
    assert re.search(r"^test \(\d+ images\): top-1 [\d.]+%  top-3 [\d.]+%$", first.stdout, re.M)
    for label in LABELS:                                       # the per-class table
        assert re.search(rf"^{label}\s+\d+\s+([\d.]+%|-)$", first.stdout, re.M)
    for name in ("model.pt", "checkpoint.pt", "history.csv", "history.png", "confusion.png"):
        assert (data / name).stat().st_size > 0
    assert len(history.splitlines()) == 3                      # header + 2 epochs
    assert not list(data.glob("*.tmp*"))


def test_resume_continues(lenet_trained):
    data, _, resumed, _ = lenet_trained
    assert "resumed from" in resumed.stdout and "checkpoint.pt after epoch 2 (" in resumed.stdout
    assert re.search(r"^epoch 3/3 ", resumed.stdout, re.M) and not re.search(r"^epoch [12]/", resumed.stdout, re.M)
    assert len((data / "history.csv").read_text().splitlines()) == 4
    ckpt = torch.load(data / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["script"] == "cifar_lenet" and len(ckpt["history"]) == 3


def test_lenet_learns_above_chance(folders_data, tmp_path):
    for path in folders_data.glob("*"):
        if path.name == "meta.json" or path.name.endswith(".pt.gz"):
            shutil.copy(path, tmp_path / path.name)
    proc = run(LENET, "train", "--data-dir", tmp_path, "--epochs", 10, "--batch-size", 32, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    top1 = float(re.search(r"top-1 ([\d.]+)%", proc.stdout).group(1))
    assert top1 > 55, proc.stdout                             # 3 classes: chance is 33%


def test_train_resnet_on_shared_data(resnet_trained):
    data, proc = resnet_trained
    assert re.search(r"^epoch 1/1  train loss", proc.stdout, re.M)
    assert re.search(r"^test \(18 images\): top-1 [\d.]+%$", proc.stdout, re.M)   # 3 classes: no top-3 (always 100%)
    model = torch.load(data / "model.pt", weights_only=True)
    assert model["script"] == "cifar_resnet" and model["labels"] == sorted(FOLDER_CLASSES)
    assert model["model"]["conv1.weight"].shape == (64, 3, 3, 3)   # CIFAR stem
    assert (data / "confusion.png").exists() and (data / "history.png").exists()


def test_resume_after_changes(folders_data, tmp_path):
    """--resume with a larger --batch-size: the one-cycle schedule goes on from the epoch reached (it had been
    stepped past its end: a ValueError traceback); a checkpoint whose history rows lack a key (an older version)
    resumes; without the run's model.pt, one line before any epoch, the checkpoint untouched."""
    for path in folders_data.glob("*"):
        if path.name == "meta.json" or path.name.endswith(".pt.gz"):
            shutil.copy(path, tmp_path / path.name)
    first = run(LENET, "train", "--data-dir", tmp_path, "--epochs", 2, "--batch-size", 8, "--lr", 0.006,
                "--label-smoothing", 0.2, "--device", "cpu")
    assert first.returncode == 0, first.stderr
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for row in ckpt["history"]:
        row.pop("img_per_s")
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    proc = run(LENET, "train", "--data-dir", tmp_path, "--epochs", 4, "--batch-size", 64, "--resume", "--device", "cpu")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    rows = list(csv.DictReader(io.StringIO((tmp_path / "history.csv").read_text())))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"] and rows[0]["img_per_s"] == ""
    assert float(rows[2]["lr"]) > float(rows[3]["lr"]) > 0   # the schedule's end, not its start again
    # options not given take the run's (they were the defaults: --label-smoothing 0.1 changed the loss silently)
    assert "options of the run resumed: --lr 0.006, --label-smoothing 0.2" in proc.stdout
    changed = next(line for line in proc.stdout.splitlines() if line.startswith("options changed from the run resumed"))
    assert "--batch-size 64 (the run's: 8)" in changed and "--epochs 4 (the run's: 2)" in changed
    config = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["config"]
    assert (config["lr"], config["label_smoothing"], config["batch_size"]) == (0.006, 0.2, 64)
    # a --lr given on resume holds from there: the schedule's rate scaled by 0.0006 / 0.006
    proc = run(LENET, "train", "--data-dir", tmp_path, "--epochs", 5, "--lr", 0.0006, "--resume", "--device", "cpu")
    assert proc.returncode == 0 and "--lr 0.0006 (the run's: 0.006)" in proc.stdout, proc.stdout + proc.stderr
    rows = list(csv.DictReader(io.StringIO((tmp_path / "history.csv").read_text())))
    assert 0 < float(rows[4]["lr"]) < 0.0001   # unscaled, 4/5 into a 0.006 one-cycle: about 0.0009
    proc = run(LENET, "train", "--data-dir", tmp_path, "--epochs", 3, "--resume", "--device", "cpu")   # 5 run
    assert proc.returncode == 0 and "has run 5 epochs, --epochs 3: no epoch to train" in proc.stdout, proc.stdout
    assert len(list(csv.DictReader(io.StringIO((tmp_path / "history.csv").read_text())))) == 5
    saved = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "model.pt").rename(tmp_path / "elsewhere.pt")
    line = assert_one_line_error(run(LENET, "train", "--data-dir", tmp_path, "--epochs", 6, "--resume", "--device",
                                     "cpu"), 1)
    assert "model.pt: missing" in line and (tmp_path / "checkpoint.pt").read_bytes() == saved


def test_resume_without_checkpoint(folders_data, tmp_path):
    shutil.copy(folders_data / "meta.json", tmp_path / "meta.json")
    line = assert_one_line_error(run(LENET, "train", "--data-dir", tmp_path, "--resume", "--device", "cpu"), 1)
    assert "checkpoint.pt" in line


# ---- eval ----
def parse_human(stdout):
    """{path: [(label, percent), ...]} from the non-interactive human output."""
    result, current = {}, None
    for line in stdout.splitlines():
        m = TOP_LINE.match(line)
        if m:
            result[current].append((m.group(1), float(m.group(2))))
        else:
            current = line
            result[current] = []
    return result


def test_eval_human_and_json_agree(lenet_trained, names_dir):
    data = lenet_trained[0]
    images = [str(p) for p in sorted((names_dir / "test").iterdir())[:3]] + [str(names_dir / "train/90002_dog.png")]
    human = run(LENET, "eval", "--data-dir", data, "--device", "cpu", *images)
    assert human.returncode == 0, human.stderr
    tops = parse_human(human.stdout)
    assert list(tops) == images
    as_json = run(LENET, "eval", "--data-dir", data, "--device", "cpu", "--json", *images)
    assert as_json.returncode == 0, as_json.stderr
    lines = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [obj["image"] for obj in lines] == images
    for obj in lines:
        top = obj["top"]
        assert len(top) == 5 and all(t["label"] in LABELS for t in top)
        probs = [t["probability"] for t in top]
        assert probs == sorted(probs, reverse=True) and len({t["label"] for t in top}) == 5
        human_top = tops[obj["image"]]
        assert [name for name, _ in human_top] == [t["label"] for t in top]
        assert all(abs(shown - 100 * p) < 0.011 for (_, shown), p in zip(human_top, probs))


def test_eval_stdin_folder_and_bad_image(lenet_trained, names_dir):
    data = lenet_trained[0]
    good = sorted((names_dir / "test").iterdir())[:2]
    stdin = f"{good[0]}\n\n{names_dir / 'train/90000_cat.png'}\n{names_dir / 'missing.png'}\n{good[1]}\n"
    proc = run(LENET, "eval", "--data-dir", data, "--device", "cpu", "--json", stdin=stdin)
    assert proc.returncode == 1                                # two images failed, the run went on
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [("top" in obj, "error" in obj) for obj in lines] == [(True, False), (False, True), (False, True),
                                                               (True, False)]
    folder = run(LENET, "eval", "--data-dir", data, "--device", "cpu", "--json", names_dir / "test")
    assert folder.returncode == 0, folder.stderr
    assert len(folder.stdout.splitlines()) == N_TEST


def test_eval_interactive_prompt(lenet_trained, names_dir):
    """stdin is a terminal: the tutorial's prompt, an empty line prompts again, Ctrl-D ends with status 0 (also after
    a path that could not be read)."""
    image = sorted((names_dir / "test").iterdir())[0]
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, str(ROOT / LENET), "eval", "--data-dir", str(lenet_trained[0]),
                             "--device", "cpu"], stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    os.close(slave)
    os.write(master, f"{image}\n\n/no/such.jpg\n".encode() + b"\x04")   # a path, an empty line, a typo, the end
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(master)
    assert proc.returncode == 0, err
    assert err.count("Image path: ") == 4 and "Traceback" not in err   # stdout is not a terminal: prompts on stderr
    assert "/no/such.jpg: cannot read image" in err   # said at once; Ctrl-D after it still ends with status 0
    assert len([line for line in out.splitlines() if TOP_LINE.match(line)]) == 5 and str(image) not in out   # no path
    assert "Image path" not in out   # header, nothing but the answers


def test_eval_model_from_another_script(lenet_trained, resnet_trained):
    line = assert_one_line_error(run(LENET, "eval", "--model", resnet_trained[0] / "model.pt", "--device", "cpu",
                                     stdin=""), 1)
    assert "cifar_resnet" in line
    line = assert_one_line_error(run(RESNET, "eval", "--data-dir", lenet_trained[0], "--device", "cpu"), 1)
    assert "cifar_lenet" in line


# ---- bad input ----
@pytest.mark.parametrize("case", ["missing labels.txt", "empty folder", "no images", "missing folder"])
def test_prepare_bad_input(case, tmp_path, names_dir):
    src = tmp_path / "src"
    src.mkdir()
    if case == "missing labels.txt":       # N_label files but no labels.txt and no class folders
        for p in sorted((names_dir / "train").iterdir())[:5]:
            link(p, src / p.name)
    elif case == "no images":              # labels.txt but nothing usable
        shutil.copy(names_dir / "labels.txt", src / "labels.txt")
        (src / "01_cat.jpg").write_bytes(b"garbage")
    elif case == "missing folder":
        src = tmp_path / "nope"
    line = assert_one_line_error(run(LENET, "prepare", "--image-dir", src, "--data-dir", tmp_path / "d",
                                     "--workers", 1), 1)
    assert str(src) in line


def test_prepare_counts_what_is_named_like_an_image_but_is_none(tmp_path, names_dir):
    """A folder, a dangling link and a link loop named like images: skipped and counted (they were passed over)."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(names_dir / "labels.txt", src / "labels.txt")
    for p in sorted((names_dir / "train").iterdir())[:12]:
        link(p, src / p.name)
    (src / "90000_cat.png").mkdir()
    (src / "90001_cat.png").symlink_to(tmp_path / "nothing")
    (src / "90002_cat.png").symlink_to(src / "90002_cat.png")
    proc = run_main(LENET, "prepare", "--image-dir", src, "--data-dir", tmp_path / "d", "--workers", 1)
    assert proc.returncode == 0, proc.stderr
    assert "3 not a regular file" in proc.stdout and all(f"9000{i}_cat.png" in proc.stdout for i in range(3))


def test_data_from_another_script(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"kind": "captcha", "script": "captcha"}))
    line = assert_one_line_error(run(RESNET, "train", "--data-dir", tmp_path, "--device", "cpu"), 1)
    assert "captcha.py" in line
    line = assert_one_line_error(run(LENET, "eval", "--data-dir", tmp_path / "none", "--device", "cpu"), 1)
    assert "model.pt" in line


# ---- hostile input ----
def test_eval_hostile_and_odd_images_in_one_run(lenet_trained, tmp_path):
    """Bombs, broken files, a FIFO, a symlink loop: one error object each and the run goes on; images of odd modes
    and shapes are read; stderr holds no warning and no traceback."""
    bad = hostile_images(tmp_path / "bad")
    odd = odd_images(tmp_path / "odd")
    proc = run_warnings_shown(LENET, "eval", "--data-dir", lenet_trained[0], "--json", "--device", "cpu",
                              *odd, *[path for path, _ in bad])
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == ["device: cpu"]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [obj["image"] for obj in lines] == [str(p) for p in odd] + [str(path) for path, _ in bad]
    assert all(len(obj["top"]) == 5 for obj in lines[:len(odd)])
    for obj, (_, words) in zip(lines[len(odd):], bad):
        assert obj["error"].startswith("cannot read image: ") and words in obj["error"], obj


def test_eval_refusals(lenet_trained, tmp_path):
    data = lenet_trained[0]
    image = sorted((CIFAR_DIR / "train").iterdir())[0]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image here")
    line = assert_one_line_error(run_main(LENET, "eval", "--data-dir", data, "--device", "cpu", tmp_path / "empty"), 1)
    assert "no images" in line and str(tmp_path / "empty") in line
    line = assert_one_line_error(run_main(LENET, "eval", "--model", data / "checkpoint.pt", image), 1)
    assert "checkpoint" in line and "model.pt" in line
    line = assert_one_line_error(run_main(LENET, "eval", "--model", tmp_path, "--device", "cpu", image), 1)
    assert str(tmp_path) in line
    torch.save({"script": "cifar_lenet", "model": {}}, tmp_path / "incomplete.pt")
    line = assert_one_line_error(run_main(LENET, "eval", "--model", tmp_path / "incomplete.pt", image), 1)
    assert "incomplete" in line and "labels" in line
    model = torch.load(data / "model.pt", weights_only=True)
    torch.save({**model, "model_args": {"num_classes": 3}}, tmp_path / "other_net.pt")   # 3 classes, 10 labels
    line = assert_one_line_error(run_main(LENET, "eval", "--model", tmp_path / "other_net.pt", image), 1)
    assert "malformed" in line
    torch.save({**model, "model_args": {"num_classes": 3}, "labels": model["labels"][:3]}, tmp_path / "other_net.pt")
    line = assert_one_line_error(run_main(LENET, "eval", "--model", tmp_path / "other_net.pt", image), 1)
    assert "do not fit" in line   # entries that agree, weights of another network
    weights = model["model"]
    torch.save({**model, "model": {**weights, "features.0.weight": weights["features.0.weight"].fill_(1e38)}},
               tmp_path / "overflows.pt")   # a damaged file: its answers overflow to NaN, which JSON cannot carry
    proc = run_main(LENET, "eval", "--model", tmp_path / "overflows.pt", "--json", image)
    assert "NaN or infinity" in assert_one_line_error(proc, 1) and "NaN" not in proc.stdout
    with serving(LENET, "--model", tmp_path / "overflows.pt", "--device", "cpu") as (url, server):
        status, answer = http(url + "/predict", image.read_bytes(), {"Content-Type": "image/jpeg"})
    assert status == 500 and "NaN or infinity" in answer["error"]   # the server's fault, said in its log too
    assert "error: /predict failed: the model answers NaN" in server.communicate()[1]
    (tmp_path / "folder.onnx").mkdir()
    assert "not a file" in assert_one_line_error(run_main(LENET, "eval", "--model", tmp_path / "folder.onnx", image), 1)
    line = assert_one_line_error(run_main(LENET, "eval", "--model", tmp_path / "folder.onnx", "--device", "cuda",
                                          image), 2)
    assert "--device cuda" in line and "CPU" in line   # a .onnx runs on the CPU: the option is not dropped silently
    line = assert_one_line_error(run_main(LENET, "export", "--data-dir", tmp_path / "nowhere"), 1)
    assert "model not found" in line   # not "--output ...: no folder", an option the user never gave
    (tmp_path / "dangling.onnx").symlink_to(tmp_path / "nowhere" / "x.onnx")
    line = assert_one_line_error(run_main(LENET, "export", "--model", data / "model.pt", "--output",
                                          tmp_path / "dangling.onnx"), 2)
    assert "exists" in line and (tmp_path / "dangling.onnx").is_symlink()   # the user's link stays a link


class NotATensor:
    pass


def test_train_refuses_damaged_prepared_data(names_data, tmp_path):
    """Each damage to meta.json or a shard: one line naming the file, before any training."""
    source = names_data[0]
    meta = json.loads((source / "meta.json").read_text())
    shard = (source / "training_set.0.pt.gz").read_bytes()

    def gz(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        return gzip.compress(buf.getvalue())

    cases = {  # file -> (new content, words of the error)
        "truncated shard": ("training_set.0.pt.gz", shard[:len(shard) // 2], "damaged"),
        "not gzip": ("training_set.0.pt.gz", b"PK\x03\x04 a zip, not a shard", "damaged"),
        "gzip of junk": ("training_set.0.pt.gz", gzip.compress(b"junk" * 100), "damaged"),
        "pickled object": ("training_set.0.pt.gz", gz((NotATensor(),)), "damaged"),
        "a dict": ("training_set.0.pt.gz", gz({"images": torch.zeros(2)}), "not a shard"),
        "other image size": ("training_set.0.pt.gz", gz((torch.zeros(4, 3, 33, 33, dtype=torch.uint8),
                                                          torch.zeros(4, dtype=torch.int64))), "not a shard"),
        "labels beyond meta": ("meta.json", json.dumps({**meta, "labels": meta["labels"][:2]}).encode(), "label"),
        "invalid JSON": ("meta.json", b'{"kind": "cifar", ', "not valid JSON"),
        "JSON list": ("meta.json", b"[]", "not a meta.json"),
        "missing key": ("meta.json", json.dumps({k: v for k, v in meta.items() if k != "mean"}).encode(), "'mean'"),
        "key of wrong type": ("meta.json", json.dumps({**meta, "labels": "cat dog"}).encode(), "'labels'"),
        "not UTF-8": ("meta.json", json.dumps(meta).encode().replace(b'"kind"', b'"k\xe9nd"'), "not UTF-8"),
    }
    for case, (name, content, words) in cases.items():
        data = tmp_path / case.replace(" ", "_")
        data.mkdir()
        for path in source.iterdir():
            if path.name == "meta.json" or path.name.endswith(".pt.gz"):
                shutil.copy(path, data / path.name)
        (data / name).write_bytes(content)
        line = assert_one_line_error(run_main(LENET, "train", "--data-dir", data, "--epochs", 1, "--device", "cpu"), 1)
        assert words in line and str(data) in line, (case, line)
        assert not (data / "model.pt").exists()


def test_many_labels_and_odd_label_files(cifar_dir, tmp_path):
    """A label list of 152 labels, two with images: the missing ones are named five at a time; the run trains and
    tests without drawing a 152 x 152 confusion plot (1,000 classes took 22 GB). A labels.txt that is a folder, and a
    label with a control character, are one-line refusals."""
    src = tmp_path / "src"
    for label in ("cat", "truck"):
        for i, path in enumerate(sorted((cifar_dir / "train").glob(f"*_{label}.jpg"))[:12]):
            link(path, src / f"{i:05d}_{label}.jpg")
    (src / "labels.txt").write_text("cat\ntruck\n" + "".join(f"x{i}\n" for i in range(150)))
    data = tmp_path / "d"
    proc = run(LENET, "prepare", "--image-dir", src, "--data-dir", data, "--workers", 1)
    assert proc.returncode == 0, proc.stderr
    assert "warning: no image of 'x0', 'x1', 'x2', 'x3', 'x4' and 145 more (in the label list)" in proc.stderr
    proc = run(LENET, "train", "--data-dir", data, "--epochs", 1, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "confusion.png not drawn: 152 classes (at most 100)" in proc.stdout and "test (" in proc.stdout
    assert (data / "model.pt").is_file() and not (data / "confusion.png").exists()
    (src / "labels.txt").unlink()
    (src / "labels.txt").mkdir()
    line = assert_one_line_error(run_main(LENET, "prepare", "--image-dir", src, "--data-dir", tmp_path / "e"), 1)
    assert "labels.txt: not a file" in line
    (tmp_path / "labels.txt").write_text("cat\x00\ntruck\n")
    line = assert_one_line_error(run_main(LENET, "prepare", "--image-dir", src, "--labels", tmp_path / "labels.txt",
                                          "--data-dir", tmp_path / "e"), 1)
    assert "is not a label" in line
    (tmp_path / "labels.txt").write_text("赤い\u3000車\nzwj\u200dlabel\n")   # an ideographic space, a joiner: names
    assert load_script(LENET).read_label_list(tmp_path / "labels.txt") == ["赤い\u3000車", "zwj\u200dlabel"]


def test_prepare_label_file_not_utf8(names_dir, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_bytes("chat\nchien\nb\xe9b\xe9\n".encode("latin-1"))
    line = assert_one_line_error(run_main(LENET, "prepare", "--image-dir", names_dir, "--labels", labels,
                                          "--data-dir", tmp_path / "d", "--workers", 1), 1)
    assert str(labels) in line and "UTF-8" in line


# ---- ship and serve ----
def test_lenet_export_and_serve_onnx(lenet_trained, names_dir, tmp_path):
    """export, eval of the .onnx (the .pt's answers), then serve of the .onnx in two processes (--workers 2): /info
    says so, /predict answers as eval, by body and by multipart, from either process, also a process restarted after
    a crash while the model file is gone; Ctrl-C stops it cleanly. An .onnx whose metadata was edited: one line."""
    data = lenet_trained[0]
    images = sorted((names_dir / "test").iterdir())[:24]
    onnx, answers = check_onnx(LENET, data / "model.pt", images, tmp_path)
    assert all(len(a["top"]) == 5 and {t["label"] for t in a["top"]} <= set(LABELS) for a in answers)
    with serving(LENET, "--model", onnx, "--data-dir", data, "--workers", 2) as (url, proc):
        status, info = http(url + "/info")
        assert status == 200 and info["format"] == "onnx" and info["labels"] == LABELS
        body = images[0].read_bytes()
        expected = {k: v for k, v in answers[0].items() if k != "image"}
        assert http(url + "/predict", body, {"Content-Type": "image/jpeg"}) == (200, {"image": None, **expected})
        assert http(url + "/predict", *multipart("image", images[0].name, body)) == (200, {"image": images[0].name,
                                                                                           **expected})
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        workers = [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(workers) == 2
        seen = set()
        for _ in range(150):   # until both processes have answered (the second may still be loading the model)
            seen |= {http(url + "/health")[1]["pid"] for _ in range(8)}
            if len(seen) == 2:
                break
            time.sleep(0.2)
        assert seen == set(map(int, workers))
        onnx.rename(tmp_path / "moved.onnx")   # a process restarted after a crash loads the model the others run
        os.kill(int(workers[0]), signal.SIGKILL)
        for _ in range(300):
            restarted = {http(url + "/health")[1]["pid"] for _ in range(8)} - seen
            if restarted:
                break
            time.sleep(0.2)
        assert restarted and all(http(url + "/predict", body, {"Content-Type": "image/jpeg"}) == (200, {
            "image": None, **expected})
                                 for _ in range(16))
    out, err = proc.communicate()
    assert proc.returncode == 0 and "Traceback" not in err and "2 processes" in out, err
    # metadata edited to describe another network than the graph (3 classes of 10 outputs): one line, not a traceback
    import onnx as onnx_package
    proto = onnx_package.load(str(tmp_path / "moved.onnx"))
    entry = next(p for p in proto.metadata_props if p.key == "suite")
    meta = json.loads(entry.value)
    meta["labels"], meta["model_args"]["num_classes"] = meta["labels"][:3], 3
    entry.value = json.dumps(meta)
    onnx_package.save(proto, str(tmp_path / "edited.onnx"))
    line = assert_one_line_error(run(LENET, "eval", images[0], "--model", tmp_path / "edited.onnx"), 1)
    assert "does not fit the metadata stored with it" in line


def test_resnet_export_onnx(resnet_trained, folders_dir, tmp_path):
    data, _ = resnet_trained
    images = sorted(folders_dir.rglob("*.jpg"))[:6]
    check_onnx(RESNET, data / "model.pt", images, tmp_path)


def test_image_size_edited_in_a_copy(folders_dir, tmp_path):
    """A copy with IMAGE_SIZE = 16 (the Config invites it) prepares, trains and exports at 16 px; the script at 32
    refuses its data with the reason (it said "not a shard of ... prepared data"), and evaluates and exports its model
    at the model's own size (eval read it at 32, export built a 32x32 graph that failed in eval with a traceback)."""
    copy = tmp_path / "copy" / LENET
    copy.parent.mkdir()
    source = (ROOT / LENET).read_text()
    assert source.count("\nIMAGE_SIZE = 32 ") == 1
    copy.write_text(source.replace("\nIMAGE_SIZE = 32 ", "\nIMAGE_SIZE = 16 "))
    data = tmp_path / "d16"
    for args in (["prepare", "--image-dir", folders_dir, "--workers", 1], ["train", "--epochs", 1, "--device", "cpu"]):
        proc = run(copy, *args, "--data-dir", data)
        assert proc.returncode == 0, proc.stderr
    line = assert_one_line_error(run(LENET, "train", "--data-dir", data, "--device", "cpu"), 1)
    assert "prepared at 16 px, IMAGE_SIZE is 32" in line and "prepare" in line
    images = sorted(folders_dir.rglob("*.jpg"))[:3]
    answers = {}
    for name, script in (("copy", copy), ("original", ROOT / LENET)):
        proc = run(script, "eval", *images, "--model", data / "model.pt", "--json", "--device", "cpu")
        assert proc.returncode == 0, proc.stderr
        answers[name] = [json.loads(line) for line in proc.stdout.splitlines()]
    assert answers["copy"] == answers["original"] and len(answers["copy"]) == 3
    check_onnx(LENET, data / "model.pt", images, tmp_path)   # a 16x16 graph: the .onnx answers as the .pt


def test_prepare_train_and_test_class_folders(folders_dir, tmp_path):
    """DIR/train/CLASS/ and DIR/test/CLASS/ (a common layout): prepare says which options read it (it said "class
    folders without images: train"), and they do."""
    for split, first in (("train", 0), ("test", 6)):
        for label in FOLDER_CLASSES[:2]:
            for path in sorted((folders_dir / label).iterdir())[first:first + 6]:
                link(path, tmp_path / "src" / split / label / path.name)
    src = tmp_path / "src"
    line = assert_one_line_error(run_main(LENET, "prepare", "--image-dir", src, "--data-dir", tmp_path / "d",
                                          "--workers", 1), 1)
    assert f"its classes are folders inside train/: pass --image-dir {src / 'train'} --test-dir {src / 'test'}" in line
    proc = run_main(LENET, "prepare", "--image-dir", src / "train", "--test-dir", src / "test", "--data-dir",
                    tmp_path / "d", "--workers", 1)
    assert proc.returncode == 0 and "testing_set 12" in proc.stdout, proc.stdout + proc.stderr

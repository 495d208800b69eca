"""fast_rcnn_faces.py: unit checks (letterbox, offsets, RoI shapes, loss, AP) and end to end on 36 real photos."""
import csv
import importlib.util
import json
import math
import os
import re
import shutil
import sys
from functools import partial
from types import SimpleNamespace

from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import (FACES_DIR, ROOT, assert_one_line_error, check_calibration_before_the_shift, check_face_torchrun,
                      check_onnx, hostile_images, http, load_script, multipart, odd_images, png_declaring, run, run_main,
                      same_answers, serving, tree_bytes)

SCRIPT = "fast_rcnn_faces.py"
N_PHOTOS = 36


@pytest.fixture(scope="module")
def frc():
    spec = importlib.util.spec_from_file_location("fast_rcnn_faces", ROOT / SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- unit checks ----
@pytest.mark.parametrize("photo", [(612, 408), (345, 612), (500, 500)])
def test_letterbox_round_trip(frc, photo):
    """A box drawn into the photo lands where to_letterbox says, and maps back within 1-2 px."""
    w, h = photo
    box = torch.tensor([[w * 0.3, h * 0.4, w * 0.3 + 60, h * 0.4 + 70]]).round()
    img = Image.new("RGB", photo, (0, 0, 128))
    img.paste((255, 255, 255), tuple(int(v) for v in box[0].tolist()))
    size = (384, 256)
    lb = frc.letterbox_image(img, size)
    assert lb.shape == (3, 256, 384) and lb.dtype == torch.uint8
    white = (lb[0] > 200).nonzero()
    found = torch.tensor([white[:, 1].min(), white[:, 0].min(), white[:, 1].max() + 1, white[:, 0].max() + 1]).float()
    mapped = frc.to_letterbox(box, w, h, size)
    assert (found - mapped[0]).abs().max() <= 1.5, (found, mapped)
    assert (frc.from_letterbox(found[None], w, h, size) - box).abs().max() <= 2.5
    assert (frc.from_letterbox(mapped, w, h, size) - box).abs().max() <= 1e-3
    new_w, new_h, pad_x, pad_y = frc.letterbox_geometry(w, h, size)
    assert (new_w == 384 or new_h == 256) and pad_x >= 0 and pad_y >= 0


def test_offsets_round_trip(frc):
    gen = torch.Generator().manual_seed(0)
    props = torch.rand(50, 2, generator=gen) * 300
    props = torch.cat([props, props + 10 + torch.rand(50, 2, generator=gen) * 100], 1)
    boxes = props + torch.randn(50, 4, generator=gen) * 5
    offsets = frc.encode_offsets(boxes, props)
    assert torch.allclose(frc.decode_offsets(offsets, props), boxes, atol=1e-3)
    assert frc.encode_offsets(props, props).abs().max() < 1e-5


def test_detect_looks_again_where_the_box_moved(frc):
    """A network that moves every region halfway to one face (symmetric about the photo's middle, so the mirror
    agrees): one look lands halfway, the second look (refine) three quarters of the way, on the photo and its
    mirror alike; without the box head the proposal itself comes back."""
    size, face = (384, 256), torch.tensor([[172.0, 100.0, 212.0, 148.0]])

    class Halfway(torch.nn.Module):
        def forward(self, x, rois):
            logits = torch.tensor([0.0, 5.0]).expand(len(rois), 2)
            return logits, frc.encode_offsets(face.expand(len(rois), 4), rois[:, 1:]) / 2

    proposal = face + torch.tensor([[16.0, 12.0, 16.0, 12.0]])
    images, sizes = torch.zeros(1, 3, size[1], size[0], dtype=torch.uint8), torch.tensor([size])
    found = {}
    for flip, refine, regress in [(False, False, True), (False, True, True), (True, True, True), (True, True, False)]:
        (boxes, scores), = frc.detect(Halfway(), images, [proposal], sizes, torch.device("cpu"), 0.3, regress=regress,
                                      flip=flip, refine=refine, vote_iou=0)
        assert len(boxes) == 1 and scores[0] == pytest.approx(torch.sigmoid(torch.tensor(5.0)).item())
        found[flip, refine, regress] = boxes[0]
    distance = {k: float((box - face[0]).abs().max()) for k, box in found.items()}
    assert distance[False, False, True] == pytest.approx(8, abs=0.5)
    assert distance[False, True, True] == pytest.approx(4, abs=0.5)
    assert distance[True, True, True] == pytest.approx(4, abs=0.5)
    assert torch.allclose(found[True, True, False], proposal[0])


def test_detect_runs_the_trunk_once_per_view(frc):
    """Looking again (mirror, then refine on photo and mirror) reuses the feature maps: the trunk runs twice per
    batch, and the detections are those of a network that computes everything on each call (as ONNX does)."""
    torch.manual_seed(0)
    model = frc.FastRCNN(width=8).eval()
    calls = []
    model.features = lambda x, run=model.features: calls.append(len(x)) or run(x)

    class Whole(torch.nn.Module):   # no classify_rois: detect calls it whole, as an ONNX network
        def forward(self, x, rois):
            return model.classify_rois(model.features(x), rois)

    size = (96, 64)
    images = torch.randint(0, 256, (3, 3, size[1], size[0]), dtype=torch.uint8)
    props = [torch.tensor([[4.0, 4, 40, 40], [30, 10, 80, 60], [50, 20, 90, 60]])] * 3
    sizes = torch.tensor([size] * 3)
    cached = frc.detect(model, images, props, sizes, torch.device("cpu"), 0.3, batch_size=2)
    assert calls == [2, 2, 1, 1]   # two batches, each the photos and their mirror images
    whole = frc.detect(Whole(), images, props, sizes, torch.device("cpu"), 0.3, batch_size=2)
    assert len(calls) > 4
    for (b1, s1), (b2, s2) in zip(cached, whole):
        assert len(b1) > 0 and torch.allclose(b1, b2, atol=1e-4) and torch.allclose(s1, s2, atol=1e-5)


def test_min_score_leaves_the_better_boxes_as_they_were(frc):
    """eval's MIN_SCORE floor: NMS and voting run on the boxes above it only, and those come out exactly as
    without the floor (a box is suppressed only by better ones, and every box still votes)."""
    torch.manual_seed(1)
    model = frc.FastRCNN(width=8).eval()
    size = (96, 64)
    images = torch.randint(0, 256, (2, 3, size[1], size[0]), dtype=torch.uint8)
    props = [frc.photo_proposals(torch.zeros(0, 4), 96, 64, size)] * 2
    sizes = torch.tensor([size] * 2)
    run = partial(frc.detect, model, images, props, sizes, torch.device("cpu"), 0.3, calibration=(8.0, 0.0, 0.5))
    everything = run()
    floor = float(everything[0][1].median())
    floored = run(min_score=floor)
    for (b1, s1), (b2, s2) in zip(everything, floored):
        assert 0 < len(b2) < len(b1) and (s2 >= floor).all()
        assert torch.equal(b1[s1 >= floor], b2) and torch.equal(s1[s1 >= floor], s2)


def test_vote_with_no_weight_keeps_the_box(frc):
    """Box voting where every overlapping score is 0 (eval --threshold 0): the kept box as it was, not NaN; scores
    under 1e-30 are weights like any other (a clamp once moved those boxes to the origin)."""
    kept, boxes = torch.tensor([[10., 10, 50, 50]]), torch.tensor([[10., 10, 50, 50], [12, 12, 52, 52]])
    assert torch.equal(frc.vote_boxes(kept, boxes, torch.zeros(2), 0.5), kept)
    for scores in (torch.tensor([1.0, 1.0]), torch.tensor([1e-35, 1e-35])):   # tiny weights: still their mean
        assert torch.allclose(frc.vote_boxes(kept, boxes, scores, 0.5), torch.tensor([[11., 11, 51, 51]]))


def test_eval_mark_behind_a_colour_profile(frc, tmp_path):
    """eval's PNG carries its mark after the photo's ICC profile (8 KB here): still found, so a second eval replaces
    it; a PNG without the mark is not eval's, unless it has the tutorial's default name."""
    img = Image.new("RGB", (40, 30))
    img.info["icc_profile"] = os.urandom(8000)
    frc.draw_boxes(img, [{"x": 1, "y": 2, "w": 10, "h": 10, "score": 0.9}], tmp_path / "out.png", frc.SIZE)
    assert frc.written_by_eval(tmp_path / "out.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "mine.png")
    assert not frc.written_by_eval(tmp_path / "mine.png") and frc.written_by_eval(tmp_path / "mine.png", any_png=True)
    (tmp_path / "text.png").write_text("not an image")
    assert not frc.written_by_eval(tmp_path / "text.png", any_png=True)


def test_roi_extraction_shapes(frc):
    model = frc.FastRCNN(width=8).eval()
    with torch.no_grad():
        feats = model.features(torch.randn(2, 3, 256, 384))
        assert feats.shape == (2, 16, 256 // frc.STRIDE, 384 // frc.STRIDE)
        rois = [torch.tensor([[0., 0, 40, 40], [10, 20, 200, 250], [300, 100, 380, 200]]), torch.tensor([[5., 5, 25, 30]])]
        logits, offsets = model.classify_rois(feats, rois)
    assert logits.shape == (4, 2) and offsets.shape == (4, 4)
    props = frc.photo_proposals(torch.tensor([[1., 2, 30, 40]]), 612, 408, (384, 256))
    assert props.shape[1] == 4 and len(props) > 1000
    assert props[:, 0].min() >= 0 and props[:, 2].max() <= 384 + 1e-3 and props[:, 3].max() <= 256 + 1e-3


def test_loss_without_positives_or_background_is_finite(frc):
    model = frc.FastRCNN(width=8)
    feats = model.features(torch.randn(1, 3, 64, 64))
    logits, offsets = model.classify_rois(feats, [torch.tensor([[0., 0, 30, 30], [10, 10, 50, 50]])])
    for labels in ([0, 0], [1, 1]):
        labels = torch.tensor(labels)
        loss = frc.detection_loss(logits, offsets, labels, torch.zeros(2, 4))
        assert math.isfinite(loss.item())
        loss.backward(retain_graph=True)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # a photo without any true box: only background, no NaN offsets
    rois, labels, targets = frc.sample_rois(torch.tensor([[0., 0, 30, 30], [5, 5, 40, 40]]), torch.zeros(0, 4),
                                            torch.Generator().manual_seed(0))
    assert labels.tolist() == [0, 0] and torch.isfinite(targets).all()


def test_sample_rois_labels_by_iou(frc):
    gt = torch.tensor([[100., 100, 150, 160]])
    props = torch.tensor([[100., 100, 150, 160], [102, 101, 152, 158], [0, 0, 40, 40], [120, 130, 170, 190]])
    rois, labels, targets = frc.sample_rois(props, gt, torch.Generator().manual_seed(0))
    ious = frc.box_iou(rois, gt)[:, 0]
    assert (ious[labels == 1] >= frc.POS_IOU).all() and (ious[labels == 0] < frc.NEG_IOU).all()
    assert labels.sum() == 3 and (labels == 0).sum() == 2  # 2 close proposals + the true box; 2 backgrounds
    decoded = frc.decode_offsets(targets[labels == 1], rois[labels == 1])
    assert torch.allclose(decoded, gt.expand_as(decoded), atol=1e-3)


def test_detection_scores_by_hand(frc):
    gt = [torch.tensor([[0., 0, 10, 10], [20, 20, 30, 30]])]
    perfect = [(gt[0].clone(), torch.tensor([0.9, 0.8]))]
    assert frc.detection_scores(perfect, gt, 0.5)["ap50"] == pytest.approx(1.0)
    # a false positive ranked first: precision 1/2 at recall 1/2, 2/3 at recall 1 -> envelope 2/3 -> AP 2/3
    dets = [(torch.tensor([[50., 50, 60, 60], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 11]]),
             torch.tensor([0.9, 0.8, 0.7, 0.6]))]
    s = frc.detection_scores(dets, gt, 0.75)
    assert s["ap50"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(0.5)
    assert s["count_rmse"] == pytest.approx(0.0)  # 2 boxes >= 0.75 for 2 faces (the duplicate is below)


def test_fit_calibration(frc):
    """Platt scaling: the mean chance equals the fraction of correct boxes; monotonic. Then the shift c puts the
    threshold 0.5 where the count is best: a loose box on a face (IoU < 0.5, a wrong detection for Platt) counts."""
    gen = torch.Generator().manual_seed(0)
    xy = torch.arange(40, dtype=torch.float32)[:, None] * 50
    gt = torch.cat([xy, torch.zeros(40, 1), xy + 20, torch.full((40, 1), 20.0)], 1)
    wrong = gt + torch.tensor([0.0, 100, 0, 100])
    scores = torch.cat([torch.rand(40, generator=gen) * 0.3 + 0.7, torch.rand(40, generator=gen) * 0.8 + 0.2])
    dets = [(torch.cat([gt, wrong]), scores)]
    a, b, c = frc.fit_calibration(dets, [gt])
    p = torch.sigmoid(a * torch.logit(scores) + b)
    assert a > 0 and abs(p.mean().item() - 0.5) < 0.01
    assert p[:40].mean() > p[40:].mean() + 0.1 and (p.argsort() == scores.argsort()).all()
    assert frc.fit_calibration([(gt[:5], scores[:5])], [gt]) is None  # too few wrong boxes to fit
    # 30 photos of 2 faces: a tight box (score 0.97-0.995), a loose one (IoU 0.43, 0.94-0.985), a false one
    # (0.85-0.93); 10 photos of 1 face: the tight and the false box
    face, loose, false = [0.0, 0, 20, 20], [40.0, 0, 60, 46], [100.0, 100, 120, 120]
    truths = [torch.tensor([face, [40.0, 0, 60, 20]])] * 30 + [torch.tensor([face])] * 10
    u = torch.rand(40, 3, generator=gen)
    dets = [(torch.tensor([face, loose, false][:3 if i < 30 else 1] + ([] if i < 30 else [false])),
             torch.tensor([0.97 + 0.025 * r[0], 0.94 + 0.045 * r[1], 0.85 + 0.08 * r[2]])[[0, 1, 2] if i < 30 else [0, 2]])
            for i, r in enumerate(u.tolist())]
    a, b, c = frc.fit_calibration(dets, truths)
    chance = [(boxes, torch.sigmoid(a * torch.logit(s) + b)) for boxes, s in dets]
    scored = [(boxes, torch.sigmoid(torch.logit(s) + c)) for boxes, s in chance]
    assert frc.detection_scores(chance, truths, 0.5)["count_rmse"] > 0.8   # the chance counts 1 face of 2
    assert frc.detection_scores(scored, truths, 0.5)["count_rmse"] == 0.0  # the score counts both, not the false box
    assert frc.detection_scores(scored, truths, 0.5)["ap50"] == frc.detection_scores(dets, truths, 0.5)["ap50"]


# ---- end to end on real photos ----
@pytest.fixture(scope="module")
def faces(tmp_path_factory, shared_datasets):
    root = tmp_path_factory.mktemp("fast_rcnn_faces")
    img_dir = root / "photos"
    img_dir.mkdir()
    df = pd.read_csv(FACES_DIR / "bbox_train.csv")
    names = sorted(df["Name"].unique())[:N_PHOTOS]
    for n in names:   # copies: a symlink out of the folder is refused
        shutil.copy(FACES_DIR / "image_data" / n, img_dir / n)
    (img_dir / "broken.jpg").write_bytes(b"not a jpeg")
    (img_dir / "sub").mkdir()                        # a subfolder is fine (and "sub/..." still sorts last)
    (img_dir / names[-1]).rename(img_dir / "sub" / names[-1])
    df.loc[df["Name"] == names[-1], "Name"] = f"sub/{names[-1]}"
    names[-1] = f"sub/{names[-1]}"
    (img_dir / "escape.jpg").symlink_to(FACES_DIR / "image_data" / names[0])
    png_declaring(img_dir / "bomb.png", 15000, 15000)
    rows = df[df["Name"].isin(names)]
    bad = pd.DataFrame([
        {"Name": names[0], "width": 612, "height": 408, "xmin": "abc", "ymin": 1, "xmax": 20, "ymax": 20},
        {"Name": names[1], "width": 612, "height": 408, "xmin": 50, "ymin": 50, "xmax": 50, "ymax": 90},
        {"Name": names[2], "width": 612, "height": 408, "xmin": 4000, "ymin": 10, "xmax": 5000, "ymax": 40},
        {"Name": "missing.jpg", "width": 612, "height": 408, "xmin": 1, "ymin": 1, "xmax": 20, "ymax": 20},
        {"Name": "broken.jpg", "width": 612, "height": 408, "xmin": 1, "ymin": 1, "xmax": 20, "ymax": 20},
        *[{"Name": name, "width": 612, "height": 408, "xmin": 1, "ymin": 1, "xmax": 20, "ymax": 20}
          for name in (f"../{names[0]}", str(FACES_DIR / "image_data" / names[0]), "escape.jpg", "", "bomb.png")],
    ])
    csv_path = root / "faces.csv"
    pd.concat([rows, bad]).to_csv(csv_path, index=False)
    data = root / "data"
    prep = run(SCRIPT, "prepare", "--image-dir", img_dir, "--csv", csv_path, "--data-dir", data, "--workers", 2)
    assert prep.returncode == 0, prep.stderr
    train = run(SCRIPT, "train", "--data-dir", data, "--epochs", 1, "--device", "cpu", "--batch-size", 4)
    assert train.returncode == 0, train.stderr
    return SimpleNamespace(root=root, img_dir=img_dir, csv=csv_path, data=data, prep=prep, train=train,
                           names=names, rows=rows, photos=[img_dir / n for n in names[:2]])


def test_prepare_counts_and_split_by_photo(faces, frc):
    assert f"kept {N_PHOTOS} photos with {len(faces.rows)} faces" in faces.prep.stdout
    meta = json.loads((faces.data / "meta.json").read_text())
    assert meta["kind"] == meta["script"] == "fast_rcnn_faces"   # the stem, as the other scripts store it
    assert meta["skipped"] == {"non-numeric box": 1, "zero-size or inverted box": 1, "box outside photo": 1,
                               "missing photo": 1, "unreadable photo": 2, "Name outside --image-dir": 2,
                               "link out of --image-dir (pass the folder it leads to)": 1,
                               "empty Name": 1}
    for reason, n in meta["skipped"].items():
        assert f"skipped {n} x {reason}: " in faces.prep.stdout
    assert "bomb.png (" in faces.prep.stdout and "pixels" in faces.prep.stdout
    splits = meta["splits"]
    train, val, test = (frc.split_indices(N_PHOTOS, 0))
    assert splits["training"] == sorted(faces.names[i] for i in train)
    assert splits["validating"] == sorted(faces.names[i] for i in val)
    assert splits["testing"] == sorted(faces.names[i] for i in test)
    assert [len(v) for v in splits.values()] == [28, 3, 5]
    images, gt, n_gt, ss, n_ss, sizes = frc.read_split(faces.data, "testing_set")
    assert images.dtype == torch.uint8 and images.shape == (5, 3, 256, 384)
    expected = [len(faces.rows[faces.rows["Name"] == n]) for n in splits["testing"]]
    assert n_gt.tolist() == expected and (n_ss > 0).all()


def test_train_one_epoch(faces, frc):
    out = faces.train.stdout
    assert "epoch 1/1  train loss" in out and "AP50" in out, out
    m = re.search(r"^test photos: 5  AP@0.5 ([\d.]+)", out, re.M)
    assert m, out
    row = list(csv.DictReader((faces.data / "runs.csv").open()))[-1]   # the table holds the figure printed
    assert float(row["test"]) == pytest.approx(float(m.group(1)), abs=5e-4)
    history = (faces.data / "history.csv").read_text().splitlines()
    assert len(history) == 2 and "val_ap50" in history[0]
    assert (faces.data / "history.png").stat().st_size > 0
    model = torch.load(faces.data / "model.pt", weights_only=True)
    assert model["script"] == "fast_rcnn_faces" and model["size"] == [384, 256]
    assert model["nms_iou"] == 0.4 and model["epoch"] == 1   # train's NMS (eval's default), and the model's epoch
    ckpt = torch.load(faces.data / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and len(ckpt["history"]) == 1 and ckpt["config"]["epochs"] == 1
    assert all(math.isfinite(float(v)) for v in history[1].split(","))


def test_resume(faces, tmp_path):
    """One more epoch on a copy of the trained data: it trains at the cosine's lr over the new --epochs (half the
    peak after 1 of 2), and the first epoch's history stays as it was."""
    data = tmp_path / "data"
    shutil.copytree(faces.data, data)
    before = tree_bytes(data)   # another --width: refused (it was said as changed, the checkpoint's network trained)
    proc = run_main(SCRIPT, "train", "--data-dir", data, "--epochs", 2, "--device", "cpu", "--resume", "--width", 8)
    assert "--width 8: the run resumed has 24 and a resumed run keeps its network" in assert_one_line_error(proc, 2)
    assert tree_bytes(data) == before
    proc = run(SCRIPT, "train", "--data-dir", data, "--epochs", 2, "--device", "cpu", "--resume", "--batch-size", 4)
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint.pt after epoch 1 (" in proc.stdout and "epoch 2/2  train loss" in proc.stdout
    before, after = (list(csv.DictReader((d / "history.csv").open())) for d in (faces.data, data))
    assert len(after) == 2 and after[0] == before[0]
    assert float(after[1]["lr"]) == pytest.approx(float(before[0]["lr"]) / 2)
    assert math.isfinite(float(after[1]["train_loss"])) and float(after[1]["train_loss"]) > 0


def test_eval_json_and_output_dir(faces):
    outdir = faces.root / "annotated"
    args = ["eval", "--data-dir", faces.data, "--json", "--threshold", "0.05", "--output-dir", outdir, "--device", "cpu"]
    proc = run(SCRIPT, *args, *faces.photos, faces.img_dir / "broken.jpg")
    assert proc.returncode == 1, proc.stderr  # one unreadable image
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 3 and "error" in lines[2] and lines[2]["image"].endswith("broken.jpg")
    for line, photo in zip(lines, faces.photos):
        assert line["image"] == str(photo) and line["output"] == str(outdir / f"{photo.stem}.png")
        assert Image.open(line["output"]).size == Image.open(photo).size
        w, h = Image.open(photo).size
        scores = [b["score"] for b in line["boxes"]]
        assert line["boxes"] and scores == sorted(scores, reverse=True) and all(0.05 <= s <= 1 for s in scores)
        for b in line["boxes"]:
            assert b["x"] >= 0 and b["y"] >= 0 and b["x"] + b["w"] <= w and b["y"] + b["h"] <= h
        drawn = Image.open(line["output"]).convert("RGB")
        assert all(drawn.getpixel((b["x"], b["y"])) == (255, 0, 0) for b in line["boxes"])   # each box drawn, in red
    # NMS never depends on the threshold: a higher threshold keeps exactly the higher-scored boxes (one between two
    # scores of the middle of the list, so that it drops some and keeps some)
    scores = [b["score"] for b in lines[0]["boxes"]]
    middle = scores[len(scores) // 2 - 1:]
    cut = next((a + b) / 2 for a, b in zip(middle, middle[1:]) if a - b >= 2e-4)
    high = run(SCRIPT, *args[:4], "--threshold", cut, *args[6:], faces.photos[0])
    assert high.returncode == 0, high.stderr
    kept = json.loads(high.stdout)["boxes"]
    assert 0 < len(kept) < len(scores) and kept == [b for b in lines[0]["boxes"] if b["score"] >= cut]


def test_model_calibrated_before_the_shift(faces, tmp_path):
    check_calibration_before_the_shift(SCRIPT, faces.data / "model.pt", faces.photos[0], tmp_path, math.log(3))


def test_eval_human_output_stdin_and_no_regress(faces):
    out = faces.root / "single.png"
    proc = run(SCRIPT, "eval", "--data-dir", faces.data, "--output", out, "--threshold", "0.05", "--device", "cpu",
               stdin=f"{faces.photos[0]}\n")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == f"saved to {out}" and out.exists()
    assert len(lines) > 1   # boxes, then the saved line
    assert all(len(line.split()) == 4 and all(v.lstrip("-").isdigit() for v in line.split()) for line in lines[:-1])
    raw = run(SCRIPT, "eval", "--data-dir", faces.data, "--no-regress", "--json", "--threshold", "0.05", "--device",
              "cpu", faces.photos[0])
    assert raw.returncode == 0, raw.stderr
    raw_boxes = [[b[k] for k in "xywh"] for b in json.loads(raw.stdout)["boxes"]]
    assert raw_boxes and raw_boxes != [list(map(int, line.split())) for line in lines[:-1]]   # the head moved boxes


def test_bad_input(faces, tmp_path):
    """Each mistake is one line (in-process: the same main(), no interpreter start per case; the last case goes
    through a real process)."""
    threads = torch.get_num_threads()

    def error(*args, status=1):
        try:
            return assert_one_line_error(run_main(SCRIPT, *args), status)
        finally:
            torch.set_num_threads(threads)   # an in-process prepare worker sets it to 1

    assert "no such CSV file" in error("prepare", "--image-dir", faces.img_dir, "--csv", tmp_path / "no.csv",
                                       "--data-dir", tmp_path / "d")
    assert "a folder, not a CSV file" in error("prepare", "--image-dir", faces.img_dir, "--csv", faces.img_dir,
                                               "--data-dir", tmp_path / "d")   # was "CSV not found"
    no_cols = tmp_path / "cols.csv"
    no_cols.write_text("Name,x1,ymin,xmax,ymax\na.jpg,1,2,3,4\n")
    assert "xmin" in error("prepare", "--image-dir", faces.img_dir, "--csv", no_cols, "--data-dir", tmp_path / "d")
    all_bad = tmp_path / "bad.csv"
    all_bad.write_text("Name,xmin,ymin,xmax,ymax\nmissing.jpg,1,2,30,40\n" + f"{faces.names[0]},5,5,5,9\n")
    assert "no usable photo" in error("prepare", "--image-dir", faces.img_dir, "--csv", all_bad, "--data-dir", tmp_path / "d")
    assert "no such folder" in error("prepare", "--image-dir", tmp_path / "nope", "--csv", faces.csv,
                                     "--data-dir", tmp_path / "d")
    assert "a file, not a folder" in error("prepare", "--image-dir", faces.csv, "--csv", faces.csv,
                                         "--data-dir", tmp_path / "d")
    assert "model not found" in error("eval", "--data-dir", tmp_path, faces.photos[0])
    torch.save({"script": "rcnn_faces", "model": {}}, tmp_path / "other.pt")
    assert "rcnn_faces.py" in error("eval", "--model", tmp_path / "other.pt", faces.photos[0])
    (tmp_path / "meta.json").write_text(json.dumps({"kind": "rcnn_faces", "script": "rcnn_faces.py"}))
    assert "rcnn_faces.py" in error("train", "--data-dir", tmp_path, "--device", "cpu")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    meta = json.loads((faces.data / "meta.json").read_text())   # as a prepare before the stem wrote it: still read
    (fresh / "meta.json").write_text(json.dumps({**meta, "script": "fast_rcnn_faces.py"}))
    assert "checkpoint.pt not found" in error("train", "--data-dir", fresh, "--resume", "--device", "cpu")
    assert "no training_set shards" in error("train", "--data-dir", fresh, "--device", "cpu")
    assert "WIDTHxHEIGHT" in assert_one_line_error(run(SCRIPT, "prepare", "--size", "384"), 2)   # argparse too


def test_torchrun_two_processes(faces, tmp_path):
    """DDP on the CPU (gloo): the same steps per epoch as one process, one model that plain eval loads."""
    check_face_torchrun(SCRIPT, faces.data, tmp_path, "--batch-size", 4)


# ---- hostile input ----
def test_eval_hostile_images_and_same_names(faces, tmp_path):
    """Unreadable images are error objects and the run goes on; two photos of one name from two folders get two
    files in --output-dir, numbered past a file already there."""
    same = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        same.append(Path(shutil.copy(faces.photos[0], tmp_path / folder / "photo.jpg")))
    bad = hostile_images(tmp_path / "bad")
    odd = odd_images(tmp_path / "odd")
    out_dir = tmp_path / "annotated"
    out_dir.mkdir()
    (out_dir / "photo-2.png").write_text("the user's own file")
    proc = run(SCRIPT, "eval", *same, *odd, *[p for p, _ in bad], "--data-dir", faces.data, "--json",
               "--output-dir", out_dir, "--device", "cpu")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [obj["image"] for obj in lines] == [str(p) for p in [*same, *odd, *[p for p, _ in bad]]]
    assert [obj["output"] for obj in lines[:2]] == [str(out_dir / "photo.png"), str(out_dir / "photo-3.png")]
    assert (out_dir / "photo-2.png").read_text() == "the user's own file"
    for _ in range(2):   # the second run finds the first one's annotated copy in the folder, and leaves it out
        proc = run(SCRIPT, "eval", tmp_path / "a", "--data-dir", faces.data, "--json", "--output-dir",
                   tmp_path / "a" / "annotated", "--device", "cpu")
        assert [json.loads(line)["output"] for line in proc.stdout.splitlines()] == [
            str(tmp_path / "a" / "annotated" / f"photo{'-2' if _ else ''}.png")], proc.stdout
    assert "left out 1 images inside --output-dir" in proc.stderr
    named = tmp_path / "a" / "annotated" / "photo.png"   # a file named on the command line is read, wherever it is
    proc = run(SCRIPT, "eval", named, "--data-dir", faces.data, "--json", "--output-dir", named.parent, "--device", "cpu")
    assert json.loads(proc.stdout)["output"] == str(named.parent / "photo-3.png") and "left out" not in proc.stderr
    line = assert_one_line_error(run_main(SCRIPT, "eval", named.parent, "--data-dir", faces.data, "--output-dir",
                                          named.parent), 2)
    assert "holds the input folder" in line   # its own annotated copies, or the user's photos: never read as input
    assert all("boxes" in obj and Path(obj["output"]).exists() for obj in lines[:2 + len(odd)])
    for obj, (_, words) in zip(lines[2 + len(odd):], bad):
        assert obj["error"].startswith("cannot read image: ") and words in obj["error"], obj


def test_eval_large_and_faceless_photos(faces, tmp_path):
    """A photo much larger than the letterbox is read through a copy reduced by an integer factor: a photo made of
    3x3 blocks of one twice the letterbox gives that photo's boxes times 3, scored the same, and its annotated copy is
    the smaller photo's size. A photo of one flat colour is a photo like any other (this one-epoch model is too weak
    to promise no box there; benchmarks/faces_bench.py checks the trained model)."""
    w, h = (2 * v for v in torch.load(faces.data / "model.pt", weights_only=True)["size"])
    small = Image.open(faces.photos[0]).convert("RGB").resize((w, h))
    small.save(tmp_path / "small.png")
    small.resize((3 * w, 3 * h), Image.NEAREST).save(tmp_path / "large.png", compress_level=1)
    Image.new("RGB", (640, 480), (120, 140, 160)).save(tmp_path / "flat.jpg")
    proc = run(SCRIPT, "eval", *(tmp_path / n for n in ("small.png", "large.png", "flat.jpg")), "--data-dir", faces.data,
               "--json", "--threshold", "0.05", "--output-dir", tmp_path / "out", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    a, b, flat = (json.loads(line) for line in proc.stdout.splitlines())
    assert a["boxes"] and len(b["boxes"]) == len(a["boxes"])
    for p, q in zip(a["boxes"], b["boxes"]):
        assert q["score"] == p["score"] and all(abs(q[k] - 3 * p[k]) <= 3 for k in "xywh"), (p, q)
    assert Image.open(b["output"]).size == (w, h)
    assert isinstance(flat["boxes"], list) and Image.open(flat["output"]).size == (640, 480)


def test_eval_output_refusals(faces, tmp_path):
    """--output takes one image and needs an existing folder: one line, status 2, before the model loads. An empty
    folder beside the one image is an error line, not a second image."""
    absent = ["--model", tmp_path / "absent.pt"]   # these are refused before the model would load
    line = assert_one_line_error(run_main(SCRIPT, "eval", *faces.photos, "--output", tmp_path / "x.png", *absent), 2)
    assert "takes one image, not 2" in line
    both = run_main(SCRIPT, "eval", faces.photos[0], "--output", tmp_path / "x.png", "--output-dir", tmp_path, *absent)
    assert "not allowed with argument --output" in assert_one_line_error(both, 2)   # --output was left unwritten
    (tmp_path / "empty").mkdir()
    proc = run_main(SCRIPT, "eval", tmp_path / "empty", faces.photos[0], "--output", tmp_path / "one.png",
                    "--data-dir", faces.data)
    assert proc.returncode == 1 and "a folder with no images" in proc.stderr and (tmp_path / "one.png").is_file()
    first = (tmp_path / "one.png").read_bytes()
    proc = run_main(SCRIPT, "eval", faces.photos[1], "--output", tmp_path / "one.png", "--data-dir", faces.data)
    assert proc.returncode == 0 and (tmp_path / "one.png").read_bytes() != first   # eval's own image: replaced
    photos = tmp_path / "photos"   # --output-dir on (or above) the input folder: its photos are no annotated copies
    photos.mkdir()
    (photos / "a.jpg").symlink_to(faces.photos[0])
    for out in (photos, tmp_path):
        line = assert_one_line_error(run_main(SCRIPT, "eval", photos, "--output-dir", out, *absent), 2)
        assert f"holds the input folder {photos}" in line
    line = assert_one_line_error(run_main(SCRIPT, "eval", faces.photos[0], "--output", tmp_path / "none" / "x.png",
                                          *absent), 2)
    assert "none" in line and "existing folder" in line
    line = assert_one_line_error(run_main(SCRIPT, "eval", faces.photos[0], "--output", faces.data / "model.pt",
                                          *absent), 2)
    assert "name it NAME.png" in line   # never the model (nor any file but a PNG)
    (tmp_path / "notes.png").write_text("my notes")
    line = assert_one_line_error(run_main(SCRIPT, "eval", faces.photos[0], "--output", tmp_path / "notes.png",
                                          *absent), 2)
    assert "not an image eval wrote" in line and (tmp_path / "notes.png").read_text() == "my notes"
    Image.new("RGB", (8, 8)).save(tmp_path / "mine.png")   # the user's own picture: not eval's to replace either
    line = assert_one_line_error(run_main(SCRIPT, "eval", faces.photos[0], "--output", tmp_path / "mine.png",
                                          *absent), 2)
    assert "not an image eval wrote" in line
    line = assert_one_line_error(run_main(SCRIPT, "eval", faces.photos[0], "--output-dir", "/proc/1", *absent), 2)
    assert "--output-dir /proc/1: cannot write there" in line   # said before any photo is searched
    line = assert_one_line_error(run_main(SCRIPT, "eval", faces.photos[0], "--model", faces.data / "checkpoint.pt"), 1)
    assert "checkpoint" in line


def test_prepare_keeps_model_and_refuses_bad_csv(faces, tmp_path):
    """prepare replaces shards and meta.json only; a CSV that is not UTF-8 is one line and changes nothing."""
    data = tmp_path / "data"
    shutil.copytree(faces.data, data)
    kept = {k: v for k, v in tree_bytes(data).items() if not k.endswith(".pt.gz") and k != "meta.json"}
    small = tmp_path / "small.csv"
    faces.rows[faces.rows["Name"].isin(faces.names[:3])].to_csv(small, index=False)
    args = ["prepare", "--image-dir", faces.img_dir, "--data-dir", data, "--workers", 1]
    threads = torch.get_num_threads()
    assert run_main(SCRIPT, *args, "--csv", small).returncode == 0
    torch.set_num_threads(threads)   # the in-process worker set it to 1
    after = tree_bytes(data)
    assert all(after[k] == v for k, v in kept.items()) and json.loads(after["meta.json"])["photos"] == 3
    latin = tmp_path / "latin.csv"
    latin.write_bytes("Name,xmin,ymin,xmax,ymax\nphoto\xe9.jpg,1,2,30,40\n".encode("latin-1"))
    line = assert_one_line_error(run_main(SCRIPT, *args, "--csv", latin), 1)
    assert str(latin) in line and "UTF-8" in line
    assert tree_bytes(data) == after


# ---- ship and serve ----
def test_export_and_serve_onnx(faces, tmp_path):
    """export: eval of the .onnx finds the .pt's boxes (within a pixel) with its scores; serve of the .onnx
    answers a photo with the same boxes, by body and by multipart."""
    onnx, answers = check_onnx(SCRIPT, faces.data / "model.pt", faces.photos, tmp_path, "--threshold", 0.05)
    assert sum(len(a["boxes"]) for a in answers) > 0
    with serving(SCRIPT, "--model", onnx, "--data-dir", faces.data, "--threshold", 0.05) as (url, proc):
        body = faces.photos[0].read_bytes()
        status, got = http(url + "/predict", body, {"Content-Type": "image/jpeg"})
        assert status == 200 and got.keys() == {"image", "boxes"} and got["image"] is None   # a bare body: no name
        same_answers(got["boxes"], answers[0]["boxes"], 1e-4)
        assert http(url + "/predict", *multipart("file", "photo.jpg", body)) == (200, {**got, "image": "photo.jpg"})
        assert http(url + "/info")[1]["size"] == [384, 256]
    out, err = proc.communicate()
    assert proc.returncode == 0 and "Traceback" not in err, err
    # serve takes eval's options for predictions, and answers as eval does with them
    asked = ["--threshold", 0.05, "--no-flip", "--nms-iou", 0.6, "--search-side", 150]
    proc = run(SCRIPT, "eval", faces.photos[0], "--data-dir", faces.data, "--json", "--output-dir", tmp_path / "asked",
               "--device", "cpu", *asked)
    assert proc.returncode == 0, proc.stderr
    boxes = json.loads(proc.stdout)["boxes"]
    assert len(boxes) > len(answers[0]["boxes"])   # NMS at 0.6 keeps more of them
    with serving(SCRIPT, "--data-dir", faces.data, "--device", "cpu", *asked) as (url, proc):
        status, got = http(url + "/predict", body, {"Content-Type": "image/jpeg"})
        assert status == 200
        same_answers(got["boxes"], boxes, 1e-4)
        info = http(url + "/info")[1]   # the model's entries, and the options serve predicts with
        assert info["options"] == {"device": "cpu", "threshold": 0.05, "nms_iou": 0.6, "search_side": 150,
                                   "no_flip": True, "no_regress": False} and info["nms_iou"] == 0.4
    proc.communicate()


def test_selective_search_repeats(frc, shared_datasets):
    """A photo gets the same regions however many photos were searched before in the process (OpenCV ranks
    them with C's rand(), reseeded per search), so prepare, eval and serve agree."""
    photos = sorted((FACES_DIR / "image_data").iterdir())[:2]
    first = frc.selective_search(frc.load_image(photos[0]), (384, 256), 200, 300)
    frc.selective_search(frc.load_image(photos[1]), (384, 256), 200, 300)
    assert torch.equal(first, frc.selective_search(frc.load_image(photos[0]), (384, 256), 200, 300))
    rcnn = load_script("rcnn_faces.py")
    img = rcnn.image_to_tensor(rcnn.load_image(photos[0]))
    assert torch.equal(rcnn.selective_search(img, 200, 2000), rcnn.selective_search(img, 200, 2000))


def test_no_search_with_proposals_0(frc, shared_datasets, monkeypatch):
    """prepare --proposals 0: no selective search at all (not a search whose regions are dropped), so the
    proposals are the dense windows alone."""
    img = frc.load_image(sorted((FACES_DIR / "image_data").iterdir())[0])
    monkeypatch.setattr(frc.cv2.ximgproc.segmentation, "createSelectiveSearchSegmentation", None)
    none = frc.selective_search(img, (384, 256), 200, 0)
    assert none.shape == (0, 4)
    windows = frc.photo_proposals(none, img.width, img.height, (384, 256))
    assert torch.equal(windows, frc.dense_windows(*frc.letterbox_geometry(img.width, img.height, (384, 256))))
    with pytest.raises(TypeError):   # with a limit the search runs
        frc.selective_search(img, (384, 256), 200, 300)


def test_read_ahead_keeps_order_and_reads_no_further_than_asked(frc, shared_datasets, tmp_path, monkeypatch):
    """eval's look-ahead (the same text in both face scripts): answers come in input order, an unreadable photo
    is a reason and not an error, and with lookahead 0 (paths typed on stdin) nothing is read before it is asked."""
    photos = [str(p) for p in sorted((FACES_DIR / "image_data").iterdir())[:2]]
    paths = [photos[0], str(tmp_path / "missing.jpg"), photos[1], photos[0]]
    out = list(frc.read_ahead(paths, lambda img: img.size, 2))
    assert [o[0] for o in out] == paths
    assert out[1][1:3] == (None, None) and out[1][3].startswith("cannot read image")
    sizes = [frc.load_image(p).size for p in (photos[0], photos[1], photos[0])]
    assert [o[2] for o in out if o[3] is None] == sizes
    # in worker processes (rcnn_faces.py's searches): the same answers, worked out in other processes
    monkeypatch.setitem(sys.modules, frc.__name__, frc)   # as when run: read_photo is sent to them by name
    out = list(frc.read_ahead(paths, lambda img: (img.size, os.getpid()), 2, processes=2))
    assert [o[0] for o in out] == paths and out[1][3].startswith("cannot read image")
    assert [o[2][0] for o in out if o[3] is None] == sizes and os.getpid() not in {o[2][1] for o in out if o[2]}
    monkeypatch.setattr(frc.sys, "platform", "darwin")   # macOS: forking after torch and OpenCV is unsafe: a thread
    out = list(frc.read_ahead(paths, lambda img: (img.size, os.getpid()), 2, processes=2))
    assert [o[2][0] for o in out if o[3] is None] == sizes and {o[2][1] for o in out if o[2]} == {os.getpid()}
    monkeypatch.undo()
    pulled = []

    def typed():
        for p in photos:
            pulled.append(p)
            yield p

    answers = frc.read_ahead(typed(), lambda img: img.size, 0)
    assert next(answers)[0] == photos[0] and pulled == photos[:1]

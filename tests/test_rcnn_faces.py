"""rcnn_faces.py end to end on a few dozen real photos (copied into tmp dirs), plus unit checks."""
import csv
import json
import math
import re
import shutil

from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import (FACES_DIR, assert_one_line_error, check_calibration_before_the_shift, check_face_torchrun,
                      check_onnx, hostile_images, load_script, odd_images, png_declaring, run, run_main, tree_bytes)

SCRIPT = "rcnn_faces.py"
N_PHOTOS = 30
SEARCH_SIDE = 200  # small selective-search copy keeps the tests fast


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """Photo folder + CSV: N_PHOTOS good photos (few faces each, the last one in a subfolder), then bad rows of every
    kind, hostile names among them (outside the folder, empty, a decompression bomb). Photos are copies: a symlink
    out of the folder is refused."""
    if not (FACES_DIR / "bbox_train.csv").exists():
        pytest.skip(f"{FACES_DIR} not found")
    root = tmp_path_factory.mktemp("faces")
    img_dir = root / "images"
    img_dir.mkdir()
    with open(FACES_DIR / "bbox_train.csv") as f:
        rows = list(csv.DictReader(f))
    by_photo = {}
    for r in rows:
        by_photo.setdefault(r["Name"], []).append(r)
    names = [n for n in sorted(by_photo) if len(by_photo[n]) <= 4][:N_PHOTOS + 1]
    for n in names:
        shutil.copy(FACES_DIR / "image_data" / n, img_dir / n)
    good, all_bad = names[:N_PHOTOS], names[N_PHOTOS]
    (img_dir / "sub").mkdir()                                                 # a subfolder is fine
    (img_dir / good[-1]).rename(img_dir / "sub" / good[-1])
    for r in by_photo[good[-1]]:
        r["Name"] = f"sub/{good[-1]}"
    by_photo[f"sub/{good[-1]}"] = by_photo.pop(good[-1])
    good[-1] = f"sub/{good[-1]}"
    out = [r for n in good for r in by_photo[n]]
    first = dict(by_photo[good[0]][0])
    out.append({**first, "xmax": first["xmin"]})                               # zero-size box
    out.append({**first, "xmin": str(int(first["width"]) + 10), "xmax": str(int(first["width"]) + 40)})  # outside
    out.append({**first, "ymin": "abc"})                                      # non-numeric
    out.append({**first, "Name": "missing.jpg"})                              # photo not in the folder
    out.append({**first, "Name": "broken.jpg"})                               # unreadable photo
    out.append({**first, "Name": "folder.jpg"})                               # a folder, not a photo
    (img_dir / "folder.jpg").mkdir()
    (img_dir / "broken.jpg").write_bytes(b"this is not a jpeg")
    (img_dir / "escape.jpg").symlink_to(FACES_DIR / "image_data" / good[0])
    png_declaring(img_dir / "bomb.png", 15000, 15000)
    for name in [f"../{good[0]}", str(FACES_DIR / "image_data" / good[0]), "escape.jpg", "", "bomb.png"]:
        out.append({**first, "Name": name})                                   # 3 outside, empty, unreadable
    bad_only = dict(by_photo[all_bad][0])
    out.append({**bad_only, "ymax": bad_only["ymin"]})                        # its only row is bad
    csv_path = root / "boxes.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(out)
    n_boxes = {n: len(by_photo[n]) for n in good}
    return {"root": root, "img_dir": img_dir, "csv": csv_path, "good": good, "all_bad": all_bad, "n_boxes": n_boxes}


@pytest.fixture(scope="module")
def prepared(faces):
    data = faces["root"] / "data"
    proc = run(SCRIPT, "prepare", "--image-dir", faces["img_dir"], "--csv", faces["csv"], "--data-dir", data,
               "--workers", 2, "--search-side", SEARCH_SIDE, "--pos-iou", 0.7, "--backgrounds", 10)
    assert proc.returncode == 0, proc.stderr
    return data, proc


@pytest.fixture(scope="module")
def trained(prepared):
    data, _ = prepared
    proc = run(SCRIPT, "train", "--data-dir", data, "--epochs", 1, "--batch-size", 64, "--width", 8, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    return data, proc


def test_prepare_counts_skips_and_split_by_photo(faces, prepared):
    data, proc = prepared
    meta = json.loads((data / "meta.json").read_text())
    assert meta["kind"] == meta["script"] == "rcnn_faces"   # the stem, as the other scripts store it
    assert meta["skipped"] == {"non-numeric box": 1, "zero-size or inverted box": 2, "box outside photo": 1,
                               "missing photo": 1, "unreadable photo": 2, "Name outside --image-dir": 2,
                               "link out of --image-dir (pass the folder it leads to)": 1,
                               "empty Name": 1, "Name of no file (a folder, a pipe, a device)": 1}
    # the photo whose only row has a zero-size box is counted by that row (the CSV reader drops it)
    assert f"kept {N_PHOTOS} photos with " in proc.stdout
    assert "bomb.png (" in proc.stdout and "pixels" in proc.stdout
    assert "missing.jpg" in proc.stdout and "broken.jpg" in proc.stdout and faces["all_bad"] in proc.stdout
    splits = meta["splits"]
    assert [len(splits[s]) for s in ("training", "validating", "testing")] == [24, 3, 3]
    assert sorted(splits["training"] + splits["validating"] + splits["testing"]) == sorted(faces["good"])
    assert set(meta["boxes"]) == set(splits["validating"] + splits["testing"])
    mod = load_script(SCRIPT)
    for split in ("training", "validating", "testing"):
        crops, labels, ious, photo, targets = mod.read_split(data, f"{split}_set")
        assert crops.dtype == torch.uint8 and crops.shape[1:] == (3, 32, 32)
        assert len(crops) == len(labels) == len(ious) == len(photo) == len(targets) == meta["counts"][split]["crops"]
        assert (targets[labels == 0] == 0).all() and targets[ious == 1].abs().max() < 1e-4   # exact boxes: no move
        assert targets[labels == 1].abs().max() > 0   # regions with IoU 0.7-1 move onto their face
        assert sorted(set(photo.tolist())) == list(range(len(splits[split])))  # every photo has crops
        n_true = sum(faces["n_boxes"][n] for n in splits[split])
        assert int((ious == 1).sum()) >= n_true  # every valid true box is a face crop
        assert (ious[labels == 1] > 0.7).all() and (ious[labels == 0] < 0.3).all()
        assert int((labels == 0).sum()) <= 10 * len(splits[split])  # background quota per photo


def test_bad_csv_files(faces, tmp_path):
    common = ["--image-dir", faces["img_dir"], "--data-dir", tmp_path / "d"]
    line = assert_one_line_error(run_main(SCRIPT, "prepare", "--csv", tmp_path / "nope.csv", *common), 1)
    assert "nope.csv" in line
    bad = tmp_path / "cols.csv"
    bad.write_text("Name,x,y,xmax,ymax\na.jpg,1,2,3,4\n")
    line = assert_one_line_error(run_main(SCRIPT, "prepare", "--csv", bad, *common), 1)
    assert "xmin" in line and "ymin" in line and "xmax" not in line.split("expected")[0]
    line = assert_one_line_error(run_main(SCRIPT, "prepare", "--csv", faces["csv"], "--image-dir", tmp_path / "no_dir",
                                     "--data-dir", tmp_path / "d"), 1)
    assert "no_dir" in line


def test_train_one_epoch_and_resume(trained):
    data, proc = trained
    assert re.search(r"^epoch 1/1  train loss [\d.]+ bacc [\d.]+%  val loss [\d.]+ bacc [\d.]+%.* crops/s  \*$",
                     proc.stdout, re.M), proc.stdout
    m = re.search(r"^test photos: 3  AP@0.5 ([\d.]+)  recall ([\d.]+)  count RMSE ([\d.]+)", proc.stdout, re.M)
    assert m, proc.stdout
    row = list(csv.DictReader((data / "runs.csv").open()))[-1]   # the table holds the figure printed
    assert float(row["test"]) == pytest.approx(float(m.group(1)), abs=5e-4)
    for name in ("model.pt", "checkpoint.pt", "history.csv", "history.png"):
        assert (data / name).exists()
    model = torch.load(data / "model.pt", weights_only=True)
    assert model["script"] == "rcnn_faces" and model["search_side"] == SEARCH_SIDE and model["model_args"]["width"] == 8
    before = list(csv.DictReader((data / "history.csv").open()))
    proc = run(SCRIPT, "train", "--data-dir", data, "--epochs", 2, "--batch-size", 64, "--resume", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint.pt after epoch 1 (" in proc.stdout and re.search(r"^epoch 2/2 ", proc.stdout, re.M)
    after = list(csv.DictReader((data / "history.csv").open()))
    assert len(after) == 2 and after[0] == before[0]
    # the resumed epoch trains: the cosine over the new --epochs puts it at half the peak lr (not at the old end, 0)
    assert float(after[1]["lr"]) == pytest.approx(float(before[0]["lr"]) / 2)
    assert math.isfinite(float(after[1]["train_loss"])) and float(after[1]["train_loss"]) > 0


def test_eval_human_output_and_image(faces, trained, tmp_path):
    data, _ = trained
    photo = faces["img_dir"] / faces["good"][0]
    out = tmp_path / "annotated.png"
    proc = run(SCRIPT, "eval", photo, "--data-dir", data, "--output", out, "--threshold", 0, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == f"saved to {out}"
    assert lines[:-1] and all(re.fullmatch(r"\d+ \d+ \d+ \d+", line) for line in lines[:-1]), lines
    boxes = [tuple(map(int, line.split())) for line in lines[:-1]]
    with Image.open(out) as img, Image.open(photo) as src:
        assert img.format == "PNG" and img.size == src.size
        assert all(x + w <= src.width and y + h <= src.height for x, y, w, h in boxes)
        drawn = img.convert("RGB")
        assert all(drawn.getpixel((x, y)) == (255, 0, 0) for x, y, _, _ in boxes)   # each box drawn, in red


def test_eval_large_and_faceless_photos(faces, trained, tmp_path):
    """A photo much larger than the selective search copy is read through a copy reduced by an integer factor: a
    photo made of 3x3 blocks of one twice the search side gives that photo's boxes times 3, scored the same, and its
    annotated copy is the smaller photo's size. A photo of one flat colour gives a list like any other."""
    data, _ = trained
    side = 2 * torch.load(data / "model.pt", weights_only=True)["search_side"]
    small = Image.open(faces["img_dir"] / faces["good"][0]).convert("RGB").resize((side, side))
    small.save(tmp_path / "small.png")
    small.resize((3 * side, 3 * side), Image.NEAREST).save(tmp_path / "large.png", compress_level=1)
    Image.new("RGB", (640, 480), (120, 140, 160)).save(tmp_path / "flat.jpg")
    proc = run(SCRIPT, "eval", *(tmp_path / n for n in ("small.png", "large.png", "flat.jpg")), "--data-dir", data,
               "--json", "--threshold", 0, "--output-dir", tmp_path / "out", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    a, b, flat = (json.loads(line) for line in proc.stdout.splitlines())
    assert a["boxes"] and len(b["boxes"]) == len(a["boxes"])
    for p, q in zip(a["boxes"], b["boxes"]):
        assert q["score"] == p["score"] and all(abs(q[k] - 3 * p[k]) <= 3 for k in "xywh"), (p, q)
    assert Image.open(b["output"]).size == (side, side)
    assert isinstance(flat["boxes"], list) and Image.open(flat["output"]).size == (640, 480)


def test_eval_json_output_dir_and_bad_image(faces, trained, tmp_path):
    data, _ = trained
    photos = [faces["img_dir"] / n for n in faces["good"][:3]]
    broken = faces["img_dir"] / "broken.jpg"
    out_dir = tmp_path / "annotated"
    args = ["--data-dir", data, "--json", "--output-dir", out_dir, "--device", "cpu"]
    proc = run(SCRIPT, "eval", *photos, broken, *args, "--threshold", 0)
    assert proc.returncode == 1, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["image"] for r in results] == [str(p) for p in photos + [broken]]
    assert "cannot read image" in results[-1]["error"]
    for r, photo in zip(results, photos):
        assert r["output"] == str(out_dir / f"{photo.stem}.png") and (out_dir / f"{photo.stem}.png").exists()
        with Image.open(photo) as img:
            w, h = img.size
        scores = [b["score"] for b in r["boxes"]]
        assert r["boxes"] and scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
        assert all(b["x"] >= 0 and b["y"] >= 0 and b["x"] + b["w"] <= w and b["y"] + b["h"] <= h for b in r["boxes"])
    # NMS runs before the threshold: a higher threshold only drops boxes from the end of the list (one between two
    # scores of the middle of the list, so that it drops some and keeps some)
    scores = [b["score"] for b in results[0]["boxes"]]
    middle = scores[len(scores) // 2 - 1:]
    cut = next((a + b) / 2 for a, b in zip(middle, middle[1:]) if a - b >= 2e-4)
    proc = run(SCRIPT, "eval", photos[0], *args, "--threshold", cut)
    assert proc.returncode == 0, proc.stderr
    high = json.loads(proc.stdout)["boxes"]
    assert 0 < len(high) < len(scores) and high == [b for b in results[0]["boxes"] if b["score"] >= cut]
    proc = run(SCRIPT, "eval", "--data-dir", data, "--json", "--output", tmp_path / "x.png", "--device", "cpu",
               stdin=f"{photos[1]}\n\n")  # piped stdin: one path per line
    assert proc.returncode == 0 and json.loads(proc.stdout)["image"] == str(photos[1])
    proc = run_main(SCRIPT, "eval", "--data-dir", data, "--json", "--device", "cpu", stdin="\n")   # no path at all
    assert "no image path on stdin" in assert_one_line_error(proc, 1)


def test_eval_searches_and_suppresses_as_trained(faces, trained, tmp_path):
    """model.pt holds prepare's --proposals and train's --nms-iou, and eval uses them (as fast_rcnn_faces.py does:
    train calibrated the scores under that NMS) unless --nms-iou is given; a model of before, without them, reads
    the defaults."""
    state = torch.load(trained[0] / "model.pt", weights_only=True)
    assert state["proposals"] == json.loads((trained[0] / "meta.json").read_text())["options"]["proposals"] == 2000
    assert state["nms_iou"] == 0.3
    answers = {}
    for name, entries, given in [("default", {}, []), ("one", {"proposals": 1}, []), ("nms", {"nms_iou": 0.9}, []),
                                 ("given", {"nms_iou": 0.9}, ["--nms-iou", 0.3]), ("before", None, [])]:
        edited = {k: v for k, v in state.items() if entries is not None or k not in ("proposals", "nms_iou")}
        torch.save(edited | (entries or {}), tmp_path / f"{name}.pt")
        proc = run(SCRIPT, "eval", faces["img_dir"] / faces["good"][0], "--model", tmp_path / f"{name}.pt", "--json",
                   "--threshold", 0, "--output-dir", tmp_path / name, "--device", "cpu", *given)
        assert proc.returncode == 0, proc.stderr
        answers[name] = json.loads(proc.stdout)["boxes"]
    assert len(answers["one"]) == 1 < len(answers["default"]) < len(answers["nms"])
    assert answers["before"] == answers["given"] == answers["default"]


def test_model_calibrated_before_the_shift(faces, trained, tmp_path):   # with a box head: its default was 0.2
    check_calibration_before_the_shift(SCRIPT, trained[0] / "model.pt", faces["img_dir"] / faces["good"][0], tmp_path,
                                       math.log(4))


def test_eval_missing_and_foreign_model(faces, trained, tmp_path):
    photo = faces["img_dir"] / faces["good"][0]
    line = assert_one_line_error(run_main(SCRIPT, "eval", photo, "--model", tmp_path / "none.pt", "--device", "cpu"), 1)
    assert "none.pt" in line and "not found" in line
    foreign = tmp_path / "fast.pt"
    torch.save({"script": "fast_rcnn_faces", "model": {}}, foreign)
    line = assert_one_line_error(run_main(SCRIPT, "eval", photo, "--model", foreign, "--device", "cpu"), 1)
    assert "fast_rcnn_faces.py" in line
    other = tmp_path / "other"
    other.mkdir()
    (other / "meta.json").write_text(json.dumps({"kind": "fast_rcnn_faces", "script": "fast_rcnn_faces.py"}))
    line = assert_one_line_error(run_main(SCRIPT, "train", "--data-dir", other, "--device", "cpu"), 1)
    assert "fast_rcnn_faces.py" in line
    line = assert_one_line_error(run_main(SCRIPT, "train", "--data-dir", tmp_path / "nothing", "--device", "cpu"), 1)
    assert "prepare" in line
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    meta = json.loads((trained[0] / "meta.json").read_text())   # as a prepare before the stem wrote it: still read
    (fresh / "meta.json").write_text(json.dumps({**meta, "script": "rcnn_faces.py"}))
    line = assert_one_line_error(run_main(SCRIPT, "train", "--data-dir", fresh, "--resume", "--device", "cpu"), 1)
    assert "checkpoint.pt" in line
    line = assert_one_line_error(run_main(SCRIPT, "eval", photo, "--data-dir", trained[0], "--output",
                                     tmp_path / "no_dir" / "x.png", "--device", "cpu"), 2)
    assert "no_dir" in line


@pytest.mark.parametrize("script", ["rcnn_faces.py", "fast_rcnn_faces.py"])
def test_narrow_network_trains_on_an_odd_batch(script):
    """A ResNet shortcut of 8 channels, an odd batch, channels_last: torch's strided 1x1 convolution corrupted memory
    in backward on AVX512 CPUs (rcnn --width 8 crashed); Shortcut gives a strided convolution's numbers without it."""
    mod = load_script(script)
    conv = mod.Shortcut(8, 16, 1, 2, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(11, 8, 16, 16).contiguous(memory_format=torch.channels_last).requires_grad_()
    conv(x).sum().backward()
    assert torch.allclose(conv(x), torch.nn.functional.conv2d(x, conv.weight, stride=2), atol=1e-5)
    model = mod.build_model({"width": 8, "crop_size": 32, "regress": True}) if script == "rcnn_faces.py" else \
        mod.FastRCNN(width=8).to(memory_format=torch.channels_last)
    inputs = torch.randn(3, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    (model(inputs) if script == "rcnn_faces.py" else model.features(inputs)).float().sum().backward()


def test_detection_scores_hand_computed():
    mod = load_script(SCRIPT)
    truths = [torch.tensor([[0., 0, 10, 10], [20, 20, 30, 30]]), torch.tensor([[0., 0, 10, 10]])]
    detections = [(torch.tensor([[0., 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60]]), torch.tensor([0.9, 0.8, 0.7])),
                  (torch.tensor([[0., 0, 10, 10]]), torch.tensor([0.6]))]
    # ranked: TP, FP (duplicate), FP, TP; recall 1/3 at precision 1, then 2/3 at precision 0.5
    s = mod.detection_scores(detections, truths, 0.0)
    assert s["ap50"] == pytest.approx(1 / 3 * 1 + 1 / 3 * 0.5) and s["recall"] == pytest.approx(2 / 3)
    assert s["count_rmse"] == pytest.approx((((3 - 2) ** 2 + 0) / 2) ** 0.5)
    assert mod.detection_scores(detections, truths, 0.85)["recall"] == pytest.approx(1 / 3)
    assert mod.detection_scores(detections, truths, 0.0, iou=0.9)["ap50"] == pytest.approx(0.5)
    perfect = [(t, torch.linspace(1, 0.5, len(t))) for t in truths]
    s = mod.detection_scores(perfect, truths, 0.5)
    assert (s["ap50"], s["recall"], s["count_rmse"]) == (pytest.approx(1.0), pytest.approx(1.0), 0.0)
    assert mod.detection_scores([(torch.zeros(0, 4), torch.zeros(0))] * 2, truths, 0.5)["ap50"] == 0.0


def test_score_calibration_matches_hit_rate():
    """Platt scaling maps over-confident softmax scores to the observed rate of correct detections."""
    mod = load_script(SCRIPT)
    gen = torch.Generator().manual_seed(0)
    truths, detections = [], []
    for _ in range(40):  # per photo: 2 faces found (score ~0.999) and 8 false boxes (score ~0.99)
        faces = torch.tensor([[0., 0, 10, 10], [20, 0, 30, 10]])
        false = torch.rand(8, 1, generator=gen) * 100 + torch.tensor([[100., 100, 110, 110]])
        scores = torch.cat([0.999 + 0.0005 * torch.rand(2, generator=gen), 0.99 + 0.005 * torch.rand(8, generator=gen)])
        truths.append(faces)
        detections.append((torch.cat([faces, false]), scores))
    a, b, c = mod.fit_calibration(detections, truths)
    calibrated = [(boxes, torch.sigmoid(a * torch.logit(s.double()) + b + c).float()) for boxes, s in detections]
    everything = torch.cat([s for _, s in calibrated])
    assert everything[:2].min() > 0.5 > everything[2:10].max()  # at 0.5: the 2 faces counted, not the 8
    assert mod.detection_scores(calibrated, truths, 0.5)["ap50"] == pytest.approx(mod.detection_scores(detections, truths, 0.5)["ap50"])
    assert mod.fit_calibration(detections[:2], truths[:2]) is None  # too few detections to fit


def test_resumed_run_calibrates_on_softmax_scores(trained, tmp_path, monkeypatch):
    """A resumed run whose model.pt holds a calibration fits the new one on the softmax scores, which eval maps:
    fitted on the scores the old calibration had mapped, it scored the same model again with other figures."""
    data = tmp_path / "data"
    shutil.copytree(trained[0], data)
    model = torch.load(data / "model.pt", weights_only=True)
    torch.save({**model, "calibration": [2.0, -1.0, 0.5]}, data / "model.pt")
    done = torch.load(data / "checkpoint.pt", weights_only=True)["epoch"]
    mod, seen = load_script(SCRIPT), []
    monkeypatch.setattr(mod, "SEARCH_PROCESSES", 0)   # in this process: a forked pool cannot pickle its functions
    monkeypatch.setattr(mod, "fit_calibration", lambda dets, gts, minimum=20: seen.append(dets))
    proc = run_main(SCRIPT, "train", "--data-dir", data, "--resume", "--epochs", done, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    net = mod.build_model(model["model_args"])
    net.load_state_dict(model["model"])
    meta = json.loads((data / "meta.json").read_text())
    photos = [str(Path(meta["image_dir"]) / n) for n in meta["splits"]["validating"]]
    truths = [torch.tensor(meta["boxes"][n]).reshape(-1, 4) for n in meta["splits"]["validating"]]
    softmax = mod.run_detector(net, {k: v for k, v in model.items() if k != "calibration"}, photos, truths,
                               torch.device("cpu"), mod.NMS_IOU)[0]
    assert len(seen) == 1 and len(seen[0]) == len(softmax) == len(photos)
    for (_, got), (_, want) in zip(seen[0], softmax):
        assert torch.allclose(got, want, atol=1e-4)


def test_iou_labeller_and_crops():
    mod = load_script(SCRIPT)
    truth = torch.tensor([[0., 0, 10, 10]])
    proposals = torch.tensor([[0., 0, 10, 10], [0, 0, 10, 8], [0, 0, 10, 5], [50, 50, 60, 60], [0, 0, 10, 2]])
    boxes, labels, ious, targets = mod.label_regions(proposals, truth, 0.7, 0.3, 1, torch.Generator().manual_seed(0))
    assert labels.tolist() == [1, 1, 1, 0]  # true box, IoU 1.0, IoU 0.8; IoU 0.5 unused; 1 of 2 backgrounds
    assert torch.equal(boxes[:3], torch.cat([truth, proposals[:2]]))
    assert ious[:3].tolist() == pytest.approx([1.0, 1.0, 0.8]) and ious[3] < 0.3
    # box targets: none for the true box, the exact one, and background; the 10x8 face region moves onto its box
    assert targets[[0, 1, 3]].abs().max() == 0 and targets[2, 0] == 0 and targets[2, 1] > 0 and targets[2, 3] > 0
    assert torch.allclose(mod.decode_offsets(targets[2:3], boxes[2:3]), truth, atol=1e-5)
    img = torch.zeros(3, 40, 60, dtype=torch.uint8)
    img[:, 10:20, 30:40] = 200
    crops = mod.crop_regions(img, torch.tensor([[30., 10, 40, 20], [0, 0, 10, 10]]), 16)
    assert crops.shape == (2, 3, 16, 16) and crops.dtype == torch.uint8
    assert crops[0, :, 2:-2, 2:-2].min() == 200 and crops[1].max() == 0


def test_torchrun_two_processes(trained, tmp_path):
    """DDP on the CPU (gloo): the same steps per epoch as one process, one model that plain eval loads."""
    check_face_torchrun(SCRIPT, trained[0], tmp_path, "--batch-size", 64, "--width", 8)


def test_run_epoch_balanced_accuracy_by_hand():
    """A classifier that always answers "face": every face right, every background wrong -> balanced accuracy 1/2,
    whatever the class sizes (plain accuracy would be 1/4 here)."""
    mod = load_script(SCRIPT)

    class AlwaysFace(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[0.0, 5.0]]).expand(len(x), 2)

    crops, labels = torch.zeros(8, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 0, 0, 1, 0, 0, 0, 1])
    batches = list(torch.arange(8).split(3))
    score = mod.run_epoch(AlwaysFace(), (crops, labels, torch.zeros(8, 4)), batches, torch.device("cpu"), None)
    assert score["bacc"] == pytest.approx(0.5)
    assert score["loss"] == pytest.approx((6 * 5.0067 + 2 * 0.0067) / 8, abs=1e-3)   # -log softmax: 5.0067, 0.0067
    assert score["crops_per_s"] > 0


# ---- hostile input ----
def test_eval_hostile_images_and_same_names(faces, trained, tmp_path):
    """Unreadable images are error objects and the run goes on; two photos of one name from two folders (and an
    image of another format with that name) get three files in --output-dir."""
    photo = faces["img_dir"] / faces["good"][0]
    same = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        same.append(Path(shutil.copy(photo, tmp_path / folder / "photo.jpg")))
    Image.open(photo).save(tmp_path / "photo.png")
    same.append(tmp_path / "photo.png")
    bad = hostile_images(tmp_path / "bad")
    odd = odd_images(tmp_path / "odd")
    out_dir = tmp_path / "annotated"
    proc = run(SCRIPT, "eval", *same, *odd, *[p for p, _ in bad], "--data-dir", trained[0], "--json",
               "--output-dir", out_dir, "--threshold", 0.5, "--device", "cpu")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [obj["image"] for obj in lines] == [str(p) for p in [*same, *odd, *[p for p, _ in bad]]]
    assert [obj["output"] for obj in lines[:3]] == [str(out_dir / f"photo{n}.png") for n in ("", "-2", "-3")]
    assert all("boxes" in obj and Path(obj["output"]).exists() for obj in lines[:3 + len(odd)])
    for obj, (_, words) in zip(lines[3 + len(odd):], bad):
        assert obj["error"].startswith("cannot read image: ") and words in obj["error"], obj


def test_eval_output_refusals(faces, trained, tmp_path):
    """--output takes one image (a second one from stdin is an error object, the first result stays); a missing
    folder, a folder as --output or a file as --output-dir: one line, status 2, before the model loads."""
    photos = [faces["img_dir"] / n for n in faces["good"][:2]]
    out = tmp_path / "out.png"
    line = assert_one_line_error(run_main(SCRIPT, "eval", *photos, "--output", out, "--data-dir", trained[0]), 2)
    assert "takes one image, not 2" in line and "--output-dir" in line
    for option, value in [("--output", tmp_path / "none" / "x.png"), ("--output", tmp_path),
                          ("--output-dir", faces["csv"])]:
        line = assert_one_line_error(run_main(SCRIPT, "eval", photos[0], option, value, "--model", tmp_path), 2)
        assert str(value) in line
    both = run_main(SCRIPT, "eval", photos[0], "--output", out, "--output-dir", tmp_path / "od", "--model", tmp_path)
    assert "not allowed with argument --output" in assert_one_line_error(both, 2)   # --output was left unwritten
    line = assert_one_line_error(run_main(SCRIPT, "eval", tmp_path, "--data-dir", trained[0]), 1)
    assert "no images" in line
    line = assert_one_line_error(run_main(SCRIPT, "eval", photos[0], "--model", trained[0] / "checkpoint.pt",
                                          "--output-dir", tmp_path / "new" / "deep"), 1)
    assert "checkpoint" in line and not (tmp_path / "new").exists()   # the folders it made for nothing: removed
    proc = run_main(SCRIPT, "eval", "--output", out, "--json", "--data-dir", trained[0], "--device", "cpu",
                    stdin=f"{photos[0]}\n{photos[1]}\n")
    line = assert_one_line_error(proc, 2)   # the second photo stops the run: the options' mistake, said once
    assert "second one came on stdin" in line and "--output-dir" in line
    first, = [json.loads(line) for line in proc.stdout.splitlines()]
    assert first["output"] == str(out)
    with Image.open(out) as img, Image.open(photos[0]) as src:   # the first result stays
        assert img.size == src.size


def test_prepare_keeps_model_and_refuses_bad_csv(faces, trained, tmp_path):
    """prepare replaces shards and meta.json only; a CSV that is not UTF-8 or crossed IoU options are one line."""
    data = tmp_path / "data"
    shutil.copytree(trained[0], data)
    kept = {k: v for k, v in tree_bytes(data).items() if not k.endswith(".pt.gz") and k != "meta.json"}
    small = tmp_path / "small.csv"
    rows = (faces["csv"].read_text().splitlines())
    small.write_text("\n".join(rows[:1] + [r for r in rows if r.split(",")[0] in faces["good"][:3]]) + "\n")
    args = ["prepare", "--image-dir", faces["img_dir"], "--data-dir", data, "--workers", 1, "--search-side", 100]
    assert run_main(SCRIPT, *args, "--csv", small).returncode == 0
    after = tree_bytes(data)
    assert all(after[k] == v for k, v in kept.items())
    counts = json.loads(after["meta.json"])["counts"]
    assert sum(counts[split]["photos"] for split in ("training", "validating", "testing")) == 3
    latin = tmp_path / "latin.csv"
    latin.write_bytes("Name,xmin,ymin,xmax,ymax\nphoto\xe9.jpg,1,2,30,40\n".encode("latin-1"))
    line = assert_one_line_error(run_main(SCRIPT, *args, "--csv", latin), 1)
    assert str(latin) in line and "UTF-8" in line
    line = assert_one_line_error(run_main(SCRIPT, *args, "--csv", small, "--pos-iou", 0.3, "--neg-iou", 0.6), 2)
    assert "--neg-iou" in line
    assert tree_bytes(data) == after


# ---- ship and serve ----
def test_export_onnx(faces, trained, tmp_path):
    """export: eval of the .onnx finds the .pt's boxes (within a pixel) with its scores; selective search and NMS
    stay in the script."""
    data, _ = trained
    photos = [faces["img_dir"] / n for n in faces["good"][:2]]
    _, answers = check_onnx(SCRIPT, data / "model.pt", photos, tmp_path, "--threshold", 0.05,
                            "--search-side", SEARCH_SIDE)
    assert sum(len(a["boxes"]) for a in answers) > 0

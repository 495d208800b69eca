"""Benchmark the two face detectors side by side through their real commands.

For each script (rcnn_faces.py, fast_rcnn_faces.py): `prepare` on the same photos (photos/s), `train`
(seconds per epoch, photos/s), then `eval --json --threshold 0.05 --output-dir` on the validation photos
of its split (s/photo without process start-up, which is measured separately), scored here from the JSON
lines against the CSV boxes: AP@0.5 and AP@0.3 (VOC, all-point), recall and face-count RMSE at --count-threshold,
recall at IoU 0.5 by face width (every returned box).
Both scripts split sorted photo names with the same seed, so they see the same validation photos.

    python benchmarks/faces_bench.py --photos 300 --epochs 2            # small run: prepare + train + eval
    python benchmarks/faces_bench.py --fast-data-dir data/fast_rcnn_faces --rcnn-data-dir data/rcnn_faces
                                     # no training: eval the models already trained in those folders
"""
import argparse
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from torchvision.ops import box_iou

ROOT = Path(__file__).resolve().parents[1]
FACES = ROOT.parent / "shared" / "datasets" / "faces"
SCRIPTS = {"rcnn": "rcnn_faces.py", "fast": "fast_rcnn_faces.py"}


def run(script, *args, stdin=None, expect=0):
    """`python script args`, its output said if it ends otherwise than `expect`; (the process, seconds)."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          input=stdin if stdin is not None else "")
    if proc.returncode != expect:
        print(proc.stdout[-2000:], proc.stderr[-2000:], sep="\n", file=sys.stderr)
    return proc, time.time() - t0


WIDTHS = ((0, 20), (20, 40), (40, 80), (80, math.inf))   # face width bins (photo pixels) of the recall table


def average_precision(ranked, n_true):
    """VOC all-point AP from (score, hit) pairs over all photos."""
    ranked = sorted(ranked, key=lambda r: -r[0])
    tp = fp = 0
    recall, precision = [0.0], [0.0]
    for _, hit in ranked:
        tp, fp = tp + hit, fp + (not hit)
        recall.append(tp / max(n_true, 1))
        precision.append(tp / (tp + fp))
    recall.append(1.0)
    precision.append(0.0)
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    return sum((recall[i + 1] - recall[i]) * precision[i + 1] for i in range(len(recall) - 1))


def scores(lines, truth, count_threshold):
    """From eval --json lines: VOC AP at IoU 0.5 and 0.3 (all-point), recall and face-count RMSE at count_threshold,
    and the recall at IoU 0.5 of every returned box by true face width (WIDTHS)."""
    ranked, n_true, sq = {0.5: [], 0.3: []}, 0, 0.0
    widths, found = [], []
    for line in lines:
        gt = truth[Path(line["image"]).name]
        n_true += len(gt)
        boxes = torch.tensor([[b["x"], b["y"], b["x"] + b["w"], b["y"] + b["h"]] for b in line["boxes"]],
                             dtype=torch.float32).reshape(-1, 4)
        conf = torch.tensor([b["score"] for b in line["boxes"]], dtype=torch.float32)
        sq += (int((conf >= count_threshold).sum()) - len(gt)) ** 2
        iou = box_iou(boxes, gt) if len(boxes) and len(gt) else torch.zeros(len(boxes), len(gt))
        for level in ranked:
            taken = torch.zeros(len(gt), dtype=torch.bool)
            for k in conf.argsort(descending=True).tolist():
                j = int(iou[k].argmax()) if len(gt) else -1
                hit = bool(j >= 0 and iou[k, j] >= level and not taken[j])
                if hit:
                    taken[j] = True
                ranked[level].append((float(conf[k]), hit))
        widths += (gt[:, 2] - gt[:, 0]).tolist()
        found += (iou.max(0).values >= 0.5).tolist() if len(boxes) else [False] * len(gt)
    hits_above = sum(hit and s >= count_threshold for s, hit in ranked[0.5])
    row = {"ap50": average_precision(ranked[0.5], n_true), "ap30": average_precision(ranked[0.3], n_true),
           "recall": hits_above / max(n_true, 1), "count_rmse": math.sqrt(sq / max(len(lines), 1))}
    for lo, hi in WIDTHS:
        inside = [f for w, f in zip(widths, found) if lo <= w < hi]
        row[f"recall@0.5 width {lo}-{hi:g} px ({len(inside)} faces)"] = sum(inside) / max(len(inside), 1)
    return row


def subset(args, work):
    """The photo folder as it is and a CSV of the first --photos photos (sorted names): the scripts read only the
    photos a CSV lists, and refuse links out of --image-dir, so nothing is copied or linked."""
    df = pd.read_csv(args.csv)
    names = sorted(df["Name"].unique())[:args.photos]
    work.mkdir(parents=True, exist_ok=True)
    df[df["Name"].isin(names)].to_csv(work / "faces.csv", index=False)
    return Path(args.image_dir), work / "faces.csv"


def bench(key, args, photos, csv_path, truth):
    script = SCRIPTS[key]
    if not (ROOT / script).exists():
        print(f"{script}: not in the repository yet; skipped")
        return None
    data = getattr(args, f"{key}_data_dir")
    row = {"script": script}
    if data is None:
        data = Path(args.work) / key
        proc, sec = run(script, "prepare", "--image-dir", photos, "--csv", csv_path, "--data-dir", data,
                        "--workers", args.workers)
        if proc.returncode:
            print(f"{script} prepare failed; skipped")
            return None
        row["prepare photos/s"] = args.photos / sec
        proc, sec = run(script, "train", "--data-dir", data, "--epochs", args.epochs, "--device", "cpu")
        if proc.returncode:
            print(f"{script} train failed; skipped")
            return None
        history = pd.read_csv(Path(data) / "history.csv")
        n_train = len(json.loads((Path(data) / "meta.json").read_text())["splits"]["training"])
        row["train s/epoch (incl. validation)"] = history["seconds"].mean()
        row["train minutes"] = history["seconds"].sum() / 60
        row["train photos/s (incl. validation)"] = n_train / history["seconds"].mean()
        speeds = re.findall(r"([\d.]+ (?:photo|crops)/s)", proc.stdout)
        row["training pass speed (last epoch)"] = speeds[-1] if speeds else "?"
        print(f"{script}: {proc.stdout.strip().splitlines()[-1]}")
    meta = json.loads((Path(data) / "meta.json").read_text())
    names = meta["splits"]["validating"][:args.eval_photos]
    images = [Path(meta["image_dir"]) / n for n in names]
    # start-up: the model loaded, then no path on stdin (status 1, said in one line)
    _, startup = run(script, "eval", "--data-dir", data, "--device", "cpu", "--json", stdin="", expect=1)
    proc, sec = run(script, "eval", "--data-dir", data, "--device", "cpu", "--json", "--threshold", "0.05",
                    "--output-dir", Path(args.work) / f"{key}_annotated", *images)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    row["eval s/photo"] = (sec - startup) / max(len(images), 1)
    row["val photos"] = len(lines)
    row.update(scores(lines, truth, args.count_threshold))
    proc, _ = run(script, "eval", "--data-dir", data, "--device", "cpu", "--json", "--output-dir",
                  Path(args.work) / f"{key}_annotated", *faceless(Path(args.work) / "faceless"))
    row["boxes on 3 faceless photos (default threshold)"] = sum(len(json.loads(line).get("boxes", [1]))
                                                                for line in proc.stdout.splitlines())
    return row


def faceless(folder):
    """Three 612x408 photos without a face: one flat colour, a smooth gradient, a blurred random texture."""
    folder.mkdir(parents=True, exist_ok=True)
    gradient = torch.linspace(0, 255, 612).repeat(408, 1)
    texture = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 408, 612, generator=torch.Generator().manual_seed(0)) * 255,
                                             9, 1, 4)[0].permute(1, 2, 0)
    images = {"flat.png": torch.full((408, 612, 3), 128.0), "gradient.png": torch.stack([gradient] * 3, -1),
              "texture.png": texture}
    for name, pixels in images.items():
        Image.fromarray(pixels.clamp(0, 255).byte().numpy()).save(folder / name)
    return [folder / name for name in images]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image-dir", default=FACES / "image_data")
    p.add_argument("--csv", default=FACES / "bbox_train.csv")
    p.add_argument("--photos", type=int, default=300, help="photos prepared and trained on (first N, sorted)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--eval-photos", type=int, default=50, help="validation photos evaluated per detector")
    p.add_argument("--count-threshold", type=float, default=0.5, help="score threshold of recall and count RMSE")
    p.add_argument("--work", default="/tmp/faces_bench", help="scratch folder (prepared data, annotated photos)")
    p.add_argument("--rcnn-data-dir", default=None, help="use this trained rcnn_faces data dir (no prepare/train)")
    p.add_argument("--fast-data-dir", default=None, help="use this trained fast_rcnn_faces data dir (no prepare/train)")
    args = p.parse_args()
    df = pd.read_csv(args.csv)
    truth = {n: torch.tensor(g[["xmin", "ymin", "xmax", "ymax"]].values, dtype=torch.float32)
             for n, g in df.groupby("Name")}
    photos, csv_path = subset(args, Path(args.work))
    rows = [r for r in (bench(k, args, photos, csv_path, truth) for k in SCRIPTS) if r]
    if not rows:
        return 1
    table = pd.DataFrame(rows).set_index("script").T
    trained = "models reused" if args.rcnn_data_dir and args.fast_data_dir else f"{args.photos} photos, {args.epochs} epochs"
    print(f"\nmachine: {torch.get_num_threads()} torch threads, CPU; {trained}; {args.eval_photos} validation photos")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    print("(eval s/photo: eval wall time minus the start-up of an eval with no image, / photos)")
    if len(rows) == 2 and "eval s/photo" in rows[0] and rows[1]["eval s/photo"] > 0:
        print(f"fast_rcnn eval speed-up over rcnn: {rows[0]['eval s/photo'] / rows[1]['eval s/photo']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

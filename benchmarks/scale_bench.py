"""Training speed with 1 and N processes (torchrun), and with and without --amp, for one suite script.

Prepares a CIFAR-10 subset from ../shared/datasets/cifar10 once (reused from WORKDIR/prepared on a rerun), then runs the script's real
`train` command for each setting, each on its own copy of the prepared data:

  processes   1 process (plain `python SCRIPT train`) and `torchrun --standalone --nproc_per_node=N`
  amp         --amp and --no-amp (on the CPU both mean fp32 unless the script measured bf16 faster)

and prints, per setting, the optimisation steps per epoch (the same for every process count at the same global
batch) and the training images/s of the last epoch (the first one includes warm-up). Compare ratios from one run.

    python benchmarks/scale_bench.py                                   # cifar_resnet.py, CPU, 1 and 2 processes
    python benchmarks/scale_bench.py --device cuda --nproc 1,2,4 --amp on,off
"""
import argparse
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10"


def prepare(args, work):
    """A CIFAR subset prepared once by the script itself; returns the prepared folder."""
    data = work / "prepared"
    if (data / "meta.json").exists():
        return data
    src = work / "images"
    shutil.rmtree(src, ignore_errors=True)
    (src / "train").mkdir(parents=True)
    shutil.copy(CIFAR / "labels.txt", src / "labels.txt")
    for path in sorted((CIFAR / "train").iterdir())[:args.images]:
        (src / "train" / path.name).symlink_to(path)
    subprocess.run([sys.executable, str(ROOT / args.script), "prepare", "--image-dir", str(src), "--data-dir",
                    str(data)], check=True, cwd=ROOT)
    return data


def train(args, prepared, work, nproc, amp):
    """Run `train` on a fresh copy of the prepared data; returns the rows of its history.csv."""
    data = work / f"run-{nproc}-{amp}"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir()
    for path in prepared.iterdir():
        if path.name == "meta.json" or path.name.endswith(".pt.gz"):
            shutil.copy(path, data / path.name)
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    cmd = [*launcher, str(ROOT / args.script), "train", "--data-dir", str(data), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--device", args.device, "--patience", str(args.epochs),
           "--amp" if amp == "on" else "--no-amp"]
    lr = args.lr if args.lr is not None else 0.02 if args.script == "cifar_resnet.py" else None
    cmd += ["--lr", str(lr)] if lr else []
    shown = ["python", *cmd[1:]] if nproc == 1 else ["torchrun", *cmd[3:]]
    print("$", " ".join(shown).replace(f"{ROOT}/", ""), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode:   # the script's error line again at the end: torchrun's report buries it
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        sys.exit(f"failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}\n{chr(10).join(errors[:1])}")
    return list(csv.DictReader((data / "history.csv").open()))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--script", default="cifar_resnet.py", choices=["cifar_resnet.py", "cifar_lenet.py"])
    p.add_argument("--images", type=int, default=2000, help="CIFAR-10 training images to prepare")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run; the last one is timed")
    p.add_argument("--batch-size", type=int, default=128, help="global batch (split over the processes)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--nproc", default="1,2", help="process counts (torchrun for more than 1)")
    p.add_argument("--amp", default="on", help="comma-separated: on, off")
    p.add_argument("--lr", type=float, default=None, help="train --lr (default: 0.02 for cifar_resnet.py, whose 0.2 "
                   "diverges on a 2-epoch schedule of 2,000 images; the script's own otherwise): speed does not "
                   "depend on it")
    p.add_argument("--workdir", default=str(ROOT / "benchmarks" / "out" / "scale"))
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    prepared = prepare(args, work)
    import torch
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, "
          f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU only'}", flush=True)
    results = []
    for amp in args.amp.split(","):
        for nproc in map(int, args.nproc.split(",")):
            rows = train(args, prepared, work, nproc, amp)
            results.append((nproc, amp, int(rows[-1]["steps"]), float(rows[-1]["img_per_s"])))
            print(f"  {nproc} process(es), amp {amp}: {results[-1][2]} steps/epoch, {results[-1][3]:.0f} img/s "
                  f"(last epoch)", flush=True)
    print(f"\n{args.script} on {args.device}, {args.images} images, global batch {args.batch_size}")
    print(f"{'processes':>9}  {'amp':>3}  {'steps/epoch':>11}  {'img/s':>8}  {'vs 1 process':>12}")
    for nproc, amp, steps, speed in results:
        base = next(r[3] for r in results if r[0] == 1 and r[1] == amp) if any(r[0] == 1 for r in results) else speed
        print(f"{nproc:>9}  {amp:>3}  {steps:>11}  {speed:>8.0f}  {speed / base:>11.2f}x")
    same = len({r[2] for r in results}) == 1
    print(f"same number of optimisation steps per epoch for every setting: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

"""Sample quality of a trained EDM run per solver and NFE: Fréchet distance and KID on the features of
a classifier trained on the same data (``FD-FMNIST`` / ``FD-digits``; not FID, whose Inception weights
cannot be downloaded here), against the real test images.

The first row is the floor: real training images against the test images, same count. Every solver
starts from the same noise (seeded), so rows differ by the solver alone.

    python benchmarks/diffusion_fd.py --run runs/diffusion/fmnist_edm --classifier runs/demo/teacher \
        --n 5000 --solvers euler:10 heun:9 ipndm:5 ipndm:10 dpm_solver_pp:10 --out fd.md
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time

import torch

from mentor.diffusion import ClassifierFeatures, fd_score, load_edm, sample_images
from mentor.engine.trainer import hardware_name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="an edm run directory (best.pt) or checkpoint")
    p.add_argument("--classifier", required=True, help="a `mentor train` classifier run on the same data")
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--solvers", nargs="+", default=["euler:10", "heun:9", "ipndm:5", "ipndm:10",
                                                   "dpm_solver_pp:10", "unipc:10"],
                   help="SOLVER:NFE pairs")
    p.add_argument("--schedule", default="polynomial")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    denoiser, info = load_edm(args.run, device=device)
    feats = ClassifierFeatures(args.classifier, device=device)
    test = feats.images("test")
    g = torch.Generator().manual_seed(args.seed)
    train = feats.images("train")
    floor = fd_score(train[torch.randperm(len(train), generator=g)[:args.n]], test, feats)
    tag = feats.tag
    rows = [f"| real training images (floor) | – | {floor[f'FD-{tag}']:.3f} | {1000 * floor[f'KID-{tag}']:.3f} | – |"]
    for item in args.solvers:
        solver, nfe = item.split(":")
        t0 = time.perf_counter()
        x = sample_images(denoiser, info, solver=solver, nfe=int(nfe), schedule=args.schedule, n=args.n,
                          seed=args.seed, batch_size=1000)
        seconds = time.perf_counter() - t0
        score = fd_score(x, test, feats)
        fd, kid_ = score[f"FD-{tag}"], score[f"KID-{tag}"]
        rows.append(f"| {solver} | {nfe} | {fd:.3f} | {1000 * kid_:.3f} | {seconds:.1f} |")
        print(rows[-1], file=sys.stderr, flush=True)
    head = [f"Command: `python benchmarks/diffusion_fd.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
            f"Run {info['checkpoint']} (step {info['step']}, EMA {info['ema']}), {args.n} samples, schedule "
            f"{args.schedule}, seed {args.seed}; reference: the {len(test):,} test images; "
            f"{hardware_name(torch.device(device))}, "
            f"torch {torch.__version__}, {datetime.date.today().isoformat()}.", "",
            f"| solver | NFE | FD-{tag} | KID-{tag} ×1000 | sampling s |", "|---|---|---|---|---|"]
    text = "\n".join(head + rows) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

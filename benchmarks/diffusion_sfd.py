"""SFD on a trained EDM run: a copy of the denoiser is fine-tuned so that a few Euler steps follow its
teacher solver's trajectory; the table gives the error against a many-step reference from the same
noise before and after, beside the teacher solver itself.

    python benchmarks/diffusion_sfd.py --run runs/diffusion/digits_edm --iterations 400
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
import time

import torch

from mentor.diffusion import get_schedule, heun, load_edm, rmse, sfd_distill, sfd_sample
from mentor.diffusion.samplers import SAMPLERS, nfe
from mentor.engine.trainer import hardware_name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--num-steps", type=int, default=4, help="student timestamps (NFE = N - 1 with AFS)")
    p.add_argument("--M", type=int, default=3, help="teacher refinement: (M+1)(N-1)+1 teacher timestamps")
    p.add_argument("--iterations", type=int, default=400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--n", type=int, default=256, help="evaluation samples")
    p.add_argument("--ref-steps", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    den, info = load_edm(args.run, device=args.device)
    shape = tuple(info["image_shape"])
    kw = {"sigma_min": info["sigma_min"], "sigma_max": info["sigma_max"]}
    noise = torch.randn((args.n, *shape), generator=torch.Generator().manual_seed(10_000 + args.seed)).to(args.device)
    with torch.no_grad():
        ref_s = get_schedule("polynomial", args.ref_steps, **kw)
        ref = heun(den, noise * ref_s[0], ref_s)
        s = get_schedule("polynomial", args.num_steps, **kw)
        euler_before = SAMPLERS["euler"](den, noise * s[0], s, afs=True)
        t_steps = (args.M + 1) * (args.num_steps - 1) + 1
        ts = get_schedule("polynomial", t_steps, **kw)
        teacher = SAMPLERS["dpm_solver_pp"](den, noise * ts[0], ts, max_order=3)
    student = copy.deepcopy(den).requires_grad_(True)
    t0 = time.perf_counter()
    res = sfd_distill(student, den, shape, num_steps=args.num_steps, M=args.M, iterations=args.iterations,
                      batch=args.batch, lr=args.lr, schedule_kw=kw, device=args.device,
                      generator=torch.Generator(device=args.device).manual_seed(args.seed))
    seconds = time.perf_counter() - t0
    student.eval()
    after = sfd_sample(student, noise, res.config)
    rows = [
        ("Euler, the trained model", nfe("euler", args.num_steps, afs=True), rmse(euler_before, ref)),
        ("Euler, SFD student", nfe("euler", args.num_steps, afs=True), rmse(after, ref)),
        ("DPM-Solver++(3M), the teacher", nfe("dpm_solver_pp", t_steps), rmse(teacher, ref)),
    ]
    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"Command: `python benchmarks/diffusion_sfd.py {cmd}`",
             f"Run {info['checkpoint']} ({info['dataset']}); {args.iterations} iterations of batch {args.batch}, "
             f"Adam lr {args.lr} (/10 at half), M = {args.M}: {seconds:.0f} s on "
             f"{hardware_name(torch.device(args.device))}, "
             f"torch {torch.__version__}, {datetime.date.today().isoformat()}. Error: RMSE against Heun with "
             f"{args.ref_steps} polynomial timestamps from the same noise, {args.n} samples.", "",
             "| sampler | NFE | RMSE |", "|---|---|---|"]
    lines += [f"| {name} | {n} | {float(err):.4f} |" for name, n, err in rows]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

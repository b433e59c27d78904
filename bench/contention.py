"""Two jobs on one machine: how much each keeps of its speed alone, under OpenMP's waiting policies.

    python bench/contention.py [--preset small] [--seconds 15]

Each job is a float32 prefill of 512 tokens, repeated for --seconds, in its own process with torch's default
thread count (one per core). It runs alone, then two at once, under: libgomp's default spin (300,000 spins
before a waiting thread sleeps; what plain torch does), zamba2's default (GOMP_SPINCOUNT=3000, set when
zamba2 is imported first), and OMP_WAIT_POLICY=PASSIVE (no spinning). Printed: tokens/s alone, each of
the two, and their sum as a fraction of alone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

JOB = """
import sys, time, torch, zamba2
torch.manual_seed(0)
m = zamba2.Zamba2LM(zamba2.preset(sys.argv[1])).eval()
ids = torch.randint(3, 1000, (1, 512))
with torch.inference_mode():
    m(ids, logits_to_keep=1)
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < float(sys.argv[2]):
        m(ids, logits_to_keep=1)
        n += 1
print(n * 512 / (time.perf_counter() - t))
"""

POLICIES = {"libgomp default": {"GOMP_SPINCOUNT": "300000"}, "zamba2 default": {"GOMP_SPINCOUNT": "3000"},
            "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}


def run(jobs: int, env: dict, preset: str, seconds: float) -> list[float]:
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    procs = [subprocess.Popen([sys.executable, "-c", JOB, preset, str(seconds)], env={**base, **env},
                              stdout=subprocess.PIPE, text=True) for _ in range(jobs)]
    return [float(p.communicate()[0]) for p in procs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seconds", type=float, default=15)
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from compare import cpu_summary

    print(f"{cpu_summary()}, {os.cpu_count()} cores; {args.preset} prefill 512, float32")
    for name, env in POLICIES.items():
        alone = run(1, env, args.preset, args.seconds)[0]
        a, b = run(2, env, args.preset, args.seconds)
        print(f"  {name:16s} alone {alone:7.0f} tok/s | two at once {a:7.0f} + {b:7.0f} tok/s = "
              f"{(a + b) / alone:.2f}x alone (each {a / alone:.2f}x, {b / alone:.2f}x)", flush=True)


if __name__ == "__main__":
    main()

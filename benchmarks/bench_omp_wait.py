"""Benchmark: torch's OpenMP threads spinning (libgomp's default) against sleeping (``OMP_WAIT_POLICY=PASSIVE``).

Input: nothing (random tensors). Output: the time of ResNet-18 training steps (the pipeline's default backbone, 101
ages) on this process's usable cores as torch threads (what ``faceage.training.pin_threads`` sets), measured in
fresh processes (the policy is read once, when libgomp starts) with ``OMP_WAIT_POLICY`` unset and set to
``PASSIVE`` and with a short spin (``GOMP_SPINCOUNT=10000``), round-robin (the order rotates every round), on an idle machine and beside ``--busy`` processes
that each keep one core busy (a browser, a second job, CI on the same cores). The result is each setting's median as a
ratio of the default's, in each condition: ratios, not absolute times, since both sides run in the same minutes
on the same machine.

    python benchmarks/bench_omp_wait.py [--rounds 5] [--steps 4] [--size 112] [--batch 16] [--busy 1] [--json out.json]

Why: with every core given to torch, a thread that waits at a barrier spins for its share of the core; when
another process takes one of those cores, the threads wait for each other's time slices and a step takes many
times as long (oversubscription made ResNet-18 6x slower here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _paths import REPO  # noqa: E402
from _server import sigterm_exits  # noqa: E402

sys.path.insert(0, str(REPO))
from faceage.atomic import write_text  # noqa: E402
from faceage.cores import usable_cores  # noqa: E402

# One child: builds ResNet-18, runs one warm-up step, then times ``steps`` steps; prints the seconds per step.
CHILD = """
import sys, time, torch, torchvision
threads, steps, size, batch = map(int, sys.argv[1:5])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=101)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x = torch.randn(batch, 3, size, size)
y = torch.randint(0, 101, (batch,))
def step():
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
step()
t = time.perf_counter()
for _ in range(steps):
    step()
print((time.perf_counter() - t) / steps)
"""

# A core kept busy, as another program would, until the benchmark (its parent, pid in argv) is gone: it checks every
# ~10^6 iterations (tens of ms), so a benchmark killed outright (SIGKILL) does not leave it spinning for ever.
SPIN = ("import os, sys\nparent = int(sys.argv[1])\nwhile True:\n    for _ in range(1000000):\n        pass\n"
        "    if os.getppid() != parent:\n        break\n")


# The settings compared: libgomp's default (spin ~300,000 times at a barrier, then sleep), sleeping at once, and a
# short spin (GOMP_SPINCOUNT) between the two.
POLICIES = {"default": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "spin10k": {"GOMP_SPINCOUNT": "10000"}}
OMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def run_child(policy: dict[str, str], threads: int, steps: int, size: int, batch: int) -> float:
    """Seconds per training step in a fresh process with the OpenMP settings ``policy`` (the others unset)."""
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARS}
    env.update(policy)
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(steps), str(size), str(batch)],
                         env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure(rounds: int, steps: int, size: int, batch: int, threads: int) -> dict:
    """Every policy, round-robin (the one that goes first rotates each round): medians (s per step), and each
    policy's median as a ratio of the default's."""
    names = list(POLICIES)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            times[n].append(run_child(POLICIES[n], threads, steps, size, batch))
    medians = {n: statistics.median(t) for n, t in times.items()}
    return {"s_per_step": medians, "ratio_to_default": {n: m / medians["default"] for n, m in medians.items()},
            "all": times}


@sigterm_exits()  # its --busy processes are stopped on SIGTERM too (they spun for ever)
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="measurements of each policy per condition")
    ap.add_argument("--steps", type=int, default=4, help="training steps timed per measurement")
    ap.add_argument("--size", type=int, default=112, help="image side, pixels")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--busy", type=int, default=1, help="processes each keeping one core busy in the loaded "
                                                        "condition (0: the idle condition only)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    if min(args.rounds, args.steps, args.size, args.batch) < 1 or args.busy < 0:
        ap.error("--rounds, --steps, --size and --batch must be 1 or more, --busy 0 or more")
    threads = usable_cores()
    if threads < 2:
        print("bench_omp_wait: this process may use one core: torch runs one thread, which never waits for "
              "another; nothing to compare", file=sys.stderr)
        return 2
    results = {"threads": threads, "idle": measure(args.rounds, args.steps, args.size, args.batch, threads)}
    if args.busy:
        spinners = [subprocess.Popen([sys.executable, "-c", SPIN, str(os.getpid())]) for _ in range(args.busy)]
        try:
            time.sleep(0.5)
            results[f"busy_{args.busy}"] = measure(args.rounds, args.steps, args.size, args.batch, threads)
        finally:
            for s in spinners:
                s.kill()
                s.wait()
    for name, r in results.items():
        if name != "threads":
            print(f"{name}: ResNet-18 step, {threads} torch threads, median of {args.rounds} each, as a ratio of "
                  "libgomp's default: " + ", ".join(f"{n} {r['ratio_to_default'][n]:.2f}x ({r['s_per_step'][n]:.3f} s)"
                                                    for n in POLICIES))
    if args.json:
        write_text(args.json, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

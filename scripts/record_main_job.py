"""Run the README's main job (`relicv2-train` with no arguments) in a scratch folder and record what it printed.

Writes experiments/results/main_job.json: the evaluation table (eval.json of the run), the wall time of the whole
command, the steps, and where it ran (CPU model, cores, math threads, torch); the earlier recordings' times and
machines are kept in its `history`, so the README can give the range. The README's main-job paragraph and
table are computed from that file (nbs/index.ipynb), so they change only when this script is run again.

Usage: python scripts/record_main_job.py [--threads N] [--out experiments/results/main_job.json]
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the run (default: torch's own choice)")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "main_job.json"))
    args = p.parse_args(argv)
    from relicv2.files import provenance
    from relicv2.files import atomic_write
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", "import sys; from relicv2.cli import train_main; sys.exit(train_main())"],
                           cwd=d, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode: sys.exit(f"the main job failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
        run = Path(d, "runs", "spurious")
        results = json.loads((run / "eval.json").read_text())
        steps = max(json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip())
    threads = int(env["OMP_NUM_THREADS"]) if "OMP_NUM_THREADS" in env else None
    out = {"command": "relicv2-train", "results": results, "steps": steps, "wall_s": round(wall, 1),
           "stdout_tail": r.stdout.strip().splitlines()[-8:], **provenance()}
    if threads: out["threads"] = threads  # the child's, not this process's
    keep = ("finished", "machine", "cpus", "threads", "torch", "steps", "wall_s")  # earlier recordings: where and how long
    old = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else None
    out["history"] = (old.get("history", []) + [{k: old[k] for k in keep if k in old}]) if old else []
    atomic_write(args.out, json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}: {steps} steps in {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())

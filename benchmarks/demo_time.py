"""Wall and CPU time of `make demo` (= `vlm-tools demo` from a built cache) on this CPU, natively and as one AVX2 core.

`make demo` must finish within 10 minutes on a plain two-core AVX2 CPU without bf16 units (issue 13.14). This
script runs the exact demo command in a subprocess per configuration and records the child's wall time and CPU time
(user + sys, from `getrusage(RUSAGE_CHILDREN)`):

* `native`: the demo as `make demo` runs it here (default threads, this CPU's own instruction set);
* `1 thread`: one torch thread (`OMP_NUM_THREADS=1`);
* `1 thread, AVX2`: one thread with every kernel library capped at AVX2 (`ATEN_CPU_CAPABILITY=avx2`,
  `MKL_ENABLE_INSTRUCTIONS=AVX2`, `ONEDNN_MAX_CPU_ISA=AVX2`): this CPU computing like an AVX2 core.

With one thread the CPU time is the wall time the run needs on one idle core, whatever else the machine runs; a
two-core AVX2 machine with cores as fast as these has twice that, so the `1 thread, AVX2` CPU time bounds its wall
time from above. Each run writes its demo outputs under `--out`; the runs' measurements go to `timings.json` there
as they finish and to the `demo_time` section of RESULTS.md at the end.

    python benchmarks/demo_time.py [--configs native,1t,1t-avx2] [--out out/demo_time] [-- extra demo args]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from _results import write_section  # noqa: E402

from vlm_tools.core.io import write_json_atomic  # noqa: E402

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
CONFIGS = {
    "native": ("native (default threads)", {}),
    "1t": ("1 thread", {"OMP_NUM_THREADS": "1"}),
    "1t-avx2": ("1 thread, AVX2", {"OMP_NUM_THREADS": "1", **AVX2}),
}


def run_config(key: str, out: Path, extra: list[str]) -> dict:
    """Run `vlm-tools demo` once with the configuration's environment; returns its measurements."""
    label, env_extra = CONFIGS[key]
    env = {**os.environ, **env_extra, "PYTHONPATH": str(ROOT)}
    for name in AVX2:
        if name not in env_extra:
            env.pop(name, None)
    folder = out / key
    cmd = [sys.executable, "-m", "vlm_tools.cli", "demo", "--out", str(folder), *extra]
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    meta = json.loads((folder / "results.json").read_text())["meta"]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"config": label, "env": env_extra, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "load_avg_1min_at_start": round(load, 2), "capability": meta["CPU capability"], "threads": meta["threads"],
            "dtype": meta["dtype"], "questions": meta["questions per cell"].split()[0],
            "stages_s": meta["seconds per stage"], "table": (folder / "results.md").read_text()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="native,1t,1t-avx2", help=f"comma-separated subset of {', '.join(CONFIGS)}")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "demo_time")
    ap.add_argument("--no-write", action="store_true", help="do not write the RESULTS.md section")
    ap.add_argument("extra", nargs="*", help="extra `vlm-tools demo` arguments (after --)")
    args = ap.parse_args(argv)
    keys = args.configs.split(",")
    unknown = [k for k in keys if k not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    results = []
    for key in keys:
        print(f"[demo_time] {CONFIGS[key][0]} ...", file=sys.stderr, flush=True)
        results.append(run_config(key, args.out, args.extra))
        write_json_atomic(args.out / "timings.json", results, indent=1)
        r = results[-1]
        print(f"[demo_time] {r['config']}: wall {r['wall_s']} s, CPU {r['cpu_s']} s ({r['capability']}, "
              f"{r['threads']} threads, load {r['load_avg_1min_at_start']})", file=sys.stderr, flush=True)
    lines = ["| run | CPU capability | threads | dtype | questions per cell | wall s | CPU s (user+sys) | "
             "load avg at start | stages (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        stages = "; ".join(f"{k} {v}" for k, v in r["stages_s"].items())
        lines.append(f"| {r['config']} | {r['capability']} | {r['threads']} | {r['dtype'].split()[0]} | "
                     f"{r['questions']} | {r['wall_s']} | {r['cpu_s']} | {r['load_avg_1min_at_start']} | {stages} |")
    body = "\n".join(lines) + (
        "\n\nThis CPU reports AVX512 but has no bf16 units (`vlm_tools.loading.cpu_has_native_bf16()` is False), so "
        "the demo runs in fp32 (`auto_dtype`). The machine is shared with other jobs: wall times include waiting for "
        "a core, CPU times do not. A one-thread run's CPU time is its wall time on one idle core; the `1 thread, "
        "AVX2` run computes with AVX2 kernels only (ATen, MKL and oneDNN capped), so its CPU time is the wall time "
        "of one AVX2 core as fast as these, and a two-core AVX2 machine (2 threads) needs at most that.\n\n"
        f"Demo table of the last run ({results[-1]['config']}):\n\n{results[-1]['table']}")
    if not args.no_write:
        write_section("demo_time", "`make demo` wall time on CPUs without bf16 units (issue 13.14)", body,
                      dtype="float32")
    print(body)


if __name__ == "__main__":
    main()

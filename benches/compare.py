#!/usr/bin/env python3
"""One command for issue 9's comparison: trains a reference config with jobd's Candle trainer
(benches/train_throughput.rs) and with PyTorch + transformers (benches/pytorch_train.py) on the
same machine, one after the other, and prints one table with the ratios.

CPU (builds the bench with cargo; PyTorch is installed by pytorch_train.py):
    python3 benches/compare.py --config 20m --seconds 60 --threads 2
GPU (a carried binary, PyTorch already installed; see benches/gpu.sh):
    python3 benches/compare.py --device cuda --config 100m --candle-bin ./train_throughput \
        --python /opt/torch/.venv/bin/python --seconds 40

--repeat N alternates the trainers N times and keeps each one's best run, which evens out
other load on a shared machine. --plain adds Candle with plain ops (the state before the
fused kernels); --autograd adds Candle's fused ops through its autograd (what LoRA and other
devices use; on the CPU in f32 the trainer's full fine-tuning step is train::direct's). Those
extra rows run after every variant named in --variants, which run in the order given.

--budget S stops starting trainers once another one would likely end past S seconds (the
longest run so far is the guess), and a SIGTERM (e.g. from `timeout`) stops the running one:
either way the table shows what finished, so a time-limited GPU session still gets figures.
Under the table, issue 9's targets are checked against this run's ratios.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def last_json(out):
    for line in reversed(out.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError("no JSON result in output:\n" + out[-2000:])


class Stopped(Exception):
    """SIGTERM arrived: stop running trainers and print what finished."""


def on_sigterm(_signum, _frame):
    raise Stopped()


def run(cmd, env=None):
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        out, _ = p.communicate()
    except Stopped:
        p.terminate()
        p.wait()
        raise
    sys.stderr.write(out)
    if p.returncode != 0:
        # One failed trainer should not cost the others' figures: report it and go on.
        print(f"FAILED ({p.returncode}): {' '.join(cmd)}", file=sys.stderr, flush=True)
        return None
    return last_json(out)


def targets(best, device):
    """Issue 9's targets, each with this run's ratio (None where a row is missing)."""
    def ratio(a, b, key="tokens_per_s"):
        ra, rb = best.get(a), best.get(b)
        if not ra or not rb or not ra.get(key) or not rb.get(key):
            return None
        return ra[key] / rb[key]

    if device == "cpu":
        refs = [n for n in ("pytorch eager", "pytorch sdpa") if n in best]
        fastest = max(refs, key=lambda n: best[n]["tokens_per_s"], default="pytorch eager")
        return [(f"candle f32 tokens/s vs the faster PyTorch f32 ({fastest.split()[-1]})",
                 ">=", 1.0, ratio("candle f32", fastest))]
    return [
        ("candle f32 tokens/s vs PyTorch f32 eager", ">=", 1.0,
         ratio("candle f32", "pytorch eager")),
        ("candle bf16 tokens/s vs PyTorch bf16 autocast SDPA", ">=", 0.8,
         ratio("candle bf16", "pytorch bf16")),
        ("candle f32 peak memory vs PyTorch f32 eager", "<=", 1.5,
         ratio("candle f32", "pytorch eager", "peak_memory_bytes")),
        ("candle bf16 peak memory vs PyTorch bf16 autocast SDPA", "<=", 1.5,
         ratio("candle bf16", "pytorch bf16", "peak_memory_bytes")),
    ]


def best_of(runs, repeat):
    """How many runs each row is the best of: "2", or "1-2" when a budget cut some short."""
    counts = sorted(set(runs.values())) or [0]
    if counts == [repeat]:
        return str(repeat)
    lo, hi = counts[0], counts[-1]
    return (f"{lo}" if lo == hi else f"{lo}-{hi}") + f" (of {repeat} asked; the budget cut the rest)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="20m", choices=["tiny", "20m", "100m"])
    ap.add_argument("--arch", default="llama", choices=["llama", "qwen3"],
                    help="qwen3: the same sizes with Qwen3's query/key norms, in both trainers")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for both (default: all)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--plain", action="store_true", help="also run Candle with plain ops")
    ap.add_argument("--autograd", action="store_true",
                    help="also run Candle's fused ops through its autograd (LoRA's path)")
    ap.add_argument("--budget", type=float, default=0.0,
                    help="seconds: start no trainer likely to end past this (default: no limit)")
    ap.add_argument("--candle-bin", help="a built train_throughput binary (default: cargo bench)")
    ap.add_argument("--python", help="python with torch + transformers (default: install a venv)")
    ap.add_argument("--variants", help="comma-separated: candle dtypes and pytorch variants, "
                    "e.g. f32,eager,sdpa, run in this order (default: f32,eager,sdpa on CPU; "
                    "f32,eager,bf16,pt-bf16,sdpa,candle-tf32,tf32 on CUDA, the targets' pairs "
                    "first); f16 and pt-f16 are Candle and PyTorch (autocast, GradScaler) in "
                    "f16; candle-tf32 is Candle in f32 with TF32 matrix products, tf32 PyTorch's; candle-lora "
                    "is Candle LoRA r16 on every projection, no PyTorch counterpart; "
                    "candle-unblocked is Candle f32 and bf16 with the GPU attention's whole "
                    "T×S products, without causal block skipping)")
    args = ap.parse_args()

    threads = args.threads or os.cpu_count()
    env = dict(os.environ)
    if args.device == "cpu":
        # Both trainers use this many threads: Candle's pools and gemm read RAYON_NUM_THREADS,
        # torch reads --threads.
        env["RAYON_NUM_THREADS"] = str(threads)
    if args.python:
        env["JOBD_BENCH_PYTHON"] = args.python
    if args.candle_bin:
        candle = [os.path.abspath(args.candle_bin), "--bench"]
    else:
        features = ["--features", "cuda"] if args.device == "cuda" else []
        candle = ["cargo", "bench", "--quiet", "--bench", "train_throughput", *features, "--"]
    default = ("f32,eager,sdpa" if args.device == "cpu"
               else "f32,eager,bf16,pt-bf16,sdpa,candle-tf32,tf32")
    variants = (args.variants or default).split(",")
    common = ["--config", args.config, "--arch", args.arch, "--seconds", str(args.seconds),
              "--json"]
    cthreads = ["--threads", str(threads)] if args.device == "cpu" else []

    # The variants run in the order named (a time-limited run lists what matters most first);
    # the --plain and --autograd rows, before-and-after context, come after all of them.
    jobs, extras = [], []
    for v in variants:
        if v in ("f32", "bf16", "f16"):
            jobs.append((f"candle {v}", candle + common + cthreads
                         + ["--dtype", v, "--device", args.device]))
            if args.plain:
                extras.append((f"candle plain {v}", candle + common + cthreads
                               + ["--dtype", v, "--device", args.device, "--plain"]))
            if args.autograd:
                extras.append((f"candle autograd {v}", candle + common + cthreads
                               + ["--dtype", v, "--device", args.device, "--autograd"]))
        elif v == "candle-events":
            jobs.append(("candle bf16 events", candle + common
                         + ["--dtype", "bf16", "--cuda-events", "--device", args.device]))
        elif v == "candle-lora":
            # LoRA r16 on every projection, dropout 0.05, in bf16 on CUDA (f32 on the CPU).
            dt = "bf16" if args.device == "cuda" else "f32"
            lora = ["--dtype", dt, "--lora", "16", "--device", args.device]
            jobs.append((f"candle lora {dt}", candle + common + cthreads + lora))
            if args.autograd:
                extras.append((f"candle lora autograd {dt}", candle + common + cthreads + lora
                               + ["--autograd"]))
        elif v == "candle-unblocked":
            # The GPU attention's whole T×S products (no causal block skipping), f32 and bf16.
            for dt in ("f32", "bf16"):
                jobs.append((f"candle {dt} unblocked", candle + common
                             + ["--dtype", dt, "--attention-block-rows", "0",
                                "--device", args.device]))
        elif v == "candle-tf32":
            jobs.append(("candle tf32", candle + common
                         + ["--dtype", "f32", "--tf32", "--device", args.device]))
        else:
            pv = {"pt-bf16": "bf16", "pt-f16": "fp16"}.get(v, v)
            jobs.append((f"pytorch {pv}", [sys.executable, os.path.join(HERE, "pytorch_train.py"),
                                          "--variant", pv, "--device", args.device]
                         + common + cthreads))

    jobs += extras

    best = {}
    peak_tflops = None
    started = time.monotonic()
    longest = 0.0
    skipped = []
    runs = {}  # name -> runs that finished (a budget can cut later repetitions)
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        for _ in range(args.repeat):
            for name, cmd in jobs:
                elapsed = time.monotonic() - started
                if args.budget and elapsed + longest > args.budget:
                    skipped.append(name)
                    continue
                if name.startswith("pytorch") and peak_tflops and args.device == "cpu":
                    cmd = cmd + ["--peak-tflops", str(peak_tflops)]
                t0 = time.monotonic()
                r = run(cmd, env)
                longest = max(longest, time.monotonic() - t0)
                if r is None:
                    continue
                if name.startswith("candle") and args.device == "cpu" and peak_tflops is None:
                    # Candle measured this CPU's matmul peak; use it for PyTorch's MFU too.
                    peak_tflops = r["peak_tflops"]
                runs[name] = runs.get(name, 0) + 1
                if name not in best or r["tokens_per_s"] > best[name]["tokens_per_s"]:
                    best[name] = r
            # Later Candle runs use the first run's peak too, so MFUs compare.
            if peak_tflops and args.device == "cpu":
                jobs = [(n, c + ["--peak-tflops", str(peak_tflops)]
                         if n.startswith("candle") and "--peak-tflops" not in c else c)
                        for n, c in jobs]
    except Stopped:
        print("compare.py: stopped by SIGTERM; the table shows the runs that finished",
              file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if skipped:
        print(f"compare.py: out of the {args.budget:.0f} s budget, skipped: "
              + ", ".join(dict.fromkeys(skipped)), file=sys.stderr, flush=True)

    refs = [r for n, r in best.items() if n.startswith("pytorch")]
    print()
    print(f"config {args.config} ({args.arch}) on {args.device}"
          + (f", {threads} threads" if args.device == "cpu" else "")
          + f", best of {best_of(runs, args.repeat)}, {args.seconds:.0f} s each")
    head = (f"{'trainer':<20} {'dtype':>5} {'tokens/s':>10} {'step s':>7} {'data':>6} {'fwd':>6} "
            f"{'bwd':>6} {'opt':>6} {'peak GiB':>9} {'est GiB':>8} {'MFU':>6}")
    head += "".join(f" {'÷ ' + r['trainer'].split()[-1]:>12}" for r in refs)
    print(head)
    for name, r in best.items():
        mem = r.get("peak_memory_bytes")
        est = r.get("estimate_bytes")
        mfu = r.get("mfu")
        line = (f"{name:<20} {r['dtype']:>5} {r['tokens_per_s']:>10.0f} {r['step_s']:>7.3f} "
                f"{r['data_s']:>6.3f} {r['forward_s']:>6.3f} {r['backward_s']:>6.3f} "
                f"{r['optimizer_s']:>6.3f} {mem / 2**30 if mem else float('nan'):>9.2f} "
                f"{est / 2**30 if est else float('nan'):>8.2f} "
                f"{(100 * mfu if mfu is not None else float('nan')):>5.1f}%")
        for ref in refs:
            line += f" {r['tokens_per_s'] / ref['tokens_per_s']:>11.2f}x"
        print(line)
    for name, r in best.items():
        if r.get("backward_enqueued_s") is not None:
            print(f"{name}: backward queued after {r['backward_enqueued_s']:.3f} s of "
                  f"{r['backward_s']:.3f} s (equal: the host sets the pace)")
    if refs:
        print("(÷ columns: tokens/s relative to each PyTorch variant; est GiB: the VRAM "
              "jobctl estimate gives a Candle run, which the scheduler reserves)")
        for name, r in best.items():
            if name.startswith("candle") and r.get("peak_memory_bytes"):
                ratios = ", ".join(
                    f"{r['peak_memory_bytes'] / ref['peak_memory_bytes']:.2f}x {ref['trainer']}"
                    for ref in refs if ref.get("peak_memory_bytes"))
                print(f"peak memory of {name}: {ratios}")
    print()
    stated = "20m" if args.device == "cpu" else "100m"
    print(f"issue 9 targets, config {args.config} on {args.device}, this run"
          + ("" if args.config == stated else f" (the issue states them for {stated})") + ":")
    for what, op, goal, got in targets(best, args.device):
        if got is None:
            verdict, shown = "not measured (a row is missing)", "    -"
        else:
            met = got >= goal if op == ">=" else got <= goal
            verdict, shown = ("met" if met else "NOT met"), f"{got:5.2f}x"
        print(f"  {what:<56} {op} {goal:.1f}x  {shown}  {verdict}")


if __name__ == "__main__":
    main()

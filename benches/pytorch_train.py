#!/usr/bin/env python3
"""PyTorch + transformers baseline for benches/train_throughput.rs: the same reference configs
(tiny, 20m, 100m; see that file), the same batches of random tokens, AdamW with clipping at 1.0,
trained for a fixed time; prints the same table (tokens/s, data/forward/backward/optimizer split,
peak memory, MFU) and, with --json, one JSON line.

Variants: eager (f32, eager attention), sdpa (f32, scaled_dot_product_attention), tf32 (sdpa,
TF32 matmuls; CUDA), bf16 (sdpa under bf16 autocast, f32 master weights; CUDA), fp16 (sdpa under
f16 autocast with torch.amp.GradScaler's dynamic loss scaling, f32 master weights; CUDA).

It installs what it needs itself: unless JOBD_BENCH_PYTHON names a python that already has
torch and transformers (e.g. /opt/torch/.venv/bin/python on the GPU machine), it creates a venv
under target/bench-venv, installs torch and transformers from PyPI into it (the first run
downloads several GB) and re-runs itself there.

Run: python3 benches/pytorch_train.py --config 20m --variant eager --seconds 60 --threads 2
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(HERE, "..", "target", "bench-venv")

CONFIGS = {
    # name: (LlamaConfig kwargs, batch, block)
    "tiny": (dict(vocab_size=320, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                  tie_word_embeddings=True), 32, 16),
    "20m": (dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                 tie_word_embeddings=False), 8, 256),
    "100m": (dict(vocab_size=1024, hidden_size=768, intermediate_size=2048, num_hidden_layers=14,
                  num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=512,
                  tie_word_embeddings=False), 16, 512),
}


def ensure_torch():
    """Re-exec in a python that has torch and transformers, installing them if needed."""
    if os.environ.get("JOBD_BENCH_IN_VENV") == "1":
        return
    want = os.environ.get("JOBD_BENCH_PYTHON")
    if not want:
        try:  # Already in a python with both (e.g. the GPU machine's /opt/torch/.venv).
            import torch, transformers  # noqa: F401
            return
        except ImportError:
            pass
    if want:
        py = want
    else:
        py = os.path.join(VENV, "bin", "python3")
        if not os.path.exists(py):
            subprocess.check_call([sys.executable, "-m", "venv", VENV])
        probe = subprocess.run([py, "-c", "import torch, transformers"], capture_output=True)
        if probe.returncode != 0:
            print("installing torch and transformers into target/bench-venv", file=sys.stderr)
            subprocess.check_call([py, "-m", "pip", "install", "--quiet", "torch", "transformers"])
    env = dict(os.environ, JOBD_BENCH_IN_VENV="1")
    os.execve(py, [py] + sys.argv, env)


def flops_per_token(cfg, block):
    """6·N + 12·L·T·d (PaLM), N = parameters less the input embedding."""
    h, v, l = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    i, heads = cfg["intermediate_size"], cfg["num_attention_heads"]
    hd = h // heads
    kv = cfg["num_key_value_heads"] * hd
    per_layer = h * heads * hd + 2 * h * kv + heads * hd * h + 3 * h * i + 2 * h
    n = l * per_layer + h + v * h  # layers, final norm, output projection (tied or not)
    return 6 * n + 12 * l * block * heads * hd


def gpu_process_bytes():
    """GPU memory this process uses as nvidia-smi reports it (includes the CUDA context)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    total = 0
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(os.getpid()):
            total += int(parts[1]) * 1024 * 1024
    return total or None


def print_op_times(torch, step, device, steps=2):
    """Profiles `steps` more steps and prints the ops with the most self device time per step
    (the counterpart of the Candle bench's --op-times)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
    avgs = prof.key_averages()
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    if device == "cuda" and not hasattr(avgs[0], key):
        key = "self_cuda_time_total"  # older PyTorch
    # Ops (CPU-side events, to which the profiler attributes the kernels they launch), not the
    # kernels' own rows as well, which would count the same time twice.
    kernel = getattr(torch.autograd, "DeviceType", None)
    ops = [e for e in avgs if kernel is None
           or getattr(e, "device_type", kernel.CPU) == kernel.CPU]
    rows = sorted(ops, key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in ops) / steps / 1e3
    print(f"op times per step ({total:.1f} ms of self {'device' if device == 'cuda' else 'CPU'} "
          f"time, torch.profiler over {steps} steps):")
    for e in rows[:25]:
        ms = getattr(e, key) / steps / 1e3
        if ms <= 0:
            break
        print(f"  {e.key[:48]:<48} {ms:>8.2f} ms {100 * ms / total:>5.1f}%  "
              f"{e.count / steps:>5.0f} calls")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="20m", choices=sorted(CONFIGS))
    ap.add_argument("--arch", default="llama", choices=["llama", "qwen3"],
                    help="qwen3: the same sizes as transformers' Qwen3ForCausalLM "
                         "(per-head query/key norms)")
    ap.add_argument("--variant", default="eager", choices=["eager", "sdpa", "tf32", "bf16", "fp16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="for MFU; default: 67 (f32) / 495 (tf32) / 989 (bf16, fp16) on CUDA, "
                         "required on the CPU")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--op-times", action="store_true",
                    help="then profile two more steps (torch.profiler) and print the ops that "
                         "take the most device time per step")
    args = ap.parse_args()
    ensure_torch()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if args.variant in ("tf32", "bf16", "fp16") and args.device != "cuda":
        sys.exit(f"--variant {args.variant} needs --device cuda")
    torch.backends.cuda.matmul.allow_tf32 = args.variant == "tf32"
    torch.backends.cudnn.allow_tf32 = args.variant == "tf32"
    torch.manual_seed(0)
    kw, batch, block = CONFIGS[args.config]
    attn = "eager" if args.variant == "eager" else "sdpa"
    if args.arch == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM
        cfg = Qwen3Config(rms_norm_eps=1e-6, attn_implementation=attn,
                          head_dim=kw["hidden_size"] // kw["num_attention_heads"], **kw)
        model = Qwen3ForCausalLM(cfg).to(dev).train()
    else:
        cfg = LlamaConfig(rms_norm_eps=1e-6, attn_implementation=attn, **kw)
        model = LlamaForCausalLM(cfg).to(dev).train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if "norm" in n]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay}], lr=1e-4,
                            betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    peak = args.peak_tflops or {"eager": 67.0, "sdpa": 67.0, "tf32": 495.0,
                                "bf16": 989.0, "fp16": 989.0}[args.variant]
    if args.device == "cpu" and not args.peak_tflops:
        peak = 0.0  # unknown: MFU not reported
    trainer = f"pytorch {args.variant}"
    print(f"{trainer}: config {args.config} ({args.arch}, {n_params} parameters), batch {batch} x {block}, "
          f"{args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}",
          file=sys.stderr)

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.variant)
    # f16 needs loss scaling (bf16 has f32's range): the trainer's GradScaler, as HF's Trainer
    # sets it up for fp16=True.
    scaler = torch.amp.GradScaler(args.device, enabled=args.variant == "fp16")
    gen = torch.Generator().manual_seed(1)
    timed = []
    since = None
    loss_v = 0.0
    s = 0

    def step():
        """One training step; returns its (total, data, forward, backward, optimizer) seconds
        and the loss."""
        t0 = time.perf_counter()
        ids = torch.randint(0, cfg.vocab_size, (batch, block + 1), generator=gen).to(dev)
        x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        sync()
        t_data = time.perf_counter() - t0
        with torch.autocast(args.device, dtype=half or torch.bfloat16, enabled=half is not None):
            logits = model(input_ids=x).logits
        # Mean over all positions of -log p(next token), as the candle bench computes it.
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, cfg.vocab_size), y.view(-1))
        loss_v = loss.item()
        t_fwd = time.perf_counter() - t0 - t_data
        scaler.scale(loss).backward()
        del logits
        sync()
        t_bwd = time.perf_counter() - t0 - t_data - t_fwd
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sync()
        secs = time.perf_counter() - t0
        t_opt = secs - t_data - t_fwd - t_bwd
        return (secs, t_data, t_fwd, t_bwd, t_opt), loss_v, t0

    while True:
        (secs, t_data, t_fwd, t_bwd, t_opt), loss_v, t0 = step()
        warm = s < args.warmup
        print(f"step {s}{' (warm-up)' if warm else ''}: {secs:.3f}s (data {t_data:.3f}s, "
              f"forward {t_fwd:.3f}s, backward {t_bwd:.3f}s, optimizer {t_opt:.3f}s), "
              f"{batch * block / secs:.0f} tokens/s, loss {loss_v:.3f}", file=sys.stderr)
        s += 1
        if not warm:
            since = since or t0
            timed.append((secs, t_data, t_fwd, t_bwd, t_opt))
            if time.perf_counter() - since >= args.seconds and len(timed) >= 2:
                break
    mean = [sum(t[i] for t in timed) / len(timed) for i in range(5)]
    if args.op_times:
        print_op_times(torch, step, args.device)
    tps = batch * block / mean[0]
    if args.device == "cuda":
        peak_bytes = gpu_process_bytes() or torch.cuda.max_memory_reserved()
    else:
        peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mfu = tps * flops_per_token(kw, block) / (peak * 1e12) if peak else None
    dtype_name = {"bf16": "bf16", "fp16": "f16", "tf32": "tf32"}.get(args.variant, "f32")
    print(f"{trainer:<22} {args.config:>5} {dtype_name:>5} "
          f"{tps:>10.0f} tokens/s  step {mean[0]:.3f}s = data {mean[1]:.3f} + fwd {mean[2]:.3f} + "
          f"bwd {mean[3]:.3f} + opt {mean[4]:.3f}  peak {peak_bytes / 2**30:.2f} GiB  MFU "
          + (f"{100 * mfu:.1f}%" if mfu is not None else "?"))
    if args.json:
        print(json.dumps({
            "trainer": trainer, "config": args.config,
            "dtype": dtype_name,
            "device": args.device, "threads": torch.get_num_threads(), "steps": len(timed),
            "tokens_per_s": tps, "step_s": mean[0], "data_s": mean[1], "forward_s": mean[2],
            "backward_s": mean[3], "optimizer_s": mean[4], "peak_memory_bytes": peak_bytes,
            "mfu": mfu, "peak_tflops": peak, "loss": loss_v,
            "max_memory_allocated": torch.cuda.max_memory_allocated() if args.device == "cuda" else None,
        }))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""PyTorch + transformers baseline for benches/train_throughput.rs: the same ~21M-parameter
llama (hidden 512, 4 layers, 8 heads, MLP 1408, vocab 8192, untied), batches of 8 x 256
random tokens, f32 on the CPU, AdamW, gradient clipping at 1.0; prints tokens/s.

It installs what it needs itself: a venv under target/bench-venv with torch and
transformers from PyPI (the first run downloads them), then re-runs itself in it.

Run: python3 benches/pytorch_train.py [--steps 5] [--threads 2] [--attn eager|sdpa]
"""
import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(HERE, "..", "target", "bench-venv")


def ensure_venv():
    py = os.path.join(VENV, "bin", "python3")
    if os.path.abspath(sys.prefix) == os.path.abspath(VENV):
        return
    if not os.path.exists(py):
        subprocess.check_call([sys.executable, "-m", "venv", VENV])
    probe = subprocess.run([py, "-c", "import torch, transformers"], capture_output=True)
    if probe.returncode != 0:
        subprocess.check_call([py, "-m", "pip", "install", "--quiet", "torch", "transformers"])
    os.execv(py, [py] + sys.argv)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--attn", default="sdpa", choices=["eager", "sdpa"])
    args = ap.parse_args()
    ensure_venv()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=False, attn_implementation=args.attn,
    )
    model = LlamaForCausalLM(cfg).train()
    n = sum(p.numel() for p in model.parameters())
    batch, block = 8, 256
    print(f"config: {n} parameters, batch {batch} x {block} tokens, f32, CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, attention {args.attn}")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    times = []
    for s in range(args.steps + 1):
        ids = torch.randint(0, cfg.vocab_size, (batch, block))
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        secs = time.perf_counter() - t0
        print(f"step {s}{' (warm-up)' if s == 0 else ''}: {secs:.3f}s, "
              f"{batch * block / secs:.0f} tokens/s, loss {out.loss.item():.3f}")
        if s > 0:
            times.append(secs)
    mean = sum(times) / len(times)
    print(f"pytorch: {batch * block / mean:.0f} tokens/s (mean step {mean:.3f}s over {len(times)} steps)")


if __name__ == "__main__":
    main()

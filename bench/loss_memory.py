"""Peak memory of the loss step: the unfused loss (full logits) vs training's chunked one.

    python bench/loss_memory.py [--tokens 8192] [--vocab 151936] [--hidden 896] [--rounds 2]

Each measurement runs in a fresh process: hidden states ``[1, tokens, hidden]`` and an LM head
``hidden -> vocab`` (Qwen2-0.5B's sizes by default) are made, the process's resident set is
read, then one loss forward + backward runs and the peak resident set (``ru_maxrss``) above that
baseline is the loss step's peak. On the CPU this is the allocator's real high-water mark. The
two kernels alternate over ``--rounds`` so machine noise hits both; wall and CPU seconds are
printed beside the memory. Exits 1 when chunked's peak is above 1/8 of unfused's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(kernel: str, tokens: int, vocab: int, hidden: int, chunk: int, dtype: str) -> dict:
    import torch
    from torch import nn

    from mmscene.model.token_loss import summed_token_loss
    from mmscene.train.loss import token_loss_sum

    torch.manual_seed(0)
    torch.set_num_threads(1)
    dt = getattr(torch, dtype)
    head = nn.Linear(hidden, vocab, bias=False).to(dt)
    h = torch.randn(1, tokens, hidden, dtype=dt, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens))
    # warm up the kernels' own buffers (thread pools, oneDNN scratch) so they are not counted
    warm, _ = summed_token_loss(h[:, :8].detach().requires_grad_(), head, labels[:, :8], kernel="plain")
    warm.backward()
    head.zero_grad(set_to_none=True)
    base = _rss_kib()
    wall, cpu = time.perf_counter(), time.process_time()
    if kernel == "unfused":
        loss, _ = token_loss_sum(head(h), labels)
    else:
        loss, _ = summed_token_loss(h, head, labels, kernel="chunked", chunk_tokens=chunk)
    loss.backward()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "kernel": kernel,
        "peak_mib": (peak - base) / 1024,
        "wall_s": wall,
        "cpu_s": cpu,
        "loss": loss.item(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument(
        "--chunk", type=int, default=512, help="chunk_tokens of the chunked kernel (training's default)"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: measure this kernel
    args = p.parse_args()
    sizes = (args.tokens, args.vocab, args.hidden, args.chunk, args.dtype)
    if args.one:
        print(json.dumps(measure(args.one, *sizes)))
        return 0
    # glibc raises its mmap threshold as large blocks are freed, after which freed chunk buffers
    # stay in the heap and RSS counts memory the allocator already gave back: fix the threshold.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for r in range(args.rounds):
        for kernel in ("unfused", "chunked") if r % 2 == 0 else ("chunked", "unfused"):
            cmd = [sys.executable, __file__, "--one", kernel, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
                   "--hidden", str(args.hidden), "--chunk", str(args.chunk), "--dtype", args.dtype]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r}: {rows[-1]}", flush=True)
    by = {k: [row for row in rows if row["kernel"] == k] for k in ("unfused", "chunked")}
    peak = {k: max(row["peak_mib"] for row in v) for k, v in by.items()}
    ratio = peak["chunked"] / peak["unfused"]
    print(
        f"\nloss step, {args.tokens} tokens x vocab {args.vocab} (hidden {args.hidden}, {args.dtype}, chunk {args.chunk})"
    )
    for k, v in by.items():
        wall = min(row["wall_s"] for row in v)
        cpu = min(row["cpu_s"] for row in v)
        print(f"  {k:<8} peak {peak[k]:9.1f} MiB   wall {wall:7.2f} s   cpu {cpu:7.2f} s")
    same = abs(by["chunked"][0]["loss"] - by["unfused"][0]["loss"]) <= 1e-5 * abs(by["unfused"][0]["loss"])
    print(f"  chunked / unfused peak: {ratio:.3f} (target <= 0.125); losses equal: {same}")
    return 0 if ratio <= 0.125 and same else 1


if __name__ == "__main__":
    sys.exit(main())

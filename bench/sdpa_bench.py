#!/usr/bin/env python3
"""PyTorch scaled_dot_product_attention (flash backend) on the shapes of kvarn_cuda_bench, for comparison.

decode: q [B, Hq, 1, D] over contiguous fp16 K/V [B, Hkv, context, D] (enable_gqa); prefill: a causal chunk of
T tokens attending to itself, [1, Hq, T, D]. Decode: per call in a CUDA graph of 32 back-to-back calls (as in a
captured decode step, one call per layer), median of the replays timed after 0.5 s of the same replays (median_ms);
prefill: the same with single calls.
Several K/V copies are rotated when one is small enough to stay in L2. Writes CSV rows like kvarn_cuda_bench's.
Usage: sdpa_bench.py [--csv FILE] [--quick] [--prefill-only | --decode-only] [--batches 1,8] [--contexts 1024,8192]
    [--shapes llama3-8b,qwen3-32b]
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [("llama3-8b", 32, 8, 128), ("qwen3-32b", 64, 8, 128)]
SHAPE_NAMES = [s[0] for s in SHAPES]
# What a decode row needs beside its K/V (queries, output, the flash kernel's workspace): a row whose K/V does not
# fit in the free memory less this is skipped.
DECODE_HEADROOM = 2 << 30


def median_ms(fn, reps=20, sustain_ms=500.0):
    """The rate the GPU sustains, as kvarn_cuda_bench measures it: fn runs back to back (the next call queued
    behind the running one) for sustain_ms, then each call is timed for another sustain_ms and at least reps
    calls; the median, and the timed window's wall-clock bounds (seconds since the epoch), to be matched with a
    log of the SM clock. The H200 lowers its SM clock to hold its power cap within ~100 ms of heavy work."""
    events = [[torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True), False] for _ in range(2)]
    times = []

    def collect(slot):
        slot[1].synchronize()
        if slot[2]:
            times.append(slot[0].elapsed_time(slot[1]))

    begin = time.perf_counter()
    timing_since = window_begin = None
    i = 0
    while True:
        slot = events[i % 2]
        if i >= 2:
            collect(slot)
        now = (time.perf_counter() - begin) * 1e3
        if timing_since is None and i >= 3 and now >= sustain_ms:
            timing_since = now
            window_begin = time.time()
        if timing_since is not None and len(times) >= reps and now - timing_since >= sustain_ms:
            collect(events[(i + 1) % 2])
            break
        slot[0].record()
        fn(i)
        slot[1].record()
        slot[2] = timing_since is not None
        i += 1
    times.sort()
    return times[len(times) // 2], window_begin, time.time()


def graph_ms(fn, calls=32):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    ms, begin, end = median_ms(lambda i: graph.replay(), reps=10)
    return ms / calls, begin, end


def decode(rows, name, hq, hkv, d, batch, context):
    # As many tokens as kvarn_cuda_bench's rows of the context hold: context/128 - 1 full tiles and a 64-token tail.
    tokens = context - 64
    kv_bytes = 2 * batch * hkv * tokens * d * 2
    key = f"{name},sdpa_flash,{batch},{context}"
    free_bytes = torch.cuda.mem_get_info()[0]
    if kv_bytes + DECODE_HEADROOM > free_bytes:
        rows.append(f"decode,{key},skipped: {kv_bytes >> 30} GiB of K/V; {free_bytes >> 30} GiB free,,,,,,")
        return
    copies = max(1, min(256, (512 << 20) // kv_bytes + 1))  # as kvarn_cuda_bench's rotated_copies
    q = torch.randn(batch, hq, 1, d, device="cuda", dtype=torch.float16)
    kvs = [(torch.randn(batch, hkv, tokens, d, device="cuda", dtype=torch.float16),
            torch.randn(batch, hkv, tokens, d, device="cuda", dtype=torch.float16)) for _ in range(copies)]
    backend = "flash"
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, *kvs[0], enable_gqa=True)
        ctx = lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    except RuntimeError:  # timed still, under its own name: report.py compares our kernels with flash rows only
        backend = "default"
        key = f"{name},sdpa_default,{batch},{context}"
        ctx = lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    with ctx():
        # A multiple of the copies, as kvarn_cuda_bench's graphs: each read again only after all the others.
        ms, begin, end = graph_ms(lambda i: F.scaled_dot_product_attention(q, *kvs[i % copies], enable_gqa=True),
                                  calls=(32 + copies - 1) // copies * copies)
    bytes_read = kv_bytes + 2 * 2 * batch * hq * d
    flops = 4.0 * batch * hq * d * tokens
    rows.append(f"decode,{key},{ms * 1e3:.3f},{bytes_read},{bytes_read / ms / 1e6:.1f},{flops / ms / 1e9:.3f},{backend},"
                f"{begin:.3f},{end:.3f}")
    del kvs


def prefill(rows, name, hq, hkv, d, tokens):
    q = torch.randn(1, hq, tokens, d, device="cuda", dtype=torch.float16)
    k = torch.randn(1, hkv, tokens, d, device="cuda", dtype=torch.float16)
    v = torch.randn(1, hkv, tokens, d, device="cuda", dtype=torch.float16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ms, begin, end = median_ms(lambda i: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    flops = 4.0 * hq * d * tokens * tokens / 2  # causal: half of the score matrix
    rows.append(f"prefill,{name},sdpa_flash,1,{tokens},{ms * 1e3:.3f},,,{flops / ms / 1e9:.1f},,{begin:.3f},{end:.3f}")


def int_list(text):
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers separated by commas")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--csv")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--prefill-only", action="store_true", help="only the prefill rows, as kvarn_cuda_bench's")
    parser.add_argument("--decode-only", action="store_true", help="only the decode rows, as kvarn_cuda_bench's")
    parser.add_argument("--batches", type=int_list, default=[1, 8, 32, 128], help="decode batches, as kvarn_cuda_bench's")
    parser.add_argument("--contexts", type=int_list, default=[1024, 8192, 32768, 131072], help="decode contexts")
    parser.add_argument("--shapes", type=lambda text: text.split(","), default=SHAPE_NAMES,
                        help="attention shapes: " + ", ".join(SHAPE_NAMES))
    args = parser.parse_args()
    unknown = set(args.shapes) - set(SHAPE_NAMES)
    if unknown:
        parser.error(f"--shapes: unknown {', '.join(sorted(unknown))}; expected {', '.join(SHAPE_NAMES)}")
    print(f"# torch {torch.__version__} on {torch.cuda.get_device_name()}")
    rows = ["kind,shape,dtype,batch,context,time_us,bytes,GB_per_s,TFLOP_per_s,splits,window_begin,window_end"]
    batches = [] if args.prefill_only else [8] if args.quick else args.batches
    contexts = [8192] if args.quick else args.contexts
    for name, hq, hkv, d in SHAPES:
        if name not in args.shapes:
            continue
        for batch in batches:
            for context in contexts:
                decode(rows, name, hq, hkv, d, batch, context)
                torch.cuda.empty_cache()
        if not args.decode_only:
            for tokens in (2048, 8192):
                prefill(rows, name, hq, hkv, d, tokens)
    text = "\n".join(rows)
    print(text)
    if args.csv:
        with open(args.csv, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

"""``python tools/bench.py fusion --peer-shape opentslm``: both fusions at OpenTSLM's measured shape.

OpenTSLM (Langer et al. 2025, github.com/StanfordBDHG/OpenTSLM), its own code measured on a 2-core CPU with a
random Llama of 4 layers, hidden 256, intermediate 512, 4 heads, vocabulary 8,192, fp32, batch 1, one training
step (forward, backward, gradient clipping, AdamW), peak RSS minus RSS before the step (the figures of the
project's issue 17). Ours: the same LM shape and step, our 12-lead patch-transformer encoder (windowed
attention), MLP projector (soft prompt) or perceiver + gated cross-attention, each configuration in a fresh
process; step memory is the peak RSS over the RSS after warm-up.
"""

from __future__ import annotations

import subprocess
import sys

import bench

LM = {"num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
      "num_key_value_heads": 4, "vocab_size": 8192}
# (series, samples) -> OpenTSLM's step memory in GB (None: not run there; "killed"/"refused" as reported)
PEER = {
    (1, 1024): {"soft_prompt": 0.22, "cross_attention": None},
    (12, 1024): {"soft_prompt": 2.0, "cross_attention": 0.47},
    (1, 4096): {"soft_prompt": 0.6, "cross_attention": None},
    (8, 4096): {"soft_prompt": 9.4, "cross_attention": None},
    (12, 4096): {"soft_prompt": "killed above 20 GB", "cross_attention": 1.0},
    (12, 5000): {"soft_prompt": "refused (4,096-sample cap)", "cross_attention": "refused"},
    (12, 16384): {"soft_prompt": "-", "cross_attention": "-"},
    (12, 65536): {"soft_prompt": "-", "cross_attention": "-"},
}
PEER_SECONDS = {(8, 4096, "soft_prompt"): 34.0}
LABELS = {"soft_prompt": "soft prompt", "cross_attention": "cross-attention"}


def run(args) -> str:
    results = {}
    for precision in args.precisions:
        for (series, length) in PEER:
            for mode in ("soft_prompt", "cross_attention"):
                spec = {"mode": mode, "length": length, "channels": series, "patch_size": args.patch_size,
                        "encoder_layers": args.encoder_layers, "n_latents": args.n_latents, "window": args.window,
                        "max_time_tokens": args.max_time_tokens,
                        "batch_size": 1, "warmup": args.warmup, "steps": args.steps, "threads": args.threads,
                        "lm": LM, "precision": precision, "timeout": args.timeout}
                print(f"[bench fusion --peer-shape] {precision} {mode} {series} x {length}", file=sys.stderr,
                      flush=True)
                try:
                    results[precision, mode, series, length] = bench.fusion_run(spec)
                except subprocess.TimeoutExpired:
                    results[precision, mode, series, length] = f"over {args.timeout} s"
                except RuntimeError as err:
                    killed = "exit -9" in str(err) or "MemoryError" in str(err)
                    results[precision, mode, series, length] = "killed (memory)" if killed else "failed"
                    print(str(err)[-800:], file=sys.stderr)
    return report(args, results)


def _cell(result) -> str:
    return result if isinstance(result, str) else f"{result['step_mib'] / 1024:.3f} GB, {result['step_s']:.2f} s"


def report(args, results: dict) -> str:
    lines = [f"Ours: encoder `PatchTransformerEncoder(patch_size={args.patch_size}, d_model=64, "
             f"n_layers={args.encoder_layers}, window={args.window}, max_time_tokens={args.max_time_tokens})`; "
             f"perceiver {args.n_latents} latents (cross-attention); LM {LM}; batch 1; step = forward, backward, "
             f"clip to 1.0, AdamW; {args.threads} threads; median of {args.steps} steps after {args.warmup} warm-up; "
             "memory = peak RSS over the RSS after warm-up (each configuration in a fresh process).", ""]
    for precision in args.precisions:
        lines += [f"**{precision}**", "",
                  "| series x samples | OpenTSLM-SoftPrompt | ours soft prompt (step memory, s/step) | ratio "
                  "| OpenTSLM-Flamingo | ours cross-attention | ratio |", "|---|---:|---:|---:|---:|---:|---:|"]
        for (series, length), peer in PEER.items():
            row = [f"{series} x {length:,}"]
            for mode in ("soft_prompt", "cross_attention"):
                ours = results[precision, mode, series, length]
                theirs = peer[mode]
                seconds = PEER_SECONDS.get((series, length, mode))
                if theirs is None:
                    theirs_text = "—"
                elif isinstance(theirs, float):
                    theirs_text = f"{theirs} GB" + (f", {seconds:.0f} s/step" if seconds else "")
                else:
                    theirs_text = theirs
                ratio = f"{ours['step_mib'] / 1024 / theirs:.3f}x" if isinstance(theirs, float) and \
                    not isinstance(ours, str) else ""
                row += [theirs_text, _cell(ours), ratio]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        checks = []
        for series, length in ((8, 4096), (12, 4096)):
            ours = results[precision, "soft_prompt", series, length]
            peer = PEER[series, length]["soft_prompt"]
            limit = 0.25 * (peer if isinstance(peer, float) else 20.0)
            ok = not isinstance(ours, str) and ours["step_mib"] / 1024 <= limit
            checks.append(f"soft prompt at {series} x {length}: {_cell(ours)} against <= {limit:.2f} GB "
                          f"(0.25x {'OpenTSLM' if isinstance(peer, float) else 'the 20 GB it was killed above'}): "
                          f"{'pass' if ok else 'FAIL'}")
        first, last = results[precision, "cross_attention", 12, 1024], results[precision, "cross_attention", 12, 65536]
        if isinstance(first, str) or isinstance(last, str):
            checks.append(f"cross-attention 12 x 1,024 -> 12 x 65,536: {_cell(first)} -> {_cell(last)}: FAIL")
        else:
            growth = last["step_mib"] / max(first["step_mib"], 1e-9)
            verdict = "pass" if growth <= 1.5 else "FAIL"
            checks.append(f"cross-attention step memory 12 x 1,024 -> 12 x 65,536: {first['step_mib']:.0f} -> "
                          f"{last['step_mib']:.0f} MiB, x{growth:.2f} (target <= 1.5: {verdict})")
        ran = all(not isinstance(results[precision, m, 12, 5000], str) for m in ("soft_prompt", "cross_attention"))
        checks.append(f"both fusions run 12 x 5,000 (a 10-s 12-lead ECG at 500 Hz): {'pass' if ran else 'FAIL'}")
        lines += [f"Checks ({precision}):", *[f"- {c}" for c in checks], ""]
    lines.append("OpenTSLM figures: its own code on a 2-core CPU, as reported in this project's issue 17 "
                 "(same LM shape and step definition, peak RSS minus RSS before the step).")
    return "\n".join(lines)

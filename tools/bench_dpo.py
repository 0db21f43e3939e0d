"""Cost of a DPO step against a supervised step at the same shape (``python tools/bench.py dpo``).

One ECG-QA-shaped MultimodalLM (12-lead patch transformer, MLP projector, soft prompt into a random Llama of the
given shape), B questions. The supervised step is the answer loss, backward and AdamW over B rows; the DPO step
(:class:`mmclin.models.MMedPO`'s) runs the policy over B chosen + B rejected rows with backward, and the
reference over the same 2B rows without gradients: a frozen copy, or (LoRA) the policy with its adapters disabled.
Each configuration runs in a fresh process; step memory is the peak RSS over the settled RSS after warm-up.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from memory import peak_rss_mib, reset_peak_rss, status_mib  # noqa: E402

CASES = (("sft", "full"), ("dpo", "full"), ("sft", "lora"), ("dpo", "lora"))


def _model(spec: dict):
    from encoders.timeseries import PatchTransformerEncoder
    from mmclin.models import MultimodalLM

    lm = {"tiny": {"num_hidden_layers": spec["layers"], "hidden_size": spec["hidden"],
                   "intermediate_size": spec["intermediate"], "num_attention_heads": spec["heads"],
                   "num_key_value_heads": spec["heads"], "max_position_embeddings": 2048}}
    lm |= {"freeze": "all_but_lora", "lora": {"r": 8, "alpha": 16}} if spec["lm"] == "lora" else {"freeze": "none"}
    encoder = PatchTransformerEncoder(n_channels=12, patch_size=50, d_model=64, n_layers=2, n_heads=4)
    model = MultimodalLM({"series": encoder}, lm=lm)
    if spec["lm"] == "lora":
        model.encoders.requires_grad_(False)
        model.connectors.requires_grad_(False)
    return model


def child() -> None:
    """One configuration: prints a JSON line of step seconds and memory."""
    from mmclin.models.mmedpo import MMedPO
    from mmclin.preference.loss import weighted_dpo_loss

    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = _model(spec)
    copy_reference = spec["step"] == "dpo" and spec["lm"] == "full"
    reference = copy.deepcopy(model).requires_grad_(False).eval() if copy_reference else None
    g = torch.Generator().manual_seed(0)
    question = "Which rhythm does this ECG show?"
    samples = [{"series": [torch.randn(12, spec["length"], generator=g)], "question": question,
                "answer": "sinus rhythm", "choices": ["sinus rhythm", "atrial fibrillation"]}
               for _ in range(spec["batch_size"])]
    sft_batch = model.collator(samples)
    pair_batch = model.collator([{**s, "answer": a} for a in ("sinus rhythm", "atrial fibrillation") for s in samples])
    weights = torch.ones(spec["batch_size"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    n = spec["batch_size"]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        if spec["step"] == "sft":
            media = model.batch_media(sft_batch)
            loss = model.lm_forward(sft_batch["input_ids"], sft_batch["attention_mask"], media,
                                    sft_batch["labels"])[0].loss
        else:
            logp, _, _ = MMedPO.sequence_logps(model, pair_batch)
            module, context = (reference, nullcontext()) if reference is not None else \
                (model, model.lm.disable_adapter())
            with torch.no_grad(), context:
                ref, _, _ = MMedPO.sequence_logps(module, pair_batch)
            loss = weighted_dpo_loss(logp[:n], logp[n:], ref[:n], ref[n:], weights).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    seconds, settled = [], 0.0
    for i in range(spec["warmup"] + spec["steps"]):
        if i == spec["warmup"]:
            settled = status_mib("VmRSS")
            reset_peak_rss()
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters()) + (sum(p.numel() for p in reference.parameters())
                                                             if reference is not None else 0)
    print(json.dumps({"seconds": seconds[spec["warmup"]:], "settled_mib": settled, "peak_mib": peak_rss_mib(),
                      "params_held": params}))


def run(args) -> str:
    rows = []
    for step, lm in CASES:
        spec = {"step": step, "lm": lm, "layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
                "heads": args.heads, "length": args.length, "batch_size": args.batch_size, "warmup": args.warmup,
                "steps": args.steps, "threads": args.threads}
        print(f"[bench dpo] {step} {lm}", file=sys.stderr, flush=True)
        code = f"import sys; sys.path.insert(0, {str(ROOT / 'tools')!r}); import bench_dpo; bench_dpo.child()"
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": "131072"}
        done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], cwd=ROOT, env=env, capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise RuntimeError(f"bench dpo {step}/{lm} failed:\n{done.stderr[-2000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append((step, lm, statistics.median(result["seconds"]), result["peak_mib"] - result["settled_mib"],
                     result["params_held"]))
    base = {lm: (s, m) for step, lm, s, m, _ in rows if step == "sft"}
    lines = [f"One training step, B={args.batch_size} questions (DPO: B pairs), 12 x {args.length} samples, random "
             f"Llama {args.layers} layers x {args.hidden} (intermediate {args.intermediate}, {args.heads} heads), "
             f"fp32, {args.threads} threads, median of {args.steps} steps after {args.warmup} warm-up.", "",
             "| step | LM / reference | s/step | x SFT | step memory MiB | x SFT | parameters held |",
             "|---|---|---:|---:|---:|---:|---:|"]
    names = {("sft", "full"): "full fine-tune", ("dpo", "full"): "full, frozen reference copy",
             ("sft", "lora"): "LoRA r=8", ("dpo", "lora"): "LoRA, reference = adapters disabled"}
    for step, lm, s, m, params in rows:
        ref_s, ref_m = base["lora" if lm == "lora" else "full"]
        lines.append(f"| {step.upper()} | {names[step, lm]} | {s:.3f} | {s / ref_s:.2f} | {m:.0f} | "
                     f"{m / max(ref_m, 1e-9):.2f} | {params / 1e6:.2f} M |")
    return "\n".join(lines)

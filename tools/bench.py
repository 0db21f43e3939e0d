"""Training throughput benchmarks on this machine; each subcommand rewrites its own section of docs/benchmarks.md.

``clip``: steady-state training samples/s of ``CLIPModule`` under Lightning against open_clip's own trainer
(``open_clip_train.main``, shipped in the open_clip_torch wheel) on the same model config, batch, precision,
thread count and in-memory data, with model FLOP utilisation against a measured matmul peak.

Examples:
    python tools/bench.py clip                              # both precisions, writes docs/benchmarks.md
    python tools/bench.py clip --precisions 32-true --steps 5 --no-write
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from memory import peak_rss_mib, reset_peak_rss, status_mib
from open_clip.loss import ClipLoss
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset, default_collate
from torch.utils.flop_counter import FlopCounterMode

from mmclin.errors import run_entry_point
from mmclin.models.clip import CLIPModule

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
DOCS_HEADER = ("# Benchmarks\n\nMeasured with `tools/bench.py`; `python tools/bench.py <section>` rewrites only "
               "its own `## <section>` below.\n")
# Our precision -> open_clip_train's name for the same arithmetic (open_clip_train/precision.py).
OPEN_CLIP_PRECISION = {"32-true": "fp32", "bf16-mixed": "amp_bf16"}
# The "CPU default" row compares with fp32, as the issue asks: open_clip_train's literal default `amp` is fp16
# autocast, which a CPU without fp16 units runs emulated, far slower than fp32.
OPEN_CLIP_DEFAULT = "32-true"
# Per-step rate in train.py's log line; "Batch (t)" has 1 ms resolution, the rate 6 significant digits.
STEP_RATE = re.compile(r"Batch \(t\): [\d.]+, ([\d.]+)/s,")


# -- shared by all subcommands ---------------------------------------------------------------------------
def cpu_has_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def machine_line(threads: int) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {threads} threads; torch {torch.__version__}, "
            f"bf16 units: {'yes' if cpu_has_bf16() else 'no'}; {datetime.date.today().isoformat()}")


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (2048, 4096), reps: int = 4) -> float:
    """Best single square-matmul FLOP/s over `sizes` and `reps`: the attainable peak that MFU is measured against
    (best rather than mean, so another process's burst cannot lower the peak and inflate MFU)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # first call packs weights and warms oneDNN's kernel cache
        for _ in range(reps):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, hypervisor steal included; CPU seconds of this process and
    its finished children). Their difference over a run is what other processes took from it."""
    jiffies = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = sum(jiffies) - jiffies[3] - jiffies[4]  # all but idle and iowait
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system + own.children_user + own.children_system


def with_foreign_load(run: Callable[[], list[float]]) -> tuple[list[float], float]:
    """`run()`'s result and the CPUs other processes kept busy meanwhile, on average over its wall time."""
    (busy0, own0), start = cpu_seconds(), time.perf_counter()
    result = run()
    (busy1, own1), wall = cpu_seconds(), time.perf_counter() - start
    return result, max(0.0, (busy1 - busy0) - (own1 - own0)) / wall


def steady_samples_per_s(step_seconds: list[float], warmup: int, batch_size: int) -> float:
    """Batch / median step time after `warmup` steps; the median shrugs off other processes' bursts on a shared CPU."""
    steady = step_seconds[warmup:]
    if not steady:
        raise ValueError(f"no steps left after {warmup} warm-up steps (got {len(step_seconds)})")
    return batch_size / statistics.median(steady)


def write_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the ``## name`` section of a markdown file, keeping the other sections as they are."""
    text = path.read_text() if path.is_file() else DOCS_HEADER
    parts = re.split(r"(?m)^(?=## )", text)
    section = f"## {name}\n\n{body.strip()}\n\n"
    index = next((i for i, p in enumerate(parts) if p.startswith(f"## {name}\n")), None)
    if index is None:
        parts[-1] = parts[-1].rstrip() + "\n\n"
        parts.append(section)
    else:
        parts[index] = section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts).rstrip() + "\n")


# -- clip -------------------------------------------------------------------------------------------------
class RandomPairs(Dataset):
    """Random images and token ids held in memory, so data loading costs neither trainer anything."""

    def __init__(self, n: int, image_size: int, context_length: int, vocab_size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, image_size, image_size, generator=g)
        self.texts = torch.randint(0, vocab_size, (n, context_length), generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "text": self.texts[i]}


def random_pairs_loader(model_config: dict, batch_size: int, n_batches: int, as_tuple: bool = False) -> DataLoader:
    """In-process loader of `n_batches` full batches; `as_tuple` gives open_clip_train's (images, texts) batches."""
    vision, text = model_config["vision_cfg"], model_config["text_cfg"]
    data = RandomPairs(batch_size * n_batches, vision["image_size"], text["context_length"], text["vocab_size"])
    collate = (lambda items: tuple(default_collate(items).values())) if as_tuple else None
    return DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=0, drop_last=True, collate_fn=collate)


class StepTimer(L.Callback):
    """Wall time of every training step, end of one optimizer step to the end of the next, as open_clip_train."""

    def __init__(self):
        self.ends: list[float] = []
        self.threads = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.ends:
            self.ends.append(time.perf_counter())
            self.threads = torch.get_num_threads()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.ends, self.ends[1:])]


def lightning_step_seconds(model_args: dict, precision: str, batch_size: int, n_steps: int,
                           threads: int) -> list[float]:
    """Fit CLIPModule for `n_steps` under Lightning on in-memory data; per-step wall seconds."""
    module = CLIPModule(**model_args)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=n_steps, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer], default_root_dir=root)
        trainer.fit(module, train_dataloaders=random_pairs_loader(model_args["model_config"], batch_size, n_steps))
    if timer.threads != threads:
        raise RuntimeError(f"Lightning ran with {timer.threads} threads, expected {threads}")
    return timer.step_seconds()


def open_clip_train_step_seconds(spec: dict) -> list[float]:
    """Run open_clip_train.main in a fresh process (it configures root logging and seeds); per-step wall seconds."""
    tools_dir = str(Path(__file__).parent)
    code = f"import sys; sys.path.insert(0, {tools_dir!r}); import bench; bench.open_clip_train_child()"
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    with tempfile.TemporaryDirectory() as logs:
        done = subprocess.run([sys.executable, "-c", code, json.dumps({**spec, "logs": logs})], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        log_file = Path(logs) / "bench" / "out.log"
        if done.returncode != 0 or not log_file.is_file():
            raise RuntimeError(f"open_clip_train failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        rates = STEP_RATE.findall(log_file.read_text())
    return [spec["batch_size"] / float(rate) for rate in rates]


def open_clip_train_child() -> None:
    """Child-process side: open_clip_train.main on our config, with --dataset-type synthetic fed our in-memory data."""
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    import open_clip_train.data as oct_data
    from open_clip_train.main import main

    from mmclin.models.open_clip_build import register_inline_config

    def in_memory_dataset(args, preprocess_fn, is_train, epoch=0, tokenizer=None):
        # Stock SyntheticDataset runs PIL transforms and the tokenizer per sample on one black image and one caption
        # (a degenerate contrastive batch); our tensors keep the comparison about the trainers alone.
        loader = random_pairs_loader(spec["model_config"], args.batch_size, spec["steps"], as_tuple=True)
        loader.num_samples, loader.num_batches = len(loader.dataset), len(loader)
        return oct_data.DataInfo(loader)

    oct_data.get_synthetic_dataset = in_memory_dataset
    h = spec["hparams"]
    main(["--model", register_inline_config(spec["model_config"]), "--dataset-type", "synthetic",
          "--train-num-samples", str(spec["batch_size"] * spec["steps"]), "--batch-size", str(spec["batch_size"]),
          "--epochs", "1", "--precision", spec["precision"], "--workers", "0", "--device", "cpu",
          "--lr", str(h["lr"]), "--wd", str(h["weight_decay"]), "--beta1", str(h["betas"][0]),
          "--beta2", str(h["betas"][1]), "--eps", str(h["eps"]), "--warmup", "0", "--log-every-n-steps", "1",
          "--logs", spec["logs"], "--name", "bench", "--report-to", "", "--save-frequency", "0",
          "--zeroshot-frequency", "0", "--val-frequency", "0"])


def clip_train_flops_per_sample(model_args: dict, batch_size: int) -> float:
    """FLOPs of one forward + backward (loss included) per sample; math attention so SDPA's matmuls are counted."""
    model = CLIPModule(**model_args).model
    cfg = model_args["model_config"]
    images = torch.randn(batch_size, 3, cfg["vision_cfg"]["image_size"], cfg["vision_cfg"]["image_size"])
    texts = torch.randint(0, cfg["text_cfg"]["vocab_size"], (batch_size, cfg["text_cfg"]["context_length"]))
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel([SDPBackend.MATH]):
        out = model(images, texts)
        ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"]).backward()
    return counter.get_total_flops() / batch_size


def clip_rates(args: argparse.Namespace, model_args: dict, hparams: dict) -> tuple[dict, float]:
    """Steady samples/s per (side, precision): best of `args.rounds` rounds, the two sides in alternating order, so
    a burst from another process on a shared CPU costs one side one round rather than the comparison; and the
    largest foreign CPU load any run saw."""
    n_steps = args.warmup + args.steps
    rates: dict[tuple[str, str], float] = {}
    worst_foreign = 0.0
    for precision in args.precisions:
        spec = {"model_config": model_args["model_config"], "precision": OPEN_CLIP_PRECISION[precision],
                "hparams": {k: hparams[k] for k in ("lr", "weight_decay", "betas", "eps")},
                "batch_size": args.batch_size, "steps": n_steps, "threads": args.threads}
        runs = {"ours": lambda: lightning_step_seconds(model_args, precision, args.batch_size, n_steps, args.threads),
                "open_clip_train": lambda: open_clip_train_step_seconds(spec)}
        for round_ in range(args.rounds):
            for side in sorted(runs, reverse=bool(round_ % 2)):
                print(f"[bench clip] {side} {precision} round {round_ + 1}/{args.rounds}", file=sys.stderr, flush=True)
                seconds, foreign = with_foreign_load(runs[side])
                if foreign > 0.1:
                    print(f"[bench clip] other processes kept {foreign:.2f} CPUs busy meanwhile", file=sys.stderr)
                worst_foreign = max(worst_foreign, foreign)
                rate = steady_samples_per_s(seconds, args.warmup, args.batch_size)
                rates[side, precision] = max(rate, rates.get((side, precision), 0.0))
    return rates, worst_foreign


def run_clip(args: argparse.Namespace) -> str:
    config = yaml.safe_load(Path(args.config).read_text())
    model_args = dict(config["model"]["init_args"])
    rates, foreign = clip_rates(args, model_args, CLIPModule(**model_args).hparams)
    print("[bench clip] FLOP count and matmul peaks", file=sys.stderr, flush=True)
    flops = clip_train_flops_per_sample(model_args, args.batch_size)
    peaks = {"32-true": matmul_peak(torch.float32), "bf16-mixed": matmul_peak(torch.bfloat16)}
    ours_default = config["trainer"].get("precision", "32-true") if cpu_has_bf16() else "32-true"
    return clip_report(args, rates, flops, peaks, ours_default, foreign)


def clip_report(args: argparse.Namespace, rates: dict, flops: float, peaks: dict, ours_default: str,
                foreign: float) -> str:
    """Markdown: the comparison table, then how it was measured."""
    rows = [(p, p) for p in args.precisions]
    measured = {("ours", ours_default), ("open_clip_train", OPEN_CLIP_DEFAULT)} <= rates.keys()
    if ours_default != OPEN_CLIP_DEFAULT and measured:
        rows.append((ours_default, OPEN_CLIP_DEFAULT))
    lines = ["| run | ours (Lightning) samples/s | open_clip_train samples/s | ratio | ours MFU | their MFU |",
             "|---|---:|---:|---:|---:|---:|"]
    for ours, theirs in rows:
        a, b = rates["ours", ours], rates["open_clip_train", theirs]
        label = f"{ours} vs {OPEN_CLIP_PRECISION[theirs]}" + (" (our CPU default)" if ours != theirs else "")
        lines.append(f"| {label} | {a:.1f} | {b:.1f} | {a / b:.2f} | {a * flops / peaks[ours]:.1%} "
                     f"| {b * flops / peaks[theirs]:.1%} |")
    peak_text = ", ".join(f"{p}: {peaks[p] / 1e9:.0f} GFLOP/s" for p in peaks)
    return "\n".join(lines) + f"""

- Machine: {machine_line(args.threads)}; other processes kept at most {foreign:.2f} CPUs busy during a run.
- Model: `model.init_args.model_config` of `{os.path.relpath(args.config, ROOT)}`; batch {args.batch_size}; \
{args.warmup} warm-up + {args.steps} measured steps per run, best of {args.rounds} rounds in alternating order; \
both sides `torch.set_num_threads({args.threads})`.
- Data: the same random images and token ids, in memory, `num_workers=0`, on both sides (open_clip_train's \
`--dataset-type synthetic` is pointed at them).
- samples/s: batch / median wall time from the end of one optimizer step to the end of the next (data fetch, \
optimizer, scheduler and logging included), after the warm-up steps. open_clip_train: the per-step rate it \
logs at `--log-every-n-steps 1`; ours: a Lightning callback.
- MFU: samples/s x {flops / 1e9:.2f} GFLOP per sample (forward + backward with loss, `FlopCounterMode`) / the \
best measured square-matmul rate of the run's compute dtype ({peak_text}); bf16-mixed rows use the bf16 peak.
- Attention: ours as configured (`sdpa_backend="auto"`: the math kernel under bf16 on CPU), open_clip_train \
with PyTorch's default kernel choice.
- Ratio > 1: ours is faster. The last row sets our CPU default against open_clip_train in fp32; its literal \
`--precision` default, `amp` (fp16 autocast), is emulated on CPUs without fp16 units and far slower.
- Reproduce: `python tools/bench.py clip`.
"""


# -- fusion -----------------------------------------------------------------------------------------------
# What each fusion run trains: "encoder" is the series encoder alone (a mean of its tokens as the loss), the
# part both LM modes share, so that their difference from it is what the fusion itself costs.
FUSION_MODES = ("soft_prompt", "cross_attention", "encoder")
FUSION_LABELS = {"soft_prompt": "soft prompt + MLP projector", "cross_attention": "cross-attention + perceiver",
                 "encoder": "encoder alone"}
N_LEADS = 12


def fusion_model(spec: dict) -> torch.nn.Module:
    """The spec's MultimodalLM (or bare encoder): tiny LM, one 12-lead patch-transformer encoder."""
    from encoders.timeseries import PatchTransformerEncoder
    from mmclin.fusion import CrossAttentionFusion, MLPProjector, PerceiverResampler, SoftPromptFusion
    from mmclin.models import MultimodalLM

    channels = spec.get("channels", N_LEADS)
    encoder = PatchTransformerEncoder(n_channels=channels, patch_size=spec["patch_size"], d_model=64,
                                      n_layers=spec["encoder_layers"], n_heads=4, window=spec.get("window"),
                                      max_time_tokens=spec.get("max_time_tokens"))
    if spec["mode"] == "encoder":
        return encoder
    connector = MLPProjector if spec["mode"] == "soft_prompt" else \
        (lambda d_in, d_out: PerceiverResampler(d_in, d_out, n_latents=spec["n_latents"], depth=1))
    # The soft prompt puts every encoder token into the LM sequence: room for channels x L / patch of them.
    positions = max(4096, channels * spec["length"] // spec["patch_size"] + 256)
    shape = spec.get("lm") or {"hidden_size": 64, "intermediate_size": 128}
    fusion = {"soft_prompt": SoftPromptFusion, "cross_attention": CrossAttentionFusion}[spec["mode"]]()
    return MultimodalLM(encoders={"series": encoder}, connector=connector, fusion=fusion,
                        lm={"tiny": {**shape, "max_position_embeddings": positions}, "freeze": "none"})


def fusion_child() -> None:
    """Child-process side: build one (mode, length) model, then time training steps and record peak memory.

    Prints one JSON line: RSS after the warm-up steps, peak RSS over the measured steps (VmHWM reset after the
    warm-up, so import, build and first-step transients do not count), per-step seconds and the LM sequence length.
    """
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = fusion_model(spec)
    series = torch.randn(spec["batch_size"], spec.get("channels", N_LEADS), spec["length"])
    if spec["mode"] == "encoder":
        batch = {"series": series}

        def loss_of(batch: dict) -> torch.Tensor:
            return model(batch["series"]).tokens.mean()
    else:
        samples = [{"series": [x], "question": "Which rhythm does this ECG show?", "answer": "sinus rhythm",
                    "choices": ["sinus rhythm", "atrial fibrillation"]} for x in series]
        batch = model.collator(samples)

        def loss_of(batch: dict) -> torch.Tensor:
            # training_step's loss without its self.log, which needs a trainer
            media = model.batch_media(batch)
            return model.lm_forward(batch["input_ids"], batch["attention_mask"], media, batch["labels"])[0].loss
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lm_tokens = 0
    if spec["mode"] != "encoder":
        with torch.no_grad():
            media_tokens = model.batch_media(batch)[0].shape[-2]
        lm_tokens = batch["input_ids"].shape[1] + (media_tokens - 1 if spec["mode"] == "soft_prompt" else 0)
    del series
    seconds, settled = [], 0.0
    for step in range(spec["warmup"] + spec["steps"]):
        if step == spec["warmup"]:
            # Warm-up done: optimizer state, gradients and the runtime's one-off buffers are resident.
            settled = status_mib("VmRSS")
            reset_peak_rss()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=spec.get("precision") == "bf16-mixed"):
            loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the peer's step: clip, then AdamW
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"settled_mib": settled, "peak_mib": peak_rss_mib(), "seconds": seconds, "lm_tokens": lm_tokens,
                      "encoder_tokens": spec.get("channels", N_LEADS) * spec["length"] // spec["patch_size"]}))


def fusion_run(spec: dict) -> dict:
    """One (mode, length) measurement in a fresh process, so peaks never carry over between configurations."""
    tools_dir = str(Path(__file__).parent)
    code = f"import sys; sys.path.insert(0, {tools_dir!r}); import bench; bench.fusion_child()"
    # A fixed mmap threshold stops glibc from raising it after large frees, so every large activation is its
    # own mapping, returned on free: RSS then follows the live tensors rather than malloc's caching.
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=spec.get("timeout"))
    if done.returncode != 0:
        raise RuntimeError(f"fusion run {spec['mode']} L={spec['length']} failed (exit {done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    steady = result["seconds"][spec["warmup"]:]
    return {**result, "step_s": statistics.median(steady), "step_mib": result["peak_mib"] - result["settled_mib"]}


def run_fusion(args: argparse.Namespace) -> str:
    if args.peer_shape:
        import bench_peer

        args.window = args.window or 32
        args.max_time_tokens = args.max_time_tokens or 64
        return bench_peer.run(args)
    results: dict[tuple[str, int], dict] = {}
    worst_foreign = 0.0
    for length in args.lengths:
        for mode in FUSION_MODES:
            spec = {"mode": mode, "length": length, "patch_size": args.patch_size, "window": args.window,
                    "encoder_layers": args.encoder_layers, "n_latents": args.n_latents,
                    "batch_size": args.batch_size, "warmup": args.warmup, "steps": args.steps, "threads": args.threads}
            print(f"[bench fusion] {mode} L={length}", file=sys.stderr, flush=True)
            (result,), foreign = with_foreign_load(lambda: [fusion_run(spec)])
            if foreign > 0.1:
                print(f"[bench fusion] other processes kept {foreign:.2f} CPUs busy meanwhile", file=sys.stderr)
            worst_foreign = max(worst_foreign, foreign)
            print(f"[bench fusion]   peak {result['peak_mib']:.0f} MiB (+{result['step_mib']:.0f}), "
                  f"{result['step_s']:.2f} s/step", file=sys.stderr, flush=True)
            results[mode, length] = result
    if not args.no_write:
        fusion_plot(results, args.lengths, ROOT / "docs" / "fusion_memory.png")
    return fusion_report(args, results, worst_foreign)


def fusion_plot(results: dict, lengths: list[int], path: Path) -> None:
    """Step memory (peak over the settled RSS) and step time against series length, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, sec) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in FUSION_MODES:
        style = {"marker": "o", "label": FUSION_LABELS[mode]}
        if mode == "encoder":  # the shared part, drawn as a reference
            style.update(linestyle=":", color="grey")
        mem.plot(lengths, [results[mode, n]["step_mib"] for n in lengths], **style)
        sec.plot(lengths, [results[mode, n]["step_s"] for n in lengths], **style)
    for ax, label in ((mem, "training-step memory: peak RSS - settled RSS (MiB)"), (sec, "s / training step")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, [f"{n // 1024}k" for n in lengths])
        ax.set_xlabel(f"series length L (samples, {N_LEADS} leads)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    mem.legend()
    fig.suptitle("Fusion cost, tiny LM (fp32, CPU, batch 1)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fusion_report(args: argparse.Namespace, results: dict, foreign: float) -> str:
    """Markdown: the table, then the two checks of the issue, then how it was measured."""
    first, last = args.lengths[0], args.lengths[-1]
    lines = ["| L (samples) | encoder tokens | soft-prompt LM tokens | soft prompt peak MiB (+step) "
             "| soft prompt s/step | xattn peak MiB (+step) | xattn s/step | encoder alone peak MiB (+step) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in args.lengths:
        sp, xa, enc = (results[m, n] for m in FUSION_MODES)
        lines.append(f"| {n} | {sp['encoder_tokens']} | {sp['lm_tokens']} | {sp['peak_mib']:.0f} "
                     f"(+{sp['step_mib']:.0f}) | {sp['step_s']:.3f} | {xa['peak_mib']:.0f} (+{xa['step_mib']:.0f}) "
                     f"| {xa['step_s']:.3f} | {enc['peak_mib']:.0f} (+{enc['step_mib']:.0f}) |")

    def ratio(mode: str, key: str) -> float:
        return results[mode, last][key] / results[mode, first][key]

    def fusion_only(mode: str, n: int) -> float:
        return results[mode, n]["step_mib"] - results["encoder", n]["step_mib"]

    prev = args.lengths[-2] if len(args.lengths) > 1 else first
    sp_tokens = ratio("soft_prompt", "lm_tokens")
    sp_step = ratio("soft_prompt", "step_mib")
    # Linearity where the step memory is well above the noise: the last two lengths.
    sp_pair_tokens = results["soft_prompt", last]["lm_tokens"] / results["soft_prompt", prev]["lm_tokens"]
    sp_pair_step = results["soft_prompt", last]["step_mib"] / results["soft_prompt", prev]["step_mib"]
    xa_peak, xa_step = ratio("cross_attention", "peak_mib"), ratio("cross_attention", "step_mib")
    verdict = {True: "pass", False: "FAIL"}
    runtime_gib = min(r["settled_mib"] for r in results.values()) / 1024
    eager_mib = args.batch_size * 4 * results["soft_prompt", last]["lm_tokens"] ** 2 * 4 / 2**20
    sp_verdict = ("at most linear in its token count (SDPA, no eager attention matrix): pass"
                  if sp_pair_step <= 1.1 * sp_pair_tokens else "faster than its token count: FAIL")
    return "\n".join(lines) + f"""

![peak step memory and step time against series length](fusion_memory.png)

Checks, {last} against {first} samples:
- Cross-attention peak memory (whole process): x{xa_peak:.2f} (target <= 1.5: {verdict[xa_peak <= 1.5]}). Its \
+step grows x{xa_step:.2f}, from {results["cross_attention", first]["step_mib"]:.0f} to \
{results["cross_attention", last]["step_mib"]:.0f} MiB; the encoder alone adds \
{results["encoder", first]["step_mib"]:.0f} -> {results["encoder", last]["step_mib"]:.0f} MiB, so the fusion itself \
(xattn - encoder alone) goes {fusion_only("cross_attention", first):.0f} -> {fusion_only("cross_attention", last):.0f} \
MiB: the perceiver hands the LM {args.n_latents} tokens at every length.
- Soft prompt: LM tokens x{sp_tokens:.1f}, +step x{sp_step:.1f} (at {first} the +step is a few MiB, near the \
resolution of RSS); the fusion itself (soft prompt - encoder alone) \
{fusion_only("soft_prompt", first):.0f} -> {fusion_only("soft_prompt", last):.0f} MiB. From {prev} to {last}: \
tokens x{sp_pair_tokens:.2f}, +step x{sp_pair_step:.2f}, {sp_verdict}. (Eager fp32 attention, 4 heads, would hold \
{eager_mib:.0f} MiB of attention probabilities per layer at \
{last}.)

- Machine: {machine_line(args.threads)}; other processes kept at most {foreign:.2f} CPUs busy during a run.
- Models: `MultimodalLM`, tiny Llama (hidden 64, intermediate 128, 2 layers, SDPA attention, every parameter \
trained), fp32; encoder `PatchTransformerEncoder(n_channels={N_LEADS}, patch_size={args.patch_size}, d_model=64, \
n_layers={args.encoder_layers}, n_heads=4)`, so {N_LEADS} x L / {args.patch_size} encoder tokens. Soft prompt: \
`MLPProjector`, every encoder token enters the LM sequence (OpenTSLM-SoftPrompt); cross-attention: \
`PerceiverResampler(n_latents={args.n_latents}, depth=1)` and a gated cross-attention block before every decoder \
layer (OpenTSLM-Flamingo). "Encoder alone": the same encoder trained on the mean of its tokens.
- A step: forward, backward and AdamW on batch {args.batch_size} (one random {N_LEADS}-lead series, one \
question and answer); s/step is the median of {args.steps} steps after {args.warmup} warm-up.
- Memory: each configuration in a fresh process; peak = the process's peak RSS over the measured steps (VmHWM, \
reset after the warm-up), +step = peak minus the RSS after the warm-up (model, gradients, AdamW state and the \
runtime's one-off buffers already resident), i.e. what a step's activations add. glibc's mmap threshold is pinned \
(`MALLOC_MMAP_THRESHOLD_=131072`) so freed activations leave RSS. The whole-process peak carries \
>= {runtime_gib:.1f} GiB of PyTorch/transformers runtime, which flattens any ratio of peaks; the +step \
column is the honest one.
- Scale: OpenTSLM reports ~110 GB (soft prompt) against ~40 GB (Flamingo) on ECG-QA with a 3B LM; the same \
shape here at MiB scale.
- Reproduce: `python tools/bench.py fusion` (writes this section and `docs/fusion_memory.png`).
"""


def fundus_rates(paths: list[Path], size: int, rounds: int = 2) -> list[dict]:
    """Images/s of mmclin's fundus preprocessing (reduced-scale JPEG decode, border crop, resize) against decoding
    the full photograph and resizing it with torchvision, on the same files; best of `rounds` passes."""
    from PIL import Image
    from torchvision.transforms import v2

    from datamodules.fundus import preprocess_fundus

    full = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size),
                       v2.ToDtype(torch.float32, scale=True)])

    def naive(path: Path) -> torch.Tensor:
        with Image.open(path) as image:
            return full(image.convert("RGB"))

    rows = []
    for name, run in (("mmclin preprocess_fundus (draft decode + border crop)", lambda p: preprocess_fundus(p, size)),
                      ("full decode + torchvision resize", naive)):
        best = min(timed(lambda: [run(p) for p in paths]) for _ in range(rounds))
        rows.append({"measure": name, "n": len(paths), "seconds": best, "per_s": len(paths) / best})
    return rows


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def run_ct(args: argparse.Namespace) -> str:
    """CT loading (first vs cached pass), 3D encoder memory (tools/bench_ct.py), and fundus preprocessing rate."""
    import bench_ct

    print("[bench ct] CT volumes: first pass, cached pass, encoder step", file=sys.stderr, flush=True)
    rows, ct_text = bench_ct.run(args.ct_args)
    first, again = rows[0], rows[1]  # bench_ct's order: uncached pass, cached pass, encoder step
    speedup = f"- Cached pass: x{again['per_s'] / first['per_s']:.1f} the volumes/s of the first pass.\n"
    photos = sorted(Path(args.fundus_dir).glob("**/*.jpg"))
    if photos:
        print(f"[bench ct] fundus preprocessing, {len(photos)} photographs", file=sys.stderr, flush=True)
        from PIL import Image

        with Image.open(photos[0]) as image:
            resolution = "x".join(map(str, image.size))
        fundus = (f"Fundus preprocessing to {args.fundus_size} px, {len(photos)} photographs at {resolution} "
                  f"({Path(args.fundus_dir).name}), one process, {torch.get_num_threads()} threads:\n\n"
                  + "| measure | images | seconds | images/s |\n|---|---:|---:|---:|\n"
                  + "\n".join(f"| {r['measure']} | {r['n']} | {r['seconds']:.2f} | {r['per_s']:.1f} |"
                              for r in fundus_rates(photos, args.fundus_size)))
    else:
        fundus = f"Fundus preprocessing: no photographs under {args.fundus_dir}; skipped."
    return f"""{machine_line(torch.get_num_threads())}

{ct_text}
{speedup}
{fundus}

- Reproduce: `python tools/bench.py ct [--ct-args ...]` (tools/bench_ct.py's options, e.g. volumes to load).
"""


def run_dpo(args: argparse.Namespace) -> str:
    import bench_dpo

    return bench_dpo.run(args)


def run_derm_data(args: argparse.Namespace) -> str:
    import bench_derm

    return bench_derm.run(args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    clip = sub.add_parser("clip", help="CLIPModule under Lightning vs open_clip_train")
    clip.add_argument("--config", default=str(ROOT / "configs" / "derm-clip.yaml"), help="LightningCLI config")
    clip.add_argument("--batch-size", type=int, default=128)
    clip.add_argument("--warmup", type=int, default=3, help="steps run before timing starts")
    clip.add_argument("--steps", type=int, default=10, help="measured steps per run")
    clip.add_argument("--rounds", type=int, default=2, help="runs per side; the best counts")
    clip.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for every run")
    clip.add_argument("--precisions", nargs="+", choices=list(OPEN_CLIP_PRECISION),
                      default=["32-true", "bf16-mixed"] if cpu_has_bf16() else ["32-true"])
    clip.add_argument("--no-write", action="store_true", help="print the table only; leave docs/benchmarks.md be")
    fusion = sub.add_parser("fusion", help="peak memory and step time of soft prompt vs cross-attention over L")
    fusion.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536],
                        help="series lengths in samples (12 leads each)")
    fusion.add_argument("--patch-size", type=int, default=64, help="encoder patch: tokens = 12 x L / patch")
    fusion.add_argument("--encoder-layers", type=int, default=1, help="transformer blocks in the series encoder")
    fusion.add_argument("--n-latents", type=int, default=32, help="perceiver latents (cross-attention media tokens)")
    fusion.add_argument("--batch-size", type=int, default=1)
    fusion.add_argument("--warmup", type=int, default=1, help="steps run before timing starts")
    fusion.add_argument("--steps", type=int, default=3, help="measured steps per configuration")
    fusion.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for every run")
    fusion.add_argument("--no-write", action="store_true",
                        help="print the table only; leave docs/benchmarks.md and the plot be")
    fusion.add_argument("--peer-shape", choices=["opentslm"],
                        help="the grid of OpenTSLM's measurements at its LM shape, with the ratios (bench_peer.py)")
    fusion.add_argument("--window", type=int, default=None,
                        help="encoder attention window in time patches (default: none; the peer preset uses 32)")
    fusion.add_argument("--max-time-tokens", type=int, default=None,
                        help="encoder: pool each lead's patches to at most this many tokens (peer preset: 64)")
    fusion.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"],
                        help="peer preset: precisions to run")
    fusion.add_argument("--timeout", type=int, default=300, help="peer preset: seconds per configuration")
    dpo = sub.add_parser("dpo", help="a DPO step (MMedPO) against a supervised step: time and memory")
    dpo.add_argument("--layers", type=int, default=4)
    dpo.add_argument("--hidden", type=int, default=256)
    dpo.add_argument("--intermediate", type=int, default=512)
    dpo.add_argument("--heads", type=int, default=4)
    dpo.add_argument("--length", type=int, default=1000, help="samples per lead (12 leads)")
    dpo.add_argument("--batch-size", type=int, default=4)
    dpo.add_argument("--warmup", type=int, default=2)
    dpo.add_argument("--steps", type=int, default=5)
    dpo.add_argument("--threads", type=int, default=os.cpu_count())
    dpo.add_argument("--no-write", action="store_true", help="print the table only; leave docs/benchmarks.md be")
    ct = sub.add_parser("ct", help="CT loading first vs cached pass, 3D encoder memory, fundus preprocessing rate")
    ct.add_argument("--ct-args", nargs=argparse.REMAINDER, default=[],
                    help="arguments for tools/bench_ct.py (volumes, --grid, --spacing ...); put it last")
    ct.add_argument("--fundus-dir", default=str(ROOT.parent / "shared" / "data" / "fundus_idrid_codras"),
                    help="full-resolution fundus JPEGs (default: the IDRiD sample beside the project)")
    ct.add_argument("--fundus-size", type=int, default=224)
    ct.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    ct.add_argument("--no-write", action="store_true", help="print the table only; leave docs/benchmarks.md be")
    derm = sub.add_parser("derm-data", help="HAM10000 derm CLIP: loader rate against training-step rate")
    derm.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "ham10000_200x150"),
                      help="the HAM10000 folder (HAM10000_metadata.csv + images/)")
    derm.add_argument("--batches", type=int, default=10, help="timed batches per rate")
    derm.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    derm.add_argument("--no-write", action="store_true", help="print the table only; leave docs/benchmarks.md be")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=PossibleUserWarning)  # "few dataloader workers": in-memory on purpose
    started = time.perf_counter()
    report = {"clip": run_clip, "fusion": run_fusion, "ct": run_ct, "dpo": run_dpo,
              "derm-data": run_derm_data}[args.command](args)
    print(report)
    print(f"[bench] {args.command}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if not args.no_write:
        section = args.command + (f" --peer-shape {args.peer_shape}" if getattr(args, "peer_shape", None) else "")
        write_section(DOCS, section, report)
        print(f"[bench] wrote the '## {section}' section of {DOCS.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    run_entry_point(main)

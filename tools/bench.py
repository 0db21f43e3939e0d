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
from open_clip.loss import ClipLoss
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset, default_collate
from torch.utils.flop_counter import FlopCounterMode

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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=PossibleUserWarning)  # "few dataloader workers": in-memory on purpose
    started = time.perf_counter()
    report = {"clip": run_clip}[args.command](args)
    print(report)
    print(f"[bench] {args.command}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if not args.no_write:
        write_section(DOCS, args.command, report)
        print(f"[bench] wrote the '## {args.command}' section of {DOCS.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()

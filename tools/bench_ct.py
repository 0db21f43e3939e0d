"""CT input pipeline benchmark: preprocessing throughput without and with the on-disk cache, and the memory of
a 3D encoder training step at the configured grid.

Rows: the first pass over the volumes (read, check, reorient, resample, crop, window, resize and write the
cache), the second pass (read back from MONAI's PersistentDataset), and one forward + backward of a 3D ViT
(``encoders.volume.ViT3DEncoder``, MONAI's ViT, small by default) on a batch of preprocessed volumes: peak
resident memory of the process and what the step adds over the memory held before it (on CUDA: peak
allocated and its increase).

Examples:
    python tools/bench_ct.py                                   # the CT demo volumes, default preprocessing
    python tools/bench_ct.py ../shared/data/ct_totalsegmentator_example/example_ct.nii.gz --grid 32 128 128
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from memory import peak_rss_mib, reset_peak_rss, status_mib
from torch import nn

from datamodules.ct import CTPreprocessing, CTVolumeDataset
from encoders.volume import ViT3DEncoder
from mmclin.errors import run_entry_point

COLUMNS = (("measure", "measure"), ("n", "volumes"), ("seconds", "seconds"), ("per_s", "volumes/s"),
           ("peak_mib", "peak MiB"), ("step_mib", "+step MiB"))


def small_vit(grid: Sequence[int], patch_size: Sequence[int] = (4, 16, 16), hidden_size: int = 192,
              num_layers: int = 2, num_heads: int = 4) -> nn.Module:
    """The project's volume encoder (MONAI ViT with 3D patches, as M3D) at a small width, over (1, D, H, W)."""
    if any(g % p for g, p in zip(grid, patch_size)):
        raise ValueError(f"patch_size {tuple(patch_size)} must divide the grid {tuple(grid)}")
    return ViT3DEncoder(img_size=tuple(grid), patch_size=tuple(patch_size), hidden_size=hidden_size,
                        mlp_dim=4 * hidden_size, num_layers=num_layers, num_heads=num_heads)


def _pass(volumes: Sequence[Path], preprocessing: CTPreprocessing, cache_dir: Path, label: str) -> dict:
    dataset = CTVolumeDataset(volumes, preprocessing, cache_dir)
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    seconds = time.perf_counter() - start
    return {"measure": label, "n": len(dataset), "seconds": seconds, "per_s": len(dataset) / seconds}


def encoder_step(encoder: nn.Module, batch: torch.Tensor) -> dict:
    """Memory of a first forward + backward on `batch` (B, 1, D, H, W), and the time of a second one.

    Memory is measured on the first step, before the allocator holds any freed activations for reuse (which
    would hide a later step's growth from RSS): ``step_mib`` = peak during the step minus the memory just before
    it, i.e. activations kept for backward plus the gradients.
    """
    device = batch.device

    def step() -> None:
        encoder.zero_grad(set_to_none=True)
        out = encoder(batch)  # a tensor, an EncoderOutput (mmclin encoders) or a tuple (MONAI ViT)
        if not isinstance(out, torch.Tensor):
            out = out.tokens if hasattr(out, "tokens") else out[0]
        out.float().mean().backward()

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        before = status_mib("VmRSS") if reset_peak_rss() else None
        step()
        peak = peak_rss_mib()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": peak, "step_mib": peak - before if before is not None else None}


def bench_ct(volumes: list[Path], preprocessing: CTPreprocessing, cache_dir: str | Path,
             encoder: nn.Module | None = None, batch_size: int = 1, device: str = "cpu") -> list[dict]:
    """Time an uncached and a cached pass over `volumes`, then one encoder training step at the grid.

    Args:
        volumes: NIfTI files or DICOM series directories.
        preprocessing: the settings under test.
        cache_dir: cache base; this preprocessing's folder in it is emptied first so that the first pass is cold.
        encoder: a module taking (B, 1, D, H, W); default :func:`small_vit` at ``preprocessing.grid``.
        batch_size: volumes per encoder step (the preprocessed volumes, repeated if there are fewer).
        device: where the encoder step runs (``cpu`` or ``cuda``).

    Returns:
        Rows with ``measure``, ``n``, ``seconds``, ``per_s`` (volumes/s) for the passes, and ``seconds``,
        ``peak_mib``, ``step_mib`` (peak over the memory before the step) for the encoder step.
    """
    if not volumes:
        raise ValueError("no volumes to benchmark")
    cache_dir = Path(cache_dir)
    shutil.rmtree(preprocessing.cache_dir(cache_dir), ignore_errors=True)
    rows = [_pass(volumes, preprocessing, cache_dir, "preprocess, first pass (uncached, writes the cache)"),
            _pass(volumes, preprocessing, cache_dir, "preprocess, cached pass (PersistentDataset)")]
    cached = CTVolumeDataset(volumes, preprocessing, cache_dir)
    batch = torch.stack([cached[i % len(cached)]["image"] for i in range(batch_size)]).to(device)
    encoder = (encoder or small_vit(preprocessing.grid)).to(device).train()
    step = encoder_step(encoder, batch)
    grid = "x".join(map(str, preprocessing.grid))
    rows.append({"measure": f"{type(encoder).__name__} forward+backward, batch {batch_size} at {grid} ({device})",
                 "n": batch_size, **step, "per_s": batch_size / step["seconds"]})
    return rows


def markdown_table(rows: list[dict]) -> str:
    def cell(value) -> str:
        if value is None:
            return ""
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |",
             "|---|" + "---:|" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(cell(row.get(key)) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = CTPreprocessing()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("volumes", nargs="*", type=Path, help="NIfTI files or DICOM directories (default: the CT demo)")
    p.add_argument("--demo-volumes", type=int, default=12, help="demo volumes to generate when none are given")
    p.add_argument("--cache-dir", type=Path, help="cache base (default: a temporary directory, removed after)")
    p.add_argument("--grid", type=int, nargs=3, default=list(defaults.grid), metavar=("D", "H", "W"))
    p.add_argument("--spacing", type=float, nargs=3, default=list(defaults.spacing), metavar=("Z", "Y", "X"))
    p.add_argument("--native-spacing", action="store_true", help="keep the volumes' spacing (spacing=None)")
    p.add_argument("--resize-mode", choices=("resize", "pad_crop"), default=defaults.resize_mode)
    p.add_argument("--patch-size", type=int, nargs=3, default=[4, 16, 16], help="ViT patch (D, H, W)")
    p.add_argument("--hidden-size", type=int, default=192, help="ViT width")
    p.add_argument("--layers", type=int, default=2, help="ViT blocks")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    return p.parse_args(argv)


def run(argv: list[str] | None = None) -> tuple[list[dict], str]:
    """Measure with the command-line options in `argv`; the rows and their report (markdown table and notes)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    preprocessing = dataclasses.replace(CTPreprocessing(), grid=tuple(args.grid), resize_mode=args.resize_mode,
                                        spacing=None if args.native_spacing else tuple(args.spacing))
    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="bench-ct-"))
    try:
        volumes = list(args.volumes)
        if not volumes:
            from datamodules.synthetic.ct import generate_ct_demo

            demo = generate_ct_demo(cache_dir=cache_dir / "demo", n_volumes=max(3, args.demo_volumes))
            volumes = sorted((demo / "volumes").glob("*.nii.gz"))
        encoder = small_vit(preprocessing.grid, args.patch_size, args.hidden_size, args.layers)
        rows = bench_ct(volumes, preprocessing, cache_dir, encoder, args.batch_size, args.device)
    finally:
        if args.cache_dir is None:
            shutil.rmtree(cache_dir, ignore_errors=True)
    return rows, (
        f"{markdown_table(rows)}\n\n- Preprocessing: {preprocessing.settings()}\n"
        f"- Encoder: ViT3DEncoder (MONAI ViT), patch {tuple(args.patch_size)}, width {args.hidden_size}, "
        f"{args.layers} blocks; fp32; torch {torch.__version__}, {args.threads} threads\n"
        "- Memory: peak resident memory of the process (CUDA: peak allocated) during the first forward+backward; "
        "+step is that peak minus the memory just before it (activations and gradients). Seconds: a second step.")


def main(argv: list[str] | None = None) -> list[dict]:
    rows, report = run(argv)
    print(report)
    return rows


if __name__ == "__main__":
    run_entry_point(main)

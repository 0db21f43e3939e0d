"""Export a CLIP checkpoint of ours to a directory that stock open_clip loads.

    python tools/export.py --format open_clip --checkpoint CKPT --out DIR
    # then, anywhere with open_clip installed:
    #   model, _, preprocess = open_clip.create_model_and_transforms("local-dir:DIR")
    #   tokenizer = open_clip.get_tokenizer("local-dir:DIR")

The directory holds ``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg``, and under ``mmclin`` the
class names and templates used in validation), ``open_clip_model.safetensors`` and a model card ``README.md``
(data, preprocessing, the run's figures beside its baselines, intended use). After writing, the
export is reloaded with open_clip and its embeddings are compared with the checkpoint's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from mmclin.checkpoints import read_checkpoint
from mmclin.errors import CheckpointError, run_entry_point
from mmclin.model_card import model_card
from mmclin.models.clip import CLIPModule, load_clip

LOAD_EXAMPLE = """
import open_clip
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{out}")
tokenizer = open_clip.get_tokenizer("local-dir:{out}")
# zero-shot classification with the class names and templates of the run (config's "mmclin" entry), or:
#   python tools/zero_shot.py --model {out} --data.root ... ;  mmclin predict --model CHECKPOINT --input photo.jpg
"""
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


def export_open_clip(module: CLIPModule, out: str | Path) -> Path:
    """Write `module`'s open_clip model as an open_clip local directory; returns the directory."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": module.model_cfg,
        "preprocess_cfg": module.preprocess_cfg,
        "mmclin": {"classnames": module.hparams.classnames, "templates": module.hparams.templates},
    }
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    state = {k: v.detach().cpu().contiguous() for k, v in module.model.state_dict().items()}
    save_file(state, out / WEIGHTS_NAME)
    return out


@torch.no_grad()
def max_embedding_difference(module: CLIPModule, directory: str | Path, n: int = 4, seed: int = 0) -> float:
    """Load `directory` with stock open_clip and return the largest |difference| of image and text embeddings."""
    reloaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{directory}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{directory}")
    reloaded.eval()
    size = module.preprocess_cfg["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    images = torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))
    texts = tokenizer(["a dermoscopic image of melanoma.", "benign keratosis", "vascular lesion", "nevus"][:n])
    module.eval()
    ours_i, ours_t = module.encode(images, texts)
    theirs_i = reloaded.encode_image(images, normalize=True)
    theirs_t = reloaded.encode_text(texts, normalize=True)
    return max(float((ours_i - theirs_i).abs().max()), float((ours_t - theirs_t).abs().max()))


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", choices=["open_clip"], default="open_clip")
    p.add_argument("--checkpoint", required=True, help="a .ckpt written by `lightning fit`")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)
    module = load_clip(args.checkpoint)
    out = export_open_clip(module, args.out)
    diff = max_embedding_difference(module, out)
    card = model_card(read_checkpoint(args.checkpoint), args.checkpoint, "Dermatology CLIP (open_clip export)",
                      LOAD_EXAMPLE.format(out=out.resolve()),
                      {"image": module.preprocess_cfg, "templates": module.hparams.templates,
                       "classnames": module.hparams.classnames, "tokenizer": "open_clip's, from the exported config"})
    (out / "README.md").write_text(card, encoding="utf-8")
    print(f"wrote {out}/{CONFIG_NAME}, {WEIGHTS_NAME} and README.md (model card)")
    print(f"reloaded with open_clip: max |embedding difference| = {diff:.3g}")
    if diff > 1e-5:
        raise CheckpointError(f"{out}: the export does not reproduce the checkpoint's embeddings (max difference "
                              f"{diff:.3g})")
    return out


if __name__ == "__main__":
    run_entry_point(main)

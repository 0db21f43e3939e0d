"""Export a checkpoint of ours to a directory that loads without the training config.

    python tools/export.py --format mmclin --checkpoint CKPT --out DIR      # any model of ours
    #   mmclin predict --model DIR --input FILE [--question ...]
    #   MultimodalLM.from_pretrained(DIR);  mmclin.export.load_exported(DIR) for any model
    python tools/export.py --format open_clip --checkpoint CKPT --out DIR   # CLIP models, for stock open_clip
    #   model, _, preprocess = open_clip.create_model_and_transforms("local-dir:DIR")

``mmclin``: ``mmclin_config.json`` (architecture, preprocessing and the checkpoint's other state, one
:class:`mmclin.export.ExportConfig`), ``model.safetensors``, for a question-answering/report model the LM under
``lm/`` (``save_pretrained``; the peft adapter alone when LoRA was trained on a named base LM) and a model card
``README.md``. The export is reloaded in a new process and its outputs (LM logits; CLIP embeddings; checker
logits) compared with the checkpoint's before the command succeeds.

``open_clip``: ``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg``, and under ``mmclin`` the class names
and templates used in validation), ``open_clip_model.safetensors`` and the model card; reloaded with open_clip
and its embeddings compared with the checkpoint's.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import open_clip
import torch
import transformers
from safetensors.torch import save_file

from mmclin.checkpoints import load_module, read_checkpoint
from mmclin.errors import CheckpointError, run_entry_point
from mmclin.export import CONFIG_NAME as MMCLIN_CONFIG
from mmclin.export import WEIGHTS_NAME as MMCLIN_WEIGHTS
from mmclin.export import check_in_fresh_process, export_module, reference_outputs
from mmclin.llm import MEDIA_TOKEN
from mmclin.model_card import model_card
from mmclin.models.clip import CLIPModule, load_clip
from mmclin.trusted import datamodule_class

LOAD_EXAMPLE = """
import open_clip
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{out}")
tokenizer = open_clip.get_tokenizer("local-dir:{out}")
# zero-shot classification with the class names and templates of the run (config's "mmclin" entry), or:
#   python tools/zero_shot.py --model {out} --data.root ... ;  mmclin predict --model CHECKPOINT --input photo.jpg
"""
LOAD_MMCLIN = """
from mmclin.export import load_exported
model, preprocessing = load_exported("{out}")   # or MultimodalLM.from_pretrained("{out}") for QA/report models
# from a shell:  mmclin predict --model {out} --input FILE [--question TEXT] [--choices a,b] [--out rows.jsonl]
"""
# Datamodule settings of the run, not of the preprocessing (left out of the card's preprocessing)
RUN_SETTINGS = {"batch_size", "eval_batch_size", "num_workers", "predict", "cache_dir", "on_missing", "seed"}
TOLERANCE = 1e-4  # largest |output difference| an export may show (merged LoRA rounds differently)
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


def export_mmclin(checkpoint_path: str, out: str | Path, base_lm: str | None = None) -> Path:
    """Write the mmclin export of a checkpoint, check it in a new process and add its model card."""
    checkpoint = read_checkpoint(checkpoint_path)
    transformers.utils.logging.disable_progress_bar()
    logging.disable(logging.WARNING)  # open_clip's "initialized randomly": the checkpoint's weights follow
    try:
        module, data = load_module(checkpoint_path)
    finally:
        logging.disable(logging.NOTSET)
    if data:  # refused here, before anything is written, rather than by the reload check
        datamodule_class(data, f"{checkpoint_path}: datamodule_hyper_parameters")
    out = export_module(module, checkpoint, out)
    diff = check_in_fresh_process(out, reference_outputs(module), base_lm)
    settings = {k: v for k, v in data.items() if not k.startswith("_") and k not in RUN_SETTINGS}
    preprocessing = {"datamodule": data.get("_class_path"), "settings": settings}
    if hasattr(module, "example_batch"):  # a question-answering / report model
        preprocessing |= {"prompt_template": module.collator.prompt_template,
                          "media_shapes (one medium, as trained)": checkpoint.get("media_shapes"),
                          "tokenizer": f"lm/ ({len(module.tokenizer)} tokens, {MEDIA_TOKEN!r} marks each medium)"}
    title = f"{type(module).__name__} on {data.get('_class_path', 'its data').rsplit('.', 1)[-1]} (mmclin export)"
    card = model_card(checkpoint, checkpoint_path, title, LOAD_MMCLIN.format(out=out.resolve()), preprocessing)
    (out / "README.md").write_text(card, encoding="utf-8")
    parts = [MMCLIN_CONFIG, MMCLIN_WEIGHTS, *(["lm/"] if (out / "lm").is_dir() else []), "README.md (model card)"]
    print(f"wrote {out}: " + ", ".join(parts))
    print(f"reloaded in a new process: max |output difference| = {diff:.3g}")
    if diff > TOLERANCE:
        raise CheckpointError(f"{out}: the export does not reproduce the checkpoint's outputs (max difference "
                              f"{diff:.3g} > {TOLERANCE})")
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", choices=["mmclin", "open_clip"], default="mmclin")
    p.add_argument("--checkpoint", required=True, help="a .ckpt written by `lightning fit`")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--base-lm", help="mmclin format, LoRA models: the base LM's local directory for the reload "
                                     "check, where not the one the checkpoint records")
    args = p.parse_args(argv)
    if args.format == "mmclin":
        return export_mmclin(args.checkpoint, args.out, args.base_lm)
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

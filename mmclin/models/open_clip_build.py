"""Build an open_clip model, its transforms and tokenizer from a registry name, a local dir or an inline config.

open_clip resolves model configs by name from its registry (``add_model_config``) or from
``local-dir:PATH`` (``open_clip_config.json`` + weights). An inline config is registered under a name
derived from its content, so everything downstream (tokenizer, transforms, export) is stock open_clip.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import get_model_preprocess_cfg

from mmclin.errors import ConfigError

LOCAL_DIR = "local-dir:"


@dataclass
class OpenClipParts:
    model: torch.nn.Module  # open_clip CLIP / CustomTextCLIP, returning dicts
    train_transform: Any
    eval_transform: Any
    tokenizer: Any
    model_cfg: dict  # the full open_clip model config (as in open_clip_config.json "model_cfg")
    preprocess_cfg: dict  # size, mean, std, interpolation, resize_mode, fill_color


def register_inline_config(model_config: dict) -> str:
    """Register an inline open_clip model config; returns the registry name it can be created by."""
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in model_config:
            raise ConfigError(f"open_clip model_config needs '{key}' (see open_clip/model_configs/*.json)")
    blob = json.dumps(model_config, sort_keys=True)
    name = "mmclin-inline-" + hashlib.sha1(blob.encode()).hexdigest()[:12]
    if open_clip.get_model_config(name) is None:
        directory = Path(tempfile.gettempdir()) / "mmclin_open_clip_configs"
        directory.mkdir(exist_ok=True)
        path = directory / f"{name}.json"
        path.write_text(blob)
        open_clip.add_model_config(path)
    return name


def resolve_model_config(model_name: str) -> dict:
    """The model_cfg for a registry name or a ``local-dir:PATH``."""
    if model_name.startswith(LOCAL_DIR):
        cfg_path = Path(model_name[len(LOCAL_DIR):]) / "open_clip_config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path} not found: a local open_clip dir needs open_clip_config.json")
        return json.loads(cfg_path.read_text())["model_cfg"]
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ConfigError(f"open_clip has no model config '{model_name}'; known: {open_clip.list_models()[:20]} ...")
    return cfg


def build_open_clip(
    model_name: str | None = None,
    model_config: dict | None = None,
    pretrained: str | None = None,
    aug_cfg: dict | None = None,
) -> OpenClipParts:
    """Create an open_clip model with transforms and tokenizer, offline.

    Args:
        model_name: an open_clip registry name (``ViT-B-16``) or ``local-dir:PATH``.
        model_config: inline open_clip config (``embed_dim``, ``vision_cfg``, ``text_cfg``); a HF text
            tower takes a local directory in ``text_cfg.hf_model_name``/``hf_tokenizer_name``.
        pretrained: a local checkpoint file for the whole model (ignored for ``local-dir:``).
        aug_cfg: open_clip ``AugmentationCfg`` fields for the training transform.
    """
    if (model_name is None) == (model_config is None):
        raise ConfigError("give exactly one of model_name (registry name or local-dir:PATH) and model_config")
    if pretrained is not None and not Path(pretrained).is_file():
        raise FileNotFoundError(f"pretrained checkpoint '{pretrained}' not found (only local files are loaded)")
    name = register_inline_config(model_config) if model_config is not None else model_name
    model, train_tf, eval_tf = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, aug_cfg=aug_cfg, output_dict=True, weights_only=True
    )
    return OpenClipParts(
        model=model,
        train_transform=train_tf,
        eval_transform=eval_tf,
        tokenizer=open_clip.get_tokenizer(name),
        model_cfg=model_config if model_config is not None else resolve_model_config(name),
        preprocess_cfg=dict(get_model_preprocess_cfg(model)),
    )

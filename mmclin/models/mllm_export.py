"""A MultimodalLM's LM in an export directory, and the module rebuilt from one (see :mod:`mmclin.export`).

The LM goes through transformers' ``save_pretrained`` with its tokenizer. LoRA trained on a named base model is
saved as the peft adapter alone (the base is read back from its own directory); the rows of the tokens we added
to the base vocabulary (``<media>``, a pad token) are not in the base, so the export carries them. LoRA on a
random-init tiny LM has no base to name: the adapters are merged into a copy and the whole LM is saved.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch

from mmclin.errors import CheckpointError
from mmclin.export import CONFIG_NAME, LM_DIR, ExportConfig, build_from_config, read_weights
from mmclin.llm import save_lm

ADDED_ROWS = "lm_added_rows."  # weight-file prefix of the added tokens' embedding rows
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _embeddings(base) -> dict[str, torch.Tensor]:
    """The base LM's input embedding weight and, when not tied to it, the output one."""
    found = {"input": base.get_input_embeddings().weight}
    output = base.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != found["input"].data_ptr():
        found["output"] = output.weight
    return found


def save_lm_for_export(module: L.LightningModule, directory: str | os.PathLike) -> tuple[dict[str, Any], dict]:
    """Write the LM and tokenizer of `module` (a MultimodalLM) to `directory`; returns the export's ``lm`` entry and
    the tensors the weight file must carry beside the module's own (the added tokens' rows under an adapter)."""
    settings = module.hparams.lm
    directory = Path(directory)
    vocabulary = len(module.tokenizer)
    if settings.get("lora") is not None and settings.get("source"):
        save_lm(module.lm, module.tokenizer, directory)  # a PeftModel saves its adapters only
        ids = sorted(module.tokenizer.get_added_vocab().values())
        rows = {ADDED_ROWS + name: weight[ids].detach().clone()
                for name, weight in _embeddings(module.lm.get_base_model()).items()}
        return {"kind": "adapter", "base": settings["source"], "added_token_ids": ids,
                "vocabulary": vocabulary}, rows
    lm = copy.deepcopy(module.lm).merge_and_unload() if settings.get("lora") is not None else module.lm
    save_lm(lm, module.tokenizer, directory)
    return {"kind": "full", "vocabulary": vocabulary}, {}


def load_multimodal_lm(cls: type[L.LightningModule], directory: str | os.PathLike,
                       base_lm: str | None = None) -> L.LightningModule:
    """`cls` (MultimodalLM or a subclass) built and loaded from an export directory; `base_lm` overrides where an
    adapter's base LM is. This module imports no model: MultimodalLM imports it, so there is no import circle."""
    directory = Path(directory)
    config = ExportConfig.read(directory)
    found = config.model_class(directory / CONFIG_NAME)
    if not issubclass(found, cls):
        raise CheckpointError(f"{directory}: an export of {found.__name__}, not of {cls.__name__}")
    entry = config.lm or {}
    settings = config.model.get("lm")
    if not isinstance(settings, dict):
        raise CheckpointError(f"{directory / CONFIG_NAME}: model.lm: the LM's settings as a mapping, got {settings!r}")
    if entry.get("kind") == "adapter":
        base = base_lm or entry.get("base")
        if not isinstance(base, str) or not Path(base).expanduser().is_dir():
            raise CheckpointError(f"{directory}: holds a LoRA adapter of the LM {entry.get('base')!r}, which is not a "
                                  "directory here; pass the base LM's local directory (base_lm / --base-lm)")
        lm = {**settings, "source": str(base), "tiny": None}
    elif entry.get("kind") == "full":
        lm = {k: v for k, v in settings.items() if k not in ("tiny", "lora", "freeze")}
        lm |= {"source": str(directory / LM_DIR), "freeze": "all"}
    else:
        raise CheckpointError(f"{directory}: the export names no LM (its config's 'lm' entry is {config.lm!r})")
    module = build_from_config(cls, config, lm=lm, tokenizer_vocab=None, evaluator=None, predictions_dir=None)
    if len(module.tokenizer) != entry.get("vocabulary", len(module.tokenizer)):
        raise CheckpointError(f"{directory}: the LM's tokenizer has {len(module.tokenizer)} tokens; the model was "
                              f"trained with {entry['vocabulary']} (another base LM?)")
    module._fitted_tokenizer = config.extra.get("tokenizer")
    module._media_shapes = dict(config.extra.get("media_shapes") or {})

    state = read_weights(directory)
    rows = {k[len(ADDED_ROWS):]: state.pop(k) for k in [k for k in state if k.startswith(ADDED_ROWS)]}
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("lm.")]
    if missing or unexpected:
        raise CheckpointError(f"{directory}: its weights do not fit {cls.__name__} (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    if entry["kind"] == "adapter":
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(module.lm, read_weights(directory / LM_DIR, ADAPTER_WEIGHTS))
        if result.unexpected_keys:
            raise CheckpointError(f"{directory / LM_DIR}: adapter weights that fit no LoRA layer of the base LM "
                                  f"({result.unexpected_keys[:5]})")
        with torch.no_grad():
            for name, weight in _embeddings(module.lm.get_base_model()).items():
                weight[entry["added_token_ids"]] = rows[name].to(weight.dtype)
    return module

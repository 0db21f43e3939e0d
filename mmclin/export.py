"""Self-contained export of our models: a directory that loads without the training config, with no pickle.

``tools/export.py --format mmclin`` writes, for any of our checkpoints:

- ``mmclin_config.json``: one :class:`ExportConfig`: the model's class and constructor settings (the architecture),
  the datamodule's class and settings (the preprocessing: rates, leads, windows, image size, HU window, prompt
  template...) and the non-tensor state a checkpoint carries beside its weights (a fitted tokenizer, the media
  shapes the model was trained on);
- ``model.safetensors``: the weights (:meth:`~mmclin.contracts.Servable.export_to`); for a
  :class:`~mmclin.models.mllm.MultimodalLM` those of the encoders, connectors, cross-attention and auxiliary heads,
  while its LM goes to
- ``lm/``: ``save_pretrained`` of the LM and its tokenizer, or of the peft adapter alone when LoRA was trained
  on a named base model (the base is then read from the directory the adapter names, or ``base_lm``);
- ``README.md``: the model card (:mod:`mmclin.model_card`).

:func:`load_exported` (and ``MultimodalLM.from_pretrained``, ``mmclin predict --model DIR``) rebuilds the module.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import instantiate_module
from safetensors.torch import load_file, save_file

from mmclin.contracts import Servable
from mmclin.errors import CheckpointError
from mmclin.trusted import datamodule_class, model_class

FORMAT = "mmclin"
CONFIG_NAME = "mmclin_config.json"
WEIGHTS_NAME = "model.safetensors"
LM_DIR = "lm"
# What a Lightning checkpoint holds besides the module's own state (kept out of `ExportConfig.extra`)
_TRAINING_KEYS = {"epoch", "global_step", "pytorch-lightning_version", "state_dict", "loops", "callbacks",
                  "optimizer_states", "lr_schedulers", "hparams_name", "hyper_parameters", "datamodule_hparams_name",
                  "datamodule_hyper_parameters", "hparams_type"}
# Constructor settings that name pretrained weight files: the export's weights replace them
_WEIGHT_FILE_SETTINGS = ("pretrained", "pretrained_path")


@dataclasses.dataclass
class ExportConfig:
    """Everything but the weights: the same settings a checkpoint records, as one JSON document.

    Attributes:
        model: the module's constructor settings with its ``_class_path`` (LightningCLI's ``hyper_parameters``).
        preprocessing: the datamodule's settings with its ``_class_path``: what turns a file into the model's input.
        extra: JSON state the module keeps in its checkpoints beside the weights (``on_save_checkpoint``).
        lm: for a MultimodalLM, how ``lm/`` holds its LM: ``{"kind": "full"}`` or ``{"kind": "adapter",
            "base": ..., "added_token_ids": [...]}``.
        format: always ``mmclin``.
        version: of this layout.
    """

    model: dict[str, Any]
    preprocessing: dict[str, Any]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    lm: dict[str, Any] | None = None
    format: str = FORMAT
    version: int = 1

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> ExportConfig:
        extra = {k: v for k, v in checkpoint.items() if k not in _TRAINING_KEYS and _is_json(v)}
        return cls(model=_without_weight_files(checkpoint.get("hyper_parameters") or {}),
                   preprocessing=dict(checkpoint.get("datamodule_hyper_parameters") or {}), extra=extra)

    def write(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2), encoding="utf-8")
        return path

    @classmethod
    def read(cls, directory: str | os.PathLike) -> ExportConfig:
        """Raises:
            CheckpointError: no such directory, no ``mmclin_config.json``, not one of ours, or a class, setting or
                ``_instantiator`` that :mod:`mmclin.trusted` refuses (checked here, before anything is built)."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise CheckpointError(f"{directory}: not an mmclin export (no {CONFIG_NAME}); export a checkpoint with "
                                  "`python tools/export.py --format mmclin --checkpoint CKPT --out DIR`")
        try:
            fields = json.loads(path.read_text(encoding="utf-8"))
            config = cls(**fields)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
            raise CheckpointError(f"{path}: not a readable export config ({err})") from None
        if config.format != FORMAT or config.version != 1:
            raise CheckpointError(f"{path}: format {config.format!r} version {config.version}; this mmclin reads "
                                  f"{FORMAT!r} version 1")
        config.model_class(path)
        if config.preprocessing:  # a checkpoint written without LightningCLI records none (a report checker's)
            datamodule_class(config.preprocessing, f"{path}: preprocessing")
        return config

    def model_class(self, path: str | os.PathLike) -> type[L.LightningModule]:
        """The model's class, once every class the settings name is checked (:func:`mmclin.trusted.model_class`);
        `path` is the config file, for the messages."""
        return model_class(self.model, f"{path}: model")


def _is_json(value) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


def _without_weight_files(settings):
    """`settings` with every ``pretrained``/``pretrained_path`` set to None, at any depth."""
    if isinstance(settings, dict):
        return {k: None if k in _WEIGHT_FILE_SETTINGS else _without_weight_files(v) for k, v in settings.items()}
    if isinstance(settings, list):
        return [_without_weight_files(v) for v in settings]
    return settings


def export_module(module: L.LightningModule, checkpoint: dict, out: str | os.PathLike) -> Path:
    """Write `module` (loaded from `checkpoint`) as an mmclin export directory; returns it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = ExportConfig.from_checkpoint(checkpoint)
    state, config.lm = servable(module, "export").export_to(out)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, out / WEIGHTS_NAME,
              metadata={"format": FORMAT})
    config.write(out)
    return out


def build_from_config(cls: type[L.LightningModule], config: ExportConfig, **overrides) -> L.LightningModule:
    """The module `config` describes, with random weights (LightningCLI's own instantiation of the settings)."""
    # As Lightning's load_from_checkpoint: only the constructor's own arguments (a CLI link may add others)
    accepted = set(inspect.signature(cls.__init__).parameters)
    settings = {k: v for k, v in config.model.items() if k == "_class_path" or k in accepted}
    try:
        return instantiate_module(cls, {**settings, **overrides})
    except Exception as err:  # noqa: BLE001 -- jsonargparse reports bad settings as several exception types
        raise CheckpointError(f"the export's settings do not build {cls.__name__} "
                              f"({' '.join(str(err).split())[:300]})") from None


def read_weights(directory: str | os.PathLike, name: str = WEIGHTS_NAME) -> dict[str, torch.Tensor]:
    path = Path(directory) / name
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the export")
    try:
        return load_file(path)
    except Exception as err:  # noqa: BLE001 -- safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path}: not readable safetensors ({err})") from None


def load_state(module: L.LightningModule, state: dict[str, torch.Tensor], directory, strict: bool = True) -> None:
    """Load `state` into `module` (after its ``on_load_checkpoint`` saw the export's extra state)."""
    try:
        module.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        raise CheckpointError(f"{directory}: its weights do not fit {type(module).__name__} "
                              f"({str(err).splitlines()[0][:300]})") from None


def load_own_tensors(cls: type[L.LightningModule], directory: Path, config: ExportConfig) -> L.LightningModule:
    """`cls` built from `config` with the weights of the export's safetensors file (what the default
    :meth:`~mmclin.contracts.Servable.export_to` writes): a :meth:`~mmclin.contracts.Servable.from_export`."""
    module = build_from_config(cls, config)
    state = read_weights(directory)
    module.on_load_checkpoint({"hyper_parameters": config.model, "state_dict": state, **config.extra})
    load_state(module, state, directory)
    return module


def load_exported(directory: str | os.PathLike, **kwargs) -> tuple[L.LightningModule, dict]:
    """The module of an export directory (eval mode, CPU) and its preprocessing settings (datamodule settings).

    Args:
        **kwargs: passed to the class's ``from_pretrained`` (``MultimodalLM``: ``base_lm``).

    Raises:
        CheckpointError: not an export, an untrusted class, or weights that do not fit.
    """
    config = ExportConfig.read(directory)
    cls = config.model_class(Path(directory) / CONFIG_NAME)
    if not issubclass(cls, Servable):
        raise CheckpointError(f"{directory}: {cls.__name__} is not a servable model kind (mmclin.contracts.Servable)")
    return cls.from_export(Path(directory), config, **kwargs).eval(), config.preprocessing


@torch.no_grad()
def reference_outputs(module: L.LightningModule, seed: int = 0) -> torch.Tensor:
    """The module's raw outputs on a fixed input built from its own settings (its
    :meth:`~mmclin.contracts.Servable.reference_outputs`), to compare a reload with."""
    module.eval()
    return servable(module, "check").reference_outputs(torch.Generator().manual_seed(seed))


def servable(module: L.LightningModule, what: str) -> Servable:
    """`module`, once it is known to be a :class:`~mmclin.contracts.Servable`.

    Raises:
        CheckpointError: it is not.
    """
    if not isinstance(module, Servable):
        raise CheckpointError(f"cannot {what} {type(module).__name__}: not a servable model kind "
                              "(mmclin.contracts.Servable)")
    return module


def check_in_fresh_process(directory: str | os.PathLike, reference: torch.Tensor, base_lm: str | None = None) -> float:
    """Largest |difference| between `reference` (the checkpoint's :func:`reference_outputs`) and the outputs of
    the export reloaded in a new Python process, which shares nothing with this one."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "reference.safetensors"
        save_file({"reference": reference.contiguous()}, ref)
        command = [sys.executable, "-m", "mmclin.export", str(directory), str(ref), *([base_lm] if base_lm else [])]
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise CheckpointError(f"{directory}: the export does not load in a new process: "
                              f"{(done.stderr.strip().splitlines() or ['no message'])[-1]}")
    return float(done.stdout.strip().splitlines()[-1])


def _compare(directory: str, reference: str, base_lm: str | None = None) -> None:
    kwargs = {"base_lm": base_lm} if base_lm else {}
    module, _ = load_exported(directory, **kwargs)
    expected = load_file(reference)["reference"]
    found = reference_outputs(module)
    if found.shape != expected.shape:
        raise CheckpointError(f"{directory}: outputs of shape {tuple(found.shape)}, the checkpoint's "
                              f"{tuple(expected.shape)}")
    print(float((found - expected).abs().max()))


if __name__ == "__main__":
    import logging

    import transformers

    from mmclin.errors import run_entry_point
    from mmclin.export import _compare as compare  # the importable module's, not a second copy as __main__

    logging.disable(logging.WARNING)  # open_clip's "initialized randomly": the export's weights follow
    transformers.utils.logging.disable_progress_bar()
    run_entry_point(lambda argv: compare(*argv))

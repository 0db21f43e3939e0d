"""Loading our Lightning checkpoints safely: ``weights_only`` always, and a named error for every bad file."""

from __future__ import annotations

import importlib
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

from mmclin.errors import CheckpointError

# Checkpoints may only name classes of these packages: importing a module runs its code.
TRUSTED_PACKAGES = ("mmclin.", "encoders.")


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint's dict, read with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: the file is missing, not a torch file (random bytes, truncated), holds objects other
            than tensors and plain containers (weights_only refuses them; never unpickled here), or is not a
            Lightning checkpoint (no ``state_dict``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).split("WeightsUnpickler error: ")[-1].splitlines()[0].split(". Please use")[0].strip()
        if "Unsupported global" in reason:  # a real pickle naming a class or function
            raise CheckpointError(f"{path}: refused: it holds objects other than tensors ({reason}); checkpoints are "
                                  "loaded with weights_only=True, which runs no code from the file") from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({reason})") from None
    except Exception as err:  # noqa: BLE001 -- garbage bytes can fail anywhere in the unpickler (IndexError, ...)
        detail = (str(err).splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: not a readable torch checkpoint (corrupt or truncated: {detail})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: a torch file but not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def checkpoint_class(checkpoint: dict, path: str | os.PathLike, default: str | None = None) -> type[L.LightningModule]:
    """The LightningModule class a checkpoint records (LightningCLI's ``_class_path``), else `default`; only from
    :data:`TRUSTED_PACKAGES`.

    Raises:
        CheckpointError: no class recorded and no default, an untrusted or unimportable class, or not a module.
    """
    class_path = (checkpoint.get("hyper_parameters") or {}).get("_class_path") or default
    if class_path is None:
        raise CheckpointError(f"{path}: the checkpoint records no model class")
    module_name, _, class_name = class_path.rpartition(".")
    if not module_name.startswith(TRUSTED_PACKAGES):
        raise CheckpointError(f"{path}: names class {class_path!r}; only classes of {list(TRUSTED_PACKAGES)} "
                              "are loaded")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise CheckpointError(f"{path}: its class {class_path!r} cannot be imported ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, L.LightningModule)):
        raise CheckpointError(f"{path}: {class_path!r} is not a LightningModule")
    return cls


def load_module(path: str | os.PathLike, expected: type[L.LightningModule] | None = None,
                default_class: str | None = None, **kwargs) -> tuple[L.LightningModule, dict]:
    """The module of one of our checkpoints (in eval mode, on the CPU) and its ``datamodule_hyper_parameters``.

    Args:
        expected: the class (or base class) the caller needs; a checkpoint of another model is refused.
        default_class: class path for a checkpoint that records none (written without LightningCLI).
        **kwargs: hyper-parameter overrides for ``load_from_checkpoint``.

    Raises:
        CheckpointError: see :func:`read_checkpoint` and :func:`checkpoint_class`; the checkpoint is of another
            model class than `expected`, or its weights do not fit the class it names.
    """
    checkpoint = read_checkpoint(path)
    default = default_class or (f"{expected.__module__}.{expected.__qualname__}" if expected else None)
    cls = checkpoint_class(checkpoint, path, default)
    if expected is not None and not issubclass(cls, expected):
        raise CheckpointError(f"{path}: a checkpoint of {cls.__name__}, not of {expected.__name__}")
    try:
        module = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True, **kwargs)
    except (RuntimeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: its weights or settings do not fit {cls.__name__} "
                              f"({str(err).splitlines()[0][:300]})") from None
    return module.eval(), checkpoint.get("datamodule_hyper_parameters") or {}


@contextmanager
def own_hyperparameters() -> Iterator[None]:
    """Build modules inside this block with their own hyper-parameters: while LightningCLI instantiates a module,
    every ``save_hyperparameters`` call records the CLI's settings of that outer module (a Lightning context
    variable), which would wrongly become the settings of a model loaded inside its constructor."""
    token = _given_hyperparameters.set(None)
    try:
        yield
    finally:
        _given_hyperparameters.reset(token)

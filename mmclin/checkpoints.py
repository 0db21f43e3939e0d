"""Loading our Lightning checkpoints safely: ``weights_only`` always, and a named error for every bad file."""

from __future__ import annotations

import importlib
import os
import pickletools
import re
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

from mmclin.errors import CheckpointError
from mmclin.trusted import model_class, trusted_class


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
    except Exception as err:  # noqa: BLE001 -- garbage bytes can fail anywhere in the unpickler (IndexError, ...)
        raise load_refusal(path, err) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: a torch file but not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def load_refusal(path: Path, err: Exception) -> CheckpointError:
    """The named error for a file that ``torch.load(weights_only=True)`` could not read: refused when its pickle
    names classes or functions (never loaded: torch's advice to retry with ``weights_only=False`` is not passed on),
    else unreadable, with the reason."""
    names = _pickled_globals(path, err)
    if names:
        return CheckpointError(f"{path}: refused: it holds objects other than tensors ({', '.join(names[:3])}); "
                               "checkpoints are loaded with weights_only=True, which runs no code from the file")
    with path.open("rb") as file:
        head = file.read(8)
    if not head.startswith((b"PK", b"\x80")):  # a torch zip archive, or a legacy torch file's pickle
        return CheckpointError(f"{path}: not a readable torch checkpoint (not a zip archive or pickle: first bytes "
                               f"{head.hex(' ') or 'none, the file is empty'})")
    detail = str(err).partition("WeightsUnpickler error:")[2] or str(err)
    lines = [line.strip().split(". ")[0] for line in detail.split("Check the documentation")[0].splitlines()]
    detail = next((line for line in lines if line and "weights_only" not in line), type(err).__name__)
    return CheckpointError(f"{path}: not a readable torch checkpoint (corrupt or truncated: {detail[:200]})")


def _pickled_globals(path: Path, err: Exception, limit: int = 1 << 26) -> list[str]:
    """The classes and functions outside torch that the pickle of `path` (a torch zip's ``data.pkl``, else the
    file's first `limit` bytes) names, read opcode by opcode with :mod:`pickletools`, which runs nothing."""
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    if refused:
        return [refused.group(1)]
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                data = archive.read(member)[:limit] if member else b""
        else:
            with path.open("rb") as file:
                data = file.read(limit)
    except (OSError, zipfile.BadZipFile):
        return []
    names, strings = [], []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("GLOBAL", "INST"):
                names.append(arg.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(".".join(strings[-2:]))
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # noqa: BLE001 -- bytes after the last valid opcode (random data, a truncated file)
        pass
    return [n for n in dict.fromkeys(names) if not n.startswith(("torch.", "collections.OrderedDict"))]


def checkpoint_class(checkpoint: dict, path: str | os.PathLike, default: str | None = None) -> type[L.LightningModule]:
    """The LightningModule class a checkpoint records (LightningCLI's ``_class_path``), else `default`, after it and
    every class its hyper-parameters name are checked (:func:`mmclin.trusted.model_class`); nothing is built.

    Raises:
        CheckpointError: no class recorded and no default, a class outside this project or not a LightningModule,
            a nested class (encoder, connector, ...) refused, or an ``_instantiator`` other than Lightning's.
    """
    return model_class(checkpoint.get("hyper_parameters") or {}, f"{path}: hyper_parameters", default)


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


def check_checkpoint_fits(checkpoint: dict, path: str | os.PathLike, model: dict | None, data: dict | None) -> None:
    """Refuse a checkpoint of another family than the run's config, before anything is built.

    ``--ckpt_path`` replaces the config's model settings by the checkpoint's, so a CT or dermatology model would
    otherwise meet the config's ECG data and fail deep inside (a shape error, a missing collator) naming no file.
    The checkpoint's model class must be the config's (or a subclass) and the data it was trained on of the
    config's data class; a datamodule that wraps another (a ``base`` datamodule, as the preference data does)
    counts as the one it wraps. What the checkpoint does not record is not compared.

    Args:
        checkpoint: as read by :func:`read_checkpoint`.
        model, data: the config's ``model`` and ``data`` settings as ``{"class_path", "init_args"}``; None (unset)
            is not compared.

    Raises:
        CheckpointError: naming the file, the checkpoint's model and data classes and the config's.
    """
    where = f"{path}: datamodule_hyper_parameters"
    trained = _data_class(checkpoint.get("datamodule_hyper_parameters") or {}, "_class_path",
                          lambda name: trusted_class(name, L.LightningDataModule, where))  # named by a file
    wanted_data = _data_class(data or {}, "class_path", config_class)
    recorded = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    ours = checkpoint_class(checkpoint, path) if recorded else None
    wanted = config_class((model or {}).get("class_path"))
    same_model = ours is None or wanted is None or issubclass(ours, wanted)
    if same_model and (trained is None or wanted_data is None or trained is wanted_data):
        return

    def family(model_class: type | None, data_class: type | None, on: str) -> str:
        return on.join(c.__name__ for c in (model_class, data_class) if c is not None) or "an unrecorded model"

    raise CheckpointError(f"{path}: a checkpoint of {family(ours, trained, ' trained on ')}, but this config runs "
                          f"{family(wanted, wanted_data, ' on ')}; give a checkpoint trained with this config")


def _data_class(settings: dict, key: str, resolve: Callable[[str], type | None]) -> type | None:
    """The datamodule class `settings` name under `key`, or that of the ``base`` datamodule they wrap; None when
    unnamed, as for a wrapper whose base comes from its ``init_from`` checkpoint (which then follows the model's)."""
    settings_of = settings.get("init_args") or settings
    if "base" in settings_of:
        base = settings_of["base"]
        name = base.get("class_path") if isinstance(base, dict) else None
    else:
        name = settings.get(key)
    return resolve(name) if isinstance(name, str) and name else None


def config_class(class_path: str | None) -> type | None:
    """A class the run's own config names (jsonargparse has imported it already); None if unset, not found or not
    a class."""
    module, _, name = (class_path or "").rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name, None)
    except (ImportError, ValueError):  # ValueError: no module part
        return None
    return found if isinstance(found, type) else None

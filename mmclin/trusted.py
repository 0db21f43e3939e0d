"""Classes named in a file (a checkpoint's hyper-parameters, an export's config) and built from it: only this
project's, only of the base the setting takes, and found without calling anything the file names.

A class path is resolved by importing its module (a public module of :data:`PROJECT_PACKAGES` only: importing runs
the module's code), looking the name up, and checking that it is a class defined in this project that subclasses the
expected base (``inspect.isclass``/``issubclass``): a LightningModule for the model, a LightningDataModule for the
data, an ``nn.Module`` for parts such as encoders and connectors. Only then is anything constructed. Every refusal is
one line naming the file, the setting and what it takes.
"""

from __future__ import annotations

import collections.abc
import importlib
import inspect
import typing
from typing import Any

import lightning as L
from torch import nn

from mmclin.errors import CheckpointError

# Packages whose classes a file may name (importing a module runs its code)
PROJECT_PACKAGES = ("mmclin.", "encoders.", "datamodules.")
# The only `_instantiator` a file may name: what LightningCLI records (Lightning 2.6 allows these two too)
ALLOWED_INSTANTIATORS = ("lightning.pytorch.cli.instantiate_module", "pytorch_lightning.cli.instantiate_module")
CALLABLE = object  # the base of a setting typed as a plain callable (an evaluator): a class whose instances are called


def _base_name(base: type) -> str:
    kind = _kind(base)
    return "a callable class" if base is CALLABLE else f"{'an' if kind[0] in 'naeiou' else 'a'} {kind}"


def _kind(cls: type) -> str:
    """What `cls` is, in the words of the messages: LightningModule, LightningDataModule, nn.Module or plain class."""
    for base, name in ((L.LightningModule, "LightningModule"), (L.LightningDataModule, "LightningDataModule"),
                       (nn.Module, "nn.Module")):
        if issubclass(cls, base):
            return name
    return "plain class"


def trusted_class(class_path: Any, base: type, where: str, error: type[ValueError] = CheckpointError) -> type:
    """The class `class_path` names, if it is a class of this project that subclasses `base`; nothing is called.

    Args:
        class_path: ``"package.module.Class"`` as read from the file.
        base: what the setting takes (:data:`CALLABLE`: any class whose instances can be called).
        where: the file and setting, for the message (``run.ckpt: hyper_parameters.connector.class_path``).
        error: the error to raise (:class:`~mmclin.errors.ConfigError` for a config's own settings).

    Raises:
        `error`: not a string, outside :data:`PROJECT_PACKAGES` or in a private module (``mmclin.__main__`` runs
            the CLI when imported), not importable, not a class (a function such as a demo generator), defined
            outside this project (a library class reachable through a project module), or not of `base`.
    """
    expected = f"expected {_base_name(base)} of this project"
    if not isinstance(class_path, str) or not class_path.startswith(PROJECT_PACKAGES):
        raise error(f"{where}: {class_path!r}: only classes of {[p.rstrip('.') for p in PROJECT_PACKAGES]} may be "
                    f"named here; {expected}")
    module_name, _, name = class_path.rpartition(".")
    if any(part.startswith("_") for part in class_path.split(".")):
        raise error(f"{where}: {class_path!r} is private to its module; {expected}")
    try:
        target = getattr(importlib.import_module(module_name), name, None)
    except ImportError as err:
        raise error(f"{where}: {class_path!r} cannot be imported ({err}); {expected}") from None
    if not inspect.isclass(target):
        found = "a function" if inspect.isroutine(target) else "not a class" if target is not None else "not found"
        raise error(f"{where}: {class_path!r} is {found}; {expected}")
    if not target.__module__.startswith(PROJECT_PACKAGES):
        raise error(f"{where}: {class_path!r} is {target.__module__}.{target.__qualname__}, not a class of this "
                    f"project; {expected}")
    callable_class = base is CALLABLE and any("__call__" in vars(k) for k in target.__mro__[:-1])
    if not (callable_class or (base is not CALLABLE and issubclass(target, base))):
        raise error(f"{where}: {class_path!r} is a {_kind(target)}; {expected}")
    return target


def check_instantiator(settings: dict, where: str, error: type[ValueError] = CheckpointError) -> None:
    """Refuse a ``_instantiator`` other than Lightning's own: ``load_from_checkpoint`` would import and call it."""
    value = settings.get("_instantiator")
    if value is not None and value not in ALLOWED_INSTANTIATORS:
        raise error(f"{where}._instantiator: {value!r} is refused; only "
                    f"{ALLOWED_INSTANTIATORS[0]!r} (what LightningCLI records) may be named")


def check_settings(settings: dict, cls: type, where: str, default_base: type = nn.Module,
                   error: type[ValueError] = CheckpointError) -> None:
    """Check every class that `cls`'s constructor settings name, at any depth, before anything is built.

    A ``{"class_path": ..., "init_args": {...}}`` under the argument ``key`` must be of the base ``key``'s annotation
    names (``nn.Module`` for ``encoders: dict[str, nn.Module]`` and for a connector's ``Callable[..., nn.Module]``;
    a callable class for an evaluator's ``Callable``), else of `default_base`; its ``init_args`` are checked against
    its own constructor in turn.

    Args:
        settings: the constructor's keyword arguments as read from the file.
        where: the file and the settings' place in it (``run.ckpt: hyper_parameters``).
        default_base: the base of a class named under an argument whose annotation names none (``Any``, a dict).
    """
    check_instantiator(settings, where, error)
    bases = _argument_bases(cls)
    for key, value in settings.items():
        for place, spec in _class_specs(value, f"{where}.{key}"):
            nested = trusted_class(spec.get("class_path"), bases.get(key, default_base), f"{place}.class_path", error)
            for part in ("init_args", "dict_kwargs"):  # jsonargparse's two ways of giving the constructor settings
                nested_settings = spec.get(part) or {}
                if not isinstance(nested_settings, dict):
                    raise error(f"{place}.{part}: a mapping of settings, got {nested_settings!r}")
                check_settings(nested_settings, nested, f"{place}.{part}", default_base, error)


def _class_specs(value: Any, where: str):
    """(place, spec) of every ``{"class_path": ...}`` mapping in `value`, however deep in mappings and lists."""
    if isinstance(value, dict):
        if "class_path" in value:
            yield where, value
            return
        for key, item in value.items():
            yield from _class_specs(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _class_specs(item, f"{where}[{i}]")


def _argument_bases(cls: type) -> dict[str, type]:
    """Constructor argument -> the base its annotation asks of a class named for it (see :func:`check_settings`)."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 -- a name imported for type checking only: fall back to the defaults
        return {}
    found = {}
    for key, hint in hints.items():
        leaves = list(_leaves(hint))
        base = next((b for b in (L.LightningDataModule, nn.Module) if any(_subclass(t, b) for t in leaves)), None)
        if base is None and collections.abc.Callable in leaves:
            base = CALLABLE
        if base is not None:
            found[key] = base
    return found


def _leaves(hint: Any):
    """The classes in an annotation: its origin and, recursively, its arguments (``Callable[[int], nn.Module]``
    gives Callable, int and nn.Module)."""
    if isinstance(hint, list):
        for item in hint:
            yield from _leaves(item)
        return
    origin = typing.get_origin(hint)
    yield origin if origin is not None else hint
    for arg in typing.get_args(hint):
        yield from _leaves(arg)


def _subclass(candidate: Any, base: type) -> bool:
    return inspect.isclass(candidate) and issubclass(candidate, base)


def init_arguments(cls: type) -> set[str] | None:
    """The keyword arguments `cls`'s constructor takes; None when it takes any (``**kwargs``)."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.name != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL}


def datamodule_class(settings: Any, where: str,
                     error: type[ValueError] = CheckpointError) -> type[L.LightningDataModule]:
    """The LightningDataModule class of a checkpoint's ``datamodule_hyper_parameters`` or an export's
    ``preprocessing``, once its ``_class_path``, every key and every nested class are checked; nothing is built.

    Raises:
        `error`: not a mapping, no ``_class_path``, a class path :func:`trusted_class` refuses, a key that is not an
            argument of the class (never dropped: a typo would silently change the preprocessing), or a refused
            nested class or ``_instantiator``.
    """
    if not isinstance(settings, dict) or not settings.get("_class_path"):
        raise error(f"{where}: records no datamodule of this project (`lightning fit` writes its settings with a "
                    "_class_path); the model's preprocessing is unknown")
    cls = trusted_class(settings["_class_path"], L.LightningDataModule, f"{where}._class_path", error)
    accepted = init_arguments(cls)
    own = {k: v for k, v in settings.items() if not k.startswith("_")}
    unknown = sorted(set(own) - accepted) if accepted is not None else []
    if unknown:
        raise error(f"{where}.{unknown[0]}: not a setting of {cls.__name__} (it takes {sorted(accepted)})")
    check_settings(settings, cls, where, L.LightningDataModule, error)
    return cls


def model_class(settings: Any, where: str, default: str | None = None,
                error: type[ValueError] = CheckpointError) -> type[L.LightningModule]:
    """The LightningModule class of a checkpoint's ``hyper_parameters`` or an export's ``model`` (its
    ``_class_path``, else `default`), once it and every class its settings name are checked; nothing is built.

    Raises:
        `error`: not a mapping, no class, or a class, nested class or ``_instantiator`` refused (see
            :func:`trusted_class`, :func:`check_settings`).
    """
    if not isinstance(settings, dict):
        raise error(f"{where}: the model's settings must be a mapping, got {type(settings).__name__}")
    class_path = settings.get("_class_path") or default
    if class_path is None:
        raise error(f"{where}: records no model class (_class_path)")
    cls = trusted_class(class_path, L.LightningModule, f"{where}._class_path", error)
    check_settings(settings, cls, where, nn.Module, error)
    return cls


def build_datamodule(settings: dict, where: str) -> L.LightningDataModule:
    """The datamodule `settings` describe (see :func:`datamodule_class`), built with them: nothing is read or
    generated until its ``setup``/``prepare_data``."""
    cls = datamodule_class(settings, where)
    return cls(**{k: v for k, v in settings.items() if not k.startswith("_")})

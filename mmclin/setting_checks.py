"""Numbers in a run's settings checked as soon as the CLI has parsed them, before anything is built or read.

A learning rate of -1e-3, a batch size of 0 or a validation fraction of 1.5 would otherwise surface minutes later,
after the data is read, as a library's ValueError (torch's "Invalid learning rate") or not at all. Here they end
the run with one line naming the setting as the command line spells it (``model.init_args.lr=-0.001: ...``).

The rules go by setting name: every class of this project that takes a setting of that name means the same by
it (``tests/test_bad_input_settings.py`` checks the table against every class's defaults and every config), and
the trainer's by Lightning's meaning. A setting that is None (unset) or not a number is left to the parser.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from mmclin.errors import ConfigError

Rule = tuple[Callable[[float], bool], str]
POSITIVE: Rule = (lambda v: v > 0, "> 0")
NON_NEGATIVE: Rule = (lambda v: v >= 0, ">= 0")
AT_LEAST_ONE: Rule = (lambda v: v >= 1, ">= 1")
FRACTION: Rule = (lambda v: 0 <= v <= 1, "in [0, 1]")
SHARE: Rule = (lambda v: 0 <= v < 1, "in [0, 1)")  # what a split takes: something must be left to train on
STEPS_OR_NO_LIMIT: Rule = (lambda v: v >= -1, ">= 0, or -1 for no limit")
BATCHES: Rule = (lambda v: v >= 0 and (v <= 1 or float(v).is_integer()), "a fraction in [0, 1] or a count >= 0")

# Packages whose classes the name rules apply to (a library class may mean something else by `threshold`)
PROJECT_PACKAGES = ("mmclin.", "encoders.", "datamodules.")

PROJECT_RULES: dict[str, Rule] = {
    # optimisation
    "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "warmup": NON_NEGATIVE, "eps": POSITIVE,
    "beta": POSITIVE,  # DPO's KL temperature
    "label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),  # conservative DPO's flipped-label rate
    "sft_weight": NON_NEGATIVE, "aux_loss_weight": NON_NEGATIVE, "complex_weight": NON_NEGATIVE,
    "head_lr_scale": NON_NEGATIVE, "head_steps": NON_NEGATIVE, "dropout": SHARE,
    "threshold": FRACTION, "border_threshold": FRACTION, "n_boot": AT_LEAST_ONE,
    # data
    "batch_size": POSITIVE, "eval_batch_size": POSITIVE, "num_workers": NON_NEGATIVE,
    "val_fraction": SHARE, "test_fraction": SHARE, "val_subjects": SHARE, "test_subjects": SHARE,
    "error_rate": FRACTION, "max_errors_per_report": AT_LEAST_ONE,
    "target_fs": POSITIVE, "epoch_s": POSITIVE, "context_epochs": NON_NEGATIVE, "trim_wake_min": NON_NEGATIVE,
    "image_size": POSITIVE, "demo_image_size": POSITIVE, "spacing": POSITIVE, "grid": POSITIVE,
    "demo_records": POSITIVE, "demo_subjects": POSITIVE, "demo_hours": POSITIVE, "demo_images": POSITIVE,
    "demo_studies": POSITIVE, "demo_lesions_per_class": POSITIVE,
    "pairs_per_study": AT_LEAST_ONE, "noise_sigma": NON_NEGATIVE,
    # model sizes
    "d_model": POSITIVE, "n_heads": POSITIVE, "num_heads": POSITIVE, "hidden_size": POSITIVE,
    "intermediate_size": POSITIVE, "num_hidden_layers": POSITIVE, "num_attention_heads": POSITIVE,
    "mlp_dim": POSITIVE, "mlp_ratio": POSITIVE, "ff_mult": POSITIVE, "n_latents": POSITIVE, "depth": POSITIVE,
    "num_layers": POSITIVE, "patch_size": POSITIVE, "img_size": POSITIVE, "stride": POSITIVE,
    "max_new_tokens": POSITIVE, "max_length": POSITIVE, "vocab_size": POSITIVE, "max_media": POSITIVE,
    "every_n": POSITIVE, "xattn_every_n": POSITIVE, "erode": NON_NEGATIVE, "every_n_train_steps": NON_NEGATIVE,
}

TRAINER_RULES: dict[str, Rule] = {
    "max_epochs": STEPS_OR_NO_LIMIT, "max_steps": STEPS_OR_NO_LIMIT, "min_epochs": NON_NEGATIVE,
    "min_steps": NON_NEGATIVE, "accumulate_grad_batches": AT_LEAST_ONE, "gradient_clip_val": NON_NEGATIVE,
    "check_val_every_n_epoch": AT_LEAST_ONE, "val_check_interval": POSITIVE,
    "num_sanity_val_steps": STEPS_OR_NO_LIMIT, "log_every_n_steps": NON_NEGATIVE, "num_nodes": AT_LEAST_ONE,
    "limit_train_batches": BATCHES, "limit_val_batches": BATCHES, "limit_test_batches": BATCHES,
    "limit_predict_batches": BATCHES,
}


def check_numbers(config: Mapping[str, Any]) -> None:
    """Refuse the first number in `config` (one subcommand's settings as plain dicts) that cannot work.

    Checked: the ``trainer`` block by :data:`TRAINER_RULES`; the ``init_args`` of every class of this project
    (the model, the data, nested encoders, connectors, a wrapped ``base`` datamodule, and plain dicts inside them
    such as ``lm.tiny``) by :data:`PROJECT_RULES`; ``lr`` wherever it is set (``--optimizer``).

    Raises:
        ConfigError: ``<setting path>=<value>: must be <rule>``; NaN and infinities are refused everywhere.
    """
    _check(config.get("trainer") or {}, "trainer", TRAINER_RULES)
    for path, settings, own in _class_settings(config, "", False):
        _check(settings, path, PROJECT_RULES if own else {"lr": POSITIVE})
        val, test = settings.get("val_fraction"), settings.get("test_fraction")
        if own and _number(val) and _number(test) and val + test >= 1:
            raise ConfigError(f"{path}.val_fraction + test_fraction = {val} + {test}: must be < 1, leaving "
                              "studies to train on")


def _class_settings(node: Any, path: str, own: bool) -> Iterator[tuple[str, Mapping, bool]]:
    """(path, mapping, of a project class?) for every ``init_args`` in `node` and every mapping inside one."""
    if isinstance(node, Mapping):
        if own and path:
            yield path, node, own
        class_path = node.get("class_path")
        for key, value in node.items():
            child = f"{path}.{key}" if path else str(key)
            if key == "init_args" and isinstance(value, Mapping):
                project = isinstance(class_path, str) and class_path.startswith(PROJECT_PACKAGES)
                yield child, value, project
                for inner, item in value.items():
                    yield from _class_settings(item, f"{child}.{inner}", project)
            else:
                yield from _class_settings(value, child, own)
    elif isinstance(node, list | tuple):
        for i, item in enumerate(node):
            yield from _class_settings(item, f"{path}[{i}]", own)


def _check(settings: Mapping, path: str, rules: Mapping[str, Rule]) -> None:
    for name, (holds, needs) in rules.items():
        value = settings.get(name)
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            if _number(v) and not (math.isfinite(v) and holds(v)):
                raise ConfigError(f"{path}.{name}={value!r}: must be {needs}")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)

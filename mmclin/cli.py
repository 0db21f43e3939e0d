"""The ``mmclin`` / ``lightning`` command: a LightningCLI over every model and datamodule of the project."""

from __future__ import annotations

import difflib
import inspect
import math
import os
import re
import sys
from pathlib import Path
from typing import NoReturn

import lightning as L
import torch
import yaml
from jsonargparse import ActionConfigFile, Namespace, get_loader
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import datamodules  # noqa: F401  (registers datamodules so configs can name them by class)
import encoders  # noqa: F401
import mmclin.models  # noqa: F401
from datamodules.preference import PreferenceDataModule
from mmclin.checkpoints import check_checkpoint_fits, config_class, read_checkpoint
from mmclin.contracts import ClinicalDataModule
from mmclin.errors import ConfigError, run_entry_point
from mmclin.runs import CSVRunLogger, SaveRunConfig
from mmclin.setting_checks import check_numbers


class MMClinArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose parse errors are one line (a ConfigError) naming the key at fault and, for a
    misspelt one, the closest valid key; not jsonargparse's usage dump of every option (``--help`` lists them).
    A shortened option is no option: argparse would take ``--trainer.max_epoch`` for ``--trainer.max_epochs``, and a
    typo that happens to be a prefix would run silently."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse's inner parsers raise, and their callers try the next type
            super().error(message, ex)
        raise ConfigError(parse_error_line(message, getattr(ex, "subcommand_parser", None) or self))


def parse_error_line(message: str, parser: LightningArgumentParser) -> str:
    """jsonargparse's message (nested "Parser key ... Does not validate against any of the Union subtypes ...") as
    one line: ``data: 'batch_sise' is not a setting of datamodules.X; did you mean 'batch_size'?``."""
    keys = list(dict.fromkeys(re.findall(r'Parser key "([^"]+)"', message)))
    where = ".init_args.".join(keys)
    option = re.search(r"Option '([^']+)' is not accepted", message)
    if option:
        classes = re.findall(r"Problem with given class_path '([^']+)'", message[:option.start()])
        owner = classes[-1] if classes else where
        return f"{where}: {option.group(1)!r} is not a setting of {owner}" + _closest(
            option.group(1), _init_parameters(classes[-1]) if classes else [])
    known = [s for action in parser._actions for s in action.option_strings]  # argparse keeps them there
    unknown = re.match(r"unrecognized arguments: (.*)", message)
    if unknown:
        flags = [a for a in unknown.group(1).split() if a.startswith("--")]
        return message + (_closest(flags[0], known) if flags else "")
    unknown = re.search(r"does not accept option '([^']+)'", message)  # a key of a config file
    if unknown:
        return message + _closest(unknown.group(1), [k.removeprefix("--") for k in known])
    skip = ("Does not validate", "Subtypes:", "Errors:", "Given value type:", "Problem with given",
            "Expected a <class 'NoneType'>")  # jsonargparse's account of the types it tried
    if "Got value: " in message:  # the value is in the error itself
        skip += ("Given value: ",)
    lines = [re.sub(r'Parser key "[^"]+":', "", line).strip().lstrip("- ") for line in message.splitlines()]
    lines = [re.sub(r"^Given value: (NestedArg\(key='[^']*', val=(.*)\)|(.*))$", r"got \2\3", line)
             for line in lines if line and not line.startswith(skip)]
    detail = "; ".join(dict.fromkeys(lines))
    return f"{where}: {detail}"[:600] if where else detail[:600]


def _init_parameters(class_path: str) -> list[str]:
    """The constructor arguments of `class_path` (already imported by the parser), or none if it is not found."""
    cls = config_class(class_path)
    try:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"] if cls else []
    except (TypeError, ValueError):  # a constructor without a signature (a builtin)
        return []


def _closest(key: str, known: list[str]) -> str:
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


class ConfigFile(ActionConfigFile):
    """``-c FILE``, where FILE may start from other config files: a top-level ``config: BASE`` (a path relative to
    FILE, or a list of them, each of which may start from others) is applied first and the rest of FILE on top,
    exactly as ``-c BASE -c FILE`` would: sections merge key by key, a class's ``init_args`` merge while its
    ``class_path`` stays, and a list (``trainer.callbacks``) replaces the base's (``callbacks+:`` appends to it).

    jsonargparse (4.53) reads a ``config:`` key inside a file itself, but then lets each top-level section of the
    file replace the included one whole: a run config's ``trainer:`` would drop every shared trainer setting.
    """

    def __call__(self, parser, cfg, values, option_string=None):
        self._apply(parser, cfg, values, ())

    def _apply(self, parser, cfg, value, chain: tuple[Path, ...]) -> None:
        if not (isinstance(value, str) and os.path.isfile(value)):  # a YAML string on the command line
            self.apply_config(parser, cfg, self.dest, value)
            return
        path = Path(value)
        content = get_loader("yaml")(path.read_text(encoding="utf-8"))  # as jsonargparse reads it
        if not isinstance(content, dict) or "config" not in content:
            self.apply_config(parser, cfg, self.dest, value)
            return
        if path.resolve() in chain:
            raise ConfigError(f"{path}: config: includes itself ({' -> '.join(map(str, (*chain, path)))})")
        bases = content.pop("config")
        for base in [bases] if isinstance(bases, str) else bases:
            if not (path.parent / base).is_file():
                raise ConfigError(f"{path}: config: {base!r} not found (relative to {path.parent})")
            self._apply(parser, cfg, str(path.parent / base), (*chain, path.resolve()))
        self.apply_config(parser, cfg, self.dest, yaml.safe_dump(content, sort_keys=False))


class MMClinCLI(LightningCLI):
    """LightningCLI in subclass mode: ``model:`` and ``data:`` take ``class_path``/``init_args``; a config file may
    start from others (:class:`ConfigFile`).

    Before anything is built: a checkpoint of another model or data family (``--ckpt_path``) and impossible
    numbers (:func:`mmclin.setting_checks.check_numbers`) are refused; parse errors and the trainer's own checks
    end in one ConfigError line.
    """

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        """LightningCLI's parser, its ``-c/--config`` a :class:`ConfigFile`."""
        kwargs.setdefault("dump_header", [f"lightning.pytorch=={L.__version__}"])
        parser = self.parser_class(**kwargs)
        parser.add_argument("-c", "--config", action=ConfigFile,
                            help="Path to a configuration file in yaml or json format (it may start from others: "
                                 "`config: BASE` in it, relative to it), or the configuration itself.")
        return parser

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="fit only: then test the best checkpoint (the last one without a monitored metric) "
                                 "on the test split and print its figures")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """As LightningCLI's; then a ``--ckpt_path`` checkpoint is read with our named errors and refused when it is
        of another model or data family than the config (:func:`~mmclin.checkpoints.check_checkpoint_fits`), before
        LightningCLI makes its model settings the config's."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        ckpt_path = config.get("ckpt_path") if config is not None else None
        if ckpt_path and Path(ckpt_path).is_file():
            check_checkpoint_fits(read_checkpoint(ckpt_path), ckpt_path, _as_dict(config.get("model")),
                                  _as_dict(config.get("data")))

    def before_instantiate_classes(self) -> None:
        """Impossible numbers refused (see :func:`~mmclin.setting_checks.check_numbers`). A :class:`CSVRunLogger`
        given no ``save_dir`` writes under the trainer's ``default_root_dir`` (so a run config names its directory
        once: ``default_root_dir: runs/<name>``). Preference data given no ``init_from`` reads the base data of the
        supervised checkpoint the model starts from (``model.init_args.init_from``). bf16 on a CPU without bf16
        units runs its matrix products ~100x slower than fp32 (docs/benchmarks.md): there, a config's ``bf16-mixed``
        becomes ``32-true``, with a warning."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        check_numbers(config.as_dict())
        _drop_unknown_recorded_settings(config.get("model"))
        _logger_under_root_dir(config.get("trainer"))
        _preference_data_from_init(config)
        trainer = config.get("trainer") if config is not None else None
        if trainer is None or not str(trainer.get("precision") or "").startswith("bf16"):
            return
        on_cpu = trainer.get("accelerator") == "cpu" or (trainer.get("accelerator") == "auto" and not (
            torch.cuda.is_available() or torch.backends.mps.is_available()))
        if on_cpu and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            rank_zero_warn(f"precision {trainer['precision']}: this CPU has no bf16 units, where bf16 matrix products "
                           "run far slower than fp32; training in 32-true instead")
            trainer["precision"] = "32-true"

    def instantiate_trainer(self, **kwargs):
        """Lightning's own checks of the trainer settings (``devices``, ``strategy``, ...) as one ConfigError line."""
        try:
            return super().instantiate_trainer(**kwargs)
        except MisconfigurationException as err:
            raise ConfigError(f"trainer: {err}") from err

    def after_fit(self) -> None:
        """Print the final validation figures, the data's baselines and where the checkpoint went; test if asked."""
        self._print_metrics("val", "Validation metrics (last epoch)")
        best = next((c.best_model_path for c in self.trainer.checkpoint_callbacks if c.best_model_path), None)
        last = next((c.last_model_path for c in self.trainer.checkpoint_callbacks if c.last_model_path), None)
        if best:
            rank_zero_info(f"Best checkpoint: {best}")
        if last:
            rank_zero_info(f"Last checkpoint: {last} (resume with --ckpt_path)")
        if self.config[self.subcommand].get("test_after_fit"):
            rank_zero_info(f"Testing {best or 'the final weights'} on the test split")
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best, verbose=False)
            self._print_metrics("test", "Test metrics")

    def after_test(self) -> None:
        self._print_metrics("test", "Test metrics")

    def after_validate(self) -> None:
        self._print_metrics("val", "Validation metrics")

    def _print_metrics(self, split: str, title: str) -> None:
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith(f"{split}/")}
        if isinstance(self.datamodule, ClinicalDataModule):  # what a trivial answerer scores on the split
            metrics.update({f"{split}/baseline/{k}": v for k, v in self.datamodule.baselines(split).items()})
        if metrics:
            rank_zero_info(f"{title}:\n" + metrics_table(metrics))


def metrics_table(metrics: dict[str, float], depth: int = 2) -> str:
    """Metrics as aligned lines, a bootstrap interval beside its figure and finer breakdowns left to the logs.

    ``x_ci_low/...`` and ``x_ci_high/...`` print as ``value [low, high]`` on the line of ``x/...``. Names are
    ``split/metric[/group[/subgroup]]`` (``split/baseline/...`` counts from after ``baseline``); those with more than
    `depth` parts after the split (e.g. a VQA question subtype) are counted, not printed: every figure is in the
    logger's metrics file.
    """
    def parts(name: str) -> list[str]:
        rest = name.split("/")[1:]
        return rest[1:] if rest[:1] == ["baseline"] else rest

    bounds, figures = {}, {}
    for name, value in metrics.items():
        head, _, tail = name.partition("/")
        metric, _, group = tail.partition("/")
        side = next((s for s in ("low", "high") if metric.endswith(f"_ci_{s}")), None)
        if side is None:
            figures[name] = value
        else:
            base = "/".join(p for p in (head, metric.removesuffix(f"_ci_{side}"), group) if p)
            bounds.setdefault(base, {})[side] = value
    shown = {k: v for k, v in figures.items() if len(parts(k)) <= depth}
    hidden = len(figures) - len(shown)
    width = max(map(len, shown), default=0)
    lines = []
    for name, value in sorted(shown.items()):
        text = f"{value:.4f}" if math.isfinite(value) else "nan"
        if {"low", "high"} <= set(bounds.get(name, {})):
            text += f" [{bounds[name]['low']:.4f}, {bounds[name]['high']:.4f}]"
        lines.append(f"  {name:<{width}}  {text}")
    if hidden:
        plural = "s" * (hidden > 1)
        lines.append(f"  ({hidden} finer figure{plural}, e.g. per question subtype, in the logger's metrics file)")
    return "\n".join(lines)


def _as_dict(settings: Namespace | dict | None) -> dict | None:
    """A config's ``model`` or ``data`` as plain dicts; None when unset."""
    return settings.as_dict() if isinstance(settings, Namespace) else settings


def _drop_unknown_recorded_settings(model: Namespace | None) -> None:
    """``--ckpt_path``: LightningCLI passes every hyper-parameter the checkpoint records as ``dict_kwargs``; those the
    model no longer takes are dropped with a warning (checkpoints written before class names went to CLIP alone
    recorded the data's ``classnames`` for every model)."""
    extra = model.get("dict_kwargs") if isinstance(model, Namespace) else None
    cls = config_class(model.get("class_path")) if extra else None
    if cls is None:
        return
    accepted = set(inspect.signature(cls.__init__).parameters)
    unknown = sorted(set(extra) - accepted)
    if unknown:
        rank_zero_warn(f"--ckpt_path: the checkpoint records settings {cls.__name__} does not take: {unknown}; "
                       "ignored")
        model.dict_kwargs = {k: v for k, v in extra.items() if k in accepted}


def _logger_under_root_dir(trainer: Namespace | None) -> None:
    """A :class:`~mmclin.runs.CSVRunLogger` without a ``save_dir`` gets the trainer's ``default_root_dir`` (Lightning's
    default, the working directory, when that is unset too)."""
    loggers = trainer.get("logger") if trainer is not None else None
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if not isinstance(logger, Namespace) or logger.get("init_args") is None:
            continue
        cls = config_class(logger.get("class_path"))
        if cls is not None and issubclass(cls, CSVRunLogger) and logger.init_args.get("save_dir") is None:
            logger.init_args.save_dir = trainer.get("default_root_dir") or os.getcwd()


def _preference_data_from_init(config: Namespace) -> None:
    """:class:`~datamodules.preference.PreferenceDataModule` without its own ``init_from`` gets the model's: the
    supervised checkpoint whose recorded datamodule is the base of the pairs."""
    data, model = config.get("data"), config.get("model")
    if not isinstance(data, Namespace) or not isinstance(model, Namespace):
        return
    cls = config_class(data.get("class_path"))
    if cls is None or not issubclass(cls, PreferenceDataModule) or data.get("init_args") is None:
        return
    init_from = model.init_args.get("init_from") if model.get("init_args") is not None else None
    if data.init_args.get("init_from") is None:
        data.init_args.init_from = init_from
    elif init_from is not None and str(data.init_args.init_from) != str(init_from):
        raise ConfigError(f"data.init_args.init_from ({data.init_args.init_from}) and model.init_args.init_from "
                          f"({init_from}) name two supervised checkpoints; give one (the model's is enough)")


def build_cli(args: list[str] | None = None, run: bool = True) -> MMClinCLI:
    """The CLI; with ``run=False`` it only parses and instantiates (cli.model, cli.datamodule, cli.trainer)."""
    return MMClinCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True},
        parser_class=MMClinArgumentParser,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of ``mmclin``, ``lightning`` and ``python -m mmclin``.

    Bad input data, settings or checkpoints end the run with one line naming the file, record or setting and the
    problem, and exit code 2 (also when a DataLoader worker raised it); ``--debug`` (or ``MMCLIN_DEBUG=1``) shows
    the full traceback instead.
    """
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["predict"] and "--model" in argv:  # one study: `mmclin predict --model MODEL --input FILE`
        from mmclin.study import main as predict_main

        run_entry_point(predict_main, argv[1:])
        return
    if args is None and "--debug" in sys.argv:  # LightningCLI parses sys.argv itself, as do DDP's child processes
        sys.argv = [a for a in sys.argv if a != "--debug"]
        os.environ["MMCLIN_DEBUG"] = "1"
    run_entry_point(lambda argv: build_cli(argv if args is not None else None), args or [])


if __name__ == "__main__":
    main()

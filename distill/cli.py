"""Command lines: flags generated from the config dataclasses, named as in diffusers' LCM distillation scripts."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import typing
from pathlib import Path

from .data import ImageDataConfig
from .errors import DistillError
from .methods import get_method
from .stop_signals import TrainingStopped
from .trainer import Trainer, TrainConfig, started_as_module

# Each flag's help is its dataclass field's metadata["help"] (metadata["help_off"] for the --no_X flag of a boolean
# that defaults to True); tests/test_cli_help.py checks that no flag lacks one.
# Flags of diffusers' scripts that this toolkit accepts under the same name but handles elsewhere or ignores.
ALIASES = {"train_shards_path_or_url": "train_data_dir"}
ACCEPTED_NO_EFFECT = {
    "local_rank": "set by the launcher; accelerate reads it from the environment",
    "cast_teacher_unet": "the teacher is the student's UNet with LoRA disabled, already in the weight dtype",
    "revision": "use --teacher_revision",
    "variant": "weights are read in the teacher's stored precision",
}


def _base_type(hint):
    """The scalar type of an annotation such as ``int | None`` or ``list[str]``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (list, dict):
        return typing.get_origin(hint), (args[0] if args else str)
    if args:
        return _base_type(args[0])
    return hint, None


def _parse_mapping(text: str) -> dict:
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected name=value[,name=value], got {text!r}")
    return {k: float(v) for k, v in pairs}


def field_help(f: dataclasses.Field, off: bool = False) -> str:
    """The help of a field's flag (``off``: of the --no_X flag that turns a default-True boolean off), with any
    literal % escaped for argparse's %-formatting of help strings."""
    text = f.metadata.get("help", "")
    if off:
        text = f.metadata.get("help_off") or f"Turn this off (it is on by default): {text}"
    return text.replace("%", "%%")


def with_default(text: str, default) -> str:
    """``text (default: value)``, unless the default is empty or unset and ``text`` already says what it means."""
    if default == "" or (default is None and "default" in text):
        return text
    return f"{text} (default: {default})"


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, seen: set[str]) -> None:
    """One --flag per dataclass field, its help from the field (booleans become store_true, lists comma-separated)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in seen:
            continue
        seen.add(f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind, item = _base_type(hints[f.name])
        help_text = with_default(field_help(f), default)
        flag = f"--{f.name}"
        if kind is bool and default is False:
            parser.add_argument(flag, action="store_true", help=field_help(f))
        elif kind is bool:
            parser.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", help=field_help(f, off=True))
        elif kind is list:
            parser.add_argument(flag, type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                                default=None, help=help_text)
        elif kind is dict:
            parser.add_argument(flag, type=_parse_mapping, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, help=help_text)


def build_parser(method_name: str) -> argparse.ArgumentParser:
    """The parser for one method's command line."""
    method_cls = get_method(method_name)
    prog = f"python -m distill {method_name}" if started_as_module() else None  # None: the script's file name
    parser = argparse.ArgumentParser(prog=prog,
                                     description=f"Distil an SD, SDXL, SD3 or FLUX.1 teacher with {method_name}.")
    seen: set[str] = set()
    for cls in (TrainConfig, ImageDataConfig, method_cls.Config):
        add_dataclass_flags(parser, cls, seen)
    parser.add_argument("--validation_prompt", dest="validation_prompts", type=lambda s: [s], default=None,
                        help="A single validation prompt (same as --validation_prompts with one prompt).")
    for alias, target in ALIASES.items():
        parser.add_argument(f"--{alias}", dest=target, default=None, help=f"Same as --{target}.")
    for name, reason in ACCEPTED_NO_EFFECT.items():
        parser.add_argument(f"--{name}", default=None, help=f"Accepted for compatibility: {reason}.")
    return parser


def pick(cls, values: dict):
    """Build ``cls`` from the parsed values it knows, keeping its defaults for flags not given."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names and v is not None})


CONFIG_FLAG_HELP = ("A YAML (or JSON) file of settings, named as the flags without '--' (e.g. 'learning_rate: 1e-4'); "
                    "flags on the command line override it. Every run writes its resolved settings to "
                    "output_dir/run_config.yaml, which repeats the run when passed here.")


def read_config_file(path: str, parser: argparse.ArgumentParser, method_name: str | None = None) -> dict:
    """Settings of a --config file as parser defaults: keys are flag names, values typed as on the command line."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise DistillError(f"--config {path} does not exist: pass a YAML file of settings (flag names without --).")
    try:
        loaded = yaml.safe_load(file.read_text()) if file.suffix != ".json" else json.loads(file.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise DistillError(f"--config {path} is not valid YAML/JSON: {str(error).splitlines()[0]}") from error
    if not isinstance(loaded, dict):
        raise DistillError(f"--config {path} must hold a mapping of settings (name: value), got {type(loaded).__name__}.")
    loaded = {k.lstrip("-"): v for k, v in loaded.items()}
    recorded_method = loaded.pop("method", None)
    if method_name and recorded_method not in (None, method_name):
        raise DistillError(f"--config {path} is the settings of a {recorded_method} run, not {method_name}: use "
                           f"that method's command line, or remove the 'method' line.")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    unknown = sorted(set(loaded) - set(actions))
    if unknown:
        raise DistillError(f"--config {path} has unknown settings: {', '.join(unknown)}. Names are the command line's "
                           "flags without '--' (see --help).")
    return {name: _typed(actions[name], value, path) for name, value in loaded.items()}


def _typed(action: argparse.Action, value, path: str):
    """A file value converted as its flag would convert the same text (lists and mappings may be YAML's own)."""
    if value is None or isinstance(value, bool) or action.type is None:
        return value
    if isinstance(value, list):
        return [str(item) for item in value]
    if isinstance(value, dict):  # YAML reads 1e-3 as text: convert as --learning_rates name=value would
        value = ",".join(f"{k}={v}" for k, v in value.items())
    try:
        return action.type(value if isinstance(value, str) else str(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
        raise DistillError(f"--config {path}: {action.dest}: {value!r} is not valid ({error}).") from error


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None, method_name: str | None = None) -> dict:
    """Parse ``argv``: a --config file's settings first, then the command line's flags over them."""
    parser.add_argument("--config", default=None, help=CONFIG_FLAG_HELP)
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**read_config_file(known.config, parser, method_name))
    values = vars(parser.parse_args(argv))
    values.pop("config")
    return values


def configs_from_args(method_name: str, argv: list[str] | None = None):
    """Parse a command line (and its --config file) into (method config, data config, train config)."""
    values = parse_with_config(build_parser(method_name), argv, method_name)
    if values.get("validation_prompts") is None:
        values.pop("validation_prompts")
    train = pick(TrainConfig, values)
    data_values = {**values, "cache_dir": train.cache_dir, "seed": train.seed}
    return pick(get_method(method_name).Config, values), pick(ImageDataConfig, data_values), train


def run_command(work: typing.Callable[[], object]) -> int:
    """Run a command line's work: user errors end in one clear `error:` line (exit 2), not a traceback."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        work()
    except DistillError as error:
        sys.stderr.write(f"error: {error}\n")  # one write: lines of several processes sharing a log stay whole
        sys.stderr.flush()
        return 2
    except TrainingStopped as stopped:  # its one line (checkpoint and resume command) is already printed
        return stopped.exit_code
    except KeyboardInterrupt:  # Ctrl-C before the trainer's own handler was installed: nothing to save yet
        print("Interrupted before training started; nothing was written.", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


def main(method_name: str, argv: list[str] | None = None) -> int:
    """Entry point of train_scripts/<method>.py and ``python -m distill <method>``."""

    def train() -> None:
        method_config, data_config, train_config = configs_from_args(method_name, argv)
        Trainer(method_name, method_config, data_config, train_config).run()

    return run_command(train)

"""The release's command line, generated from `ReleaseParams`: every field is a flag with its help text.

    python -m flows.release --help
    make release ARGS="--arch resnet18 --random-init --gate.min-accuracy 0.5"
    python -m flows.release --params-file release.json --port 9000

Nested settings are dotted flags (`--gate.min-accuracy`, `--benchmark.batch-sizes 1,4`), booleans are
switches (`--random-init` / `--no-random-init`), and a few shortcuts stay as before (`--port`,
`--benchmark-duration`, `--batch-sizes`). `--params-file` reads a JSON object shaped like the Prefect
deployment's `params` parameter; flags override it. Environment variables are never read (make exports
its own variables such as TARGET or PORT into every recipe). An invalid value is reported with the
flag that carries it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, CliSettingsSource, SettingsConfigDict, SettingsError

from flows.params import ReleaseParams

SHORTCUTS = {"server.port": "port", "benchmark.duration_s": "benchmark-duration", "benchmark.batch_sizes": "batch-sizes"}


class ArgumentError(ValueError):
    """The command line cannot be read; the message names the flag and what is wrong."""


class ReleaseCommand(BaseSettings, ReleaseParams):
    """Export, validate, register, gate, deploy and smoke-test a model; promote it if all pass.
    Exit status: 0 promoted, 1 rejected by the gate or failed, 2 bad parameters."""

    model_config = SettingsConfigDict(
        cli_prog_name="python -m flows.release",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_avoid_json=True,
        cli_hide_none_type=True,
        cli_use_class_docs_for_groups=True,
        cli_exit_on_error=False,
        cli_shortcuts=SHORTCUTS,
        nested_model_default_partial_update=True,
        extra="forbid",
    )

    debug: bool = Field(False, description="show the Python traceback of a failed release")
    params_file: Path | None = Field(None, description="JSON object of release parameters (the Prefect "
                                                       "deployment's `params`), applied before the flags")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return (init_settings,)  # the command line (and --params-file), never the environment


def parse_command(argv: list[str]) -> tuple[ReleaseParams, bool]:
    """argv -> (the release parameters, --debug). Raises ArgumentError naming the flag; --help exits 0."""
    try:
        source = CliSettingsSource(ReleaseCommand, cli_parse_args=argv)
        from_file = read_params_file(params_file_argument(argv))
        command = ReleaseCommand(_cli_settings_source=source, **from_file)
    except SettingsError as error:
        raise ArgumentError(str(error)) from None
    except ValidationError as error:
        raise ArgumentError(explain(error)) from None
    return ReleaseParams.model_validate(command.model_dump(exclude={"debug", "params_file"})), command.debug


def params_file_argument(argv: list[str]) -> Path | None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--params-file", type=Path)
    return parser.parse_known_args(argv)[0].params_file


def read_params_file(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise ArgumentError(f"--params-file {path}: cannot be read ({error.strerror or error})") from None
    except json.JSONDecodeError as error:
        raise ArgumentError(f"--params-file {path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ArgumentError(f"--params-file {path}: expected a JSON object of release parameters")
    return data


def flag_name(location: tuple) -> str:
    dotted = ".".join(str(part) for part in location if not isinstance(part, int))
    flag = "--" + dotted.replace("_", "-")
    return f"{flag} (--{SHORTCUTS[dotted]})" if dotted in SHORTCUTS else flag


def explain(error: ValidationError) -> str:
    lines = [f"  {flag_name(item['loc'])}: {item['msg']}" + ("" if item.get("type") == "missing"
                                                               else f" (got {item.get('input')!r})")
             for item in error.errors()]
    return "invalid release parameters:\n" + "\n".join(lines)

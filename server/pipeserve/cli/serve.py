"""`pipeserve serve`: its flags come from the settings table (pipeserve.settings), each mirrored
by a PIPESERVE_* environment variable; a flag wins over its variable."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pipeserve.settings import (
    Option,
    Settings,
    SettingsError,
    env_name,
    flag_of,
    options,
)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


# Namespace attribute: the dests whose flag was given on the command line.
GIVEN = "given_on_command_line"


def _recording(base: type[argparse.Action]) -> type[argparse.Action]:
    """`base`, also noting in the namespace that its flag was given (so an invalid value can be
    blamed on the flag or on its PIPESERVE_* variable)."""

    class Recording(base):  # type: ignore[valid-type, misc]
        def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
            super().__call__(parser, namespace, values, option_string)
            setattr(namespace, GIVEN, getattr(namespace, GIVEN, frozenset()) | {self.dest})

    return Recording


_STORE = _recording(argparse._StoreAction)
_SWITCH = _recording(argparse._StoreTrueAction)
_APPEND = _recording(argparse._AppendAction)


class EnvValueError:
    """A PIPESERVE_* value that could not be converted. It stands as the parsed value until a
    flag replaces it, so a bad variable only matters when its flag is not given."""

    def __init__(self, message: str) -> None:
        self.message = message


def add_serve_parser(
    sub: argparse._SubParsersAction, environ: Mapping[str, str] | None = None
) -> None:  # type: ignore[type-arg]
    environ = os.environ if environ is None else environ
    p = sub.add_parser(
        "serve",
        help="serve the models of a repository over gRPC (KServe v2 / Triton protocol)",
        description="Serve every model of a Triton-layout model repository over gRPC (KServe v2 "
        "/ Triton protocol), with Prometheus metrics. Every flag can also be set with an "
        "environment variable named after it: PIPESERVE_ + the flag in upper case with '_' "
        "(e.g. PIPESERVE_GRPC_PORT=9001, PIPESERVE_NO_METRICS=1); a flag wins over its variable.",
    )
    hints = typing.get_type_hints(Settings)
    for name, opt, default in options():
        _add(p, name, opt, default, hints[name], environ)
    p.set_defaults(func=serve)


def _add(
    p: argparse.ArgumentParser,
    name: str,
    opt: Option,
    default: Any,
    kind: Any,
    environ: Mapping[str, str],
) -> None:
    flag = flag_of(name, opt)
    variable = env_name(name, opt)
    raw = environ.get(variable)
    dest = _dest(name, opt)
    if kind is bool and opt.negate:
        # A switch that turns a setting off: --no-metrics.
        off: Any = False if raw is None else _env_bool(raw, variable, flag)
        p.add_argument(flag, action=_SWITCH, dest=dest, default=off, help=opt.help)
        return
    if kind is bool:
        # `--strict-x` alone means true; `--strict-x false` turns a default of true off.
        value: Any = default if raw is None else _env_bool(raw, variable, flag)
        p.add_argument(
            flag,
            action=_STORE,
            dest=dest,
            type=_parse_bool,
            nargs="?",
            const=True,
            default=value,
            metavar="BOOL",
            help=f"{opt.help} (default: {str(default).lower()})",
        )
        return
    if opt.repeat:
        value = [v for v in raw.split(",") if v] if raw is not None else None
        p.add_argument(
            flag,
            action=_APPEND,
            dest=dest,
            default=value or None,
            metavar=opt.metavar,
            help=opt.help + f" (variable: {variable}, comma-separated)",
        )
        return
    convert = _converter(kind, opt)
    value = default
    if raw is not None:
        value = _env_value(convert, raw, variable, flag, kind)
    p.add_argument(
        flag,
        action=_STORE,
        dest=dest,
        type=convert,
        default=value,
        choices=opt.choices or None,
        metavar=opt.metavar,
        help=opt.help if default is None else f"{opt.help} (default: {default})",
    )


def _converter(kind: Any, opt: Option) -> Callable[[str], Any]:
    if opt.upper:
        return str.upper
    if kind is Path or kind == Path | None:
        return Path
    return kind  # type: ignore[no-any-return]  # int, float, str: argparse names them in errors


def _env_value(convert: Callable[[str], Any], raw: str, variable: str, flag: str, kind: Any) -> Any:
    try:
        return convert(raw)
    except ValueError:
        return EnvValueError(
            f"argument {flag}: invalid {kind.__name__} value: '{raw}' "
            f"(from the environment variable {variable})"
        )


def _parse_bool(raw: str) -> bool:
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE[:-1]:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{raw}'")


def _env_bool(raw: str, variable: str, flag: str) -> bool | EnvValueError:
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    return EnvValueError(
        f"{variable}='{raw}': expected one of {', '.join(_TRUE + _FALSE[:-1])} (for {flag})"
    )


def settings_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> Settings:
    """The parsed command line as Settings. Raises SettingsError naming the flag, or the
    PIPESERVE_* variable when the value came from one."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(Settings)
    values: dict[str, Any] = {}
    for name, opt, _ in options():
        value = getattr(args, _dest(name, opt))
        if isinstance(value, EnvValueError):
            raise SettingsError(value.message, name)
        if hints[name] is bool and opt.negate:
            value = not value
        elif opt.repeat:
            value = tuple(value or ())
        values[name] = value
    try:
        return Settings(**values)
    except SettingsError as exc:
        if exc.setting:
            opt = Settings.__dataclass_fields__[exc.setting].metadata["option"]
            variable = env_name(exc.setting, opt)
            if variable in environ and _dest(exc.setting, opt) not in getattr(args, GIVEN, ()):
                raise SettingsError(
                    f"{exc} (from the environment variable {variable})", exc.setting
                ) from None
        raise


def _dest(name: str, opt: Option) -> str:
    return name if opt.repeat else flag_of(name, opt).removeprefix("--").replace("-", "_")


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop `--event-loop` names. uvloop runs the same transports and protocols with
    its C implementation of the loop and of socket I/O; the request path then spends less time
    in the loop itself (docs/benchmarks.md, "Event loop")."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":  # Settings checked it is installed; only a broken install
                raise
        else:
            logging.getLogger("pipeserve").info("event loop: uvloop %s", uvloop.__version__)
            return uvloop.new_event_loop
    logging.getLogger("pipeserve").info("event loop: asyncio")
    return asyncio.new_event_loop


def serve(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        print(f"pipeserve: error: {exc}", file=sys.stderr)
        return 2
    # After validation: logging raises on an unknown level.
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from pipeserve.app import App  # heavy imports only when serving

    async def main() -> None:
        await App(settings).run_until_signalled()

    try:
        with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
            runner.run(main())
    except SettingsError as exc:  # found when the server is built (TLS files: api/tls.py)
        print(f"pipeserve: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"pipeserve: error: {exc}", file=sys.stderr)
        return 1
    return 0

"""Restricted protocol groups, as Triton's `--grpc-restricted-protocol` / `--http-restricted-api`.

A group of RPCs / endpoints (Triton's names: `health`, `metadata`, `inference`, `shared-memory`,
`model-config`, `model-repository`, `statistics`, `trace`, `logging`) can
- require a header: `--grpc-restricted-protocol=model-repository,shared-memory:admin-key=s3cret`
  makes those RPCs answer only calls carrying the header `triton-grpc-protocol-admin-key: s3cret`
  (Triton's prefix; HTTP checks the bare key), or
- be turned off: `--grpc-disable-protocol=model-repository` (pipeserve's addition; Triton has no
  way to refuse a group outright).
HTTP has the same pair: `--http-restricted-api` (the bare key is the header) and
`--http-disable-api`.
A group may appear in one rule only. Groups not named stay open.

This module only parses and decides; each front end (api/restricted.py for gRPC, the HTTP front
end with its request headers) asks `Restrictions.denial` and answers with its own status.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

GROUPS = (
    "health",
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)

# Triton's kRestrictedProtocolHeaderTemplate: the gRPC header is this prefix + the configured key.
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"

# What gRPC metadata keys and HTTP header names may hold (lowercase; HTTP is case-insensitive).
_KEY = re.compile(r"[0-9a-z_.-]+")


class RestrictionError(ValueError):
    """A restriction flag that cannot be parsed; the message names the flag and the value,
    `flag` is the flag's name without dashes."""

    def __init__(self, message: str, flag: str) -> None:
        super().__init__(message)
        self.flag = flag


@dataclass(frozen=True, slots=True)
class Rule:
    """`header` None: the group is turned off."""

    header: str | None
    value: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class Restrictions:
    rules: Mapping[str, Rule] = field(default_factory=dict)
    # Triton's word in its answers: "This protocol is restricted" (gRPC), "This API is" (HTTP).
    noun: str = "protocol"

    def __bool__(self) -> bool:
        return bool(self.rules)

    def denial(self, group: str, header: Callable[[str], str | None]) -> str | None:
        """None when a call of `group` may proceed, else the message to refuse it with.
        `header(name)` returns the call's value of a (lowercase) header, or None."""
        rule = self.rules.get(group)
        if rule is None:
            return None
        if rule.header is None:
            return f"This {self.noun} is disabled on this server ('{group}')"
        got = header(rule.header)
        # Constant-time comparison: the value is a shared secret.
        if got is not None and hmac.compare_digest(got.encode(), rule.value.encode()):
            return None
        return f"This {self.noun} is restricted, expecting header '{rule.header}'"


def parse_restrictions(
    restricted: Iterable[str],
    disabled: Iterable[str],
    *,
    header_prefix: str,
    restricted_flag: str,
    disabled_flag: str,
    noun: str = "protocol",
) -> Restrictions:
    """`restricted`: values `<group>[,<group>...]:<key>=<value>`; `disabled`: values
    `<group>[,<group>...]`. Raises RestrictionError naming the flag."""
    rules: dict[str, Rule] = {}

    def add(groups_text: str, rule: Rule, flag: str, spec: str) -> None:
        groups = [g.strip() for g in groups_text.split(",")]
        for group in groups:
            if group not in GROUPS:
                raise RestrictionError(
                    f"--{flag}: unknown protocol group '{group}' in '{spec}', expected one of "
                    f"{', '.join(GROUPS)}",
                    flag,
                )
            if group in rules:
                raise RestrictionError(
                    f"--{flag}: protocol group '{group}' can not be specified in multiple "
                    "restriction groups",
                    flag,
                )
            rules[group] = rule

    # A PIPESERVE_* variable arrives split at every comma: a piece without ':' holds groups of
    # the next rule ('a,b:k=v' -> 'a', 'b:k=v'), so a value may not hold a comma.
    pending: list[str] = []
    for piece in restricted:
        if ":" not in piece and "=" not in piece:
            pending.append(piece)
            continue
        spec = ",".join([*pending, piece])
        pending = []
        groups_text, colon, setting = spec.partition(":")
        key, equals, value = setting.partition("=")
        key = key.strip().lower()
        if not (colon and equals and groups_text and key and value):
            raise RestrictionError(
                f"--{restricted_flag} format is '<protocols>:<key>=<value>', got '{spec}'",
                restricted_flag,
            )
        if not _KEY.fullmatch(key):
            raise RestrictionError(
                f"--{restricted_flag}: header key '{key}' in '{spec}' may hold only letters, "
                "digits, '-', '_' and '.'",
                restricted_flag,
            )
        add(groups_text, Rule(header_prefix + key, value), restricted_flag, spec)
    if pending:
        raise RestrictionError(
            f"--{restricted_flag} format is '<protocols>:<key>=<value>', got '{','.join(pending)}'",
            restricted_flag,
        )
    for spec in disabled:
        if not spec.strip():
            raise RestrictionError(
                f"--{disabled_flag} needs '<protocol>[,<protocol>...]'", disabled_flag
            )
        add(spec, Rule(None), disabled_flag, spec)
    return Restrictions(rules, noun)

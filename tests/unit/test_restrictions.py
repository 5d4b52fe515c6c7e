"""pipeserve.restrictions: parsing Triton's restricted-protocol syntax and deciding a call."""

from __future__ import annotations

import pytest

from pipeserve.restrictions import (
    GRPC_HEADER_PREFIX,
    RestrictionError,
    Restrictions,
    Rule,
    parse_restrictions,
)
from pipeserve.settings import Settings, SettingsError


def parse(restricted: list[str], disabled: list[str] = []) -> Restrictions:  # noqa: B006
    return parse_restrictions(
        restricted,
        disabled,
        header_prefix=GRPC_HEADER_PREFIX,
        restricted_flag="grpc-restricted-protocol",
        disabled_flag="grpc-disable-protocol",
    )


def test_triton_syntax_one_rule_per_group() -> None:
    r = parse(["model-repository,shared-memory:Admin-Key=s3cret", "statistics:ops=x=y"])
    admin = Rule("triton-grpc-protocol-admin-key", "s3cret")
    assert r.rules == {
        "model-repository": admin,
        "shared-memory": admin,
        "statistics": Rule("triton-grpc-protocol-ops", "x=y"),  # the value is all after '='
    }


def test_pieces_without_a_colon_join_the_next_rule() -> None:
    """A PIPESERVE_* variable is split at every comma before it gets here."""
    assert parse(["model-repository", "trace:k=v"]) == parse(["model-repository,trace:k=v"])
    with pytest.raises(RestrictionError, match="format is"):
        parse(["trace:k=v", "logging"])


@pytest.mark.parametrize(
    ("restricted", "disabled", "message"),
    [
        (["trace"], [], "format is '<protocols>:<key>=<value>', got 'trace'"),
        (["trace:k"], [], "format is"),
        (["trace:=v"], [], "format is"),
        (["trace:k="], [], "format is"),
        (["tracing:k=v"], [], "unknown protocol group 'tracing'"),
        (["trace:k=v", "trace:j=w"], [], "'trace' can not be specified in multiple"),
        (["trace:k=v"], ["logging,trace"], "--grpc-disable-protocol: protocol group 'trace'"),
        ([], [" "], "--grpc-disable-protocol needs"),
        (["trace:k y=v"], [], "header key 'k y'"),
    ],
)
def test_bad_rules_name_the_flag(restricted: list[str], disabled: list[str], message: str) -> None:
    with pytest.raises(RestrictionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(restricted, disabled)


def test_denial() -> None:
    r = parse(["model-repository:admin=s3cret"], ["trace"])
    headers = {"triton-grpc-protocol-admin": "s3cret"}
    assert r.denial("model-repository", headers.get) is None
    assert r.denial("model-repository", {}.get) == (
        "This protocol is restricted, expecting header 'triton-grpc-protocol-admin'"
    )
    assert r.denial("model-repository", {"triton-grpc-protocol-admin": "s3cre"}.get)
    assert r.denial("trace", headers.get) == "This protocol is disabled on this server ('trace')"
    assert r.denial("inference", {}.get) is None
    assert not parse([]) and r


def test_settings_reject_a_bad_rule_naming_its_flag(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SettingsError, match="unknown protocol group 'nope'") as bad:
        Settings(model_repository=tmp_path, grpc_disable_protocol=("nope",))
    assert bad.value.setting == "grpc_disable_protocol"
    s = Settings(model_repository=tmp_path, grpc_restricted_protocol=("health:k=v",))
    assert s.grpc_restrictions().rules == {"health": Rule("triton-grpc-protocol-k", "v")}


def test_http_rules_use_the_bare_key_and_say_api(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = Settings(model_repository=tmp_path, http_restricted_api=("trace:Admin=v",))
    r = s.http_restrictions()
    assert r.rules == {"trace": Rule("admin", "v")}
    assert r.denial("trace", {}.get) == "This API is restricted, expecting header 'admin'"
    with pytest.raises(SettingsError, match="--http-disable-api: unknown") as bad:
        Settings(model_repository=tmp_path, http_disable_api=("nope",))
    assert bad.value.setting == "http_disable_api"


def test_restricted_servicer_keeps_direct_handlers_only_for_open_rpcs() -> None:
    """A direct handler (no task, no metadata) must never stand in for a checked RPC."""
    from pipeserve.api.restricted import restrict

    class Servicer:
        def direct_methods(self) -> dict[str, object]:
            return {"ModelInfer": object(), "Unlisted": object()}

    open_inference = restrict(Servicer(), parse(["model-repository:admin-key=s3cret"]))
    assert list(open_inference.direct_methods()) == ["ModelInfer"]  # an unknown RPC: never
    closed = restrict(Servicer(), parse(["inference:admin-key=s3cret"]))
    assert closed.direct_methods() == {}

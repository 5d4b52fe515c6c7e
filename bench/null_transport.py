"""A transport that discards what is written: for in-process benchmarks that feed a protocol
object bytes and measure only its own CPU (bench/h2_parse_cost.py, bench/request_cost.py)."""

from __future__ import annotations

from typing import Any


class NullTransport:
    def write(self, data: Any) -> None:
        pass

    def writelines(self, data: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

"""`python -m tests.unit.h2.serve '<json>'`: the Stats echo server of hostile.py in its own
process (so a test can read its memory), with the H2Limits given as JSON. Prints `port N`."""

from __future__ import annotations

import asyncio
import json
import sys

from pipeserve.api.h2.limits import H2Limits
from tests.unit.h2.hostile import start


async def main(config: dict) -> None:  # type: ignore[type-arg]
    server, _, port = await start(H2Limits(**config["limits"]), config["max_message"])
    print(f"port {port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))

"""KServe v2 HTTP/REST front end with Triton's extensions, a thin adapter over the DataPlane.

server.py       the listener (uvicorn + httptools) and the ASGI callable, limits, drain
routes.py       the URL table and one handler per endpoint
codec.py        inference JSON + binary sections <-> InferRequest / InferResponse
compression.py  gzip / deflate bodies
views.py        metadata, config, statistics, index as Triton's JSON
errors.py       domain error -> HTTP status, the one table
"""

"""Prometheus metrics: the per-model recorder and Triton-named families (`recorder`), GPU
series read from NVML at scrape time (`gpu`), and the /metrics endpoint that writes the text
exposition (`http`). The registry is always passed in, never global."""

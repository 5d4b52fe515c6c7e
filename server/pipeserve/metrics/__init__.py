"""Prometheus metrics: the per-model recorder and Triton-named families (`recorder`), the host's
CPU and memory read from /proc (`cpu`) and GPU series read from NVML (`gpu`), both at scrape
time, and the /metrics endpoint that writes the text exposition (`http`). The registry is always
passed in, never global."""

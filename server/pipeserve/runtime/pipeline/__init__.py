"""Pipeline-parallel execution: the `parameters` that ask for it (`config`), one session per
stage on one device (`stage`), and micro-batches streamed through the stages, one thread per
stage (`executor`)."""

"""Request-time execution: which devices exist (`devices`), a model version's instances, one
onnxruntime session per execution slot (`instances`), bfloat16 through OrtValues (`bf16`), and
the pipeline executor with its stages (`pipeline/`). Everything here implements or serves
batching.base.ModelRunner."""

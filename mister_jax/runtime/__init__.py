"""Host-specific tuning that a reader of the model and its training never needs to read.

Each module here is a lever that docs/BENCHMARKS.md ("Levers, measured one by one") shows to pay
beyond the machine's run-to-run noise; the rest of `mister_jax` works the same without knowing how:

- `compile_cache`: traced and lowered training steps kept on disk, XLA's persistent cache enabled.
- `memory`: the freed heap handed back to the OS after compiling.
- `host_mirror`: host buffers allocated once that the seeds' device states are copied into.
- `direct_io`: those buffers written to and read from disk past the page cache.
"""

"""Defaults of the spec's data keys that the data modules' config dataclasses take too.

Why: specs/common.py sets every key a run reads, but RenderConfig and PipelineConfig are also
built directly (tests, benchmarks, the exported scorer). Both take these names, so
`PipelineConfig()` means what a spec means and the two cannot drift apart. No imports: the
launcher loads spec files before jax starts.
"""

TEMPLATE = "default"  # data.template: plain text, no chat template needed
# data.max_steps_per_example: above PRM800K's long trajectories (up to 29 steps in the real
# records; a cap of 10 dropped 3 of their 11 error steps)
MAX_STEPS_PER_EXAMPLE = 32
PACK = False  # data.pack
PACK_LOOKAHEAD = 16  # data.pack_lookahead: rows ~97% full on PRM800K-like lengths
# data.max_segments_per_row: cuDNN's packed layout has this many slots, each costing time even
# empty; the packing bench's PRM800K-like rows of 2048 tokens hold at most 6 examples
MAX_SEGMENTS_PER_ROW = 16
# A packed row's marker slots: this many times data.max_steps_per_example (not a spec key)
PACKED_MARKER_FACTOR = 4
EVAL_BATCH_SIZE = 16  # data.eval_batch_size, global rows
NUM_WORKERS = 2  # data.num_workers: grain read threads per source
PREFETCH = 64  # data.prefetch: examples buffered per source
MAX_EVAL_BATCHES = 0  # max_eval_batches: 0 = the whole split

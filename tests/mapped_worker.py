"""Greedy tokens of a model run from its memory-mapped shard file (for a test that runs this
inside a memory cgroup). Args: MODEL SHARD_FOLDER. Prints the token ids as JSON."""
import json
import sys

import tpllama

model = tpllama.load(sys.argv[1], weight_type="f32", mmap=True, shard_cache=sys.argv[2], threads=2, ctx_size=64)
print(json.dumps(model.generate([1, 300, 400, 500], 4, temperature=0.0).tokens))

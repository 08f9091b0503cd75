"""Greedy answers of the library for the server tests. Args: MODEL CTX N CHAT_PROMPT TEXT_PROMPT

chat: generate(CHAT_PROMPT, chat=True) (the model's template, no system prompt);
text: generate(TEXT_PROMPT, chat=False). Each from an empty cache."""
import json
import sys

from mpi4py import MPI

import tpllama

model_path, ctx, n, chat_prompt, text_prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
model = tpllama.load(model_path, ctx_size=ctx, threads=1)
result = {}
for name, prompt, chat in (("chat", chat_prompt, True), ("text", text_prompt, False)):
    model.reset()
    g = model.generate(prompt, n, temperature=0.0, chat=chat)
    result[name] = {"text": g.text, "completion_tokens": len(g.tokens), "prompt_tokens": len(g.prompt_tokens),
                    "finish_reason": g.finish_reason}
if MPI.COMM_WORLD.rank == 0:
    print("RESULT " + json.dumps(result))

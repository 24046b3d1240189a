"""The project's OpenAI-compatible chat server over a local model: `baize-serve` / `python -m baize_exp.serve`.

It is the offline teacher and judge: `teacher=local` starts it on a free 127.0.0.1 port for the run and the real
`openai` client talks to it, so the code path is the one `teacher=openai` uses.

How requests are batched (continuous batching over our own decode loop, no HF `generate`):

- One worker thread owns the model and a running batch: one row per answer being written (a request with `n=4`
  is 4 rows), a left-padded attention mask and one KV cache (`DynamicCache`) shared by all rows.
- Every iteration it first admits waiting requests while rows are free (`max_batch` rows at most). Newcomers are
  prefilled together in one forward pass of their own (left-padded among themselves, prompt once per request, then
  the cache row is repeated `n` times), their first token is sampled, and their cache is merged into the running
  one: both caches are left-padded with zeros to the same length and concatenated along the batch dimension, the
  attention mask padded the same way. This is correct because RoPE was applied to the cached keys with each row's
  own positions (`cumsum(mask) - 1`), so where a row's tokens sit in the cache does not matter; masked columns are
  never attended. Then one decode step feeds every row's last sampled token.
- Every row samples with its own settings: temperature (0 = greedy), top-p, max_tokens, stop strings, and a
  `torch.Generator` seeded by the request's `seed` (one per request, drawn in row order), so a seeded sample does
  not depend on what else shares the batch. A finished row (EOS, stop string, max_tokens, context end) leaves the
  batch at once: its cache row is dropped and all-padding columns on the left are trimmed, so its slot is free for
  the next waiting request at the next token.
- When the batch is empty the worker waits up to `max_wait_ms` after the first arrival so that a burst is
  prefilled together; while a batch runs, newcomers join at the next token without waiting.

HTTP: POST /v1/chat/completions (n, temperature, top_p, max_tokens, stop, seed, logprobs/top_logprobs, usage,
stream=true as server-sent events ending with `data: [DONE]`), GET /v1/models, GET /health. Every reply carries
an `x-request-id`. Bad requests are answered as OpenAI does: 400 with a JSON error naming the field (a message
without content, a stop that is not a string or list of strings, temperature outside [0, 2] or NaN, n above
`--max-n`), 404 `model_not_found` for a model name the server does not serve. At most `queue_size` requests wait
for a row; beyond that the answer is 429 with `Retry-After`. A request whose client went away is dropped from the
batch; there is no deadline unless `--request-timeout-s` sets one (504), because a slow answer on a busy machine
is still an answer. SIGTERM/SIGINT stop accepting connections and finish the requests in flight before exiting.
The worker's torch threads follow the free cores (`baize_exp.cpu`). Binds loopback only unless --allow-remote.

Several models, one base: `--adapter v1=DIR --adapter v2=DIR` loads the base once and every adapter onto it; the
server answers the base under its own name and each adapter under its NAME, and a batch mixes them (each row's
forward pass uses its request's adapter: peft's `adapter_names`), so base, v1 and v2 cost one model's memory. Each
name is prompted in its own format: the chat template for the base, an adapter's `prompt_format.json` (Baize's
`[|Human|]`/`[|AI|]` transcript, its `[|Human|]` added to the stops) for a run's adapters.

Rooms: `engine` (the running batch and its decode loop), `worker` (the thread that owns the model and admits
requests), `app` (HTTP: parsing, OpenAI-style errors, streaming), `adapters` (one base, several adapters, the names
they answer to), `formats` (each model's prompt format), `launcher` (start and stop a server for a run, and hand
out clients for teacher and judge), `__main__` (the command line), `ui` (`baize-chat`: the chat page and the blind
arena on the same server). Model loading is `baize_exp.models`.
"""

from baize_exp.serve.launcher import Backends, LocalServer

__all__ = ["Backends", "LocalServer"]

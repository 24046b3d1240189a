"""`baize-chat`: a web page to talk to a run's models side by side, and a blind arena whose votes measure them
and the judge.

    baize-chat outputs/2026-11-25/10-00-00                 # base, v1, v2 of a run: http://127.0.0.1:7860/
    baize-chat RUN_A RUN_B                                 # two runs' models (one shared base)
    baize-chat some/adapter --model smollm2_135m --votes votes.jsonl
    baize-chat RUN --host 0.0.0.0 --token-env CHAT_TOKEN   # beyond loopback only with a token

One process holds the base once; every adapter is loaded onto it under its own name and the server's decode loop
gives each row its request's adapter, so panes for base, v1 and v2 share every batch (`baize_exp.serve.adapters`).
Each model answers in its own prompt format (`baize_exp.serve.formats`). The page (`app`, `page.*`) talks to the
same process's OpenAI-compatible API like any client; the arena (`arena`) draws two anonymous models and records
each vote in `<run>/eval/human_votes.jsonl` (`baize_exp.human`) as it is cast. What the page offers is found by
`catalog`.
"""

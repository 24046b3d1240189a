"""Chat backends behind one interface: an OpenAI-compatible endpoint reached with the real `openai` client.

`open_backend(cfg.teacher, run_dir)` gives a `ChatClient`; for `backend: local` it first starts the project's
server (`baize_exp.serve`) on a free loopback port, shared by every stage and role that asks for the same model.
"""

from baize_exp.chat.client import ChatClient, ChatError, ChatResult
from baize_exp.chat.local import Backends, LocalServer

__all__ = ["ChatClient", "ChatError", "ChatResult", "LocalServer", "Backends"]

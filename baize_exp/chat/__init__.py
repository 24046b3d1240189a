"""Chat backends behind one interface: an OpenAI-compatible endpoint reached with the real `openai` client
(`ChatClient`), whoever serves it: OpenAI, a vLLM server, or the run's own local server (`baize_exp.serve`)."""

from baize_exp.chat.client import ChatClient, ChatError, ChatOutage, ChatResult

__all__ = ["ChatClient", "ChatError", "ChatOutage", "ChatResult"]

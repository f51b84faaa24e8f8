"""Anthropic's Messages API on `mtpnb serve`: `POST /v1/messages`, streamed and not. No sockets, no MLX.

A request is translated into the OpenAI chat request it means (system prompt, messages, tools and
tool results, stop_sequences -> stop, thinking -> reasoning) and checked by protocol.parse_request:
one validation, one set of one-line messages. Errors go out in Anthropic's shape,
{"type": "error", "error": {"type", "message"}}.

Extension fields (the official SDK keeps unknown fields in `model_extra`):

Request
    mtp_depth     int 0..8   drafts per verify (default: the server's --depth); 0 = plain decoding
    mtp_events    bool       token events in a non-streamed response (default false)
    seed          int        sampling seed, as in the OpenAI API (same seed, same parameters: same output)
Stream
    content_block_delta.delta.mtp / .mtp_steps   the token events (mtpnb.TokenEvent.to_dict(): every
                  token the verify steps decided, rejected drafts included, with its kind) and the step
                  events since the previous delta; what no delta carried rides on message_delta.delta
    message_delta.mtp                            mtpnb.Metrics.to_dict(): depth, drafted and accepted
                                                 counts, acceptance by position, timings
Non-streamed message
    mtp           mtpnb.Metrics.to_dict();  mtp_events, mtp_steps with "mtp_events": true

Thinking: `thinking: {"type": "enabled"}` turns the template's reasoning on (`disabled` off; absent:
the server's --reasoning, else off, as Anthropic's API); the output's think block becomes a thinking
content block (its signature is empty: nothing to verify on a local model). A thinking block sent back in
an assistant turn reaches the template as that turn's `reasoning_content` (Qwen's templates show it within
an unfinished tool loop); a redacted_thinking block, another provider's encrypted reasoning, is dropped.

Tools: `tool_choice` {type: auto} (default), {type: none}, or a forced call, {type: any} or {type: tool,
name} (as OpenAI's "required" / named function: the turn opens the call, the model writes it; refused
with thinking on, as in Anthropic's API). Usage: `input_tokens` counts the prompt tokens prefilled,
`cache_read_input_tokens` those whose state came from the server's prompt cache.
`POST /v1/messages/count_tokens` answers {"input_tokens": n} for a Messages request (the whole prompt,
rendered as a generation would render it).
"""

from __future__ import annotations

import dataclasses
import json
import uuid

from . import protocol
from .protocol import APIError
from .tools import OutputSplitter, Segment, call_id, prompt_opens_thinking

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 411: "invalid_request_error",
               413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 501: "api_error",
               503: "overloaded_error", 529: "overloaded_error"}


def usage(m) -> dict:
    """Anthropic's usage: input_tokens counts the prompt tokens prefilled, cache_read_input_tokens
    those whose state came from the prompt cache (their sum is the prompt)."""
    return {"input_tokens": m.prompt_tokens - m.cached_prompt_tokens, "output_tokens": m.generated_tokens,
            "cache_read_input_tokens": m.cached_prompt_tokens, "cache_creation_input_tokens": 0}


def error_body(error: APIError) -> dict:
    kind = ERROR_TYPES.get(error.status, "invalid_request_error" if error.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def parse_request(data: dict, *, model_name: str, defaults: dict, max_tokens_limit: int):
    """Validate a Messages request; -> protocol.Request (endpoint "messages"); raise APIError."""
    chat = {"messages": _messages(data), "stream": data.get("stream")}
    if "model" in data:
        chat["model"] = data["model"]
    for name in ("max_tokens", "temperature", "top_p", "top_k", "mtp_depth", "mtp_events", "seed"):
        if name in data:
            chat[name] = data[name]
    stop = data.get("stop_sequences")
    if stop is not None:
        if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
            raise APIError(400, "stop_sequences must be a list of non-empty strings", param="stop_sequences")
        chat["stop"] = stop
    thinking = data.get("thinking")
    if thinking is not None:
        if not (isinstance(thinking, dict) and thinking.get("type") in ("enabled", "disabled", "adaptive")):
            raise APIError(400, "thinking must be {type: enabled, budget_tokens} or {type: disabled}", param="thinking")
        chat["reasoning"] = thinking["type"] != "disabled"
    elif defaults.get("reasoning") is None:
        chat["reasoning"] = False  # Anthropic's default: no extended thinking
    tools = _tools(data.get("tools"))
    if tools:
        chat["tools"] = tools
        chat["tool_choice"] = _tool_choice(data.get("tool_choice"))
        if chat["tool_choice"] not in ("auto", "none") and chat.get("reasoning"):
            raise APIError(400, "tool_choice {type: any} or {type: tool} forces a call, which cannot be used with "
                                "thinking (as in Anthropic's API): use {type: auto}, or turn thinking off",
                           param="tool_choice")
    req = protocol.parse_request("chat", chat, model_name=model_name, defaults=defaults, max_tokens_limit=max_tokens_limit)
    return dataclasses.replace(req, endpoint="messages", id="msg_" + uuid.uuid4().hex[:24])


def _text(content, where: str) -> str:
    """A string, or a list of text blocks, -> the text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for block in content:
            if not (isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str)):
                raise APIError(400, f"{where}: only text blocks are supported here", param="messages")
            texts.append(block["text"])
        return "".join(texts)
    raise APIError(400, f"{where} must be a string or a list of text blocks", param="messages")


def _messages(data: dict) -> list[dict]:
    """Anthropic's system + messages -> chat messages (tool_use -> tool_calls, tool_result -> role tool)."""
    out = []
    if data.get("system") is not None:
        system = _text(data["system"], "system")
        if system:
            out.append({"role": "system", "content": system})
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant"):
            raise APIError(400, f"messages[{i}].role must be 'user' or 'assistant'", param="messages")
        if role == "assistant" and i == len(messages) - 1:
            raise APIError(400, "the last message is the assistant's: continuing a prefilled answer is not supported "
                                "(end with a user message)", param="messages")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise APIError(400, f"messages[{i}].content must be a string or a list of content blocks",
                           param="messages")
        texts, calls, results, thoughts = [], [], [], []
        for j, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            where = f"messages[{i}].content[{j}]"
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind == "tool_use" and role == "assistant":
                if not (isinstance(block.get("name"), str) and isinstance(block.get("input", {}), dict)):
                    raise APIError(400, f"{where}: a tool_use block needs a name and an input object", param="messages")
                calls.append({"id": block.get("id"), "type": "function",
                              "function": {"name": block["name"], "arguments": block.get("input", {})}})
            elif kind == "tool_result" and role == "user":
                results.append({"role": "tool", "content": _text(block.get("content", ""), f"{where}.content"),
                                **({"tool_call_id": block["tool_use_id"]} if isinstance(block.get("tool_use_id"), str)
                                   else {})})
            elif kind == "thinking" and role == "assistant":
                if isinstance(block.get("thinking"), str):  # the template decides whether it shows it again
                    thoughts.append(block["thinking"])
            elif kind == "redacted_thinking" and role == "assistant":
                continue  # encrypted by another provider: nothing this model can read
            else:
                raise APIError(400, f"{where}: {kind!r} blocks are not supported here (text, tool_use from the "
                                    "assistant, tool_result from the user)", param="messages")
        if role == "assistant":
            out.append({"role": "assistant", "content": "".join(texts), **({"tool_calls": calls} if calls else {}),
                        **({"reasoning_content": "".join(thoughts)} if thoughts else {})})
        else:
            out.extend(results)
            if texts or not results:
                out.append({"role": "user", "content": "".join(texts)})
    return out


def _tools(tools) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise APIError(400, "tools must be a list of {name, description, input_schema}", param="tools")
    out = []
    for i, tool in enumerate(tools):
        if not (isinstance(tool, dict) and isinstance(tool.get("name"), str) and tool.get("type", "custom") == "custom"):
            raise APIError(400, f"tools[{i}] must be a client tool {{name, description, input_schema}} (server tools "
                                "such as web search are not available)", param="tools")
        function = {"name": tool["name"]}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        function["parameters"] = tool.get("input_schema", {"type": "object", "properties": {}})
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice):
    """Anthropic's tool_choice in OpenAI's terms (any: "required"; tool: a named function)."""
    kind = choice.get("type") if isinstance(choice, dict) else None
    if choice is None or kind == "auto":
        return "auto"
    if kind == "none":
        return "none"
    if kind == "any":
        return "required"
    if kind == "tool" and isinstance(choice.get("name"), str) and choice["name"]:
        return {"type": "function", "function": {"name": choice["name"]}}
    raise APIError(400, "tool_choice must be {type: auto}, {type: any}, {type: tool, name} or {type: none}",
                   param="tool_choice")


class Encoder:
    """Builds one request's message or its stream of events (the interface of protocol.Encoder)."""

    def __init__(self, req, tokenizer):
        self.req = req
        self.tokenizer = tokenizer
        self.thinking = req.params.get("reasoning") is not False
        self.splitter: OutputSplitter | None = None
        self.prompt_tokens = 0
        self.sent = ""  # the output text streamed so far
        self.content: list[dict] = []  # the message's content blocks so far
        self.open: str | None = None  # the kind of the block being streamed ("text" / "thinking")
        self.tokens: list[dict] = []  # token and step events not yet sent
        self.steps: list[dict] = []

    def begin(self, prompt_ids: list[int]) -> list[tuple]:
        self.prompt_tokens = len(prompt_ids)
        opened = self.thinking and prompt_opens_thinking(self.tokenizer, prompt_ids)
        self.splitter = OutputSplitter(self.tokenizer, self.req.tools, thinking=self.thinking, opened=opened,
                                       in_call=self.req.force_tool)
        message = {"id": self.req.id, "type": "message", "role": "assistant", "model": self.req.model, "content": [],
                   "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 0}}
        return [("message_start", {"type": "message_start", "message": message}), ("ping", {"type": "ping"})]

    def step(self, tokens: list, step) -> list[tuple]:
        self.tokens += [t.to_dict() for t in tokens]
        if step is not None:
            self.steps.append(step.to_dict())
        text = "".join(t.text for t in tokens if t.kind != "rejected")
        self.sent += text
        return self._blocks(self.splitter.feed(text))

    def last(self, result) -> list[tuple]:
        rest = result.text[len(self.sent):] if result.text.startswith(self.sent) else ""
        events = self._blocks(self.splitter.feed(rest) + self.splitter.finish()) + self._close()
        stop_reason, stop_sequence = self._stop(result)
        m = result.metrics
        delta = {"stop_reason": stop_reason, "stop_sequence": stop_sequence, **self._pending()}
        events.append(("message_delta", {"type": "message_delta", "delta": delta, "mtp": m.to_dict(),
                                         "usage": usage(m)}))
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def cut(self, tokens: list) -> list[tuple]:
        """A stream cut short (shutdown, failure): the text decided so far and its block closed; the
        error event that says why follows."""
        return self.step(tokens, None) + self._close()

    def error(self, error: APIError) -> list[tuple]:
        return [("error", error_body(error))]

    def end(self) -> list[tuple]:
        return []

    def response(self, result) -> dict:
        self._blocks(self.splitter.feed(result.text) + self.splitter.finish())
        stop_reason, stop_sequence = self._stop(result)
        m = result.metrics
        message = {"id": self.req.id, "type": "message", "role": "assistant", "model": self.req.model,
                   "content": self.content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
                   "usage": usage(m), "mtp": m.to_dict()}
        if self.req.mtp_events:
            message["mtp_events"] = [e.to_dict() for e in result.events]
            message["mtp_steps"] = [s.to_dict() for s in result.steps]
        return message

    # -- content blocks -------------------------------------------------------------------------------
    def _blocks(self, segments: list[Segment]) -> list[tuple]:
        """Segments -> content blocks (self.content) and the stream events that build them."""
        events = []
        for s in segments:
            if s.kind == "tool_call":
                events += self._close()
                block = {"type": "tool_use", "id": call_id("toolu_"), "name": s.name, "input": {}}
                index = len(self.content)
                self.content.append({**block, "input": s.arguments})
                delta = {"type": "input_json_delta", "partial_json": json.dumps(s.arguments, ensure_ascii=False),
                         **self._pending()}
                events += [("content_block_start", {"type": "content_block_start", "index": index,
                                                    "content_block": block}),
                           ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}),
                           ("content_block_stop", {"type": "content_block_stop", "index": index})]
                continue
            field = "text" if s.kind == "text" else "thinking"
            if self.open != s.kind:
                events += self._close()
                block = {"type": "text", "text": ""} if s.kind == "text" else \
                    {"type": "thinking", "thinking": "", "signature": ""}
                self.content.append(dict(block))
                self.open = s.kind
                events.append(("content_block_start", {"type": "content_block_start", "index": len(self.content) - 1,
                                                       "content_block": block}))
            self.content[-1][field] += s.text
            delta = {"type": f"{field}_delta", field: s.text, **self._pending()}
            events.append(("content_block_delta", {"type": "content_block_delta", "index": len(self.content) - 1,
                                                   "delta": delta}))
        return events

    def _close(self) -> list[tuple]:
        if self.open is None:
            return []
        self.open = None
        return [("content_block_stop", {"type": "content_block_stop", "index": len(self.content) - 1})]

    def _pending(self) -> dict:
        """The token and step events no delta has carried yet (extension fields), then forget them."""
        out = {}
        if self.tokens:
            out["mtp"] = self.tokens
        if self.steps:
            out["mtp_steps"] = self.steps
        self.tokens, self.steps = [], []
        return out

    def _stop(self, result) -> tuple[str, str | None]:
        """stop_reason and stop_sequence. The engine stops at EOS or at the earliest stop string, cutting
        the text where it begins: the output tokens decoded past the text say which one."""
        if result.metrics.finish_reason == "length":
            return "max_tokens", None
        if any(block["type"] == "tool_use" for block in self.content):
            return "tool_use", None
        if self.req.stop and result.tokens:
            decoded = self.tokenizer.decode(result.tokens)
            start = max(0, len(result.text) - 2)  # leeway: alone, the first token may decode a little differently
            found = [(decoded.find(s, start), s) for s in self.req.stop if decoded.find(s, start) >= 0]
            if found:
                return "stop_sequence", min(found)[1]
        return "end_turn", None

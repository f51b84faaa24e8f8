"""The wire format of `mtpnb serve`: OpenAI requests -> engine parameters, engine events -> OpenAI
responses and stream chunks with the `mtp` extension fields. No sockets and no MLX here.

Extension fields (ordinary OpenAI clients ignore unknown fields):

Request (both endpoints)
    mtp_depth     int 0..8   drafts per verify (default: the server's --depth)
    reasoning     bool       chat templates with a thinking switch (also read from
                             chat_template_kwargs.enable_thinking; default: the server's --reasoning)
    mtp_events    bool       token events in a non-streamed response (default false; streams always
                             carry them)

Stream chunk, one per verify step (chat: in choices[0].delta, completions: in choices[0])
    mtp           [{"token", "text", "kind", "step", "position", "p", "q"}, ...]
                  every token the step decided, in order: accepted drafts, rejected drafts
                  (shown, not output), then the correction / bonus token ("plain" at depth 0);
                  exactly mtpnb.TokenEvent.to_dict()
    mtp_step      {"step", "drafted", "accepted", "emitted", "draft_s", "verify_s", "elapsed_s",
                  "generated"}: mtpnb.StepEvent.to_dict()
Last chunk (the one with finish_reason; or the usage chunk when stream_options.include_usage)
    mtp           mtpnb.Metrics.to_dict() at the top level of the chunk (next to `usage` when
                  stream_options.include_usage asks for it: without it no chunk has `usage`, as in OpenAI's API)
A stream the server cuts (shutdown, a failed generation) ends with a chunk whose finish_reason is
"abort", then an error event {"error": {...}}, then [DONE].
Non-streamed response
    mtp           mtpnb.Metrics.to_dict() at the top level, next to `usage`
    choices[0].mtp, choices[0].mtp_steps   with "mtp_events": true

The streamed text (`delta.content` / `text`) is the concatenation of the output tokens' pieces; the
engine holds back tokens whose text may begin a stop string, so it always equals the final text.

Thinking (chat, unless the request turns reasoning off): a think block the model writes (or the template
opens for it) leaves the content and arrives as `reasoning_content` (DeepSeek's name, which most clients
read) and `reasoning` (vLLM's newer one), in the deltas as it streams and in the message. An assistant
turn sent back with either field gives it to the template as `reasoning_content` (Qwen's templates show
it for the turns of an unfinished tool loop). The `mtp` token events still carry every token's text.

Tools (chat): `tools` (function tools) are rendered by the model's chat template; `tool_choice` "auto"
(default), "none" (the tools are then not shown), "required" or {"type": "function", "function": {"name"}}
(a call is forced: the assistant's turn starts with the model's own call-opening marker, so the model
writes the call; a named function is then the only tool shown). The model's calls leave the content and arrive as
`tool_calls` (streamed: one delta per call, whole, with its index), finish_reason "tool_calls"; earlier
calls and `role: tool` results in `messages` are rendered back by the template. See tools.py.

Roles (chat): system, user, assistant, tool, and `developer` (OpenAI's newer name for system, which agents
send for reasoning models) rendered as system, `function` (the deprecated tool result) as tool; any other
role, or messages the chat template itself refuses (Qwen's raise on a misplaced system turn), get a 400.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..errors import MTPNBError
from ..params import GenerationParams
from .tools import OutputSplitter, call_id, prompt_opens_thinking

# Defaults a request falls back to (the server's flags override them).
SERVER_DEFAULTS = {"depth": GenerationParams.depth, "reasoning": None, "temperature": GenerationParams.temperature}

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 411: "invalid_request_error", 413: "invalid_request_error",
               500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error response in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def dumps(obj: Any) -> bytes:
    """Strict JSON (no NaN / Infinity: those become null)."""
    try:
        text = json.dumps(obj, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except ValueError:
        text = json.dumps(_finite(obj), ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8", "replace")


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


@dataclass
class Request:
    endpoint: str  # "chat" | "completion"
    prompt: Any  # chat messages, text, or token ids
    chat: bool  # apply the chat template
    params: dict  # model.stream parameters (chat excluded)
    stream: bool = False
    include_usage: bool = False
    mtp_events: bool = False
    model: str = ""
    id: str = ""
    created: int = 0
    stop: tuple = ()
    tools: list | None = None  # chat: the tools the template renders (OpenAI's shape), None: no tools
    force_tool: bool = False  # tool_choice forces a call: the assistant's turn opens one (tools.call_opening)
    extra: dict = field(default_factory=dict)


MAX_JSON_DEPTH = 32  # nesting of objects and lists in a request body (a chat request needs 5)
MAX_JSON_DIGITS = 40  # digits of one number (a seed below 2**64 has 20)


class _NotStrictJSON(ValueError):
    pass


def _json_constant(name: str):
    raise _NotStrictJSON(f"{name} is not JSON: send finite numbers")


def _json_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_DIGITS:
        raise _NotStrictJSON(f"a number in the request has more than {MAX_JSON_DIGITS} digits")
    return int(text)


def _json_float(text: str) -> float:
    if len(text) > 2 * MAX_JSON_DIGITS:
        raise _NotStrictJSON(f"a number in the request has more than {MAX_JSON_DIGITS} digits")
    value = float(text)
    if not math.isfinite(value):
        raise _NotStrictJSON(f"the number {text} is too large for a float")
    return value


def _depth(value) -> int:
    """How deep objects and lists nest in a parsed JSON value (iteratively)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        value, depth = todo.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            todo.extend((child, depth + 1) for child in children)
    return deepest


def parse_body(body: bytes) -> dict:
    """A request body -> its JSON object, strictly: UTF-8, no NaN / Infinity (Python's json accepts
    them), numbers of at most MAX_JSON_DIGITS digits, at most MAX_JSON_DEPTH levels; APIError 400."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not valid JSON (not UTF-8)", code="invalid_json") from None
    too_deep = APIError(400, f"the request body nests objects or lists deeper than {MAX_JSON_DEPTH} levels",
                        code="invalid_json")
    try:
        data = json.loads(text, parse_constant=_json_constant, parse_int=_json_int, parse_float=_json_float)
    except RecursionError:  # the parser recurses once per level, up to Python's recursion limit
        raise too_deep from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON (line {e.lineno}, column {e.colno})",
                       code="invalid_json") from None
    except _NotStrictJSON as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    if _depth(data) > MAX_JSON_DEPTH:
        raise too_deep
    return data


def parse_request(endpoint: str, data: dict, *, model_name: str, defaults: dict, max_tokens_limit: int) -> Request:
    """Validate an OpenAI request and turn it into engine parameters; raise APIError (400 / 404)."""
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "model must be a string", param="model")
    if model not in (None, model_name):
        raise APIError(404, f"model {model!r} not found; this server serves {model_name!r}", code="model_not_found",
                       param="model")
    _unsupported(endpoint, data)

    if endpoint == "chat":
        prompt, chat, (tools, force_tool) = _messages(data.get("messages")), True, _tools(data)
    else:
        prompt, chat, tools, force_tool = _prompt(data.get("prompt")), False, None, False

    params: dict[str, Any] = {}
    for name in ("temperature", "top_p", "min_p"):
        value = _number(data, name)
        if value is not None:
            params[name] = value
    for name, key in (("top_k", "top_k"), ("seed", "seed"), ("depth", "mtp_depth")):
        value = _integer(data, key)
        if value is not None:
            params[name] = value
    max_tokens = _integer(data, "max_completion_tokens")
    key = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, key = _integer(data, "max_tokens"), "max_tokens"
    if max_tokens is None:
        max_tokens = max_tokens_limit
    elif max_tokens > max_tokens_limit:
        raise APIError(400, f"{key} {max_tokens} is above this server's limit of {max_tokens_limit} "
                            "(mtpnb serve --max-tokens-limit)", param=key, code="max_tokens_too_large")
    params["max_tokens"] = max_tokens
    stop = data.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list):
            raise APIError(400, "stop must be a string or a list of strings", param="stop")
        stop = [_utf8(s, "stop") if isinstance(s, str) else s for s in stop]
        params["stop"] = tuple(stop)
    reasoning = _bool(data, "reasoning")
    kwargs = data.get("chat_template_kwargs")
    if reasoning is None and isinstance(kwargs, dict) and "enable_thinking" in kwargs:
        reasoning = _bool(kwargs, "enable_thinking", "chat_template_kwargs.enable_thinking")
    if reasoning is not None:
        params["reasoning"] = reasoning
    for name, value in defaults.items():
        if value is not None:
            params.setdefault(name, value)

    try:
        checked = GenerationParams(**params, chat=chat)
    except MTPNBError as e:
        raise APIError(400, str(e), code="invalid_parameter") from None

    stream = bool(_bool(data, "stream"))
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", param="stream_options")
    include_usage = bool(stream and options and _bool(options, "include_usage", "stream_options.include_usage"))
    mtp_events = _bool(data, "mtp_events")
    prefix = "chatcmpl-" if endpoint == "chat" else "cmpl-"
    return Request(
        endpoint=endpoint, prompt=prompt, chat=chat, params=params, stream=stream, include_usage=include_usage,
        mtp_events=stream if mtp_events is None else mtp_events, model=model_name,
        id=prefix + uuid.uuid4().hex[:24], created=int(time.time()), stop=checked.stop, tools=tools,
        force_tool=force_tool,
    )


def _unsupported(endpoint: str, data: dict) -> None:
    """Refuse what would silently change the meaning of a request; ignore harmless extras."""
    n = data.get("n")
    if n is not None and n != 1:
        raise APIError(400, "n must be 1: mtpnb serve returns one choice per request", param="n")
    if data.get("logprobs") not in (None, False, 0) or data.get("top_logprobs") not in (None, 0):
        raise APIError(400, "logprobs are not supported by mtpnb serve (the mtp extension carries p and q)",
                       param="logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
        value = data.get(name)
        if value not in (None, 0, 0.0):
            raise APIError(400, f"{name} is not supported by mtpnb serve", param=name)
    if data.get("repetition_penalty") not in (None, 1, 1.0):
        raise APIError(400, "repetition_penalty is not supported by mtpnb serve", param="repetition_penalty")
    if data.get("logit_bias"):
        raise APIError(400, "logit_bias is not supported by mtpnb serve", param="logit_bias")
    if data.get("functions") or data.get("function_call"):
        raise APIError(400, "functions / function_call (deprecated) are not supported: send tools and tool_choice",
                       param="functions")
    fmt = data.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise APIError(400, "response_format other than text is not supported by mtpnb serve",
                       param="response_format")
    if endpoint == "completion":
        if data.get("echo"):
            raise APIError(400, "echo is not supported by mtpnb serve", param="echo")
        if data.get("suffix"):
            raise APIError(400, "suffix is not supported by mtpnb serve", param="suffix")
        if data.get("best_of") not in (None, 1):
            raise APIError(400, "best_of must be 1", param="best_of")
        if data.get("tools"):
            raise APIError(400, "tools need a chat template: send them to /v1/chat/completions", param="tools")


def _tools(data: dict) -> tuple[list | None, bool]:
    """(the request's tools in the shape chat templates read, or None: no tools, or tool_choice "none";
    whether tool_choice forces a call: "required", or a named function, then the only tool shown)."""
    tools, choice = data.get("tools"), data.get("tool_choice")
    named = None
    if isinstance(choice, dict):
        function = choice.get("function") if choice.get("type") == "function" else None
        named = function.get("name") if isinstance(function, dict) else None
        if not (isinstance(named, str) and named):
            raise APIError(400, "tool_choice must be 'auto', 'none', 'required' or {type: function, function: {name}}",
                           param="tool_choice")
    elif choice not in (None, "auto", "none", "required"):
        raise APIError(400, "tool_choice must be 'auto', 'none', 'required' or {type: function, function: {name}}",
                       param="tool_choice")
    if tools is None:
        if choice == "required" or named:
            raise APIError(400, "tool_choice forces a call, but the request has no tools", param="tool_choice")
        return None, False
    if not isinstance(tools, list):
        raise APIError(400, "tools must be a list of {type: function, function: {name, description, parameters}}",
                       param="tools")
    out = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str) and function["name"]):
            raise APIError(400, f"tools[{i}] must be {{type: function, function: {{name, description, parameters}}}}",
                           param="tools")
        if not isinstance(function.get("parameters", {}), dict):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON Schema object", param="tools")
        out.append({"type": "function", "function": function})
    if named:
        out = [t for t in out if t["function"]["name"] == named]
        if not out:
            raise APIError(400, f"tool_choice names {named!r}, which is not among the tools", param="tool_choice")
    if not out or choice == "none":
        return None, False
    return out, bool(named) or choice == "required"


# OpenAI's roles, as the chat templates know them: `developer` is OpenAI's newer name for the instructions
# `system` carries (agents send it for reasoning models; Qwen's templates raise on it), and `function` the
# deprecated form of a `tool` result.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool",
         "function": "tool"}


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string role", param="messages")
        role = ROLES.get(m["role"])
        if role is None:
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, not {m['role']!r}",
                           param="messages")
        content = m.get("content")
        calls = m.get("tool_calls") if role == "assistant" else None
        if content is None and calls:
            content = ""  # an assistant turn that only called tools
        if isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise APIError(400, f"messages[{i}]: only text content parts are supported", param="messages")
                texts.append(part["text"])
            content = "".join(texts)
        elif not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts",
                           param="messages")
        message = {"role": role, "content": _utf8(content, f"messages[{i}].content")}
        if calls:
            message["tool_calls"] = _tool_calls(calls, f"messages[{i}].tool_calls")
        thought = (m.get("reasoning_content") or m.get("reasoning")) if role == "assistant" else None
        if isinstance(thought, str) and thought:
            message["reasoning_content"] = _utf8(thought, f"messages[{i}].reasoning_content")
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if isinstance(m.get(key), str):
                    message[key] = m[key]
        out.append(message)
    return out


def _tool_calls(calls, where: str) -> list[dict]:
    """An assistant turn's tool calls with their arguments as objects (what chat templates iterate)."""
    if not isinstance(calls, list):
        raise APIError(400, f"{where} must be a list", param="messages")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
            raise APIError(400, f"{where}[{j}] must be {{id, type: function, function: {{name, arguments}}}}",
                           param="messages")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                raise APIError(400, f"{where}[{j}].function.arguments is not valid JSON", param="messages") from None
        if not isinstance(arguments, dict):
            raise APIError(400, f"{where}[{j}].function.arguments must be a JSON object", param="messages")
        out.append({"id": call.get("id"), "type": "function",
                    "function": {"name": function["name"], "arguments": arguments}})
    return out


def _prompt(prompt):
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "the prompt is empty: give at least one token", param="prompt")
        return _utf8(prompt, "prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise APIError(400, "batched prompts are not supported: send one prompt per request", param="prompt")
    raise APIError(400, "prompt must be a non-empty string or a list of token ids", param="prompt")


def _utf8(text: str, where: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{where} is not valid Unicode (a lone surrogate escape)", param=where) from None
    return text


def _number(data: dict, name: str):
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"{name} must be a number, not {value!r}", param=name)
    return value


def _integer(data: dict, name: str):
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"{name} must be an integer, not {value!r}", param=name)
    return value


def _bool(data: dict, name: str, label: str | None = None):
    value = data.get(name)
    if value is None or isinstance(value, bool):
        return value
    raise APIError(400, f"{label or name} must be true or false, not {value!r}", param=label or name)


FINISH = {"stop": "stop", "length": "length"}
FINISH_CUT = "abort"  # a stream the server ended before stop or length (an error event follows)


def usage(metrics) -> dict:
    """OpenAI's usage; prompt_tokens_details.cached_tokens: the prompt tokens the prompt cache saved."""
    return {"prompt_tokens": metrics.prompt_tokens, "completion_tokens": metrics.generated_tokens,
            "total_tokens": metrics.prompt_tokens + metrics.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": metrics.cached_prompt_tokens}}


class Encoder:
    """Builds one request's response body or stream chunks.

    The stream methods (shared with anthropic.Encoder) return lists of SSE events, (event name or
    None, payload); app.py writes them. A chat's output text goes through a tools.OutputSplitter: a think
    block leaves the content for `reasoning_content` / `reasoning`, and tool calls arrive as `tool_calls`
    deltas, each whole, when its end is seen."""

    def __init__(self, req: Request, fingerprint: str, tokenizer):
        self.req = req
        self.chat = req.endpoint == "chat"
        self.fingerprint = fingerprint
        self.tokenizer = tokenizer
        self.sent = ""  # the output text streamed so far (thinking and tool calls included)
        self.splitter: OutputSplitter | None = None  # begin() makes it, for a chat
        self.calls = 0  # tool calls given out

    def _chunk(self, choice: dict, **top) -> dict:
        # OpenAI: with stream_options.include_usage every chunk but the last has "usage": null, the
        # last has the usage and no choices; without it no chunk has a usage field.
        usage_field = {"usage": None} if self.req.include_usage else {}
        return {"id": self.req.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.req.created, "model": self.req.model, "system_fingerprint": self.fingerprint,
                "choices": [choice] if choice is not None else [], **usage_field, **top}

    def _split(self, text: str, *, final: bool, stream: bool) -> tuple[str, dict, list[dict]]:
        """Text -> (content, the reasoning fields ({} when none), tool calls in OpenAI's shape)."""
        if self.splitter is None:
            return text, {}, []
        segments = self.splitter.feed(text) + (self.splitter.finish() if final else [])
        calls = []
        for s in segments:
            if s.kind == "tool_call":
                call = {"id": call_id(), "type": "function",
                        "function": {"name": s.name, "arguments": json.dumps(s.arguments, ensure_ascii=False)}}
                calls.append({"index": self.calls, **call} if stream else call)
                self.calls += 1
        thought = "".join(s.text for s in segments if s.kind == "thinking")
        reasoning = {"reasoning_content": thought, "reasoning": thought} if thought else {}
        return "".join(s.text for s in segments if s.kind == "text"), reasoning, calls

    def begin(self, prompt_ids: list[int]) -> list[tuple]:
        """The prompt is encoded: the stream's opening events."""
        if not self.chat:
            return []
        thinking = self.req.params.get("reasoning") is not False
        self.splitter = OutputSplitter(self.tokenizer, self.req.tools, thinking=thinking,
                                       opened=thinking and prompt_opens_thinking(self.tokenizer, prompt_ids),
                                       in_call=self.req.force_tool)
        return [(None, self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}))]

    def step(self, tokens: list, step) -> list[tuple]:
        """A chunk for one verify step: its output text and (extension) its token events."""
        ext = {"mtp": [t.to_dict() for t in tokens]}
        text = "".join(t.text for t in tokens if t.kind != "rejected")
        self.sent += text
        content, reasoning, calls = self._split(text, final=False, stream=True)
        if step is not None:
            ext["mtp_step"] = step.to_dict()
        if self.chat:
            delta = {"content": content, **reasoning, **({"tool_calls": calls} if calls else {}), **ext}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        else:
            choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": None, **ext}
        return [(None, self._chunk(choice))]

    def cut(self, tokens: list) -> list[tuple]:
        """The chunk that ends a stream cut short (shutdown, failure): the text decided so far and
        finish_reason "abort" (vLLM's name); the error event that says why follows it."""
        text = "".join(t.text for t in tokens if t.kind != "rejected")
        self.sent += text
        content, reasoning, calls = self._split(text, final=True, stream=True)
        ext = {"mtp": [t.to_dict() for t in tokens]} if tokens else {}
        if self.chat:
            delta = {**({"content": content} if content else {}), **reasoning, **({"tool_calls": calls} if calls else {}),
                     **ext}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": FINISH_CUT}
        else:
            choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": FINISH_CUT, **ext}
        return [(None, self._chunk(choice))]

    def last(self, result) -> list[tuple]:
        """The closing chunks: the rest of the text with finish_reason (+ usage and metrics)."""
        m = result.metrics
        rest = result.text[len(self.sent):] if result.text.startswith(self.sent) else ""
        content, reasoning, calls = self._split(rest, final=True, stream=True)
        finish = self._finish(m)
        if self.chat:
            delta = {**({"content": content} if content else {}), **reasoning, **({"tool_calls": calls} if calls else {})}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish}
        if self.req.include_usage:
            return [(None, self._chunk(choice)), (None, self._chunk(None, usage=usage(m), mtp=m.to_dict()))]
        return [(None, self._chunk(choice, mtp=m.to_dict()))]

    def error(self, error: APIError) -> list[tuple]:
        """After the headers: an error event in OpenAI's shape (then end())."""
        return [(None, error.body())]

    def end(self) -> list[tuple]:
        return [(None, "[DONE]")]

    def _finish(self, m) -> str:
        finish = FINISH.get(m.finish_reason, "stop")
        return "tool_calls" if self.calls and finish == "stop" else finish

    def response(self, result) -> dict:
        m = result.metrics
        content, reasoning, calls = self._split(result.text, final=True, stream=False)
        if self.chat:
            message = {"role": "assistant", "content": content if content or not calls else None, **reasoning}
            if calls:
                message["tool_calls"] = calls
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self._finish(m)}
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": self._finish(m)}
        if self.req.mtp_events:
            choice["mtp"] = [e.to_dict() for e in result.events]
            choice["mtp_steps"] = [s.to_dict() for s in result.steps]
        return {"id": self.req.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.req.created, "model": self.req.model, "system_fingerprint": self.fingerprint,
                "choices": [choice], "usage": usage(m), "mtp": m.to_dict()}

"""Rows to engine requests: the prompt (text or chat messages) and the SamplingParams.

A row that cannot become a request raises `RowError`; the worker writes it to errors/ and goes on.
"""
import json

from batchllm.runner.spec import template_fields

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "ignore_eos")


class RowError(Exception):
    """One row's failure: error_type is a short code (missing_column, invalid_params, ...)."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type
        self.message = message


class _Row(dict):
    """format_map() mapping that reports the first missing or null column."""

    def __missing__(self, key):
        raise RowError("missing_column", f"column {key!r} is missing from the row")


class PromptBuilder:
    """Builds each row's prompt from the spec's prompt section."""

    def __init__(self, prompt_spec):
        self.spec = prompt_spec
        if prompt_spec.template is not None:
            self.columns = list(dict.fromkeys(template_fields(prompt_spec.template)))
        else:
            self.columns = [prompt_spec.column or prompt_spec.messages_column]

    def _value(self, row, column):
        if column not in row:
            raise RowError("missing_column", f"column {column!r} is missing from the row")
        value = row[column]
        if value is None:
            raise RowError("missing_column", f"column {column!r} is null")
        return value

    def _text(self, row) -> str:
        s = self.spec
        if s.template is not None:
            values = _Row()
            for c in self.columns:
                values[c] = self._value(row, c)
            try:
                return s.template.format_map(values)
            except (KeyError, IndexError, AttributeError, ValueError, TypeError) as e:
                raise RowError("invalid_row", f"template could not be filled: {e}") from None
        value = self._value(row, s.column)
        return value if isinstance(value, str) else json.dumps(value)

    def build(self, row):
        """The engine prompt: a str, or a list of {role, content} messages when chat is on."""
        s = self.spec
        if s.messages_column is not None:
            messages = parse_messages(self._value(row, s.messages_column))
            if s.system and not (messages and messages[0]["role"] == "system"):
                messages = [{"role": "system", "content": s.system}] + messages
            return messages
        text = self._text(row)
        if not s.chat:
            return f"{s.system}\n\n{text}" if s.system else text
        messages = [{"role": "system", "content": s.system}] if s.system else []
        return messages + [{"role": "user", "content": text}]


def parse_messages(value):
    """A list of {role, content} dicts (or its JSON text) -> the list; RowError otherwise.

    OpenAI content parts ([{type: text, text: ...}]) are joined into one string.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise RowError("malformed_json", f"messages are not valid JSON: {e}") from None
    if not isinstance(value, list) or not value:
        raise RowError("invalid_row", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise RowError("invalid_row", f"messages[{i}] must be an object with role and content")
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for p in content:
                if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                    raise RowError("invalid_row", f"messages[{i}].content: only text parts are supported")
                parts.append(p["text"])
            content = "".join(parts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise RowError("invalid_row", f"messages[{i}].content must be a string or a list of text parts")
        out.append({"role": m["role"], "content": content})
    return out


def sampling_params(base: dict, overrides: dict = None):
    """batchllm.SamplingParams from the spec's sampling values plus per-row overrides.

    Raises RowError(invalid_params) naming the field when the engine rejects a value.
    """
    import batchllm

    values = dict(base)
    if overrides:
        values.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(values.get("stop"), str):
        values["stop"] = [values["stop"]]
    try:
        return batchllm.SamplingParams(**values)
    except (ValueError, TypeError) as e:
        raise RowError("invalid_params", str(e)) from None

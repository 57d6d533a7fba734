"""OpenAI Batch API files: request lines in, batch output lines out.

A request line is {"custom_id", "method": "POST", "url", "body"} for /v1/chat/completions (body.messages)
or /v1/completions (body.prompt). The body's max_tokens (or max_completion_tokens), temperature, top_p,
seed and stop are honoured per row; other body fields (model, n=1, user, ...) are accepted and ignored.

Output lines follow the Batch API: {"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}; failed rows go to errors/ as {"id", "custom_id", "response": null, "error": {"code", "message"}}.
"""
import hashlib
import time

from batchllm.runner.prompts import RowError, parse_messages

URLS = ("/v1/chat/completions", "/v1/completions")


def _number(body, key, lo=None, hi=None, integer=False, lo_open=False):
    v = body.get(key)
    if v is None:
        return None
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if not ok or isinstance(v, bool):
        raise RowError("invalid_params", f"body.{key} must be {'an integer' if integer else 'a number'}, got {v!r}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise RowError("invalid_params", f"body.{key} must be {'>' if lo_open else '>='} {lo}, got {v!r}")
    if hi is not None and v > hi:
        raise RowError("invalid_params", f"body.{key} must be <= {hi}, got {v!r}")
    return v


def parse_request(line: dict):
    """(custom_id, prompt, sampling overrides) for one request line; RowError when it cannot run."""
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise RowError("invalid_request", "custom_id must be a non-empty string")
    method = line.get("method", "POST")
    if method != "POST":
        raise RowError("invalid_request", f"method must be POST, got {method!r}")
    url = line.get("url")
    if url not in URLS:
        raise RowError("invalid_request", f"url must be one of {', '.join(URLS)}, got {url!r}")
    body = line.get("body")
    if not isinstance(body, dict):
        raise RowError("invalid_request", "body must be an object")
    if url == "/v1/chat/completions":
        if "messages" not in body:
            raise RowError("missing_column", "body.messages is missing")
        prompt = parse_messages(body["messages"])
    else:
        if "prompt" not in body:
            raise RowError("missing_column", "body.prompt is missing")
        prompt = body["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        ok_ids = isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)
        if not (isinstance(prompt, str) or ok_ids):
            raise RowError("invalid_params", "body.prompt must be a string or a list of token ids (one prompt per line)")
    n = body.get("n", 1)
    if n != 1:
        raise RowError("invalid_params", f"body.n must be 1, got {n!r}")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    overrides = {
        "max_tokens": _number({key: max_tokens}, key, lo=1, integer=True),
        "temperature": _number(body, "temperature", lo=0),
        "top_p": _number(body, "top_p", lo=0, hi=1, lo_open=True),
        "seed": _number(body, "seed", integer=True),
    }
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
            raise RowError("invalid_params", f"body.stop must be a string or a list of strings, got {stop!r}")
        overrides["stop"] = stop
    return custom_id, prompt, url, overrides


def _ids(job: str, custom_id: str):
    h = hashlib.sha1(f"{job}\0{custom_id}".encode()).hexdigest()
    return f"batch_req_{h[:24]}", f"req_{h[24:40]}"


def result_line(job, model, custom_id, url, out) -> dict:
    """A successful batch output line from an engine RequestOutput."""
    line_id, request_id = _ids(job, custom_id or "")
    usage = {"prompt_tokens": len(out.prompt_token_ids), "completion_tokens": len(out.token_ids)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    if url == "/v1/chat/completions":
        choice = {"index": 0, "message": {"role": "assistant", "content": out.text}, "logprobs": None,
                  "finish_reason": out.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason}
        obj = "text_completion"
    body = {"id": f"cmpl-{request_id[4:]}", "object": obj, "created": int(time.time()), "model": model,
            "choices": [choice], "usage": usage}
    return {"id": line_id, "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}


def error_line(job, custom_id, error_type, message) -> dict:
    line_id, _ = _ids(job, custom_id or "")
    return {"id": line_id, "custom_id": custom_id, "response": None,
            "error": {"code": error_type, "message": message}}

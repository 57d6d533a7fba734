"""The job spec: job.yaml parsed (yaml.safe_load) into pydantic v2 models, with `${VAR}` filled in from the
environment and `--set path.to.key=value` overrides applied.

Every user mistake becomes a `SpecError`: one line per problem, naming the field and what would be valid.
The CLI prints those lines and exits 2, never a traceback. docs/job-spec.md documents every field.
"""
import hashlib
import json
import os
import re
import string
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

RESULT_COLUMNS = ("id", "output", "finish_reason", "prompt_tokens", "completion_tokens")


def format_conflict(spec, fmt: str) -> str | None:
    """What in `spec` does not fit input format `fmt` (declared, or detected when format is auto), or None."""
    if fmt == "openai-batch":
        if spec.prompt is not None:
            return "prompt: not for openai-batch input, whose rows carry their own body; remove it"
        if spec.output.columns:
            return "output.columns: not for openai-batch input; remove it"
        if spec.output.format == "parquet":
            return "output.format: openai-batch input writes OpenAI batch output lines; use jsonl"
    elif spec.prompt is None:
        return f"prompt: required for {fmt} input (template, column or messages_column)"
    return None


class SpecError(Exception):
    """A mistake in the job spec; str() is one line per problem."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Section):
    source: str = Field(min_length=1)
    quantization: Literal["none", "fp8", "awq"] = "none"
    max_model_len: Optional[int] = Field(default=None, ge=16)


class InputSpec(_Section):
    uri: str = Field(min_length=1)
    format: Literal["auto", "parquet", "jsonl", "openai-batch"] = "auto"
    id_column: Optional[str] = None


class PromptSpec(_Section):
    system: Optional[str] = None
    template: Optional[str] = None
    column: Optional[str] = None
    messages_column: Optional[str] = None
    chat: bool = True

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("template", "column", "messages_column") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of template, column or messages_column")
        if self.messages_column is not None and not self.chat:
            raise ValueError("messages_column needs chat: true")
        return self

    @field_validator("template")
    @classmethod
    def _template_fields(cls, v):
        if v is not None:
            template_fields(v)  # raises ValueError on a bad placeholder
        return v


class SamplingSpec(_Section):
    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    ignore_eos: bool = False


class OutputSpec(_Section):
    uri: str = Field(min_length=1)
    format: Optional[Literal["parquet", "jsonl"]] = None  # None: parquet, or jsonl lines for openai-batch
    columns: list[str] = []
    rows_per_part: int = Field(default=1000, ge=1)
    commit_interval_s: float = Field(default=60.0, gt=0)

    @field_validator("columns")
    @classmethod
    def _no_clash(cls, v):
        clash = [c for c in v if c in RESULT_COLUMNS]
        if clash:
            raise ValueError(f"{clash[0]!r} clashes with a result column ({', '.join(RESULT_COLUMNS)})")
        return v


class EngineSpec(_Section):
    max_num_seqs: int | None = Field(default=None, ge=1)  # None: the engine's default (see EngineConfig)
    max_num_batched_tokens: Optional[int] = Field(default=None, ge=1)
    enable_prefix_caching: bool = True
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    block_size: Literal[8, 16, 32, 64, 128] = 16
    num_kv_blocks: Optional[int] = Field(default=None, ge=2)
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    enforce_eager: bool = False
    piecewise_graphs: bool = True
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"


class RaySpec(_Section):
    address: Optional[str] = None  # "host:6379", "ray://host:10001" or "auto"; None: RAY_ADDRESS, a running local
    #                                cluster, else a new local Ray
    runtime_env: dict[str, Any] = {}  # passed to Ray as is (pip, env_vars, ...)
    cpus_per_worker: Optional[float] = Field(default=None, gt=0)  # None: 1 with GPUs; else a share of the CPUs
    autoscaling: bool = False  # true: GPU nodes start on demand, so none need be up at submit


class KubernetesSpec(_Section):
    image: Optional[str] = None  # required for this backend: containers/Dockerfile, built and pushed
    namespace: str = "default"
    context: Optional[str] = None  # kubectl --context
    service_account: Optional[str] = None
    env_from_secret: Optional[str] = None  # a Secret with storage credentials (AWS_ACCESS_KEY_ID, ...)
    gpu_resource: str = "nvidia.com/gpu"
    cpu: Optional[str] = None  # requests, e.g. "8"
    memory: Optional[str] = None  # e.g. "64Gi"
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []


class ComputeSpec(_Section):
    backend: Literal["local", "ray", "kubernetes"] = "local"
    workers: int = Field(default=1, ge=1)
    rows_per_shard: int = Field(default=5000, ge=1)
    grace_period_s: float = Field(default=25.0, gt=0)
    gpus_per_worker: Optional[int] = Field(default=None, ge=0)  # ray, kubernetes; None: 1, or 0 on engine.device cpu
    max_retries: int = Field(default=3, ge=0)  # ray, kubernetes: restarts of a worker that failed or was preempted
    ray: RaySpec = RaySpec()
    kubernetes: KubernetesSpec = KubernetesSpec()


class MetricsSpec(_Section):
    pushgateway: str = Field(pattern=r"^https?://\S+$")
    interval_s: float = Field(default=15.0, gt=0)


class CostSpec(_Section):
    gpu_hour_usd: float = Field(default=0.0, ge=0.0)


class StorageSpec(_Section):
    endpoint_url: Optional[str] = None
    options: dict[str, Any] = {}  # passed to the fsspec filesystem (e.g. anon, profile, token)


class JobSpec(_Section):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=63)
    model: ModelSpec
    input: InputSpec
    prompt: Optional[PromptSpec] = None
    sampling: SamplingSpec = SamplingSpec()
    output: OutputSpec
    engine: EngineSpec = EngineSpec()
    compute: ComputeSpec = ComputeSpec()
    metrics: Optional[MetricsSpec] = None
    cost: CostSpec = CostSpec()
    storage: StorageSpec = StorageSpec()
    max_error_ratio: float = Field(default=0.1, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _prompt_vs_format(self):
        if self.input.format != "auto":
            problem = format_conflict(self, self.input.format)
            if problem:
                raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _remote_workers(self):
        backend = self.compute.backend
        if backend == "local":
            return self
        for field in ("input", "output"):
            uri = getattr(self, field).uri
            if uri.startswith("memory:"):
                raise ValueError(f"{field}.uri: memory:// lives in one process; the {backend} backend needs "
                                 f"real storage")
            if backend == "kubernetes" and "://" not in uri:
                raise ValueError(f"{field}.uri: a local path, which pods cannot reach; use object storage "
                                 f"(s3://, gs://, ...) with the kubernetes backend")
        if backend == "kubernetes" and not self.compute.kubernetes.image:
            raise ValueError("compute.kubernetes.image: required for the kubernetes backend "
                             "(build containers/Dockerfile and push it to a registry the cluster pulls from)")
        return self

    def gpus_per_worker(self) -> int:
        """GPUs each remote worker asks for: compute.gpus_per_worker, else 0 on engine.device cpu and 1 otherwise."""
        if self.compute.gpus_per_worker is not None:
            return self.compute.gpus_per_worker
        return 0 if self.engine.device == "cpu" else 1

    def resolved_yaml(self) -> str:
        """This spec as a self-contained job file (variables filled, overrides applied, data paths absolute): what
        a remote worker loads. A `${` in a value is written `$${`, so loading it gives the same values and
        fingerprint."""
        return yaml.safe_dump(_escape(self.model_dump(mode="json")), sort_keys=False, allow_unicode=True)

    def fingerprint(self) -> str:
        """A hash of everything that decides which rows exist and what each result holds.

        Resubmitting with a different fingerprint to the same output is refused: results would mix.
        Workers, engine tuning, metrics and cost are left out; they change speed, not results.
        """
        keep = {k: getattr(self, k).model_dump() if getattr(self, k) is not None else None
                for k in ("model", "input", "prompt", "sampling")}
        keep["output"] = self.output.model_dump(include={"uri", "format", "columns"})
        keep["rows_per_shard"] = self.compute.rows_per_shard
        keep["name"] = self.name
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def template_fields(template: str) -> list[str]:
    """The column names a template's `{column}` placeholders use; ValueError for a malformed one."""
    names = []
    try:
        for _, field, _, _ in string.Formatter().parse(template):
            if field is None:
                continue
            name = re.split(r"[.\[]", field, maxsplit=1)[0]
            if not name or name.isdigit():
                raise ValueError(f"placeholder {{{field}}} must name a column, e.g. {{text}}")
            names.append(name)
    except ValueError as e:
        raise ValueError(f"{e} (write {{{{ and }}}} for literal braces)") from None
    return names


# ---- loading ------------------------------------------------------------------------------------

# `${NAME}` or `${NAME:-default}`; `$${` is a literal `${` (and is how a resolved job file keeps one)
_VAR = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _substitute(value, where, env):
    if isinstance(value, dict):
        return {k: _substitute(v, f"{where}.{k}" if where else str(k), env) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, f"{where}[{i}]", env) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def fill(m):
        if m.group(0) == "$${":
            return "${"
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise SpecError(f"{where}: environment variable {name} is not set (write ${{{name}:-default}} for a default)")

    return _VAR.sub(fill, value)


def _escape(value):
    if isinstance(value, dict):
        return {k: _escape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape(v) for v in value]
    return value.replace("${", "$${") if isinstance(value, str) else value


def parse_override(item: str):
    """'a.b.c=value' -> (['a','b','c'], parsed value); the value is read as YAML (numbers, lists, ...)."""
    if "=" not in item:
        raise SpecError(f"--set {item}: expected path.to.key=value")
    path, raw = item.split("=", 1)
    keys = [k for k in path.strip().split(".")]
    if not all(keys):
        raise SpecError(f"--set {item}: expected path.to.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return keys, value


def apply_override(doc: dict, keys: list, value):
    node = doc
    for i, k in enumerate(keys[:-1]):
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        elif not isinstance(child, dict):
            raise SpecError(f"--set {'.'.join(keys)}: {'.'.join(keys[:i + 1])} is not a section")
        node = child
    node[keys[-1]] = value


def _valid_keys(loc) -> list[str]:
    """The field names allowed at a validation-error location (for 'unknown key' messages)."""
    model = JobSpec
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        ann = field.annotation
        for cand in getattr(ann, "__args__", None) or (ann,):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                model = cand
                break
        else:
            return []
    return list(model.model_fields)


def _format_error(err) -> str:
    loc = [p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("str", "list[str]")))]
    where = ".".join(str(p) for p in loc) or "job"
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        valid = _valid_keys(err["loc"])
        return f"{where}: unknown key; valid keys here: {', '.join(valid)}"
    if kind == "missing":
        return f"{where}: required field is missing"
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        # model-level validators name their own field
        if ":" in msg.split(" ")[0]:
            return msg
        return f"{where}: {msg}"
    got = err.get("input")
    got = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    if kind == "string_pattern_mismatch" and where == "name":
        msg = "use lowercase letters, digits and '-', starting with a letter or digit"
    return f"{where}: {msg[0].lower() + msg[1:]}{got}"


def spec_from_dict(doc, source="job") -> JobSpec:
    if not isinstance(doc, dict):
        raise SpecError(f"{source}: expected a mapping of fields (name, model, input, ...), got {type(doc).__name__}")
    try:
        return JobSpec.model_validate(doc)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            line = _format_error(err)
            if line not in lines:
                lines.append(line)
        raise SpecError("\n".join(f"{source}: {line}" for line in lines)) from None


def _absolute(uri: str, base: str) -> str:
    if "://" in uri or uri.startswith("memory:"):
        return uri
    return os.path.abspath(os.path.join(base, os.path.expanduser(uri)))


def load_spec(path: str, overrides=(), env=None) -> JobSpec:
    """Read job.yaml, fill ${VAR} (plus ${JOB_DIR}: the file's folder), apply --set items, validate.

    Relative local paths are taken from the current directory.
    """
    env = dict(os.environ if env is None else env)
    env.setdefault("JOB_DIR", os.path.dirname(os.path.abspath(path)))
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise SpecError(f"{path}: cannot read the job file: {e.strerror or e}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{path}: {at}invalid YAML: {problem}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise SpecError(f"{path}: expected a mapping of fields (name, model, input, ...)")
    doc = _substitute(doc, "", env)
    for item in overrides:
        keys, value = parse_override(item)
        apply_override(doc, keys, _substitute(value, ".".join(keys), env))
    spec = spec_from_dict(doc, source=path)
    cwd = os.getcwd()
    spec.input.uri = _absolute(spec.input.uri, cwd)
    spec.output.uri = _absolute(spec.output.uri, cwd).rstrip("/")
    return spec

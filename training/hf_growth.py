"""Grow a transformers checkpoint, verified: what grow_hf.py does, step by step.

    request = GrowRequest("llama/", "llama-moe/", Growth(n_experts=8, top_k=2))
    code = grow_checkpoint(request)        # 0 written and verified, 1 a check failed (nothing written), 2 bad input

1. Validate before any work (BadInput, exit 2): SRC a readable directory of a family hf_format reads, its tokenizer
   within its embedding, OUT absent, the settings valid for this source, room on OUT's disk.
2. Grow the project's model read from SRC (fp32, exact): dense -> MoE (dense_to_moe) where asked, then width and
   depth (scale_bilaterally). Routers are centred on the checks' batch, as the pipeline does.
3. Check in float64 on the exact growth: the dense -> MoE step's own checks (upcycling_check), then all five on the
   whole pair (detailed_growth_check). A failure prints each diagnosis and fix and writes nothing (exit 1).
4. Write into a temporary sibling of OUT: the transformers checkpoint in the asked dtype (default the source's),
   SRC's tokenizer files and generation config; load it back with AutoModelForCausalLM and compare its logits
   with SRC's (also loaded by transformers) on the checks' batch, within the rounding its dtype allows
   (WRITTEN_LIMIT + the drift that rounding the grown weights alone causes); then the report page and
   grow_hf.json, and only then rename it to OUT.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import Tensor, nn

from common.files import (NotEnoughSpace, WriteFailed, check_free_space, existing_ancestor, guarded_write,
                          remove_quietly, write_atomic)
from common.formats import human
from common.safe_load import UnsafeFile
from config import ConfigError, GrowthConfig, ModelConfig
from training.costs import block_parameters, parameter_count
from training.plan import CPU_CHECK_FLOPS, check_estimate
from training.reporting.html_report import render_pair_report
from transfer import dense_to_moe, detailed_growth_check, grown_config, scale_bilaterally, upcycling_check
from transfer.checks import CheckResult, GrowthReport
from transfer.checks.pair import relative_drift
from transfer.hf_format import (ARCHITECTURES, SPECIAL_TOKEN_FIELDS, UnsupportedModel, export_hf, from_hf,
                                hf_family, read_hf_config, refuse_code_in_weights, target_family, weight_files)
from transfer.pair_batch import BATCH, MAX_SEQ, BatchError, checks_batch, find_tokenizer
from transfer.pair_mapping import infer_mapping

# Files of a transformers directory that travel with the weights unchanged: the tokenizer's and generation's.
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                "generation_config.json")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
# The written checkpoint, loaded back by transformers, against SRC loaded by transformers: max |dlogits| / RMS(logits).
# In fp32 the two differ by float arithmetic alone (order of operations, ~1e-6); in a 16-bit dtype the grown weights
# cannot be stored exactly, and the rounding's own drift (measured on the project's model) is added to the limit.
WRITTEN_LIMIT = 1e-4
WRITTEN_QUANTITY = "max |logits(OUT) - logits(SRC)| / RMS(logits(SRC)), both loaded by AutoModelForCausalLM in fp32"
REPORT_FILE, RECORD_FILE = "grow_report.html", "grow_hf.json"
# --plan's time beyond the checks (training.plan.check_estimate), measured at SmolLM-360M's shape widened x2 on 2
# quiet cores: the growth operators (48-51 s for 1.447e9 grown parameters), and the load-back's fp32 forwards with
# each layer's casts (about 40 GFLOP/s).
GROWTH_SECONDS_PER_PARAMETER, FLOAT32_RATE = 3.5e-8, 40e9
PROCESS_BYTES, PROCESS_SECONDS = 350 << 20, 5.0  # Python with torch and transformers imported (measured here)
# Peak RSS above the live tensors: freed memory the allocator keeps (bench/grow_memory.py: 8% over the held terms at
# the mid shape, 9% at SmolLM-360M's shape x2).
ALLOCATOR_SLACK = 0.10


class BadInput(ValueError):
    """Exit 2: one line naming the value or feature, before any work."""


# ------------------------------------------------------------------------------------------ the request
@dataclass(frozen=True)
class Growth:
    """What to grow: GrowthConfig's fields, whose defaults here grow nothing (GrowthConfig's are the pipeline's).
    n_experts=0 keeps the FFN as it is (a dense model stays dense, an MoE an MoE)."""

    n_experts: int = 0
    top_k: int | None = None  # given only with n_experts (default 2 then): an MoE source keeps its own
    router_init_std: float = 0.02
    scale_factor: int = 1
    extra_layers: int = 0
    noise_std: float = 0.3
    seed: int = 0

    def validate(self, source: ModelConfig) -> None:
        """ConfigError (one line) for a value GrowthConfig refuses or that this source cannot take."""
        if isinstance(self.n_experts, bool) or not isinstance(self.n_experts, int) or self.n_experts < 0:
            raise ConfigError(f"--n_experts={self.n_experts} must be an integer >= 0 (0 keeps the FFN as it is)")
        if self.top_k is not None and not self.n_experts:
            raise ConfigError(f"--top_k={self.top_k} applies to upcycling: give --n_experts=E with it (an MoE source "
                              "keeps its own top-k)")
        upcycle = dict(n_experts=self.n_experts, top_k=self.k) if self.n_experts else {}
        GrowthConfig(**upcycle, router_init_std=self.router_init_std, scale_factor=self.scale_factor,
                     extra_layers=self.extra_layers, noise_std=self.noise_std)
        if self.n_experts and source.is_moe:
            raise ConfigError(f"--n_experts={self.n_experts}: the source is already a mixture of {source.n_experts} "
                              "experts; upcycling needs a dense source (drop --n_experts to widen or deepen it)")
        if not self.n_experts and self.scale_factor == 1 and not self.extra_layers:
            raise ConfigError("nothing to grow: give --n_experts=E (upcycle), --scale_factor=S (widen) and/or "
                              "--extra_layers=L (deepen)")

    @property
    def k(self) -> int:
        """Experts per token of the upcycled model."""
        return 2 if self.top_k is None else self.top_k

    def grown(self, source: ModelConfig) -> ModelConfig:
        """The grown model's config, from the source's alone."""
        cfg = replace(source, n_experts=self.n_experts, top_k=self.k) if self.n_experts else source
        return grown_config(cfg, self.scale_factor, self.extra_layers)

    def describe(self, source: ModelConfig) -> str:
        parts = []
        if self.n_experts:
            parts.append(f"dense FFN -> {self.n_experts} experts, top-{self.k} (sparse upcycling, router "
                         f"N(0, {self.router_init_std}^2) centred on the checks' batch)")
        if self.scale_factor > 1:
            parts.append(f"width x{self.scale_factor}: dim {source.dim} -> {source.dim * self.scale_factor} "
                         f"(HyperCloning, cancelling noise {self.noise_std} of each block's RMS)")
        if self.extra_layers:
            parts.append(f"depth {source.n_layers} -> {source.n_layers + self.extra_layers} "
                         f"({self.extra_layers} identity blocks)")
        return "; ".join(parts) + f"; seed {self.seed}"


@dataclass(frozen=True)
class GrowRequest:
    src: str
    out: str
    growth: Growth
    dtype: str | None = None  # None: the source's
    tokens: str | None = None  # --tokens FILE: text for the checks' batch
    plan: bool = False


@dataclass
class Source:
    """SRC read: its project model (fp32, exact), its transformers config and the dtype its weights are stored in."""

    path: str
    family: str  # its model_type: the grown model is written as this family's dense or MoE form
    config: ModelConfig
    hf_config: object
    dtype: torch.dtype
    model: nn.Module | None = None


# ------------------------------------------------------------------------------------------ 1. validation
def read_source(path: str) -> Source:
    """SRC's configs and weight dtype, or BadInput naming what is wrong; reads no weights."""
    from transformers import AutoConfig

    if not os.path.isdir(path):
        raise BadInput(f"{path}: no such directory")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise BadInput(f"{path}: not a transformers checkpoint (no config.json)")
    try:
        family = hf_family(path)
        cfg = read_hf_config(path)
        refuse_code_in_weights(path)
        hf_cfg = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (UnsupportedModel, UnsafeFile, OSError, ValueError) as e:
        raise BadInput(f"{path}: {e}") from None
    tokenizer, tokenizer_file = find_tokenizer(path)
    if tokenizer is not None and tokenizer.get_vocab_size() > cfg.vocab_size:  # ids past the embedding's rows
        raise BadInput(f"{tokenizer_file} has {tokenizer.get_vocab_size():,} tokens but the model's embedding only "
                       f"{cfg.vocab_size:,} rows (vocab_size); save the tokenizer the model was trained with")
    return Source(path, family, cfg, hf_cfg, stored_dtype(path, hf_cfg))


def stored_dtype(path: str, hf_cfg) -> torch.dtype:
    """The floating dtype most of SRC's tensors are stored in (safetensors headers), else its config's dtype."""
    counts: dict[torch.dtype, int] = {}
    for file in weight_files(path):
        if not file.endswith(".safetensors"):
            continue
        try:
            with open(file, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        except (OSError, ValueError) as e:
            raise BadInput(f"{file}: not a readable safetensors file ({e})") from None
        for key, entry in header.items():
            if key != "__metadata__" and entry.get("dtype") in SAFETENSORS_DTYPES:
                dt = SAFETENSORS_DTYPES[entry["dtype"]]
                counts[dt] = counts.get(dt, 0) + 1
    if counts:
        return max(counts, key=counts.get)
    declared = getattr(hf_cfg, "dtype", None) or getattr(hf_cfg, "torch_dtype", None)
    return declared if isinstance(declared, torch.dtype) else DTYPES.get(str(declared), torch.float32)


def output_dtype(request: GrowRequest, source: Source) -> torch.dtype:
    if request.dtype is None:
        return source.dtype if source.dtype in DTYPES.values() else torch.float32
    if request.dtype not in DTYPES:
        raise BadInput(f"--dtype={request.dtype}: choose one of {', '.join(DTYPES)} (default: the source's)")
    return DTYPES[request.dtype]


@dataclass
class Job:
    """A validated request: the source, the written dtype, the grown model's config and transformers class."""

    request: GrowRequest
    source: Source
    dtype: torch.dtype
    grown: ModelConfig
    architecture: str


def validate(request: GrowRequest) -> Job:
    """Everything checkable before work: BadInput (one line) otherwise."""
    if os.path.lexists(request.out):
        raise BadInput(f"{request.out} exists; choose a new OUT (nothing is overwritten)")
    parent = os.path.dirname(os.path.abspath(request.out))
    if not os.access(existing_ancestor(parent), os.W_OK):
        raise BadInput(f"{existing_ancestor(parent)} is not writable; choose another OUT")
    source = read_source(request.src)
    try:
        request.growth.validate(source.config)
    except ConfigError as e:
        raise BadInput(str(e)) from None
    dtype, grown = output_dtype(request, source), request.growth.grown(source.config)
    try:
        architecture = architecture_name(grown, source.family)
    except UnsupportedModel as e:
        raise BadInput(f"{request.src}: {e}") from None
    if request.tokens is not None and not os.path.isfile(request.tokens):
        raise BadInput(f"--tokens {request.tokens}: no such file")
    if not request.plan:
        try:
            check_free_space(parent, {"grown checkpoint": written_bytes(grown, dtype)},
                             fix="free space or choose another OUT")
        except NotEnoughSpace as e:
            raise BadInput(str(e)) from None
    return Job(request, source, dtype, grown, architecture)


# ------------------------------------------------------------------------------------------ the plan
def written_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """The safetensors file of cfg's model in dtype, plus configs and tokenizer (< 16 MiB)."""
    return parameter_count(cfg) * torch.finfo(dtype).bits // 8 + (16 << 20)


@dataclass
class Plan:
    peak_bytes: int
    peak_terms: dict[str, int]
    disk_bytes: int
    seconds: float

    def describe(self) -> str:
        terms = ", ".join(f"{k} {human(v)}" for k, v in self.peak_terms.items())
        return (f"PLAN: peak memory ~{human(self.peak_bytes)} ({terms}); disk {human(self.disk_bytes)} at OUT; "
                f"time ~{self.seconds:.0f} s on a quiet 2-core CPU like the project's (checks at "
                f"~{CPU_CHECK_FLOPS / 1e9:.0f} GFLOP/s in float64)")


def estimate(source: ModelConfig, grown: ModelConfig, dtype: torch.dtype) -> Plan:
    """Peak memory, disk and time from the configs alone. Memory: the process, the allocator's slack, and both fp32
    models with the larger of the growth operator's transient (its float64 work on the largest grown tensor) and
    the checks' own peak (training.plan.check_estimate at the checks' batch); or the load-back (the written model
    in its dtype, its embedding and head and one decoder layer in fp32, the logits) if larger. Time: the growth,
    the checks (check_estimate), the load-back's forwards and the write."""
    seq_len = min(MAX_SEQ, source.max_seq_len)
    checks = check_estimate(source, grown, BATCH, seq_len, device_type="cpu")
    p_src, p_new = parameter_count(source), parameter_count(grown)
    models = {"fp32 models": 4 * (p_src + p_new)}
    largest = max(grown.vocab_size * grown.dim, max(1, grown.n_experts) * grown.hidden_dim * grown.dim)
    transient = {"growth's float64 work": 3 * 8 * largest}
    checking = models | max(transient, checks.terms, key=lambda t: sum(t.values()))
    edges = p_new - grown.n_layers * block_parameters(grown)
    size = torch.finfo(dtype).bits // 8
    load_back = {"written model": size * p_new, "its edges and one layer in fp32": 4 * edges + 4 * p_new // grown.n_layers,
                 "logits": 4 * 4 * BATCH * seq_len * grown.vocab_size}
    held = max(checking, load_back, key=lambda t: sum(t.values()))
    peak_terms = {"Python, torch, transformers": PROCESS_BYTES} | held | {
        "memory the allocator keeps after frees": int(ALLOCATOR_SLACK * sum(held.values()))}
    tokens = BATCH * seq_len
    seconds = (PROCESS_SECONDS + GROWTH_SECONDS_PER_PARAMETER * p_new + (checks.seconds or 0.0)
               + 2 * (p_src + p_new) * tokens / FLOAT32_RATE + size * p_new / 200e6)  # + writing at 200 MB/s
    return Plan(sum(peak_terms.values()), peak_terms, written_bytes(grown, dtype), seconds)


# ------------------------------------------------------------------------------------------ 2-3. grow, check
@dataclass
class Step:
    name: str
    old: nn.Module
    new: nn.Module


def grow(model: nn.Module, g: Growth, calibration: Tensor) -> list[Step]:
    """The growth steps from the source model: dense -> MoE where asked, then width and depth where asked."""
    steps = []
    if g.n_experts:
        moe = dense_to_moe(model, g.n_experts, g.k, g.seed, g.router_init_std, calibration_tokens=calibration)
        steps.append(Step("upcycling", model, moe))
        model = moe
    if g.scale_factor > 1 or g.extra_layers:
        big = scale_bilaterally(model, g.scale_factor, g.extra_layers, g.noise_std, g.seed,
                                calibration_tokens=calibration)
        steps.append(Step("growth", model, big))
    return steps


def check(source: nn.Module, steps: list[Step], tokens: Tensor) -> dict[str, GrowthReport]:
    """The dense -> MoE step's own checks where it applies, then all five on the whole pair (source, final)."""
    reports = {}
    if steps[0].name == "upcycling":
        reports["upcycling"] = upcycling_check(source, steps[0].new, tokens, verbose=False)
    if steps[-1].name == "growth":
        reports["whole pair"] = detailed_growth_check(source, steps[-1].new, tokens, verbose=False)
    return reports


def check_records(reports: dict[str, GrowthReport]) -> dict[str, dict]:
    """Every check's record, keyed "<step>: <check>" so the two steps' checks of the same name stay apart."""
    return {f"{step}: {key}": r.to_record() for step, rep in reports.items() for key, r in rep.results.items()}


# ------------------------------------------------------------------------------------------ 4. write, load back
def architecture_name(cfg: ModelConfig, family: str) -> str:
    """The transformers class a model of cfg is written as: the source family's dense or MoE form."""
    return ARCHITECTURES[target_family(cfg, family)]


def save_checkpoint(model: nn.Module, source: Source, dtype: torch.dtype, directory: str) -> None:
    """The transformers checkpoint of `model` in dtype, with SRC's special token ids, tokenizer files and
    generation config."""
    special = {name: getattr(source.hf_config, name, None) for name in SPECIAL_TOKEN_FIELDS}
    with _no_empty_init_warning():  # Qwen2-MoE's shared expert is written empty (hf_format says why)
        export_hf(model, directory, family=source.family, dtype=dtype, special_tokens=special)
    for name in COPIED_FILES:
        if os.path.isfile(os.path.join(source.path, name)):
            shutil.copyfile(os.path.join(source.path, name), os.path.join(directory, name))


def load_logits(path: str, tokens: Tensor) -> Tensor:
    """fp32 logits of a transformers directory loaded by AutoModelForCausalLM (no remote code). The weights stay in
    the dtype they are stored in and each decoder layer is upcast to fp32 only while it runs (upcasting is exact):
    the same logits as a model loaded in fp32, without a whole fp32 copy of a large model in memory."""
    from transformers import AutoModelForCausalLM

    with _no_empty_init_warning():
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", local_files_only=True,
                                                     trust_remote_code=False).eval()
    with torch.no_grad(), _layers_in_fp32_while_they_run(model):
        return model(tokens).logits.float()


@contextmanager
def _layers_in_fp32_while_they_run(model: nn.Module):
    """Everything outside the decoder layers in fp32 for good; each layer cast to fp32 just before it runs and back
    to its stored dtype after (exact both ways: the fp32 values are the stored ones)."""
    layers = model.model.layers
    stored = next(layers.parameters()).dtype
    inside = {id(t) for t in layers.parameters()} | {id(t) for t in layers.buffers()}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in inside and t.is_floating_point():
            t.data = t.data.float()
    hooks = []
    for layer in layers:
        hooks.append(layer.register_forward_pre_hook(lambda m, args: m.float() and None))
        hooks.append(layer.register_forward_hook(lambda m, args, out: m.to(stored) and None))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def rounding_drift(model: nn.Module, tokens: Tensor, dtype: torch.dtype) -> float:
    """How far the grown model's logits move when its weights are rounded to dtype (computed in fp32): what a
    checkpoint in dtype cannot help. Rounds `model` in place (call it last)."""
    if dtype == torch.float32:
        return 0.0
    exact = model(tokens).float()
    for p in model.parameters():
        p.copy_(p.to(dtype).float())
    return relative_drift(model(tokens).float(), exact)


@dataclass
class WrittenStats:
    drift: float  # max |logits(OUT) - logits(SRC)| / RMS(logits(SRC)), both through transformers in fp32
    rounding: float  # the drift that rounding the grown weights to dtype alone causes
    dtype: str
    limit: float = field(init=False)

    def __post_init__(self):
        self.limit = WRITTEN_LIMIT + self.rounding


def judge_written(stats: WrittenStats) -> CheckResult:
    """The written checkpoint computes what SRC computes, within what its dtype allows."""
    why = (f"limit {WRITTEN_LIMIT:.0e} (fp32: float arithmetic alone)" if stats.rounding == 0 else
           f"limit {WRITTEN_LIMIT:.0e} + {stats.rounding:.2e} = {stats.limit:.2e}: a {stats.dtype} checkpoint cannot "
           f"hold the exact growth, and rounding the grown weights to {stats.dtype} alone moves the logits by "
           f"{stats.rounding:.2e} (the checks judged the exact growth in float64)")
    if stats.drift <= stats.limit:
        message, fix = f"OUT loaded by transformers matches SRC: logit drift {stats.drift:.2e}; {why}", ""
    else:
        fix = ("the written checkpoint does not compute what the grown model computes: report this with the command "
               "line; --dtype=float32 rules out rounding")
        message = f"OUT loaded by transformers departs from SRC: logit drift {stats.drift:.2e}; {why}. Fix: {fix}."
    return CheckResult("Written checkpoint", not fix, message, asdict(stats), fix, quantity=WRITTEN_QUANTITY,
                       value=stats.drift, limit=stats.limit)


# ------------------------------------------------------------------------------------------ the command
def grow_checkpoint(request: GrowRequest, log=print) -> int:
    """The whole command: 0 written and verified, 1 a check failed (nothing at OUT), 2 bad input (nothing done)."""
    _quiet_transformers()
    try:
        job = validate(request)
    except BadInput as e:
        print(f"grow_hf: {e}", file=sys.stderr)
        return 2
    src, g = job.source, request.growth
    if request.plan:
        log(f"SRC {request.src}: {ARCHITECTURES[src.family]}, {parameter_count(src.config):,} parameters, "
            f"{_dtype_name(src.dtype)}")
        log(f"grown: {job.architecture}, {parameter_count(job.grown):,} parameters: {g.describe(src.config)}")
        log(estimate(src.config, job.grown, job.dtype).describe())
        return 0
    started = time.time()
    try:
        src.model = from_hf(src.path).eval()
        tokens, tokens_note = checks_batch(request.tokens, src.config.vocab_size, src.config.max_seq_len, (src.path,),
                                           random_without_tokenizer=True)
    except (UnsupportedModel, UnsafeFile, BatchError) as e:
        print(f"grow_hf: {e}", file=sys.stderr)
        return 2
    log(f"SRC {request.src}: {ARCHITECTURES[src.family]}, {src.model.num_parameters():,} parameters, stored in "
        f"{_dtype_name(src.dtype)}")
    log(f"growing: {g.describe(src.config)}\n{tokens_note}")
    steps = grow(src.model, g, tokens)
    grown = steps[-1].new.eval()
    log(f"grown: {job.architecture}, {grown.num_parameters():,} parameters")
    reports = check(src.model, steps, tokens)
    for step, report in reports.items():
        log(f"\nCHECKS: {step} ({'dense -> MoE' if step == 'upcycling' else 'SRC -> grown, all five'})")
        log(report.summary())
    if not all(r.passed for r in reports.values()):
        log(f"\ngrow_hf: a check failed; nothing was written to {request.out}")
        return 1
    mapping = infer_mapping(src.model, grown).describe()
    src.model = steps = None  # the load-back holds transformers models instead
    return _write(job, grown, tokens, tokens_note, reports, mapping, started, log)


def _write(job: Job, grown: nn.Module, tokens: Tensor, tokens_note: str, reports: dict[str, GrowthReport],
           mapping: str, started: float, log) -> int:
    """Stage OUT in a temporary sibling, load it back and compare, add the report and record, rename into place."""
    request, src, dtype = job.request, job.source, _dtype_name(job.dtype)
    out = os.path.abspath(request.out)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        with guarded_write(out, written_bytes(grown.config, job.dtype)) as write:
            write.temporary(tmp)
            os.makedirs(os.path.dirname(out), exist_ok=True)  # OUT's parent, once the checks have passed
            save_checkpoint(grown, src, job.dtype, tmp)
            rounding, grown_parameters = rounding_drift(grown, tokens, job.dtype), grown.num_parameters()
            grown.to("meta")  # its weights are on disk now: the load-back's models take their place in memory
            stats = WrittenStats(relative_drift(load_logits(tmp, tokens), load_logits(src.path, tokens)), rounding,
                                 dtype)
            written = judge_written(stats)
            log(f"\n{written}")
            if not written.passed:
                remove_quietly(tmp)
                log(f"grow_hf: nothing was written to {request.out}")
                return 1
            records = check_records(reports) | {"written": written.to_record()}
            grown_note = f"GROWN\n  {request.growth.describe(src.config)}\n  written as {job.architecture} in {dtype}"
            page = render_pair_report(src.path, out, f"{mapping}\n\n{grown_note}", tokens_note, records, True)
            write_atomic(os.path.join(tmp, REPORT_FILE), page)
            record = dict(source=os.path.abspath(src.path), out=out, growth=asdict(request.growth),
                          source_dtype=_dtype_name(src.dtype), dtype=dtype, architecture=job.architecture,
                          tokens=tokens_note, parameters=dict(source=parameter_count(src.config),
                                                              grown=grown_parameters),
                          written=asdict(stats), checks=records, seconds=round(time.time() - started, 1))
            write_atomic(os.path.join(tmp, RECORD_FILE), json.dumps(record, indent=1))
            os.replace(tmp, out)
    except WriteFailed as e:
        print(f"grow_hf: {e}", file=sys.stderr)
        return 1
    log(f"wrote {request.out}: {job.architecture} in {dtype}, the report {os.path.join(request.out, REPORT_FILE)} "
        f"and {os.path.join(request.out, RECORD_FILE)}")
    log(f"logits of OUT against SRC (both loaded by transformers): max relative drift {stats.drift:.2e} "
        f"(limit {stats.limit:.2e})")
    return 0


@contextmanager
def _no_empty_init_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        yield


def _quiet_transformers() -> None:
    """No progress bars or warnings from transformers between the command's own lines (a bad input stays one line;
    what transformers would warn about, the checks and the load-back measure)."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")

"""One GPU check: the figures a first session on an H100 / H200 should bring back, in one command.

    python -m distrifusion_jax.tools.gpu_check --out DIR [--budget-s 450] [--repeats 5]
    python -m distrifusion_jax.tools.gpu_check --out DIR --dry-run     # tiny shapes: checks the tool itself

Writes DIR/gpu_check.json and the same as tables in DIR/gpu_check.md, rewritten after every part so
that a run cut short keeps what it measured. The parts, most valuable first (the order they run in):

    unet_step@1024   SDXL UNet step, CFG batch 2, bf16, random full-size weights made on the device (no
                     download), attention "cudnn" / "xla" (jax.nn.dot_product_attention's XLA path,
                     what None picks) / "chunked" (blockwise): unet_benchmark.time_step, the median of
                     --repeats device-synchronised runs after warm-up
    ddim_loop        the jitted 50-step DDIM loop at 1024^2 on one device (make_denoise_fn, a 1-device
                     DistriConfig): unet_benchmark.jax_loop
    compile_time     cold and warm compilation of that loop with the persistent compilation cache in an
                     empty folder: compile_time.compile_twice
    unet_step@2048   as unet_step@1024
    band_compute     one device's displaced step for N = 2, 4, 8 at 1024 / 2048 / 3840 (N/2 row bands, the
                     CFG split; N = 2 is the whole image at batch 1): scaling.step_program on emulate.py's
                     BandPlan, timed as scaling.measure does
    band_memory      peak memory of a 3840^2 band (N = 8): the device's peak_bytes_in_use where the band
                     raised it, and always XLA's memory analysis of the compiled band (abstract.memory)
    flops            XLA's FLOP count (abstract.single_device_flops, attention as XLA's dots: cuDNN's fused
                     kernel is a custom call XLA does not count) and the card's bf16 dense peak
                     (PEAK_BF16_TFLOPS); the fraction achieved by every timed step is derived from them
    profile          an XLA profile of the 1024^2 step (jax.profiler.trace into DIR/profile), summarised:
                     the top ops by time and the share of each category (rules below)
    unet_step@3840   as unet_step@1024

Each part, and each size / implementation / device count within one, is independent: a failure (no
cuDNN attention, out of memory at 3840^2) is recorded as "error: ..." and the rest goes on. Once
--budget-s seconds have passed, what has not started (a part, or a size / implementation / device
count within one) is recorded as "skipped: budget"; the one running then finishes (at 3840^2 a
minute or so). The loop, compile, band and profile parts use the fastest attention implementation of
unet_step@1024 ("xla" if none ran). JAX's persistent compilation cache is off until compile_time
turns it on in an empty temporary folder (removed at the end): run the check as its own process.

`--dry-run` runs the same code on the small-sdxl preset's UNet at 128 / 192 / 256 pixels with 2
repeats, on the default device: a minute or two on a CPU (where cuDNN attention is recorded as
unavailable), and on the GPU a check of the installation, cuDNN included, before the real run.

Profile categories. Every op of the traced step is an instruction of the optimised HLO module
(compiled.as_text()); an op that is a fusion is classified by the instructions it fuses, taking the
first of convolution > matmul > attention > groupnorm > other > elementwise that any of them has:

    convolution   a convolution, or a custom call whose target names one (cuDNN's)
    matmul        a dot or a cuBLAS GEMM outside an Attention module's own ops (the to_q / to_k / to_v /
                  to_out_0 projections, feed-forward, time embeddings)
    attention     cuDNN's fused attention (a custom call naming fmha), or any other op whose op_name
                  scope lies in an Attention module but not in its Dense projections: the score and
                  value matmuls, the softmax, the blockwise loop's bookkeeping
    groupnorm     an op whose scope lies in a GroupNorm module (statistics and normalisation)
    elementwise   elementwise arithmetic and pure data movement (convert, copy, transpose, broadcast, ...)
    other         the rest (reductions outside GroupNorm, LayerNorm's statistics, scatter, sort, ...)

Scopes come from the op_name metadata JAX writes (Flax names each module's ops after its path); the
module classes behind the paths are read off the model itself. While loops, conditionals and calls
are containers: their bodies' ops are traced and counted, the containers are not. On a GPU the
profiled program is compiled without command buffers (CUDA graphs), so that each kernel is traced.

Running it on a GPU machine without network
-------------------------------------------
On a machine with network, the same CPU architecture and the same Python version as the GPU machine,
in a checkout of this repository:

    pip wheel -w wheels .                                   # distrifusion-jax and its dependencies
    pip download -d wheels "setuptools>=77"                 # the build backend, for the editable install
    pip download -d wheels "jax[cuda12]==X"                # X: the jax in wheels/ (jax-X-py3-none-any.whl);
                                                            # the CUDA plugin with CUDA, cuDNN, cuBLAS, CUPTI

(where the GPU machine's OS or Python differs, give `pip download` its --platform and --python-version,
with --only-binary=:all:). Carry the repository with the wheels folder in it; on the GPU machine:

    python -m venv .venv && . .venv/bin/activate
    pip install --no-index --find-links wheels -e . "jax[cuda12]"
    python -m distrifusion_jax.tools.gpu_check --out /tmp/dry --dry-run     # a minute or two: the install works
    python -m distrifusion_jax.tools.gpu_check --out results                # at most ~8 minutes

and bring back results/ (gpu_check.json, gpu_check.md and the raw trace under results/profile).
"""

from __future__ import annotations

import collections
import re
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..cache import enable_compilation_cache
from ..config import DistriConfig
from ..denoise import Denoiser
from ..errors import ConfigError
from ..flags import run_command
from ..models.presets import scheduler_preset, sdxl_base, unet_preset
from ..models.unet import UNet2DConditionModel
from ..nn.attention import Attention
from ..nn.norm import GroupNorm
from ..schedulers import make_scheduler
from .abstract import Case, abstract_inputs, abstract_weights, memory, single_device_flops
from .command import parser, positive
from .compile_time import compile_twice
from .fmt import fmt_bytes, ms, write_json
from .scaling import DISTRI_FLAGS, step_flops, step_program, zeros
from .timing import first_call, random_params, timed
from .unet_benchmark import SMALL, jax_inputs, jax_loop, time_step

DTYPE = jnp.bfloat16
SIZES = (1024, 2048, 3840)
DRY_SIZES = (128, 192, 256)  # latents of 16 / 24 / 32 rows: N = 8's four bands keep whole rows at both levels
IMPLS = ("cudnn", "xla", "chunked")
BAND_DEVICES = (2, 4, 8)
MEMORY_DEVICES = 8  # band_memory: one of the four bands of 8 devices with the CFG split
LOOP_STEPS = 50
PROFILED_STEPS = 3
TOP_OPS = 15
SKIPPED = "skipped: budget"
# device_kind substrings -> bf16 dense peak TFLOP/s from the vendors' data sheets (without sparsity)
PEAK_BF16_TFLOPS = (
    (("H200",), 989.0),
    (("H100", "PCIe"), 756.0),
    (("H100", "HBM3"), 989.0),  # the SXM card calls itself "NVIDIA H100 80GB HBM3"
    (("H100", "SXM"), 989.0),
    (("A100",), 312.0),
)
# a fused op takes the first of these that any op it fuses has
CATEGORIES = ("convolution", "matmul", "attention", "groupnorm", "other", "elementwise")
CONTAINERS = ("while", "conditional", "call")  # their bodies' ops are traced and counted themselves
ELEMENTWISE = frozenset(
    "abs add and atan2 bitcast bitcast-convert broadcast cbrt ceil clamp compare concatenate constant convert "
    "copy cosine divide dynamic-slice dynamic-update-slice erf exponential exponential-minus-one floor "
    "get-tuple-element iota log log-plus-one logistic maximum minimum multiply negate not or pad parameter "
    "power remainder reshape reverse round-nearest-even rsqrt select sign sine slice sqrt subtract tan tanh "
    "transpose tuple xor".split()
)
NO_COMMAND_BUFFERS = {"xla_gpu_enable_command_buffer": ""}  # read by XLA:GPU only
WHAT = {
    "unet_step": "UNet step, CFG batch 2, bf16 (median)",
    "ddim_loop": f"jitted {LOOP_STEPS}-step DDIM loop, 1 device",
    "compile_time": "compile time of that loop, persistent cache cold / warm",
    "band_compute": "one device's displaced step, N = " + " / ".join(map(str, BAND_DEVICES)),
    "band_memory": f"peak memory of a band, N = {MEMORY_DEVICES}",
    "flops": "XLA FLOP count, card's bf16 peak",
    "profile": "XLA profile of the step: time by category",
}


def failure(e: Exception) -> str:
    first = str(e).splitlines()[0][:300] if str(e) else ""
    return f"error: {type(e).__name__}: {first}"


def peak_tflops(device_kind: str) -> Optional[float]:
    """The card's bf16 dense peak in TFLOP/s, None for a card not in PEAK_BF16_TFLOPS."""
    return next((v for parts, v in PEAK_BF16_TFLOPS if all(p in device_kind for p in parts)), None)


def step_name(size: int) -> str:
    return f"unet_step@{size}"


class Check:
    """One run: its settings, the weights its parts share, the clock and the report."""

    def __init__(self, args):
        self.config = unet_preset(SMALL) if args.dry_run else sdxl_base()
        self.sizes = DRY_SIZES if args.dry_run else SIZES
        self.repeats = args.repeats or (2 if args.dry_run else 5)
        self.out = Path(args.out)
        self.start = time.perf_counter()
        self.deadline = self.start + args.budget_s
        self.device = jax.devices()[0]
        self.cache = None  # compile_time's persistent cache folder
        self._params = None
        self.report = {
            "meta": {
                "device": self.device.device_kind,
                "platform": self.device.platform,
                "jax": jax.__version__,
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "dry_run": args.dry_run,
                "model": f"{SMALL} UNet" if args.dry_run else "sdxl-base-1.0 UNet (random weights)",
                "dtype": jnp.dtype(DTYPE).name,
                "sizes": list(self.sizes),
                "repeats": self.repeats,
                "budget_s": args.budget_s,
            },
            "parts": {},
        }

    def log(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f} s] {text}", flush=True)

    def unet(self, impl: Optional[str]):
        return UNet2DConditionModel(self.config, dtype=DTYPE, param_dtype=DTYPE, attention_impl=impl)

    def params(self):
        """The random weights, made on the device by the first part that needs them."""
        if self._params is None:
            self._params, seconds = first_call(
                lambda: jax.block_until_ready(random_params(self.unet(None), DTYPE))
            )
            self.log(f"random weights on {self.device.device_kind}: {seconds:.1f} s")
        return self._params

    def attempt(self, label: str, fn) -> dict:
        """fn()'s dict with status "ok", else why it has none: "skipped: budget" or "error: ..."."""
        if time.perf_counter() > self.deadline:
            result = {"status": SKIPPED}
        else:
            try:
                result = {"status": "ok", **fn()}
            except Exception as e:  # noqa: BLE001 - recorded; the other parts go on
                result = {"status": failure(e)}
        took = f"{ms(result['median_s'])} ms" if "median_s" in result else result["status"]
        self.log(f"{label}: {took}")
        return result

    def attention(self) -> str:
        """The fastest implementation of the first size's UNet step, "xla" if none ran."""
        rows = self.report["parts"].get(step_name(self.sizes[0]), {}).get("rows", {})
        ok = {impl: r["median_s"] for impl, r in rows.items() if r["status"] == "ok"}
        return min(ok, key=ok.get) if ok else "xla"


# ---- the parts ----
def unet_steps(c: Check, size: int) -> dict:
    inputs = jax_inputs(c.config, size, 2, DTYPE)
    rows = {}
    for impl in IMPLS:
        if impl == "cudnn" and c.device.platform != "gpu":
            rows[impl] = {"status": f"unavailable on {c.device.platform}"}
        else:
            run = lambda: time_step(c.unet(impl), c.params(), inputs, c.repeats)
            rows[impl] = c.attempt(f"  {size}^2 attention={impl}", run)
    return {"size": size, "batch": 2, "rows": rows}


def ddim_loop(c: Check) -> dict:
    size, impl = c.sizes[0], c.attention()
    inputs = jax_inputs(c.config, size, 2, DTYPE)
    (r,) = jax_loop(c.unet(None), c.params(), inputs, LOOP_STEPS, impl, min(c.repeats, 3)).values()
    return {"size": size, "attention": impl, **r}


def compile_times(c: Check) -> dict:
    """compile_time's cold and warm compilation of the loop, the persistent cache in an empty folder (it
    stays on for the later parts and is removed at the end)."""
    size, impl = c.sizes[0], c.attention()
    c.cache = tempfile.mkdtemp(prefix="dfj-gpu-check-cache-")
    enable_compilation_cache(c.cache)
    unet = c.unet(impl)
    d = Denoiser(
        unet, DistriConfig(size, size, devices=1), make_scheduler("ddim", scheduler_preset()), LOOP_STEPS
    )
    times = compile_twice(d, abstract_weights(unet, DTYPE), abstract_inputs(Case(unet.config, size, size, 1)))
    return {"size": size, "steps": LOOP_STEPS, "attention": impl, **times}


def band_options() -> SimpleNamespace:
    """The displaced step's options as scaling.step_program reads them: DistriConfig's defaults."""
    return SimpleNamespace(**{f: getattr(DistriConfig, f) for f in DISTRI_FLAGS})


def band_program(c: Check, unet, size: int, n: int) -> tuple:
    """(jitted fn, its arguments) of one device's step on n devices (scaling.step_program), with zeros for
    the state and inputs and timestep 500, as scaling.measure runs it."""
    fn, (params, *state, x, t, ehs, added) = step_program(unet, c.params(), size, n, band_options())
    return fn, (params, *zeros(state), zeros(x), jnp.full(t.shape, 500.0, t.dtype), zeros(ehs), zeros(added))


def band_time(c: Check, unet, size: int, n: int) -> dict:
    fn, args = band_program(c, unet, size, n)
    call = lambda: fn(*args).block_until_ready()
    _, compile_s = first_call(call)
    return {"bands": max(1, n // 2), "batch": 1, "compile_s": compile_s, **timed(call, c.repeats)}


def band_compute(c: Check) -> dict:
    impl = c.attention()
    unet = c.unet(impl)
    rows = [
        {"size": size, "devices": n, **c.attempt(f"  {size}^2 N={n}", lambda: band_time(c, unet, size, n))}
        for size in c.sizes
        for n in BAND_DEVICES
    ]
    return {"attention": impl, **vars(band_options()), "rows": rows}


def band_memory(c: Check) -> dict:
    """XLA's memory analysis of the largest size's band, and the device's peak where running it raised
    the process's high-water mark (a lower peak hides under one an earlier part set)."""
    size, n, impl = c.sizes[-1], MEMORY_DEVICES, c.attention()
    fn, args = band_program(c, c.unet(impl), size, n)
    compiled = fn.lower(*args).compile()
    before = c.device.memory_stats() or {}  # None on a CPU
    jax.block_until_ready(compiled(*args))
    after = c.device.memory_stats() or {}
    analysis = memory(compiled)
    peak = after.get("peak_bytes_in_use")
    raised = peak is not None and peak > before["peak_bytes_in_use"]
    return {
        "size": size,
        "devices": n,
        "bands": n // 2,
        "attention": impl,
        "peak_bytes": peak if raised else analysis["peak"],
        "peak_source": (
            "device peak_bytes_in_use (the whole process: weights and other live buffers included)"
            if raised
            else "XLA memory analysis"
            + ("" if peak is None else " (the device's peak_bytes_in_use was set higher by an earlier part)")
        ),
        "device_peak_bytes_in_use": peak,
        "device_bytes_in_use_before": before.get("bytes_in_use"),  # weights, the band's inputs and state
        "xla_memory_analysis": analysis,
    }


def flops_part(c: Check) -> dict:
    """FLOPs of each UNet step (XLA's attention: cuDNN's custom call is not counted) and of each timed band."""
    unet = c.unet("xla")
    params = abstract_weights(unet, DTYPE)
    count = lambda size: {"flops": single_device_flops(unet, params, Case(c.config, size, size, 1))}
    steps = {str(size): c.attempt(f"  {size}^2 step", lambda: count(size)) for size in c.sizes}
    timed_bands = c.report["parts"].get("band_compute", {}).get("rows", [])
    bands = [
        {
            "size": r["size"],
            "devices": r["devices"],
            **c.attempt(
                f"  {r['size']}^2 N={r['devices']}",
                lambda: {"flops": step_flops(c.config, r["size"], r["devices"], band_options())},
            ),
        }
        for r in timed_bands
        if r["status"] == "ok"
    ]
    kind = c.device.device_kind
    return {"device": kind, "peak_bf16_tflops": peak_tflops(kind), "steps": steps, "bands": bands}


def achieved(parts: dict) -> list:
    """TFLOP/s and fraction of the bf16 peak of every timed program whose FLOPs were counted."""
    fl = parts.get("flops", {})
    if fl.get("status") != "ok":
        return []
    counted = {int(s): r["flops"] for s, r in fl["steps"].items() if r["status"] == "ok"}
    runs = []  # (what, flops, seconds)
    for size, flops in counted.items():
        for impl, r in parts.get(step_name(size), {}).get("rows", {}).items():
            if r["status"] == "ok":
                runs.append((f"UNet step {size}^2 {impl}", flops, r["median_s"]))
    loop = parts.get("ddim_loop", {})
    if loop.get("status") == "ok" and loop["size"] in counted:
        per_step = loop["median_s"] / loop["steps"]
        runs.append(
            (f"DDIM loop, per step, {loop['size']}^2 {loop['attention']}", counted[loop["size"]], per_step)
        )
    band_flops = {(b["size"], b["devices"]): b["flops"] for b in fl["bands"] if b["status"] == "ok"}
    for r in parts.get("band_compute", {}).get("rows", []):
        if (r["size"], r["devices"]) in band_flops:
            what = f"band {r['size']}^2 N={r['devices']} {parts['band_compute']['attention']}"
            runs.append((what, band_flops[(r["size"], r["devices"])], r["median_s"]))
    peak = fl["peak_bf16_tflops"]
    return [
        {
            "what": what,
            "tflop": flops / 1e12,
            "seconds": s,
            "tflops_per_s": flops / s / 1e12,
            "fraction_of_peak": None if peak is None else flops / s / 1e12 / peak,
        }
        for what, flops, s in runs
    ]


# ---- the profile ----
class Op(NamedTuple):
    """One HLO instruction: opcode, custom-call target, op_name metadata, the computation it fuses."""

    opcode: str
    target: str
    op_name: str
    calls: Optional[str]


INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\(")
ATTRIBUTES = (  # an instruction's custom-call target, op_name and fused computation
    re.compile(r'custom_call_target="([^"]*)"'),
    re.compile(r'op_name="([^"]*)"'),
    re.compile(r"calls=%?([\w.\-]+)"),
)


def hlo_ops(text: str) -> tuple:
    """({instruction: Op}, {computation: [its instructions]}) of an HLO module's text."""
    ops, computations, current = {}, {}, []
    for line in text.splitlines():
        if line.endswith("{") and not line[:1].isspace():  # a computation's header
            current = computations.setdefault(re.match(r"(?:ENTRY )?%?([\w.\-]+)", line).group(1), [])
        elif m := INSTRUCTION.match(line):
            target, op_name, calls = (f.group(1) if (f := p.search(line)) else "" for p in ATTRIBUTES)
            ops[m.group(1)] = Op(m.group(2), target, op_name, calls or None)
            current.append(m.group(1))
    return ops, computations


def module_scopes(unet, params, inputs) -> dict:
    """{module path: "attention" | "groupnorm" | None} of every module the step calls (an abstract run)."""
    scopes = {}

    def record(fn, args, kwargs, context):
        m = context.module
        if m.scope is not None:
            kind = (
                "attention" if isinstance(m, Attention) else "groupnorm" if isinstance(m, GroupNorm) else None
            )
            scopes[tuple(m.scope.path)] = kind
        return fn(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda p, *a: unet.apply({"params": p}, *a), params, *inputs)
    return scopes


def scope_kind(op_name: str, scopes: dict) -> Optional[str]:
    """The kind of the innermost module an op_name ("jit(f)/Root/down_blocks_1/.../attn1/vmap()/exp") lies in;
    segments that are no module's (transformations, method scopes) are passed over."""
    path, kind = (), None
    for segment in op_name.split("/"):
        if path + (segment,) in scopes:
            path += (segment,)
            kind = scopes[path]
    return kind


def role(op: Op, scopes: dict) -> str:
    target = op.target.lower()
    if op.opcode == "convolution" or "conv" in target:
        return "convolution"
    if "fmha" in target:
        return "attention"
    kind = scope_kind(op.op_name, scopes)
    if op.opcode == "dot" or "gemm" in target or "matmul" in target:
        return "attention" if kind == "attention" else "matmul"
    if kind:
        return kind
    return "elementwise" if op.opcode in ELEMENTWISE else "other"


def category(name: str, ops: dict, computations: dict, scopes: dict) -> str:
    """An instruction's category (the module docstring's rules): a fusion's from the ops it fuses."""
    op = ops[name]
    if op.calls in computations:
        inner = [category(n, ops, computations, scopes) for n in computations[op.calls]]
        return min(inner, key=CATEGORIES.index)
    return role(op, scopes)


def op_times(data, platform: str) -> collections.Counter:
    """Total traced nanoseconds of each HLO op: on an accelerator its planes' "XLA Ops" lines (else their
    events that name their HLO op: the kernels); on a CPU the host's events that name one."""
    if platform == "cpu":
        planes = [p for p in data.planes if p.name == "/host:CPU"]
    else:  # the host's events there would be launches, not the ops' time
        planes = [p for p in data.planes if p.name.startswith("/device:")]
    times = collections.Counter()
    for plane in planes:
        lines = [line for line in plane.lines if line.name == "XLA Ops"] or plane.lines
        for line in lines:
            for e in line.events:
                op = dict(e.stats).get("hlo_op") or (e.name if line.name == "XLA Ops" else None)
                if op:
                    times[op] += e.duration_ns
    return times


def summarize(times, ops: dict, computations: dict, scopes: dict, steps: int) -> dict:
    """Shares of each category in the traced op time, and the top ops, per step."""
    rows = [
        (ns, name, category(name, ops, computations, scopes) if name in ops else "other")
        for name, ns in times.items()
        if name not in ops or ops[name].opcode not in CONTAINERS
    ]
    total = sum(ns for ns, _, _ in rows)
    if not total:
        raise ValueError(
            "the trace holds no timed HLO op of the step (on a GPU: see the log for CUPTI errors)"
        )
    by_category = collections.Counter()
    for ns, _, cat in rows:
        by_category[cat] += ns
    root = UNet2DConditionModel.__name__ + "/"
    top = [
        {
            "op": name,
            "category": cat,
            "ms_per_step": ns / steps / 1e6,
            "share": ns / total,
            "opcode": ops[name].opcode if name in ops else None,
            "scope": (ops[name].op_name.partition(root)[2] or ops[name].op_name) if name in ops else None,
        }
        for ns, name, cat in sorted(rows, reverse=True)[:TOP_OPS]
    ]
    return {
        "traced_ms_per_step": total / steps / 1e6,
        "shares": {cat: by_category[cat] / total for cat in CATEGORIES},
        "ops": len(rows),
        "ops_not_in_hlo": sum(name not in ops for _, name, _ in rows),
        "top_ops": top,
    }


def profile(c: Check) -> dict:
    """Trace PROFILED_STEPS runs of the first size's step into DIR/profile and summarise the trace."""
    size, impl = c.sizes[0], c.attention()
    unet, params = c.unet(impl), c.params()
    inputs = jax_inputs(c.config, size, 2, DTYPE)
    step = jax.jit(lambda p, *a: unet.apply({"params": p}, *a))
    compiled = step.lower(params, *inputs).compile(compiler_options=NO_COMMAND_BUFFERS)
    run = lambda: jax.block_until_ready(compiled(params, *inputs))
    run()
    folder = c.out / "profile"
    with jax.profiler.trace(str(folder), create_perfetto_trace=True):
        for _ in range(PROFILED_STEPS):
            run()
    trace = max(folder.glob("**/*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    out = {"size": size, "attention": impl, "steps": PROFILED_STEPS, "trace": str(trace)}
    perfetto = sorted(trace.parent.glob("*perfetto_trace.json*"))
    if perfetto:
        out["perfetto_trace"] = str(perfetto[0])
    try:
        times = op_times(jax.profiler.ProfileData.from_file(str(trace)), c.device.platform)
        ops, computations = hlo_ops(compiled.as_text())
        out.update(summarize(times, ops, computations, module_scopes(unet, params, inputs), PROFILED_STEPS))
    except Exception as e:  # noqa: BLE001 - the raw trace stays for xprof / Perfetto
        out["parse_error"] = failure(e)
    return out


def parts(c: Check) -> list:
    """(name, part) in the order they run: most valuable first."""
    small, medium, large = c.sizes
    return [
        (step_name(small), lambda: unet_steps(c, small)),
        ("ddim_loop", lambda: ddim_loop(c)),
        ("compile_time", lambda: compile_times(c)),
        (step_name(medium), lambda: unet_steps(c, medium)),
        ("band_compute", lambda: band_compute(c)),
        ("band_memory", lambda: band_memory(c)),
        ("flops", lambda: flops_part(c)),
        ("profile", lambda: profile(c)),
        (step_name(large), lambda: unet_steps(c, large)),
    ]


# ---- the report ----
def cell(text) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def brief(name: str, p: dict) -> str:
    """A part's result in one table cell."""
    if p["status"] != "ok":
        return p["status"]
    kind = name.split("@")[0]
    if kind == "unet_step":
        return "; ".join(
            f"{impl} {ms(r['median_s'])} ms" if r["status"] == "ok" else f"{impl}: {r['status']}"
            for impl, r in p["rows"].items()
        )
    if kind == "ddim_loop":
        return (
            f"{p['median_s']:.2f} s ({p['per_step_ms']:.1f} ms/step, {p['attention']}), first call "
            f"{p['first_call_s']:.1f} s"
        )
    if kind == "compile_time":
        return (
            f"cold {p['cold']['total_s']:.1f} s, warm {p['warm']['total_s']:.1f} s (traced program and compiled "
            f"program from the caches; tracing alone would take {p['trace_lower_s']:.1f} s)"
        )
    if kind == "band_compute":
        ok = sum(r["status"] == "ok" for r in p["rows"])
        return f"{ok} of {len(p['rows'])} timed ({p['attention']}); table below"
    if kind == "band_memory":
        return f"{p['size']}^2 N={p['devices']}: {fmt_bytes(p['peak_bytes'])} ({p['peak_source']})"
    if kind == "flops":
        counted = ", ".join(
            f"{s}^2 {r['flops'] / 1e12:.3g} TFLOP" for s, r in p["steps"].items() if r["status"] == "ok"
        )
        return f"{counted}; peak {p['peak_bf16_tflops'] or 'unknown'} TFLOP/s ({p['device']})"
    if "parse_error" in p:
        return f"not parsed ({p['parse_error']}); raw trace: {p['trace']}"
    return ", ".join(f"{cat} {share:.0%}" for cat, share in p["shares"].items())


def table(head: list, rows: list) -> list:
    """A markdown table's lines."""
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def timing_table(rows: list) -> list:
    """One table row per size: its rows' median ms (or status), in order."""
    by_size = {}
    for r in rows:
        by_size.setdefault(r["size"], []).append(ms(r["median_s"]) if r["status"] == "ok" else r["status"])
    return [[f"{size}^2", *cells] for size, cells in by_size.items()]


def profile_section(p: dict) -> list:
    lines = [f"## Profile of the {p['size']}^2 step (attention {p['attention']})", ""]
    perfetto = f", Perfetto: `{p['perfetto_trace']}`" if "perfetto_trace" in p else ""
    lines += [f"Raw trace: `{p['trace']}`{perfetto}.", ""]
    if "parse_error" in p:
        return lines + [
            f"The trace could not be parsed ({cell(p['parse_error'])}): open the raw trace in xprof."
        ]
    lines += [
        f"{p['traced_ms_per_step']:.2f} ms of traced ops per step (summed over streams / threads; {p['ops']} "
        f"ops, {p['ops_not_in_hlo']} not found in the HLO). Categories: the gpu_check module docstring.",
        "",
    ]
    lines += table(list(CATEGORIES), [[f"{p['shares'][cat]:.1%}" for cat in CATEGORIES]]) + [""]
    rows = [
        [
            t["op"],
            t["category"],
            f"{t['ms_per_step']:.3f}",
            f"{t['share']:.1%}",
            t["opcode"],
            (t["scope"] or "")[:120],
        ]
        for t in p["top_ops"]
    ]
    return lines + table(["op", "category", "ms/step", "share", "opcode", "scope"], rows)


def markdown(report: dict) -> str:
    meta, parts = report["meta"], report["parts"]
    lines = [
        f"# GPU check: {meta['device']}" + (" (dry run)" if meta["dry_run"] else ""),
        "",
        f"{meta['model']}, {meta['dtype']}, {meta['platform']}, JAX {meta['jax']}, {meta['date']}, "
        f"{meta['repeats']} repeats, {meta['elapsed_s']:.0f} s of a {meta['budget_s']} s budget.",
        "",
    ]
    lines += table(
        ["part", "measures", "result"],
        [[name, WHAT[name.split("@")[0]], brief(name, p)] for name, p in parts.items()],
    )
    steps = [p for name, p in parts.items() if name.startswith("unet_step") and p["status"] == "ok"]
    if steps:
        rows = [{"size": p["size"], **r} for p in steps for r in p["rows"].values()]
        lines += ["", "## UNet step, ms (median)", ""]
        lines += table(["size", *IMPLS], timing_table(rows))
    bands = parts.get("band_compute", {})
    if bands.get("status") == "ok":
        lines += ["", f"## One device's displaced step, ms (median, attention {bands['attention']})", ""]
        lines += table(["size", *(f"N={n}" for n in BAND_DEVICES)], timing_table(bands["rows"]))
    if report["achieved"]:
        rows = [
            [
                r["what"],
                f"{r['tflop']:.3g}",
                ms(r["seconds"]),
                f"{r['tflops_per_s']:.3g}",
                "unknown" if r["fraction_of_peak"] is None else f"{r['fraction_of_peak']:.1%}",
            ]
            for r in report["achieved"]
        ]
        lines += ["", "## Achieved throughput (XLA FLOP count / measured time)", ""]
        lines += table(["program", "TFLOP", "ms", "TFLOP/s", "of bf16 peak"], rows)
    if parts.get("profile", {}).get("status") == "ok":
        lines += [""] + profile_section(parts["profile"])
    return "\n".join(lines) + "\n"


def write(c: Check) -> None:
    c.report["meta"]["elapsed_s"] = time.perf_counter() - c.start
    c.report["achieved"] = achieved(c.report["parts"])
    write_json(c.out / "gpu_check.json", c.report, indent=2)
    (c.out / "gpu_check.md").write_text(markdown(c.report))


def run(args) -> dict:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: pass a folder (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create it ({e.strerror})") from None
    # no persistent cache until compile_time points it at an empty folder: its cold compilation is cold
    jax.config.update("jax_compilation_cache_dir", None)
    c = Check(args)
    meta = c.report["meta"]
    c.log(
        f"{meta['model']} on {meta['device']} ({meta['platform']}), JAX {meta['jax']}, budget {args.budget_s} s"
    )
    try:
        for name, part in parts(c):
            c.log(f"{name} ...")
            c.report["parts"][name] = c.attempt(name, part)
            write(c)
    finally:
        if c.cache:
            shutil.rmtree(c.cache, ignore_errors=True)
    c.log(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return c.report


def build_parser():
    p = parser(__doc__, "gpu_check")
    p.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and profile/")
    p.add_argument(
        "--budget-s",
        type=positive,
        default=450,
        help="seconds after which parts not yet started are skipped (default: %(default)s)",
    )
    p.add_argument(
        "--repeats",
        type=positive,
        default=None,
        help="timed runs per measurement (default: 5; 2 with --dry-run)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help=f"the same parts on the {SMALL} preset's UNet at {'/'.join(map(str, DRY_SIZES))} pixels",
    )
    return p


def main(argv=None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""The benchmark's report as text: the configurations side by side, the overhead, the notes; the dry run."""

from __future__ import annotations

from .fmt import fmt_bytes, ruled

NOTES = """\
  step: the whole jitted denoising loop (device-synchronised, after warm-up) / steps, median (min-max) of
    the repeats; e2e: the loop, from inputs on the devices to the final latents (median); +VAE: the loop
    then the VAE decode of its final latents on the first device (median); compile: Denoiser.last_compile_s
    of the first call (no persistent compilation cache).
  speedup, e2e+VAE: the baseline's median over this configuration's (per step; end to end with the VAE).
  Inputs: random noise and random prompt embeddings of the text encoders' shapes ([2B, 77, D] and
    pooled [2B, D], guidance batch [uncond; cond]); no text encoding is run or timed.
  full_sync: patch parallelism with every step synchronous; displaced: DistriFusion (warmup steps
    synchronous, then displaced); naive_patch: independent bands, no exchange."""


def format_dry_run(report: dict) -> str:
    """One line per configuration: built and lowered (with the tracing time), or why not."""
    lines = [
        f"{report['model']} ({report['unet_parameters']:,} UNet parameters): {report['width']}x"
        f"{report['height']}, {report['steps']} steps {report['scheduler']}, {report['dtype']}, "
        f"{report['devices']} {report['platform']} devices; abstract weights, nothing compiled or run"
    ]
    for name, r in report["configs"].items():
        state = f"lowered in {r['lower_s']:.1f} s" if "lowered" in r else f"skipped: {r['skipped']}"
        lines.append(f"  {name:<12}{r.get('devices', ''):>3} {r.get('mesh', ''):>5}  {state}")
    return "\n".join(lines)


HEAD = (
    f"{'config':<12}{'dev':>4}{'mesh':>6}{'compile s':>11}{'step ms (min-max)':>24}{'e2e s':>11}"
    f"{'+VAE s':>9}{'peak mem':>12}{'program':>10}{'speedup':>9}{'e2e+VAE':>9}"
)


def format_table(report: dict) -> str:
    """The configurations side by side, the overhead measurement and the notes, as text."""
    lines = header(report) + ruled(HEAD) + [config_line(name, r) for name, r in report["configs"].items()]
    if report.get("vae_decode_s"):
        vae = report["vae_decode_s"]
        lines.append(
            f"VAE decode alone: {vae['median_s']:.3f} s (first call, compiling: {vae['first_call_s']:.1f} s)"
        )
    if report.get("overhead"):
        lines += ["", overhead_line(report["overhead"])]
    return "\n".join(lines + ["", notes(report)])


def header(report: dict) -> list:
    return [
        f"{report['model']}: {report['width']}x{report['height']} (latent {report['width'] // 8}x"
        f"{report['height'] // 8}), batch {report['batch']}, {report['steps']} steps {report['scheduler']}, "
        f"{report['dtype']} (VAE {report['vae_dtype']}), guidance {report['guidance_scale']}",
        f"{report['devices']} x {report['device_kind']} ({report['platform']}), JAX {report['jax']}, "
        f"{report['repeats']} repeats; baseline: {report.get('baseline') or '-'}; peak memory: "
        f"{report['memory_source']}",
        "",
    ]


def config_line(name: str, r: dict) -> str:
    """One configuration's row of the table, or why it was skipped."""
    if "step_ms" not in r:
        return f"{name:<12}  skipped: {r.get('skipped', '?')}"
    s, v = r["step_ms"], r.get("vs_baseline", {})
    step = f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"
    mem = ("<=" if r.get("peak_exact") is False else "") + fmt_bytes(r.get("peak_bytes"))
    ratio = lambda k: f"{v[k]:.2f}x" if k in v else "-"
    return (
        f"{name:<12}{r['devices']:>4}{r['mesh']:>6}{r['compile_s']:>11.1f}{step:>24}"
        f"{r['e2e_s']['median_s']:>11.3f}{r['e2e_decode_s']['median_s']:>9.3f}{mem:>12}"
        f"{fmt_bytes(r.get('program_bytes')):>10}{ratio('step_speedup'):>9}{ratio('e2e_decode_speedup'):>9}"
    )


def overhead_line(o: dict) -> str:
    if "ratio" not in o:
        return f"displaced-step overhead: skipped, {o.get('skipped')}"
    n, dd = o["naive_patch"]["step_ms"], o["displaced"]["step_ms"]
    return (
        f"displaced-step overhead ({o['devices']} devices, mesh {o['mesh']}, {o['mode']}, one noise "
        f"prediction, median of {o['naive_patch']['repeats']}): displaced {dd['median']:.2f} ms "
        f"({dd['min']:.2f}-{dd['max']:.2f}) / naive patch {n['median']:.2f} ms "
        f"({n['min']:.2f}-{n['max']:.2f}) = {o['ratio']:.3f}"
    )


def notes(report: dict) -> str:
    text = NOTES
    if report["platform"] == "cpu":
        text += (
            "\n  CPU: the fake devices share this host's cores, so speedups between device counts mean "
            "nothing; the\n    displaced/naive ratio is the displaced machinery's extra work: its compute "
            "and the CPU runtime's\n    in-process exchanges between the fake devices (no interconnect)."
        )
    text += (
        "\n  program: per-device bytes of the compiled loop by XLA's memory analysis (arguments + outputs + "
        "temporaries)."
    )
    if report["memory_source"] == "memory_analysis":
        return text + "\n  peak mem: this backend reports no memory_stats: the program figure."
    return text + (
        "\n  peak mem: max over the devices of memory_stats' peak_bytes_in_use during the loop (every "
        "resident buffer:\n    the replicated weights too); '<=' where the process-wide peak was set "
        "earlier and bounds it."
    )

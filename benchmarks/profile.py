"""Where the time goes on the GPU: a jax.profiler trace, GPU time summed per kernel and per kind.

    python -m benchmarks.profile --out profile.md                      # the main job's small U-Net
    python -m benchmarks.profile --model sd15 --batches 1,8 --out sd_profile.md --raw sd_profile

--model sd15: the Stable Diffusion 1.5 pipeline call that benchmarks.sd_speed times (random weights, bf16,
cuDNN attention, 512x512, DPM-Solver++ with CFG, text encoding and decoding), --sd-steps steps, at each
batch. Every kernel is tied to the HLO instruction that launched it (the trace's hlo_op, looked up in XLA's
dump of the optimised program), so it is classed by what it computes (convolution, attention, matrix
product, normalisation statistics, elementwise fusion, copy/transpose) and by where it sits in the network
(flax's module path in the instruction's op_name: level, resnet, self- or cross-attention, feed-forward).
--raw DIR keeps the per-kernel sums and the optimised HLO, to re-read without a GPU.

Training: the main job's U-Net (bf16) at --train-batch, --steps steps in one scanned dispatch (as
mnist_cfg trains). Sampling: DDPM with classifier-free guidance at --sample-batch, --sample-steps steps
of a T = --sample-steps schedule (the 1000-step run's kernels, fewer of them). Kernels are grouped by
kind from their names: convolution (cuDNN), matrix product (cuBLAS / Triton GEMM), fusion (XLA's fused
elementwise and reduction kernels: GroupNorm, SiLU, adds, the optimizer), copy / transpose, other.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.speed import JaxBench
from jaxdiff import guidance, sampling, schedules, train

KINDS = [("attention", r"flash|fmha|sdpa|attention"),
         ("convolution", r"conv(?!ert)|cudnn|implicit_?gemm|xmma_fprop|xmma_dgrad|xmma_wgrad|sm\d+_xmma"
                         r"|fprop|dgrad|wgrad"),
         ("matrix product", r"gemm|cublas|cutlass|triton_gemm|matmul|nvjet|sm90_x?mma"),
         ("copy / transpose", r"copy|transpose|memcpy|memset"),
         ("fusion", r"fusion|loop_|input_|reduce|triton")]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def trace_events(trace_dir: str) -> list[dict]:
    """The complete ("X") events on the accelerator's streams of the perfetto trace under ``trace_dir``."""
    files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        return []
    with gzip.open(files[0]) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, n in names.items() if re.search(r"/device:(GPU|TPU)", n)}
    if not gpu:
        print(f"no accelerator streams among the trace's processes {sorted(names.values())}", file=sys.stderr)
    return [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e]


def kernel_times(trace_dir: str) -> tuple[dict, float]:
    """{kernel name: (total microseconds, calls)} on the accelerator's streams of a perfetto trace, and
    the wall span they cover."""
    events = trace_events(trace_dir)
    totals = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        totals[e["name"]][0] += e["dur"]
        totals[e["name"]][1] += 1
    return dict(totals), span_of(events)


def span_of(events) -> float:
    return max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events) if events else 0.0


def profile(fn, label: str) -> tuple[dict, float]:
    fn()  # compile and warm up outside the trace
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            fn()
        return kernel_times(d)


def report(label: str, totals: dict, span: float, top: int) -> list[str]:
    busy = sum(t for t, _ in totals.values())
    if not totals:
        return [f"### {label}", "", "no accelerator kernels in the trace (a CPU run)", ""]
    by_kind = collections.defaultdict(float)
    for name, (t, _) in totals.items():
        by_kind[kind_of(name)] += t
    lines = [f"### {label}", "", f"{busy / 1e3:.1f} ms of kernel time in a {span / 1e3:.1f} ms span "
             f"({busy / span:.0%} busy); {sum(c for _, c in totals.values()):,} launches of {len(totals)} kernels.", "",
             "| kind | ms | share |", "| --- | --- | --- |"]
    lines += [f"| {k} | {t / 1e3:.2f} | {t / busy:.1%} |" for k, t in sorted(by_kind.items(), key=lambda kv: -kv[1])]
    lines += ["", "| kernel | kind | calls | ms | share | us per call |", "| --- | --- | --- | --- | --- | --- |"]
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    for name, (t, c) in ranked:
        short = name if len(name) <= 70 else name[:67] + "..."
        lines.append(f"| `{short}` | {kind_of(name)} | {c} | {t / 1e3:.2f} | {t / busy:.1%} | {t / c:.1f} |")
    return lines + [""]


# ----------------------------------------------------------------------------- Stable Diffusion, kernel by kernel

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")


def hlo_index(paths: list[str]) -> dict[str, dict[str, dict]]:
    """{module: {instruction: {opcode, target, kind, body, op_name}}} from XLA's optimised HLO text dumps
    (one program per module name: pass one call's files); ``body`` is the set of opcodes inside a fusion's
    computation."""
    modules = {}
    for path in paths:
        comps, instrs, current, module = collections.defaultdict(set), {}, None, None
        with open(path) as f:
            for line in f:
                if line.startswith("HloModule "):
                    module = line.split()[1].rstrip(",")
                    continue
                if (c := _COMPUTATION.match(line)) and "=" not in line.split("{")[0]:
                    current = c.group(1)
                    continue
                if not (m := _INSTRUCTION.match(line)):
                    continue
                name, rest = m.groups()
                op = re.search(r"(?<![\w\[])([a-z][a-z0-9\-]*)\(", rest)
                opcode = op.group(1) if op else "?"
                comps[current].add(opcode)
                get = lambda key, rest=rest: (g.group(1) if (g := re.search(key + r'="?([^",\s}]+)', rest)) else "")
                instrs[name] = dict(opcode=opcode, target=get("custom_call_target"), kind=get("kind"),
                                    calls=get("calls").lstrip("%"), op_name=(re.search(r'op_name="([^"]*)"', rest)
                                                                             or re.search("()", "")).group(1))
        for ins in instrs.values():
            ins["body"] = comps.get(ins.pop("calls"), set())
        if module:
            modules[module] = instrs
    return modules


def instruction_kind(ins: dict | None, kernel: str) -> str:
    """What a kernel computes, from the HLO instruction that launched it (its name when there is none)."""
    if ins is None:
        return {"convolution": "convolution", "matrix product": "matrix product", "attention": "attention (fused)",
                "copy / transpose": "copy / transpose"}.get(kind_of(kernel), "other (" + kind_of(kernel) + ")")
    op, target, body = ins["opcode"], ins["target"].lower(), ins["body"]
    if op == "custom-call":
        if "fmha" in target or "attention" in target or "flash" in target:
            return "attention (fused)"
        if "conv" in target:
            return "convolution"
        if "gemm" in target or "matmul" in target or "cublas" in target:
            return "matrix product"
        return f"other ({target or op})"
    if op == "convolution" or "convolution" in body:
        return "convolution"
    if op == "dot" or "dot" in body:
        return "matrix product"
    if op in ("copy", "transpose") or (body and body <= {"parameter", "copy", "transpose", "bitcast", "reshape",
                                                         "slice", "concatenate", "pad", "tuple", "get-tuple-element"}):
        return "copy / transpose"
    if op == "fusion" and ("reduce" in body or ins["kind"] == "kInput"):
        return "fusion with a reduction (norm statistics, softmax)"
    if op == "fusion":
        return "elementwise fusion (SiLU, adds, casts, scales)"
    return f"other ({op})"


def network_part(op_name: str) -> tuple[str, str]:
    """(where, component) from flax's module path in an instruction's op_name."""
    if "CLIPText" in op_name:
        return "text encoder", ""
    if "AutoencoderKL" in op_name:
        return "VAE decode", ""
    if "UNet/" not in op_name:
        return "sampler and glue", ""
    level = re.search(r"UNet/(down_blocks_\d+|mid_block|up_blocks_\d+)", op_name)
    level = level.group(1) if level else "stem (conv_in/out, time embedding)"
    for pattern, component in ((r"/attn1/", "self-attention"), (r"/attn2/", "cross-attention"),
                               (r"/ff/", "feed-forward"), (r"/transformer_blocks_\d+/norm\d", "transformer norms"),
                               (r"/attentions_\d+/(norm|proj_in|proj_out)", "transformer in/out"),
                               (r"/resnets_\d+/", "resnet"), (r"samplers", "down/upsample")):
        if re.search(pattern, op_name):
            return level, component
    return level, "other"


def attributed_kernels(events: list[dict], modules: dict) -> list[tuple[str, str, str, str, float, int, str]]:
    """(kernel, kind, where, component, total us, calls, HLO instruction) per distinct (kernel, instruction)."""
    biggest = max(modules.values(), key=len) if modules else {}
    by_kernel_name = {re.sub(r"[.\-]", "_", n): ins for n, ins in biggest.items()}
    sums = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        args = e.get("args", {})
        # a kernel of a program that was not dumped (another jit) is looked up nowhere, not in the dumped one
        instrs = modules.get(args["hlo_module"], {}) if "hlo_module" in args else biggest
        op = args.get("hlo_op") or args.get("long_name", "").split(" ")[0]
        ins = instrs.get(op) or by_kernel_name.get(e["name"])
        kind = instruction_kind(ins, e["name"])
        where, component = network_part(ins["op_name"]) if ins else ("unattributed", "")
        key = (e["name"], kind, where, component, op if ins else f"?{op}")
        sums[key][0] += e["dur"]
        sums[key][1] += 1
    return [(*k[:4], t, c, k[4]) for k, (t, c) in sums.items()]


def sd_report(label: str, rows: list, span: float, steps: int, top: int) -> list[str]:
    """Tables of one traced call: by kind; the U-Net by component and kind; attention by level; the top kernels."""
    if not rows:
        return [f"### {label}", "", "no accelerator kernels in the trace (a CPU run)", ""]
    busy = sum(r[4] for r in rows)
    launches = sum(r[5] for r in rows)
    unet = [r for r in rows if r[2] not in ("text encoder", "VAE decode", "sampler and glue", "unattributed")]
    ms = lambda us: f"{us / 1e3:.2f}"
    lines = [f"### {label}", "",
             f"{busy / 1e3:.1f} ms of kernel time in a {span / 1e3:.1f} ms span ({busy / span:.0%} busy; gaps "
             f"{(span - busy) / 1e3:.1f} ms); {launches:,} launches. U-Net: {sum(r[4] for r in unet) / steps / 1e3:.2f}"
             f" ms of kernels per step, {sum(r[5] for r in unet) / steps:.0f} launches per step; kernels not found "
             f"in the optimised HLO (placed nowhere, not in those figures): "
             f"{sum(r[4] for r in rows if r[2] == 'unattributed') / busy:.1%} of the kernel time.", ""]

    def table(title, key, subset, per_step):
        totals = collections.defaultdict(lambda: [0.0, 0])
        for r in subset:
            totals[key(r)][0] += r[4]
            totals[key(r)][1] += r[5]
        whole = sum(t for t, _ in totals.values())
        div = steps if per_step else 1
        unit = "per step" if per_step else "per call"
        out = [f"| {title} | ms {unit} | share | launches {unit} | us per launch |", "| --- | --- | --- | --- | --- |"]
        for k, (t, c) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
            out.append(f"| {k} | {ms(t / div)} | {t / whole:.1%} | {c / div:.0f} | {t / c:.1f} |")
        return out + [""]

    lines += ["Whole call, by what the kernels compute:", ""]
    lines += table("kind", lambda r: r[1], rows, False)
    lines += ["Whole call, by part:", ""]
    outside = ("text encoder", "VAE decode", "sampler and glue", "unattributed")
    lines += table("part", lambda r: r[2] if r[2] in outside else "U-Net", rows, False)
    lines += ["U-Net, by component and kind (per denoising step):", ""]
    lines += table("component: kind", lambda r: f"{r[3]}: {r[1]}", unet, True)
    lines += ["U-Net attention (the fused kernel and XLA's attention fusions), by level (per step):", ""]
    attn = [r for r in unet if r[3] in ("self-attention", "cross-attention") and r[1] != "matrix product"]
    lines += table("level, attention: kind", lambda r: f"{r[2]}, {r[3]}: {r[1]}", attn, True)
    lines += ["Top kernels:", "", "| kernel | kind | where | ms per call | launches | us per launch |",
              "| --- | --- | --- | --- | --- | --- |"]
    ranked = collections.defaultdict(lambda: [0.0, 0, set()])
    for name, kind, where, _, t, c, _ in rows:
        ranked[(name, kind)][0] += t
        ranked[(name, kind)][1] += c
        ranked[(name, kind)][2].add(where)
    for (name, kind), (t, c, wheres) in sorted(ranked.items(), key=lambda kv: -kv[1][0])[:top]:
        short = name if len(name) <= 60 else name[:57] + "..."
        place = ", ".join(sorted(wheres)) if len(wheres) <= 2 else f"{len(wheres)} places"
        lines.append(f"| `{short}` | {kind} | {place} | {ms(t)} | {c} | {t / c:.1f} |")
    return lines + [""]


def profile_sd(args) -> list[str]:
    """Trace the SD-1.5 pipeline call of benchmarks.sd_speed at each batch; tables per batch."""
    from benchmarks import sd_speed
    from jaxdiff import specs
    from jaxdiff.pipeline import Pipeline
    from jaxdiff.pretrained.stable_diffusion import StableDiffusion
    from jaxdiff.pretrained.tokenizer import load_tokenizer

    cfg = sd_speed.configs(args.tiny)
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    parts = {"unet": specs.StableDiffusionUNet.from_config(cfg["unet"]),
             "vae": specs.StableDiffusionAutoencoder.from_config(cfg["vae"]),
             "text": specs.CLIPText.from_config(cfg["text_encoder"])}
    params = {k: sd_speed.random_params(s.template(), i, dtype) for i, (k, s) in enumerate(parts.items())}
    sd = StableDiffusion(parts["unet"], parts["vae"], parts["text"], params, load_tokenizer(sd_speed.TOKENIZER),
                         dict(sd_speed.SD15_SCHEDULER), dtype=dtype, attention=args.attention)
    pipe = Pipeline.for_stable_diffusion(sd)
    size = 32 if args.tiny else 512
    lines = [f"{jax.devices()[0].device_kind}, jax {jax.__version__}; the SD-1.5 pipeline call of "
             f"benchmarks.sd_speed ({'the tiny test pipeline' if args.tiny else 'SD-1.5 architecture'}, random "
             f"weights, {jnp.dtype(dtype).name}, attention={args.attention}, {size}x{size}, {args.sd_steps} "
             f"DPM-Solver++ steps with CFG); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", ""]
    for b in args.batches:
        call = lambda b=b: np.asarray(pipe([sd_speed.PROMPT] * b, gamma=7.5, sampler="dpm++", steps=args.sd_steps,
                                           seed=0, height=size, width=size))
        dumped = set(glob.glob(os.path.join(args.dump_dir, "*after_optimizations.txt")))
        call()
        mine = sorted(set(glob.glob(os.path.join(args.dump_dir, "*after_optimizations.txt"))) - dumped)
        if not mine:  # a compilation cache, or a batch already compiled: nothing new was dumped
            print(f"batch {b}: XLA dumped no new program, so kernels are classed by name only", file=sys.stderr)
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d, create_perfetto_trace=True):
                call()
            events = trace_events(d)
        rows = attributed_kernels(events, hlo_index(mine))
        lines += sd_report(f"batch {b} (a guided batch of {2 * b}), {args.sd_steps} steps", rows, span_of(events),
                           args.sd_steps, args.top)
        if args.raw:
            os.makedirs(args.raw, exist_ok=True)
            with open(os.path.join(args.raw, f"kernels_batch{b}.json"), "w") as f:
                json.dump({"span_us": span_of(events), "steps": args.sd_steps, "rows": rows, "hlo": mine,
                           "args_example": events[0].get("args", {}) if events else {}}, f)
        print("\n".join(lines[-40:]), file=sys.stderr, flush=True)
    if args.raw:
        for path in glob.glob(os.path.join(args.dump_dir, "*generate*after_optimizations.txt")):
            with open(path, "rb") as src, gzip.open(os.path.join(args.raw, os.path.basename(path) + ".gz"), "wb") as gz:
                gz.write(src.read())
    shutil.rmtree(args.dump_dir, ignore_errors=True)
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("small", "sd15"), default="small")
    p.add_argument("--train-batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=20, help="training steps traced (one dispatch)")
    p.add_argument("--sample-batch", type=int, default=20)
    p.add_argument("--sample-steps", type=int, default=100)
    p.add_argument("--batches", default="1,8", type=lambda s: [int(v) for v in s.split(",")],
                   help="--model sd15: images per call")
    p.add_argument("--sd-steps", type=int, default=10, help="--model sd15: denoising steps per traced call")
    p.add_argument("--attention", default="cudnn", type=lambda s: None if s == "xla" else s,
                   help="--model sd15: cudnn or xla")
    p.add_argument("--tiny", action="store_true", help="--model sd15 with the tiny test pipeline (a CPU smoke run)")
    p.add_argument("--raw", default=None, help="--model sd15: folder for the per-kernel sums and the optimised HLO")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.model == "sd15":
        # XLA reads its flags when the backend starts, which nothing has asked for yet
        args.dump_dir = tempfile.mkdtemp(prefix="xla_dump_")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={args.dump_dir} "
                                   "--xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*generate.*").strip()
        return write(profile_sd(args), args.out)
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    bench_args = argparse.Namespace(channels=(64, 128, 256), timesteps=args.sample_steps,
                                    steps_per_dispatch=args.steps, repeats=1, sample_repeats=1)
    jb = JaxBench(bench_args, dtype)
    mesh = train.make_mesh(jax.local_devices()[:1])
    step = train.data_parallel(jb.loss, jb.tx, 0.999, mesh)
    rng = np.random.default_rng(0)
    data = train.shard_batches((rng.integers(0, 256, (args.steps, args.train_batch, 28, 28, 1), dtype=np.uint8),
                                rng.integers(0, 10, (args.steps, args.train_batch)).astype(np.int32)), mesh)
    state = [train.replicate(train.init_state(jb.params, jb.tx, 0), mesh)]

    def train_run():
        state[0], m = step(state[0], data)
        m["loss"].block_until_ready()

    sched = schedules.linear(args.sample_steps)

    @jax.jit
    def generate(params, labels, key):
        eps = guidance.cfg(lambda x, t, y: jb.model.apply(params, x, t, y), labels, 10, 3.0)
        k1, k2 = jax.random.split(key)
        return sampling.ddpm(eps, sched, jax.random.normal(k1, (labels.shape[0], 28, 28, 1)), key=k2)

    labels = jnp.arange(args.sample_batch) % 10
    sample_run = lambda: generate(jb.params, labels, jax.random.key(1)).block_until_ready()
    lines = [f"{jax.devices()[0].device_kind}, jax {jax.__version__}, the main job's U-Net (channels 64,128,256), "
             f"{jnp.dtype(dtype).name} compute; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", ""]
    lines += report(f"training: {args.steps} steps at batch {args.train_batch}", *profile(train_run, "train"), args.top)
    lines += report(f"sampling: CFG DDPM, {args.sample_steps} steps at batch {args.sample_batch}",
                    *profile(sample_run, "sample"), args.top)
    write(lines, args.out)


def write(lines: list[str], out: str | None) -> None:
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

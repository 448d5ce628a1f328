"""One Markdown table of optimizer step times, measured side by side.

    python -m bench.report [--models resnet18,resnet50] [--device cpu|cuda] [--repeats N]
                           [--only ID,ID] [--compile] [--out FILE.md]

Every available candidate (bench.candidates) of a model, plus two large streaming passes that
measure the machine's bandwidth (bench.timing.bandwidth_subjects), runs once per round in
shuffled order (bench.timing). Times are medians over the rounds; ratios are medians of the
per-round ratios, so that a slow spell on a shared machine, which hits both sides of a ratio
alike, cancels out. On a CPU, the compiled backend's MultiLevelAdam steps (bench.candidates.STAGED)
also run split into their stages (reduce, levels, apply: bench.stages), as further subjects of
the same rounds, for a second table beside the floor's parts. Progress goes to stderr, the
report to stdout (and to --out). One committed report per CPU vendor (bench/results/README.md).
"""
from __future__ import annotations

import argparse
import functools
import platform
import shlex
import statistics
import sys
from pathlib import Path

import torch

from .candidates import ADAM_FUSED, ALL_CANDIDATES, MLHD_ADAM_COMPILED, STAGED, Candidate, Live
from .machine import cpu_info
from .shapes import MODELS, make_grads, make_params, numel
from .stages import STAGES, timed_stages
from .timing import STREAM_BYTES, Subject, bandwidth_subjects, interleave

DEFAULT_MODELS = "resnet18,resnet50"
# CUDA needs more warm-up (Triton compilation, allocator) and affords more rounds.
WARMUP = {"cpu": 3, "cuda": 10}
REPEATS = {"cpu": 30, "cuda": 100}
DTYPE = torch.float32

READ_PASS = "read g, m, v"
COLUMNS = ("model", "optimizer", "backend", "median ms", "x mlhd torch", "x Adam fused",
           "min B/elem", "min MB", "GB/s", "% of in-place", "% of copy_")
STAGE_COLUMNS = ("model", "optimizer", "stage", "median ms", "x Adam fused", "x floor part")
HOST_PART = "rest of step() (Python)"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _median_ratio(times: dict[str, list[float]], num: Candidate, den: Candidate) -> float | None:
    if den.id not in times:
        return None
    return statistics.median(a / b for a, b in zip(times[num.id], times[den.id]))


def _step_in_stages(live: Live, log: list[dict[str, float]]) -> None:
    with timed_stages() as seconds:
        live.step()
    log.append(seconds)


def bench_model(model: str, device: torch.device, repeats: int, warmup: int,
                wanted: tuple[Candidate, ...] = ALL_CANDIDATES):
    """The table rows of one model, the bandwidths (GB/s) measured among them, the floor
    of a MultiLevelAdam step as a multiple of fused Adam (None without fused Adam), and the
    rows of the stage table."""
    shapes = MODELS[model]
    candidates, skipped = [], {}
    for cand in wanted:
        reason = cand.unavailable_reason(shapes, device)
        if reason is None:
            candidates.append(cand)
        else:
            skipped.setdefault(reason, []).append(cand.id)
    for reason, ids in skipped.items():
        _log(f"{model}: skipping {', '.join(ids)}: {reason}")
    if not any(c.is_mlhd for c in candidates):
        sys.exit(f"{model}: no multilevel_hd backend can run on {device}; see the reasons above")

    params = make_params(shapes, device, DTYPE)
    grad_sets = [make_grads(shapes, device, DTYPE, seed=seed) for seed in (1, 2)]
    lives = {cand: Live(cand, params, grad_sets) for cand in candidates}
    streams = bandwidth_subjects(device)
    subjects = [Subject(c.id, live.step, live.feed) for c, live in lives.items()]
    subjects += [subject for subject, _ in streams]
    # What a MultiLevelAdam step must read before it may write anything (docs/algorithm.md: every
    # g * u_prev, u_prev from m and v, and the NaN guard): g, m and v, as one plain read pass.
    g, m, v = (torch.rand(numel(shapes), device=device, dtype=DTYPE) for _ in range(3))
    subjects.append(Subject(READ_PASS, lambda: torch.dot(g, m) + v.sum()))
    # the stage split runs on a copy of its own: the table's totals are the plain step's
    staged = {cand: [] for cand in candidates if cand in STAGED and device.type == "cpu"}
    for cand, log in staged.items():
        live = Live(cand, params, grad_sets)
        subjects.append(Subject(_stages_name(cand), functools.partial(_step_in_stages, live, log), live.feed))
    _log(f"{model}: {len(subjects)} subjects x ({warmup} warm-up + {repeats}) rounds")
    times = interleave(subjects, repeats, warmup, device)
    bandwidth = {subject.name: nbytes / statistics.median(times[subject.name]) / 1e9
                 for subject, nbytes in streams}
    floor_times = floor = None  # that read pass plus fused Adam, per round; over fused Adam
    if ADAM_FUSED in lives:
        floor_times = [r + a for r, a in zip(times[READ_PASS], times[ADAM_FUSED.id])]
        floor = statistics.median(f / a for f, a in zip(floor_times, times[ADAM_FUSED.id]))

    rows = []
    for cand in candidates:
        median_s = statistics.median(times[cand.id])
        vs_torch = _median_ratio(times, cand, cand.baseline())
        vs_fused = _median_ratio(times, cand, ADAM_FUSED)
        nbytes = cand.min_bytes(shapes, DTYPE)
        gbps = nbytes / median_s / 1e9
        rows.append((model, cand.config.label, cand.label, _fmt3(median_s * 1e3),
                     _fmt_ratio(vs_torch), _fmt_ratio(vs_fused),
                     f"{nbytes / numel(shapes):.1f}", _fmt3(nbytes / 1e6),
                     f"{gbps:.1f}", f"{100 * gbps / bandwidth['in-place']:.0f}",
                     f"{100 * gbps / bandwidth['copy_']:.0f}"))
    # each staged subject ran once per round, warm-up rounds first
    stage_rows = _stage_rows(model, times, {cand: log[-repeats:] for cand, log in staged.items()}, floor_times)
    return rows, bandwidth, floor, stage_rows


def _stages_name(cand: Candidate) -> str:
    return f"{cand.id} in stages"


def _stage_rows(model: str, times: dict[str, list[float]], stage_logs: dict[Candidate, list[dict[str, float]]],
                floor: list[float] | None) -> list[tuple[str, ...]]:
    """Rows of the stage table: the floor's parts, then each staged candidate's stages, the
    rest of its step and its plain step; times in ms, ratios medians of per-round ratios
    (those to fused Adam and to the floor "-" where fused Adam was not timed: floor None)."""
    if not stage_logs:
        return []
    read = times[READ_PASS]
    fused = None if floor is None else times[ADAM_FUSED.id]

    def row(optimizer: str, part: str, seconds: list[float], floor_part: list[float] | None = None):
        def ratio(den):
            return "-" if den is None else _fmt_ratio(statistics.median(a / b for a, b in zip(seconds, den)))
        return (model, optimizer, part, _fmt3(statistics.median(seconds) * 1e3), ratio(fused), ratio(floor_part))

    rows = [row("floor", READ_PASS + " (`dot` + `sum`)", read)]
    if floor is not None:
        rows += [row("floor", "Adam fused", fused), row("floor", "read pass + Adam fused", floor)]
    for cand, log in stage_logs.items():
        label = f"{cand.config.label} {cand.label}"
        per_stage = {stage: [seconds[stage] for seconds in log] for stage in STAGES}
        host = [total - sum(seconds.values()) for total, seconds in zip(times[_stages_name(cand)], log)]
        rows += [row(label, "reduce", per_stage["reduce"], read), row(label, "levels", per_stage["levels"]),
                 row(label, "apply", per_stage["apply"], fused), row(label, HOST_PART, host),
                 row(label, "step() (the table's)", times[cand.id], floor)]
    return rows


def _fmt3(x: float) -> str:
    """Three significant digits, without the exponent that `.3g` uses from 1000 on."""
    return f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def _fmt_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def _cpp_reduce_loop() -> str | None:
    """Which float32 Adam reduction loop the cpp backend dispatched to on this CPU
    (torch.ops.multilevel_hd.adam_reduce_isa); None without the extension."""
    from multilevel_hd.backends import cpp_backend

    if cpp_backend.unavailable_reason("cpu") is not None:
        return None
    return torch.ops.multilevel_hd.adam_reduce_isa()


def _table(columns: tuple[str, ...], text_columns: int, rows) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * text_columns + "---:|" * (len(columns) - text_columns),
            *("| " + " | ".join(row) + " |" for row in rows)]


def render(args, rows, bandwidth: dict[str, dict[str, float]], floors: dict[str, float | None],
           stage_rows=()) -> str:
    device = torch.device(args.device)
    cpu = cpu_info()
    reduce_loop = _cpp_reduce_loop()
    streams = "; ".join(
        f"{model}: " + ", ".join(f"{name} {gbps:.1f} GB/s" for name, gbps in per_model.items())
        for model, per_model in bandwidth.items())
    floor_text = ", ".join(f"{model} {floor:.2f}" for model, floor in floors.items() if floor is not None)
    header = [
        "# multilevel_hd optimizer step benchmark",
        "",
        f"- command: `{shlex.join(['python', '-m', 'bench.report', *args.argv])}`",
        f"- python {platform.python_version()}, torch {torch.__version__}, {device.type}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", torch threads {torch.get_num_threads()}",
        f"- {cpu.describe()}"
        + (f"; cpp float32 Adam reduction loop: {reduce_loop}" if reduce_loop else ""),
        f"- {DTYPE} parameters; per model {args.warmup} warm-up + {args.repeats} timed rounds, "
        "every candidate once per round in shuffled order; times are medians",
        f"- bandwidth ({STREAM_BYTES // 2**20} MiB `copy_`, in-place `mul_` and read-only `sum`, "
        f"bytes read + written / median time, in the same rounds): {streams}",
        *([f"- floor of a MultiLevelAdam step that recomputes u_prev from m and v (it must read all "
           "of g, m, v before writing anything, then move what fused Adam moves): a plain read pass "
           f"over g, m, v (`dot` + `sum`) plus fused Adam, in the same rounds, x Adam fused: {floor_text}"]
          if floor_text else []),
        "- `x mlhd torch`: time / time of the multilevel_hd `torch` backend of the same "
        "configuration (torch.optim rows: of the multilevel_hd one on the same base optimizer); "
        "`x Adam fused`: time / time of torch.optim.Adam(fused=True); both medians of per-round "
        "ratios",
        "- `min B/elem`, `min MB`: the fewest bytes a step must move (bench/traffic.py); "
        "`GB/s` = min bytes / median time; `% of in-place`, `% of copy_`: of those bandwidths "
        "(on a CPU `copy_` pays an uncounted write-allocate read, so optimizers can beat it)",
        *(["- `torch (torch.compile)`: the torch backend's `step()` under `torch.compile` "
           "(Inductor, default mode), compiled in the warm-up rounds"] if args.compile else []),
        "- hyper-parameters (paper, ResNets): Adam lr 1e-3; SGD lr 0.1, Nesterov momentum 0.9; "
        "multilevel_hd defaults otherwise; [global+layer+param] starts at weights 0.4/0.3/0.3",
        "",
    ]
    table = _table(COLUMNS, 3, rows)
    if stage_rows:
        table += [
            "",
            "Stages of the compiled CPU step (bench/stages.py: each op of an instrumented copy of the "
            "optimizer timed with `perf_counter`, in the same rounds; `" + HOST_PART + "`: that copy's "
            "step less its ops; `step() (the table's)`: the plain step of the table above) beside the "
            "floor's parts. `x floor part`: reduce / the read pass, apply / fused Adam, step / (read "
            "pass + fused Adam); medians of per-round ratios.",
            "",
            *_table(STAGE_COLUMNS, 3, stage_rows),
        ]
    return "\n".join(header + table) + "\n"


def results_name() -> str:
    """Where this CPU's report is committed."""
    return f"bench/results/cpu-{cpu_info().vendor}.md"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS,
                        help=f"comma-separated, from: {', '.join(MODELS)} (default: %(default)s)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per model (default: %s)" % REPEATS)
    parser.add_argument("--only", help="comma-separated candidate ids to time (e.g. mlhd-adam-triton,adam-fused); "
                                       "default: every candidate")
    parser.add_argument("--compile", action="store_true",
                        help=f"also time {MLHD_ADAM_COMPILED.id}: the torch backend's step() under torch.compile "
                             "(Inductor compiles it in the warm-up rounds, which takes a while on a ResNet)")
    parser.add_argument("--out", type=Path, help="also write the report to this file: one per CPU vendor, "
                        f"bench/results/cpu-<vendor>.md (this machine's: {results_name()}), or "
                        "bench/results/cuda.md (bench/results/README.md)")
    args = parser.parse_args(argv)
    args.argv = argv
    args.models = args.models.split(",")
    args.candidates = ALL_CANDIDATES + ((MLHD_ADAM_COMPILED,) if args.compile else ())
    if args.only:
        ids = [i for i in args.only.split(",") if i] + ([MLHD_ADAM_COMPILED.id] if args.compile else [])
        known = {c.id: c for c in args.candidates}
        if any(i not in known for i in ids):
            parser.error(f"--only: unknown candidate(s) {[i for i in ids if i not in known]}; choose from {list(known)}")
        args.candidates = tuple(known[i] for i in dict.fromkeys(ids))
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    args.repeats = args.repeats or REPEATS[args.device]
    args.warmup = WARMUP[args.device]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    rows, bandwidth, floors, stage_rows = [], {}, {}, []
    for model in args.models:
        model_rows, bandwidth[model], floors[model], model_stage_rows = bench_model(
            model, device, args.repeats, args.warmup, args.candidates)
        rows += model_rows
        stage_rows += model_stage_rows
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next model's candidates need the memory
    text = render(args, rows, bandwidth, floors, stage_rows)
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()

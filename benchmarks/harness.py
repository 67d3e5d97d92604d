"""Timing, peak memory and the results table shared by every benchmark topic."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that wall time measures the computation, not the launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    median: float
    low: float
    high: float
    runs: list[float]

    @property
    def spread(self) -> float:
        """Half the range, relative to the median: how far apart the repeats are."""
        return (self.high - self.low) / (2 * self.median) if self.median > 0 else 0.0


def time_fn(fn: Callable[[], object], device: torch.device, repeats: int = 3, warmup: int = 1):
    """Run ``fn`` ``warmup`` times untimed (allocator, caches, lazy init), then ``repeats`` times.

    Returns ``(Timing, last_result)``; the median is robust to one disturbed repeat on a shared
    machine, the low/high pair shows the spread."""
    result = None
    for _ in range(warmup):
        result = fn()
    synchronize(device)
    runs = []
    for _ in range(max(1, repeats)):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        runs.append(time.perf_counter() - start)
    return Timing(statistics.median(runs), min(runs), max(runs), runs), result


def time_pair(fn_a, fn_b, device: torch.device, repeats: int = 3, warmup: int = 1):
    """Time two functions with their repeats interleaved (a b, b a, a b, ...), so that a change
    of machine load during the run hits both sides alike. Returns ``(Timing_a, Timing_b,
    result_a, result_b)``."""
    res = {0: None, 1: None}
    fns = (fn_a, fn_b)
    for _ in range(warmup):
        res = {0: fn_a(), 1: fn_b()}
    runs: dict[int, list[float]] = {0: [], 1: []}
    for r in range(max(1, repeats)):
        for k in (0, 1) if r % 2 == 0 else (1, 0):
            synchronize(device)
            start = time.perf_counter()
            res[k] = fns[k]()
            synchronize(device)
            runs[k].append(time.perf_counter() - start)
    a, b = (Timing(statistics.median(x), min(x), max(x), x) for x in (runs[0], runs[1]))
    return a, b, res[0], res[1]


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


_MALLOC_PINNED = False


def pin_malloc_to_mmap() -> None:
    """Make glibc serve every allocation ≥ 64 KiB by mmap and return it on free.

    By default glibc raises its mmap threshold after large frees and then recycles freed heap
    memory, so a tensor can be allocated without the resident set growing and a peak shows as
    zero. With a fixed threshold, the resident set follows the live tensors."""
    global _MALLOC_PINNED
    if _MALLOC_PINNED:
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (fixing it disables the dynamic rise)
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
    _MALLOC_PINNED = True


def _reset_cpu_peak() -> bool:
    # Writing 5 to clear_refs resets VmHWM (Linux ≥ 4.0): the peak of this call alone, not of
    # the process so far (data loading would otherwise mask it).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Peak memory (MiB) that ``fn`` adds on top of what is allocated before it starts.

    CUDA: ``max_memory_allocated`` from a reset. CPU: the resident-set high-water mark (VmHWM)
    reset before the call minus the resident set before it; tracemalloc cannot see torch's
    allocator, so it is not used for tensors."""
    import gc

    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, result
    pin_malloc_to_mmap()
    if not _reset_cpu_peak():
        raise RuntimeError("cannot reset the resident-set peak (/proc/self/clear_refs)")
    base = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM")
    return (peak - base) / 1024, result


@dataclass
class Row:
    """One line of the results table.

    ``ratio`` is ``reference_s / ours_s`` (a speed-up) unless ``ratio_def`` says ``ours/ref``
    (a cost relative to a baseline); ``target`` states the goal on that ratio in words and
    ``passed`` is its check, None when a side could not run."""

    topic: str
    name: str
    ours_s: float | None = None
    reference_s: float | None = None
    ratio: float | None = None
    ratio_def: str = "ref/ours"
    agreement: str = ""
    target: str = ""
    passed: bool | None = None
    ours_spread: float | None = None
    reference_spread: float | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)


def speed_row(
    topic: str,
    name: str,
    ours: Timing | None,
    ref: Timing | None,
    *,
    min_speedup: float | None = None,
    max_cost: float | None = None,
    agreement: str = "",
    agree_ok: bool = True,
    notes: str = "",
    extra: dict | None = None,
) -> Row:
    """A row from two timings: ``min_speedup`` asks ref/ours ≥ x, ``max_cost`` asks ours/ref ≤ x."""
    row = Row(topic, name, agreement=agreement, notes=notes, extra=extra or {})
    if ours is not None:
        row.ours_s, row.ours_spread = ours.median, ours.spread
    if ref is not None:
        row.reference_s, row.reference_spread = ref.median, ref.spread
    if max_cost is not None:
        row.ratio_def, row.target = "ours/ref", f"ours/ref ≤ {max_cost:g}"
    elif min_speedup is not None:
        row.target = f"ref/ours ≥ {min_speedup:g}"
    if ours is None or ref is None or ours.median <= 0:
        return row
    if max_cost is not None:
        row.ratio = ours.median / ref.median
        row.passed = bool(row.ratio <= max_cost and agree_ok)
    else:
        row.ratio = ref.median / ours.median
        ok = row.ratio >= min_speedup if min_speedup is not None else True
        row.passed = bool(ok and agree_ok)
    return row


def failed_row(topic: str, name: str, exc: BaseException, target: str = "") -> Row:
    """A row for a side that raised (e.g. a function still being written): kept in the table."""
    msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return Row(topic, name, target=target, passed=None, notes=f"not run: {msg[:160]}")


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch.set_num_threads({torch.get_num_threads()})"


def _fmt_s(x: float | None, spread: float | None = None) -> str:
    if x is None:
        return "—"
    text = f"{x:.3g}" if x >= 1e-3 else f"{x:.2e}"
    return text + (f" ±{100 * spread:.0f}%" if spread else "")


def _fmt_ratio(row: Row) -> str:
    if row.ratio is None or (isinstance(row.ratio, float) and math.isnan(row.ratio)):
        return "—"
    return f"{row.ratio:.3g} ({row.ratio_def})"


def markdown_table(rows: list[Row]) -> str:
    """The results as a Markdown table; ± is half the range of the repeats over their median."""
    head = (
        "| topic | benchmark | ours (s) | reference (s) | ratio | agreement | target | pass |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        verdict = {True: "pass", False: "**FAIL**", None: "n/a"}[r.passed]
        name = r.name + (f" — {r.notes}" if r.notes else "")
        cells = [
            r.topic,
            name,
            _fmt_s(r.ours_s, r.ours_spread),
            _fmt_s(r.reference_s, r.reference_spread),
            _fmt_ratio(r),
            r.agreement or "—",
            r.target or "—",
            verdict,
        ]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return head + "\n".join(lines) + "\n"


def write_results(rows: list[Row], out_dir: str, meta: dict) -> tuple[str, str]:
    """Write ``results.json`` (rows + run metadata) and ``results.md`` into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "results.json")
    md_path = os.path.join(out_dir, "results.md")
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=2, default=str)
    header = f"Measured {meta['date']} on {meta['machine']}" + (
        " (--quick: reduced sizes, not the reference figures)" if meta.get("quick") else ""
    )
    with open(md_path, "w") as f:
        f.write(header + ".\n\n" + markdown_table(rows))
    return json_path, md_path

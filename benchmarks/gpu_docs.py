"""Fill docs/PERFORMANCE.md's GPU cells from a GPU-check results folder (`gpu_check --update-docs DIR`).

`CELLS` maps each cell the check can measure (a table under a "## Target N" heading, a row named
by its leading cells, a column named by its header) to the figures it shows. Only those cells
change, and only where the results hold their figures; every other line of the file stays as
it is, except the block between `BLOCK_BEGIN` and `BLOCK_END`, which is rewritten to name the
device, the versions and the run the figures come from. Results of a smoke run or of a run
that did not run on a GPU are refused unless `force` (tests).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Callable

from benchmarks.gpu_figures import Figure, device_line

BLOCK_BEGIN = "<!-- gpu-check:begin -->"
BLOCK_END = "<!-- gpu-check:end -->"

Figures = dict[str, Figure]


@dataclasses.dataclass(frozen=True)
class Cell:
    """One table cell: under `section` (a heading's start), the row whose leading cells are `row`,
    the column titled `column`; `render(figures, old text)` gives the new text or None (no value)."""

    section: str
    row: tuple[str, ...]
    column: str
    render: Callable[[Figures, str], str | None]


def _text(figs: Figures, fid: str) -> str | None:
    f = figs.get(fid)
    return f.text if f is not None and f.value is not None else None


def _number(figs: Figures, fid: str, fmt: str) -> str | None:
    f = figs.get(fid)
    return fmt.format(f.value) if f is not None and f.value is not None else None


def _all(*parts: str | None) -> bool:
    return all(p is not None for p in parts)


def floor_cell(point: str) -> Callable[[Figures, str], str | None]:
    def render(figs: Figures, old: str) -> str | None:  # noqa: ARG001
        ratio = _text(figs, f"ttft7b/{point}/cache_floor_ratio")
        ttft, floor = _number(figs, f"ttft7b/{point}/cache_ttft_ms", "{:.2f}"), \
            _number(figs, f"ttft7b/{point}/cache_floor_ms", "{:.2f}")
        return f"{ratio} ({ttft} / {floor} ms)" if _all(ratio, ttft, floor) else None
    return render


def one(fid: str) -> Callable[[Figures, str], str | None]:
    return lambda figs, old: _text(figs, fid)


def number(fid: str, fmt: str) -> Callable[[Figures, str], str | None]:
    return lambda figs, old: _number(figs, fid, fmt)


def speedup_cell(step: str, point: str) -> Callable[[Figures, str], str | None]:
    def render(figs: Figures, old: str) -> str | None:  # noqa: ARG001
        text, cache = (_number(figs, f"{step}/{point}/{f}", "{:.1f}") for f in ("text_ttft_ms", "cache_ttft_ms"))
        speed = _text(figs, f"{step}/{point}/speedup")
        return f"{text} / {cache} ms ({speed})" if _all(text, cache, speed) else None
    return render


def peer_cell(step: str, point: str) -> Callable[[Figures, str], str | None]:
    def render(figs: Figures, old: str) -> str | None:  # noqa: ARG001
        text, cache = (_number(figs, f"{step}/{point}/{f}", "{:.1f}") for f in ("peer_text_ttft_ms",
                                                                                "peer_cache_ttft_ms"))
        return f"{text} / {cache} ms" if _all(text, cache) else None
    return render


def prepare_cell(step: str, point: str) -> Callable[[Figures, str], str | None]:
    def render(figs: Figures, old: str) -> str | None:  # noqa: ARG001
        share = _text(figs, f"{step}/{point}/prepare_share")
        prep, ttft = (_number(figs, f"{step}/{point}/{f}", "{:.2f}") for f in ("cache_prepare_ms", "cache_ttft_ms"))
        return f"{share} ({prep} / {ttft} ms)" if _all(share, prep, ttft) else None
    return render


def kernels_cell(figs: Figures, old: str) -> str | None:
    f = figs.get("kernels/all/passed")
    if f is None or f.value is None:
        return None
    verdict = f"{f.text} checks pass" + ("" if f.ok else ", failures in the run's summary.md")
    return re.sub(r"on a GPU: .*$", f"on a GPU: {verdict} (the GPU check named above)", old)


T1, T2, T3, T4 = "## Target 1:", "## Target 2:", "## Target 3:", "## Target 4:"
T5, T6, T7, T8 = "## Target 5:", "## Target 6:", "## Target 7:", "## Target 8:"
TTFT7B_POINTS = (("2", "1024"), ("2", "2048"), ("8", "1024"), ("8", "2048"))

CELLS: tuple[Cell, ...] = (
    *(Cell(T1, (k,), l, floor_cell(f"K{k}xL{l}")) for k, l in TTFT7B_POINTS),
    Cell(T2, ("2 x 1024 (2,176)",), "text MFU", one("ttft7b/K2xL1024/text_mfu")),
    Cell(T2, ("8 x 2048 (16,512)",), "text MFU", one("ttft7b/K8xL2048/text_mfu")),
    Cell(T2, ("8 x 2048 (16,512)",), "JAX / PyTorch", number("peer7b/K8xL2048/text_vs_peer", "{:.2f}")),
    Cell(T3, ("Qwen2.5-7B", "8 x 2048"), "JAX text / cache (speedup)", speedup_cell("ttft7b", "K8xL2048")),
    Cell(T3, ("Qwen2.5-7B", "8 x 2048"), "PyTorch text / cache (same run)", peer_cell("peer7b", "K8xL2048")),
    Cell(T3, ("Qwen3-14B", "3 x 4096"), "JAX text / cache (speedup)", speedup_cell("ttft14b", "K3xL4096")),
    Cell(T3, ("Qwen3-14B", "3 x 4096"), "PyTorch text / cache (same run)", peer_cell("peer14b", "K3xL4096")),
    *(Cell(T4, ("Qwen2.5-7B", f"{k} x {l}"), "prepare share (prepare / cache TTFT)",
           prepare_cell("ttft7b", f"K{k}xL{l}")) for k, l in TTFT7B_POINTS),
    Cell(T4, ("Qwen3-14B", "3 x 4096"), "prepare share (prepare / cache TTFT)", prepare_cell("ttft14b", "K3xL4096")),
    *(Cell(T5, (b,), col, number(f"batch/B{b}/{fid}", fmt)) for b in ("1", "8") for col, fid, fmt in (
        ("cache TTFT", "cache_ttft_ms", "{:.1f} ms"), ("text TTFT", "text_ttft_ms", "{:.1f} ms"),
        ("cache tok/s", "cache_tokens_per_s", "{:,.0f}"), ("text tok/s", "text_tokens_per_s", "{:,.0f}"))),
    Cell(T6, ("16,384",), "ms/token", number("decode/C16384/step_ms", "{:.2f}")),
    Cell(T6, ("16,384",), "floor ms", number("decode/C16384/floor_ms", "{:.2f}")),
    Cell(T6, ("16,384",), "ratio", one("decode/C16384/ratio")),
    Cell(T7, ("on",), "tokens/s", one("train/remat_on/tokens_per_s")),
    Cell(T7, ("on",), "vs 4,420", one("train/remat_on/vs_reference")),
    Cell(T7, ("on",), "MFU", one("train/remat_on/mfu")),
    Cell(T8, ("`cudnn` (GPU)",), "checked", kernels_cell),
)


def _cells(line: str) -> list[str]:
    """A markdown table row's cells (an escaped `\\|` stays inside its cell)."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def _section(lines: list[str], heading: str) -> tuple[int, int]:
    starts = [i for i, line in enumerate(lines) if line.startswith(heading)]
    if len(starts) != 1:
        raise ValueError(f"docs: expected one heading starting {heading!r}, found {len(starts)}")
    end = next((i for i in range(starts[0] + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return starts[0], end


def locate(lines: list[str], cell: Cell) -> tuple[int, int]:
    """(line index, column index) of a cell; a clear error when the docs no longer have it."""
    start, end = _section(lines, cell.section)
    header = next((i for i in range(start, end) if lines[i].startswith("|")), None)
    if header is None:
        raise ValueError(f"docs: no table under {cell.section!r}")
    titles = _cells(lines[header])
    if cell.column not in titles:
        raise ValueError(f"docs: the table under {cell.section!r} has no column {cell.column!r} (has {titles})")
    col = titles.index(cell.column)
    for i in range(header + 2, end):
        if not lines[i].startswith("|"):
            break
        if tuple(_cells(lines[i])[:len(cell.row)]) == cell.row:
            return i, col
    raise ValueError(f"docs: the table under {cell.section!r} has no row {' | '.join(cell.row)!r}")


def load_results(results_dir: Path) -> dict:
    path = results_dir / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (expected the results folder of launch/gpu_check.sh)")
    data = json.loads(path.read_text())
    if not str(data.get("schema", "")).startswith("psynth.gpu_check/"):
        raise ValueError(f"{path} is not a GPU-check results file (schema {data.get('schema')!r})")
    return data


def run_note(results: dict, results_dir: Path, filled: int) -> str:
    """The managed block's text: where the `filled` cells come from."""
    name, vers = device_line(results)
    smoke = results.get("mode") == "smoke"
    lines = [
        f"{'SMOKE RUN (tiny shapes on ' + name + '; a test of the tooling, not GPU figures)' if smoke else name}: "
        f"{filled} cells of the tables below come from `launch/gpu_check.sh` run on {results.get('created')} "
        f"(commit {(results.get('environment') or {}).get('commit') or 'unknown'}), {vers}; filled by "
        f"`python -m benchmarks.gpu_check --update-docs {results_dir}`.",
        "",
        "| step | status | wall s | cap s |",
        "|---|---|---:|---:|",
    ]
    for entry in results.get("steps", {}).values():
        wall = f"{entry['wall_s']:.1f}" if isinstance(entry.get("wall_s"), (int, float)) else "-"
        lines.append(f"| {entry['name']} | {entry.get('status')} | {wall} | {entry.get('cap_s'):g} |")
    return "\n".join(lines)


def update_docs(results_dir: Path, docs: Path, *, force: bool = False) -> list[str]:
    """Fill the docs' GPU cells from `results_dir`; returns one line per changed cell."""
    results = load_results(results_dir)
    platform = device_line(results)[0]
    if not force and (results.get("mode") != "full" or "[gpu]" not in platform):
        raise ValueError(f"{results_dir} holds a {results.get('mode')} run on {platform}: only a full run on a GPU "
                         "fills the GPU cells (--force to write it anyway)")
    figs = {f["id"]: Figure(**f) for f in results.get("figures", [])}
    lines = docs.read_text().splitlines()
    changes, filled = [], 0
    for cell in CELLS:
        i, col = locate(lines, cell)
        cells = _cells(lines[i])
        new = cell.render(figs, cells[col])
        filled += new is not None
        if new is None or new == cells[col]:
            continue
        changes.append(f"{cell.section.rstrip(':')} [{' | '.join(cell.row)}] {cell.column}: {cells[col]} -> {new}")
        cells[col] = new
        lines[i] = "| " + " | ".join(cells) + " |"
    begin = [i for i, line in enumerate(lines) if line.strip() == BLOCK_BEGIN]
    end = [i for i, line in enumerate(lines) if line.strip() == BLOCK_END]
    if len(begin) != 1 or len(end) != 1 or end[0] < begin[0]:
        raise ValueError(f"{docs}: expected one {BLOCK_BEGIN} ... {BLOCK_END} block")
    lines[begin[0] + 1:end[0]] = run_note(results, results_dir, filled).splitlines()
    docs.write_text("\n".join(lines) + "\n")
    return changes

"""Present a comparison: an aligned table on stdout, generations side by side, and a report directory.

The report directory holds results.json (settings, every measured number, generations), report.md (the table,
the quality on each evaluation text, the plots and the generations) and three PNG plots: kld_vs_size.png (mean
KLD from the original against file size: llama.cpp's presets, recognised type for type, as a line, every other
GGUF a point against it), kld_vs_speed.png (the same against prompt-processing and decode tok/s) and speed.png
(tok/s bars). Every file is written as one set.
"""
from __future__ import annotations

import json
import shutil
import unicodedata
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import files

MiB = 2**20


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ppl(value) -> str:
    """Perplexity with 3 decimals; scientific beyond 1e6 (an untrained or broken model)."""
    return _num(value, ".3f" if value is None or value < 1e6 else ".3e")


def _quality(r, key):
    return (r.quality or {}).get(key)


def _cell(section: str, key: str, fmt: str, scale: float = 1.0) -> Callable:
    """Cell text of one measured value (result.quality or result.speed), scaled for display; "-" if absent.
    Fixed-point values too small to show a digit (an F32 GGUF's KLD, ~1e-7) are written in scientific form."""
    def text(r) -> str:
        value = (getattr(r, section) or {}).get(key)
        if section == "quality" and value is not None and 0 < abs(value * scale) < 10 ** -int(fmt[-2]):
            return format(value * scale, ".1e")
        return _num(None if value is None else value * scale, fmt)
    return text


def _speed_cell(mode: str) -> Callable:
    """A speed: the median tok/s, and with interleaved runs +- half the interquartile range, in percent."""
    def text(r) -> str:
        speed = r.speed or {}
        median, q25, q75 = speed.get(f"{mode}_tok_per_s"), speed.get(f"{mode}_q25"), speed.get(f"{mode}_q75")
        if median is None:
            return "-"
        spread = "" if q25 is None or not median else f" ±{50 * (q75 - q25) / median:.1f}%"
        return f"{median:,.1f}{spread}"
    return text


def speed_ratios(results) -> str:
    """Each GGUF's median pp and tg speed as a multiple of the first GGUF's (the interleaved runs' medians)."""
    ggufs = [r for r in results if r.kind == "gguf" and (r.speed or {}).get("pp_tok_per_s")]
    if len(ggufs) < 2:
        return ""
    base = ggufs[0]
    parts = [f"{r.name} pp {r.speed['pp_tok_per_s'] / base.speed['pp_tok_per_s']:.3f}x, tg "
             f"{r.speed['tg_tok_per_s'] / base.speed['tg_tok_per_s']:.3f}x" for r in ggufs[1:]]
    runs = base.speed.get("speed_runs")
    return (f"speed vs {base.name}" + (f" (medians of {runs} interleaved rounds)" if runs else "") + ": "
            + "; ".join(parts))


# (header, right-aligned, cell text of one ModelResult)
COLUMNS: list[tuple[str, bool, Callable]] = [
    ("model", False, lambda r: r.name),
    ("size MiB", True, lambda r: _num(r.size_bytes / MiB, ",.1f")),
    ("PPL", True, lambda r: _ppl(_quality(r, "ppl"))),
    ("KLD mean", True, _cell("quality", "kld_mean", ".5f")),
    ("KLD median", True, _cell("quality", "kld_median", ".5f")),
    ("KLD p99", True, _cell("quality", "kld_p99", ".4f")),
    ("top-1 %", True, _cell("quality", "top1_agree", ".2f", 100)),
    ("load s", True, _cell("speed", "load_s", ".2f")),
    ("pp tok/s", True, _speed_cell("pp")),
    ("tg tok/s", True, _speed_cell("tg")),
    ("peak RSS MiB", True, _cell("speed", "peak_rss_bytes", ",.0f", 1 / MiB)),
    ("GPU MiB", True, _cell("speed", "gpu_mem_bytes", ",.0f", 1 / MiB)),
    ("device", False, lambda r: r.device),
]


def table_cells(results) -> tuple[list[str], list[list[str]]]:
    """Headers and one row of cell strings per model."""
    return [c[0] for c in COLUMNS], [[cell(r) for _, _, cell in COLUMNS] for r in results]


def format_table(results) -> str:
    """The comparison as an aligned plain-text table."""
    headers, rows = table_cells(results)
    widths = [max(len(x) for x in col) for col in zip(headers, *rows)]

    def line(cells):
        return "  ".join(c.rjust(w) if right else c.ljust(w)
                         for c, w, (_, right, _) in zip(cells, widths, COLUMNS)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def quality_by_text_table(results, markdown: bool = False) -> str:
    """KLD mean, top-1 agreement and perplexity of every model on every evaluation text."""
    texts = list(dict.fromkeys(t for r in results for t in r.quality_by_text))
    headers = ["model"] + [f"{h} {t}" for t in texts for h in ("KLD", "top-1", "PPL")]
    rows = []
    for r in results:
        row = [r.name]
        for t in texts:
            q = r.quality_by_text.get(t) or {}
            top1 = q.get("top1_agree")
            row += [_num(q.get("kld_mean"), ".5f"), "-" if top1 is None else f"{100 * top1:.2f}%", _ppl(q.get("ppl"))]
        rows.append(row)
    if markdown:
        return "\n".join("| " + " | ".join(c) + " |" for c in [headers, ["---"] + ["---:"] * (len(headers) - 1)] + rows)
    widths = [max(len(x) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(results) -> str:
    """The comparison as a GitHub-flavoured markdown table."""
    headers, rows = table_cells(results)
    align = ["---:" if right else "---" for _, right, _ in COLUMNS]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [headers, align] + rows)


def display_width(text: str) -> int:
    """Terminal columns a string takes: East Asian wide and full-width characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def wrap_display(paragraph: str, width: int) -> list[str]:
    """Greedy wrap by terminal columns (textwrap counts characters, which misaligns Chinese text), breaking
    at the last space of a line when there is one."""
    lines, line = [], ""
    for ch in paragraph:
        if display_width(line + ch) > width:
            cut = line.rfind(" ")
            lines.append(line[:cut] if cut > 0 else line)
            line = line[cut + 1:] if cut > 0 else ""
        line += ch
    return lines + [line]


def side_by_side(prompt: str, names: list[str], texts: list[str], width: int = 160) -> str:
    """One prompt's answers in columns, one column per model, each wrapped to its share of `width`."""
    gap = 3
    col = max(20, (width - gap * (len(names) - 1)) // max(1, len(names)))
    columns = []
    for name, text in zip(names, texts):
        lines = [name, "-" * min(col, max(display_width(name), 8))]
        for paragraph in text.splitlines() or [""]:
            lines.extend(wrap_display(paragraph.replace("\t", "    "), col))
        columns.append(lines)

    def cell(c, i):
        text = c[i] if i < len(c) else ""
        return text + " " * (col - display_width(text))

    rows = [(" " * gap).join(cell(c, i) for c in columns).rstrip() for i in range(max(len(c) for c in columns))]
    return f"prompt: {prompt}\n" + "\n".join(rows)


# --------------------------------------------------------------------------------------------------------------
# Report files
# --------------------------------------------------------------------------------------------------------------


def _ladder_and_points(results, key: str):
    """(presets sorted by size, other GGUFs) among the results that have `key` in their quality."""
    ggufs = [r for r in results if r.kind == "gguf" and _quality(r, key) is not None]
    presets = sorted((r for r in ggufs if r.recipe), key=lambda r: r.size_bytes)
    return presets, [r for r in ggufs if not r.recipe]


def _draw(ax, presets, others, x_of, key: str) -> None:
    """llama.cpp's presets as a line (the ladder a mixed file should sit below), every other GGUF a point."""
    if presets:
        ax.plot([x_of(r) for r in presets], [_quality(r, key) for r in presets], "o-", color="tab:grey",
                label="llama.cpp presets")
        for r in presets:
            ax.annotate(r.recipe, (x_of(r), _quality(r, key)), textcoords="offset points", xytext=(5, 4),
                        fontsize=8, color="tab:grey")
    for r in others:
        ax.scatter([x_of(r)], [_quality(r, key)], s=40, marker="D", zorder=3)
        ax.annotate(r.name, (x_of(r), _quality(r, key)), textcoords="offset points", xytext=(5, -10), fontsize=8)
    values = [_quality(r, key) for r in presets + others]
    if key == "kld_mean" and values and all(v > 0 for v in values):
        ax.set_yscale("log")
    if presets:
        ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)


def _quality_key(results) -> tuple[str, str]:
    use_kld = any(_quality(r, "kld_mean") is not None for r in results if r.kind == "gguf")
    return ("kld_mean", "mean KL divergence from the original (nats)") if use_kld else ("ppl", "perplexity")


def plot_kld_vs_size(results, path: Path) -> None:
    """Mean KLD from the original against file size (log KLD axis): llama.cpp's presets as a line, the other
    GGUFs as points; the original's own size is a dashed line. Without any KLD (no cached original logits)
    perplexity is plotted instead."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label = _quality_key(results)
    presets, others = _ladder_and_points(results, key)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _draw(ax, presets, others, lambda r: r.size_bytes / MiB, key)
    for r in results:
        if r.kind == "transformers":
            ax.axvline(r.size_bytes / MiB, color="grey", linestyle="--", linewidth=1)
            ax.annotate(f"{r.name} ({r.size_bytes / MiB:,.0f} MiB)", (r.size_bytes / MiB, 0.98),
                        xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right", fontsize=8)
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel(label)
    ax.set_title(("KL divergence" if key == "kld_mean" else "perplexity") + " vs file size")
    files.save_figure(fig, path, bbox_inches="tight")


def plot_kld_vs_speed(results, path: Path) -> None:
    """Mean KLD against prompt-processing and decode speed (median tok/s), presets as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label = _quality_key(results)
    presets, others = _ladder_and_points(results, key)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, mode, title in ((axes[0], "pp", "prompt processing"), (axes[1], "tg", "decode")):
        timed = lambda rs: [r for r in rs if (r.speed or {}).get(f"{mode}_tok_per_s")]
        ladder = sorted(timed(presets), key=lambda r: r.speed[f"{mode}_tok_per_s"])
        _draw(ax, ladder, timed(others), lambda r: r.speed[f"{mode}_tok_per_s"], key)
        ax.set_xlabel(f"{title} (tok/s, median)")
    axes[0].set_ylabel(label)
    fig.suptitle(("KL divergence" if key == "kld_mean" else "perplexity") + " vs speed")
    files.save_figure(fig, path, bbox_inches="tight")


def plot_speed(results, path: Path) -> None:
    """Bars of prompt-processing and decode tok/s per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    measured = [r for r in results if r.speed]
    names = [r.name for r in measured]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(names) + 1.8))
    for ax, key, title in ((axes[0], "pp_tok_per_s", "prompt processing"), (axes[1], "tg_tok_per_s", "decode")):
        values = [r.speed[key] for r in measured]
        ax.barh(names, values, color="tab:blue")
        for i, v in enumerate(values):
            ax.annotate(f"{v:,.1f}", (v, i), textcoords="offset points", xytext=(3, 0), va="center", fontsize=8)
        ax.set_title(f"{title} (tok/s)")
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.invert_yaxis()
        ax.margins(x=0.25)
    files.save_figure(fig, path, bbox_inches="tight")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>") or " "


def report_markdown(results, prompts: list[str], texts: dict, settings: dict, notes: list[str]) -> str:
    """report.md: settings, the table, the plots, notes and the generations side by side."""
    lines = ["# Model comparison", "", "## Settings", ""]
    lines += [f"- `{k}`: {v}" for k, v in settings.items()]
    lines += ["", "## Results", "", markdown_table(results), "", speed_ratios(results), ""]
    lines += ["Quality: the second half of each evaluation window is scored (llama-perplexity's convention); "
              "KLD is KL(original || model) per token.", ""]
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    if any(len(r.quality_by_text) > 1 for r in results):
        lines += ["Quality on each evaluation text:", "", quality_by_text_table(results, markdown=True), ""]
    lines += ["![KLD vs file size](kld_vs_size.png) ![KLD vs speed](kld_vs_speed.png)", "", "![speed](speed.png)",
              "", "## Generations (greedy)", ""]
    names = [r.name for r in results]
    for i, prompt in enumerate(prompts):
        lines += [f"### {_md_cell(prompt)}", "", "| " + " | ".join(names) + " |",
                  "| " + " | ".join("---" for _ in names) + " |",
                  "| " + " | ".join(_md_cell(texts[n][i]) for n in names) + " |", ""]
    return "\n".join(lines)


def write_report(report_dir, results, prompts: list[str], texts: dict, settings: dict,
                 notes: list[str]) -> list[Path]:
    """Write results.json, report.md, kld_vs_size.png and speed.png into report_dir as one set (an earlier
    report stays whole until the new one is); returns their paths."""
    report_dir = Path(report_dir)
    payload = {"settings": settings, "notes": notes, "prompts": prompts,
               "models": [{**asdict(r), "generations": texts[r.name]} for r in results]}
    paths = [report_dir / n for n in ("results.json", "report.md", "kld_vs_size.png", "kld_vs_speed.png",
                                      "speed.png")]
    with files.OutputSet() as outputs:
        files.write_text(outputs.path(paths[0]), json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
        files.write_text(outputs.path(paths[1]), report_markdown(results, prompts, texts, settings, notes) + "\n")
        plot_kld_vs_size(results, outputs.path(paths[2]))
        plot_kld_vs_speed(results, outputs.path(paths[3]))
        plot_speed(results, outputs.path(paths[4]))
    return paths


def terminal_width() -> int:
    """Width for side-by-side generations: the terminal's, at least 100 columns."""
    return max(100, shutil.get_terminal_size((160, 40)).columns)

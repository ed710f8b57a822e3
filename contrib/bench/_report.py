"""Medians, ratios, the terminal table and the SVG chart (written by hand: no
matplotlib needed)."""
import math
import random
import statistics
from xml.sax.saxutils import escape

DIGITS = {"ms": 1, "Gbit/s": 2, "conn/s": 0, "MiB": 1, "%": 1, "us": 0, "errors": 0,
          "fds/min": 2, "MiB/min": 3, "threads/min": 2}


def rows(scenario, samples: dict, skipped: dict, notes: dict | None = None) -> list[dict]:
    """One row a metric: medians of each side, ours / rootlesskit, and `advantage`
    (above 1: ours is better, whichever way the metric is better). `notes`: metric
    key -> what the verdict column says of a row without a ratio."""
    out = []
    for metric in scenario.metrics:
        median = {side: statistics.median(values[metric.key])
                  for side, values in samples.items() if values.get(metric.key)}
        row = {"scenario": scenario.name, "label": metric.label, "unit": metric.unit,
               "better": "higher" if metric.higher_better else "lower",
               "samples": {side: values.get(metric.key, [])
                           for side, values in samples.items()},
               "median": median, "skipped": skipped, "limit_label": scenario.limit_label,
               "ratio": None, "advantage": None, "versus": None, "wins": None, "ci": None,
               "note": (notes or {}).get(metric.key, "")}
        ours = median.get("ours")
        if metric.compare and ours:
            for versus in ("rootlesskit", "limit"):  # the limit when rootlesskit has none
                other = median.get(versus)
                if other:
                    row["versus"] = versus
                    row["ratio"] = ours / other
                    row["advantage"] = row["ratio"] if metric.higher_better else 1 / row["ratio"]
                    row["wins"] = _wins(row["samples"]["ours"], row["samples"][versus],
                                        metric.higher_better)
                    row["ci"] = ratio_interval(row["samples"]["ours"], row["samples"][versus])
                    break
        out.append(row)
    return out


def _wins(ours: list, other: list, higher_better: bool) -> list[int] | None:
    """[rounds where ours did better, rounds]: the sides ran in the same rounds, so
    this says whether a ratio of medians holds round by round or is noise."""
    if len(ours) != len(other):
        return None  # a side stopped part-way: rounds no longer pair up
    better = sum((a > b) if higher_better else (a < b) for a, b in zip(ours, other))
    return [better, len(ours)]


def ratio_interval(ours: list, other: list, draws: int = 2000) -> list[float] | None:
    """A 95 % interval for the ratio of medians, by resampling whole rounds (each
    round's pair of figures together, as they shared the machine's state): a ratio
    whose interval spans 1 is a tie, however far from 1 the median landed. Seeded, so
    the same samples give the same interval."""
    if len(ours) != len(other) or len(ours) < 5:
        return None  # unpaired, or too few rounds to say anything
    pick = random.Random(0).choices
    rounds = range(len(ours))
    ratios = []
    for _ in range(draws):
        chosen = pick(rounds, k=len(ours))
        theirs = statistics.median(other[i] for i in chosen)
        if theirs:
            ratios.append(statistics.median(ours[i] for i in chosen) / theirs)
    if len(ratios) < draws // 2:
        return None
    ratios.sort()
    return [ratios[int(0.025 * len(ratios))], ratios[int(0.975 * len(ratios)) - 1]]


def value(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    return f"{v:.{DIGITS.get(unit, 2)}f} {unit}"


def advantage_interval(row: dict) -> tuple[float, float] | None:
    """The ratio's interval in the advantage's terms (above 1: ours is better)."""
    if not row.get("ci"):
        return None
    lo, hi = sorted(c if row["better"] == "higher" else 1 / c for c in row["ci"])
    return lo, hi


def is_level(row: dict) -> bool:
    interval = advantage_interval(row)
    return interval is not None and interval[0] <= 1 <= interval[1]


def verdict(row: dict) -> str:
    adv = row["advantage"]
    if adv is None:
        return row.get("note", "")
    who = " rootlesskit" if row["versus"] == "rootlesskit" else f" {row['limit_label']}"
    notes = [f"better in {row['wins'][0]}/{row['wins'][1]}"] if row["wins"] else []
    interval = advantage_interval(row)
    if is_level(row):
        notes.insert(0, f"{adv:.2f}x, 95 % {interval[0]:.2f}-{interval[1]:.2f}x")
        return f"level with{who} ({'; '.join(notes)})"
    if interval:
        lo, hi = interval if adv >= 1 else (1 / interval[1], 1 / interval[0])
        notes.insert(0, f"95 % {lo:.2f}-{hi:.2f}x")
    word = "ahead of" if adv >= 1 else "behind"
    return f"{word}{who} {max(adv, 1 / adv):.2f}x" + (f" ({'; '.join(notes)})" if notes else "")


def summary(row: dict) -> str:
    """One line: each side's median, then the verdict."""
    m = row["median"]
    names = {"ours": "rootless-run", "rootlesskit": "rootlesskit", "limit": row["limit_label"]}
    parts = [f"{names[side]} {value(m[side], row['unit'])}" for side in names if side in m]
    return ", ".join(parts or ["no figures"]) + (f"; {verdict(row)}" if verdict(row) else "")


HEADER = ("scenario", "rootless-run", "rootlesskit", "ratio", "verdict", "limit")


def table_lines(all_rows: list[dict]) -> list[list[str]]:
    lines = []
    for row in all_rows:
        m = row["median"]
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] and row["versus"] == "rootlesskit" \
            else "-"
        limit = value(m.get("limit"), row["unit"])
        if "limit" in m:
            limit += f" ({row['limit_label']})"
        lines.append([row["label"], value(m.get("ours"), row["unit"]),
                      value(m.get("rootlesskit"), row["unit"]), ratio, verdict(row), limit])
    return lines


def terminal_table(all_rows: list[dict]) -> str:
    lines = [list(HEADER)] + table_lines(all_rows)
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
                     for line in lines)


def markdown_table(all_rows: list[dict]) -> str:
    lines = [list(HEADER), ["---"] * len(HEADER)] + table_lines(all_rows)
    return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |"
                     for line in lines)


def svg_chart(all_rows: list[dict], subtitle: str) -> str:
    """Horizontal bars of `advantage` on a log scale: right of the middle line
    rootless-run is ahead, left it is behind."""
    shown = [row for row in all_rows if row["advantage"]]
    label_w, plot_w, row_h, top = 440, 380, 24, 64
    span = 3.0  # log2: 1/8x .. 8x
    width, height = label_w + plot_w + 30, top + row_h * len(shown) + 40
    soak = next((row["soak"] for row in all_rows if row.get("soak")), None)
    panels, panels_h = _soak_panels(soak, height, width) if soak else ([], 0)
    height += panels_h
    mid = label_w + plot_w / 2

    def x(adv: float) -> float:
        return mid + max(-span, min(span, math.log2(adv))) / span * plot_w / 2

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           '<text x="10" y="20" font-size="15" font-weight="bold">rootless-run vs '
           'rootlesskit (right: rootless-run ahead; log scale)</text>',
           f'<text x="10" y="38" fill="#555">{escape(subtitle)}</text>']
    for tick in (1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8):
        tx = x(tick)
        text = f"{tick:g}x" if tick >= 1 else f"1/{1 / tick:g}x"
        out.append(f'<line x1="{tx:.1f}" y1="{top - 8}" x2="{tx:.1f}" '
                   f'y2="{top + row_h * len(shown)}" stroke="{"#000" if tick == 1 else "#ddd"}"/>')
        out.append(f'<text x="{tx:.1f}" y="{top - 12}" text-anchor="middle" '
                   f'fill="#555">{text}</text>')
    for i, row in enumerate(shown):
        y = top + i * row_h
        adv = row["advantage"]
        label = row["label"] + ("" if row["versus"] == "rootlesskit"
                                else f" (vs {row['limit_label']})")
        x0, x1 = sorted((mid, x(adv)))
        colour = "#999" if is_level(row) else "#2a9d4b" if adv >= 1 else "#d1495b"
        out.append(f'<text x="{label_w - 8}" y="{y + 16}" text-anchor="end">'
                   f'{escape(label)}</text>')
        out.append(f'<rect x="{x0:.1f}" y="{y + 4}" width="{max(x1 - x0, 1):.1f}" '
                   f'height="{row_h - 8}" fill="{colour}"/>')
        interval = advantage_interval(row)
        if interval:  # the 95 % interval, as a whisker across the bar
            lo, hi = x(interval[0]), x(interval[1])
            out.append(f'<line x1="{lo:.1f}" y1="{y + row_h / 2}" x2="{hi:.1f}" '
                       f'y2="{y + row_h / 2}" stroke="#333" stroke-width="1.5"/>')
        # The figure on the other side of the middle line: it never runs into a label.
        text_x, anchor = (mid - 4, "end") if adv >= 1 else (mid + 4, "start")
        out.append(f'<text x="{text_x:.1f}" y="{y + 16}" text-anchor="{anchor}">'
                   f'{"+" if adv >= 1 else "-"}{max(adv, 1 / adv):.2f}x</text>')
    out.append(f'<text x="10" y="{height - panels_h - 12}" fill="#555">ratio of medians, '
               f'turned so that right is better (less time or memory, more throughput); '
               f'whisker: 95 % interval</text>')
    out += panels
    out.append("</svg>")
    return "\n".join(out) + "\n"


COLOURS = {"ours": "#2a9d4b", "rootlesskit": "#457b9d"}
PANELS = (("fds", "open fds"), ("pss", "PSS, MiB"), ("threads", "threads"),
          ("p99_us", "short request p99, us"))


def _soak_panels(soak: dict, top: int, width: int) -> tuple[list[str], int]:
    """The soak's samples over time, one small plot a figure, both sides in each; the
    warm-up shaded. The y axes start at 0, so a drift shows at its true size."""
    names = {"ours": "rootless-run", "rootlesskit": "rootlesskit"}
    cols, left, between, plot_h, gap = 2, 50, 70, 120, 56
    plot_w = (width - left - between - 20) // cols
    out = [f'<text x="10" y="{top + 10}" font-size="15" font-weight="bold">soak: every '
           f'{soak["interval"]:g} s for {soak["seconds"] // 60}:{soak["seconds"] % 60:02d} '
           f'(shaded: warm-up)</text>']
    for i, side in enumerate(soak["series"]):
        x = 10 + i * 140
        out.append(f'<line x1="{x}" y1="{top + 23}" x2="{x + 14}" y2="{top + 23}" '
                   f'stroke="{COLOURS.get(side, "#999")}" stroke-width="3"/>')
        out.append(f'<text x="{x + 20}" y="{top + 27}">{names.get(side, side)}</text>')
    for n, (key, title) in enumerate(PANELS):
        x0 = left + (n % cols) * (plot_w + between)
        y0 = top + 50 + (n // cols) * (plot_h + gap)
        out += _panel(soak, key, title, x0, y0, plot_w, plot_h)
    rows = (len(PANELS) + cols - 1) // cols
    return out, 50 + rows * (plot_h + gap)


def _panel(soak: dict, key: str, title: str, x0: float, y0: float, w: float,
           h: float) -> list[str]:
    values = [s[key] for samples in soak["series"].values() for s in samples
              if s.get(key) is not None]
    top = max(values, default=0) * 1.1 or 1.0
    seconds = soak["seconds"] or 1

    def xy(t: float, v: float) -> str:
        return f"{x0 + min(t, seconds) / seconds * w:.1f},{y0 + h - v / top * h:.1f}"

    # Paths, not rects: a rect of the chart is a bar of a ratio.
    warm = soak["warmup"] / seconds * w
    out = [f'<path d="M{x0},{y0}h{warm:.1f}v{h}h{-warm:.1f}z" fill="#eee"/>',
           f'<path d="M{x0},{y0}h{w}v{h}h{-w}z" fill="none" stroke="#999"/>',
           f'<text x="{x0}" y="{y0 - 6}">{escape(title)}</text>',
           f'<text x="{x0 - 4}" y="{y0 + 10}" text-anchor="end" fill="#555">'
           f'{top:.0f}</text>' if top >= 10 else
           f'<text x="{x0 - 4}" y="{y0 + 10}" text-anchor="end" fill="#555">{top:.2g}</text>',
           f'<text x="{x0 - 4}" y="{y0 + h}" text-anchor="end" fill="#555">0</text>',
           f'<text x="{x0}" y="{y0 + h + 14}" fill="#555">0:00</text>',
           f'<text x="{x0 + w}" y="{y0 + h + 14}" text-anchor="end" fill="#555">'
           f'{seconds // 60}:{seconds % 60:02d}</text>']
    for side, samples in soak["series"].items():
        points = " ".join(xy(s["t"], s[key]) for s in samples if s.get(key) is not None)
        if points:
            out.append(f'<polyline points="{points}" fill="none" '
                       f'stroke="{COLOURS.get(side, "#999")}" stroke-width="1.5"/>')
    return out

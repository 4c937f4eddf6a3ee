"""Charts drawn on the server as inline SVG: no script, no asset from anywhere, every label
escaped. Colours and sizes are SVG presentation attributes, so the page's strict content
security policy (no inline styles) still holds."""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
SUMMARY_COLOURS = {"Macro-Acc": "#111111", "Min-Acc": "#777777", "H-mean": "#444444"}

W, H = 640, 240
LEFT, RIGHT, TOP, BOTTOM = 52, 150, 14, 34


def _fmt(v: float) -> str:
    """Short tick labels: 0.25, 12.3k, 1.6M."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= limit:
            return f"{v / limit:.3g}{suffix}"
    return f"{v:.3g}"


def line_chart(
    series: Sequence[tuple[str, Sequence[tuple[int, float]]]],
    *,
    title: str,
    y_label: str,
    y_range: tuple[float, float] | None = None,
    dashed: Sequence[str] = (),
) -> Markup:
    """Lines over rounds; ``series`` is ``[(label, [(round, value), ...]), ...]``."""
    points = [p for _, pts in series for p in pts]
    if not points:
        return Markup('<p class="muted">{}</p>').format(f"{title}: nothing reported yet")
    xs = [x for x, _ in points]
    x0, x1 = min(xs), max(xs)
    if y_range is None:
        ys = [y for _, y in points]
        lo, hi = min(ys), max(ys)
        pad = (hi - lo) * 0.1 or abs(hi) * 0.1 or 1.0
        y_range = (lo - pad, hi + pad)
    y0, y1 = y_range
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (pw * (x - x0) / (x1 - x0) if x1 > x0 else pw / 2)

    def sy(y: float) -> float:
        return TOP + ph - ph * (y - y0) / ((y1 - y0) or 1.0)

    out = [
        Markup('<svg class="chart" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{t}">').format(
            w=W, h=H, t=title
        ),
        Markup("<title>{}</title>").format(title),
    ]
    for i in range(5):  # horizontal grid and y ticks
        v = y0 + (y1 - y0) * i / 4
        y = sy(v)
        out.append(Markup('<line x1="{}" x2="{}" y1="{:.1f}" y2="{:.1f}" stroke="#ddd"/>').format(LEFT, LEFT + pw, y, y))
        out.append(Markup('<text x="{}" y="{:.1f}" font-size="10" text-anchor="end">{}</text>').format(LEFT - 4, y + 3, _fmt(v)))
    ticks = sorted(set(xs))
    step = max(1, len(ticks) // 10)
    for x in ticks[::step]:
        out.append(Markup('<text x="{:.1f}" y="{}" font-size="10" text-anchor="middle">{}</text>').format(sx(x), H - BOTTOM + 14, x))
    out.append(Markup('<text x="{}" y="{}" font-size="10" text-anchor="middle">round</text>').format(LEFT + pw / 2, H - 4))
    out.append(Markup('<text x="12" y="{}" font-size="10" text-anchor="middle" transform="rotate(-90 12 {})">{}</text>').format(
        TOP + ph / 2, TOP + ph / 2, y_label))
    for i, (label, pts) in enumerate(series):
        colour = SUMMARY_COLOURS.get(label, PALETTE[i % len(PALETTE)])
        dash = Markup(' stroke-dasharray="5 3"') if label in dashed else Markup("")
        pts = sorted(pts)
        if len(pts) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            out.append(Markup('<polyline points="{}" fill="none" stroke="{}" stroke-width="2"{}/>').format(path, colour, dash))
        for x, y in pts:
            out.append(Markup('<circle cx="{:.1f}" cy="{:.1f}" r="3" fill="{}"><title>{} round {}: {}</title></circle>').format(
                sx(x), sy(y), colour, label, x, _fmt(y)))
        ly = TOP + 12 + 14 * i
        out.append(Markup('<line x1="{}" x2="{}" y1="{}" y2="{}" stroke="{}" stroke-width="2"{}/>').format(
            W - RIGHT + 8, W - RIGHT + 24, ly - 4, ly - 4, colour, dash))
        out.append(Markup('<text x="{}" y="{}" font-size="10">{}</text>').format(W - RIGHT + 28, ly, _short(label)))
    out.append(Markup("</svg>"))
    return Markup("").join(out)


def bar_chart(values: Sequence[tuple[int, float | None]], *, title: str, y_label: str) -> Markup:
    """One bar per round; a missing value leaves a gap."""
    known = [v for _, v in values if v is not None]
    if not known:
        return Markup('<p class="muted">{}</p>').format(f"{title}: not available yet")
    top = max(known) or 1.0
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    n = len(values)
    slot = pw / max(n, 1)
    out = [
        Markup('<svg class="chart" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{t}">').format(
            w=W, h=H, t=title
        ),
        Markup("<title>{}</title>").format(title),
    ]
    for i in range(5):
        v = top * i / 4
        y = TOP + ph - ph * i / 4
        out.append(Markup('<line x1="{}" x2="{}" y1="{:.1f}" y2="{:.1f}" stroke="#ddd"/>').format(LEFT, LEFT + pw, y, y))
        out.append(Markup('<text x="{}" y="{:.1f}" font-size="10" text-anchor="end">{}</text>').format(LEFT - 4, y + 3, _fmt(v)))
    step = max(1, n // 10)
    for i, (x, v) in enumerate(values):
        cx = LEFT + slot * (i + 0.5)
        if v is not None:
            h = ph * v / top
            out.append(Markup('<rect x="{:.1f}" y="{:.1f}" width="{:.1f}" height="{:.1f}" fill="#1f77b4"><title>round {}: {}</title></rect>').format(
                cx - slot * 0.35, TOP + ph - h, slot * 0.7, h, x, _fmt(v)))
        if i % step == 0:
            out.append(Markup('<text x="{:.1f}" y="{}" font-size="10" text-anchor="middle">{}</text>').format(cx, H - BOTTOM + 14, x))
    out.append(Markup('<text x="{}" y="{}" font-size="10" text-anchor="middle">round</text>').format(LEFT + pw / 2, H - 4))
    out.append(Markup('<text x="12" y="{}" font-size="10" text-anchor="middle" transform="rotate(-90 12 {})">{}</text>').format(
        TOP + ph / 2, TOP + ph / 2, y_label))
    out.append(Markup("</svg>"))
    return Markup("").join(out)


def _short(label: str, width: int = 20) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


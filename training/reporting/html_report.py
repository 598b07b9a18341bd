"""report.html: one self-contained page about a run, built from its directory's files alone (metrics.jsonl,
settings.json, data_source.json): summary, loss curves, every check of every transition, routing, clone
divergence, sample stories. Images are inline PNGs; no network, no scripts; it opens from disk.

    from training.reporting.html_report import write_report, screenshot
    path = write_report("runs/micro", PIPELINE)      # runs/micro/report.html, written atomically
    screenshot(path, "report.png")                    # headless Chromium (tests, bench/report_screenshot.py)

A section whose records are absent (a run halted in phase 1, a run logged before records carried the field)
says so in one line. Every text read from the files is HTML-escaped.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

from common.formats import duration, si
from common.files import write_atomic
from training.reporting.metrics import loss_figure, number, read_records, x_axis

REPORT_FILE = "report.html"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;margin:0 auto;
     padding:1rem 1.5rem 3rem;color:#222;line-height:1.45;background:#fff}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2.2rem}
h3{margin-bottom:.3rem}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.9rem}
th,td{border:1px solid #ddd;padding:.25rem .55rem;text-align:left;vertical-align:top}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.pass{color:#1a7f37;font-weight:600} .fail{color:#c62828;font-weight:600} .warn{color:#a15c00;font-weight:600}
.absent{color:#666;font-style:italic} .small{font-size:.85rem;color:#444}
img{max-width:100%;height:auto;display:block;margin:.5rem 0}
pre.story{white-space:pre-wrap;background:#fafafa;border:1px solid #e6e6e6;padding:.6rem;font-size:.9rem}
details summary{cursor:pointer}
"""


class Html(str):
    """Text that is already HTML (built here from escaped parts): table cells pass it through unescaped."""


def esc(x) -> str:
    return html.escape(str(x), quote=True)


# ------------------------------------------------------------------------------------------- reading
@dataclass
class RunFiles:
    out_dir: str
    records: list[dict]
    settings: dict | None  # settings.json
    source: dict | None  # data_source.json
    problems: list[str] = field(default_factory=list)  # files missing or unreadable, one line each

    def of(self, kind: str) -> list[dict]:
        return [r for r in self.records if r.get("kind") == kind]


def _read_json(path: str, problems: list[str]) -> dict | None:
    if not os.path.exists(path):
        problems.append(f"{os.path.basename(path)} is missing")
        return None
    try:
        with open(path, errors="replace") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        problems.append(f"{os.path.basename(path)} is unreadable ({e})")
        return None
    return data if isinstance(data, dict) else None


def read_run(out_dir: str) -> RunFiles:
    """The run directory's records and side files; what is missing or unreadable is listed, never raised."""
    problems: list[str] = []
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(metrics):
        problems.append("metrics.jsonl is missing")
    return RunFiles(out_dir, read_records(metrics), _read_json(os.path.join(out_dir, "settings.json"), problems),
                    _read_json(os.path.join(out_dir, "data_source.json"), problems), problems)


# ------------------------------------------------------------------------------------------ formatting
def fmt(x) -> str:
    """A figure as people read it: 1,234 for integers, 4 significant digits otherwise, — for nothing."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:.4g}" if x == x else "NaN"
    return str(x)


def when(t) -> str:
    t = number(t)
    return "—" if t is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def table(headers: list[str], rows: list[list], numeric: set[int] = frozenset()) -> Html:
    """An HTML table; str cells are escaped, Html cells kept; columns in `numeric` right-aligned."""
    def cell(i: int, c) -> str:
        text = c if isinstance(c, Html) else esc(c)
        return f'<td class="num">{text}</td>' if i in numeric else f"<td>{text}</td>"

    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(cell(i, c) for i, c in enumerate(row)) + "</tr>" for row in rows)
    return Html(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def key_values(rows: list[list]) -> Html:
    """A two-column table of (name, value) rows, names as row headers."""
    body = "".join(f"<tr><th>{esc(k)}</th><td>{v if isinstance(v, Html) else esc(v)}</td></tr>" for k, v in rows)
    return Html(f"<table><tbody>{body}</tbody></table>")


def absent(text: str) -> Html:
    return Html(f'<p class="absent">{esc(text)}</p>')


def verdict(passed) -> Html:
    if passed is None:
        return Html('<span class="warn">unknown</span>')
    return Html('<span class="pass">pass</span>' if passed else '<span class="fail">FAIL</span>')


def image(fig, alt: str) -> Html:
    """fig as an inline PNG (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100)  # laid out when made (constrained): one draw, not two
    finally:
        plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return Html(f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">')


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), layout="constrained")


def _phases(run: RunFiles, stages) -> list[tuple[str, str]]:
    """(phase name, label) of the pipeline's stages, then any other phase the records name, in order."""
    known = [(st.name, st.label) for st in stages]
    names = {n for n, _ in known}
    extra = dict.fromkeys(str(r["phase"]) for r in run.records if r.get("phase") is not None
                          and str(r["phase"]) not in names)
    return known + [(p, p) for p in extra]


def _x(records: list[dict]) -> tuple[str, str]:
    """(field, label): tokens when every record carries them, else global steps (older runs)."""
    if all(number(r.get("tokens")) is not None for r in records):
        return "tokens", "tokens trained"
    return "global_step", "global step (these records carry no tokens)"


# ------------------------------------------------------------------------------------------- sections
def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def _last(records: list[dict], kind: str | None = None) -> dict | None:
    chosen = [r for r in records if kind is None or r.get("kind") == kind]
    return chosen[-1] if chosen else None


def describe_source(source: dict | None) -> str:
    """data_source.json in one line: hub dataset, generated stories, or files with size and SHA-256."""
    if not source:
        return "—"
    origin = source.get("origin", "?")
    if origin == "files":
        files = source.get("files") or []
        parts = [f"{f.get('path', '?')} ({fmt(f.get('bytes'))} bytes, SHA-256 {str(f.get('sha256', ''))[:12]}…)"
                 for f in files if isinstance(f, dict)]
        return "files: " + ("; ".join(parts) or "none listed")
    if origin == "hub":
        return f"hub dataset {source.get('dataset', '?')}"
    return str(origin)


def outcome(run: RunFiles) -> tuple[str, str]:
    """(status, one line): the outcome record after the last start, else 'running or stopped without a word'."""
    starts = [i for i, r in enumerate(run.records) if r.get("kind") == "start"]
    after = run.records[starts[-1]:] if starts else run.records
    done = _last(after, "outcome")
    if done is not None:
        status = str(done.get("status", "unknown"))
        message = done.get("message") or ""
        return status, f"{status}{': ' + str(message) if message else ''} (global step {fmt(done.get('global_step'))})"
    last = _last(run.records)
    if last is None:
        return "unknown", "no records: the run has not logged anything"
    return "running", (f"no outcome recorded: still running, or stopped without a word (killed); last record "
                       f"{last.get('kind', '?')} at global step {fmt(last.get('global_step'))}, "
                       f"{when(last.get('time'))}")


def _flatten(settings) -> dict[str, object]:
    if not isinstance(settings, dict):
        return {}
    return {f"{section}.{name}": value for section, values in settings.items() if isinstance(values, dict)
            for name, value in values.items()}


def _setting(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def settings_section(run: RunFiles, start: dict | None) -> str:
    settings = (start or {}).get("settings") or run.settings
    preset = (start or {}).get("preset_settings")
    flat = _flatten(settings)
    if not flat:
        return str(absent("no settings recorded (no start record and no readable settings.json)"))
    everything = table(["setting", "value"], [[k, _setting(v)] for k, v in flat.items()])
    full = f"<details><summary>all {len(flat)} settings</summary>{everything}</details>"
    if not isinstance(preset, dict):
        return str(absent("no preset settings recorded to compare with")) + full
    base = _flatten(preset)
    changed = [[k, _setting(v), _setting(base[k]) if k in base else "—"] for k, v in flat.items()
               if k not in base or base[k] != v]
    name = (start or {}).get("preset")
    head = f"<h3>Settings that differ from the {esc(name or 'preset')} preset</h3>"
    if not changed:
        return head + f"<p>none: the run uses the preset as it is.</p>{full}"
    return head + table(["setting", "value", "preset value"], changed) + full


def summary_section(run: RunFiles, stages) -> str:
    starts = run.of("start")
    first, start = (starts[0], starts[-1]) if starts else (None, None)
    curve = [r for r in run.records if r.get("kind") in ("train", "eval")]
    last = curve[-1] if curve else {}
    done = _last(run.records, "outcome")
    status, line = outcome(run)
    seconds = done.get("seconds") if done else None
    if seconds is None and run.records:
        t0, t1 = number((first or run.records[0]).get("time")), number(run.records[-1].get("time"))
        seconds = t1 - t0 if t0 is not None and t1 is not None else None
    s = start or {}
    world = s.get("world_size")
    resumed = f", resumed {len(starts) - 1} time(s)" if len(starts) > 1 else ""
    rows = [["data", s.get("data") or describe_source(run.source)],
            ["data source (data_source.json)", describe_source(run.source)],
            ["training / validation tokens", f"{fmt(s.get('train_tokens'))} / {fmt(s.get('val_tokens'))}"],
            ["tokens trained, epochs seen",
             f"{fmt(last.get('tokens'))} tokens, {fmt(number(last.get('epochs')))} epochs"],
            ["training FLOPs", si(number(last.get("flops")))],
            ["device, processes, precision",
             f"{s.get('device', '—')}, {fmt(world)} process{'es' if world != 1 else ''}, {s.get('precision', '—')}"],
            ["preset", s.get("preset") or "—"],
            ["started", when((first or {}).get("time")) + resumed],
            ["wall time", duration(number(seconds))],
            ["outcome", Html(f'<span class="{_status_class(status)}">{esc(line)}</span>')]]
    if not starts:
        rows.insert(0, ["note", "no start record: a run logged before start records were written"])
    phases = []
    for name, label in _phases(run, stages):
        mine = [r for r in curve if r.get("phase") == name]
        if mine:
            phases.append([label, fmt(mine[-1].get("step")), fmt(number((_last(mine, "eval") or {}).get("loss")))])
    problems = "".join(str(absent(p)) for p in run.problems)
    per_phase = table(["phase", "steps trained", "last eval loss"], phases, {1, 2}) if phases else ""
    return problems + key_values(rows) + per_phase + settings_section(run, start)


def _status_class(status: str) -> str:
    return {"finished": "pass", "halted": "fail"}.get(status, "warn")


def loss_section(run: RunFiles, stages) -> str:
    curve = [r for r in run.records if r.get("kind") in ("train", "eval")]
    if not curve:
        return str(absent("no train or eval records: nothing to plot yet"))
    if x_axis(run.records, "flops")[0] == "global_step" and x_axis(run.records, "tokens")[0] == "global_step":
        fig = loss_figure(run.records, stages, "step", "loss against global step")
        note = absent("these records carry no tokens or FLOPs (a run logged before they were recorded): "
                      "plotted against global steps")
        return note + (image(fig, "loss against global step") if fig else "")
    parts = []
    for x, title in (("flops", "loss against training FLOPs"), ("tokens", "loss against tokens trained")):
        fig = loss_figure(run.records, stages, x, title)
        if fig is not None:
            parts.append(image(fig, title))
    note = ('<p class="small">Dashed lines: transitions. A ringed point: the grown model\'s step-0 eval, on the '
            'old model\'s last eval (growth preserves the function).</p>')
    return note + "".join(parts)


def _limit(rec: dict) -> str:
    limit = number(rec.get("limit"))
    if limit is None:
        return "—"
    return f"{'≥' if rec.get('higher_is_better') else '≤'} {fmt(limit)}"


def _check_row(key: str, rec) -> list:
    if not isinstance(rec, dict):
        return [key, "—", "—", "—", verdict(None), "unreadable check record"]
    name = f"{rec.get('name') or key} ({key})"
    message = rec.get("message") or ""
    check = Html(f"<details><summary>{esc(name)}</summary><span class=\"small\">{esc(message)}</span></details>"
                 if message else esc(name))
    fix = rec.get("fix") or ("—" if rec.get("passed") else "")
    if rec.get("consequence_of"):
        fix = f"a consequence of the drift at {rec['consequence_of']}; {fix}"
    value = number(rec.get("value"))
    return [check, rec.get("quantity") or "—", fmt(value), _limit(rec), verdict(rec.get("passed")), fix]


def checks_section(run: RunFiles, stages) -> str:
    transitions = run.of("transition")
    if not transitions:
        return str(absent("no transition records: the run has not reached a transition yet"))
    parts, seen = [], {}
    tries = Counter(str(t.get("index", "?")) for t in transitions)  # a failed transition is retried on resume
    for t in transitions:
        index = str(t.get("index", "?"))
        seen[index] = seen.get(index, 0) + 1
        attempt = f", attempt {seen[index]} of {tries[index]}" if tries[index] > 1 else ""
        title = t.get("title") or t.get("stage") or "transition"
        before, after = number(t.get("loss_before")), number(t.get("loss_after"))
        change = f" ({after - before:+.4f})" if before is not None and after is not None else ""
        parts.append(f"<h3>Transition {esc(index)}: {esc(title)}{esc(attempt)} — {verdict(t.get('passed'))}</h3>"
                     f'<p class="small">at global step {esc(fmt(t.get("global_step")))}, {esc(si(number(t.get("tokens"))))} '
                     f"tokens; eval loss before {esc(fmt(before))}, after {esc(fmt(after))}{esc(change)}</p>")
        checks = t.get("checks")
        if not isinstance(checks, dict) or not checks:
            parts.append(str(absent("no check results recorded for this transition")))
            continue
        rows = [_check_row(str(k), v) for k, v in checks.items()]
        parts.append(table(["check", "quantity", "measured", "limit", "verdict", "fix"], rows, {2, 3}))
    return "".join(parts)


def _load_matrix(evals: list[dict]) -> tuple[list[dict], list[list[list[float]]]]:
    """Evals whose routing load is a well-formed (layers, experts) table of the first one's shape."""
    kept, loads, shape = [], [], None
    for r in evals:
        load = (r.get("routing") or {}).get("load") if isinstance(r.get("routing"), dict) else None
        if not isinstance(load, list) or not load or not all(isinstance(row, list) and row for row in load):
            continue
        rows = [[number(v) if number(v) is not None else 0.0 for v in row] for row in load]
        this = (len(rows), len(rows[0]))
        if any(len(row) != this[1] for row in rows) or (shape is not None and this != shape):
            continue
        shape = shape or this
        kept.append(r)
        loads.append(rows)
    return kept, loads


def _heatmap(evals: list[dict], loads: list, label: str):
    """Expert load over evals: one row per (layer, expert), layers separated by white lines."""
    import numpy as np

    key, xlabel = _x(evals)
    layers, experts = len(loads[0]), len(loads[0][0])
    m = np.array(loads, dtype=float).reshape(len(loads), layers * experts).T  # (rows, evals)
    fig, ax = _figure(9, min(14.0, max(2.6, 0.16 * layers * experts + 1.4)))
    im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0, vmax=max(float(m.max()), 1e-9), interpolation="nearest")
    for layer in range(1, layers):
        ax.axhline(layer * experts - 0.5, color="white", linewidth=1.5)
    ax.set_yticks([layer * experts + (experts - 1) / 2 for layer in range(layers)],
                  [f"layer {layer}" for layer in range(layers)])
    ticks = sorted(set(np.linspace(0, len(evals) - 1, min(len(evals), 8)).round().astype(int).tolist()))
    ax.set_xticks(ticks, [si(number(evals[i].get(key))) if key == "tokens" else fmt(evals[i].get(key)) for i in ticks])
    ax.set_xlabel(f"eval at ({xlabel})")
    ax.set_ylabel(f"layer, experts 0-{experts - 1} top to bottom")
    ax.set_title(f"{label}: fraction of top-k assignments per expert (balanced = {1 / experts:.3g})")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02, label="load fraction")
    return fig


def _entropy_plot(evals: list[dict], label: str):
    key, xlabel = _x(evals)
    fig, ax = _figure(9, 3.2)
    layers = max(len(_list(e["routing"].get("entropy"))) for e in evals)
    for layer in range(layers):
        pts = [(number(e.get(key)), number(_at(e["routing"].get("entropy"), layer))) for e in evals]
        pts = [p for p in pts if None not in p]
        if pts:
            ax.plot(*zip(*pts), "o-", markersize=3, label=f"layer {layer}")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.text(ax.get_xlim()[0], 0.5, " router check's floor at growth", va="bottom", color="grey", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("load entropy / ln E")
    ax.set_title(f"{label}: load entropy per layer (1 = balanced)")
    if layers <= 16:
        ax.legend(fontsize=7, ncol=min(layers, 8), loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def _at(values, i: int):
    return values[i] if isinstance(values, list) and i < len(values) else None


def _list(values) -> list:
    return values if isinstance(values, list) else []


def _dead_table(evals: list[dict]) -> Html:
    last = evals[-1]["routing"]
    layers = max(len(_list(e["routing"].get("dead"))) for e in evals)
    rows = []
    for layer in range(layers):
        dead = [number(_at(e["routing"].get("dead"), layer)) for e in evals]
        dead = [d for d in dead if d is not None]
        first = next((e.get("global_step") for e in evals
                      if (number(_at(e["routing"].get("dead"), layer)) or 0) > 0), None)
        rows.append([f"layer {layer}", fmt(number(_at(last.get("entropy"), layer))),
                     fmt(int(dead[-1]) if dead else None), fmt(int(max(dead)) if dead else None), fmt(first)])
    return table(["layer", "entropy (last eval)", "dead experts (last eval)", "most dead at any eval",
                  "first eval with a dead expert (global step)"], rows, {1, 2, 3, 4})


def routing_section(run: RunFiles, stages) -> str:
    parts = []
    for name, label in _phases(run, stages):
        evals = [r for r in run.of("eval") if r.get("phase") == name and isinstance(r.get("routing"), dict)]
        evals, loads = _load_matrix(evals)
        if not evals:
            continue
        parts += [f"<h3>{esc(label)}</h3>", image(_heatmap(evals, loads, label), f"{label} expert load"),
                  image(_entropy_plot(evals, label), f"{label} load entropy"), _dead_table(evals)]
    if not parts:
        return str(absent("no routing records: no MoE phase has been evaluated yet"))
    return "".join(parts)


def divergence_section(run: RunFiles, stages) -> str:
    from transfer.checks.divergence import KINDS, DivergenceLimits, judge_clone_divergence

    floor, parts = DivergenceLimits().floor, []
    for name, label in _phases(run, stages):
        evals = [r for r in run.of("eval") if r.get("phase") == name and isinstance(r.get("clone_divergence"), dict)]
        if not evals:
            continue
        key, xlabel = _x(evals)
        fig, ax = _figure(9, 3.8)
        for i, kind in enumerate(KINDS + ("min",)):
            pts = [(number(e.get(key)), number(e["clone_divergence"].get(kind))) for e in evals]
            pts = [p for p in pts if None not in p]
            if pts:
                style = dict(color="black", linestyle=":", linewidth=2) if kind == "min" else dict(color=f"C{i}")
                ax.plot(*zip(*pts), marker="o", markersize=3, label=kind, **style)
        ax.axhline(floor, color="red", linestyle="--", linewidth=1, label=f"floor {floor:g}")
        ax.set_yscale("symlog", linthresh=floor / 100)  # pure clones read exactly 0: a log axis would drop them
        ax.set_ylim(bottom=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("median relative distance")
        ax.set_title(f"{label}: how far the cloned units have moved apart")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        history = [{k: v for k, v in e["clone_divergence"].items() if number(v) is not None} for e in evals]
        judged = judge_clone_divergence(history)
        line = f'<p>{verdict(judged.passed)} {esc(judged.message)}</p>'
        parts += [f"<h3>{esc(label)}</h3>", image(fig, f"{label} clone divergence"), line]
    if not parts:
        return str(absent("no clone-divergence records: no width-grown phase has been evaluated yet"))
    return "".join(parts)


def samples_section(run: RunFiles, stages) -> str:
    samples = run.of("sample")
    if not samples:
        return str(absent("no sample stories recorded yet"))
    parts = []
    for name, label in _phases(run, stages):
        for r in [s for s in samples if s.get("phase") == name]:
            prompt = r.get("prompt")
            parts.append(f"<h3>{esc(label)} <span class=\"small\">(global step {esc(fmt(r.get('global_step')))})"
                         f"</span></h3>" + (f"<p class=\"small\">prompt: {esc(prompt)}</p>" if prompt else "")
                         + f'<pre class="story">{esc(r.get("text") or "")}</pre>')
    return "".join(parts)


SECTIONS = (("summary", "Run summary", summary_section), ("loss", "Loss", loss_section),
            ("checks", "Transition checks", checks_section), ("routing", "Routing", routing_section),
            ("divergence", "Clone divergence", divergence_section), ("samples", "Sample stories", samples_section))


def render_report(out_dir: str, stages) -> str:
    """The page as text. stages: the pipeline's table (objects with .name, .label, .transition)."""
    run = read_run(out_dir)
    status, line = outcome(run)
    nav = " · ".join(f'<a href="#{anchor}">{esc(title)}</a>' for anchor, title, _ in SECTIONS)
    body = "\n".join(_section(anchor, title, render(run, stages)) for anchor, title, render in SECTIONS)
    name = os.path.basename(os.path.abspath(out_dir))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(name)}: growth-verified training</title><style>{STYLE}</style></head><body>"
            f"<h1>Run {esc(name)}</h1><p class=\"small\">{esc(os.path.abspath(out_dir))} · "
            f'<span class="{_status_class(status)}">{esc(line)}</span></p><nav class="small">{nav}</nav>\n'
            f"{body}\n</body></html>\n")


def write_report(out_dir: str, stages) -> str:
    """Write out_dir/report.html atomically (a temporary, then a rename) and return its path."""
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"no run directory {out_dir}: pass the --out-dir of a run")
    path = os.path.join(out_dir, REPORT_FILE)
    write_atomic(path, render_report(out_dir, stages))
    return path


# --------------------------------------------------------------------------------- headless Chromium
class ChromiumMissing(RuntimeError):
    """No Chromium binary on PATH."""


def find_chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def _chromium(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    exe = find_chromium()
    if exe is None:
        raise ChromiumMissing(f"no Chromium on PATH (looked for {', '.join(CHROMIUM_NAMES)}): install it, "
                              "e.g. apt-get install chromium")
    # A fresh profile per call: two renders at once would otherwise fight over the default profile's lock.
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", f"--user-data-dir={profile}",
               *args]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"Chromium did not finish within {timeout:g} s: {' '.join(cmd)}; is the machine "
                               "overloaded? retry with a longer timeout") from None


def screenshot(html_path: str, png_path: str, width: int = 1280, height: int = 2400, timeout: float = 120) -> str:
    """Render html_path with headless Chromium into png_path (width x height pixels); returns png_path."""
    png = os.path.abspath(png_path)
    if os.path.exists(png):
        os.remove(png)  # so an old picture cannot pass for this render
    url = pathlib.Path(html_path).resolve().as_uri()
    done = _chromium([f"--screenshot={png}", f"--window-size={width},{height}", url], timeout)
    if not os.path.exists(png) or os.path.getsize(png) == 0:
        tail = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"Chromium wrote no screenshot of {html_path} (exit code {done.returncode}): {tail}")
    return png_path


def dump_dom(html_path: str, timeout: float = 120) -> str:
    """The DOM Chromium built from html_path, serialised: what the browser actually parsed."""
    done = _chromium(["--dump-dom", pathlib.Path(html_path).resolve().as_uri()], timeout)
    if done.returncode != 0 or not done.stdout.strip():
        tail = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"Chromium could not load {html_path} (exit code {done.returncode}): {tail}")
    return done.stdout


# --------------------------------------------------------------------------------- a pair grown elsewhere
def render_pair_report(small: str, big: str, mapping: str, tokens_note: str, records: dict[str, dict],
                       passed: bool) -> str:
    """The page for one (SMALL, BIG) pair judged by verify_growth.py: the inferred mapping and every check's
    record (CheckResult.to_record), in the same table the run report uses."""
    rows = [_check_row(k, v) for k, v in records.items()]
    title = f"Growth verification: {os.path.basename(os.path.abspath(big))} from {os.path.basename(os.path.abspath(small))}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{esc(title)} — {verdict(passed)}</h1>"
            f'<p class="small">SMALL {esc(os.path.abspath(small))}<br>BIG {esc(os.path.abspath(big))}<br>'
            f"{esc(tokens_note)}</p>"
            f'<h2>Mapping</h2><pre class="story">{esc(mapping)}</pre>'
            f"<h2>Checks</h2>{table(['check', 'quantity', 'measured', 'limit', 'verdict', 'fix'], rows, {2, 3})}"
            f"\n</body></html>\n")


"""`refinery docs`: a static site of the project, like ``dbt docs`` — one folder, no server, no network.

It shows the DAG drawn from ``dvc.yaml`` (stages linked by the files one writes and the next reads); each stage's
command, dependencies, params and latest metrics; each artifact's contract from ``schemas/`` (columns, Arrow types,
nullability, the descriptions written beside each field) with the files it governs, their row counts and a few
sample rows (each with its ``refinery trace`` command); each dataset's expectations from its Great Expectations
suite with the latest result from ``reports/audit``. It copies in the review page and the Data Docs when they are
in the workspace, and draws every DVC plot offline (``refinery plots``).
"""

from __future__ import annotations

import html
import importlib
import json
import re
import shutil
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import click

from refinery.core import dag
from refinery.core.errors import RefineryError

_TEMPLATE_VAR = re.compile(r"\$\{[^}]+\}")
_FIELD = re.compile(r"pa\.field\(\s*\"(\w+)\"[^#\n]*#\s*(.+)$")
SAMPLE_ROWS = 3
CELL_CHARS = 90


@dataclass
class ContractDoc:
    """One contract of ``schemas/`` as the site shows it."""

    name: str
    module: str
    summary: str  # the module docstring (its first line names the file pattern)
    columns: list[tuple[str, str, bool, str]]  # name, Arrow type, nullable, description
    unique: tuple[str, ...]
    files: list[str] = field(default_factory=list)


def _descriptions(schemas_dir: Path) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Return ``{module: {column: comment}}`` and a fallback ``{column: comment}`` from every schema's source."""
    per_module: dict[str, dict[str, str]] = {}
    every: dict[str, str] = {}
    for src in sorted(schemas_dir.glob("*.py")):
        found = {m.group(1): m.group(2).strip() for line in src.read_text(encoding="utf-8").splitlines()
                 if (m := _FIELD.search(line))}
        per_module[src.stem] = found
        for k, v in found.items():
            every.setdefault(k, v)
    return per_module, every


def contracts(root: Path) -> list[ContractDoc]:
    """Every :class:`schemas.base.Contract` of ``schemas/*.py``, with its columns' descriptions."""
    from schemas.base import Contract

    schemas_dir = root / "schemas"
    if not schemas_dir.is_dir():
        raise RefineryError(f"{schemas_dir}: not found (run in the project root)")
    per_module, every = _descriptions(schemas_dir)
    out: list[ContractDoc] = []
    for src in sorted(schemas_dir.glob("*.py")):
        if src.stem in ("__init__", "base"):
            continue
        module = importlib.import_module(f"schemas.{src.stem}")
        for value in vars(module).values():
            if isinstance(value, Contract) and value.name not in {c.name for c in out}:
                desc = per_module.get(src.stem, {})
                cols = [(f.name, str(f.type), f.nullable, desc.get(f.name) or every.get(f.name, ""))
                        for f in value.arrow]
                out.append(ContractDoc(value.name, src.stem, (module.__doc__ or "").strip(), cols, value.unique))
    return out


def load_params(root: Path) -> dict[str, Any]:
    """The project's params.yaml ({} when absent): dvc.yaml paths interpolate it."""
    import yaml

    path = Path(root) / "params.yaml"
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}


def _value(var: str, params: dict[str, Any]) -> str:
    """``${a.b}`` -> the params value; ``${item...}`` (a matrix or foreach item) -> ``*``."""
    keys = var[2:-1].strip().split(".")
    node: Any = params
    for k in keys:
        if keys[0] == "item" or not isinstance(node, dict) or k not in node:
            return "*"
        node = node[k]
    return str(node)


def _norm(path: str, params: dict[str, Any]) -> str:
    return _TEMPLATE_VAR.sub(lambda m: _value(m.group(0), params), path).rstrip("/")


def _related(written: str, read: str, params: dict[str, Any]) -> bool:
    """Whether a dependency ``read`` is (inside, or holds) the output ``written``; ``${item...}`` matches anything."""
    w, r = _norm(written, params), _norm(read, params)
    return fnmatch(r, w) or fnmatch(w, r) or r.startswith(w + "/") or w.startswith(r + "/") \
        or fnmatch(r, w + "/*") or fnmatch(w, r + "/*")


def edges(stages: dict[str, dict[str, Any]], params: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """``(from, to, [paths])``: stage ``to`` reads what stage ``from`` writes (outs, metrics, plots)."""
    writes = {n: dag.paths(b, ("outs", "metrics", "plots")) for n, b in stages.items()}
    found = []
    for to, body in stages.items():
        deps = dag.paths(body, ("deps",))
        for frm, outs in writes.items():
            if frm == to:
                continue
            via = sorted({o for o in outs for d in deps if _related(o, d, params)})
            if via:
                found.append((frm, to, via))
    return found


def layers(stages: list[str], links: list[tuple[str, str, list[str]]]) -> dict[str, int]:
    """Column of each stage in the drawing: 0 for a stage that reads no other's output, else 1 + its inputs'."""
    preds: dict[str, set[str]] = {s: set() for s in stages}
    for frm, to, _ in links:
        preds[to].add(frm)
    level: dict[str, int] = {}

    def visit(s: str, seen: tuple[str, ...] = ()) -> int:
        if s not in level:
            if s in seen:
                raise RefineryError(f"dvc.yaml: stages form a cycle through {s}")
            level[s] = 1 + max((visit(p, seen + (s,)) for p in preds[s]), default=-1)
        return level[s]

    for s in stages:
        visit(s)
    return level


def dag_svg(stages: dict[str, dict[str, Any]], links: list[tuple[str, str, list[str]]]) -> str:
    """The DAG as inline SVG: one box per stage (a link to its section), columns by depth, curves for files."""
    level = layers(list(stages), links)
    cols: dict[int, list[str]] = {}
    for s in stages:  # dvc.yaml order within a column
        cols.setdefault(level[s], []).append(s)
    w, h, dx, dy, pad = 150, 30, 200, 44, 12
    pos = {s: (pad + c * dx, pad + i * dy) for c, names in cols.items() for i, s in enumerate(names)}
    width = pad * 2 + (max(cols) + 1) * dx - (dx - w)
    height = pad * 2 + max(len(v) for v in cols.values()) * dy
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="dag" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="pipeline DAG">']
    for frm, to, via in links:
        if all(v.startswith("fingerprints/") for v in via):
            continue  # the fingerprint stage feeds every stage its code hash: said in the text, not drawn
        (x1, y1), (x2, y2) = pos[frm], pos[to]
        x1, y1, y2 = x1 + w, y1 + h / 2, y2 + h / 2
        mid = (x1 + x2) / 2
        parts.append(f'<path class="edge" d="M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}">'
                     f'<title>{html.escape(frm)} → {html.escape(to)}: {html.escape(", ".join(via))}</title></path>')
    for s, (x, y) in pos.items():
        kind = " (matrix)" if "matrix" in stages[s] else " (foreach)" if "foreach" in stages[s] else ""
        parts.append(f'<a href="#stage-{s}"><g class="node" data-stage="{s}"><rect x="{x}" y="{y}" width="{w}" '
                     f'height="{h}" rx="6"/><text x="{x + w / 2}" y="{y + h / 2 + 4}">'
                     f'{html.escape(s + kind)}</text></g></a>')
    parts.append("</svg>")
    return "\n".join(parts)


def _flat(d: Any, prefix: str = "", depth: int = 2) -> list[tuple[str, Any]]:
    if isinstance(d, dict) and depth > 0:
        return [kv for k, v in d.items() for kv in _flat(v, f"{prefix}{k}.", depth - 1)]
    if isinstance(d, (dict, list)):
        return [(prefix.rstrip("."), json.dumps(d)[:CELL_CHARS] + ("…" if len(json.dumps(d)) > CELL_CHARS else ""))]
    return [(prefix.rstrip("."), d)]


def _cell(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v, default=str)
    return html.escape(text if len(text) <= CELL_CHARS else text[:CELL_CHARS] + "…")


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _files(root: Path, outs: list[str], params: dict[str, Any]) -> list[Path]:
    """The Parquet files in the workspace under a stage's outs (``${...}`` expanded by glob)."""
    found: list[Path] = []
    for o in outs:
        pattern = _norm(o, params)
        for p in sorted(root.glob(pattern)) if "*" in pattern else [root / o]:
            if p.is_file() and p.suffix == ".parquet":
                found.append(p)
            elif p.is_dir():
                found.extend(sorted(p.rglob("*.parquet")))
    return found


def _slug(path: str) -> str:
    return "artifact-" + re.sub(r"[^A-Za-z0-9]+", "-", path).strip("-")


def _artifact(root: Path, path: Path, by_columns: dict[tuple[str, ...], ContractDoc]) -> str:
    """One artifact's section: its contract (the one whose columns it has, which records the file), its row count
    and sample rows with their trace commands."""
    import pyarrow.parquet as pq

    rel = path.relative_to(root).as_posix()
    meta = pq.ParquetFile(path)
    names = tuple(meta.schema_arrow.names)
    contract = by_columns.get(names)
    if contract is not None:
        contract.files.append(rel)
    sample = meta.read_row_group(0).slice(0, SAMPLE_ROWS).to_pylist() if meta.num_row_groups else []
    first = [n for n in ("row_id", "question", "answer", "title", "text", "intent", "source", "status", "reason",
                         "gate_reasons", "doc_id") if n in names]
    shown = (first + [n for n in names if n not in first and n not in ("prompt_template", "code_version")])[:8]
    rows = [[_cell(r.get(n)) for n in shown]
            + ([f"<code>refinery trace {html.escape(str(r['row_id']))}</code>"] if "row_id" in names else [])
            for r in sample]
    out = [f'<section class="artifact" id="{_slug(rel)}"><h3>{html.escape(rel)}</h3>',
           f"<p>{meta.metadata.num_rows:,} rows · contract: "
           + (f'<a href="#contract-{contract.name}">{contract.name}</a>' if contract else "<em>none matches its "
              "columns</em>") + "</p>"]
    if rows:
        out.append(_table(shown + (["trace"] if "row_id" in names else []), rows, "sample"))
    out.append("</section>")
    return "\n".join(out)


def _lookup(record: dict[str, Any], check: str) -> Any:
    if check.startswith("provenance_missing_"):
        return (record.get("provenance_missing") or {}).get(check.removeprefix("provenance_missing_"))
    stack = [record]
    while stack:
        d = stack.pop(0)
        if check in d:
            return d[check]
        stack.extend(v for v in d.values() if isinstance(v, dict))
    return None


def expectations(root: Path, audit_dir: Path) -> dict[str, str]:
    """``{arm: section HTML}``: each expectation of the arm's suite with its threshold and latest result."""
    out: dict[str, str] = {}
    for audit in sorted(audit_dir.glob("*.json")):
        log = json.loads(audit.read_text(encoding="utf-8"))
        for record in log.get("datasets") or []:
            arm, suite_file = record.get("dataset"), root / str(record.get("suite", ""))
            if not arm or not suite_file.is_file():
                continue
            suite = json.loads(suite_file.read_text(encoding="utf-8"))
            failed = record.get("failed_checks") or []
            rows = []
            for e in suite.get("expectations", []):
                check = e.get("meta", {}).get("check", "")
                params = [v["$PARAMETER"] for v in e.get("kwargs", {}).values() if isinstance(v, dict)
                          and "$PARAMETER" in v]
                bound = ", ".join(f"{p} = {(record.get('thresholds') or {}).get(p)}" for p in params) or \
                    _cell(e.get("kwargs", {}).get("value_set", ""))
                ok = not any(f.startswith(f"{arm}: {check} ") for f in failed)
                rows.append([html.escape(check), f"<code>{html.escape(e.get('type', ''))}</code>", bound,
                             _cell(_lookup(record, check)),
                             '<span class="pass">pass</span>' if ok else '<span class="fail">fail</span>',
                             html.escape(e.get("meta", {}).get("notes", ""))])
            decision = record.get("decision", "?")
            out[arm] = (f'<section class="expectations" id="expectations-{arm}"><h3>{html.escape(arm)}: '
                        f'<span class="{"pass" if decision == "accept" else "fail"}">{html.escape(decision)}</span>'
                        f'</h3><p>suite <code>{html.escape(str(record.get("suite")))}</code>, latest result '
                        f'<code>{html.escape(audit.relative_to(root).as_posix())}</code></p>'
                        + _table(["check", "expectation", "threshold", "observed", "result", "notes"], rows)
                        + "</section>")
    return out


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;display:flex}
nav{position:sticky;top:0;height:100vh;overflow:auto;width:220px;flex:none;background:#f3f5f9;padding:1em;
box-sizing:border-box;border-right:1px solid #dde2ea;font-size:14px}
nav a{display:block;color:#2456a6;text-decoration:none;padding:2px 0} nav h2{font-size:13px;margin:1em 0 .3em;
color:#667}
main{padding:1.5em 2em;min-width:0;flex:1} h1{margin-top:0} h2{border-bottom:1px solid #dde2ea;padding-bottom:.2em}
table{border-collapse:collapse;margin:.5em 0 1.2em;font-size:13px} th,td{border:1px solid #dde2ea;padding:3px 7px;
text-align:left;vertical-align:top} th{background:#f3f5f9}
code,pre{font-family:ui-monospace,Menlo,monospace;font-size:12px} pre{background:#f6f8fa;padding:.6em;
white-space:pre-wrap}
.dag rect{fill:#eaf1fd;stroke:#2456a6;stroke-width:1.2} .dag a:hover rect{fill:#cfe0fb}
.dag text{font-size:12px;text-anchor:middle;fill:#1d2330} .dag .edge{fill:none;stroke:#8a94a6;stroke-width:1}
.pass{color:#177a3b;font-weight:600} .fail{color:#b3261e;font-weight:600} .muted{color:#667}
.dagbox{overflow:auto;border:1px solid #dde2ea;padding:.5em;background:#fff}
"""


def build_site(out: Path, root: Path = Path("."), *, plots: bool = True) -> Path:
    """Write the site into ``out`` (replaced) and return its ``index.html``.

    Raises:
        RefineryError: no dvc.yaml or schemas/ under ``root``.
    """
    root = Path(root).resolve()
    stages = dag.load(root)
    params = load_params(root)
    links = edges(stages, params)
    docs = contracts(root)
    by_columns = {tuple(c[0] for c in d.columns): d for d in docs}
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    extras: list[tuple[str, str]] = []
    for name, src, dst in (("Review page", root / "reports/review", "review"),
                           ("Data Docs", root / "reports/data_docs", "data_docs")):
        if (src / "index.html").is_file():
            shutil.copytree(src, out / dst)
            extras.append((name, f"{dst}/index.html"))
    plots_note = ""
    if plots:
        from refinery.inspect.plots import render_plots

        try:
            render_plots(out / "plots", root=root)
            extras.append(("Plots", "plots/index.html"))
        except RefineryError as e:
            plots_note = f"plots not drawn: {e}"

    stage_html, artifact_html, seen = [], [], set()
    for name, body in stages.items():
        metrics = []
        for m in dag.paths(body, ("metrics",)):
            for f in sorted(root.glob(_norm(m, params))):
                if f.is_file() and f.suffix == ".json":
                    flat = _flat(json.loads(f.read_text(encoding="utf-8")))
                    metrics.append(f"<h4>{html.escape(f.relative_to(root).as_posix())}</h4>"
                                   + _table(["metric", "value"], [[html.escape(k), _cell(v)] for k, v in flat[:40]])
                                   + (f'<p class="muted">… and {len(flat) - 40} more</p>' if len(flat) > 40 else ""))
        files = _files(root, dag.paths(body, ("outs",)), params)
        for f in files:
            rel = f.relative_to(root).as_posix()
            if rel not in seen:
                seen.add(rel)
                artifact_html.append(_artifact(root, f, by_columns))
        cmd = body.get("cmd", "")
        params = [p if isinstance(p, str) else ", ".join(map(str, p)) for p in body.get("params") or []]
        ins = [frm for frm, to, _ in links if to == name]
        outs_to = [to for frm, to, _ in links if frm == name]
        stage_html.append(
            f'<section class="stage" id="stage-{name}"><h3>{html.escape(name)}</h3>'
            + (f"<p>{html.escape(str(body.get('desc')))}</p>" if body.get("desc") else "")
            + f"<pre>{html.escape(cmd if isinstance(cmd, str) else ' && '.join(cmd))}</pre>"
            + _table(["", ""], [
                ["after", " ".join(f'<a href="#stage-{s}">{s}</a>' for s in ins) or "—"],
                ["before", " ".join(f'<a href="#stage-{s}">{s}</a>' for s in outs_to) or "—"],
                ["deps", "<br>".join(html.escape(d) for d in dag.paths(body, ("deps",)))],
                ["params", html.escape(", ".join(params)) or "—"],
                ["outs", "<br>".join((f'<a href="#{_slug(f.relative_to(root).as_posix())}">'
                                      f'{html.escape(f.relative_to(root).as_posix())}</a>') for f in files)
                 or "<br>".join(html.escape(o) for o in dag.paths(body, ("outs",)))
                 + (' <span class="muted">(not in the workspace: dvc pull or dvc repro)</span>'
                    if dag.paths(body, ("outs",)) else "")],
            ], "kv")
            + "".join(metrics) + "</section>")

    contract_html = []
    for d in docs:
        rows = [[f"<code>{html.escape(n)}</code>", html.escape(t), "yes" if nul else "required",
                 html.escape(desc)] for n, t, nul, desc in d.columns]
        contract_html.append(
            f'<section class="contract" id="contract-{d.name}"><h3>{html.escape(d.name)} '
            f'<span class="muted">schemas/{d.module}.py</span></h3><pre>{html.escape(d.summary)}</pre>'
            + (f"<p>unique: {html.escape(', '.join(d.unique))}</p>" if d.unique else "")
            + "<p>files: " + (", ".join(f'<a href="#{_slug(f)}">{html.escape(f)}</a>' for f in d.files)
                              or '<span class="muted">none in the workspace</span>') + "</p>"
            + _table(["column", "type", "null", "description"], rows) + "</section>")

    exp = expectations(root, root / "reports/audit")
    nav = ['<nav><strong>refinery docs</strong>', '<h2>Project</h2><a href="#dag">DAG</a>',
           *(f'<a href="{href}">{html.escape(label)}</a>' for label, href in extras),
           "<h2>Stages</h2>", *(f'<a href="#stage-{s}">{s}</a>' for s in stages),
           "<h2>Expectations</h2>", *(f'<a href="#expectations-{a}">{a}</a>' for a in exp),
           "<h2>Contracts</h2>", *(f'<a href="#contract-{d.name}">{d.name}</a>' for d in docs), "</nav>"]
    page = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>refinery docs</title>',
            f"<style>{CSS}</style></head><body>", *nav, "<main>",
            "<h1>refinery docs</h1>",
            f'<p class="muted">{len(stages)} stages, {len(links)} links, {len(docs)} contracts, '
            f"{len(seen)} Parquet files in the workspace. Trace any row: <code>refinery trace &lt;row_id&gt;</code>."
            + (f" {html.escape(plots_note)}" if plots_note else "") + "</p>",
            '<h2 id="dag">DAG</h2><p class="muted">Each box is a stage of dvc.yaml (click for its section); a '
            "curve means the right-hand stage reads a file the left-hand one writes (hover for the files). The "
            "fingerprint stage's links to every stage (their code hashes) are not drawn.</p>"
            '<div class="dagbox">', dag_svg(stages, links), "</div>",
            "<h2>Stages</h2>", *stage_html,
            "<h2>Expectations (latest results)</h2>", *(exp.values() or ['<p class="muted">no audit yet</p>']),
            "<h2>Artifacts</h2>", *(artifact_html or ['<p class="muted">no Parquet output in the workspace '
                                                      "(dvc pull or dvc repro)</p>"]),
            "<h2>Contracts</h2>", *contract_html, "</main></body></html>"]
    index = out / "index.html"
    index.write_text("\n".join(page), encoding="utf-8")
    return index


@click.command()
@click.option("--out", "out_dir", default="build/docs", show_default=True,
              help="Folder the site goes to (replaced): index.html, plus review/, data_docs/ and plots/.")
@click.option("--no-plots", is_flag=True, help="Do not draw the DVC plots (they need dvc and the plot files).")
def cli(out_dir: str, no_plots: bool) -> None:
    """Write a static docs site of the project: DAG, stages, contracts, expectations, metrics, sample rows."""
    index = build_site(Path(out_dir), Path("."), plots=not no_plots)
    click.echo(f"docs: {index}")

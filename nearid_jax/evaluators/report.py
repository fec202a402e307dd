"""Evaluation reports: report.json, report.md (SPEC.md §7 Table 1), the
paper-style table1.tex and table1.csv, plots and the per-sample results
samples.csv (samples.py).

Rows are scorers (the baseline head and the trained head), columns the Table 1
columns the data allows: NearID SSR/PA (pooled over the sources of SPEC §5),
MTG M-O, M-O_pair, SSR, PA when MTG was scored, DB++ M-H when a scorer has
DreamBench++ results. Plots (matplotlib, Agg backend):
  similarity_hist.png  cosines of positive view pairs vs view-distractor pairs
  kernel_pca.png       RBF KernelPCA of a few identities' views and
                       distractors (the paper's Figure 5)
  training_curve.png   loss and SSR over steps, from a workdir's metrics.jsonl
"""
import csv
import json
import math
import os

import numpy as np

from nearid_jax.evaluators import samples

# (column, where in a head's scores, unit): "pct" printed as 100 * x.
TABLE1 = (("NearID SSR", ("nearid", "pooled", "ssr"), "pct"),
          ("NearID PA", ("nearid", "pooled", "pa"), "pct"),
          ("MTG M-O", ("mtg", "mo"), "r"),
          ("M-O_pair", ("mtg", "mo_pair"), "r"),
          ("MTG SSR", ("mtg", "ssr"), "pct"),
          ("MTG PA", ("mtg", "pa"), "pct"),
          ("DB++ M-H", ("dreambench", "object"), "r"))
# The paper's two header rows: (group, column) of each TABLE1 column.
TEX_HEADER = {"NearID SSR": ("NearID", "SSR"), "NearID PA": ("NearID", "PA"),
              "MTG M-O": ("MTG", "M-O"), "M-O_pair": ("MTG", "M-O_pair"),
              "MTG SSR": ("MTG", "SSR"), "MTG PA": ("MTG", "PA"),
              "DB++ M-H": ("DB++", "M-H")}
RETRIEVAL = (("R@1", "r@1"), ("R@5", "r@5"), ("R@10", "r@10"), ("mAP", "map"))
KPCA_IDENTITIES = 6


def fmt(value, unit):
  """Table text of a score: percentages with 2 decimals, r with 3."""
  if value is None:
    return "-"
  if math.isnan(value):
    return "nan"
  return f"{100 * value:.2f}" if unit == "pct" else f"{value:.3f}"


def _lookup(tree, path):
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def table1(scores):
  """{head: {column: value}} for the Table 1 columns some head has."""
  cols = [(c, p) for c, p, _ in TABLE1
          if any(_lookup(s, p) is not None for s in scores.values())]
  return {h: {c: _lookup(s, p) for c, p in cols} for h, s in scores.items()}


def _md_table(header, rows):
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  return lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def markdown(rep):
  """report.md's text from the report dict."""
  meta, scores, t1 = rep["meta"], rep["scores"], rep["table1"]
  units = {c: u for c, _, u in TABLE1}
  heads = list(scores)
  lines = ["# NearID evaluation", ""]
  lines += [f"- {k}: {', '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in meta.items() if k != "arch"]
  lines += ["", "## Table 1 (SPEC.md §7): baseline vs trained", ""]
  cols = list(next(iter(t1.values())))
  lines += _md_table(["scorer"] + cols,
                     [[h] + [fmt(t1[h][c], units[c]) for c in cols]
                      for h in heads])
  pooled = scores[heads[0]]["nearid"].get("pooled_sources", [])
  lines += ["", f"NearID SSR/PA pool the sources {', '.join(pooled)}; SSR "
            "and PA are %, M-O and M-H Pearson correlations.", "",
            "## NearID per source (%)", ""]
  sources = list(scores[heads[0]]["nearid"]["sources"])
  lines += _md_table(
      ["source"] + [f"{h} {m}" for m in ("SSR", "PA") for h in heads],
      [[s] + [fmt(scores[h]["nearid"]["sources"][s][m], "pct")
              for m in ("ssr", "pa") for h in heads] for s in sources])
  lines += ["", "## Identity retrieval (%)", "",
            "A view is the query; its identity's other views are the "
            "positives; every other view and every distractor is gallery.", ""]
  lines += _md_table(
      ["scorer"] + [c for c, _ in RETRIEVAL],
      [[h] + [fmt(scores[h]["nearid"]["retrieval"][k], "pct")
              for _, k in RETRIEVAL] for h in heads])
  if rep["plots"]:
    lines += ["", "## Plots", ""]
    lines += [f"![{os.path.splitext(p)[0]}]({p})" for p in rep["plots"]]
  return "\n".join(lines) + "\n"


def write(out_dir, meta, scores, emb=None, metrics_jsonl=None):
  """Writes report.json, report.md, table1.tex, table1.csv, the plots and
  samples.csv into out_dir.

  Args:
    out_dir: created if needed.
    meta: what was evaluated (checkpoint, split, ...), printed as a list.
    scores: {head: {"nearid": evaluate.nearid_scores entry, "mtg":
      metrics.mtg result (optional), "dreambench": {category: M-H}
      (optional)}}.
    emb: the NearID evaluate.Embedded, for the histograms, KernelPCA and
      samples.csv.
    metrics_jsonl: a workdir's metrics.jsonl, for the training curve.

  Returns:
    the report dict written to report.json.
  """
  os.makedirs(out_dir, exist_ok=True)
  plots = []
  if emb is not None:
    plot_histograms(emb, os.path.join(out_dir, "similarity_hist.png"))
    plot_kernel_pca(emb, os.path.join(out_dir, "kernel_pca.png"))
    plots += ["similarity_hist.png", "kernel_pca.png"]
    samples.write(os.path.join(out_dir, "samples.csv"), emb)
  if metrics_jsonl and plot_curve(metrics_jsonl,
                                  os.path.join(out_dir, "training_curve.png")):
    plots.append("training_curve.png")
  rep = {"meta": meta, "table1": table1(scores), "scores": scores,
         "plots": plots}
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(rep, f, indent=2, default=_json_default)
    f.write("\n")
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(markdown(rep))
  with open(os.path.join(out_dir, "table1.tex"), "w") as f:
    f.write(latex(rep))
  with open(os.path.join(out_dir, "table1.csv"), "w", newline="") as f:
    header, rows = table1_rows(rep)
    csv.writer(f).writerows([header] + rows)
  return rep


def _sources(scores):
  return list(next(iter(scores.values()))["nearid"]["sources"])


def table1_rows(rep):
  """table1.csv: (header, rows); a row per scorer with the Table 1 columns in
  the paper's units (SSR and PA in %), then every source's NearID SSR and
  PA; empty where a scorer has no value."""
  scores, t1 = rep["scores"], rep["table1"]
  units = {c: u for c, _, u in TABLE1}
  cols, sources = list(next(iter(t1.values()))), _sources(scores)
  header = ["scorer"] + cols + [f"NearID {s} {m}" for s in sources
                                for m in ("SSR", "PA")]

  def paper(value, unit):
    if value is None:
      return ""
    return repr(100 * value if unit == "pct" else value)
  rows = [[h] + [paper(t1[h][c], units[c]) for c in cols] +
          [paper(scores[h]["nearid"]["sources"][s][m], "pct")
           for s in sources for m in ("ssr", "pa")] for h in scores]
  return header, rows


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%",
                "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}"}


def _tex(text):
  return "".join(_TEX_ESCAPES.get(ch, ch) for ch in str(text))


def _tex_row(cells):
  return " & ".join(cells) + r" \\"


def _tex_cell(value, unit):
  text = fmt(value, unit)
  return "--" if text == "-" else text


def latex(rep):
  """table1.tex: Table 1's layout (scorers as rows, NearID / MTG / DB++
  column groups), then NearID SSR/PA per source and pooled (booktabs)."""
  scores, t1 = rep["scores"], rep["table1"]
  units = {c: u for c, _, u in TABLE1}
  cols, heads = list(next(iter(t1.values()))), list(scores)
  groups = []  # [group, first column, last column], columns from 2
  for k, c in enumerate(cols, 2):
    if groups and groups[-1][0] == TEX_HEADER[c][0]:
      groups[-1][2] = k
    else:
      groups.append([TEX_HEADER[c][0], k, k])
  lines = [r"% Table 1 (SPEC.md §7), needs \usepackage{booktabs}; SSR and "
           "PA in %, M-O and M-H Pearson r.",
           r"\begin{tabular}{l" + "r" * len(cols) + "}", r"\toprule",
           _tex_row(["Scorer"] + [
               rf"\multicolumn{{{b - a + 1}}}{{c}}{{{_tex(g)}}}"
               for g, a, b in groups]),
           " ".join(rf"\cmidrule(lr){{{a}-{b}}}" for _, a, b in groups),
           _tex_row([""] + [_tex(TEX_HEADER[c][1]) for c in cols]),
           r"\midrule"]
  lines += [_tex_row([_tex(h)] + [_tex_cell(t1[h][c], units[c])
                                   for c in cols]) for h in heads]
  lines += [r"\bottomrule", r"\end{tabular}", ""]
  # NearID per source, then the pool Table 1 reports.
  nearid = {h: s["nearid"] for h, s in scores.items()}
  rows = [(_tex(src), [nearid[h]["sources"][src] for h in heads])
          for src in _sources(scores)]
  pooled = nearid[heads[0]].get("pooled_sources", [])
  n = len(heads)
  lines += ["% NearID SSR and PA (%) per distractor source; pooled: " +
            ", ".join(pooled),
            r"\begin{tabular}{l" + "r" * 2 * n + "}", r"\toprule",
            _tex_row(["Source"] + [rf"\multicolumn{{{n}}}{{c}}{{{m}}}"
                                   for m in ("SSR", "PA")]),
            rf"\cmidrule(lr){{2-{1 + n}}} \cmidrule(lr){{{2 + n}-{1 + 2 * n}}}",
            _tex_row([""] + [_tex(h) for h in heads] * 2), r"\midrule"]
  lines += [_tex_row([name] + [_tex_cell(r[m], "pct") for m in ("ssr", "pa")
                               for r in per_head]) for name, per_head in rows]
  if pooled:
    lines += [r"\midrule", _tex_row(["pooled"] + [
        _tex_cell(nearid[h]["pooled"][m], "pct") for m in ("ssr", "pa")
        for h in heads])]
  lines += [r"\bottomrule", r"\end{tabular}"]
  return "\n".join(lines) + "\n"


def _json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# --- numbers behind the plots ---


def similarities(emb, head):
  """(cosines of valid view pairs, cosines of valid view-distractor pairs).

  Distractor k is compared with view k (its background), for every source.
  """
  v, n = emb.views[head], emb.distractors[head]
  i, j = np.triu_indices(v.shape[1], 1)
  pos = np.einsum("nkd,nkd->nk", v[:, i], v[:, j])
  pos = pos[emb.view_mask[:, i] & emb.view_mask[:, j]]
  dist = np.einsum("nkd,nskd->nsk", v, n)[emb.distractor_mask]
  return pos, dist


def kernel_pca(x, n_components=2, gamma=None):
  """RBF KernelPCA: projections (n, n_components) of the rows of x.

  K_ij = exp(-gamma |x_i - x_j|^2), double-centred; the projections are the
  top eigenvectors scaled by sqrt(eigenvalue). gamma defaults to 1 / the
  median squared distance, so the kernel neither saturates nor flattens.
  """
  x = np.asarray(x, np.float64)
  sq = np.sum(x * x, 1)
  d2 = np.maximum(sq[:, None] + sq[None] - 2 * x @ x.T, 0.0)
  if gamma is None:
    off = d2[~np.eye(len(x), dtype=bool)]
    med = np.median(off) if off.size else 0.0
    gamma = 1.0 / med if med > 0 else 1.0
  k = np.exp(-gamma * d2)
  row = k.mean(0)
  kc = k - row[None] - row[:, None] + row.mean()
  w, v = np.linalg.eigh(kc)
  top = np.argsort(w)[::-1][:n_components]
  return v[:, top] * np.sqrt(np.maximum(w[top], 0.0))


def kpca_points(emb, head, n_identities=KPCA_IDENTITIES):
  """Views and first-source distractors of the first identities with >= 2
  views -> (points (n, D), identity number per point, is_distractor)."""
  rows = np.flatnonzero(emb.view_mask.sum(1) >= 2)[:n_identities]
  pts, ident, is_d = [], [], []
  for t, r in enumerate(rows):
    for k in np.flatnonzero(emb.view_mask[r]):
      pts.append(emb.views[head][r, k])
      ident.append(t)
      is_d.append(False)
    for k in np.flatnonzero(emb.distractor_mask[r, 0]):
      pts.append(emb.distractors[head][r, 0, k])
      ident.append(t)
      is_d.append(True)
  return np.array(pts), np.array(ident), np.array(is_d, bool)


# --- plots ---


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_histograms(emb, path):
  plt = _pyplot()
  heads = list(emb.views)
  fig, axes = plt.subplots(1, len(heads), figsize=(5 * len(heads), 3.6),
                           squeeze=False)
  bins = np.linspace(-1, 1, 41)
  for ax, head in zip(axes[0], heads):
    pos, dist = similarities(emb, head)
    ax.hist(pos, bins, alpha=0.6, density=True,
            label=f"same identity ({len(pos)})")
    ax.hist(dist, bins, alpha=0.6, density=True,
            label=f"NearID distractor ({len(dist)})")
    ax.set_title(f"{head}: cosine similarity")
    ax.set_xlabel("cosine")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_kernel_pca(emb, path):
  plt = _pyplot()
  heads = list(emb.views)
  fig, axes = plt.subplots(1, len(heads), figsize=(5 * len(heads), 4.2),
                           squeeze=False)
  for ax, head in zip(axes[0], heads):
    pts, ident, is_d = kpca_points(emb, head)
    if len(pts) >= 3:
      z = kernel_pca(pts)
      colours = plt.get_cmap("tab10")(ident % 10)
      ax.scatter(z[~is_d, 0], z[~is_d, 1], c=colours[~is_d], marker="o",
                 label="views")
      ax.scatter(z[is_d, 0], z[is_d, 1], c=colours[is_d], marker="x",
                 label=f"distractors ({emb.sources[0]})")
      ax.legend(fontsize=8)
    ax.set_title(f"{head}: KernelPCA (RBF), colour = identity")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def read_metrics(path):
  """metrics.jsonl -> list of dicts (one per logged step)."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_curve(metrics_jsonl, path):
  """Loss and SSR over steps; False (no file written) when neither is logged."""
  rows = read_metrics(metrics_jsonl)
  panels = [["train/loss"],
            ["eval/nearid/ssr", "eval/nearid/pa", "baseline/nearid/ssr"]]
  panels = [[k for k in keys if any(k in r for r in rows)] for keys in panels]
  panels = [p for p in panels if p]
  if not panels:
    return False
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6),
                           squeeze=False)
  for ax, keys in zip(axes[0], panels):
    for k in keys:
      pts = [(r["step"], r[k]) for r in rows if k in r]
      steps, values = zip(*pts)
      ax.plot(steps, values, marker="." if len(pts) < 50 else None, label=k)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True

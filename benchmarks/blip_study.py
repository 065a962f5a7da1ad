"""Where BLIP loses accuracy, and which opt-in allocation variant wins it back.

    python benchmarks/blip_study.py select    [--jobs 2]   # validation grid, the choice
    python benchmarks/blip_study.py test      [--jobs 2]   # test tables, every stream
    python benchmarks/blip_study.py diagnose               # plasticity tables
    python benchmarks/blip_study.py all       [--jobs 2]   # the three, in order

The protocol (docs/blip-study.md): every setting of every variant family
(blip/allocation.py) is run on pdigits and mnist5k-perm, seeds 0-2, and judged on the
VALIDATION splits only (results.json's ``valid_acc`` / ``valid_bwt``). A family's choice
is its setting of highest validation ACC, averaged over the two streams, among those
with a validation BWT of at least -0.1 points on both (the authors' rule, every family's
reference point, included). Only then are the chosen settings, registered as the named
variants ``blip:<family>`` (blip/methods/blip.py, VARIANTS), run on the test splits of
every embedded stream beside the default ``blip`` and the baselines. ``test`` refuses to
start while VARIANTS differ from the choice that ``select`` wrote.

Runs are ordinary run directories under ``--root`` (default runs/study): an interrupted
study started again reuses every finished run. Results go to docs/blip-study/ (JSON) and
docs/blip-study-results.md (the generated tables).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
OUT_JSON = DOCS / "blip-study"
OUT_MD = DOCS / "blip-study-results.md"
SEEDS = (0, 1, 2)
SELECT_ON = ("pdigits", "mnist5k-perm")
STREAMS = ("pdigits", "mnist5k-perm", "digits5", "mnist5k-split")
BWT_FLOOR = -0.1  # points: the zero-forgetting bar
# The grid: family -> settings tried (each a dict of blip hyper-parameters). {} is the
# authors' rule, the reference point of every family.
GRID: dict[str, list[dict[str, Any]]] = {
    "scaled": [{"gain_scale": s} for s in (0.4, 0.5, 0.6, 0.7, 0.8)],
    "rounded": [{"rounding": r} for r in ("round", "floor")],
    "capped": [{"max_bits_per_task": k} for k in (3, 4, 5, 6)],
    "calibrated": [{"prior_bits": b} for b in (2.0, 3.0, 4.0, 5.0, 6.0)],
    "fprior": [{"F_prior": f} for f in (4e-15, 1.6e-14)],  # the global knob, for reference
}
# The baselines run beside the variants on the test splits: the strongest of the README's
# two 12-method tables (ACC) and finetune, the plasticity reference.
BASELINES = ("finetune", "ewc", "online-ewc", "hat", "packnet", "agem")


def _label(setting: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(setting.items())) or "authors"


def _runs(job: tuple[str, str, dict[str, Any], Path]) -> list[dict]:
    """One method/setting on one stream over SEEDS, run or reused (a worker process)."""
    import torch

    from blip.classification.compare import run_all

    torch.set_num_threads(1)
    stream, method, setting, out = job
    grouped = run_all(stream, [method], SEEDS, out, log=lambda _: None,
                      hparams={method: setting}, search=())
    return grouped[method]


def _map(jobs: list[tuple], n: int) -> list[list[dict]]:
    if n <= 1:
        return [_runs(j) for j in jobs]
    with ProcessPoolExecutor(n) as pool:
        return list(pool.map(_runs, jobs))


def _pts(values: list[float]) -> tuple[float, float]:
    a = 100.0 * np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=0))


def _summary(rs: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {"seeds": len(rs)}
    for key in ("valid_acc", "valid_bwt", "acc", "bwt"):
        out[key], out[key + "_std"] = _pts([r[key] for r in rs])
    out["capacity"] = float(np.mean([r["capacity"][-1].get("overall", math.nan) for r in rs]))
    return out


# -- select ---------------------------------------------------------------------------

def select(root: Path, jobs: int) -> dict[str, Any]:
    settings = [("authors", {})] + [(fam, s) for fam, ss in GRID.items() for s in ss]
    work = [(stream, "blip", s, root / "select" / stream / _label(s))
            for stream in SELECT_ON for _, s in settings]
    print(f"select: {len(work)} settings x streams, {len(SEEDS)} seeds each", flush=True)
    results = _map(work, jobs)
    rows: dict[str, dict[str, Any]] = {}
    for (stream, _, s, _), rs in zip(work, results, strict=True):
        row = rows.setdefault(_label(s), {"setting": s, "family": None})
        row[stream] = {k: v for k, v in _summary(rs).items() if not k.startswith(("acc", "bwt"))}
    for fam, s in settings:
        rows[_label(s)]["family"] = fam
    for row in rows.values():
        row["valid_acc_mean"] = float(np.mean([row[st]["valid_acc"] for st in SELECT_ON]))
        row["eligible"] = all(row[st]["valid_bwt"] >= BWT_FLOOR for st in SELECT_ON)
    choice = {}
    for fam in GRID:
        cands = [r for r in rows.values() if r["family"] in (fam, "authors") and r["eligible"]]
        best = max(cands, key=lambda r: r["valid_acc_mean"]) if cands else None
        choice[fam] = None if best is None or best["family"] == "authors" else best["setting"]
    sel = {"protocol": __doc__.split("\n\n")[2], "bwt_floor": BWT_FLOOR, "seeds": SEEDS,
           "streams": SELECT_ON, "rows": rows, "choice": choice}
    OUT_JSON.mkdir(parents=True, exist_ok=True)
    (OUT_JSON / "selection.json").write_text(json.dumps(sel, indent=1))
    print(json.dumps(choice))
    return sel


def _selection_md(sel: dict[str, Any]) -> str:
    head = "| family | setting | " + " | ".join(
        f"{st} valid ACC | {st} valid BWT" for st in SELECT_ON) + " | mean valid ACC | chosen |"
    lines = [head, "|" + "---|" * (4 + 2 * len(SELECT_ON))]
    for label, r in sel["rows"].items():
        chosen = sel["choice"].get(r["family"]) == r["setting"] and r["family"] != "authors"
        cells = []
        for st in SELECT_ON:
            v = r[st]
            cells += [f"{v['valid_acc']:.2f} ± {v['valid_acc_std']:.2f}",
                      f"{v['valid_bwt']:+.2f} ± {v['valid_bwt_std']:.2f}"]
        mark = "**yes**" if chosen else ("(BWT < −0.1)" if not r["eligible"] else "")
        lines.append(f"| {r['family']} | {label} | " + " | ".join(cells)
                     + f" | {r['valid_acc_mean']:.2f} | {mark} |")
    return "\n".join(lines)


# -- test -----------------------------------------------------------------------------

def _check_variants(sel: dict[str, Any]) -> dict[str, dict]:
    from blip.methods import BLIPMethod

    want = {fam: s for fam, s in sel["choice"].items() if s is not None}
    have = {k: dict(v) for k, v in BLIPMethod.VARIANTS.items()}
    if have != want:
        sys.exit(f"blip's VARIANTS {have} are not the validation choice {want} "
                 f"({OUT_JSON / 'selection.json'}): set them first")
    return want


def test(root: Path, jobs: int) -> dict[str, Any]:
    sel = json.loads((OUT_JSON / "selection.json").read_text())
    variants = _check_variants(sel)
    methods = ["blip", *(f"blip:{v}" for v in variants), *BASELINES]
    work = [(stream, m, {}, root / "test" / stream) for stream in STREAMS for m in methods]
    print(f"test: {len(methods)} methods x {len(STREAMS)} streams, {len(SEEDS)} seeds each",
          flush=True)
    # one output folder per stream: run_all names the runs <stream>-<method>-seed<k>
    results = _map(work, jobs)
    table = {}
    for (stream, m, _, _), rs in zip(work, results, strict=True):
        table.setdefault(stream, {})[m] = {**_summary(rs), "per_seed_acc":
                                           [100 * r["acc"] for r in rs]}
    out = {"methods": methods, "variants": variants, "table": table}
    (OUT_JSON / "test.json").write_text(json.dumps(out, indent=1))
    return out


def _test_md(res: dict[str, Any]) -> str:
    parts = []
    for stream, rows in res["table"].items():
        base = {m: r for m, r in rows.items() if not m.startswith("blip")}
        best = max(base, key=lambda m: base[m]["acc"])
        lines = [f"**{stream}** (test splits; best baseline by ACC: {best}, "
                 f"{base[best]['acc']:.2f} ± {base[best]['acc_std']:.2f})", "",
                 "| method | ACC % | BWT (÷T−1) | valid ACC | valid BWT | capacity | "
                 "ACC − best baseline | reaches it (within its spread) at BWT ≥ −0.1 |",
                 "|---|---|---|---|---|---|---|---|"]
        for m, r in rows.items():
            gap = r["acc"] - base[best]["acc"]
            ok = ""
            if m.startswith("blip"):
                ok = "yes" if gap >= -base[best]["acc_std"] and r["bwt"] >= BWT_FLOOR else "no"
            cap = "–" if math.isnan(r["capacity"]) else f"{100 * r['capacity']:.1f}%"
            lines.append(f"| {m} | {r['acc']:.2f} ± {r['acc_std']:.2f} | {r['bwt']:+.2f} ± "
                         f"{r['bwt_std']:.2f} | {r['valid_acc']:.2f} | {r['valid_bwt']:+.2f} | "
                         f"{cap} | {gap:+.2f} | {ok} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


# -- diagnose -------------------------------------------------------------------------

def _load(d: Path) -> dict:
    return json.loads((d / "results.json").read_text())


def diagnose(root: Path) -> dict[str, Any]:
    """Plasticity of blip (and its variants) against finetune, from the test runs."""
    res = json.loads((OUT_JSON / "test.json").read_text())
    out: dict[str, Any] = {}
    for stream in SELECT_ON:
        per: dict[str, Any] = {}
        for m in [m for m in res["methods"] if m.startswith("blip")] + ["finetune"]:
            rs = [_load(root / "test" / stream / f"{stream}-{m}-seed{s}") for s in SEEDS]
            acc = [np.asarray(r["acc_matrix"], dtype=float) for r in rs]
            entry: dict[str, Any] = {
                # accuracy right after learning each task: what plasticity is left
                "diagonal": np.mean([np.diag(a) for a in acc], axis=0).tolist(),
            }
            if m.startswith("blip"):
                entry["capacity"] = np.mean([[c["overall"] for c in r["capacity"]]
                                             for r in rs], axis=0).tolist()
                hists = [r["bits_hist"] for r in rs]  # [seed][task][layer] -> counts
                layers = sorted(hists[0][0])
                entry["frozen_fraction"] = {  # weights with >= 1 frozen bit
                    ly: np.mean([[1 - h[t][ly][0] / sum(h[t][ly]) for t in range(len(h))]
                                 for h in hists], axis=0).tolist() for ly in layers}
                entry["mean_bits"] = {
                    ly: np.mean([[np.dot(h[t][ly], range(len(h[t][ly]))) / sum(h[t][ly])
                                  for t in range(len(h))] for h in hists], axis=0).tolist()
                    for ly in layers}
                entry["solid_fraction"] = {  # >= 8 bits: a window of bound/256 or less
                    ly: np.mean([[sum(h[t][ly][8:]) / sum(h[t][ly]) for t in range(len(h))]
                                 for h in hists], axis=0).tolist() for ly in layers}
                # what the end of task (Fisher -> bits -> sync) costs the task just learned
                entry["end_of_task_valid_drop"] = float(100 * np.mean([
                    r["tasks"][t]["valid_acc_before_end_task"] - r["valid_acc_matrix"][t][t]
                    for r in rs for t in range(len(r["tasks"]))]))
            per[m] = entry
        out[stream] = per
    (OUT_JSON / "diagnose.json").write_text(json.dumps(out, indent=1))
    return out


def _diagnose_md(diag: dict[str, Any]) -> str:
    parts = []
    for stream, per in diag.items():
        T = len(per["finetune"]["diagonal"])
        lines = [f"**{stream}**: accuracy on task t right after learning it (test, %, mean "
                 "of 3 seeds), and for BLIP the state after task t", "",
                 "| method | quantity | " + " | ".join(f"t={t}" for t in range(T)) + " |",
                 "|---|---|" + "---|" * T]
        for m, e in per.items():
            lines.append(f"| {m} | diagonal | "
                         + " | ".join(f"{100 * v:.1f}" for v in e["diagonal"]) + " |")
            if "capacity" in e:
                lines.append(f"| {m} | capacity used % | "
                             + " | ".join(f"{100 * v:.1f}" for v in e["capacity"]) + " |")
                for ly, fr in e["frozen_fraction"].items():
                    lines.append(f"| {m} | {ly}: weights with ≥1 frozen bit % | "
                                 + " | ".join(f"{100 * v:.1f}" for v in fr) + " |")
                    lines.append(f"| {m} | {ly}: weights with ≥8 frozen bits % | "
                                 + " | ".join(f"{100 * v:.1f}" for v in
                                              e["solid_fraction"][ly]) + " |")
                    lines.append(f"| {m} | {ly}: mean frozen bits | "
                                 + " | ".join(f"{v:.2f}" for v in e["mean_bits"][ly]) + " |")
        drops = ", ".join(f"{m} {e['end_of_task_valid_drop']:+.2f}" for m, e in per.items()
                          if "end_of_task_valid_drop" in e)
        lines += ["", f"Validation accuracy of the task just learned, lost at its end of task "
                  f"(Fisher, bits, sync; points, mean over tasks and seeds): {drops}."]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def write_md() -> None:
    parts = ["# BLIP study: generated tables", "",
             "Written by `python benchmarks/blip_study.py` (see docs/blip-study.md for the "
             "protocol and the reading). Accuracy in %, BWT in points, mean ± std over "
             "seeds 0, 1, 2 (ddof 0).", ""]
    if (OUT_JSON / "selection.json").is_file():
        sel = json.loads((OUT_JSON / "selection.json").read_text())
        parts += ["## Selection on the validation splits (pdigits, mnist5k-perm)", "",
                  _selection_md(sel), "", f"Choice per family: `{json.dumps(sel['choice'])}`",
                  ""]
    if (OUT_JSON / "test.json").is_file():
        parts += ["## Test splits, every embedded stream", "",
                  _test_md(json.loads((OUT_JSON / "test.json").read_text())), ""]
    if (OUT_JSON / "diagnose.json").is_file():
        parts += ["## Where BLIP loses accuracy: plasticity", "",
                  _diagnose_md(json.loads((OUT_JSON / "diagnose.json").read_text())), ""]
    OUT_MD.write_text("\n".join(parts))
    print(f"wrote {OUT_MD}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=("select", "test", "diagnose", "all", "tables"))
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    ap.add_argument("--root", type=Path, default=ROOT / "runs" / "study")
    a = ap.parse_args(argv)
    if a.stage in ("select", "all"):
        select(a.root, a.jobs)
    if a.stage in ("test", "all"):
        test(a.root, a.jobs)
    if a.stage in ("diagnose", "all"):
        diagnose(a.root)
    write_md()
    return 0


if __name__ == "__main__":
    sys.exit(main())

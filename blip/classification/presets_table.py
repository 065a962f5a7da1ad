"""`blip presets` as a table: one row per benchmark, one column per preset field.

Columns come from the :class:`~.presets.Preset` fields, so a field added there shows up
here without an edit; notes and model-specific overrides follow the table.
"""

from __future__ import annotations

from dataclasses import fields

from .presets import MODEL_PRESETS, PRESETS, Preset

# Short headers for the long field names (any other field shows under its own name).
_HEADERS = {"batch_size": "batch", "n_hidden_layers": "layers", "lr_patience": "patience",
            "lr_factor": "factor", "lr_min": "lr_min", "momentum": "mom."}


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def presets_table(presets: dict[str, Preset] = PRESETS,
                  model_presets: dict[tuple[str, str], dict] = MODEL_PRESETS) -> str:
    names = [f.name for f in fields(Preset) if f.name != "note"]
    header = ["benchmark", *(_HEADERS.get(n, n) for n in names)]
    rows = [[bench, *(_cell(getattr(p, n)) for n in names)] for bench, p in presets.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        # names left-aligned, numbers right-aligned so their magnitudes line up
        return "  ".join(c.ljust(w) if i <= 1 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    out = [line(header), line(["-" * w for w in widths]), *map(line, rows)]
    notes = [f"  {bench}: {p.note}" for bench, p in presets.items() if p.note]
    if notes:
        out += ["", "notes:", *notes]
    if model_presets:
        out += ["", "with another --model:"]
        out += [f"  {bench} --model {model}: "
                + ", ".join(f"{k}={_cell(v)}" for k, v in values.items())
                for (bench, model), values in model_presets.items()]
    return "\n".join(out)

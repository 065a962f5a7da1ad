"""Kernel benchmarks: every op per backend against its unfused baseline, in one run.

Each benchmark sits in a pytest-benchmark ``group`` (one op and size) and names
its ``variant`` in ``extra_info``. At the end of the session the median of every
variant is divided into its group's baseline and printed as a ratio table; the
same table goes into the ``--benchmark-json`` file under ``"blip_ratios"``.
Bandwidth figures use the bytes an op must move (``extra_info["bytes"]``).
"""

from __future__ import annotations

import platform
from collections import defaultdict

import torch
from _bench import DEVICE

BASELINES = {"step": "unfused", "project": "unfused", "quantize": "unfused",
             "update_bits": "unfused", "sync": "unfused",
             "fisher_linear": "replication", "fisher_conv2d": "replication",
             "train_step": "finetune"}


def _rows(session) -> list[dict]:  # noqa: ANN001 - pytest-benchmark's session object
    rows = []
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    extras: dict[tuple[str, str], dict] = {}
    for bench in session.benchmarks:
        if not bench.stats.data:  # the benchmark failed before timing anything
            continue
        variant = bench.extra_info.get("variant", bench.name)
        groups[bench.group][variant] = bench.stats.median
        extras[(bench.group, variant)] = bench.extra_info
    for group, variants in sorted(groups.items()):
        kind = group.split("/", 1)[0]
        base = BASELINES.get(kind)
        for variant, t in sorted(variants.items(), key=lambda kv: kv[1]):
            info = extras[(group, variant)]
            row = {"group": group, "variant": variant, "median_s": t}
            if base in variants:
                row["speedup_vs_" + base] = variants[base] / t
            if "bytes" in info:
                row["GB_per_s"] = info["bytes"] / t / 1e9
                if "copy" in variants:  # a plain copy of the same bytes, same group
                    copy_bw = extras[(group, "copy")]["bytes"] / variants["copy"]
                    row["fraction_of_copy_bw"] = info["bytes"] / t / copy_bw
            for key in ("peak_extra_MB", "gemm_only_ratio"):
                if key in info:
                    row[key] = info[key]
            rows.append(row)
    return rows


def pytest_benchmark_update_json(config, benchmarks, output_json) -> None:  # noqa: ANN001
    session = config._benchmarksession
    output_json["blip_ratios"] = _rows(session)
    output_json["blip_machine"] = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else platform.processor()
        or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def pytest_terminal_summary(terminalreporter, config) -> None:  # noqa: ANN001
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    tr = terminalreporter
    tr.section("blip: ratios against the unfused baselines (same run)")
    for row in _rows(session):
        extras = "  ".join(
            f"{k}={v:.3g}" for k, v in row.items() if k not in ("group", "variant", "median_s")
        )
        tr.write_line(f"{row['group']:<28} {row['variant']:<22} {row['median_s'] * 1e3:9.3f} ms  "
                      f"{extras}")

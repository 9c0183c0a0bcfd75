"""Accuracy benchmark: every registration method on identical, seeded, simulated cases.

A run (a *cell*) fixes a CT, its targets, a protocol (camera, reference view, initial-offset
distribution; see protocols.py and DESIGN.md), a seed, the X-ray source (who renders the X-rays,
with its own HU conversion) and the X-ray degradations. Case ``i`` (ground-truth pose, initial
pose, noise seed, and so the X-ray) depends only on (seed, i), so every method is measured on the
same cases, a longer run extends a shorter one, and an interrupted run resumes exactly. A
multi-CT run is several cells with one source, summarised per cell and pooled.

One job per module:

* ``config``: the methods (:data:`METHODS`, benchmark name -> ``register()`` call), the
  configuration and ``prepare`` (every input check, the fingerprint);
* ``sources``: the X-ray sources (built in: ``corrreg``; others from a sources file);
* ``cells``: several CTs, from repeated options or a manifest;
* ``cases``: the simulated cases and one registration of a case;
* ``results``: results.csv;
* ``summary``: per method, per cell, pooled; the markdown tables;
* ``plots``: the PNG plots of a cell;
* ``run``: ``run_benchmark`` (one cell) and ``run_cells`` (several).

docs/benchmark.md describes every file and field.
"""

from .cases import BenchmarkCase, case_noise_seed, evaluate_pose, generate_cases, method_model_dir, run_method
from .cells import CellSpec, cells_from_args, read_manifest
from .config import (
    DEFAULT_XRAY,
    FORMAT_VERSION,
    METHODS,
    STARTS,
    BenchmarkConfig,
    BenchmarkSetup,
    MethodSpec,
    bone_voxel_targets,
    check_model_camera,
    check_targets_inside,
    parse_labels,
    parse_methods,
    prepare,
)
from .plots import save_plots
from .results import CSV_FIELDS, _ResultsWriter, read_results  # noqa: F401  (_ResultsWriter: the peer scripts)
from .run import _check_resume, run_benchmark, run_cells  # noqa: F401  (_check_resume: the peer scripts)
from .sources import (
    BUILTIN_SOURCES,
    CorrRegSource,
    SourceCT,
    XraySource,
    default_sources_file,
    get_source,
    load_sources_file,
    source_names,
)
from .summary import (
    TABLE_HEADER,
    TABLE_RULE,
    build_summary,
    cells_table,
    find_cells,
    flag_stats,
    format_table,
    load_cell,
    pooled_table,
    summarize_cells,
    summarize_rows,
    table_row,
    write_cells_summary,
    write_summary_md,
)

__all__ = [
    "BUILTIN_SOURCES", "CSV_FIELDS", "DEFAULT_XRAY", "FORMAT_VERSION", "METHODS", "STARTS", "TABLE_HEADER",
    "TABLE_RULE", "BenchmarkCase", "BenchmarkConfig", "BenchmarkSetup", "CellSpec", "CorrRegSource", "MethodSpec",
    "SourceCT", "XraySource", "bone_voxel_targets", "build_summary", "case_noise_seed", "cells_from_args",
    "cells_table", "check_model_camera", "check_targets_inside", "default_sources_file", "evaluate_pose",
    "find_cells", "flag_stats", "format_table", "generate_cases", "get_source", "load_cell", "load_sources_file",
    "method_model_dir", "parse_labels", "parse_methods", "pooled_table", "prepare", "read_manifest", "read_results",
    "run_benchmark", "run_cells", "run_method", "save_plots", "source_names", "summarize_cells", "summarize_rows",
    "table_row", "write_cells_summary", "write_summary_md",
]

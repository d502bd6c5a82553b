"""Studies: many runs over a grid of configurations and seeds, and their summaries.

Modules: ``spec`` (a study as one TOML file: base config, axes of named variants, grid blocks in priority order,
evaluations, results folder), ``runner`` (``collafuse study``: the grid as a resumable queue over lanes, a deadline
or a Ray cluster; each finished run's small files copied to the results folder and optionally committed),
``sweep`` (``collafuse sweep``: one run per cut, over seeds), ``sweep_report`` and ``seed_summary`` (a cut sweep's
report and its intervals and verdicts over seeds), ``scarce_report`` (a study over data settings: when does
collaboration pay). It imports ``collafuse.evaluation`` and the layers below it, never ``collafuse.flower``.
"""

"""A study as one TOML file: the base config, the grid, the evaluations, the results folder and the priority.

A study names *axes* of named variants (each a list of ``--set`` overrides) and *grid blocks* that combine them::

    [study]
    name = "fashion-mnist-scarce"
    config = "configs/quality.toml"            # the base config (paths are relative to the repository root)
    results = "results/fashion-mnist-scarce"   # every finished run's small files land here (committed)
    work = "runs/studies/fashion-mnist-scarce" # checkpoints, samples, client secrets (never committed)
    set = ["train.rounds=100"]                 # overrides for every run
    seeds = [0, 1, 2]
    path = "{size}/seed_{seed}/{config}"       # a run's folder under work/ and results/
    report = "scarce"                          # which summary `--report-only` (and every finished run) refreshes

    [axes.size]
    n0100 = ["data.max_train_per_client=100"]
    [axes.config]
    cut_0200 = ["split.cut=200"]
    fedavg = ["split.algorithm=fedavg"]

    [[grid]]                                   # blocks run in order: the first block is the first priority
    size = ["n0100"]
    config = ["cut_0200", "fedavg"]
    seeds = [0, 1, 2]                          # optional: the study's seeds
    # optional: path = "other/seed_{seed}/{config}" (this block's folders), set = [...] (this block's overrides),
    # evaluations = ["evaluation.json"] (only these of the [[evaluation]] outputs)

    [[evaluation]]                             # every run: evaluation.json of the last checkpoint
    output = "evaluation.json"
    [[evaluation]]                             # a point of the training curve
    output = "evaluation_r0025.json"
    checkpoint = 25
    set = ["eval.n_samples=500"]
    only = { size = ["n0100"], seed = [0] }    # optional: the runs it applies to

Within a block the seeds vary slowest, then the axes in the order the block names them: all configurations of
seed 0 come before any of seed 1, so a part-finished study already holds paired comparisons. A run that two blocks
name is run once, at its first place.

Seed k moves the server's init, training noise and sampling seeds by k x 1000 (`collafuse.study.sweep.seed_overrides`),
and with ``vary_data_seed`` the data seed too (each seed draws its own subsample, shared by every configuration of
that seed). The clients' secrets are drawn once per seed (``work/secrets/seed_K.toml``).
"""

from __future__ import annotations

import itertools
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import Config, ConfigError, load_config, read_toml
from .sweep import seed_overrides

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StudySection(_Strict):
    name: str = Field(pattern=_NAME)
    config: str  # the base config file
    results: str  # committed small files of every finished run, and the summary
    work: str = ""  # checkpoints, samples, secrets; default runs/studies/NAME
    set: list[str] = Field(default_factory=list)  # overrides for every run
    seeds: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0], min_length=1)
    vary_data_seed: bool = False  # seed k also moves seeds.data (its own subsample / partition)
    path: str = "seed_{seed}/{config}"  # a run's folder; fields: {seed} and the axis names
    report: Literal["none", "seeds", "scarce", "heterogeneous"] = "none"
    # report = "seeds": the cut sweep's summary over seeds (`collafuse sweep --report-only --seeds`): its arguments
    report_cuts: list[int] = Field(default_factory=list)
    report_baselines: dict[str, str] = Field(default_factory=dict)  # label -> folder under results/
    report_command: str = ""  # written into the report as the command that made it
    report_set: list[str] = Field(default_factory=list)  # overrides of the report's base config only
    # report = "scarce" / "heterogeneous": runs of other studies joined to a setting, e.g. the committed sweep:
    # { full = { cut_0200 = "results/fashion-mnist-seeds/seed_{seed}/cut_0200" } } (paths from the root)
    report_extra: dict[str, dict[str, str]] = Field(default_factory=dict)


class GridBlock(_Strict):
    model_config = ConfigDict(extra="allow", strict=True)  # the axes, by name
    seeds: list[Annotated[int, Field(ge=0)]] | None = None
    path: str | None = None  # this block's run folders (default: study.path), e.g. "fedavg/seed_{seed}/{cut}"
    set: list[str] = Field(default_factory=list)  # overrides of this block's runs only
    evaluations: list[str] | None = None  # the evaluation outputs of this block's runs (default: all that apply)


class Evaluation(_Strict):
    output: str = Field(default="evaluation.json", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*\.json$")
    checkpoint: Annotated[int, Field(ge=1)] | None = None  # a round kept by train.keep_rounds; None: the last
    set: list[str] = Field(default_factory=list)  # evaluation overrides (eval.*, sample.*)
    only: dict[str, list[str | int]] = Field(default_factory=dict)  # axis (or "seed") -> the values it applies to
    # also write the evaluation's samples as uint8 safetensors into the run (committed with its small files)
    export_samples: bool = False


class StudyFile(_Strict):
    study: StudySection
    axes: dict[str, dict[str, list[str]]] = Field(default_factory=dict)
    grid: list[GridBlock] = Field(default_factory=list)
    evaluation: list[Evaluation] = Field(default_factory=lambda: [Evaluation()])


@dataclass
class Job:
    """One run of a study: its folder (relative to work/ and results/), its overrides and its evaluations."""

    key: str  # the run's folder, e.g. "n0100/seed_0/cut_0200"
    seed: int
    variants: dict[str, str]  # axis -> variant name
    overrides: list[str]
    evaluations: list[Evaluation] = field(default_factory=list)


@dataclass
class Study:
    root: Path  # the repository root every path is relative to
    file: Path
    spec: StudyFile
    jobs: list[Job]  # every run of the grid (the summary reads them all)
    only: list[Job] | None = None  # the runs to run now (``--only``); None: all of them

    @property
    def queue(self) -> list[Job]:
        return self.jobs if self.only is None else self.only

    @queue.setter
    def queue(self, jobs: list[Job]) -> None:
        self.only = jobs

    @property
    def name(self) -> str:
        return self.spec.study.name

    @property
    def config(self) -> Path:
        return self.root / self.spec.study.config

    @property
    def results(self) -> Path:
        return self.root / self.spec.study.results

    @property
    def work(self) -> Path:
        return self.root / (self.spec.study.work or f"runs/studies/{self.name}")

    def job_config(self, job: Job) -> Config:
        return load_config(self.config, job.overrides)


def _one_line(error: ValidationError, file: Path) -> ConfigError:
    e = error.errors()[0]
    where = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        return ConfigError(f"{file}: unknown key '{where}' (allowed keys of [{e['loc'][0]}]: "
                           f"{', '.join(_ALLOWED.get(str(e['loc'][0]), []))})")
    if e["type"] == "missing":  # the input is then the whole enclosing table: name the key, not the table
        return ConfigError(f"{file}: {where} is missing (a required key of [{e['loc'][0]}])")
    return ConfigError(f"{file}: {where} = {e.get('input')!r} is invalid ({e['msg']})")


_ALLOWED = {"study": list(StudySection.model_fields), "evaluation": list(Evaluation.model_fields),
            "": list(StudyFile.model_fields)}


def load_study(path: str | Path, root: str | Path | None = None) -> Study:
    """Read and check a study file and expand its grid (nothing runs). ``root``: the folder every path in it is
    relative to (default: the current directory). Raises ``ConfigError`` with one line for any bad key or value."""
    file = Path(path)
    root = Path(".") if root is None else Path(root)  # relative: reports name results/..., not /home/...
    data = read_toml(file, "study file", "studies/fashion-mnist-scarce.toml")
    unknown = sorted(set(data) - set(StudyFile.model_fields))
    if unknown:
        raise ConfigError(f"{file}: unknown section [{unknown[0]}] (allowed: {', '.join(StudyFile.model_fields)})")
    try:
        spec = StudyFile.model_validate(data)
    except ValidationError as e:
        raise _one_line(e, file) from None
    study = Study(root, file, spec, [])
    if not study.config.is_file():
        raise ConfigError(f"{file}: study.config = {spec.study.config!r} is invalid (no such file under {root})")
    study.jobs = expand(spec, file)
    load_config(study.config, spec.study.set)  # a bad common override fails here, before anything runs
    for job in study.jobs:  # and a bad variant (or a combination that is invalid) names its run
        try:
            load_config(study.config, job.overrides)
        except ConfigError as e:
            raise ConfigError(f"{file}: run {job.key}: {e}") from None
    return study


def _fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def expand(spec: StudyFile, file: Path | str = "study") -> list[Job]:
    """The grid's runs in priority order (see the module docstring), each once."""
    s = spec.study
    if not spec.grid:
        raise ConfigError(f"{file}: the grid is empty (allowed: at least one [[grid]] block naming a variant of "
                          f"every axis in study.path = {s.path!r})")
    for axis, variants in spec.axes.items():
        if not re.match(_NAME, axis) or not variants:
            raise ConfigError(f"{file}: axes.{axis} = {variants!r} is invalid (allowed: a named table of variants, "
                              "each a list of KEY=VALUE overrides)")
    jobs: dict[str, Job] = {}
    outputs = {e.output for e in spec.evaluation}
    for b, block in enumerate(spec.grid):
        path = block.path or s.path
        where = f"grid[{b}].path" if block.path else "study.path"
        fields = _fields(path)
        unknown = [f for f in fields if f != "seed" and f not in spec.axes]
        if unknown:
            raise ConfigError(f"{file}: {where} = {path!r} is invalid (field {{{unknown[0]}}} is no axis; allowed: "
                              f"{{seed}} and {', '.join('{' + a + '}' for a in spec.axes) or 'no axes yet'})")
        bad_outputs = sorted(set(block.evaluations or []) - outputs)
        if bad_outputs:
            raise ConfigError(f"{file}: grid[{b}].evaluations names {bad_outputs[0]!r} (allowed: the outputs of "
                              f"[[evaluation]]: {', '.join(sorted(outputs))})")
        named = {k: v for k, v in (block.model_extra or {}).items()}
        for axis, values in named.items():
            if axis not in spec.axes:
                raise ConfigError(f"{file}: grid[{b}].{axis} is an unknown axis (allowed: "
                                  f"{', '.join(spec.axes) or 'none: add [axes.NAME]'}, seeds)")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{file}: grid[{b}].{axis} = {values!r} is invalid (allowed: a non-empty list of "
                                  f"variants of axes.{axis}: {', '.join(spec.axes[axis])})")
            bad = [v for v in values if v not in spec.axes[axis]]
            if bad:
                raise ConfigError(f"{file}: grid[{b}].{axis} = {values!r} is invalid ({bad[0]!r} is no variant; "
                                  f"allowed: {', '.join(spec.axes[axis])})")
        missing = [a for a in fields if a != "seed" and a not in named]
        if missing:
            raise ConfigError(f"{file}: grid[{b}] names no {missing[0]!r} ({where} {path!r} needs every axis in "
                              f"it; allowed: {', '.join(spec.axes[missing[0]])})")
        if "seed" not in fields:
            raise ConfigError(f"{file}: {where} = {path!r} is invalid (it needs {{seed}}: every seed is a run)")
        unnamed = [a for a in named if a not in fields]
        if unnamed:
            raise ConfigError(f"{file}: grid[{b}].{unnamed[0]} is not in {where} = {path!r} (allowed: axes that "
                              "name the run's folder, so that two runs never share one)")
        seeds = block.seeds if block.seeds is not None else s.seeds
        if not seeds:
            raise ConfigError(f"{file}: grid[{b}].seeds = [] is invalid (allowed: a non-empty list of seeds >= 0)")
        axes = list(named)
        for seed in seeds:
            for combo in itertools.product(*(named[a] for a in axes)):
                variants = dict(zip(axes, combo))
                key = path.format(seed=seed, **variants)
                if key in jobs:
                    continue
                overrides = [*s.set]
                for a in axes:
                    overrides += spec.axes[a][variants[a]]
                job = Job(key, seed, variants, [*overrides, *block.set])
                job.evaluations = [e for e in spec.evaluation if _applies(e, job)
                                   and (block.evaluations is None or e.output in block.evaluations)]
                jobs[key] = job
    if not jobs:
        raise ConfigError(f"{file}: the grid is empty (allowed: blocks that name at least one variant per axis)")
    return list(jobs.values())


def _applies(ev: Evaluation, job: Job) -> bool:
    for axis, values in ev.only.items():
        have = job.seed if axis == "seed" else job.variants.get(axis)
        if have not in values:
            return False
    return True


def seeded(study: Study, job: Job, base: Config) -> list[str]:
    """The job's overrides with its seed applied (seed 0 is the config as written)."""
    return [*job.overrides, *seed_overrides(base, job.seed, study.spec.study.vary_data_seed)]

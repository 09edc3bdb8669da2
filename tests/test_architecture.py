"""The layer rules hold and can fail: import-linter's contracts in pyproject.toml are kept and catch an
upward import and a cycle; no private name crosses a module boundary; no import hides below the code; no
test module imports another; an installed tadm puts nothing but ``tadm`` at the top level."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO

#: every source file of the installed package, read through the repository's real folders
SOURCES = sorted(
    p
    for root in ("tadm", "components", "datamodules")
    for p in (REPO / root).rglob("*.py")
    if not p.is_symlink()
)
SOURCES = [
    p for p in SOURCES if "tadm/components" not in p.as_posix() and "tadm/datamodules" not in p.as_posix()
]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(cwd), "HOME": str(cwd)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", "pyproject.toml", "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_sources_are_found_through_the_real_folders() -> None:
    names = {p.relative_to(REPO).as_posix() for p in SOURCES}
    assert "components/rescalers/dfrm.py" in names and "datamodules/webdataset.py" in names
    assert "tadm/training/lightning_module.py" in names and len(names) == len(SOURCES)
    assert (REPO / "tadm" / "components").is_symlink() and (REPO / "tadm" / "datamodules").is_symlink()


def test_import_contracts_are_kept() -> None:
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package copied with its links resolved, to plant bad imports in."""
    root = tmp_path_factory.mktemp("tree")
    shutil.copytree(
        REPO / "tadm", root / "tadm", symlinks=False, ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


@pytest.mark.parametrize(
    ("planted", "broken"),
    [
        ({"tadm/contracts/upward.py": "import tadm.training.lightning_module\n"}, "Layers point down BROKEN"),
        (
            {"tadm/components/aligners/uses_rescaler.py": "import tadm.components.rescalers.dfrm\n"},
            "Plug-in kinds are independent of each other BROKEN",
        ),
        (
            {
                "tadm/ops/cycle_a.py": "import tadm.ops.cycle_b\n",
                "tadm/ops/cycle_b.py": "import tadm.ops.cycle_a\n",
            },
            "No import cycles between sibling packages or modules BROKEN",
        ),
    ],
    ids=["upward", "plugin-to-plugin", "cycle"],
)
def test_contracts_catch_a_planted_violation(tree_copy: Path, planted: dict[str, str], broken: str) -> None:
    try:
        for rel, text in planted.items():
            (tree_copy / rel).write_text(text)
        result = _lint(tree_copy)
    finally:
        for rel in planted:
            (tree_copy / rel).unlink(missing_ok=True)
    assert result.returncode != 0 and broken in result.stdout, result.stdout + result.stderr


def _module_of(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[0] != "tadm":
        parts.insert(0, "tadm")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_private_name_is_imported_from_another_module() -> None:
    crossing = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tadm"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        crossing.append(f"{path.relative_to(REPO)}: from {node.module} import {alias.name}")
    assert not crossing, "private names crossing modules:\n" + "\n".join(crossing)


def _is_type_checking_block(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def test_imports_stand_at_the_top_of_every_module() -> None:
    late = []
    for path in SOURCES:
        body = ast.parse(path.read_text(), str(path)).body
        code_started = False
        for i, node in enumerate(body):
            is_import = isinstance(node, ast.Import | ast.ImportFrom) or _is_type_checking_block(node)
            is_docstring = i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            if is_import and code_started:
                late.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
            elif not (is_import or is_docstring):
                code_started = True
    assert not late, "imports below the code:\n" + "\n".join(late)


def test_no_test_module_imports_another() -> None:
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            module = (node.module or "") if isinstance(node, ast.ImportFrom) else ""
            if module.startswith("tests.") and module.rsplit(".", 1)[-1].startswith(("test_", "conftest")):
                offenders.append(f"{path.relative_to(REPO)}: from {module} import ...")
    assert not offenders, "\n".join(offenders)


#: test modules about the repository as a whole, not one wing: they stay at the top of tests/
WHOLE_REPOSITORY_TESTS = {
    "test_architecture.py",
    "test_docs.py",
    "test_suite_disk.py",
    "test_benchmark_runner.py",
    "test_bundled_photos.py",
}


def test_tests_mirror_the_wings() -> None:
    """A test module lives in ``tests/<wing>/``, named for a wing of ``tadm/`` (tests of the data modules in
    tests/datamodules/, of the codec in tests/inference/, ...), or is one of the whole-repository checks:
    where a test is tells what it covers, and a new wing's tests have an obvious home."""
    wings = {p.name for p in (REPO / "tadm").iterdir() if (p / "__init__.py").is_file()}
    misplaced = []
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        rel = path.relative_to(REPO / "tests")
        at_top = len(rel.parts) == 1 and rel.name in WHOLE_REPOSITORY_TESTS
        in_wing = len(rel.parts) == 2 and rel.parts[0] in wings and (path.parent / "__init__.py").is_file()
        if not (at_top or in_wing):
            misplaced.append(f"tests/{rel.as_posix()}")
    assert not misplaced, f"not in a tests/<wing>/ package (wings: {sorted(wings)}):\n" + "\n".join(misplaced)
    assert all((REPO / "tests" / name).is_file() for name in WHOLE_REPOSITORY_TESTS)


def test_wheel_installs_only_the_tadm_package(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("tadm", "components", "datamodules"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(tmp_path),
        str(src),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("tadm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"tadm"}, tops
    assert "tadm/components/rescalers/dfrm.py" in names and "tadm/datamodules/webdataset.py" in names
    assert "tadm/contracts/rescaler.py" in names


def test_no_two_source_files_share_a_basename() -> None:
    """A module's name tells you which wing you are in: no basename twice (``__init__``/``__main__`` apart)."""
    by_name: dict[str, list[str]] = {}
    for path in SOURCES:
        if path.name not in ("__init__.py", "__main__.py"):
            by_name.setdefault(path.name, []).append(path.relative_to(REPO).as_posix())
    repeated = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    assert not repeated, f"basenames used twice: {repeated}"
    assert "list_plugins.py" in by_name and "run_comparison.py" in by_name  # the search saw the tree


#: run with the repository's root first on sys.path, as in a checkout
_ONE_NAME = """
import sys
sys.path.insert(0, {repo!r})
import tadm.components.aligners.tpm, tadm.datamodules.shards
print("tadm:", tadm.components.aligners.tpm.__name__, tadm.datamodules.shards.__name__)
for name in ("components", "datamodules"):
    try:
        __import__(name + (".aligners.tpm" if name == "components" else ".shards"))
    except ImportError as err:
        print(f"{{name}}: {{type(err).__name__}}: {{err}}")
    else:
        print(f"{{name}}: imported")
"""


def test_components_and_datamodules_import_under_one_name_only() -> None:
    """The top-level folders import as ``tadm.components`` / ``tadm.datamodules`` only: a checkout could
    otherwise import ``components.aligners.tpm`` beside ``tadm.components.aligners.tpm`` (a second module
    object, each plug-in registered twice)."""
    result = subprocess.run(
        [sys.executable, "-c", _ONE_NAME.format(repo=str(REPO))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "tadm: tadm.components.aligners.tpm tadm.datamodules.shards", result.stdout
    for line, name in zip(lines[1:], ("components", "datamodules"), strict=True):
        assert line.startswith(f"{name}: ImportError: import tadm.{name}, not {name}: "), line
        assert "twice" in line, line

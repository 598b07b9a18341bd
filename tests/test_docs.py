"""The docs stay true: README's Python snippets run as written, the commands the docs name exist, and every test
path the repository names (docs, pytest.ini, CI, bench scripts, comments) is there."""
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDS_EXPORT = "hf/grown"  # snippets that load a model exported by an earlier command (tested in test_hf_format)


def python_snippets(path: str) -> list[str]:
    text = open(os.path.join(ROOT, path), encoding="utf-8").read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_readme_has_snippets_to_run():
    runnable = [s for s in python_snippets("README.md") if NEEDS_EXPORT not in s]
    assert runnable, "README.md lost its 'Use the pieces' snippet"


@pytest.mark.slow
@pytest.mark.parametrize("snippet", [s for s in python_snippets("README.md") if NEEDS_EXPORT not in s])
def test_readme_python_snippet_runs_as_written(snippet, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_readme_commands_name_real_files_and_options():
    """Every `python X.py --opt` in README and QUICKSTART names a script that exists and an option it knows."""
    from training.settings import settings_table

    known = {s.name for s in settings_table()} | {s.qualified for s in settings_table()}
    for doc in ("README.md", "QUICKSTART_VERIFICATION.md"):
        text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
        for script, args in re.findall(r"python ([\w/]+\.py)([^\n`#]*)", text):
            assert os.path.exists(os.path.join(ROOT, script)), f"{doc}: {script}"
            source = open(os.path.join(ROOT, script), encoding="utf-8").read()
            for opt in re.findall(r"--([\w.-]+)", args):
                name = opt.replace("-", "_")
                assert (name in known or f'"--{opt}"' in source or f'"--{opt.replace("_", "-")}"' in source
                        or opt in ("help",)), f"{doc}: {script} --{opt}"


def files_naming_tests() -> list[str]:
    """The docs, pytest.ini, the CI script, bench's shell scripts and every Python file of the repository."""
    found = [os.path.join(ROOT, ".ci", "run"), os.path.join(ROOT, "pytest.ini")]
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("fixtures", "runs", "results", "__pycache__")]
        found += [os.path.join(folder, f) for f in files if f.endswith((".md", ".py", ".sh"))]
    return found


def test_every_test_path_named_exists():
    """A test file moved or renamed leaves no stale `tests/...` path (or glob) in a doc, a script or a comment."""
    stale = []
    for path in files_naming_tests():
        text = open(path, encoding="utf-8").read()
        for named in set(re.findall(r"(?<![\w/.])tests/[\w/.*-]*\w", text)):
            if not glob.glob(os.path.join(ROOT, named)):
                stale.append(f"{os.path.relpath(path, ROOT)}: {named}")
    assert not stale, stale


def command_scripts() -> list[str]:
    """Every script a user runs: the top-level files with a __main__ block and every bench/ script."""
    paths = sorted(glob.glob(os.path.join(ROOT, "*.py"))) + sorted(glob.glob(os.path.join(ROOT, "bench", "*.py")))
    return [os.path.relpath(p, ROOT) for p in paths if 'if __name__ == "__main__"' in open(p, encoding="utf-8").read()]


SCRIPTS = command_scripts()


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help(script):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout and proc.stderr == "", proc.stderr[-2000:]

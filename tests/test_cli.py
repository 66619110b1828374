"""The ``gptj-jax`` command line as a whole: one ``COMMANDS`` table, every verb's ``--help``, a ``--help``
that imports no jax (the verbs import the library inside ``run``), and the one error contract
(one ``gptj-jax VERB: error: ...`` line and exit 1; ``GPTJ_JAX_TRACEBACK=1`` shows the traceback).

Each check runs in a fresh interpreter (``python -c`` / ``python -m gptj_jax.cli``), as a user's shell would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from gptj_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERBS = ("tokenizer-save", "prepare", "train", "eval", "convert", "generate", "plan", "lm-eval", "serve")
HEAVY = ("jax", "jaxlib", "flax", "optax", "orbax", "transformers", "torch", "safetensors", "tqdm")

# Run in a fresh interpreter: time `from gptj_jax.cli import main` + `main(argv)` and list the heavy
# top-level packages it imported.
PROBE = """
import json, sys, time
t0 = time.perf_counter()
from gptj_jax.cli import main
code = None
for argv in {argvs!r}:
    try:
        main(argv)
    except SystemExit as e:
        code = e.code if code in (None, 0) else code
seconds = time.perf_counter() - t0
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print(json.dumps({{"code": code, "heavy": heavy, "seconds": seconds}}))
"""


def _python(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _probe(*argvs: list[str]) -> dict:
    proc = _python("-c", PROBE.format(argvs=list(argvs), heavy=HEAVY))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_help_imports_no_jax():
    """`gptj-jax --help` in a fresh interpreter: exit 0, and neither jax nor transformers nor torch loaded."""
    result = _probe(["--help"])
    print(f"gptj-jax --help: {result['seconds']:.3f} s in-process (import + parse)")
    assert result["code"] == 0
    assert result["heavy"] == [], result["heavy"]


def test_every_verb_help_imports_no_jax():
    """Every verb's flags are built without the library: `gptj-jax VERB --help` imports no jax either."""
    result = _probe(*([verb, "--help"] for verb in VERBS))
    print(f"all {len(VERBS)} verbs' --help: {result['seconds']:.3f} s in-process")
    assert result["code"] == 0
    assert result["heavy"] == [], result["heavy"]


def test_import_package_imports_no_jax():
    """`import gptj_jax` and `import gptj_jax.convert` are lazy: jax loads on the first name that needs it."""
    code = (
        "import sys, gptj_jax, gptj_jax.convert\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
        "gptj_jax.GPTJConfig\n"
        "print('jax' in sys.modules)\n"
        "gptj_jax.init_params\n"
        "print('jax' in sys.modules)\n"
    )
    proc = _python("-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["[]", "False", "True"], proc.stdout


@pytest.mark.parametrize("verb", VERBS)
def test_verb_help_as_a_subprocess(verb):
    proc = _python("-m", "gptj_jax.cli", verb, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: gptj-jax {verb} "), proc.stdout
    assert "".join(cli.COMMANDS[verb].help.split()) in "".join(proc.stdout.split())  # argparse re-wraps it
    assert proc.stderr == ""


def test_commands_lists_exactly_the_verbs():
    assert tuple(cli.COMMANDS) == VERBS
    for name, command in cli.COMMANDS.items():
        assert isinstance(command, cli.Command), name
        assert command.help and callable(command.add_arguments) and callable(command.run), name
    proc = _python("-m", "gptj_jax.cli", "--help")
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.split("positional arguments:")[1].split("options:")[0]
              .splitlines()[2:] if line.startswith("    ") and not line.startswith("     ")]
    assert tuple(listed) == VERBS, proc.stdout


def test_console_script_is_cli_main():
    """setup.cfg's console script `gptj-jax` is `gptj_jax.cli:main` (as installed in this environment)."""
    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "gptj-jax"]
    assert script.value == "gptj_jax.cli:main"
    assert script.load() is cli.main


def test_errors_are_one_line_for_every_verb_or_a_traceback_when_asked(tmp_path):
    """`convert` had its own main() that ignored GPTJ_JAX_TRACEBACK; now every verb goes through cli.main."""
    argv = ["-m", "gptj_jax.cli", "convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--to", "hf"]
    env = dict(os.environ)
    env.pop("GPTJ_JAX_TRACEBACK", None)
    proc = _python(*argv, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("gptj-jax convert: error: "), proc.stderr
    assert str(tmp_path / "missing") in lines[0]
    proc = _python(*argv, env=dict(env, GPTJ_JAX_TRACEBACK="1"))
    assert proc.returncode == 1 and proc.stderr.startswith("Traceback (most recent call last):"), proc.stderr
    assert not (tmp_path / "out").exists()

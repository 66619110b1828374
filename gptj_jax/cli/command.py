"""What one ``gptj-jax`` verb is: a help line, its flags, and the function that runs it."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NamedTuple


class Command(NamedTuple):
    """One verb of ``gptj-jax``.

    ``add_arguments`` adds the verb's flags to its (already created) sub-parser; it must import nothing
    heavy, since every verb's flags are built for ``gptj-jax --help``. ``run`` imports the library it
    needs, does the work and returns the exit code; its exceptions become one error line (see
    :func:`gptj_jax.cli.main`).
    """

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]

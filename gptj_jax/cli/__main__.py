"""``python -m gptj_jax.cli VERB ...``: the same as ``gptj-jax VERB ...``."""

import sys

from gptj_jax.cli import main

if __name__ == "__main__":  # not when merely imported (e.g. by pkgutil.walk_packages)
    sys.exit(main())

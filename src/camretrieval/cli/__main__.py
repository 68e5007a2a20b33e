"""``python -m camretrieval.cli``: the ``camretrieval`` command."""

import sys

from camretrieval.cli import main

sys.exit(main())

"""``python -m persona_cli``: the same as the ``persona`` command."""

import sys

from persona_cli.main import main

sys.exit(main())

"""``python -m hf_wemoe`` runs the command line."""

import sys

from hf_wemoe.cli.main import main

sys.exit(main())

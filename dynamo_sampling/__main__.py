"""``python -m dynamo_sampling``: the command line (see ``cli.py``)."""
import sys

from .cli import main

sys.exit(main())

"""``python -m ckptcloud``."""

import sys

from ckptcloud.cli import main

sys.exit(main())

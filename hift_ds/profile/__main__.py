"""``python -m hift_ds.profile``: see ``hift_ds.profile.cli``."""
import sys

from hift_ds.profile.cli import main

sys.exit(main())

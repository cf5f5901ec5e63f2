"""`python -m monitor` is `hms-mgmt`."""

import sys

from .cli import main

sys.exit(main())

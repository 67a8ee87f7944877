"""`python -m rudder.cli` is `rudder` (for torchrun: `torchrun ... -m rudder.cli train sae ...`)."""

import sys

from rudder.cli import main

sys.exit(main())

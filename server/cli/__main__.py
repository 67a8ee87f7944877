"""`python -m rudder.server.cli` is `rudder` (for torchrun: `torchrun ... -m rudder.server.cli train sae ...`)."""

import sys

from rudder.server.cli import main

sys.exit(main())

"""``python -m tadm ...`` (and ``torchrun ... -m tadm fit ...``) is the ``tadm`` command."""

import sys

from tadm.commands.main import main

sys.exit(main())

"""cluster: Ray orchestration of certification sweeps and the ``certify`` command line."""

import os
import sys

# Ray's token authentication: a client sends ~/.ray/auth_token when RAY_AUTH_MODE is "token".
# Ray reads the mode once, when it is imported, so it is set here, before any module of this
# package imports ray; where ray came first, ray.init() settles the mode itself.
if "ray" not in sys.modules:
    os.environ.setdefault("RAY_AUTH_MODE", "token")

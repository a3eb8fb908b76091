"""Suite-wide fixtures. Component fixtures live in the conftest next to their tests."""

import os
import secrets

# Internal authentication is always on: every service this suite starts, in process or
# as a child, and every test client finds this run's cluster secret in the environment
# (services.common.cluster_auth). Set before any test imports a service.
os.environ.setdefault("LLMESH_CLUSTER_SECRET", secrets.token_hex(32))

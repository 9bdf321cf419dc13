"""One token-auth Ray head for every test of this package that needs one (tests/support/auth_cluster.py)."""
from tests.support.auth_cluster import auth_cluster, cli, user_env  # noqa: F401 (fixtures)

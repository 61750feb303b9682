"""`python -m app.agent run [--agent NAME|module:Class] [--concurrency N]`: one agent worker.

gevent patches the standard library first, before anything imports ssl or threading (the flask
command `agent run` starts this module for that reason).
"""
from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

from app.agent.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

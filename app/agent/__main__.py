"""`python -m app.agent run [--agent NAME|module:Class] [--concurrency N]`: one agent worker.

gevent patches the standard library first, before anything imports ssl or threading (the flask
command `agent run` starts this module for that reason).
"""
from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import sys  # noqa: E402

# Its metrics are its own (served on AGENT_METRICS_PORT), never files in gunicorn's multiprocess
# directory: that one is emptied when gunicorn starts, and no gunicorn master marks this process dead.
os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)

from app.agent.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The app with a hub that takes a second to make (as on a slow Cluster), to show streams share one."""
import gevent

from app import create_app
from app.store import Store

_publish = Store.publish.fget


def _slow_publish(store: Store) -> str:
    gevent.sleep(1.0)  # the round trip that asks the masters' versions, made slow
    return _publish(store)


Store.publish = property(_slow_publish)
app = create_app()

"""Run storage: locations (local or object store), checkpoints, run state, the Ray session.

``from mvtcae import storage`` gives the location operations of ``location_io``
(``storage.join``, ``storage.read_text``, ``storage.local_directory``, ...);
``mvtcae.storage.checkpoints`` and ``mvtcae.storage.runs`` hold what the platform writes there.
"""

from mvtcae.storage.location_io import *  # noqa: F403 - the location API is this package's face
from mvtcae.storage.location_io import __all__  # noqa: F401

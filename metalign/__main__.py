import os
import sys

from metalign.preload import SOCKET_ENV, submit

if os.environ.get(SOCKET_ENV):  # a preload server runs beside this job (`python -m metalign.preload …`)
    status = submit(os.environ[SOCKET_ENV], sys.argv[1:])
    if status is not None:
        sys.exit(status)

from metalign.cli import main  # noqa: E402

sys.exit(main(freeze_imports=True))

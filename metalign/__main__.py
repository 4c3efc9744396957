import sys

from metalign.cli import main

sys.exit(main())

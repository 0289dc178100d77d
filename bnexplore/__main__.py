import sys

from bnexplore.tools.cli import main

sys.exit(main())

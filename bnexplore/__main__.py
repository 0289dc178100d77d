import sys

from bnexplore.cli import main

sys.exit(main())

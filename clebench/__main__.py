import sys

from clebench.cli import main

sys.exit(main())

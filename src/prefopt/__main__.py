import sys

from prefopt.cli import main

sys.exit(main())

import sys

from riskd.cli import main

sys.exit(main())

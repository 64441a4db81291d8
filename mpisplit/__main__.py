import sys

from mpisplit.cli import main

sys.exit(main())

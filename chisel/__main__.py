import sys

from chisel.cli import main

sys.exit(main())

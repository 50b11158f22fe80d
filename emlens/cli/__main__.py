import sys

from emlens.cli import main

sys.exit(main())

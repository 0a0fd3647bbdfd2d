import sys

from distrt.cli import main

sys.exit(main())

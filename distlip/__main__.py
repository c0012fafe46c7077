import sys

from distlip.cli import main

sys.exit(main())

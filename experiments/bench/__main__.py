import sys

from competesmoe.experiments.bench.cli import main

sys.exit(main())

import sys

from ppl_models.cli import main

sys.exit(main())

import sys

from ppl_models.app.cli import main

sys.exit(main())

"""`python -m baize_exp.stages.report`: the same as `baize-report`."""

import sys

from baize_exp.stages.report import main

sys.exit(main())

import sys

from dfm_ext.recipes.kinetics.task import main

sys.exit(main())

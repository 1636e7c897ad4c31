import sys

from dfm_ext.recipes.flux.task import main

sys.exit(main())

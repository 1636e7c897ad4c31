import sys

from dfm_ext.recipes.demo.cli import main

sys.exit(main())

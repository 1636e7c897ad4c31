import sys

from dfm_ext.recipes.imagenet.task import main

sys.exit(main())

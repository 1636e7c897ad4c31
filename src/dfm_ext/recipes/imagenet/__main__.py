from dfm_ext.recipes.imagenet.task import main

raise SystemExit(main())

from dfm_ext.recipes.flux.task import main

raise SystemExit(main())

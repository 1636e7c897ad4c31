from dfm_ext.recipes.kinetics.task import main

raise SystemExit(main())

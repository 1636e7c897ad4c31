from dfm_ext.recipes.demo.cli import main

raise SystemExit(main())

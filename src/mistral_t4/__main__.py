from mistral_t4.cli import main

raise SystemExit(main())

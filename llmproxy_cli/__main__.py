"""`python -m llmproxy_cli`: the same as the `llmproxy` command."""

from llmproxy_cli.main import main

raise SystemExit(main())

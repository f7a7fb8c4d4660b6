"""``python -m elkeid_agent.sample_plugin``: run the sample plugin (the agent
starts the built executable instead; see ``build``)."""

from . import main

raise SystemExit(main())

"""``python -m elkeid_devtools.sample_plugin``: run the sample plugin (the agent
starts the built executable instead; see ``build``)."""

from . import main

raise SystemExit(main())

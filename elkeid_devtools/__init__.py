"""Development tools, never shipped in the zipapp or the packages: the
development AgentCenter (``devcenter``), process launchers shared by the
tests, demo and benchmarks (``launchers``), the demo, the benchmarks and the
sample plugin with its builder.
"""

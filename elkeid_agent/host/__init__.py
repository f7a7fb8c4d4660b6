"""Facts about this host and this process: host facts for the PackagedData
header (``hostinfo``), the agent id (``identity``), CPU/memory/IO samplers
(``resources``) and the 1000/1001 heartbeat records built from them
(``heartbeat``).
"""

"""What the server asks for: Command decoding and routing (``commands``), the
agent's own tasks 1050/1051/1060 (``agent_tasks``) and configs lists
(``configs``).
"""

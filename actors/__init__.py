"""Code that runs inside the pool's Ray actors: the agent loop, the LLM client, the tools.

The loop and the policies here import no Ray; `worker.py` and `tool_executor.py` are the thin
actor shells around them.
"""

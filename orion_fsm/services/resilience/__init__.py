"""What keeps one bad request or agent from taking the engine down: per-agent circuit
breakers, admission (bounded queue, priorities, deadlines) and guardrails on input and output.
"""

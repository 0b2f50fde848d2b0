"""What the engine tells the outside: OpenTelemetry spans from a machine listener, structured
logs with request ids and redaction, the sanitiser, and the JSONL trace file format.
"""

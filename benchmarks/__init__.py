"""Benchmarks of scalegp against what a user would pick instead (run as ``python -m benchmarks.<name>``).

Every script writes ``benchmarks/results/<name>.json`` and ``benchmarks/results/<name>.md``;
``--quick`` (or the environment variable ``CI``) shrinks every size to a smoke test.
"""

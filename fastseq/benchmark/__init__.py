"""The fastseq-bench command: runs the pytest-benchmark suites (bench/, installed as
fastseq.bench_suites) and turns their JSON into tables, JSON with fastseq's fields, and plots."""

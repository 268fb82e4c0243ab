"""fastseq's pytest-benchmark suites, one file per op family; installed as fastseq.bench_suites
and run by the fastseq-bench command (fastseq/benchmark/cli.py)."""

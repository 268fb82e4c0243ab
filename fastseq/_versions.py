"""The oldest torch and Triton fastseq supports: the lent GPU machine's stack, which CI's second
leg tests (Python 3.12, torch 2.11, triton 3.6); CI's first leg tests the newest pair."""
MIN_TORCH = (2, 11)
MIN_TRITON = (3, 6)


def version_tuple(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "2.11.0+cu130" or "3.6.0"."""
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def dotted(version: tuple[int, int]) -> str:
    return ".".join(map(str, version))

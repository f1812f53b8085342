"""stealguard-load: a gRPC load tester that measures latency like wrk2.

    from stealguard.client.load import LoadConfig, run, summarize
    doc = summarize(run(LoadConfig(target="127.0.0.1:50051", rps=500, duration=5.0)))
"""

from .calls import TargetUnreachable
from .config import LoadConfig, Security, parse_duration
from .report import summarize
from .runner import RunResult, run

__all__ = ["LoadConfig", "RunResult", "Security", "TargetUnreachable", "parse_duration", "run",
           "summarize"]

"""Python client of lens-server: the seed ``LensAPI``'s surface, run on a shared server.

    from app.client import LensClient

    lens = LensClient("http://gpu-box:8000", api_key=...).model("llama-3.2-1b")
    results = lens.fit(texts=[...], targets=[...], num_masks=1)   # blocks, shows progress
    results.head_taxonomy()

Installed alone with ``pip install lens-server`` (httpx, numpy, tqdm; no torch, no server);
never imports torch, transformers or fastapi (results are torch tensors only when torch
is installed).
"""

from app.client._http import RetryPolicy
from app.client._wait import Progress
from app.client.aio import AsyncJob, AsyncLensClient, AsyncModel
from app.client.errors import (
    Conflict,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    LensError,
    NotFound,
    PayloadTooLarge,
    QuotaExceeded,
    ServerError,
    ServiceUnavailable,
    Unauthorized,
    VersionMismatch,
    WaitTimeout,
)
from app.client.results import (
    AblateResult,
    AttributeResult,
    CchgResult,
    ChgResult,
    Result,
    ScoreResult,
    TraceResult,
    load_result,
)
from app.client.sync import Job, LensClient, Model

__all__ = [
    "AblateResult",
    "AsyncJob",
    "AsyncLensClient",
    "AsyncModel",
    "AttributeResult",
    "CchgResult",
    "ChgResult",
    "Conflict",
    "InvalidRequest",
    "Job",
    "JobCancelled",
    "JobFailed",
    "LensClient",
    "LensError",
    "Model",
    "NotFound",
    "PayloadTooLarge",
    "Progress",
    "QuotaExceeded",
    "Result",
    "RetryPolicy",
    "ScoreResult",
    "ServerError",
    "ServiceUnavailable",
    "TraceResult",
    "Unauthorized",
    "VersionMismatch",
    "WaitTimeout",
    "load_result",
]

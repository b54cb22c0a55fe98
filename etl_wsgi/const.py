"""Wire names of the AIS ETL protocol (PROTOCOL.md §0, §2.4, §4, §6.2), in one place.

Same names and values as ``aistore.sdk.const`` so ported code reads the same.
"""

from __future__ import annotations

HEADER_NODE_URL = "Ais-Node-Url"
HEADER_DIRECT_PUT_LENGTH = "Ais-Direct-Put-Length"
HEADER_ETL_RETRY_REASON = "Ais-Etl-Retry-Reason"
HEADER_AUTHORIZATION = "Authorization"
ETL_RETRY_REASON_DIRECT_PUT_TRANSIENT = "direct-put-transient"

QPARAM_ETL_ARGS = "etl_args"
QPARAM_ETL_FQN = "etl_fqn"

ETL_WS_FQN = "fqn"
ETL_WS_PATH = "path"
ETL_WS_ETL_ARGS = "etl_args"
ETL_WS_PIPELINE = "pipeline"

HEALTH_BODY = b"Running"
DEFAULT_MIME_TYPE = "application/octet-stream"

#: Retry backoff of the direct-put loop: ``min(BASE ** attempt, MAX)`` seconds (PROTOCOL.md §4.4).
RETRY_BACKOFF_BASE = 2.0
RETRY_BACKOFF_MAX = 30.0
#: Read size when draining an unread request body (PROTOCOL.md §5).
DRAIN_CHUNK_BYTES = 65536
#: Step of reading a request body of known length (gunicorn reads up to 1 MiB per recv()).
BODY_READ_STEP = 1 << 20
#: Largest buffer allocated up front for a body, whatever ``Content-Length`` claims.
BODY_PREALLOC_MAX = 64 << 20
#: Smallest body received into a buffer left unzeroed (``BodySource._receive``): below it
#: zeroing is cheaper than the ``BufferedReader`` that avoids it.
BODY_UNZEROED_MIN = 256 << 10

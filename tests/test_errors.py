"""etl_wsgi.errors: each error carries its HTTP status, headers and message (PROTOCOL.md §7)."""

from __future__ import annotations

from http import HTTPStatus

import pytest

from etl_wsgi.errors import (
    BadRequestError,
    DirectPutError,
    DirectPutRefusedError,
    ETLDirectPutTransientError,
    ETLError,
    FileAccessError,
    InvalidPipelineError,
    ObjectNotFoundError,
    TransformError,
    UpstreamNetworkError,
    UpstreamStatusError,
    transform_error,
)


@pytest.mark.parametrize(
    ("error", "status", "message"),
    [
        (ETLError("boom"), 500, "boom"),
        (ETLError("bad args", status=400), 400, "bad args"),
        (BadRequestError("nope"), 400, "nope"),
        (FileAccessError("denied"), 403, "denied"),
        (UpstreamNetworkError("Network error: x"), 502, "Network error: x"),
        (TransformError("bad"), 500, "bad"),
        (DirectPutRefusedError("refused"), 502, "refused"),
        (DirectPutError("odd"), 500, "odd"),
        (UpstreamStatusError(404), 404, "Target request failed"),
        (UpstreamStatusError(503), 503, "Target request failed"),
        (
            InvalidPipelineError("Pipeline header contains empty entry"),
            400,
            "Invalid pipeline header: Pipeline header contains empty entry",
        ),
        (
            ObjectNotFoundError("src/gone.txt", "/mp1/gone"),
            404,
            "Error processing object 'src/gone.txt': file not found at '/mp1/gone'.",
        ),
    ],
)
def test_status_message_and_no_headers(error: ETLError, status: int, message: str) -> None:
    assert isinstance(error, ETLError)
    assert error.status == status
    assert error.message == message
    assert error.headers == {}


def test_status_override_is_per_instance() -> None:
    assert ETLError("x", status=418).status == 418
    assert ETLError("y").status == HTTPStatus.INTERNAL_SERVER_ERROR
    assert BadRequestError("z", status=422).status == 422


def test_invalid_pipeline_error_is_a_value_error() -> None:
    err = InvalidPipelineError("Pipeline header contains empty entry")
    assert isinstance(err, ValueError)
    assert str(err) == "Pipeline header contains empty entry"
    with pytest.raises(ValueError):
        raise err


def test_object_not_found_names_both_paths() -> None:
    err = ObjectNotFoundError("src/a b.txt", "/mp1/@ais/src/%ob/a b.txt")
    assert "'src/a b.txt'" in err.message
    assert "'/mp1/@ais/src/%ob/a b.txt'" in err.message


URL = "http://10.0.0.2:9080/ais%2F@%23%2Fdst%2Fa.txt?owt=3"


def test_transient_error_message_format() -> None:
    cause = ConnectionResetError("reset by peer")
    err = ETLDirectPutTransientError(URL, cause)
    assert str(err) == (
        f"direct_put to '{URL}' failed with transient error: ConnectionResetError(reset by peer)"
    )
    assert (err.url, err.cause, err.bail_without_local_retry) == (URL, cause, False)


def test_transient_error_after_local_retries_is_502() -> None:
    err = ETLDirectPutTransientError(URL, TimeoutError("slow"))
    assert err.status == HTTPStatus.BAD_GATEWAY
    assert err.headers == {}
    assert err.message == f"Direct put failed after retries: {err}"


def test_transient_error_bail_is_503_with_retry_reason() -> None:
    err = ETLDirectPutTransientError(URL, TimeoutError("slow"), bail_without_local_retry=True)
    assert err.status == HTTPStatus.SERVICE_UNAVAILABLE
    assert err.headers == {"Ais-Etl-Retry-Reason": "direct-put-transient"}
    assert err.message == f"Direct put bailed (one-shot body): {err}"


def test_transient_error_bail_flag_can_be_set_later() -> None:
    # the retry loop decides 502 vs 503 when it gives up
    err = ETLDirectPutTransientError(URL, OSError("x"))
    err.bail_without_local_retry = True
    assert err.status == 503
    assert "Ais-Etl-Retry-Reason" in err.headers


def test_transient_error_with_empty_cause_text() -> None:
    err = ETLDirectPutTransientError(URL, ConnectionError())
    assert str(err).endswith("failed with transient error: ConnectionError()")


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (ValueError("bad"), "bad"),
        (ValueError(), "ValueError"),
        (SystemExit(3), "SystemExit: 3"),
        (SystemExit(), "SystemExit"),
        (KeyboardInterrupt(), "KeyboardInterrupt"),
    ],
)
def test_transform_error_names_exits(exc: BaseException, message: str) -> None:
    error = transform_error(exc)
    assert (error.status, error.message, error.__cause__) == (500, message, exc)

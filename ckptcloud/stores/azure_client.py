"""The ``ContainerClient`` that ``AzureBlobSaver`` builds: credentials from arguments or the environment, a
connection pool sized for the pipeline, ckptcloud's timeouts, and the SDK's own retries off."""

from __future__ import annotations

import os
from typing import Any

from ckptcloud.stores.azure_errors import redact


def make_container_client(
    container: str,
    connection_string: str | None = None,
    account_url: str | None = None,
    credential: Any = None,
    api_version: str | None = None,
    max_concurrency: int = 8,
) -> Any:
    """A ``ContainerClient`` from ``connection_string``, else ``account_url`` + ``credential``, else the environment:
    ``AZURE_STORAGE_CONNECTION_STRING``, then ``AZURE_STORAGE_ACCOUNT_URL`` (or ``AZURE_STORAGE_ACCOUNT``) with
    ``DefaultAzureCredential``. ``api_version`` (or ``AZURE_STORAGE_API_VERSION``) pins the REST version.

    ``account_url`` may carry a SAS (``https://acct.blob.core.windows.net?sv=...&sig=...``): a container SAS, or a
    blob SAS for loading that one blob. The client connects within ``azure.CONNECT_TIMEOUT`` seconds and waits
    ``azure.DATA_READ_TIMEOUT`` seconds for each read of a transfer (metadata requests pass a shorter one); the SDK's
    own retries are off (``retry_total=0``): ckptcloud's ``Retry`` retries each request, and logs each retry.
    """
    from ckptcloud.stores import azure as settings  # the timeouts, read at call time (tests make them small)

    try:
        import requests
        from azure.core.pipeline.transport import RequestsTransport
        from azure.storage.blob import ContainerClient
    except ImportError as err:
        raise ImportError("AzureBlobSaver needs azure-storage-blob: pip install ckptcloud[azure]") from err

    env = os.environ
    if not connection_string and not account_url:
        connection_string, account = env.get("AZURE_STORAGE_CONNECTION_STRING"), env.get("AZURE_STORAGE_ACCOUNT")
        account_url = env.get("AZURE_STORAGE_ACCOUNT_URL") or (account and f"https://{account}.blob.core.windows.net")
    if not connection_string and not account_url:
        raise ValueError(
            "AzureBlobSaver needs `container_client`, `connection_string` or `account_url` (+ `credential`), or one "
            "of AZURE_STORAGE_CONNECTION_STRING, AZURE_STORAGE_ACCOUNT_URL, AZURE_STORAGE_ACCOUNT in the environment"
        )
    session = requests.Session()  # requests pools 10 connections per host; the pipeline may run more threads
    session.mount("https://", requests.adapters.HTTPAdapter(pool_maxsize=max(10, max_concurrency + 2)))
    session.mount("http://", session.adapters["https://"])
    api_version = api_version or env.get("AZURE_STORAGE_API_VERSION")
    # A transport passed in ignores the client's own connection_timeout/read_timeout (it would wait 300 s): the
    # timeouts go to the transport itself.
    transport = RequestsTransport(
        session=session, connection_timeout=settings.CONNECT_TIMEOUT, read_timeout=settings.DATA_READ_TIMEOUT
    )
    options: dict[str, Any] = {
        "transport": transport,
        "max_single_get_size": settings.READ_CHUNK_SIZE,
        "max_chunk_get_size": settings.READ_CHUNK_SIZE,
        "max_single_put_size": settings.MAX_BLOCK_SIZE,  # put is always one Put Blob request
        "retry_total": 0,  # the pipeline retries each request (the SDK's own first backoff is 15 s)
        **({"api_version": api_version} if api_version else {}),
    }
    try:
        if connection_string:
            return ContainerClient.from_connection_string(
                connection_string, container, credential=credential, **options
            )
        if credential is None and "sig=" not in account_url:  # a SAS URL carries its own credential
            credential = _default_credential()
        return ContainerClient(account_url, container, credential=credential, **options)
    except ValueError as err:  # the SDK's text may quote the URL or connection string, SAS and key included
        given = "connection_string" if connection_string else "account_url"
        message = f"Argument `{given}` was refused by the Azure SDK: {redact(str(err))}"
    raise ValueError(message)  # outside the except block: the SDK's error is not chained


def _default_credential() -> Any:
    """``DefaultAzureCredential()``, or an ImportError that says how to get it or what to pass instead."""
    try:
        from azure.identity import DefaultAzureCredential
    except ImportError as err:
        raise ImportError(
            "AzureBlobSaver with an account URL needs a credential: pass `credential=` (account key, SAS token or "
            "azure.identity credential) or `pip install azure-identity` to use DefaultAzureCredential"
        ) from err
    return DefaultAzureCredential()

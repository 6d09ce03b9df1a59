"""No error AzureBlobSaver raises carries a secret anywhere in its chain, for every kind of failure, on Azurite.

The Azure SDK's exceptions quote the request URL, SAS query string included, in their text, ``inner_exception`` and
``response``. Everything a user or a CI log could see is checked: the formatted traceback (causes, contexts, notes),
``str``/``repr`` and the attributes of every exception in the chain, and ckptcloud's own log lines at DEBUG.
"""

from __future__ import annotations

import base64
import datetime
import logging
import re
import traceback
from urllib.parse import parse_qsl, quote

import pytest
import torch
from azure.storage.blob import generate_container_sas

from ckptcloud.errors import TransientError
from ckptcloud.retry import Retry
from ckptcloud.savers import AzureBlobSaver
from ckptcloud.testing.faultproxy import FaultProxy
from ckptcloud.testing.servers import AZURITE_ACCOUNT, AZURITE_KEY, free_port
from tests.conftest import AZURITE_API_VERSION

pytestmark = pytest.mark.integration
WRONG_KEY = base64.b64encode(b"not-the-azurite-key-0123456789-" * 2).decode()
CREDENTIALS = ["sas", "sas-in-url", "account-key", "connection-string"]
QUICK = Retry(max_attempts=2, initial_backoff=0.01)


def everything_shown(err: BaseException) -> str:
    """The traceback as printed, and str, repr and attributes of every exception reachable from ``err``."""
    shown = ["".join(traceback.format_exception(type(err), err, err.__traceback__))]
    seen: set[int] = set()
    stack: list[BaseException | None] = [err]
    while stack:
        exc = stack.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        shown += [str(exc), repr(exc), repr(vars(exc)), *getattr(exc, "__notes__", [])]
        stack += [exc.__cause__, exc.__context__, *(v for v in vars(exc).values() if isinstance(v, BaseException))]
    return "\n".join(shown)


def secret_forms(*secrets: str) -> list[str]:
    return [form for s in secrets for form in (s, quote(s, safe=""))]


def credential_for(kind: str, endpoint: str, container: str, *, key: str = AZURITE_KEY, permission: str = "rwdl"):
    """AzureBlobSaver keywords for ``kind`` of credential, and the secrets they hold."""
    if kind == "account-key":
        return {"account_url": endpoint, "credential": {"account_name": AZURITE_ACCOUNT, "account_key": key}}, [key]
    if kind == "connection-string":
        connection = (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={key};BlobEndpoint={endpoint};"
        )
        return {"connection_string": connection}, [key]
    expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
    sas = generate_container_sas(AZURITE_ACCOUNT, container, account_key=key, permission=permission, expiry=expiry)
    sig = dict(parse_qsl(sas))["sig"]
    if kind == "sas":
        return {"account_url": endpoint, "credential": sas}, [sig]
    return {"account_url": f"{endpoint}?{sas}"}, [sig]


@pytest.fixture
def endpoint(azurite_blob_endpoint: str) -> str:
    return azurite_blob_endpoint


@pytest.fixture
def ckptcloud_logs(caplog, monkeypatch):
    """ckptcloud's own records at DEBUG, with any redacting filter taken off: its messages must be clean as made."""
    monkeypatch.setattr(logging.getLogger("ckptcloud"), "filters", [])
    caplog.set_level(logging.DEBUG, logger="ckptcloud")

    def text() -> str:
        records = [r for r in caplog.records if r.name.startswith("ckptcloud")]
        return "\n".join(f"{r.getMessage()}\n{r.exc_text or ''}" for r in records)

    return text


def fail(kind: str, failure: str, endpoint: str, container: str, service) -> tuple[BaseException, list[str]]:
    """Make ``failure`` happen with a ``kind`` credential; return the raised error and the secrets in play."""
    options = {"api_version": AZURITE_API_VERSION, "retry": QUICK}
    key, permission, target = AZURITE_KEY, "rwdl", container
    if failure == "refused":
        endpoint = f"http://127.0.0.1:{free_port()}/{AZURITE_ACCOUNT}"  # nothing listens there
    elif failure == "wrong-key":
        key = WRONG_KEY  # a wrong account key, or a SAS signed with one
    elif failure == "sas-without-permission":
        permission = "r"  # the container check needs 'l'
    elif failure == "missing-container":
        target = "ckpt-no-such-container"
    credential, secrets = credential_for(kind, endpoint, target, key=key, permission=permission)
    secrets += [AZURITE_KEY, WRONG_KEY]
    with pytest.raises(Exception) as raised:
        if failure == "server-error":
            port = int(endpoint.split(":")[2].split("/")[0])
            with FaultProxy(upstream_port=port, error=1.0) as proxy:
                credential, _ = credential_for(kind, f"{proxy.endpoint}/{AZURITE_ACCOUNT}", target)
                AzureBlobSaver(target, "run", **credential, **options)
        elif failure == "missing-blob":
            AzureBlobSaver(target, "run", **credential, **options).load("absent.pt")
        elif failure == "range-past-the-end":  # HTTP 416: an error ckptcloud has no builtin for
            service.get_blob_client(container, "run/small.pt").upload_blob(b"0123456789")
            saver = AzureBlobSaver(target, "run", **credential, require_empty=False, **options)
            list(saver.store.read("run/small.pt", 100, 200))
        else:
            AzureBlobSaver(target, "run", **credential, **options)
    return raised.value, secret_forms(*secrets)


FAILURES = {
    "refused": (TransientError, r"cannot reach http://127\.0\.0\.1:\d+ \(checking the container az://"),
    "wrong-key": (PermissionError, r"access denied to az://ckpt-\w+ \(checking the container\): Authori[sz]ation"
                                   r"Failure|AuthenticationFailed"),
    "sas-without-permission": (PermissionError, r"the 'l' \(list\) permission"),
    "missing-container": (FileNotFoundError, r"'ckpt-no-such-container' does not exist"),
    "missing-blob": (FileNotFoundError, r"no blob at az://ckpt-\w+/run/absent\.pt \(reading the metadata\)"),
    "server-error": (TransientError, r"Azure answered \w+ for az://ckpt-\w+ \(checking the container\)"),
    "range-past-the-end": (OSError, r"Azure answered InvalidRange \(HTTP 416\) for az://ckpt-\w+/run/small\.pt"),
}  # fmt: skip
CASES = [(k, f) for f in FAILURES for k in CREDENTIALS if f != "sas-without-permission" or k.startswith("sas")]


@pytest.mark.parametrize("kind,failure", CASES)
def test_no_error_shows_a_secret_anywhere_in_its_chain_or_in_the_logs(
    endpoint, azure_container, azure_service, ckptcloud_logs, kind, failure
):
    error, message = FAILURES[failure]
    err, secrets = fail(kind, failure, endpoint, azure_container, azure_service)
    assert isinstance(err, error), everything_shown(err)
    assert re.search(message, str(err)), str(err)
    shown = everything_shown(err) + ckptcloud_logs()
    leaked = [s for s in secrets if s in shown]
    assert not leaked, f"{len(leaked)} secret(s) in:\n{shown}"
    cause = err.__cause__
    assert cause is not None and type(cause).__name__ == "RedactedAzureError" and err.__context__ is None
    assert not hasattr(cause, "response") and cause.__cause__ is None and cause.__context__ is None
    if isinstance(err, TransientError):
        assert "retrying" in ckptcloud_logs()  # the retry's WARNING line was checked above too


def test_an_account_url_the_sdk_refuses_is_named_without_its_sas(endpoint, azure_container):
    credential, secrets = credential_for("sas-in-url", endpoint, azure_container)
    bad_url = "http:///" + credential["account_url"].split("/", 3)[3]  # no host: the SDK refuses it, quoting it
    with pytest.raises(ValueError, match="Argument `account_url`") as raised:
        AzureBlobSaver(azure_container, account_url=bad_url, api_version=AZURITE_API_VERSION)
    shown = everything_shown(raised.value)
    assert not [s for s in secret_forms(*secrets) if s in shown], shown
    assert raised.value.__context__ is None


def test_a_saved_and_loaded_checkpoint_logs_no_secret(endpoint, azure_container, ckptcloud_logs):
    credential, secrets = credential_for("sas-in-url", endpoint, azure_container)
    saver = AzureBlobSaver(azure_container, "run", api_version=AZURITE_API_VERSION, part_size=1 << 20, **credential)
    saver({"w": torch.randn(1 << 19)}, "model_1.pt")
    saver.load("model_1.pt")
    text = ckptcloud_logs() + repr(saver) + repr(saver.store.__dict__.get("endpoint"))
    assert not [s for s in secret_forms(*secrets) if s in text]
